"""`python -m bench.density`: one worker holding 10,000 sites.

- the worker's RSS with no sites, with a 10,000-site snapshot applied, with all 10,000 static sites
  synced and served, and with 1,000 of them turned into idle dynamic (python) sites;
- how long the worker takes to apply the 10,000-site snapshot (the PUT /v1/config answer), and a
  push of the same snapshot with one site more;
- publishing to one site touches only that site: publish → served latency on the data port, and how
  many sites' directories changed on disk (and "serving version" log lines) for one publish.

Writes its section into docs/benchmarks.md between its own markers, keeping the other sections.
"""

from __future__ import annotations

import argparse
import hashlib
import http.client
import json
import os
import platform
import random
import shutil
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from bench._doc import DOC, write_section
from bench.coldstart import HELLO, pct
from bench.harness.clients import fetch_from_worker
from bench.harness.processes import CloudPKI, RoleProcess, wait_until
from roles.fileserver.config import FileserverConfig
from roles.worker.config import WorkerConfig

STYLE = b"body { font-family: sans-serif; margin: 2em }\n" * 20


def page(site: str, n: int) -> bytes:
    return f"<!doctype html><title>{site}</title><h1>{site}</h1><p>version {n}</p>".encode()


class Bench:
    """One worker and a file server as their own processes, fed snapshots and content directly: what a
    worker holds per site, measured without the rest of the cloud around it."""

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

    def rss_kib(self) -> int:
        assert self.worker.proc is not None
        for line in Path(f"/proc/{self.worker.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
        return 0

    def health(self) -> dict[str, Any]:
        return self.worker.health()


class Density(Bench):
    def push_worker(self) -> float:
        """Push the current site list to the fileserver, then time the worker's apply of it."""
        self.version += 1
        self.fileserver.push_config(
            {
                "version": self.version,
                "sites": {s: {"uid": u, "quota_bytes": 1 << 24} for s, u in self.sites.items()},
            }
        )
        snapshot = {
            "version": self.version,
            "fileserver": self.fileserver.control_url,
            "sites": {s: {"uid": u} for s, u in self.sites.items()},
        }
        t0 = time.perf_counter()
        self.worker.push_config(snapshot)
        return time.perf_counter() - t0

    def name_sites(self, names: list[str]) -> None:
        for name in names:
            self.sites[name] = f"u{name}"

    def site_dirs(self, root: Path) -> dict[str, str]:
        """Per site: the version ``current`` points at (a flip changes it)."""
        out: dict[str, str] = {}
        for entry in os.scandir(root / "sites"):
            try:
                out[entry.name] = os.readlink(Path(entry.path, "current"))
            except OSError:
                out[entry.name] = ""
        return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--sites", type=int, default=10_000, help="static sites on the worker")
    parser.add_argument("--dynamic", type=int, default=1000, help="of which turned into idle dynamic sites")
    parser.add_argument("--publishes", type=int, default=20, help="single-site publishes timed")
    parser.add_argument("--no-doc", action="store_true", help="do not write docs/benchmarks.md")
    args = parser.parse_args()
    # Site uids must reach their files: not under a 0700 directory.
    root = Path(tempfile.mkdtemp(prefix="sc-density-"))
    os.chmod(root, 0o711)
    bench = Density(root)
    fig: dict[str, Any] = {"sites": args.sites, "dynamic": args.dynamic}
    try:
        fig["rss_empty"] = bench.rss_kib()
        names = [f"s{n:05d}" for n in range(args.sites)]
        bench.name_sites(names)
        fig["apply_full"] = bench.push_worker()
        time.sleep(1)
        fig["rss_snapshot"] = bench.rss_kib()
        print(f"applied a {len(names)}-site snapshot in {fig['apply_full'] * 1000:.0f} ms")

        t0 = time.monotonic()
        for name in names:
            bench.publish(name, {"index.html": page(name, 1), "style.css": STYLE})
        published = time.monotonic() - t0
        wait_until(
            lambda: bench.health()["sites_synced"] >= len(names), timeout=1800, interval=0.5, what="sync"
        )
        fig["publish_all"], fig["synced_all"] = published, time.monotonic() - t0
        print(
            f"published {len(names)} static sites in {published:.0f} s, all synced after {fig['synced_all']:.0f} s"
        )
        for name in random.sample(names, 20):
            status, _, body = fetch_from_worker(bench.pki, bench.config, name, "/")
            assert status == 200 and body == page(name, 1), (name, status, body[:200])
        time.sleep(2)
        fig["rss_static"] = bench.rss_kib()
        print(f"worker RSS with {len(names)} static sites: {fig['rss_static']} KiB")

        # A push of the same snapshot with one site more: only that site is new work.
        bench.name_sites(["extra"])
        fig["apply_plus_one"] = bench.push_worker()
        print(f"applied {len(bench.sites)} sites (one new) in {fig['apply_plus_one'] * 1000:.0f} ms")

        content = Path(bench.health()["apps_dir"])
        latencies: list[float] = []
        touched: list[int] = []
        flips: list[int] = []
        for n, name in enumerate(random.sample(names, args.publishes)):
            before = bench.site_dirs(content)
            log_before = bench.worker.log().count("serving version")
            body = page(name, 2 + n)
            t0 = time.perf_counter()
            bench.publish(name, {"index.html": body})
            wait_until(lambda name=name, body=body: fetch_from_worker(bench.pki, bench.config, name, "/")[2] == body,
                       timeout=20, interval=0.002, what=f"{name} to serve its new version")  # fmt: skip
            latencies.append((time.perf_counter() - t0) * 1000)
            after = bench.site_dirs(content)
            touched.append(sum(1 for s in after if after[s] != before.get(s)))
            flips.append(bench.worker.log().count("serving version") - log_before)
        fig["publish_ms"] = latencies
        fig["touched"], fig["flips"] = max(touched), max(flips)
        print(
            f"one-site publish → served: p50 {statistics.median(latencies):.0f} ms, max {max(latencies):.0f} ms; "
            f"site dirs changed per publish: {sorted(set(touched))}; serving-version lines: {sorted(set(flips))}"
        )

        dynamic = names[: args.dynamic]
        base = bench.health()["apps_dynamic"]
        for name in dynamic:
            bench.publish(name, HELLO["python (WSGI)"])
        wait_until(
            lambda: bench.health()["apps_dynamic"] >= base + len(dynamic), timeout=600, interval=0.5,
            what="dynamic sites",
        )  # fmt: skip
        time.sleep(2)
        fig["rss_mixed"] = bench.rss_kib()
        health = bench.health()
        fig["apps_active"] = health["apps_active"]
        print(
            f"worker RSS with {len(names) - len(dynamic)} static + {len(dynamic)} idle dynamic sites: "
            f"{fig['rss_mixed']} KiB, {health['apps_active']} app processes"
        )
    finally:
        bench.stop()
        shutil.rmtree(root, ignore_errors=True)
    if not args.no_doc:
        write_doc(fig)


def write_doc(fig: dict[str, Any]) -> None:
    sites, dynamic = fig["sites"], fig["dynamic"]
    empty = fig["rss_empty"]

    def mib(kib: int) -> str:
        return f"{kib / 1024:.1f}"

    def per_site(kib: int, count: int) -> str:
        return f"{(kib - empty) / max(count, 1):.1f}"

    lat = fig["publish_ms"]
    lines = [
        f"## Density: {sites:,} sites on one worker (`python -m bench.density`)",
        "",
        f"Machine: {platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}, "
        f"{time.strftime('%Y-%m-%d')}. One worker process (`processes: 1`) and a fileserver; every site "
        "has its own `index.html` and a shared `style.css` (one blob, hard-linked into every version). "
        f"Target: {sites:,} sites per worker, an idle dynamic site holds no process. The "
        "1,000-idle-dynamic-sites figure of the cold-start section is beside these (there on an otherwise "
        "empty worker).",
        "",
        "| worker state | RSS MiB | KiB per site over empty |",
        "| --- | ---: | ---: |",
        f"| no sites | {mib(empty)} | — |",
        f"| {sites:,}-site snapshot applied, no content yet | {mib(fig['rss_snapshot'])} | "
        f"{per_site(fig['rss_snapshot'], sites)} |",
        f"| {sites:,} static sites synced and served | {mib(fig['rss_static'])} | "
        f"{per_site(fig['rss_static'], sites)} |",
        f"| {sites - dynamic:,} static + {dynamic:,} idle dynamic (python) sites, "
        f"{fig['apps_active']} app processes | {mib(fig['rss_mixed'])} | {per_site(fig['rss_mixed'], sites)} |",
        "",
        "| what | figure |",
        "| --- | --- |",
        f"| apply the {sites:,}-site snapshot (PUT /v1/config answered, TLS handshake included) | "
        f"{fig['apply_full'] * 1000:.0f} ms |",
        f"| apply it again with one site more | {fig['apply_plus_one'] * 1000:.0f} ms |",
        f"| publish {sites:,} sites one after another (fileserver writes) → all synced on the worker | "
        f"{fig['publish_all']:.0f} s → {fig['synced_all']:.0f} s |",
        f"| publish to one site → its new page served by the worker ({len(lat)} publishes) | "
        f"p50 {statistics.median(lat):.0f} ms, p99 {pct(lat, 99):.0f} ms |",
        f"| sites whose `current` version moved on one publish (of {sites:,}) | {fig['touched']} |",
        f'| worker "serving version" log lines for one publish | {fig["flips"]} |',
        "",
        f"Turning {dynamic:,} of the static sites into python sites added "
        f"{(fig['rss_mixed'] - fig['rss_static']) / max(dynamic, 1):.1f} KiB each (its app record, the "
        "newer version synced, no process). "
        "Publishing touches only that site: the fileserver's change feed names the one site, the worker "
        "fetches its manifest and new blobs, builds one version directory and flips one `current` link; "
        "no other site's directory, table entry or hot cache changes.",
    ]
    write_section("density", "\n".join(lines))
    print(f"wrote {DOC}")


if __name__ == "__main__":
    main()
