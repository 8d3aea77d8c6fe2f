"""`python -m bench.ftp`: FTP publishing throughput against vsftpd on the same files.

Target (../shared/BRIEF.md): upload and download throughput at least 0.8x vsftpd's. The same clients
drive sitecloud as users run it (`sitecloud up` with its defaults, the sites made with the CLI and
published to with the FTP and deploy credentials it gives) and vsftpd (Debian, anonymous upload into a
directory of its own), alternately, in the same run: ftplib for one 200 MB file up and
down and 300 x 8 KB files up and down; lftp for ``mirror -R`` of a 2,000-file site in 40 folders
(0.5-8 KB files), one transfer at a time and four at a time. Then sitecloud alone: the per-file upload
cost in a 20,000-file site against a 200-file one (the journal and per-folder trees keep it flat), and a
zip deploy of 20,000 files.
"""

from __future__ import annotations

import argparse
import base64
import ftplib
import http.client
import io
import os
import pwd
import random
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import zipfile
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from bench._doc import write_section
from bench._up import UpCloud, wait_until
from shared.net import free_port

__all__ = ["main"]

SITE = "ftpbench"
BIG = os.urandom(200 * 1024 * 1024)
SMALL = [os.urandom(8 * 1024) for _ in range(300)]
MIRROR_FILES, MIRROR_FOLDERS = 2000, 40
# Sites of the scale figures: a small one and a big one, filled by a zip deploy.
SCALE_SMALL, SCALE_BIG, SCALE_PUTS = 200, 20_000, 200

_VSFTPD = """listen=YES
listen_address=127.0.0.1
listen_port={port}
background=NO
anonymous_enable=YES
no_anon_password=YES
anon_root={root}
anon_upload_enable=YES
anon_mkdir_write_enable=YES
anon_other_write_enable=YES
anon_umask=022
write_enable=YES
local_enable=NO
pasv_enable=YES
pasv_address=127.0.0.1
pasv_min_port={pasv}
pasv_max_port={pasv_end}
seccomp_sandbox=NO
xferlog_enable=NO
secure_chroot_dir=/var/run/vsftpd/empty
"""


class _Vsftpd:
    def __init__(self, workdir: Path) -> None:
        self.dir = workdir
        self.port = free_port()
        self.root = workdir / "root"
        self.upload_dir = "up"
        self._proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self.dir.mkdir(parents=True)
        self.root.mkdir(mode=0o755)
        up = self.root / self.upload_dir
        up.mkdir()
        ftp_user = pwd.getpwnam("ftp")
        os.chown(up, ftp_user.pw_uid, ftp_user.pw_gid)
        pasv = free_port()
        conf = self.dir / "vsftpd.conf"
        conf.write_text(_VSFTPD.format(port=self.port, root=self.root, pasv=pasv, pasv_end=pasv + 50))
        os.chmod(conf, 0o600)
        self._proc = subprocess.Popen(["vsftpd", str(conf)], stderr=subprocess.PIPE)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=1) as probe:
                    if probe.recv(64).startswith(b"220"):
                        return
            except OSError:
                time.sleep(0.1)
        raise RuntimeError("vsftpd did not start")

    def login(self) -> ftplib.FTP:
        ftp = ftplib.FTP(timeout=60)
        ftp.connect("127.0.0.1", self.port)
        ftp.login("anonymous", "")
        ftp.cwd(self.upload_dir)
        return ftp

    def lftp_target(self) -> tuple[str, int, str]:
        return "anonymous,", self.port, f"/{self.upload_dir}"

    def stop(self) -> None:
        if self._proc is not None:
            self._proc.terminate()
            self._proc.wait(10)


class _Sitecloud:
    """The cloud as users run it: `sitecloud up` with its defaults, sites made with the CLI, each
    published to with the FTP and deploy credentials `site create` gives."""

    def __init__(self, workdir: Path) -> None:
        workdir.mkdir(parents=True, exist_ok=True)
        self.cloud = UpCloud(workdir / "home")
        self.sites: dict[str, dict[str, Any]] = {}
        self._subscription = 0

    def start(self) -> None:
        self.cloud.start()
        self.cloud.cli(
            "plan", "create", "ftpbench", "--max-sites", "4", "--storage-mb", "8192",
            "--bandwidth-mb-per-day", "unlimited", "--cpu-minutes-per-day", "unlimited",
        )  # fmt: skip
        self.cloud.cli("tenant", "create", "ftpbench")
        subscription = self.cloud.cli("subscription", "create", "--tenant", "ftpbench", "--plan", "ftpbench")
        self._subscription = int(subscription["id"])
        self.push()
        # A fresh `up` builds its wheelhouse for role hosts in the background: measure after it.
        wait_until(self.cloud.wheelhouse_built, timeout=900, interval=1, what="`up` to build its wheelhouse")

    def push(self, *extra: str) -> None:
        """The bench's sites (``SITE`` and ``extra``), made where missing, able to log in by FTP."""
        for name in (SITE, *extra):
            if name in self.sites:
                continue
            self.sites[name] = self.cloud.cli(
                "site", "create", name, "--subscription", str(self._subscription)
            )
            # Its credentials reach the publisher with the next snapshot.
            wait_until(partial(self._try_login, name), timeout=30, what=f"FTP login to {name}")

    def _try_login(self, site: str) -> bool:
        try:
            self.login(site).quit()
        except ftplib.error_perm:
            return False
        return True

    def login(self, site: str = SITE) -> ftplib.FTP:
        ftp_info = self.sites[site]["ftp"]
        ftp = ftplib.FTP(timeout=60)
        ftp.connect("127.0.0.1", int(ftp_info["port"]))
        ftp.login(ftp_info["user"], ftp_info["password"])
        return ftp

    def lftp_target(self) -> tuple[str, int, str]:
        ftp_info = self.sites[SITE]["ftp"]
        return f"{ftp_info['user']},{ftp_info['password']}", int(ftp_info["port"]), ""

    def deploy(self, site: str, body: bytes) -> None:
        """A zip to the site's web deploy URL with its publishing credentials, answered once stored."""
        deploy = self.sites[site]["deploy"]
        url = urlsplit(deploy["url"])
        conn = http.client.HTTPSConnection("127.0.0.1", url.port, context=self.cloud.tls, timeout=600)
        token = base64.b64encode(f"{deploy['user']}:{deploy['password']}".encode()).decode()
        try:
            conn.request(
                "POST",
                url.path or "/",
                body=body,
                headers={"Content-Type": "application/zip", "Authorization": f"Basic {token}"},
            )
            resp = conn.getresponse()
            answer = resp.read()
            if resp.status != 200:
                raise RuntimeError(f"deploy to {site} answered {resp.status}: {answer[:300]!r}")
        finally:
            conn.close()

    def stop(self) -> None:
        self.cloud.stop()


def _big_up(ftp: ftplib.FTP, n: int) -> float:
    ftp.storbinary(f"STOR big-{n}.bin", io.BytesIO(BIG), blocksize=256 * 1024)
    return len(BIG)


def _big_down(ftp: ftplib.FTP, n: int) -> float:
    got = 0

    def take(data: bytes) -> None:
        nonlocal got
        got += len(data)

    ftp.retrbinary(f"RETR big-{n}.bin", take, blocksize=256 * 1024)
    assert got == len(BIG), got
    return got


def _small_up(ftp: ftplib.FTP, n: int) -> float:
    for i, data in enumerate(SMALL):
        ftp.storbinary(f"STOR s{n}-{i}.html", io.BytesIO(data))
    return len(SMALL)


def _small_down(ftp: ftplib.FTP, n: int) -> float:
    for i, data in enumerate(SMALL):
        out = io.BytesIO()
        ftp.retrbinary(f"RETR s{n}-{i}.html", out.write)
        assert out.getvalue() == data
    return len(SMALL)


def _mirror_source(root: Path) -> Path:
    rnd = random.Random(7)
    for i in range(MIRROR_FILES):
        path = root / f"dir{i % MIRROR_FOLDERS:02d}" / f"page{i:05d}.html"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(rnd.randbytes(rnd.randint(512, 8192)))
    return root


def _lftp_mirror(server: _Vsftpd | _Sitecloud, source: Path, target: str, parallel: int) -> float:
    """``lftp mirror -R`` of ``source`` into ``target``; returns the seconds it took."""
    user, port, base = server.lftp_target()
    script = (
        "set ftp:ssl-allow no; set net:max-retries 1; "
        f"mirror -R --no-perms --parallel={parallel} {source} {base}/{target}; quit"
    )
    started = time.perf_counter()
    subprocess.run(
        ["lftp", "-u", user, "-p", str(port), "-e", script, "127.0.0.1"], check=True, capture_output=True
    )
    return time.perf_counter() - started


def _zip_of(count: int, seed: int) -> bytes:
    rnd = random.Random(seed)
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w", zipfile.ZIP_STORED) as zf:
        for i in range(count):
            zf.writestr(f"d{i % 200:03d}/f{i:05d}.html", rnd.randbytes(rnd.randint(200, 1200)))
    return out.getvalue()


def _scale(sitecloud: _Sitecloud) -> dict[str, float]:
    """Per-file STOR cost in a small and a big site, and the big site's zip deploy."""
    sitecloud.push("small", "big")
    figures: dict[str, float] = {}
    sitecloud.deploy("small", _zip_of(SCALE_SMALL, 1))
    body = _zip_of(SCALE_BIG, 2)
    started = time.perf_counter()
    sitecloud.deploy("big", body)
    figures["deploy"] = time.perf_counter() - started
    for site in ("small", "big"):
        ftp = sitecloud.login(site)
        try:
            ftp.cwd("d007")
            started = time.perf_counter()
            for i in range(SCALE_PUTS):
                ftp.storbinary(f"STOR new{i}.html", io.BytesIO(os.urandom(4096)))
            figures[site] = (time.perf_counter() - started) / SCALE_PUTS
        finally:
            ftp.quit()
    return figures


_WHAT_A_226_COSTS = (
    "What a 226 costs: the publisher spools the upload (in memory up to 1 MB) and sends it to the "
    "fileserver in one request; the fileserver answers once the change's journal record (which carries a "
    "small file's bytes too) is on disk, and folds records into versions that rewrite only the folders on "
    "the changed path, so the cost per file does not grow with the site. A small file gets no file of its "
    "own on the fileserver before its 226: its bytes stay in memory until the next checkpoint writes them, "
    "with the others, as one pack. vsftpd does not fsync at all; here each 226 waits for one fdatasync "
    "(0.1-0.2 ms on this disk when quiet, run on the fileserver's loop; 2 ms median at load 8, then in a "
    "thread) and for the round trip to the fileserver (about 0.45 ms on a quiet box: a small file's put "
    "goes as one binary frame each way on a put lane, a kept mTLS connection, not as an HTTP request; "
    "against 1.0-1.2 ms for vsftpd's whole cycle per file, the client's part included). Uploads that overlap "
    "(``--parallel``, several sessions) share one fsync (group commit), but there each file costs the "
    "publisher and the fileserver about 0.8 and 0.5 ms of CPU on two cores (the publisher's session threads "
    "contend for the GIL), which bounds the rate. A small download is one round trip: fetched by its "
    "path (the newest bytes, no look at the changes first), which the fileserver answers from memory or "
    "its pack. A big download is sent with "
    "sendfile from the publisher's own copy of the file (made while it went up, or the last time it came "
    "down: the publisher keeps up to 2 GiB of them, by sha256), or else as it comes from the fileserver; "
    "a big upload (past 1 MB) goes on to the fileserver as it "
    "arrives, in one chunked PUT whose body ends with the client's data: the fileserver hashes and writes "
    "it while it receives, and answers after one fsync of it and its journal record."
)

# name, unit, the transfer (returns its amount in the unit's base: bytes or files)
CASES: list[tuple[str, str, Callable[[ftplib.FTP, int], float]]] = [
    ("200 MB file up (STOR)", "MB/s", _big_up),
    ("200 MB file down (RETR)", "MB/s", _big_down),
    ("300 x 8 KB files up", "files/s", _small_up),
    ("300 x 8 KB files down", "files/s", _small_down),
]


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.ftp")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--no-write", action="store_true")
    parser.add_argument(
        "--only",
        choices=("mirror", "transfers"),
        help="run only the lftp mirrors or only the ftplib transfers, and write nothing",
    )
    args = parser.parse_args()
    if shutil.which("vsftpd") is None or os.geteuid() != 0:
        print("bench.ftp needs vsftpd and root: apt-get install -y vsftpd", file=sys.stderr)
        return 2
    if shutil.which("lftp") is None:
        print("bench.ftp needs lftp: apt-get install -y lftp", file=sys.stderr)
        return 2
    rates: dict[tuple[str, str], list[float]] = {}
    mirror_names = [f"lftp mirror -R, {MIRROR_FILES:,} files", "the same, --parallel=4"]
    with tempfile.TemporaryDirectory(prefix="sitecloud-ftp-") as tmp:
        work = Path(tmp)
        os.chmod(work, 0o755)
        source = _mirror_source(work / "mirror-src")
        os.chmod(work / "mirror-src", 0o755)
        sitecloud = _Sitecloud(work / "sitecloud")
        vsftpd = _Vsftpd(work / "vsftpd")
        sitecloud.start()
        vsftpd.start()
        try:
            for rnd in range(args.rounds):
                for name, parallel in zip(mirror_names, (1, 4), strict=True):
                    if args.only == "transfers":
                        break
                    for who, server in (("sitecloud", sitecloud), ("vsftpd", vsftpd)):
                        took = _lftp_mirror(server, source, f"m{rnd}-{parallel}", parallel)
                        rates.setdefault((name, who), []).append(MIRROR_FILES / took)
                        print(f"  round {rnd + 1} {name:24s} {who:9s} {took:8.2f} s", file=sys.stderr)
                for name, unit, run in CASES:
                    if args.only == "mirror":
                        break
                    for who, server in (("sitecloud", sitecloud), ("vsftpd", vsftpd)):
                        ftp = server.login()
                        try:
                            started = time.perf_counter()
                            amount = run(ftp, rnd)
                            took = time.perf_counter() - started
                        finally:
                            ftp.quit()
                        rate = amount / took / (1 << 20 if unit == "MB/s" else 1)
                        rates.setdefault((name, who), []).append(rate)
                        print(f"  round {rnd + 1} {name:24s} {who:9s} {rate:8.1f} {unit}", file=sys.stderr)
            if args.only is not None:
                for (name, who), got in sorted(rates.items()):
                    print(f"{name:28s} {who:9s} median {statistics.median(got):8.1f}")
                print(f"load average {os.getloadavg()}")
                return 0
            scale = _scale(sitecloud)
        finally:
            vsftpd.stop()
            sitecloud.stop()

    lines = ["| transfer | sitecloud | vsftpd | ratio (target >= 0.8) |", "|---|---|---|---|"]
    verdicts = []
    cases = [(name, "files/s") for name in mirror_names] + [(name, unit) for name, unit, _ in CASES]
    for name, unit in cases:
        sc = statistics.median(rates[(name, "sitecloud")])
        vs = statistics.median(rates[(name, "vsftpd")])
        lines.append(f"| {name} | {sc:,.1f} {unit} | {vs:,.1f} {unit} | **{sc / vs:.2f}x** |")
        verdicts.append(f"{name} {sc / vs:.2f}x")
    table = "\n".join(lines)
    growth = scale["big"] / scale["small"]
    scale_table = (
        "| sitecloud alone | figure | target |\n|---|---|---|\n"
        f"| STOR of a 4 KB file into a {SCALE_SMALL}-file site | {scale['small'] * 1000:.2f} ms | |\n"
        f"| the same into a {SCALE_BIG:,}-file site | {scale['big'] * 1000:.2f} ms "
        f"(**{growth:.2f}x**) | <= 1.5x |\n"
        f"| zip deploy of {SCALE_BIG:,} files (0.2-1.2 KB) through the publisher, until answered | "
        f"{scale['deploy']:.1f} s | <= 10 s (to served) |"
    )
    print(table)
    print(scale_table)
    print("target (>= 0.8x vsftpd): " + "; ".join(verdicts))
    if not args.no_write:
        write_section(
            "ftp",
            "## FTP publishing against vsftpd (`python -m bench.ftp`)\n\n"
            f"Run on {time.strftime('%Y-%m-%d')} (medians of {args.rounds} rounds; load average "
            f"{os.getloadavg()[0]:.1f} at the end on {os.cpu_count()} CPUs), the same ftplib client "
            "(passive, binary, one connection per transfer set) against sitecloud as `sitecloud up` "
            "starts it, with its defaults (the sites made and their FTP users given by the CLI; its "
            "publisher writes through its fileserver: each finished upload is one committed content "
            "version) and "
            "vsftpd 3.0.3 (anonymous upload to a local directory). Target: at least 0.8x vsftpd.\n\n"
            + table
            + "\n\n"
            + scale_table
            + "\n\n"
            + _WHAT_A_226_COSTS
            + "\n",
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
