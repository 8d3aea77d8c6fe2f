"""`python -m bench.publish`: publish → served through the front end, in a 20,000-file site.

Targets: a zip deploy of 20,000 files is served within 10 s, and one
changed file in that site is served through the front end with p99 <= 250 ms after its FTP upload got
its 226. Real role processes: fileserver, publisher, worker, frontend; the clients are ftplib, and a
keep-alive HTTPS connection to the front end that asks until it gets the new bytes.
"""

from __future__ import annotations

import argparse
import base64
import ftplib
import http.client
import io
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path

from bench._cpu import CpuMeter
from bench._doc import write_section
from bench._stack import SITE, SitecloudStack
from bench.harness.clients import SiteConnection
from bench.harness.processes import CloudPKI, RoleProcess
from roles.publisher.config import PublisherConfig
from shared.credentials import hash_password
from shared.net import free_port_range

__all__ = ["main"]

DOMAIN = "sites.localhost"
PASSWORD = "publish-bench-secret"
FILES = 20_000


def _zip(count: int) -> tuple[bytes, str, bytes]:
    rnd = random.Random(3)
    out = io.BytesIO()
    last = ("", b"")
    with zipfile.ZipFile(out, "w", zipfile.ZIP_STORED) as zf:
        for i in range(count):
            path, data = f"d{i % 200:03d}/f{i:05d}.html", rnd.randbytes(rnd.randint(200, 1200))
            zf.writestr(path, data)
            last = (path, data)
    return out.getvalue(), *last


def _spy(into: Path | None, roles: dict[str, RoleProcess]) -> list[subprocess.Popen[bytes]]:
    """py-spy recorders (folded stacks, for flamegraph.pl or speedscope), one per role process (and its children), when asked for and installed."""
    spy = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
    if into is None:
        return []
    if not Path(spy).exists():
        raise SystemExit("--profile needs py-spy (pip install py-spy)")
    into.mkdir(parents=True, exist_ok=True)
    spies = []
    for name, role in roles.items():
        assert role.proc is not None
        cmd = [spy, "record", "--subprocesses", "--nonblocking", "--rate", "200", "--format", "raw", "-o"]
        cmd += [str(into / f"{name}.folded"), "--pid", str(role.proc.pid)]
        spies.append(subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
    time.sleep(1.0)  # attached before the clock starts
    return spies


def _stop_spies(spies: list[subprocess.Popen[bytes]]) -> None:
    for spy in spies:
        spy.send_signal(2)  # py-spy writes its graph on SIGINT
    for spy in spies:
        spy.wait(timeout=60)


class _Reader:
    """One keep-alive HTTPS connection to the front end, as a visitor's browser holds it."""

    def __init__(self, port: int, ca_file: Path) -> None:
        self._port, self._ca = port, ca_file
        self._conn = SiteConnection(port, f"{SITE}.{DOMAIN}", ca_file)

    def get(self, path: str) -> bytes:
        try:
            self._conn.request("GET", path, headers={"Host": f"{SITE}.{DOMAIN}"})
            return self._conn.getresponse().read()
        except (OSError, http.client.HTTPException):
            self._conn.close()
            self._conn = SiteConnection(self._port, f"{SITE}.{DOMAIN}", self._ca)
            return b""

    def wait_for(self, path: str, data: bytes, timeout: float = 60.0) -> float:
        """Ask until ``path`` answers ``data``; returns when it did (perf_counter)."""
        deadline = time.perf_counter() + timeout
        while time.perf_counter() < deadline:
            if self.get(path) == data:
                return time.perf_counter()
            time.sleep(0.002)
        raise RuntimeError(f"{path} was not served within {timeout} s")


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.publish")
    parser.add_argument("--changes", type=int, default=100)
    parser.add_argument("--no-write", action="store_true")
    parser.add_argument(
        "--profile",
        type=Path,
        help="record py-spy flame graphs of the role processes during the zip deploy into this directory",
    )
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="sitecloud-publish-") as tmp:
        work = Path(tmp)
        # Open to apps, so the worker keeps its content in its home, not under /var/lib/sitecloud.
        os.chmod(work, 0o755)
        pki = CloudPKI(work / "pki")
        stack = SitecloudStack(work / "stack", DOMAIN, pki)
        low = free_port_range(21)
        publisher = RoleProcess(
            pki.role_config(PublisherConfig, "publisher", work / "publisher", passive_ports=(low, low + 20)),
            pki,
        )
        stack.start({"index.html": b"<h1>bench</h1>"})
        publisher.start()
        publisher.push_config(
            {
                "version": 1,
                "fileserver": stack.fileserver.control_url,
                "sites": {
                    SITE: {"uid": "bench1", "quota_bytes": 1 << 30, "users": {SITE: hash_password(PASSWORD)}}
                },
            }
        )
        config = publisher.config
        assert isinstance(config, PublisherConfig)
        try:
            reader = _Reader(stack.https_port, pki.ca_file)
            body, last_path, last_data = _zip(FILES)
            conn = http.client.HTTPSConnection("localhost", config.deploy_port, context=pki.client_ssl(None))
            token = base64.b64encode(f"{SITE}:{PASSWORD}".encode()).decode()
            spies = _spy(args.profile, {"publisher": publisher, **stack.roles()})
            roles = {"publisher": publisher, **stack.roles()}
            meter = CpuMeter({name: [role.proc.pid] for name, role in roles.items() if role.proc is not None})
            meter.start()
            started = time.perf_counter()
            conn.request(
                "POST",
                f"/api/deploy/{SITE}",
                body=body,
                headers={"Content-Type": "application/zip", "Authorization": f"Basic {token}"},
            )
            resp = conn.getresponse()
            answer = resp.read()
            if resp.status != 200:
                raise RuntimeError(f"deploy answered {resp.status}: {answer[:300]!r}")
            deployed = time.perf_counter() - started
            served = reader.wait_for(f"/{last_path}", last_data) - started
            cpu = meter.stop()
            _stop_spies(spies)
            print(
                f"  zip deploy of {FILES} files: answered {deployed:.2f} s, served {served:.2f} s "
                f"(load {os.getloadavg()[0]:.1f}; CPU s until served: "
                + ", ".join(f"{name} {seconds:.2f}" for name, seconds in cpu.items())
                + ")",
                file=sys.stderr,
            )
            # Where the time went, as the roles log it.
            for line in (publisher.log() + stack.fileserver.log() + stack.worker.log()).splitlines():
                if (
                    "deployed as version" in line
                    or "ops applied in" in line
                    or ("serving version" in line and "fetched in" in line)
                ):
                    print("   ", line.strip()[-160:], file=sys.stderr)

            ftp = ftplib.FTP(timeout=30)
            ftp.connect("127.0.0.1", config.ftp_port)
            ftp.login(SITE, PASSWORD)
            lags: list[float] = []
            for i in range(args.changes):
                data = f"<p>change {i}</p>".encode() + os.urandom(64).hex().encode()
                ftp.storbinary("STOR d007/changing.html", io.BytesIO(data))
                acked = time.perf_counter()
                lags.append(reader.wait_for("/d007/changing.html", data) - acked)
            ftp.quit()
        finally:
            publisher.stop()
            stack.stop()
    lags.sort()
    p50 = statistics.median(lags) * 1000
    p99 = lags[min(len(lags) - 1, int(len(lags) * 0.99))] * 1000
    table = (
        "| case | figure | target |\n|---|---|---|\n"
        f"| zip deploy of {FILES:,} files (0.2-1.2 KB): answered / last file served through the front end "
        f"| {deployed:.1f} s / {served:.1f} s | served <= 10 s |\n"
        f"| one changed file in that site, from its FTP 226 to served through the front end "
        f"({args.changes} changes) | p50 {p50:.0f} ms, p99 {p99:.0f} ms | p99 <= 250 ms |"
    )
    print(table)
    if not args.no_write:
        write_section(
            "publish",
            "## Publish to served in a big site (`python -m bench.publish`)\n\n"
            f"Run on {time.strftime('%Y-%m-%d')} (load average {os.getloadavg()[0]:.1f} at the end on "
            f"{os.cpu_count()} CPUs): fileserver, publisher, worker and front end as their own "
            "processes; the deploy through the publisher's web deploy door, the changes with ftplib, each "
            "one asked for through the front end on a keep-alive HTTPS connection until it answers the new "
            "bytes. A change made file by file reaches the worker as that path alone (no rebuild of the "
            "site's 20,000 files). The fileserver stores a deploy's small files as one pack per batch, and "
            "so does the worker, which serves a static site's small files from its packs through the "
            "version's index (its log line splits the sync into fetch, syncfs and build).\n\n" + table + "\n",
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
