"""`make bench`: sitecloud as `sitecloud up` starts it, side by side with nginx proxy → nginx static.

The primary rows run through a cloud started with `sitecloud up` and its defaults (metering,
access logs, controller and management running), the bench site created and published through the
CLI (`sitecloud deploy`), as a user would. nginx serves the same files. wrk drives them alternately
(A B A B ...) in the same run; each row gives req/s, p50 and p99 (medians of the rounds), the ratios
sitecloud / nginx, and the CPU time each side's processes spent per request (read from /proc around
every wrk run), so a reader sees what a request costs and how busy the box was. One extra row keeps
the hand-built stack (front end, worker, file server alone, metering off) for comparison.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from bench._cpu import CpuMeter
from bench._doc import DOC, write_section
from bench._nginx import NginxPair, nginx_available
from bench._stack import SITE, SitecloudStack
from bench._up import UpCloud, wait_until
from bench._workspace import Workspace
from bench._wrk import WrkResult, run_wrk, wrk_available

DOMAIN = "sites.bench"
FILES = {"1k.html": b"x" * 1024, "100k.bin": os.urandom(100 * 1024), "1m.bin": os.urandom(1024 * 1024)}
# CPU groups: sitecloud's data-plane roles, the rest of the cloud `up` runs, nginx's two servers.
SC_GROUPS = ("frontend", "worker")
NG_GROUPS = ("proxy", "static")


@dataclass
class Side:
    """One server side of a row: its wrk results and CPU seconds per group, per round."""

    results: list[WrkResult] = field(default_factory=list)
    cpu: list[dict[str, float]] = field(default_factory=list)

    def median(self, attr: str) -> float:
        return float(statistics.median(getattr(r, attr) for r in self.results))

    def cpu_us(self, group: str) -> float:
        """Median over the rounds of the group's CPU µs per request."""
        return float(
            statistics.median(
                cpu[group] * 1e6 / max(1, r.requests) for cpu, r in zip(self.cpu, self.results, strict=True)
            )
        )


@dataclass
class Row:
    case: str
    sitecloud: Side = field(default_factory=Side)
    nginx: Side = field(default_factory=Side)
    # The target this case has in the issue: (min req/s ratio, max p99 ratio or 0 for none).
    target: tuple[float, float] | None = None

    def ratios(self) -> tuple[float, float]:
        s, n = self.sitecloud, self.nginx
        return (
            s.median("requests_per_second") / n.median("requests_per_second"),
            s.median("p99_ms") / n.median("p99_ms"),
        )

    def verdict(self) -> str:
        if self.target is None:
            return "—"
        rps, p99 = self.ratios()
        want_rps, want_p99 = self.target
        ok = rps >= want_rps and (not want_p99 or p99 <= want_p99)
        goal = f"≥ {want_rps:.1f}x" + (f", p99 ≤ {want_p99:.1f}x" if want_p99 else "")
        return f"{goal}: {'met' if ok else '**not met**'}"

    def cells(self) -> list[str]:
        s, n = self.sitecloud, self.nginx
        s_rps, n_rps = s.median("requests_per_second"), n.median("requests_per_second")
        rps, p99 = self.ratios()
        sc_cpu = " / ".join(f"{s.cpu_us(g):.0f}" for g in SC_GROUPS if s.cpu and g in s.cpu[0])
        ng_cpu = " / ".join(f"{n.cpu_us(g):.0f}" for g in NG_GROUPS)
        others = ""
        if s.cpu and "rest" in s.cpu[0]:
            others = f" (+{s.cpu_us('rest'):.0f} rest of cloud)"
        return [
            self.case,
            f"{s_rps:,.0f}",
            f"{n_rps:,.0f}",
            f"**{rps:.2f}x**",
            f"{s.median('p50_ms'):.2f} / {n.median('p50_ms'):.2f}",
            f"{s.median('p99_ms'):.2f} / {n.median('p99_ms'):.2f}",
            f"**{p99:.2f}x**",
            sc_cpu + others,
            ng_cpu,
            str(sum(r.errors for r in s.results)),
            self.verdict(),
        ]


HEADER = [
    "case",
    "sitecloud req/s",
    "nginx req/s",
    "req/s ratio",
    "p50 ms (sc / nginx)",
    "p99 ms (sc / nginx)",
    "p99 ratio",
    "sc CPU µs/req (front end / worker)",
    "nginx CPU µs/req (proxy / static)",
    "sc errors",
    "target",
]


def _machine() -> str:
    cpu = "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    nginx = subprocess.run(["nginx", "-v"], capture_output=True, text=True).stderr.strip()
    return f"{os.cpu_count()} cores ({cpu}), Linux {platform.release()}, Python {platform.python_version()}, {nginx}"


def _table(rows: list[Row]) -> str:
    lines = ["| " + " | ".join(HEADER) + " |", "|" + "---|" * len(HEADER)]
    lines += ["| " + " | ".join(row.cells()) + " |" for row in rows]
    return "\n".join(lines)


def _targets(rows: list[Row]) -> str:
    """The issue's targets, each beside what this run measured."""
    lines = [
        "| case | target | measured (sitecloud / nginx) | CPU µs/req: front end / worker vs nginx proxy / static | |",
        "| --- | --- | --- | --- | --- |",
    ]
    for row in rows:
        if row.target is None:
            continue
        rps, p99 = row.ratios()
        want_rps, want_p99 = row.target
        goal = f"≥ {want_rps:.1f}x nginx req/s" + (f", p99 ≤ {want_p99:.1f}x" if want_p99 else "")
        got = f"{rps:.2f}x req/s" + (f", p99 {p99:.2f}x" if want_p99 else "")
        s, n = row.sitecloud, row.nginx
        cpu = (
            f"{s.cpu_us('frontend'):.0f} / {s.cpu_us('worker'):.0f} vs "
            f"{n.cpu_us('proxy'):.0f} / {n.cpu_us('static'):.0f}"
        )
        ok = rps >= want_rps and (not want_p99 or p99 <= want_p99)
        lines.append(f"| {row.case} | {goal} | {got} | {cpu} | {'met' if ok else '**not met**'} |")
    lines.append(
        "| 1,000 slowloris connections open (HTTPS) | other visitors' p99 < 2x their baseline | "
        "measured by `python -m bench.slowloris` (its own section below) | | |"
    )
    return "\n".join(lines)


@dataclass
class Target:
    """One side of a comparison: where wrk goes, with which Host, and whose CPU is counted."""

    url: str
    host: str
    cpu: Callable[[], CpuMeter]
    # After the warm-up: wait until the side is in the state a warm user's visit finds it in.
    settle: Callable[[], None] | None = None
    # Answers the front end sent from its cache without asking a worker, so far (None: unknown).
    held: Callable[[], int | None] | None = None


class Bench:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.rows: list[Row] = []
        self.loads: list[float] = []

    def run(self, row: Row, sitecloud: Target, nginx: Target, threads: int) -> None:
        args = self.args
        sides = {"sitecloud": (sitecloud, row.sitecloud), "nginx": (nginx, row.nginx)}
        for target, _ in sides.values():
            # Warm-up, not counted: TLS handshakes, pooled upstream connections, caches, both alike.
            run_wrk(target.url, target.host, seconds=1, connections=args.connections, threads=threads)
            if target.settle is not None:
                target.settle()
        for rnd in range(args.rounds):
            for who, (target, side) in sides.items():
                held = target.held() if target.held is not None else None
                meter = target.cpu()
                meter.start()
                result = run_wrk(
                    target.url,
                    target.host,
                    seconds=args.seconds,
                    connections=args.connections,
                    threads=threads,
                )
                cpu = meter.stop()
                side.results.append(result)
                side.cpu.append(cpu)
                self.loads.append(os.getloadavg()[0])
                per = ", ".join(f"{g} {s * 1e6 / max(1, result.requests):.0f}" for g, s in cpu.items())
                waited = ", ".join(f"{g} {s * 1e3 / args.seconds:.0f}" for g, s in meter.waited.items())
                held_now = target.held() if held is not None and target.held is not None else None
                share = (
                    f"; held hits {(held_now - held) / max(1, result.requests):.0%} of requests"
                    if held is not None and held_now is not None
                    else ""
                )
                print(
                    f"  {row.case} round {rnd + 1} {who:9s} {result.requests_per_second:9,.0f} req/s "
                    f"p50 {result.p50_ms:.2f} ms p99 {result.p99_ms:.2f} ms errors {result.errors}; "
                    f"CPU µs/req: {per}; waited for a CPU (ms/s): {waited}{share}; "
                    f"load {os.getloadavg()[0]:.2f}",
                    file=sys.stderr,
                )
        self.rows.append(row)


def nginx_cpu(pair: NginxPair) -> Callable[[], CpuMeter]:
    def meter() -> CpuMeter:
        return CpuMeter({name: [int((pair.dir / f"{name}.pid").read_text())] for name in NG_GROUPS})

    return meter


def up_cpu(cloud: UpCloud) -> Callable[[], CpuMeter]:
    def meter() -> CpuMeter:
        assert cloud.proc is not None
        groups = {name: [cloud.role_pid(name)] for name in SC_GROUPS}
        # The rest of what `up` runs: the `up` process is the controller; every role is a session
        # of its own, not its child.
        groups["rest"] = [
            cloud.proc.pid,
            *(cloud.role_pid(n) for n in ("management", "fileserver", "publisher")),
        ]
        return CpuMeter(groups)

    return meter


def _stack_cpu(stack: SitecloudStack) -> Callable[[], CpuMeter]:
    def meter() -> CpuMeter:
        assert stack.frontend.proc is not None and stack.worker.proc is not None
        return CpuMeter({"frontend": [stack.frontend.proc.pid], "worker": [stack.worker.proc.pid]})

    return meter


def start_up_cloud(work: Path, files_dir: Path, processes: int) -> UpCloud:
    """`sitecloud up` with its defaults (and ``--processes`` above 1); the bench site created and
    published through the CLI, as a user would."""
    work.mkdir(parents=True, exist_ok=True)
    cloud = UpCloud(work / "home", ("--processes", str(processes)) if processes > 1 else ())
    cloud.start()
    try:
        cloud.cli(
            "plan", "create", "bench", "--max-sites", "1", "--storage-mb", "64",
            "--bandwidth-mb-per-day", "unlimited", "--cpu-minutes-per-day", "unlimited",
        )  # fmt: skip
        cloud.cli("tenant", "create", "bench")
        subscription = cloud.cli("subscription", "create", "--tenant", "bench", "--plan", "bench")["id"]
        cloud.cli("site", "create", SITE, "--subscription", str(subscription))
        cloud.cli("deploy", SITE, str(files_dir))
        # A fresh `up` builds the wheelhouse for role hosts in the background, once per code version
        # (see `up --wheelhouse`), starting some seconds after it started: measure the steady state
        # after it, as a user's next minutes are.
        wait_until(cloud.wheelhouse_built, timeout=900, interval=1, what="`up` to build its wheelhouse")
        first = next(iter(FILES))
        wait_until(
            lambda: cloud.get(SITE, f"/{first}")[:2] == (200, FILES[first]),
            timeout=60,
            what="the bench site to be served through the front end",
        )
    except BaseException:
        cloud.stop()
        raise
    return cloud


def _feeds_live(cloud: UpCloud) -> None:
    """Wait until the front end's version feeds are live (a warm site's state: its hits are answered
    by the front end alone). With several serving processes the main process has no cache figures,
    and the warm-up stands for it."""
    if "cache_feeds_live" not in cloud.health("frontend"):
        return
    wait_until(
        lambda: cloud.health("frontend").get("cache_feeds_live", 0) >= 1,
        timeout=30,
        interval=0.2,
        what="the front end's version feed from the worker to be live",
    )


def _held_hits(cloud: UpCloud) -> int | None:
    held = cloud.health("frontend").get("cache_held_hits")
    return int(held) if held is not None else None


NOTES = """
CPU µs per request: each side's processes' user + system time from /proc (utime + stime) across a
wrk run, divided by the requests it completed; for sitecloud the front end and the worker (every
serving process of each), and in brackets the rest of what `sitecloud up` runs (controller,
management, file server, publisher) over the same run; for nginx the proxy and the static server.
A fresh `sitecloud up` first builds its wheelhouse for role hosts in the background (a minute or two
of `pip wheel`, once per code version); the bench waits for it, so the rows are the steady state.
wrk, both proxies and both servers share the same cores, and other jobs share this VM (see the load
average above), so figures move by a tenth or more from run to run; medians of the alternated rounds
are shown, and only the ratios of one run mean much. Each round's line on stderr also says how long
each side's processes waited for a CPU (run-queue time from /proc/PID/task/*/schedstat): when the
hottest process of each side (sitecloud's front end, nginx's proxy) waits about half of every second,
each gets about the same share of a core, and the req/s ratio then follows the ratio of their CPU per
request rather than the whole stack's.

How a request goes (docs/architecture.md, "The lane" and "The version feed"): the front end keeps
static answers of up to 1 MB (its cache, keyed by site, target and the worker's content version).
While the version feed from every worker of the site is live and names the entry's version, a hit is
answered by the front end alone: the worker announces a new version on the feed, and serves it only
once each front end has acknowledged it (or its lease ran out), so a publish is never hidden. The
front end reports those hits on the feed for the site's access log (the worker's CPU in the rows is
mostly that). Otherwise (no feed yet, or a feed down) a hit is checked with the worker on a lane: a
body-less 204 when the version held is still the one served. nginx's proxy here sits in front of a
static nginx (plain HTTP, `access_log off`) and caches nothing.
"""


def _up_rows(bench: Bench, ws: Workspace, processes: int, files: list[str]) -> None:
    plural = "process" if processes == 1 else "processes"
    print(
        f"starting `sitecloud up` ({processes} {plural}) and nginx ({processes} worker {plural}) ...",
        file=sys.stderr,
    )
    cloud = start_up_cloud(ws.work / f"up-{processes}", ws.root, processes)
    nginx = NginxPair(ws.work / f"nginx-up-{processes}", ws.root, ws.cert, ws.key, ws.hop, workers=processes)
    nginx.start()
    host = f"{SITE}.{cloud.domain}"
    try:
        names = [name for name in (FILES if processes == 1 else ["1k.html"]) if name in files]
        for name in names:
            target = (
                (1.2, 1.2)
                if name == "1k.html" and processes == 1
                else (1.0, 0)
                if name == "1k.html"
                else (0.9, 0)
            )
            bench.run(
                Row(f"{name}, HTTPS keep-alive, {processes} {plural} each, `sitecloud up`", target=target),
                Target(
                    f"https://127.0.0.1:{cloud.ports['https_port']}/{name}",
                    host,
                    up_cpu(cloud),
                    settle=lambda: _feeds_live(cloud),
                    held=lambda: _held_hits(cloud),
                ),
                Target(f"https://127.0.0.1:{nginx.https_port}/{name}", host, nginx_cpu(nginx)),
                processes,
            )
    finally:
        nginx.stop()
        cloud.stop()


def _stack_rows(bench: Bench, ws: Workspace) -> None:
    print("starting the hand-built stack (file server, worker, front end; metering off) ...", file=sys.stderr)
    stack = SitecloudStack(ws.work / "stack", DOMAIN, ws.pki, processes=1)
    nginx = NginxPair(ws.work / "nginx-stack", ws.root, ws.cert, ws.key, ws.hop, workers=1)
    stack.start(FILES)
    nginx.start()
    host = f"{SITE}.{DOMAIN}"
    try:
        bench.run(
            Row("1k.html, HTTPS keep-alive, 1 process each, hand-built stack (metering off)"),
            Target(f"https://127.0.0.1:{stack.https_port}/1k.html", host, _stack_cpu(stack)),
            Target(f"https://127.0.0.1:{nginx.https_port}/1k.html", host, nginx_cpu(nginx)),
            1,
        )
    finally:
        nginx.stop()
        stack.stop()


def main() -> int:
    parser = argparse.ArgumentParser(prog="make bench")
    parser.add_argument("--seconds", type=int, default=8, help="length of each wrk run")
    parser.add_argument("--rounds", type=int, default=3, help="A/B rounds per case")
    parser.add_argument("--connections", type=int, default=50)
    parser.add_argument("--processes", default="1,2", help="serving processes per role, e.g. 1,2")
    parser.add_argument(
        "--files",
        default=",".join(FILES),
        help=f"pages to fetch through `sitecloud up`, e.g. 1k.html (of {', '.join(FILES)})",
    )
    parser.add_argument("--no-stack", action="store_true", help="skip the hand-built stack's row")
    parser.add_argument("--no-write", action="store_true", help="do not update docs/benchmarks.md")
    args = parser.parse_args()
    if not (nginx_available() and wrk_available()):
        print("bench needs nginx and wrk: apt-get install -y nginx wrk", file=sys.stderr)
        return 2
    counts = [int(n) for n in args.processes.split(",") if n.strip()]
    files = [name.strip() for name in args.files.split(",") if name.strip()]
    if unknown := set(files) - set(FILES):
        print(
            f"--files: no such page {', '.join(sorted(unknown))} (pages: {', '.join(FILES)})", file=sys.stderr
        )
        return 2
    if set(files) != set(FILES) and not args.no_write:
        print("--files: some pages only, so docs/benchmarks.md is left as it is", file=sys.stderr)
        args.no_write = True
    bench = Bench(args)
    before = os.getloadavg()
    # Site uids must reach their files: not under a 0700 directory, nor under /tmp, where test
    # sessions on the same host clean up worker directories.
    with tempfile.TemporaryDirectory(prefix="sc-bench-", dir="/var/tmp") as tmp:
        ws = Workspace.create(Path(tmp), DOMAIN, FILES)
        for processes in counts:
            _up_rows(bench, ws, processes, files)
        if not args.no_stack:
            _stack_rows(bench, ws)

    table = _table(bench.rows)
    print(table)
    for row in bench.rows:
        if row.target is not None:
            print(f"{row.case}: {row.verdict()}")
    load = (
        f"load average (1 min) {before[0]:.2f} before the run, {statistics.median(bench.loads):.2f} "
        f"median over the wrk runs (range {min(bench.loads):.2f} to {max(bench.loads):.2f})"
    )
    print(load, file=sys.stderr)
    if not args.no_write:
        stamp = time.strftime("%Y-%m-%d")
        write_section(
            "data-plane",
            "## Data plane: `sitecloud up` against nginx proxy → nginx static\n\n"
            "Measured by `make bench` (bench/__main__.py): the cloud as `sitecloud up` starts it, with its\n"
            "defaults (metering, access logs, controller and management running), the site created and\n"
            "published through the CLI (`sitecloud deploy`), against nginx as proxy → nginx static (one or two\n"
            "worker processes each, plain HTTP between them as nginx is usually deployed, `access_log off`).\n"
            f"wrk with {args.connections} keep-alive connections (one wrk thread per serving process), "
            f"{args.seconds} s runs,\n{args.rounds} alternated rounds per case (A B A B ...; medians shown). "
            "Ratios are sitecloud / nginx: above\n1.0 is better for req/s, below 1.0 is better for p99.\n\n"
            f"Run on {stamp}: {_machine()}; {load}.\n\n"
            f"### Targets (medians of {args.rounds} alternated rounds)\n\n{_targets(bench.rows)}\n\n"
            f"### Every row\n\n{table}\n" + NOTES,
        )
        print(f"written to {DOC}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
