"""Start real role processes for tests: a cloud CA, role homes with certificates, ``python -m roles.X``.

Tests talk to roles the way other roles do: over mTLS with a certificate of the right role.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import dns.message
import dns.name
import dns.opcode
import dns.rcode
import dns.rdataclass
import dns.rdatatype
import dns.rrset
import dns.tsig
import dns.tsigkeyring
import dns.update

from shared.config import RoleConfig, write_role_config
from shared.net import free_port
from shared.pki import CertificateAuthority
from shared.tls import LANE_ALPN, client_context_from_files

__all__ = ["Answer", "CloudPKI", "RoleProcess", "TinyDns", "call", "lane_exchange", "wait_until"]

C = TypeVar("C", bound=RoleConfig)


def wait_until(
    predicate: Any, *, timeout: float = 15.0, interval: float = 0.05, what: str = "condition"
) -> Any:
    deadline = time.monotonic() + timeout
    last_exc: BaseException | None = None
    while time.monotonic() < deadline:
        try:
            value = predicate()
            if value:
                return value
        except Exception as exc:  # the thing may not be up yet
            last_exc = exc
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}; last error: {last_exc!r}")


@dataclass
class CloudPKI:
    """A cloud CA in a temp dir, and client identities for tests to call roles as a given role."""

    directory: Path

    def __post_init__(self) -> None:
        self.ca = CertificateAuthority.load_or_create(self.directory / "ca")
        self.ca_file = self.directory / "ca" / "ca.pem"

    def identity(self, role: str) -> tuple[Path, Path]:
        cert, key = self.directory / f"{role}-client.pem", self.directory / f"{role}-client.key"
        if not cert.exists():
            self.ca.issue(f"{role}@test", role=role, dns_names=["localhost"]).write(key, cert)
        return cert, key

    def client_ssl(self, role: str | None = "controller") -> ssl.SSLContext:
        if role is None:
            return client_context_from_files(None, None, self.ca_file)
        cert, key = self.identity(role)
        return client_context_from_files(cert, key, self.ca_file)

    def make_role_home(self, config: C) -> C:
        """Write the role's certificate, the CA and role.json into ``config.home``."""
        config.tls_dir.mkdir(parents=True, exist_ok=True)
        self.ca.issue(
            f"{config.role}@{config.host}",
            role=config.role,
            dns_names=[config.host, "localhost"],
            ip_addresses=["127.0.0.1"],
        ).write(config.key_file, config.cert_file)
        config.ca_file.write_bytes(self.ca.cert_pem)
        write_role_config(config, config.home / "role.json")
        return config

    def role_config(self, cls: type[C], role: str, home: Path, **fields: Any) -> C:
        """A config on free ports: every ``*_port`` field left at 0 gets a free port."""
        values: dict[str, Any] = {"role": role, "host": "localhost", "home": home, **fields}
        for f in dataclasses.fields(cls):
            if f.name.endswith("_port") and not values.get(f.name):
                values[f.name] = free_port()
        return self.make_role_home(cls(**values))


def call(
    url: str,
    ctx: ssl.SSLContext,
    *,
    method: str = "GET",
    body: Any = None,
    data: bytes | None = None,
    headers: dict[str, str] | None = None,
    timeout: float = 10.0,
) -> tuple[int, Any]:
    """One HTTPS call; returns (status, parsed JSON or raw bytes)."""
    hdrs = dict(headers or {})
    if body is not None:
        data = json.dumps(body).encode()
        hdrs.setdefault("Content-Type", "application/json")
    req = urllib.request.Request(url, data=data, method=method, headers=hdrs)
    try:
        with urllib.request.urlopen(req, context=ctx, timeout=timeout) as resp:
            status, raw = resp.status, resp.read()
    except urllib.error.HTTPError as err:
        status, raw = err.code, err.read()
    try:
        return status, json.loads(raw) if raw else None
    except ValueError:
        return status, raw


class RoleProcess:
    """A role running as its own process: ``python -m roles.<role> --config <home>/role.json``."""

    def __init__(self, config: RoleConfig, pki: CloudPKI) -> None:
        self.config = config
        self.pki = pki
        self.log_path = config.home / "role.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, *, wait: bool = True) -> RoleProcess:
        self.config.home.mkdir(parents=True, exist_ok=True)
        log = self.log_path.open("ab")
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                f"roles.{self.config.role}",
                "--config",
                str(self.config.home / "role.json"),
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env,
        )
        log.close()
        if wait:
            self.wait_healthy()
        return self

    @property
    def control_url(self) -> str:
        return f"https://localhost:{self.config.control_port}"

    def health(self) -> dict[str, Any]:
        status, body = call(f"{self.control_url}/v1/health", self.pki.client_ssl("controller"), timeout=2)
        assert status == 200, body
        return dict(body)

    def wait_healthy(self, timeout: float = 20.0) -> dict[str, Any]:
        def healthy() -> dict[str, Any] | None:
            if self.proc is not None and self.proc.poll() is not None:
                raise AssertionError(f"{self.config.role} exited with {self.proc.returncode}:\n{self.log()}")
            return self.health()

        try:
            return dict(wait_until(healthy, timeout=timeout, what=f"{self.config.role} health"))
        except AssertionError as err:
            raise AssertionError(f"{err}\n--- {self.config.role} log ---\n{self.log()}") from None

    def push_config(self, snapshot: dict[str, Any]) -> dict[str, Any]:
        status, body = call(
            f"{self.control_url}/v1/config", self.pki.client_ssl("controller"), method="PUT", body=snapshot
        )
        assert status == 200, body
        return dict(body)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def stop(self, timeout: float = 10.0) -> int | None:
        if self.proc is None or self.proc.poll() is not None:
            return self.proc.returncode if self.proc else None
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise AssertionError(f"{self.config.role} did not stop within {timeout}s on SIGTERM") from None

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    @contextmanager
    def running(self) -> Iterator[RoleProcess]:
        self.start()
        try:
            yield self
        finally:
            self.stop()


@dataclass(frozen=True)
class Answer:
    status: int
    headers: list[tuple[str, str]]  # in the order sent
    body: bytes

    def header(self, name: str) -> str | None:
        return next((v for k, v in self.headers if k.lower() == name.lower()), None)


def lane_exchange(pki: CloudPKI, port: int, heads: list[bytes], *, lane: bool = True) -> list[Answer]:
    """Send ``heads`` to a worker's data port in one write, as a front end (on a lane when ``lane``),
    and read the answers until there are as many or the worker closes."""
    ctx = pki.client_ssl("frontend")
    if lane:
        ctx.set_alpn_protocols([LANE_ALPN])
    answers: list[Answer] = []
    with (
        socket.create_connection(("127.0.0.1", port), timeout=10) as raw,
        ctx.wrap_socket(raw, server_hostname="localhost") as tls,
    ):
        assert tls.selected_alpn_protocol() == (LANE_ALPN if lane else None)
        tls.sendall(b"".join(heads))
        buf = b""
        while len(answers) < len(heads):
            end = buf.find(b"\r\n\r\n")
            if end >= 0:
                lines = buf[:end].decode("latin-1").split("\r\n")
                headers = [(k, v.strip()) for k, _, v in (line.partition(":") for line in lines[1:])]
                status = int(lines[0].split()[1])
                length = 0 if status in (204, 304) else int(dict(headers).get("Content-Length", "0"))
                if len(buf) >= end + 4 + length:
                    answers.append(Answer(status, headers, buf[end + 4 : end + 4 + length]))
                    buf = buf[end + 4 + length :]
                    continue
            data = tls.recv(65536)
            if not data:
                break
            buf += data
    return answers


@functools.cache
def pip_index_unreachable() -> str:
    """Why this host's pip configuration cannot fetch packages ("" when it can), asked once: tests of
    sites with a requirements.txt skip with it."""
    with tempfile.TemporaryDirectory() as scratch:
        argv = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "-d", scratch]
        probe = subprocess.run([*argv, "flask"], capture_output=True, text=True, timeout=120, check=False)
    return "" if probe.returncode == 0 else f"pip cannot fetch packages here: {probe.stdout[-300:]}"


class TinyDns:
    """An authoritative DNS server on 127.0.0.1 for what the test sets: (name, type) -> values.

    With ``tsig`` (key name, algorithm, base64 secret) it also takes RFC 2136 UPDATEs of TXT records
    signed with that key (RFC 8945), as BIND does with an ``update-policy`` for the key: an unsigned
    update is REFUSED, one with an unknown key or a bad signature is NOTAUTH with the TSIG error
    BADKEY or BADSIG. ``updates`` logs each one: (outcome, name).
    """

    def __init__(self, *, tsig: tuple[str, str, str] | None = None) -> None:
        self.records: dict[tuple[str, str], list[str]] = {}
        self.updates: list[tuple[str, str]] = []
        self._keyring = dns.tsigkeyring.from_text({tsig[0]: (tsig[1], tsig[2])}) if tsig else None
        self._sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self._sock.bind(("127.0.0.1", 0))
        self._sock.settimeout(0.2)
        self.port: int = self._sock.getsockname()[1]
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, name="tiny-dns", daemon=True)
        self._thread.start()

    def set(self, name: str, rdtype: str, *values: str) -> None:
        self.records[(name.lower().rstrip("."), rdtype)] = list(values)

    def _answer(self, query: dns.message.Message) -> dns.message.Message:
        reply = dns.message.make_response(query)
        reply.flags |= 0x0400  # AA: we are the authority for every name we know
        question = query.question[0]
        name = question.name.to_text().lower().rstrip(".")
        rdtype = dns.rdatatype.to_text(question.rdtype)
        if not any(known == name for known, _ in self.records):
            reply.set_rcode(dns.rcode.NXDOMAIN)
            return reply
        for kind in dict.fromkeys((rdtype, "CNAME")):
            values = self.records.get((name, kind))
            if values:
                texts = [
                    f'"{v}"' if kind == "TXT" else v if kind in ("A", "AAAA") else f"{v}." for v in values
                ]
                reply.answer.append(dns.rrset.from_text_list(question.name, 60, "IN", kind, texts))
                break
        return reply

    def _refuse_signed(self, wire: bytes, error: int) -> dns.message.Message:
        """NOTAUTH with the TSIG error, as RFC 8945 5.3.2 says (the MAC cannot be made: no key)."""
        unverified = dns.message.from_wire(wire, keyring=False)
        reply = dns.message.make_response(unverified)
        reply.set_rcode(dns.rcode.NOTAUTH)
        if unverified.keyname is not None:
            stand_in = dns.tsig.Key(unverified.keyname, b"\0" * 32, unverified.keyalgorithm)
            reply.use_tsig(stand_in, tsig_error=error)
        self.updates.append((f"refused: {dns.rcode.to_text(error)}", ""))
        return reply

    def _update(self, update: dns.message.Message) -> dns.message.Message:
        assert isinstance(update, dns.update.UpdateMessage)
        reply = dns.message.make_response(update)
        if not update.had_tsig:
            reply.set_rcode(dns.rcode.REFUSED)
            self.updates.append(("refused: unsigned", ""))
            return reply
        zone = update.zone[0].name
        if any(not rrset.name.is_subdomain(zone) for rrset in update.update):
            reply.set_rcode(dns.rcode.NOTZONE)
            return reply
        if any(rrset.rdtype != dns.rdatatype.TXT for rrset in update.update):
            reply.set_rcode(dns.rcode.REFUSED)
            return reply
        done: dict[str, str] = {}
        for rrset in update.update:
            name = rrset.name.to_text().lower().rstrip(".")
            values = self.records.setdefault((name, "TXT"), [])
            texts = [b"".join(rd.strings).decode() for rd in rrset]
            if rrset.deleting is None:
                values.extend(t for t in texts if t not in values)
                done[name] = "added"
            elif rrset.deleting == dns.rdataclass.NONE:  # RFC 2136 2.5.4: delete these RRs
                values[:] = [v for v in values if v not in texts]
                done[name] = "deleted"
            else:  # ANY: the whole set
                values.clear()
                done[name] = "deleted"
            if not values:
                del self.records[(name, "TXT")]
        self.updates.extend((action, name) for name, action in done.items())
        return reply

    def _handle(self, wire: bytes) -> dns.message.Message:
        try:
            message = dns.message.from_wire(wire, keyring=self._keyring)
        except (dns.message.UnknownTSIGKey, dns.tsig.BadKey, dns.tsig.BadAlgorithm):
            return self._refuse_signed(wire, dns.rcode.BADKEY)
        except dns.tsig.BadSignature:
            return self._refuse_signed(wire, dns.rcode.BADSIG)
        if message.opcode() == dns.opcode.UPDATE:
            return self._update(message)
        return self._answer(message)

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                wire, peer = self._sock.recvfrom(4096)
            except TimeoutError:
                continue
            try:
                self._sock.sendto(self._handle(wire).to_wire(), peer)
            except Exception:  # a malformed query is dropped, as a real server would
                continue

    def close(self) -> None:
        self._stop.set()
        self._thread.join()
        self._sock.close()
