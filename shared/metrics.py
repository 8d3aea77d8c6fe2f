"""Prometheus metrics for every role: one registry per process, served on ``/metrics``.

The data planes (front end, worker) count in plain integers on the request path (:class:`HttpCounts`)
and those counts become metric families only when someone scrapes (:class:`HttpCollector`): a
``prometheus_client`` call per request would cost the hot path more than the request itself. Serving
processes (``processes > 1``) write their counts to a file in the role's state directory every
second (:class:`CountsWriter`); the main process sums them at scrape time (:func:`read_counts`).

The other roles read figures they already keep (sessions, commits, apps) at scrape time through
:class:`FiguresCollector`. Per-site series are bounded: only the ``top_n`` busiest sites get their
own label value, the rest are summed under ``site="_other"``.
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import json
import os
from bisect import bisect_left
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, ProcessCollector, generate_latest
from prometheus_client.metrics_core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    InfoMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

from shared.files import read_json
from shared.internal import require_role
from shared.version import CODE_VERSION

__all__ = [
    "LATENCY_BUCKETS",
    "OTHER_SITES",
    "CountsWriter",
    "FiguresCollector",
    "HttpCollector",
    "HttpCounts",
    "add_sites",
    "clear_counts",
    "metrics_handler",
    "read_counts",
    "role_registry",
]

# Seconds; from sub-millisecond static hits to a slow app's answer.
LATENCY_BUCKETS: tuple[float, ...] = (
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
)  # fmt: skip
OTHER_SITES = "_other"
# Sites counted apart on the request path before new names are folded in at once (a bound on memory;
# the exported series are bounded by top_n).
_MAX_SITES = 20_000
_CLASSES = ("1xx", "2xx", "3xx", "4xx", "5xx")


class HttpCounts:
    """Requests by status class, a latency histogram and per-site counters, as plain numbers.

    ``sites`` maps a site to ``[requests, bytes_in, bytes_out]``; ``refused_connections`` counts
    connections closed at accept by a limit (the front end's per-address one).
    """

    __slots__ = ("buckets", "latency_sum", "refused_connections", "sites", "status")

    def __init__(self) -> None:
        self.status = [0, 0, 0, 0, 0, 0]  # index: status // 100 (0 unused)
        self.buckets = [0] * (len(LATENCY_BUCKETS) + 1)  # the last one: above the largest bound
        self.latency_sum = 0.0
        self.sites: dict[str, list[int]] = {}
        self.refused_connections = 0

    def done(self, status: int, seconds: float) -> None:
        """One answered request (called on the request path: keep it to a few adds)."""
        self.status[status // 100 if 100 <= status < 600 else 5] += 1
        self.buckets[bisect_left(LATENCY_BUCKETS, seconds)] += 1
        self.latency_sum += seconds

    def site(self, name: str) -> list[int]:
        """The counters of ``name``, made on first use."""
        counters = self.sites.get(name)
        if counters is None:
            if len(self.sites) >= _MAX_SITES:
                name = OTHER_SITES
                counters = self.sites.get(name)
            if counters is None:
                counters = self.sites[name] = [0, 0, 0]
        return counters

    def add(self, other: HttpCounts) -> None:
        for i, v in enumerate(other.status):
            self.status[i] += v
        for i, v in enumerate(other.buckets):
            self.buckets[i] += v
        self.latency_sum += other.latency_sum
        self.refused_connections += other.refused_connections
        add_sites(self.sites, other.sites)

    def folded(self, top_n: int) -> HttpCounts:
        """The same counts with only the ``top_n`` busiest sites on their own (see :func:`_top_sites`)."""
        out = HttpCounts()
        out.status, out.buckets, out.latency_sum = self.status, self.buckets, self.latency_sum
        out.refused_connections = self.refused_connections
        out.sites = _top_sites(self.sites, top_n)
        return out

    def to_json(self) -> dict[str, Any]:
        return {
            "status": self.status,
            "buckets": self.buckets,
            "sum": self.latency_sum,
            "sites": self.sites,
            "refused": self.refused_connections,
        }

    @classmethod
    def parse(cls, raw: Any) -> HttpCounts:
        """Counts a serving process wrote; anything malformed reads as nothing (never a failed scrape)."""
        counts = cls()
        if not isinstance(raw, dict):
            return counts
        status, buckets = raw.get("status"), raw.get("buckets")
        if isinstance(status, list) and len(status) == len(counts.status):
            counts.status = [int(v) for v in status]
        if isinstance(buckets, list) and len(buckets) == len(counts.buckets):
            counts.buckets = [int(v) for v in buckets]
        counts.latency_sum = float(raw.get("sum") or 0.0)
        counts.refused_connections = int(raw.get("refused") or 0)
        sites = raw.get("sites")
        if isinstance(sites, dict):
            for name, v in sites.items():
                if isinstance(v, list) and len(v) == 3:
                    counts.sites[str(name)] = [int(x) for x in v]
        return counts


def add_sites(into: dict[str, list[int]], more: dict[str, list[int]]) -> None:
    for name, v in more.items():
        mine = into.get(name)
        if mine is None:
            into[name] = list(v)
        else:
            mine[0] += v[0]
            mine[1] += v[1]
            mine[2] += v[2]


def _top_sites(sites: dict[str, list[int]], top_n: int) -> dict[str, list[int]]:
    """The ``top_n`` busiest sites (by requests) as they are, every other one summed under ``_other``."""
    if len(sites) <= top_n and OTHER_SITES not in sites:
        return sites
    keep = heapq.nlargest(top_n, (n for n in sites if n != OTHER_SITES), key=lambda n: sites[n][0])
    out = {n: sites[n] for n in keep}
    other = [0, 0, 0]
    for name, v in sites.items():
        if name not in out:
            other[0] += v[0]
            other[1] += v[1]
            other[2] += v[2]
    out[OTHER_SITES] = other
    return out


class HttpCollector(Collector):
    """Turns a data plane's :class:`HttpCounts` into metric families when scraped."""

    def __init__(
        self,
        prefix: str,
        counts: Callable[[], HttpCounts],
        *,
        top_n: int,
        bytes_in: bool = True,
        refused: bool = False,
    ) -> None:
        self._prefix = f"sitecloud_{prefix}"
        self._counts = counts
        self._top_n = max(0, top_n)
        self._bytes_in = bytes_in
        self._refused = refused

    def collect(self) -> Iterator[Metric]:
        c = self._counts()
        p = self._prefix
        requests = CounterMetricFamily(
            f"{p}_requests", "Requests answered, by status class.", labels=["code"]
        )
        for i, name in enumerate(_CLASSES, start=1):
            requests.add_metric([name], c.status[i])
        yield requests
        if self._refused:
            yield CounterMetricFamily(
                f"{p}_connections_refused",
                "Connections closed at accept: their client address held the most it may at once.",
                value=c.refused_connections,
            )
        cumulative, buckets = 0, []
        for bound, n in zip(LATENCY_BUCKETS, c.buckets, strict=False):
            cumulative += n
            buckets.append((repr(bound), float(cumulative)))
        buckets.append(("+Inf", float(cumulative + c.buckets[-1])))
        yield HistogramMetricFamily(
            f"{p}_request_duration_seconds",
            "Time from taking up a request to its answer's first byte.",
            buckets=buckets,
            sum_value=c.latency_sum,
        )
        sites = _top_sites(c.sites, self._top_n)
        site_requests = CounterMetricFamily(
            f"{p}_site_requests",
            f'Requests per site: the {self._top_n} busiest sites, the rest as site="{OTHER_SITES}".',
            labels=["site"],
        )
        bytes_out = CounterMetricFamily(f"{p}_site_sent_bytes", "Bytes sent per site.", labels=["site"])
        bytes_in = CounterMetricFamily(
            f"{p}_site_received_bytes", "Bytes received per site.", labels=["site"]
        )
        for name, v in sites.items():
            site_requests.add_metric([name], v[0])
            bytes_in.add_metric([name], v[1])
            bytes_out.add_metric([name], v[2])
        yield site_requests
        if self._bytes_in:
            yield bytes_in
        yield bytes_out


class FiguresCollector(Collector):
    """Metric families made by ``collect`` at scrape time from figures the role already keeps."""

    def __init__(self, collect: Callable[[], Iterable[Metric]]) -> None:
        self._collect = collect

    def collect(self) -> Iterable[Metric]:
        return self._collect()


def role_registry(role: str, host: str, config_version: Callable[[], int]) -> CollectorRegistry:
    """A fresh registry for one role process: process figures, build info, the config version applied."""
    registry = CollectorRegistry(auto_describe=False)
    ProcessCollector(registry=registry)

    def common() -> Iterator[Metric]:
        info = InfoMetricFamily("sitecloud_role", "This role process.")
        info.add_metric([], {"role": role, "host": host, "code_version": CODE_VERSION})
        yield info
        yield GaugeMetricFamily(
            "sitecloud_config_version",
            "The config snapshot version this role applied.",
            value=config_version(),
        )

    registry.register(FiguresCollector(common))
    return registry


def metrics_handler(registry: CollectorRegistry, *, mtls: bool = True) -> Callable[[web.Request], Any]:
    """``GET /metrics`` in the Prometheus text format; over mTLS only the controller and management may."""

    async def handler(request: web.Request) -> web.Response:
        if mtls:
            require_role(request, "controller", "management")
        body = generate_latest(registry)
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})

    return handler


def _counts_dir(state_dir: Path) -> Path:
    return state_dir / "metrics"


def clear_counts(state_dir: Path) -> None:
    """Forget counts left by serving processes of an earlier run (the main process calls this first)."""
    for path in _counts_dir(state_dir).glob("*.json"):
        with contextlib.suppress(OSError):
            path.unlink()


def read_counts(state_dir: Path, pids: Iterable[int]) -> HttpCounts:
    """The sum of what the live serving processes last wrote."""
    total = HttpCounts()
    for pid in pids:
        with contextlib.suppress(OSError, ValueError):
            total.add(HttpCounts.parse(read_json(_counts_dir(state_dir) / f"{pid}.json")))
    return total


class CountsWriter:
    """A serving process's counts, written for the main process to sum (once a second, when changed).

    Only its ``keep_sites`` busiest sites are written apart (the rest summed as ``_other``): with many
    thousands of sites, writing them all every second would cost the serving process real time. The
    main process's top N are then exact but for sites near the edge, which one process may have folded.
    """

    def __init__(
        self, state_dir: Path, counts: Callable[[], HttpCounts], *, keep_sites: int, interval: float = 1.0
    ) -> None:
        self._path = _counts_dir(state_dir) / f"{os.getpid()}.json"
        self._source = counts
        self._keep = keep_sites
        self._interval = interval
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._path.parent.mkdir(parents=True, exist_ok=True)
        self._task = asyncio.get_running_loop().create_task(self._run())

    async def _run(self) -> None:
        last = ""
        while True:
            await asyncio.sleep(self._interval)
            last = self.write(last)

    def write(self, last: str = "") -> str:
        """Write the counts unless they are ``last`` (as text); return them as text."""
        text = json.dumps(self._source().folded(self._keep).to_json())
        if text != last:
            # Replaced whole (never read half-written); no fsync: the counts live no longer than the
            # processes, and a stall of the serving loop would cost more than they are worth.
            tmp = self._path.with_suffix(".tmp")
            tmp.write_text(text)
            os.replace(tmp, self._path)
        return text

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        with contextlib.suppress(OSError):
            self._path.unlink()
