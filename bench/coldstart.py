"""`python -m bench.coldstart`: dynamic sites on one worker (issue 5).

- cold start per runtime: from no process to the first byte of the answer, through the worker's data
  port (mTLS, as a front end), one fresh site per sample so every sample starts a process;
- the worker's RSS with N idle dynamic sites (published, detected, no process).

Writes its table into docs/benchmarks.md between its own markers, keeping the other sections.
"""

from __future__ import annotations

import argparse
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
from pathlib import Path
from typing import Any

from bench._doc import DOC, write_section
from roles.fileserver.config import FileserverConfig
from roles.worker.config import WorkerConfig
from tests.support import CloudPKI, RoleProcess, wait_until

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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--samples", type=int, default=40, help="cold starts per runtime")
    parser.add_argument("--idle-sites", type=int, default=1000, help="idle dynamic sites for the RSS figure")
    parser.add_argument("--no-doc", action="store_true", help="do not write docs/benchmarks.md")
    args = parser.parse_args()
    # Site uids must reach their files: not under a 0700 directory.
    root = Path(tempfile.mkdtemp(prefix="sc-coldstart-"))
    os.chmod(root, 0o711)
    bench = Bench(root)
    try:
        rss_empty = bench.rss_kib()
        idle = [f"idle{n}" for n in range(args.idle_sites)]
        bench.add_sites(idle)
        t0 = time.monotonic()
        for name in idle:
            bench.publish(name, HELLO["python (WSGI)"])
        wait_until(
            lambda: bench.health()["apps_dynamic"] >= len(idle), timeout=600, interval=0.5, what="idle sites"
        )
        print(f"published {len(idle)} dynamic sites in {time.monotonic() - t0:.1f} s")
        time.sleep(2)
        rss_idle = bench.rss_kib()
        print(f"worker RSS: {rss_empty} KiB empty, {rss_idle} KiB with {len(idle)} idle dynamic sites")

        results: dict[str, list[float]] = {}
        expected = len(idle)
        for runtime, files in HELLO.items():
            if runtime == "php" and shutil.which("php-cgi") is None:
                print("php: skipped (no php-cgi)")
                continue
            slug = "".join(c for c in runtime if c.isalnum())[:10]
            names = [f"cs-{slug}-{n}".lower() for n in range(args.samples)]
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
            samples = [bench.first_byte(name) * 1000 for name in names[1:]]
            results[runtime] = samples
            print(
                f"{runtime}: p50 {statistics.median(samples):.1f} ms, p99 {pct(samples, 99):.1f} ms "
                f"({len(samples)} cold starts)"
            )
    finally:
        bench.stop()
        shutil.rmtree(root, ignore_errors=True)
    if not args.no_doc:
        write_doc(results, rss_empty, rss_idle, len(idle), args.samples - 1)


def write_doc(
    results: dict[str, list[float]], rss_empty: int, rss_idle: int, idle: int, samples: int
) -> None:
    lines = [
        "## Dynamic sites: cold start and idle density (`python -m bench.coldstart`)",
        "",
        f"Machine: {platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}, "
        f"{time.strftime('%Y-%m-%d')}. Through the worker's data port (mTLS, as a front end), from no "
        f"process to the first byte of the answer; each sample is a fresh site ({samples} per runtime). "
        "Target (issue 5): Python p50 ≤ 100 ms, p99 ≤ 250 ms.",
        "",
        "| runtime | p50 ms | p99 ms | max ms |",
        "| --- | ---: | ---: | ---: |",
    ]
    for runtime, values in results.items():
        lines.append(
            f"| {runtime} | {statistics.median(values):.1f} | {pct(values, 99):.1f} | {max(values):.1f} |"
        )
    lines += [
        "",
        f"Worker RSS: {rss_empty / 1024:.1f} MiB with no sites, {rss_idle / 1024:.1f} MiB with {idle} idle "
        f"dynamic sites (no process each): {(rss_idle - rss_empty) / max(idle, 1):.1f} KiB per idle site.",
    ]
    write_section("coldstart", "\n".join(lines))
    print(f"wrote {DOC}")


if __name__ == "__main__":
    main()
