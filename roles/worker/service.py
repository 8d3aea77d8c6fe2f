"""The worker process: control plane, content sync and data server, started and stopped in order.

With ``processes: N > 1`` the main process keeps the control plane, the content sync and the sites' apps,
and N serving processes (see :mod:`shared.prefork`) answer on the data port's shared listener; they
reach the apps through the main process's app channel (``roles/worker/apps/_channel.py``), and hand
their access lines to it there in batches (the main process owns every site's log). After each snapshot and
each version flip the main process writes which version directory serves each site to
``state/serving.json`` and sends SIGHUP; each serving process swaps its lookup table and drops its hot
cache for the sites that moved.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Protocol

from prometheus_client import Histogram
from prometheus_client.metrics_core import CounterMetricFamily, GaugeMetricFamily, Metric

from roles.worker._cache import ContentCache, SiteVersion
from roles.worker._feed import VersionFeeds, tag_of
from roles.worker._layout import apps_root, prepare_apps_root
from roles.worker._static import HotCache
from roles.worker._usage import WorkerUsageReporter
from roles.worker.apps import AppManager, AppProxy, app_routes
from roles.worker.apps._channel import AppChannel, RemoteApps, RemoteLog, channel_path
from roles.worker.apps._manager import run_dir_for
from roles.worker.config import WorkerConfig
from roles.worker.content import ContentSync
from roles.worker.server import DataServer
from shared.contracts.health import WorkerFigures
from shared.contracts.snapshots import Refused, WorkerSnapshot
from shared.control import ControlPlane
from shared.disk import disk_space
from shared.errors import SitecloudError
from shared.files import atomic_write_json, read_json
from shared.logs import get_logger
from shared.metrics import (
    CountsWriter,
    FiguresCollector,
    HttpCollector,
    HttpCounts,
    clear_counts,
    read_counts,
)
from shared.prefork import PreforkedRole, ServingProcesses, reload_on_sighup
from shared.states import HealthStatus
from shared.words import counted

__all__ = ["WORKER"]

# Seconds: a warm sandbox starts in tens of milliseconds, a first requirements install in tens of seconds.
COLD_START_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)


def _handover_file(config: WorkerConfig) -> Path:
    return config.state_dir / "serving.json"


class _DataSide(Protocol):
    """Who answers on the data port: this process (:class:`_InProcess`) or the serving processes
    (:class:`_Forked`). The rest of the worker (content sync, apps, control plane) is the same for both."""

    def changed(self, site: str | None) -> None:
        """A site's serving version flipped (or, with None, a snapshot was applied)."""

    async def before_flip(self, site: str, version: SiteVersion) -> None:
        """A site is about to serve ``version``: front ends keeping its answers hear of it first."""

    def figures(self) -> WorkerFigures: ...

    def counts(self) -> HttpCounts: ...

    async def start(self) -> None: ...

    async def stop(self) -> None: ...


class _InProcess:
    """``processes: 1``: this process answers the data port itself, and holds the front ends' version
    feeds."""

    def __init__(self, config: WorkerConfig, sync: ContentSync, apps: AppManager, log: Any) -> None:
        self._sync = sync
        self._hot = HotCache(config.hot_cache_bytes)
        self._feeds = VersionFeeds(self._current_tags, apps.access_log, log)
        # What the feeds were last told, by site.
        self._told: dict[str, str] = {}
        self._server = DataServer(
            config,
            sync.lookup,
            self._hot,
            divert=AppProxy(config, apps),
            failure=sync.failure,
            pending=sync.pending,
            arriving=sync.arriving,
            site_log=apps.access_log,
            feeds=self._feeds,
        )

    def _served_tag(self, site: str) -> str:
        return "" if site in self._sync.failed else tag_of(self._sync.lookup(site)[1])

    def _current_tags(self) -> dict[str, str]:
        return {site: self._served_tag(site) for site in self._sync.versions()}

    def changed(self, site: str | None) -> None:
        if site is not None:
            self._hot.purge(site)
            now = {site: self._served_tag(site)}
        else:
            now = self._current_tags()
            now.update({s: "" for s in self._told.keys() - now.keys()})
        news = {s: t for s, t in now.items() if self._told.get(s) != t}
        if news:
            self._told.update(news)
            self._feeds.tell(news)

    async def before_flip(self, site: str, version: SiteVersion) -> None:
        # (Told again once flipped, by changed(): a feed that joins meanwhile hears the old one.)
        await self._feeds.announce({site: "" if site in self._sync.failed else tag_of(version)})

    def figures(self) -> WorkerFigures:
        return WorkerFigures(connections=self._server.connections, hot_cache_bytes=self._hot.size)

    def counts(self) -> HttpCounts:
        return self._server.counts

    async def start(self) -> None:
        await self._server.start()

    async def stop(self) -> None:
        await self._server.stop()


class _Forked:
    """``processes: N > 1``: serving processes answer the data port from the versions handed over to
    them, and reach the apps (which stay here) through the app channel."""

    def __init__(
        self, config: WorkerConfig, sync: ContentSync, apps: AppManager, children: ServingProcesses
    ) -> None:
        self._config = config
        self._sync = sync
        self._children = children
        self._channel = AppChannel(apps, config.processes)
        self._handover: asyncio.TimerHandle | None = None

    def _hand_over(self) -> None:
        self._handover = None
        self._config.state_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_json(_handover_file(self._config), self._sync.serving_state(), mode=0o600)
        self._children.reload()

    def changed(self, site: str | None) -> None:
        if self._handover is None:  # one write for a burst of flips
            self._handover = asyncio.get_running_loop().call_later(0.005, self._hand_over)

    async def before_flip(self, site: str, version: SiteVersion) -> None:
        pass  # each serving process announces to its own feeds as it takes the handed-over versions

    def figures(self) -> WorkerFigures:
        dropped = self._channel.access_dropped
        return WorkerFigures(serving_pids=self._children.pids, access_lines_dropped=dropped or None)

    def counts(self) -> HttpCounts:
        # The serving processes' counts, summed when scraped.
        return read_counts(self._config.state_dir, self._children.pids)

    async def start(self) -> None:
        await self._channel.start()
        self._hand_over()
        clear_counts(self._config.state_dir)
        self._children.start()

    async def stop(self) -> None:
        await self._children.stop()
        await self._channel.stop()


async def _serve(
    config: WorkerConfig,
    stop: asyncio.Event,
    processes: int,
    data_side: Callable[[ContentSync, AppManager], _DataSide],
) -> None:
    """The worker's main process, whoever answers its data port."""
    log = get_logger("worker", host=config.host)

    def changed(site: str | None = None) -> None:
        if site is not None:
            apps.refresh(site)
        data.changed(site)

    # What apps must reach (content, their homes) lives where their own uids can pass through.
    root = apps_root(config)
    prepare_apps_root(config, root, log)
    sync = ContentSync(
        config,
        ContentCache(root),
        on_flip=changed,
        before_flip=lambda site, v: data.before_flip(site, v),
        running_on=lambda site: apps.versions_running(site),
    )
    # Dynamic sites' app processes, managed here (serving processes reach them through the channel).
    apps = AppManager(config, sync.lookup, root)
    data = data_side(sync, apps)

    async def apply(snapshot: WorkerSnapshot) -> None:
        # Every site entry was checked as the snapshot came; one that cannot be used fails alone.
        refused = {name: e.reason for name, e in snapshot.sites.items() if isinstance(e, Refused)}
        before = sync.failed
        failed = await sync.apply(snapshot, refused)
        apps.apply(snapshot, failed)
        for site, why in failed.items():
            if before.get(site) != why:
                log.bind(site=site).warning("cannot serve the site: %s", why)
        for site in before.keys() - failed.keys():
            log.bind(site=site).info("the site's entry is usable again")
        changed()

    def health() -> WorkerFigures:
        return WorkerFigures.merge(
            sync.figures(),
            WorkerFigures(processes=processes),
            apps.figures(),
            _degraded(sync.failed, apps.isolation_gaps() + _disk_gaps(root)),
            data.figures(),
        )

    plane = ControlPlane(config, WorkerSnapshot, apply, health=health, routes=app_routes(apps))
    plane.metrics.register(
        HttpCollector("worker", data.counts, top_n=config.metrics_top_sites, bytes_in=False)
    )
    plane.metrics.register(FiguresCollector(lambda: _worker_metrics(plane, sync, apps)))
    cold_starts = Histogram(
        "sitecloud_worker_app_cold_start_seconds",
        "From the request that woke an app to the app ready to answer it (installs included).",
        buckets=COLD_START_BUCKETS,
        registry=plane.metrics,
    )
    apps.observe_cold_start = cold_starts.observe
    await apps.start()
    # Last-known-good first: a restarted worker serves what it has on disk before anyone answers.
    await plane.load_last_known_good()
    await data.start()
    await plane.start()
    metering = WorkerUsageReporter(config, apps.metered, log)
    metering.start()
    # Startup's objects live as long as the process: keep the cyclic collector's full passes short.
    gc.collect()
    gc.freeze()
    sync.start()
    log.info("serving sites on %s:%s with %s process(es)", config.bind, config.data_port, processes)
    try:
        await stop.wait()
    finally:
        log.info("stopping: draining connections")
        await data.stop()
        await metering.stop()
        await apps.stop()
        await sync.stop()
        await plane.stop()


async def _serve_single(config: WorkerConfig, stop: asyncio.Event) -> None:
    await _serve(
        config,
        stop,
        1,
        lambda sync, apps: _InProcess(config, sync, apps, get_logger("worker", host=config.host)),
    )


async def _serve_main(config: WorkerConfig, stop: asyncio.Event, children: ServingProcesses) -> None:
    await _serve(config, stop, children.count, lambda sync, apps: _Forked(config, sync, apps, children))


def _worker_metrics(
    plane: ControlPlane[WorkerSnapshot], sync: ContentSync, apps: AppManager
) -> Iterator[Metric]:
    """Content and app figures, read when scraped."""
    content = sync.figures()
    yield GaugeMetricFamily("sitecloud_worker_sites", "Sites this worker holds.", value=content.sites or 0)
    yield GaugeMetricFamily(
        "sitecloud_worker_sites_synced",
        "Sites at the version they should be.",
        value=content.sites_synced or 0,
    )
    yield GaugeMetricFamily(
        "sitecloud_worker_content_cached_bytes", "Content held on disk.", value=content.bytes_cached or 0
    )
    figures = apps.figures()
    running = figures.apps_active or 0
    yield GaugeMetricFamily("sitecloud_worker_apps_running", "App processes running.", value=running)
    yield GaugeMetricFamily(
        "sitecloud_worker_apps_dynamic", "Dynamic sites (an app each).", value=figures.apps_dynamic or 0
    )
    yield GaugeMetricFamily(
        "sitecloud_worker_apps_max_running",
        "App processes allowed at once.",
        value=figures.apps_max_active or 0,
    )
    starts = crashes = kills = 0
    for name in plane.snapshot.sites if plane.snapshot else ():
        app = apps.dynamic(name)
        if app is not None:
            starts += app.starts
            crashes += app.crashes
            kills += app.memory_kills
    yield CounterMetricFamily("sitecloud_worker_app_starts", "App processes started.", value=starts)
    # Every start ends in a stop, but for the ones still running.
    yield CounterMetricFamily(
        "sitecloud_worker_app_stops", "App processes ended.", value=max(0, starts - running)
    )
    yield CounterMetricFamily("sitecloud_worker_app_crashes", "App processes that crashed.", value=crashes)
    yield CounterMetricFamily(
        "sitecloud_worker_app_memory_kills", "App processes killed at their memory limit.", value=kills
    )
    yield CounterMetricFamily(
        "sitecloud_worker_app_cpu_seconds",
        "CPU time used by apps.",
        value=sum((figures.app_cpu_seconds or {}).values()),
    )


def _disk_gaps(root: Path) -> list[str]:
    """Why the worker is degraded by its disk (content and apps' volumes), if it is nearly full."""
    space = disk_space(root)
    if not space.nearly_full:
        return []
    return [f"its disk is nearly full ({space.describe()}): new content may not fit; free or add disk space"]


def _degraded(failed: dict[str, str], gaps: list[str]) -> WorkerFigures:
    """Health figures that say degraded, with why, while any site of the snapshot cannot be served
    or the tenant wall has a gap (they override the control plane's "ready")."""
    if not failed and not gaps:
        return WorkerFigures()
    reasons = list(gaps)
    names = sorted(failed)
    if names:
        site_reason = f"{counted(len(names), 'site')} cannot be served: " + "; ".join(
            failed[n] for n in names[:3]
        )
        if len(names) > 3:
            site_reason += f"; and {len(names) - 3} more"
        reasons.append(site_reason)
    return WorkerFigures(
        status=HealthStatus.DEGRADED,
        reason="; ".join(reasons)[:500],
        failed_sites={n: failed[n] for n in names[:100]} if names else None,
    )


async def _serve_child(config: WorkerConfig, stop: asyncio.Event, index: int) -> None:
    """A serving process: the data port only, from the versions the main process hands over."""
    log = get_logger("worker", host=config.host, process=index)
    hot = HotCache(config.hot_cache_bytes)
    table: dict[str, SiteVersion | None] = {}
    failed: dict[str, str] = {}
    pending: set[str] = set()
    arriving: set[str] = set()

    def lookup(site: str) -> tuple[bool, SiteVersion | None]:
        if site not in table:
            return False, None
        return True, table[site]

    async def reload() -> None:
        with contextlib.suppress(FileNotFoundError):
            raw = await asyncio.to_thread(read_json, _handover_file(config))
            fresh: dict[str, SiteVersion | None] = {}
            fresh_failed: dict[str, str] = {}
            fresh_pending: set[str] = set()
            fresh_arriving: set[str] = set()
            for site, v in raw.items():
                if isinstance(v, dict) and v.get("pending"):
                    fresh[site] = None
                    fresh_pending.add(site)
                    if v.get("arriving"):
                        fresh_arriving.add(site)
                elif isinstance(v, dict):
                    fresh[site], fresh_failed[site] = None, str(v.get("failed", ""))
                else:
                    fresh[site] = (
                        SiteVersion(int(v[0]), str(v[1]), str(v[2]) if len(v) > 2 else "") if v else None
                    )
            moved = {
                site: tag_of(v) for site, v in fresh.items() if table.get(site) != v or site not in table
            }
            for site, v in list(fresh.items()):
                old = table.get(site)
                if v is not None and old is not None:
                    if v == old:
                        fresh[site] = old  # (with what it has read of its files)
                    else:
                        v.files.inherit(old.files)  # (changed in place: only its changes are read again)
            if table:
                # A flipped version's index is read here, in a thread, not by its first request.
                flipped = [v for site, v in fresh.items() if v is not None and site in moved]
                await asyncio.to_thread(lambda: [v.files.load() for v in flipped])
            moved.update({site: "" for site in table.keys() - fresh.keys()})
            if moved:
                # Front ends keeping answers hear of new versions before this process serves them.
                await feeds.announce(moved)
            for site, old in table.items():
                if fresh.get(site) != old:
                    hot.purge(site)
            table.clear()
            table.update(fresh)
            if moved:
                feeds.tell(moved)  # (a feed that joined meanwhile heard the old table)
            failed.clear()
            failed.update(fresh_failed)
            pending.clear()
            pending.update(fresh_pending)
            arriving.clear()
            arriving.update(fresh_arriving)

    # Dynamic sites: their apps are the main process's; requests for them go through its channel.
    # So do access lines (batched): the main process owns every site's log.
    remote = RemoteApps(channel_path(run_dir_for(apps_root(config))))

    def site_log(site: str) -> RemoteLog | None:
        return remote.log_of(site) if site in table else None

    feeds = VersionFeeds(lambda: {site: tag_of(v) for site, v in table.items()}, site_log, log)

    async def reload_all() -> None:
        await reload()
        try:
            await remote.reload()
        except SitecloudError as exc:
            log.warning("dynamic sites not known yet: %s", exc.message)

    stop_reloading = reload_on_sighup(reload_all)
    await reload_all()
    server = DataServer(
        config,
        lookup,
        hot,
        divert=AppProxy(config, remote),
        failure=failed.get,
        pending=pending.__contains__,
        arriving=arriving.__contains__,
        site_log=site_log,
        feeds=feeds,
    )
    await server.start()
    counts = CountsWriter(config.state_dir, lambda: server.counts, keep_sites=4 * config.metrics_top_sites)
    counts.start()
    gc.collect()
    gc.freeze()
    try:
        await stop.wait()
    finally:
        stop_reloading()
        await server.stop()
        await remote.close()
        await counts.stop()
        log.info("serving process stopped")


WORKER = PreforkedRole(single=_serve_single, main=_serve_main, serving=_serve_child)
