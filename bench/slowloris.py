"""`python -m bench.slowloris`: visitors' latency while 1,000 slowloris connections hold the front end.

Target (../shared/BRIEF.md): with 1,000 slowloris connections open (HTTPS), other visitors' p99 stays
under 2x their p99 without them. The cloud is the one users run: `sitecloud up` with its defaults, the
bench site published through the CLI. Each slow connection completes a TLS handshake on the HTTPS port
(``--plain``: the plain HTTP port), sends a request line and then one header line every 2 s, never the
blank line that ends the head, and opens again when the server cuts it (as the attack does); so the
front end also pays a handshake for every one it cuts. Meanwhile wrk measures the 1 KB page over HTTPS
keep-alive. nginx (proxy → static, default `client_header_timeout` 60 s) is measured the same way in
the same run as the anchor.
"""

from __future__ import annotations

import argparse
import asyncio
import ssl
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from bench.__main__ import DOMAIN, FILES, NG_GROUPS, SC_GROUPS, nginx_cpu, start_up_cloud, up_cpu
from bench._cpu import CpuMeter
from bench._doc import write_section
from bench._nginx import NginxPair, nginx_available
from bench._stack import SITE
from bench._workspace import Workspace
from bench._wrk import WrkResult, run_wrk, wrk_available

__all__ = ["main"]

_INTERVAL = 2.0
_WAIT = 10.0
# The attack comes from addresses of its own (the visitors, wrk, from 127.0.0.1), as many as keep
# each under the front end's limit of connections per address (256): a distributed attack, which
# that limit alone does not stop.
_SOURCES = 4


def _source(i: int) -> str:
    return f"127.0.0.{2 + i % _SOURCES}"


@dataclass
class _Attack:
    """1,000 slow connections to ``port`` on a loop of their own, until stopped."""

    port: int
    connections: int
    host: str
    tls: bool
    opened: int = 0
    cut: int = 0  # closed by the server (a 408, or a plain close)
    refused: int = 0
    held_samples: list[int] = field(default_factory=list)
    _held: int = 0
    _tls: ssl.SSLContext | None = None
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=lambda: asyncio.run(self._run()), daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(30)

    async def _run(self) -> None:
        if self.tls:
            # One context for all (making one loads the CA store); the attacker trusts anything.
            self._tls = ssl.create_default_context()
            self._tls.check_hostname, self._tls.verify_mode = False, ssl.CERT_NONE
        tasks = [asyncio.create_task(self._one(i)) for i in range(self.connections)]
        while not self._stop.is_set():
            await asyncio.sleep(0.5)
            self.held_samples.append(self._held)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    async def _one(self, i: int) -> None:
        await asyncio.sleep(i * 0.002)  # ramp up over two seconds
        tls = self._tls
        while not self._stop.is_set():
            try:
                reader, writer = await asyncio.open_connection(
                    "127.0.0.1",
                    self.port,
                    ssl=tls,
                    server_hostname=self.host if tls else None,
                    local_addr=(_source(i), 0),
                )
            except OSError:
                self.refused += 1
                await asyncio.sleep(_INTERVAL)
                continue
            self.opened += 1
            self._held += 1
            try:
                writer.write(f"GET /1k.html HTTP/1.1\r\nHost: {self.host}\r\n".encode())
                n = 0
                while not self._stop.is_set():
                    try:
                        await asyncio.wait_for(reader.read(4096), _INTERVAL)
                    except TimeoutError:
                        n += 1
                        writer.write(b"X-Slow-%d: %d\r\n" % (n, i))
                        await writer.drain()
                        continue
                    self.cut += 1  # an answer (408) or the end: the server let go of it
                    break
            except (ConnectionError, OSError):
                self.cut += 1
            finally:
                self._held -= 1
                writer.close()


@dataclass
class _Row:
    server: str
    groups: tuple[str, ...]
    base: list[WrkResult] = field(default_factory=list)
    attacked: list[WrkResult] = field(default_factory=list)
    # CPU µs per visitor request by process group, without and with the attack (whose handling counts).
    base_cpu: list[dict[str, float]] = field(default_factory=list)
    attacked_cpu: list[dict[str, float]] = field(default_factory=list)
    held: list[float] = field(default_factory=list)
    cut: int = 0
    opened: int = 0

    def cpu(self, runs: list[dict[str, float]]) -> str:
        return " / ".join(f"{_median([r[g] for r in runs]):.0f}" for g in self.groups)


def _median(values: list[float]) -> float:
    return float(statistics.median(values)) if values else 0.0


def _metered(
    meter: Callable[[], CpuMeter],
    groups: tuple[str, ...],
    url: str,
    host: str,
    seconds: int,
    connections: int,
) -> tuple[WrkResult, dict[str, float]]:
    cpu = meter()
    cpu.start()
    result = run_wrk(url, host, seconds=seconds, connections=connections)
    used = cpu.stop()
    return result, {g: used[g] / max(1, result.requests) * 1e6 for g in groups}


def _measure(
    row: _Row,
    meter: Callable[[], CpuMeter],
    https_url: str,
    host: str,
    attack_port: int,
    *,
    tls: bool,
    seconds: int,
    connections: int,
    slow: int,
) -> None:
    result, cpu = _metered(meter, row.groups, https_url, host, seconds, connections)
    row.base.append(result)
    row.base_cpu.append(cpu)
    attack = _Attack(attack_port, slow, host, tls)
    attack.start()
    try:
        # All of them open and sending, and the run spans the front end's header timeout (15 s), when
        # it cuts them and they all come back at once: the attack's hardest moment.
        time.sleep(_WAIT)
        result, cpu = _metered(meter, row.groups, https_url, host, seconds, connections)
        row.attacked.append(result)
        row.attacked_cpu.append(cpu)
        row.held.append(_median([float(h) for h in attack.held_samples[-2 * seconds :]]))
    finally:
        attack.stop()
    row.cut += attack.cut
    row.opened += attack.opened
    b, a = row.base[-1], row.attacked[-1]
    print(
        f"  {row.server:9s} p99 {b.p99_ms:.2f} ms -> {a.p99_ms:.2f} ms under attack, req/s "
        f"{b.requests_per_second:,.0f} -> {a.requests_per_second:,.0f}, slow connections held "
        f"{row.held[-1]:.0f}, cut by the server {attack.cut}, refused {attack.refused}",
        file=sys.stderr,
    )


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.slowloris")
    parser.add_argument("--slow", type=int, default=1000, help="slowloris connections")
    parser.add_argument("--seconds", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--connections", type=int, default=50, help="wrk's (well-behaved) connections")
    parser.add_argument("--no-write", action="store_true")
    parser.add_argument(
        "--plain", action="store_true", help="slow connections to the plain HTTP port instead of HTTPS"
    )
    args = parser.parse_args()
    if not (nginx_available() and wrk_available()):
        print("bench needs nginx and wrk: apt-get install -y nginx wrk", file=sys.stderr)
        return 2
    rows = {"sitecloud": _Row("sitecloud", SC_GROUPS), "nginx": _Row("nginx", NG_GROUPS)}
    tls = not args.plain
    with tempfile.TemporaryDirectory(prefix="sitecloud-slowloris-") as tmp:
        ws = Workspace.create(Path(tmp), DOMAIN, FILES)
        print("starting `sitecloud up` and nginx, 1 process each ...", file=sys.stderr)
        cloud = start_up_cloud(ws.work / "up", ws.root, 1)
        nginx = NginxPair(ws.work / "nginx", ws.root, ws.cert, ws.key, ws.hop)
        nginx.start()
        host = f"{SITE}.{cloud.domain}"
        sides = {
            "sitecloud": (
                f"https://127.0.0.1:{cloud.ports['https_port']}/1k.html",
                cloud.ports["https_port"] if tls else cloud.ports["http_port"],
                up_cpu(cloud),
            ),
            "nginx": (
                f"https://127.0.0.1:{nginx.https_port}/1k.html",
                nginx.https_port if tls else nginx.http_port,
                nginx_cpu(nginx),
            ),
        }
        try:
            for url, _, _ in sides.values():
                run_wrk(url, host, seconds=1, connections=args.connections)  # warm-up
            for _ in range(args.rounds):
                for name, (url, attack_port, meter) in sides.items():
                    _measure(
                        rows[name],
                        meter,
                        url,
                        host,
                        attack_port,
                        tls=tls,
                        seconds=args.seconds,
                        connections=args.connections,
                        slow=args.slow,
                    )
        finally:
            nginx.stop()
            cloud.stop()

    lines = [
        "| server | p99 ms without / with | p99 ratio (target < 2) | req/s without / with "
        "| CPU µs per visitor request without → with (sitecloud: front end / worker; nginx: proxy / "
        "static) | slow connections held (median) | cut by the server |",
        "|---|---|---|---|---|---|---|",
    ]
    verdicts = []
    for row in rows.values():
        p99_base = _median([r.p99_ms for r in row.base])
        p99_attacked = _median([r.p99_ms for r in row.attacked])
        rps_base = _median([r.requests_per_second for r in row.base])
        rps_attacked = _median([r.requests_per_second for r in row.attacked])
        ratio = p99_attacked / p99_base
        verdicts.append(f"{row.server}: p99 {ratio:.2f}x under attack ({'met' if ratio < 2 else 'NOT met'})")
        lines.append(
            f"| {row.server} | {p99_base:.2f} / {p99_attacked:.2f} | **{ratio:.2f}x** | "
            f"{rps_base:,.0f} / {rps_attacked:,.0f} | {row.cpu(row.base_cpu)} → {row.cpu(row.attacked_cpu)} | "
            f"{_median(row.held):,.0f} of {args.slow} | {row.cut:,} |"
        )
    table = "\n".join(lines)
    print(table)
    print("target (other visitors' p99 < 2x with the slowloris connections open): " + "; ".join(verdicts))
    if not args.no_write:
        write_section(
            "slowloris",
            "## Slow clients: 1,000 slowloris connections (`python -m bench.slowloris`)\n\n"
            f"Run on {time.strftime('%Y-%m-%d')}, `sitecloud up` with its defaults (the site published "
            f"with the CLI) against nginx, 1 process each, {args.rounds} rounds (medians). "
            f"{args.slow} connections to the {'plain HTTP' if args.plain else 'HTTPS (a TLS handshake each)'} "
            f"port, from {_SOURCES} loopback addresses of their own (under the front end's 256 "
            "connections per address; wrk's visitors come from 127.0.0.1), each send a request line, then one "
            f"header line every {_INTERVAL:.0f} s and never the end of the head, and open again when "
            "cut; meanwhile wrk "
            f"({args.connections} keep-alive connections, {args.seconds} s) measures the 1 KB page over HTTPS. "
            "The front end cuts a head that is not whole after `header_timeout` (15 s) with 408, so the "
            "attack keeps reconnecting; nginx waits its `client_header_timeout` (60 s). CPU per visitor "
            "request: each side's processes over the wrk run (from /proc) divided by the visitors' "
            "requests, so under attack it includes what the attack cost them. Target: "
            "the visitors' p99 under 2x their p99 without the attack.\n\n" + table + "\n",
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
