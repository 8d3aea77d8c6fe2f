"""What tests need beyond the process harness (:mod:`bench.harness.processes`, shared with the benchmarks
and named here too): lane exchanges with a worker, a tiny DNS server, WebSocket and registry probes.

Tests talk to roles the way other roles do: over mTLS with a certificate of the right role.
"""

from __future__ import annotations

import base64
import contextlib
import ftplib
import functools
import hashlib
import os
import random
import shutil
import socket
import ssl
import subprocess
import sys
import tempfile
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

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

from bench.harness.processes import CloudPKI, RoleProcess, call, wait_until
from roles.fileserver.config import FileserverConfig
from roles.frontend.config import FrontendConfig
from roles.worker.config import WorkerConfig
from shared.tls import LANE_ALPN

WS_GUID = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11"  # RFC 6455 section 1.3


class MemoryTransport:
    """A raw transport for the visitors' TLS bridge without sockets: what the server sends goes to the
    client's incoming BIO."""

    def __init__(self, to_client: ssl.MemoryBIO) -> None:
        self.to_client = to_client
        self.closed = False

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return ("127.0.0.1", 40000) if name == "peername" else default

    def write(self, data: bytes) -> None:
        self.to_client.write(data)

    def is_closing(self) -> bool:
        return self.closed

    def close(self) -> None:
        self.closed = True

    def abort(self) -> None:
        self.closed = True

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass


def handshake_through(
    bridge: Any, client_ctx: ssl.SSLContext, host: str
) -> tuple[ssl.SSLObject, ssl.MemoryBIO]:
    """Connect the front end's TLS ``bridge`` to a :class:`MemoryTransport` and complete a client's
    handshake through it: the client, and the BIO of what it sends to the server."""
    from_server, to_server = ssl.MemoryBIO(), ssl.MemoryBIO()
    bridge.connection_made(MemoryTransport(from_server))
    client = client_ctx.wrap_bio(from_server, to_server, server_hostname=host)
    for _ in range(10):
        try:
            client.do_handshake()
            break
        except ssl.SSLWantReadError:
            bridge.data_received(to_server.read())
    bridge.data_received(to_server.read())  # the client's Finished
    return client, to_server


__all__ = [
    "Answer",
    "CloudPKI",
    "MemoryTransport",
    "ResumingFTP_TLS",
    "RoleProcess",
    "TinyDns",
    "app_base",
    "call",
    "data_plane",
    "handshake_through",
    "lane_exchange",
    "publish_files",
    "random_op",
    "wait_until",
]


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
class ResumingFTP_TLS(ftplib.FTP_TLS):
    """ftplib's FTPS client with data connections that resume the control connection's TLS session, as
    FileZilla, lftp and curl make them; the publisher refuses others. ftplib's own ``ntransfercmd``
    wraps the data socket without ``session=`` (docs/publishing.md shows the same lines for users)."""

    def ntransfercmd(self, cmd: str, rest: int | str | None = None) -> tuple[socket.socket, int | None]:
        conn, size = ftplib.FTP.ntransfercmd(self, cmd, rest)
        if self._prot_p:  # type: ignore[attr-defined]  # ftplib's own flag, set by prot_p()
            assert isinstance(self.sock, ssl.SSLSocket)
            conn = self.context.wrap_socket(conn, server_hostname=self.host, session=self.sock.session)
        return conn, size


def app_base(site: str) -> Path:
    """The worker's directory for a running site's app (its HOME's parent), from the app's process."""
    for entry in Path("/proc").iterdir():
        with contextlib.suppress(OSError):
            environ = (entry / "environ").read_bytes().split(b"\0")
            if entry.name.isdigit() and f"SITECLOUD_SITE={site}".encode() in environ:
                home = next(v[5:] for v in environ if v.startswith(b"HOME="))
                return Path(home.decode()).parent
    raise AssertionError(f"no process of site {site} runs")


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


@functools.cache
def npm_registry_unreachable() -> str:
    """Why this host cannot install Node packages ("" when it can), asked once: tests of sites with a
    package.json skip with it."""
    if shutil.which("node") is None or shutil.which("npm") is None:
        return "needs Debian's nodejs and npm (.ci/run installs them)"
    try:
        probe = subprocess.run(
            ["npm", "view", "express", "version"], capture_output=True, text=True, timeout=60, check=False
        )
    except subprocess.TimeoutExpired:
        return "npm cannot reach its registry here (no answer in 60 s)"
    return "" if probe.returncode == 0 else f"npm cannot reach its registry here: {probe.stderr[-300:]}"


class WebSocket:
    """A minimal RFC 6455 client on a connected (TLS) socket: text and binary messages, ping answered,
    the closing handshake (section 7) done both ways."""

    def __init__(self, sock: socket.socket, head: bytes, rest: bytes) -> None:
        self.sock = sock
        self.head = head
        self._buf = rest

    @classmethod
    def connect(
        cls, port: int, host: str, path: str, *, tls: ssl.SSLContext | None = None, timeout: float = 10
    ) -> WebSocket:
        sock: socket.socket = socket.create_connection(("127.0.0.1", port), timeout=timeout)
        if tls is not None:
            sock = tls.wrap_socket(sock, server_hostname=host)
        key = base64.b64encode(os.urandom(16)).decode()
        sock.sendall(
            f"GET {path} HTTP/1.1\r\nHost: {host}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n".encode()
        )
        data = b""
        while b"\r\n\r\n" not in data:
            chunk = sock.recv(65536)
            if not chunk:
                sock.close()
                raise ConnectionError(f"closed during the handshake: {data!r}")
            data += chunk
        head, _, rest = data.partition(b"\r\n\r\n")
        accept = base64.b64encode(hashlib.sha1((key + WS_GUID).encode()).digest()).decode()
        ws = cls(sock, head, rest)
        if head.startswith(b"HTTP/1.1 101 ") and accept.lower().encode() not in head.lower():
            ws.sock.close()
            raise ConnectionError(f"wrong Sec-WebSocket-Accept in {head!r}")
        return ws

    def _read(self, n: int) -> bytes:
        while len(self._buf) < n:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise ConnectionError("closed")
            self._buf += chunk
        out, self._buf = self._buf[:n], self._buf[n:]
        return out

    def _frame(self, opcode: int, payload: bytes) -> None:
        mask = os.urandom(4)
        masked = bytes(c ^ mask[i % 4] for i, c in enumerate(payload))
        n = len(payload)
        if n < 126:
            header = bytes([0x80 | opcode, 0x80 | n])
        elif n < 65536:
            header = bytes([0x80 | opcode, 0x80 | 126]) + n.to_bytes(2, "big")
        else:
            header = bytes([0x80 | opcode, 0x80 | 127]) + n.to_bytes(8, "big")
        self.sock.sendall(header + mask + masked)

    def send(self, message: str | bytes) -> None:
        self._frame(
            1 if isinstance(message, str) else 2, message.encode() if isinstance(message, str) else message
        )

    def _next(self) -> tuple[int, bytes]:
        b0, b1 = self._read(2)
        assert not b1 & 0x80, "a server must not mask its frames"
        n = b1 & 0x7F
        if n == 126:
            n = int.from_bytes(self._read(2), "big")
        elif n == 127:
            n = int.from_bytes(self._read(8), "big")
        return b0, self._read(n)

    def recv(self) -> str | bytes:
        """The next message (fragments joined); a ping is answered on the way."""
        parts: list[bytes] = []
        first = 0
        while True:
            b0, payload = self._next()
            opcode = b0 & 0x0F
            if opcode == 9:
                self._frame(10, payload)
                continue
            if opcode == 8:
                raise ConnectionError(f"closed by the server: {payload!r}")
            first = first or opcode
            parts.append(payload)
            if b0 & 0x80:
                data = b"".join(parts)
                return data.decode() if first == 1 else data

    def close(self, code: int = 1000) -> int:
        """The closing handshake: our close frame, the server's answer (its code is returned), then
        the server ends the connection (RFC 6455 section 7.1.1)."""
        self._frame(8, code.to_bytes(2, "big"))
        while True:
            b0, payload = self._next()
            if b0 & 0x0F == 8:
                break
        answered = int.from_bytes(payload[:2], "big") if len(payload) >= 2 else 1005
        self.sock.settimeout(5)
        while self.sock.recv(65536):
            pass
        self.sock.close()
        return answered

    def __enter__(self) -> WebSocket:
        return self

    def __exit__(self, *exc: object) -> None:
        self.sock.close()


@contextmanager
def data_plane(
    root: Path, domain: str, *, worker: dict[str, Any] | None = None, frontend: dict[str, Any] | None = None
) -> Iterator[tuple[CloudPKI, RoleProcess, RoleProcess, RoleProcess]]:
    """A fileserver, a worker (a 0.3 s version grace unless ``worker`` says) and a front end with
    ``domain``'s wildcard certificate, started side by side and healthy: (pki, fileserver, worker,
    front end). Stopped afterwards, front end first."""
    pki = CloudPKI(root / "pki")
    fs_config = pki.role_config(FileserverConfig, "fileserver", root / "fileserver")
    w_config = pki.role_config(
        WorkerConfig, "worker", root / "worker", **{"version_grace": 0.3, **(worker or {})}
    )
    fe_config = pki.role_config(FrontendConfig, "frontend", root / "frontend", **(frontend or {}))
    pki.ca.issue_wildcard(domain).write(fe_config.wildcard_key_file, fe_config.wildcard_cert_file)
    procs = [RoleProcess(c, pki).start(wait=False) for c in (fs_config, w_config, fe_config)]
    try:
        for proc in procs:
            proc.wait_healthy()
        yield pki, procs[0], procs[1], procs[2]
    finally:
        for proc in reversed(procs):
            proc.stop()


def publish_files(pki: CloudPKI, fileserver: RoleProcess, site: str, files: dict[str, bytes]) -> None:
    """Store ``files`` in ``site`` on ``fileserver`` as the publisher does: each blob, then one commit."""
    ctx = pki.client_ssl("publisher")
    url = f"{fileserver.control_url}/v1/sites/{site}"
    ops = []
    for path, data in files.items():
        status, body = call(f"{url}/blobs", ctx, method="POST", data=data)
        assert status == 200, body
        ops.append({"op": "put", "path": path, "sha256": body["sha256"]})
    status, body = call(f"{url}/commit", ctx, method="POST", body={"ops": ops})
    assert status == 200, body


def random_op(rng: random.Random, files: set[str], dirs: set[str], shas: list[str]) -> dict[str, str]:
    """One commit op on a site of ``files`` and ``dirs`` (paths), mostly one that applies: the moves an
    FTP client makes (MKD, STOR over a file or new, DELE, RMD, RNFR/RNTO of a file or a folder)."""
    folders = ["", *sorted(dirs)]

    def fresh() -> str:
        parent = rng.choice(folders)
        name = f"n{rng.randrange(1000)}"
        # Sometimes a path whose parents do not exist yet: a put or rename makes them.
        if rng.random() < 0.2:
            name += f"/m{rng.randrange(10)}"
        return f"{parent}/{name}" if parent else name

    kind = rng.choice(["mkdir", "put", "put", "overwrite", "delete", "rmdir", "rename", "rename"])
    if kind == "overwrite" and files:
        return {"op": "put", "path": rng.choice(sorted(files)), "sha256": rng.choice(shas)}
    if kind == "delete" and files:
        return {"op": "delete", "path": rng.choice(sorted(files))}
    if kind == "rmdir" and dirs:
        return {"op": "rmdir", "path": rng.choice(sorted(dirs))}
    if kind == "rename" and (files or dirs):
        src = rng.choice(sorted(files | dirs))
        dst = rng.choice(sorted(files)) if files and rng.random() < 0.3 else fresh()
        return {"op": "rename", "from": src, "to": dst}
    if kind == "mkdir":
        return {"op": "mkdir", "path": fresh()}
    return {"op": "put", "path": fresh(), "sha256": rng.choice(shas)}
