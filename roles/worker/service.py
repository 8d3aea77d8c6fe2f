"""The worker process: control plane, content sync and data server, started and stopped in order.

With ``processes: N > 1`` the main process keeps the control plane, the content sync and the sites' apps,
and N serving processes (see :mod:`shared.prefork`) answer on the data port's shared listener; they
reach the apps through the main process's app channel (``roles/worker/apps/_channel.py``). After each snapshot and
each version flip the main process writes which version directory serves each site to
``state/serving.json`` and sends SIGHUP; each serving process swaps its lookup table and drops its hot
cache for the sites that moved.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from prometheus_client import Histogram
from prometheus_client.metrics_core import CounterMetricFamily, GaugeMetricFamily, Metric

from roles.worker._cache import ContentCache, SiteVersion
from roles.worker._feed import VersionFeeds, tag_of
from roles.worker._layout import apps_root, prepare_apps_root
from roles.worker._static import HotCache
from roles.worker._usage import WorkerUsageReporter
from roles.worker.apps import AppManager, AppProxy, app_routes
from roles.worker.apps._channel import AppChannel, RemoteApps, channel_path
from roles.worker.apps._manager import run_dir_for
from roles.worker.config import WorkerConfig
from roles.worker.content import ContentSync
from roles.worker.server import DataServer
from shared.control import ControlPlane, Snapshot
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
from shared.prefork import (
    ServingProcesses,
    reload_on_sighup,
    serving_index,
    take_processes_flag,
    watch_parent,
)

__all__ = ["serve"]

# Seconds: a warm sandbox starts in tens of milliseconds, a first requirements install in tens of seconds.
COLD_START_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)


def _handover_file(config: WorkerConfig) -> Path:
    return config.state_dir / "serving.json"


async def serve(config: WorkerConfig, stop: asyncio.Event) -> None:
    index = serving_index()
    if index is not None:
        await _serve_child(config, stop, index)
        return
    processes = take_processes_flag(config.processes)
    log = get_logger("worker", host=config.host)
    hot = HotCache(config.hot_cache_bytes)
    children = (
        ServingProcesses(config, processes, log, stop_timeout=config.drain_timeout + 2)
        if processes > 1
        else None
    )
    loop = asyncio.get_running_loop()
    handover: list[asyncio.TimerHandle | None] = [None]

    def hand_over() -> None:
        handover[0] = None
        config.state_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_json(_handover_file(config), sync.serving_state(), mode=0o600)
        if children is not None:
            children.reload()

    # What front ends' version feeds were last told, by site (one serving process: this one).
    told: dict[str, str] = {}

    def served_tag(site: str) -> str:
        return "" if site in sync.failed else tag_of(sync.lookup(site)[1])

    def current_tags() -> dict[str, str]:
        return {site: served_tag(site) for site in sync.versions()}

    def tell(site: str | None) -> None:
        assert feeds is not None
        if site is not None:
            now = {site: served_tag(site)}
        else:
            now = current_tags()
            now.update({s: "" for s in told.keys() - now.keys()})
        news = {s: t for s, t in now.items() if told.get(s) != t}
        if news:
            told.update(news)
            feeds.tell(news)

    async def before_flip(site: str, version: SiteVersion) -> None:
        if feeds is not None:
            # (Told again once flipped, by changed(): a feed that joins meanwhile hears the old one.)
            await feeds.announce({site: "" if site in sync.failed else tag_of(version)})

    def changed(site: str | None = None) -> None:
        if site is not None:
            hot.purge(site)
            apps.refresh(site)
        if feeds is not None:
            tell(site)
        if children is not None and handover[0] is None:
            handover[0] = loop.call_later(0.005, hand_over)  # one write for a burst of flips

    # What apps must reach (content, their homes) lives where their own uids can pass through.
    root = apps_root(config)
    prepare_apps_root(config, root, log)
    sync = ContentSync(config, ContentCache(root), on_flip=changed, before_flip=before_flip)
    # Dynamic sites' app processes, managed here; serving processes reach them through the channel.
    apps = AppManager(config, sync.lookup, root)
    # With serving processes, they hold the front ends' feeds (from the versions handed over).
    feeds = VersionFeeds(current_tags, apps.access_log, log) if children is None else None
    divert = AppProxy(config, apps) if children is None else None
    channel = AppChannel(apps) if children is not None else None
    server = (
        DataServer(
            config,
            sync.lookup,
            hot,
            divert=divert,
            failure=sync.failure,
            pending=sync.pending,
            site_log=apps.access_log,
            feeds=feeds,
        )
        if children is None
        else None
    )

    async def apply(snapshot: Snapshot) -> None:
        # Every site entry is checked before any of it applies; one that cannot be used fails alone.
        specs, failed = apps.check(snapshot)
        before = sync.failed
        failed = await sync.apply(snapshot, failed)
        apps.apply(snapshot, specs, failed)
        for site, why in failed.items():
            if before.get(site) != why:
                log.bind(site=site).warning("cannot serve the site: %s", why)
        for site in before.keys() - failed.keys():
            log.bind(site=site).info("the site's entry is usable again")
        changed()

    def health() -> dict[str, Any]:
        figures = {
            **sync.figures(),
            "processes": processes,
            **apps.figures(),
            **_degraded(sync.failed, apps.isolation_gaps()),
        }
        if server is not None:
            figures.update(connections=server.connections, hot_cache_bytes=hot.size)
        if children is not None:
            figures["serving_pids"] = children.pids
        return figures

    plane = ControlPlane(config, apply, health=health, routes=app_routes(apps))

    def counts() -> HttpCounts:
        # With serving processes, theirs (summed when scraped); otherwise this process's own.
        if server is not None:
            return server.counts
        return read_counts(config.state_dir, children.pids if children is not None else [])

    plane.metrics.register(HttpCollector("worker", counts, top_n=config.metrics_top_sites, bytes_in=False))
    plane.metrics.register(FiguresCollector(lambda: _worker_metrics(plane, sync, apps)))
    cold_starts = Histogram(
        "sitecloud_worker_app_cold_start_seconds",
        "From the request that woke an app to the app ready to answer it (installs included).",
        buckets=COLD_START_BUCKETS,
        registry=plane.metrics,
    )
    apps.observe_cold_start = cold_starts.observe
    await apps.start()
    if channel is not None:
        await channel.start()
    # Last-known-good first: a restarted worker serves what it has on disk before anyone answers.
    await plane.load_last_known_good()
    if server is not None:
        await server.start()
    if children is not None:
        hand_over()
        clear_counts(config.state_dir)
        children.start()
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
        if server is not None:
            await server.stop()
        if children is not None:
            await children.stop()
        if channel is not None:
            await channel.stop()
        await metering.stop()
        await apps.stop()
        await sync.stop()
        await plane.stop()


def _worker_metrics(plane: ControlPlane, sync: ContentSync, apps: AppManager) -> Iterator[Metric]:
    """Content and app figures, read when scraped."""
    content = sync.figures()
    yield GaugeMetricFamily("sitecloud_worker_sites", "Sites this worker holds.", value=content["sites"])
    yield GaugeMetricFamily(
        "sitecloud_worker_sites_synced", "Sites at the version they should be.", value=content["sites_synced"]
    )
    yield GaugeMetricFamily(
        "sitecloud_worker_content_cached_bytes", "Content held on disk.", value=content["bytes_cached"]
    )
    figures = apps.figures()
    running = int(figures["apps_active"])
    yield GaugeMetricFamily("sitecloud_worker_apps_running", "App processes running.", value=running)
    yield GaugeMetricFamily(
        "sitecloud_worker_apps_dynamic", "Dynamic sites (an app each).", value=figures["apps_dynamic"]
    )
    yield GaugeMetricFamily(
        "sitecloud_worker_apps_max_running",
        "App processes allowed at once.",
        value=figures["apps_max_active"],
    )
    starts = crashes = kills = 0
    sites = plane.snapshot.get("sites") if plane.snapshot else None
    for name in sites if isinstance(sites, dict) else ():
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
        value=sum(figures["app_cpu_seconds"].values()),
    )


def _degraded(failed: dict[str, str], gaps: list[str]) -> dict[str, Any]:
    """Health figures that say degraded, with why, while any site of the snapshot cannot be served
    or the tenant wall has a gap (they override the control plane's "ready")."""
    if not failed and not gaps:
        return {}
    reasons = list(gaps)
    names = sorted(failed)
    if names:
        site_reason = f"{len(names)} site(s) cannot be served: " + "; ".join(failed[n] for n in names[:3])
        if len(names) > 3:
            site_reason += f"; and {len(names) - 3} more"
        reasons.append(site_reason)
    figures: dict[str, Any] = {"status": "degraded", "reason": "; ".join(reasons)[:500]}
    if names:
        figures["failed_sites"] = {n: failed[n] for n in names[:100]}
    return figures


async def _serve_child(config: WorkerConfig, stop: asyncio.Event, index: int) -> None:
    """A serving process: the data port only, from the versions the main process hands over."""
    log = get_logger("worker", host=config.host, process=index)
    hot = HotCache(config.hot_cache_bytes)
    table: dict[str, SiteVersion | None] = {}
    failed: dict[str, str] = {}
    pending: set[str] = set()

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
            for site, v in raw.items():
                if isinstance(v, dict) and v.get("pending"):
                    fresh[site] = None
                    fresh_pending.add(site)
                elif isinstance(v, dict):
                    fresh[site], fresh_failed[site] = None, str(v.get("failed", ""))
                else:
                    fresh[site] = (
                        SiteVersion(int(v[0]), str(v[1]), str(v[2]) if len(v) > 2 else "") if v else None
                    )
            moved = {
                site: tag_of(v) for site, v in fresh.items() if table.get(site) != v or site not in table
            }
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

    feeds = VersionFeeds(lambda: {site: tag_of(v) for site, v in table.items()}, lambda _: None, log)
    # Dynamic sites: their apps are the main process's; requests for them go through its channel.
    remote = RemoteApps(channel_path(run_dir_for(apps_root(config))))

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
        feeds=feeds,
    )
    await server.start()
    counts = CountsWriter(config.state_dir, lambda: server.counts, keep_sites=4 * config.metrics_top_sites)
    counts.start()
    gc.collect()
    gc.freeze()
    orphan_guard = watch_parent(stop)
    try:
        await stop.wait()
    finally:
        orphan_guard.cancel()
        stop_reloading()
        await server.stop()
        await remote.close()
        await counts.stop()
        log.info("serving process stopped")
