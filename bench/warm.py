"""`python -m bench.warm`: warm requests per second of a Python hello site.

sitecloud's front end → worker (mutual TLS) → the site's app (our app server on a unix socket, one
process) against the same ``app.py`` under gunicorn alone, in the same run: gunicorn with one sync
worker, and with the fastest of a few reasonable settings (picked by a short calibration run, shown).
wrk drives them alternately (A B C A B C ...), plain HTTP keep-alive to the front end and to gunicorn.

Writes its section into docs/benchmarks.md between its own markers, keeping the other sections.
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from bench._doc import DOC, write_section
from bench._fpm import NginxFpm, php_fpm_binary
from bench._nginx import nginx_available
from bench._stack import SITE, SitecloudStack
from bench._wrk import WrkResult, run_wrk, wrk_available
from bench.coldstart import HELLO
from bench.harness.processes import CloudPKI, wait_until
from roles.worker.apps._launch import app_threads, find_php_cgi, php_children, pick_python
from roles.worker.apps._spec import AppLimits
from shared.net import free_port

DOMAIN = "sites.bench"
APP = HELLO["python (WSGI)"]["app.py"]
PHP_APP = HELLO["php"]["index.php"]
GUNICORN = Path(sys.executable).with_name("gunicorn")


def _limits() -> AppLimits:
    """The bench site's limits: every core, as gunicorn gets them (a plan's default is half a core)."""
    return AppLimits(cpu_percent=100 * (os.cpu_count() or 1))


def _candidates() -> dict[str, list[str]]:
    cores = os.cpu_count() or 1
    return {
        f"{2 * cores + 1} sync workers (gunicorn's 2 * cores + 1)": ["-w", str(2 * cores + 1)],
        f"{cores} sync workers": ["-w", str(cores)],
        f"{cores} gthread workers, 4 threads each (keep-alive)": ["-w", str(cores), "-k", "gthread", "--threads", "4"],
    }  # fmt: skip


class Gunicorn:
    def __init__(self, appdir: Path, args: list[str]) -> None:
        self.appdir = appdir
        self.args = args
        self.port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/"

    def start(self) -> Gunicorn:
        self.proc = subprocess.Popen(
            [str(GUNICORN), "--bind", f"127.0.0.1:{self.port}", "--log-level", "warning", *self.args, "app:app"],
            cwd=self.appdir,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )  # fmt: skip

        def answers() -> bool:
            with urllib.request.urlopen(self.url, timeout=2) as resp:
                return bool(resp.read() == b"hello")

        wait_until(answers, timeout=20, what="gunicorn")
        return self

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def median(results: list[WrkResult], attr: str) -> float:
    return float(statistics.median(getattr(r, attr) for r in results))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seconds", type=int, default=8, help="length of each wrk run")
    parser.add_argument("--rounds", type=int, default=2, help="alternating rounds")
    parser.add_argument("--connections", type=int, default=50)
    parser.add_argument("--no-doc", action="store_true", help="do not write docs/benchmarks.md")
    args = parser.parse_args()
    if not wrk_available() or not GUNICORN.exists():
        print(
            "bench.warm needs wrk and gunicorn: apt-get install wrk; pip install -e '.[test]'",
            file=sys.stderr,
        )
        return 2
    host = f"{SITE}.{DOMAIN}"
    conns = args.connections
    work = Path(tempfile.mkdtemp(prefix="sc-warm-"))
    os.chmod(work, 0o711)  # the site's app (its own uid) must reach its files
    appdir = work / "gunicorn-app"
    appdir.mkdir()
    (appdir / "app.py").write_bytes(APP)
    stack = SitecloudStack(work, DOMAIN, CloudPKI(work / "pki"))
    servers: list[Gunicorn] = []
    calibration: dict[str, float] = {}
    try:
        stack.start(
            {"hello.txt": b"static hello", "app.py": APP},
            site_settings={"limits": {"cpu_percent": _limits().cpu_percent}},
        )
        sitecloud_url = f"http://127.0.0.1:{stack.http_port}/"
        wait_until(lambda: run_wrk(sitecloud_url, host, seconds=1, connections=1).errors == 0, what="the app")
        for name, extra in _candidates().items():
            server = Gunicorn(appdir, extra).start()
            try:
                run_wrk(server.url, host, seconds=1, connections=conns)
                calibration[name] = run_wrk(
                    server.url, host, seconds=3, connections=conns
                ).requests_per_second
                print(f"calibration: gunicorn {name}: {calibration[name]:,.0f} req/s", file=sys.stderr)
            finally:
                server.stop()
        fastest = max(calibration, key=lambda n: calibration[n])
        threads = app_threads(_limits())
        one = Gunicorn(appdir, ["-w", "1"]).start()
        same = Gunicorn(appdir, ["-w", "1", "-k", "gthread", "--threads", str(threads)]).start()
        best = Gunicorn(appdir, _candidates()[fastest]).start()
        servers += [one, same, best]
        targets = {
            "sitecloud: front end → worker → app": sitecloud_url,
            "gunicorn, 1 sync worker": one.url,
            f"gunicorn, 1 gthread worker, {threads} threads (as our app server)": same.url,
            f"gunicorn, {fastest}": best.url,
        }
        results = _rounds(targets, host, args)
    finally:
        for server in servers:
            server.stop()
        stack.stop()
    try:
        php = _php(work, host, args)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    table = _table(results)
    php_table = _table(php) if php is not None else None
    print(table)
    if php_table is not None:
        print(php_table)
    if not args.no_doc:
        _write_doc(table, php_table, calibration, args)
    return 0


def _rounds(targets: dict[str, str], host: str, args: argparse.Namespace) -> dict[str, list[WrkResult]]:
    """wrk on each target in turn (A B C A B C ...), after a warm-up of each."""
    results: dict[str, list[WrkResult]] = {}
    for url in targets.values():
        run_wrk(url, host, seconds=1, connections=args.connections)  # warm-up, not counted
    for rnd in range(args.rounds):
        for name, url in targets.items():
            res = run_wrk(url, host, seconds=args.seconds, connections=args.connections)
            results.setdefault(name, []).append(res)
            print(
                f"round {rnd + 1} {name}: {res.requests_per_second:,.0f} req/s, p50 {res.p50_ms:.2f} ms, "
                f"p99 {res.p99_ms:.2f} ms, errors {res.errors}",
                file=sys.stderr,
            )
    return results


def _php(work: Path, host: str, args: argparse.Namespace) -> dict[str, list[WrkResult]] | None:
    """The PHP hello site through sitecloud against nginx → php-fpm with as many children."""
    if php_fpm_binary() is None or find_php_cgi() is None or not nginx_available():
        print("bench.warm: no php-fpm, php-cgi or nginx here: PHP part skipped", file=sys.stderr)
        return None
    children = php_children(_limits())
    docroot = work / "fpm-root"
    docroot.mkdir()
    (docroot / "index.php").write_bytes(PHP_APP)
    stack = SitecloudStack(work / "php", DOMAIN, CloudPKI(work / "php-pki"))
    anchor = NginxFpm(work / "fpm", docroot, children)
    try:
        stack.start(
            {"hello.txt": b"static hello", "index.php": PHP_APP},
            site_settings={"limits": {"cpu_percent": _limits().cpu_percent}},
        )
        url = f"http://127.0.0.1:{stack.http_port}/"
        wait_until(lambda: run_wrk(url, host, seconds=1, connections=1).errors == 0, what="the PHP site")
        anchor.start()
        return _rounds(
            {
                "sitecloud: front end → worker → php-cgi": url,
                f"nginx → php-fpm, {children} children": anchor.url,
            },
            host,
            args,
        )
    finally:
        anchor.stop()
        stack.stop()


def _table(results: dict[str, list[WrkResult]]) -> str:
    ours = median(next(iter(results.values())), "requests_per_second")
    lines = [
        "| server | req/s | sitecloud / this | p50 ms | p99 ms | errors |",
        "| --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for n, (name, res) in enumerate(results.items()):
        rps = median(res, "requests_per_second")
        ratio = f"**{ours / rps:.2f}x**" if n else "—"
        lines.append(
            f"| {name} | {rps:,.0f} | {ratio} | {median(res, 'p50_ms'):.2f} | "
            f"{median(res, 'p99_ms'):.2f} | {sum(r.errors for r in res)} |"
        )
    return "\n".join(lines)


def _write_doc(
    table: str, php_table: str | None, calibration: dict[str, float], args: argparse.Namespace
) -> None:
    version = subprocess.run([str(GUNICORN), "--version"], capture_output=True, text=True).stdout.strip()
    app_python = pick_python("", isolate=os.geteuid() == 0)
    tried = "; ".join(f"{name}: {rps:,.0f} req/s" for name, rps in calibration.items())
    lines = [
        "## Dynamic sites: warm requests per second, Python and PHP hello sites (`python -m bench.warm`)",
        "",
        f"Machine: {platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}, {version}, "
        f"{time.strftime('%Y-%m-%d')}, load average {os.getloadavg()[0]:.1f} at the end. The same `app.py` "
        "(WSGI, answers `hello`) through sitecloud's front end → worker (the hop mutual TLS) → the site's "
        f"app (our app server: one process, {app_threads(_limits())} threads, on a unix socket the worker "
        "keeps connections to; the site's CPU limit set to every core, as gunicorn has them; the worker's "
        f"app Python, here `{app_python}`) against gunicorn alone (on `{sys.executable}`). wrk with "
        f"{args.connections} keep-alive connections, one thread, plain HTTP to the front end and to "
        f"gunicorn, {args.seconds} s runs, {args.rounds} alternating rounds (medians shown); everything "
        "shares the same cores. gunicorn's sync workers close the connection after each answer. The "
        f'"fastest reasonable" gunicorn setting is the best of a 3 s calibration run of: {tried}.',
        "",
        table,
        "",
    ]
    if php_table is not None:
        lines += [
            f"PHP, in the same run: `index.php` (`<?php echo 'hello';`) through sitecloud (php-cgi in "
            f"FastCGI mode, {php_children(_limits())} children kept warm, a connection per request) against "
            "nginx (one worker) → php-fpm (a static pool of as many children, FastCGI on a unix socket).",
            "",
            php_table,
            "",
        ]
    lines += [
        "sitecloud's path runs three processes where gunicorn or php-fpm behind nginx run one or two: "
        "front end and worker each parse and forward, the hop between them mutual TLS, all on the same "
        "cores as wrk and the app. CPU time per request measured on this VM (2026-12-03, /proc of each "
        "process over a 5 s wrk run): the front end about 90 µs, the worker about 75 µs for a static page "
        "and 125 µs for a Python app request (155 µs for PHP), our app server about 85 µs for the hello "
        "answer, php-cgi about 50 µs. The machine "
        "(2 cores shared with other jobs, load 2 to 10 during these runs) makes runs vary by ±30 %; the "
        "ratios come from one run with the anchors alternated.",
    ]
    write_section("warm", "\n".join(lines))
    print(f"wrote {DOC}", file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
