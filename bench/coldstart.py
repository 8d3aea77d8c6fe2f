"""`python -m bench.coldstart`: dynamic sites, cold start and idle density.

As users run it: the cloud started by `sitecloud up` with its defaults,
plan, tenant and subscription made with the CLI, sites made through the REST API, each published by
web deploy, and (by default, ``--via frontend``) every figure taken through the front end over HTTPS:

- cold start per runtime: from no process to the first byte of the answer (TLS already set up), one
  fresh idle site per sample so every sample starts a process;
- the worker's RSS with N idle dynamic sites, and its child processes then: none (an idle site holds
  no process).

``--via worker`` sends the same requests straight to the worker's data port (mTLS with the front
end's certificate), to tell the front end's share from the worker's. ``bench/`` uses no test code.
Writes its table into docs/benchmarks.md between its own markers, keeping the other sections.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import platform
import shutil
import statistics
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from bench._doc import DOC, write_section
from bench._up import UpCloud, wait_until

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
    "node": {
        "package.json": b'{"name": "hello", "scripts": {"start": "node server.js"}}\n',
        "server.js": b"require('http').createServer((req, res) => res.end('hello'))"
        b".listen(process.env.PORT, '127.0.0.1');\n",
    },
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
    # The 1-minute load average while each runtime's samples were taken (the host may be shared).
    load: dict[str, float] = field(default_factory=dict)


# What users publish per runtime through `sitecloud up`; every site also gets READY, a static file
# the worker serves itself (but for a Procfile site's), so the bench knows the site is live without
# waking its app.
RUNTIMES = ("python (WSGI)", "python (ASGI)", "php", "node", "command (Procfile)")
# Under static/: a Python app owns every other path of its site (the worker serves files only there).
READY = "static/ready.txt"
PUBLISHERS = 4
# Before each sample, the cloud's processes quiet (under 5 % of a core) over this many seconds.
REST_WINDOW = 0.3


def _live_sites(cloud: UpCloud, subscription: int, names: list[str], files: dict[str, bytes]) -> None:
    """Create and web-deploy each site (a few at once, as several users would), then wait until the
    front end serves each one's READY."""

    def publish(name: str) -> None:
        cloud.web_deploy(cloud.create_site(name, subscription), {**files, READY: b"ready"})

    with ThreadPoolExecutor(PUBLISHERS) as pool:
        list(pool.map(publish, names))
    for name in names:
        if "Procfile" in files or "package.json" in files:
            # A Procfile or Node app answers every path itself (the worker serves none of its
            # files), so the site is live once its worker knows it as an idle app: asked, not woken.
            wait_until(
                lambda name=name: _idle_command_app(cloud, name),
                timeout=120,
                interval=0.1,
                what=f"{name}'s worker to hold it as an idle app",
            )
            continue
        wait_until(
            lambda name=name: cloud.get(name, "/" + READY)[:2] == (200, b"ready"),
            timeout=120,
            interval=0.05,
            what=f"{name} to be live through the front end",
        )


def _idle_command_app(cloud: UpCloud, name: str) -> bool:
    site = cloud.api.request("GET", cloud.api.path("sites", name))
    apps = site.get("apps", []) if isinstance(site, dict) else []
    return bool(apps) and all(
        a.get("runtime") in ("command", "node") and a.get("state") == "idle" for a in apps
    )


def run(
    root: Path, samples: int, idle_sites: int, *, direct: bool, only: tuple[str, ...] = RUNTIMES
) -> Figures:
    cloud = UpCloud(root / "home")
    figures = Figures(idle=idle_sites, samples=samples)
    cloud.start()
    try:
        missing = {"php": "php-cgi", "node": "node"}
        runtimes = [r for r in only if shutil.which(missing.get(r, "sh"))]
        for runtime in set(only) - set(runtimes):
            print(f"{runtime}: skipped (no {missing[runtime]})")
        most = max(idle_sites, samples + 1)
        cloud.cli("plan", "create", "bench", "--max-sites", str(most), "--storage-mb", "1024")

        def new_subscription(tenant: str) -> int:
            cloud.cli("tenant", "create", tenant)
            return int(cloud.cli("subscription", "create", "--tenant", tenant, "--plan", "bench")["id"])

        subscription = new_subscription("bench")
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
            # Each runtime's sites are another tenant's, as idle sites of many tenants wake on a shared
            # worker: one tenant waking dozens a minute meets its start budget (docs/security.md).
            _live_sites(cloud, new_subscription(f"bench-{slug}"), names, HELLO[runtime])
            waited = cloud.wait_at_rest()
            print(f"{runtime}: the cloud at rest after {waited:.1f} s")
            values = []
            # The first start reads the app server's code from disk: not a sample.
            for n, name in enumerate(names):
                # A visitor wakes an idle site on a cloud at rest, not beside the bench's publishing
                # or the previous sample's start still settling.
                cloud.wait_at_rest(window=REST_WINDOW)
                status, body, elapsed = cloud.get(name, direct=direct)
                if status != 200 or b"hello" not in body:
                    logs = "\n".join(cloud.cli("site", "logs", name)["lines"][-20:])
                    raise RuntimeError(f"{name} answered {status} {body[:100]!r}; its log:\n{logs}")
                if n:
                    values.append(elapsed * 1000)
            figures.results[runtime] = values
            figures.load[runtime] = os.getloadavg()[0]
            print(
                f"{runtime}: p50 {statistics.median(values):.1f} ms, p99 {pct(values, 99):.1f} ms, "
                f"max {max(values):.1f} ms ({len(values)} cold starts, {'worker alone' if direct else 'front end'}; "
                f"load average {figures.load[runtime]:.2f})"
            )
    finally:
        cloud.stop()
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument(
        "--via",
        choices=("frontend", "worker"),
        default="frontend",
        help="front end: visitors' way, over HTTPS (default); worker: straight to the worker's data port",
    )
    parser.add_argument("--samples", type=int, default=40, help="cold starts per runtime")
    parser.add_argument(
        "--runtime",
        action="append",
        choices=RUNTIMES,
        help="measure only this runtime (repeatable; default all); with it, --no-doc is advised",
    )
    parser.add_argument("--idle-sites", type=int, default=1000, help="idle dynamic sites for the RSS figure")
    parser.add_argument("--no-doc", action="store_true", help="do not write docs/benchmarks.md")
    parser.add_argument("--keep", action="store_true", help="keep the work directory (role logs) afterwards")
    args = parser.parse_args()
    # Site uids must reach their files: not under a 0700 directory. Not under /tmp either: test
    # sessions on the same host clean up worker directories of homes there.
    root = Path(tempfile.mkdtemp(prefix="sc-coldstart-", dir="/var/tmp"))
    os.chmod(root, 0o711)
    try:
        only = tuple(args.runtime) if args.runtime else RUNTIMES
        figures = run(root, args.samples, args.idle_sites, direct=args.via == "worker", only=only)
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
        if via == "frontend"
        else "Started by `sitecloud up`, requests straight to the worker's data port (mTLS, as the front end)"
    )
    lines = [
        "## Dynamic sites: cold start and idle density (`python -m bench.coldstart`)",
        "",
        f"Machine: {platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}, "
        f"{time.strftime('%Y-%m-%d')}. {where}, from no process to the first byte of the answer; each "
        f"sample is a fresh idle site ({figures.samples} per runtime). "
        "Target: Python p50 ≤ 100 ms, p99 ≤ 250 ms. A root worker's start includes the tenant wall: "
        "the app's bubblewrap sandbox (network, mount and PID namespaces), its cgroup and its disk-quota "
        "volume. Each sample is taken on a cloud at rest, as a visitor finds an idle site: after `up`'s "
        "background wheelhouse build, once the runtime's sites are published and the cloud's processes "
        f"(roles and apps) have used under 5 % of a core for a second, and again for {REST_WINDOW:g} s "
        "before each sample. The load average is the host's while that runtime's samples were taken "
        "(other jobs on the host included).",
        "",
        "| runtime | p50 ms | p99 ms | max ms | load average |",
        "| --- | ---: | ---: | ---: | ---: |",
    ]
    for runtime, values in figures.results.items():
        lines.append(
            f"| {runtime} | {statistics.median(values):.1f} | {pct(values, 99):.1f} | {max(values):.1f} "
            f"| {figures.load.get(runtime, 0):.2f} |"
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
