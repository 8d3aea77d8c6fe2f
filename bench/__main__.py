"""`make bench`: sitecloud's front end → worker path side by side with nginx proxy → nginx static.

Both serve the same files; wrk drives them alternately (A B A B ...) in the same run, and the table
gives each one's req/s, p50 and p99 and the ratio sitecloud / nginx. The table is written to
docs/benchmarks.md with the machine it ran on.
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
from dataclasses import dataclass
from pathlib import Path

from bench._nginx import NginxPair, nginx_available
from bench._stack import SITE, SitecloudStack
from bench._wrk import WrkResult, run_wrk, wrk_available

DOMAIN = "sites.bench"
FILES = {"1k.html": b"x" * 1024, "100k.bin": os.urandom(100 * 1024)}
DOC = Path(__file__).resolve().parent.parent / "docs" / "benchmarks.md"


@dataclass
class Row:
    case: str
    sitecloud: list[WrkResult]
    nginx: list[WrkResult]

    @staticmethod
    def _median(results: list[WrkResult], attr: str) -> float:
        return statistics.median(getattr(r, attr) for r in results)

    def cells(self) -> list[str]:
        s_rps, n_rps = (
            self._median(self.sitecloud, "requests_per_second"),
            self._median(self.nginx, "requests_per_second"),
        )
        s_p50, n_p50 = self._median(self.sitecloud, "p50_ms"), self._median(self.nginx, "p50_ms")
        s_p99, n_p99 = self._median(self.sitecloud, "p99_ms"), self._median(self.nginx, "p99_ms")
        errors = sum(r.errors for r in self.sitecloud)
        return [
            self.case,
            f"{s_rps:,.0f}",
            f"{n_rps:,.0f}",
            f"**{s_rps / n_rps:.2f}x**",
            f"{s_p50:.2f} / {n_p50:.2f}",
            f"{s_p99:.2f} / {n_p99:.2f}",
            f"**{s_p99 / n_p99:.2f}x**",
            str(errors),
        ]


HEADER = [
    "case",
    "sitecloud req/s",
    "nginx req/s",
    "req/s ratio",
    "p50 ms (sc / nginx)",
    "p99 ms (sc / nginx)",
    "p99 ratio",
    "sc errors",
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


def main() -> int:
    parser = argparse.ArgumentParser(prog="make bench")
    parser.add_argument("--seconds", type=int, default=8, help="length of each wrk run")
    parser.add_argument("--rounds", type=int, default=2, help="A/B rounds per case")
    parser.add_argument("--connections", type=int, default=50)
    parser.add_argument("--no-write", action="store_true", help="do not update docs/benchmarks.md")
    args = parser.parse_args()
    if not (nginx_available() and wrk_available()):
        print("bench needs nginx and wrk: apt-get install -y nginx wrk", file=sys.stderr)
        return 2

    with tempfile.TemporaryDirectory(prefix="sitecloud-bench-") as tmp:
        work = Path(tmp)
        os.chmod(work, 0o755)
        root = work / "www"
        root.mkdir()
        for name, data in FILES.items():
            (root / name).write_bytes(data)
        stack = SitecloudStack(work / "sitecloud", DOMAIN)
        cert, key = work / "nginx.pem", work / "nginx.key"
        stack.pki.ca.issue_wildcard(DOMAIN).write(key, cert)
        nginx = NginxPair(work / "nginx", root, cert, key)
        print(
            "starting sitecloud (fileserver, worker, frontend) and nginx (proxy, static) ...", file=sys.stderr
        )
        stack.start(FILES)
        nginx.start()
        rows: list[Row] = []
        try:
            for scheme in ("https", "http"):
                for name in FILES:
                    row = Row(f"{name} {scheme.upper()} keep-alive, 1 process each", [], [])
                    for rnd in range(args.rounds):
                        for who in ("sitecloud", "nginx"):
                            port = (
                                (stack.https_port if scheme == "https" else stack.http_port)
                                if who == "sitecloud"
                                else (nginx.https_port if scheme == "https" else nginx.http_port)
                            )
                            result = run_wrk(
                                f"{scheme}://127.0.0.1:{port}/{name}",
                                f"{SITE}.{DOMAIN}",
                                seconds=args.seconds,
                                connections=args.connections,
                            )
                            getattr(row, who).append(result)
                            print(
                                f"  {row.case} round {rnd + 1} {who:9s} {result.requests_per_second:9,.0f} req/s "
                                f"p50 {result.p50_ms:.2f} ms p99 {result.p99_ms:.2f} ms errors {result.errors}",
                                file=sys.stderr,
                            )
                    rows.append(row)
        finally:
            nginx.stop()
            stack.stop()

    table = _table(rows)
    print(table)
    if not args.no_write:
        stamp = time.strftime("%Y-%m-%d")
        DOC.write_text(
            "# Benchmarks\n\n"
            "Measured by `make bench` (bench/__main__.py): sitecloud's front end → worker (both roles as their own\n"
            "processes, the hop between them mutual TLS) against nginx as proxy → nginx static (plain HTTP between\n"
            f"them), same files, wrk with {args.connections} keep-alive connections, {args.seconds} s runs, "
            f"{args.rounds} alternating rounds each (medians shown). Ratios are sitecloud / nginx: above 1.0 is\n"
            "better for req/s, below 1.0 is better for p99.\n\n"
            f"Run on {stamp}: {_machine()}.\n\n{table}\n"
        )
        print(f"written to {DOC}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
