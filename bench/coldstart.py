"""`python -m bench.coldstart`: dynamic sites, cold start and idle density.

By default (``--via up``) as users run it: the cloud started by `sitecloud up` with its defaults,
plan, tenant and subscription made with the CLI, sites made through the REST API, each published by
web deploy, and every figure taken through the front end over HTTPS:

- cold start per runtime: from no process to the first byte of the answer (TLS already set up), one
  fresh idle site per sample so every sample starts a process;
- the worker's RSS with N idle dynamic sites, and its child processes then: none (an idle site holds
  no process).

``--via worker`` measures the worker alone (its data port over mTLS, as a front end calls it).
Writes its table into docs/benchmarks.md between its own markers, keeping the other sections.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import http.client
import json
import os
import platform
import shutil
import socket
import statistics
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench._doc import DOC, write_section
from bench._up import UpCloud, wait_until
from roles.fileserver.config import FileserverConfig
from roles.worker.config import WorkerConfig
from tests.support import CloudPKI, RoleProcess

HELLO: dict[str, dict[str, bytes]] = {
    "python (WSGI)": {
        "app.py": b"def app(environ, start_response):\n"
        b"    start_response('200 OK', [('Content-Type', 'text/plain')])\n"
        b"    return [b'hello']\n"
    },
    "python (ASGI)": {
        "asgi.py": b"async def app(scope, receive, send):\n"
        b"    await send({'type': 'http.response.start', 'status': 200, 'headers': []})\n"
        b"    await send({'type': 'http.response.body', 'body': b'hello'})\n"
    },
    "php": {"index.php": b"<?php echo 'hello';"},
    "command (Procfile)": {
        "Procfile": b"web: python3 -S serve.py\n",
        "serve.py": b"import os, socket\n"
        b"s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)\n"
        b"s.bind(('127.0.0.1', int(os.environ['PORT']))); s.listen(64)\n"
        b"while True:\n"
        b"    c, _ = s.accept(); c.recv(65536)\n"
        b"    c.sendall(b'HTTP/1.1 200 OK\\r\\nContent-Length: 5\\r\\nConnection: close\\r\\n\\r\\nhello'); c.close()\n",
    },
}


class Bench:
    def __init__(self, root: Path) -> None:
        self.pki = CloudPKI(root / "pki")
        fs_config = self.pki.role_config(FileserverConfig, "fileserver", root / "fileserver")
        self.config = self.pki.role_config(
            WorkerConfig, "worker", root / "worker", max_active_apps=10_000, app_start_timeout=10.0
        )
        self.fileserver = RoleProcess(fs_config, self.pki).start()
        self.worker = RoleProcess(self.config, self.pki).start()
        self.sites: dict[str, str] = {}
        self.version = 0
        host, port = "localhost", self.fileserver.config.control_port
        self._fs = http.client.HTTPSConnection(host, port, context=self.pki.client_ssl("publisher"))

    def stop(self) -> None:
        self._fs.close()
        self.worker.stop(timeout=30)
        self.fileserver.stop()

    def add_sites(self, names: list[str]) -> None:
        for name in names:
            self.sites[name] = hashlib.sha256(name.encode()).hexdigest()[:16]
        self.version += 1
        sites = self.sites
        self.fileserver.push_config(
            {
                "version": self.version,
                "sites": {s: {"uid": u, "quota_bytes": 1 << 24} for s, u in sites.items()},
            }
        )
        self.worker.push_config(
            {
                "version": self.version,
                "fileserver": self.fileserver.control_url,
                "sites": {s: {"uid": u} for s, u in sites.items()},
            }
        )

    def _fs_call(self, method: str, path: str, body: bytes, kind: str) -> Any:
        self._fs.request(method, path, body=body, headers={"Content-Type": kind})
        resp = self._fs.getresponse()
        data = resp.read()
        assert resp.status == 200, data
        return json.loads(data)

    def publish(self, site: str, files: dict[str, bytes]) -> None:
        ops = []
        for path, data in files.items():
            blob = self._fs_call("POST", f"/v1/sites/{site}/blobs", data, "application/octet-stream")
            ops.append({"op": "put", "path": path, "sha256": blob["sha256"]})
        self._fs_call(
            "POST", f"/v1/sites/{site}/commit", json.dumps({"ops": ops}).encode(), "application/json"
        )

    def first_byte(self, site: str) -> float:
        """Seconds from sending the request (TLS already up) to the first byte of the answer."""
        raw = socket.create_connection(("localhost", self.config.data_port))
        with self.pki.client_ssl("frontend").wrap_socket(raw, server_hostname="localhost") as tls:
            tls.settimeout(30)
            request = f"GET / HTTP/1.1\r\nHost: x\r\nX-Sitecloud-Site: {site}\r\nConnection: close\r\n\r\n"
            t0 = time.perf_counter()
            tls.sendall(request.encode())
            first = tls.recv(1)
            elapsed = time.perf_counter() - t0
            rest = b""
            while chunk := tls.recv(65536):
                rest += chunk
        answer = first + rest
        if not answer.startswith(b"HTTP/1.1 200") or b"hello" not in answer:
            raise AssertionError(f"{site} answered {answer[:300]!r}")
        return elapsed

    def rss_kib(self) -> int:
        assert self.worker.proc is not None
        for line in Path(f"/proc/{self.worker.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
        return 0

    def health(self) -> dict[str, Any]:
        return self.worker.health()


def pct(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(p / 100 * (len(ordered) - 1)))]


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def children(pid: int) -> list[int]:
    """Processes whose parent is ``pid`` (a worker's app processes are its children)."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError, IndexError, ValueError):
            if int(stat.read_text().rsplit(")", 1)[1].split()[1]) == pid:
                found.append(int(stat.parent.name))
    return found


@dataclass
class Figures:
    results: dict[str, list[float]] = field(default_factory=dict)
    rss_empty: int = 0
    rss_idle: int = 0
    idle: int = 0
    idle_processes: int = 0
    samples: int = 0


# What users publish per runtime through `sitecloud up`; every site also gets READY, a static file
# the worker serves itself, so the bench knows the site is live without waking its app.
UP_RUNTIMES = ("python (WSGI)", "php", "command (Procfile)")
READY = "ready.txt"


def _live_sites(cloud: UpCloud, subscription: int, names: list[str], files: dict[str, bytes]) -> None:
    """Create and web-deploy each site, then wait until the front end serves each one's READY."""
    for name in names:
        cloud.web_deploy(cloud.create_site(name, subscription), {**files, READY: b"ready"})
    for name in names:
        wait_until(
            lambda name=name: cloud.get(name, "/" + READY)[:2] == (200, b"ready"),
            timeout=120,
            interval=0.05,
            what=f"{name} to be live through the front end",
        )


def run_up(root: Path, samples: int, idle_sites: int) -> Figures:
    cloud = UpCloud(root / "home")
    figures = Figures(idle=idle_sites, samples=samples)
    cloud.start()
    try:
        runtimes = [r for r in UP_RUNTIMES if r != "php" or shutil.which("php-cgi")]
        if len(runtimes) < len(UP_RUNTIMES):
            print("php: skipped (no php-cgi)")
        total = idle_sites + len(runtimes) * (samples + 1)
        cloud.cli("plan", "create", "bench", "--max-sites", str(total), "--storage-mb", "1024")
        cloud.cli("tenant", "create", "bench")
        subscription = int(cloud.cli("subscription", "create", "--tenant", "bench", "--plan", "bench")["id"])
        worker = cloud.role_pid("worker")
        figures.rss_empty = rss_kib(worker)

        t0 = time.monotonic()
        _live_sites(cloud, subscription, [f"idle{n}" for n in range(idle_sites)], HELLO["python (WSGI)"])
        print(f"{idle_sites} idle dynamic sites live in {time.monotonic() - t0:.1f} s")
        time.sleep(2)
        figures.rss_idle = rss_kib(worker)
        figures.idle_processes = len(children(worker))
        print(
            f"worker RSS: {figures.rss_empty} KiB empty, {figures.rss_idle} KiB with {idle_sites} idle "
            f"dynamic sites; worker child processes: {figures.idle_processes}"
        )

        for runtime in runtimes:
            slug = "".join(c for c in runtime if c.isalnum())[:10].lower()
            names = [f"cs-{slug}-{n}" for n in range(samples + 1)]
            _live_sites(cloud, subscription, names, HELLO[runtime])
            values = []
            # The first start reads the app server's code from disk: not a sample.
            for n, name in enumerate(names):
                status, body, elapsed = cloud.get(name)
                if status != 200 or b"hello" not in body:
                    logs = "\n".join(cloud.cli("site", "logs", name)["lines"][-20:])
                    raise RuntimeError(f"{name} answered {status} {body[:100]!r}; its log:\n{logs}")
                if n:
                    values.append(elapsed * 1000)
            figures.results[runtime] = values
            print(
                f"{runtime}: p50 {statistics.median(values):.1f} ms, p99 {pct(values, 99):.1f} ms, "
                f"max {max(values):.1f} ms ({len(values)} cold starts through the front end)"
            )
    finally:
        cloud.stop()
    return figures


def run_worker(root: Path, samples: int, idle_sites: int) -> Figures:
    bench = Bench(root)
    figures = Figures(idle=idle_sites, samples=samples)
    try:
        figures.rss_empty = bench.rss_kib()
        idle = [f"idle{n}" for n in range(idle_sites)]
        bench.add_sites(idle)
        t0 = time.monotonic()
        for name in idle:
            bench.publish(name, HELLO["python (WSGI)"])
        wait_until(
            lambda: bench.health()["apps_dynamic"] >= len(idle), timeout=600, interval=0.5, what="idle sites"
        )
        print(f"published {len(idle)} dynamic sites in {time.monotonic() - t0:.1f} s")
        time.sleep(2)
        figures.rss_idle = bench.rss_kib()
        assert bench.worker.proc is not None
        figures.idle_processes = len(children(bench.worker.proc.pid))
        print(
            f"worker RSS: {figures.rss_empty} KiB empty, {figures.rss_idle} KiB with {len(idle)} idle "
            f"dynamic sites; worker child processes: {figures.idle_processes}"
        )
        expected = len(idle)
        for runtime, files in HELLO.items():
            if runtime == "php" and shutil.which("php-cgi") is None:
                print("php: skipped (no php-cgi)")
                continue
            slug = "".join(c for c in runtime if c.isalnum())[:10]
            names = [f"cs-{slug}-{n}".lower() for n in range(samples + 1)]
            bench.add_sites(names)
            for name in names:
                bench.publish(name, files)
            expected += len(names)
            wait_until(
                lambda expected=expected: bench.health()["apps_dynamic"] >= expected,
                timeout=120,
                interval=0.2,
                what=f"{runtime} sites",
            )
            bench.first_byte(names[0])  # the first start reads the server's code from disk
            values = [bench.first_byte(name) * 1000 for name in names[1:]]
            figures.results[runtime] = values
            print(
                f"{runtime}: p50 {statistics.median(values):.1f} ms, p99 {pct(values, 99):.1f} ms "
                f"({len(values)} cold starts)"
            )
    finally:
        bench.stop()
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument(
        "--via",
        choices=("up", "worker"),
        default="up",
        help="up: the whole cloud by `sitecloud up`, through the front end (default); worker: the worker alone",
    )
    parser.add_argument("--samples", type=int, default=40, help="cold starts per runtime")
    parser.add_argument("--idle-sites", type=int, default=1000, help="idle dynamic sites for the RSS figure")
    parser.add_argument("--no-doc", action="store_true", help="do not write docs/benchmarks.md")
    parser.add_argument("--keep", action="store_true", help="keep the work directory (role logs) afterwards")
    args = parser.parse_args()
    # Site uids must reach their files: not under a 0700 directory. Not under /tmp either: test
    # sessions on the same host clean up worker directories of homes there.
    root = Path(tempfile.mkdtemp(prefix="sc-coldstart-", dir="/var/tmp"))
    os.chmod(root, 0o711)
    try:
        run = run_up if args.via == "up" else run_worker
        figures = run(root, args.samples, args.idle_sites)
    finally:
        if args.keep:
            print(f"kept {root}")
        else:
            shutil.rmtree(root, ignore_errors=True)
    if not args.no_doc:
        write_doc(figures, args.via)


def write_doc(figures: Figures, via: str) -> None:
    where = (
        "Started by `sitecloud up` with its defaults, sites made through the API and published by web "
        "deploy; through the front end over HTTPS (TLS set up before the clock starts)"
        if via == "up"
        else "Through the worker's data port (mTLS, as a front end)"
    )
    lines = [
        "## Dynamic sites: cold start and idle density (`python -m bench.coldstart`)",
        "",
        f"Machine: {platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}, "
        f"{time.strftime('%Y-%m-%d')}. {where}, from no process to the first byte of the answer; each "
        f"sample is a fresh idle site ({figures.samples} per runtime). "
        "Target: Python p50 ≤ 100 ms, p99 ≤ 250 ms.",
        "",
        "| runtime | p50 ms | p99 ms | max ms |",
        "| --- | ---: | ---: | ---: |",
    ]
    for runtime, values in figures.results.items():
        lines.append(
            f"| {runtime} | {statistics.median(values):.1f} | {pct(values, 99):.1f} | {max(values):.1f} |"
        )
    per_site = (figures.rss_idle - figures.rss_empty) / max(figures.idle, 1)
    lines += [
        "",
        f"Worker RSS: {figures.rss_empty / 1024:.1f} MiB with no sites, {figures.rss_idle / 1024:.1f} MiB "
        f"with {figures.idle} idle dynamic sites ({per_site:.1f} KiB per idle site); app processes then: "
        f"{figures.idle_processes}.",
    ]
    write_section("coldstart", "\n".join(lines))
    print(f"wrote {DOC}")


if __name__ == "__main__":
    main()
