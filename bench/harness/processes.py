"""Real role processes for tests and benchmarks: a cloud CA with client identities, role homes on free
ports, ``python -m roles.<role> --config <home>/role.json`` started, checked and stopped, and one
HTTPS call to a role's API the way another role makes it.
"""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import ssl
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from shared.config import RoleConfig, write_role_config
from shared.net import free_port
from shared.pki import CertificateAuthority
from shared.tls import client_context_from_files

__all__ = ["CloudPKI", "RoleProcess", "call", "wait_until"]

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
