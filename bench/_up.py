"""The cloud as users start it, for benches: `sitecloud up` with its defaults on free ports, set up
through the CLI and the REST API, content published by web deploy, visitors over HTTPS on
``<site>.sites.localhost`` through the front end."""

from __future__ import annotations

import base64
import contextlib
import io
import json
import os
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import time
import urllib.error
import urllib.request
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from bench._cpu import CpuMeter, family
from roles.controller.config import CloudConfig
from roles.controller.fabric._wheelhouse import Wheelhouse, code_hash
from roles.frontend.config import FrontendConfig
from roles.management._cli_client import ApiClient, Endpoints
from roles.worker._layout import APPS_BASE, apps_root_home
from roles.worker.apps._isolation import reap_orphans
from roles.worker.config import WorkerConfig
from shared.config import load_role_config
from shared.net import free_port
from shared.tls import client_context_from_files

__all__ = ["UpCloud", "wait_until"]

T = TypeVar("T")


def wait_until(predicate: Callable[[], T], *, timeout: float, interval: float = 0.05, what: str) -> T:
    deadline = time.monotonic() + timeout
    last: BaseException | None = None
    while time.monotonic() < deadline:
        try:
            value = predicate()
            if value:
                return value
        except Exception as exc:  # not up yet
            last = exc
        time.sleep(interval)
    raise TimeoutError(f"timed out after {timeout:.0f} s waiting for {what} (last error: {last!r})")


class UpCloud:
    """``sitecloud up --home HOME`` on free ports; every other option at its default (or as
    ``extra_args`` say)."""

    domain = "sites.localhost"

    def __init__(self, home: Path, extra_args: tuple[str, ...] = ()) -> None:
        self.home = home
        self.extra_args = extra_args
        self.ports = {
            n: free_port() for n in ("http_port", "https_port", "ftp_port", "api_port", "deploy_port")
        }
        low = free_port()
        self.passive = (low, low + 20) if low < 65000 else (40000, 40020)
        self.log_path = home.parent / "up.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self._api: ApiClient | None = None
        self._tls: ssl.SSLContext | None = None
        self._worker: tuple[int, ssl.SSLContext] | None = None
        self._controller: ssl.SSLContext | None = None
        self._ready_at = 0.0
        self._code = ""

    def start(self, timeout: float = 90.0) -> None:
        argv = [sys.executable, "-m", "roles.management.cli", "up", "--home", str(self.home), "--json"]
        for name, port in self.ports.items():
            argv += [f"--{name.replace('_', '-')}", str(port)]
        argv += ["--passive-ports", f"{self.passive[0]}-{self.passive[1]}", *self.extra_args]
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT)

        def ready() -> bool:
            if self.proc is not None and self.proc.poll() is not None:
                raise RuntimeError(f"sitecloud up exited with {self.proc.returncode}; see {self.log_path}")
            return (self.home / "endpoints.json").exists()

        wait_until(ready, timeout=timeout, interval=0.1, what="sitecloud up")
        self._ready_at = time.monotonic()
        self._code = code_hash()
        endpoints = Endpoints.load(self.home)
        self._api = ApiClient(endpoints, endpoints.admin_token(), timeout=60)
        self._tls = ssl.create_default_context(cafile=str(self.ca_file))

    @property
    def ca_file(self) -> Path:
        return self.home / "ca" / "ca.pem"

    @property
    def api(self) -> ApiClient:
        assert self._api is not None, "start() first"
        return self._api

    @property
    def tls(self) -> ssl.SSLContext:
        assert self._tls is not None, "start() first"
        return self._tls

    def cli(self, *args: str) -> Any:
        """``sitecloud --home HOME ARGS --json``, as an admin types it."""
        proc = subprocess.run(
            [sys.executable, "-m", "roles.management.cli", "--home", str(self.home), *args, "--json"],
            capture_output=True,
            timeout=120,
            check=False,
        )
        if proc.returncode != 0:
            raise RuntimeError(f"sitecloud {' '.join(args)} failed: {proc.stdout!r} {proc.stderr!r}")
        return json.loads(proc.stdout) if proc.stdout.strip() else None

    def create_site(self, name: str, subscription: int) -> dict[str, Any]:
        """Through the REST API (what `sitecloud site create` calls): fast enough for thousands."""
        return dict(
            self.api.request("POST", self.api.path("sites"), {"name": name, "subscription": subscription})
        )

    def web_deploy(self, site: dict[str, Any], files: dict[str, bytes]) -> None:
        """A zip POSTed to the site's web deploy URL with its publishing credentials, as curl would."""
        buf = io.BytesIO()
        with zipfile.ZipFile(buf, "w") as zf:
            for path, data in files.items():
                zf.writestr(path, data)
        deploy = site["deploy"]
        auth = base64.b64encode(f"{deploy['user']}:{deploy['password']}".encode()).decode()
        req = urllib.request.Request(
            deploy["url"],
            data=buf.getvalue(),
            method="POST",
            headers={"Authorization": f"Basic {auth}", "Content-Type": "application/zip"},
        )
        deadline = time.monotonic() + 30
        while True:
            try:
                with urllib.request.urlopen(req, context=self.tls, timeout=60) as resp:
                    resp.read()
                return
            except urllib.error.HTTPError as exc:
                # A site made a moment ago: its credentials reach the publisher with the next
                # snapshot (later on a busy host); until then they are refused.
                if exc.code != 401 or time.monotonic() > deadline:
                    raise
            time.sleep(0.2)

    def connect(self, site: str, timeout: float = 30.0) -> ssl.SSLSocket:
        """TLS to the front end with ``<site>.<domain>`` as SNI (Python does not resolve ``*.localhost``)."""
        raw = socket.create_connection(("127.0.0.1", self.ports["https_port"]), timeout=timeout)
        return self.tls.wrap_socket(raw, server_hostname=f"{site}.{self.domain}")

    def connect_worker(self, timeout: float = 30.0) -> ssl.SSLSocket:
        """mTLS to the worker's data port with the front end's own certificate, as the front end calls it."""
        if self._worker is None:
            worker = load_role_config(WorkerConfig, self.home / "roles" / "worker" / "role.json")
            frontend = load_role_config(FrontendConfig, self.home / "roles" / "frontend" / "role.json")
            ctx = client_context_from_files(frontend.cert_file, frontend.key_file, worker.ca_file)
            self._worker = (worker.data_port, ctx)
        port, ctx = self._worker
        raw = socket.create_connection(("127.0.0.1", port), timeout=timeout)
        return ctx.wrap_socket(raw, server_hostname="localhost")

    def get(self, site: str, path: str = "/", *, direct: bool = False) -> tuple[int, bytes, float]:
        """(status, body, seconds from sending the request to the answer's first byte); TLS is set up
        before the clock starts, so the figure is the site's, not the handshake's. ``direct``: to the
        worker alone, skipping the front end."""
        host = f"{site}.{self.domain}"
        extra = f"X-Sitecloud-Site: {site}\r\n" if direct else ""
        with self.connect_worker() if direct else self.connect(site) as tls:
            request = f"GET {path} HTTP/1.1\r\nHost: {host}\r\n{extra}Connection: close\r\n\r\n"
            t0 = time.perf_counter()
            tls.sendall(request.encode())
            first = tls.recv(1)
            elapsed = time.perf_counter() - t0
            chunks = [first]
            while chunk := tls.recv(65536):
                chunks.append(chunk)
        answer = b"".join(chunks)
        head, _, body = answer.partition(b"\r\n\r\n")
        try:
            status = int(head.split(b" ", 2)[1])
        except (IndexError, ValueError):
            raise RuntimeError(f"{site}{path} answered {answer[:200]!r}") from None
        if b"transfer-encoding: chunked" in head.lower():
            body = _unchunk(body)
        return status, body, elapsed

    def health(self, role: str) -> dict[str, Any]:
        """A role's own health answer, asked on its control port as the controller asks it (with the
        controller's certificate)."""
        if self._controller is None:
            tls = self.home / "controller" / "tls"
            self._controller = client_context_from_files(tls / "role.pem", tls / "role.key", self.ca_file)
        raw = json.loads((self.home / "roles" / role / "role.json").read_text())
        url = f"https://localhost:{raw['control_port']}/v1/health"
        with urllib.request.urlopen(url, context=self._controller, timeout=10) as resp:
            return dict(json.loads(resp.read()))

    def wheelhouse_built(self) -> bool:
        """Whether `up` is done with the wheelhouse for role hosts it builds in the background (a
        ``pip wheel`` of a minute or two, some seconds after it is ready, once per code version): it
        is there for this code, or a minute after `up` was ready no ``pip wheel`` runs under it (a
        build that failed leaves none; nothing running yet is not enough)."""
        if Wheelhouse(CloudConfig(home=Path()).wheelhouse_dir).ready(self._code or code_hash()):
            return True
        return time.monotonic() - self._ready_at > 60 and not self._building()

    def _building(self) -> bool:
        assert self.proc is not None
        for pid in family(self.proc.pid):
            try:
                if b"pip\x00wheel" in Path(f"/proc/{pid}/cmdline").read_bytes():
                    return True
            except OSError:
                continue
        return False

    def wait_at_rest(self, *, cpu: float = 0.05, window: float = 1.0, timeout: float = 900.0) -> float:
        """Wait until the cloud is as a visitor finds it at rest: the wheelhouse built (see
        :meth:`wheelhouse_built`), then `up` and every process under it (roles, their apps) using
        less than ``cpu`` of a core over ``window`` seconds (publishing, syncing and app starts
        settled). The seconds waited."""
        started = time.monotonic()
        wait_until(self.wheelhouse_built, timeout=timeout, interval=1, what="`up` to build its wheelhouse")

        def quiet() -> bool:
            assert self.proc is not None
            meter = CpuMeter({"cloud": [self.proc.pid]})
            meter.start()
            time.sleep(window)
            return meter.stop()["cloud"] < cpu * window

        wait_until(quiet, timeout=timeout, interval=0, what="the cloud's processes to be quiet")
        return time.monotonic() - started

    def role_pid(self, role: str) -> int:
        return int((self.home / "roles" / role / "role.pid").read_text())

    def stop(self) -> None:
        """SIGTERM as Ctrl-C would, then nothing of this cloud left (apps of a killed worker too)."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        for pidfile in (self.home / "roles").glob("*/role.pid"):
            with contextlib.suppress(ProcessLookupError, ValueError, OSError):
                os.kill(int(pidfile.read_text()), signal.SIGKILL)
        # A worker home other uids cannot pass through (as here, and as under /root) keeps what apps
        # reach in /var/lib/sitecloud/apps-<hash>: this cloud's go with it.
        for apps_root in APPS_BASE.glob("apps-*"):
            owner = apps_root_home(apps_root)
            if owner is not None and Path(owner).is_relative_to(self.home):
                reap_orphans(apps_root / "apps")
                shutil.rmtree(apps_root, ignore_errors=True)
        reap_orphans(self.home / "roles" / "worker" / "apps")


def _unchunk(body: bytes) -> bytes:
    out = bytearray()
    while body:
        size_line, _, rest = body.partition(b"\r\n")
        size = int(size_line.split(b";")[0], 16)
        if size == 0:
            break
        out += rest[:size]
        body = rest[size + 2 :]
    return bytes(out)
