"""``python -m roles.fileserver --config <home>/role.json``: the versioned content store."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

from prometheus_client.metrics_core import CounterMetricFamily, GaugeMetricFamily, Metric

from roles.fileserver._api import content_routes
from roles.fileserver._lane import PutLanes
from roles.fileserver.config import FileserverConfig
from roles.fileserver.store import ContentStore
from shared.contracts.putlane import PUT_LANE_ALPN
from shared.contracts.snapshots import FileserverSnapshot
from shared.control import ControlPlane
from shared.logs import get_logger
from shared.metrics import FiguresCollector
from shared.process import role_main

__all__ = ["serve"]

# Commit bodies list every file of a web deploy; uploads stream and are not bound by this.
_MAX_BODY = 64 * 1024 * 1024


def _metrics(store: ContentStore) -> Iterator[Metric]:
    figures = store.health()
    yield GaugeMetricFamily("sitecloud_fileserver_sites", "Sites stored.", value=figures.sites or 0)
    yield GaugeMetricFamily(
        "sitecloud_fileserver_stored_bytes",
        "Bytes of the sites' newest versions.",
        value=figures.total_bytes or 0,
    )
    yield CounterMetricFamily("sitecloud_fileserver_commits", "Versions committed.", value=store.commits)
    yield CounterMetricFamily(
        "sitecloud_fileserver_blobs_stored", "Blobs uploaded.", value=store.blobs_received
    )
    yield CounterMetricFamily(
        "sitecloud_fileserver_blobs_stored_bytes", "Bytes of blobs uploaded.", value=store.blob_bytes_received
    )
    yield GaugeMetricFamily(
        "sitecloud_fileserver_feed_seq", "The change feed's sequence number.", value=figures.seq or 0
    )
    yield GaugeMetricFamily(
        "sitecloud_fileserver_disk_free_bytes",
        "Free bytes of the disk content is stored on.",
        value=figures.disk_free_bytes or 0,
    )
    yield GaugeMetricFamily(
        "sitecloud_fileserver_disk_bytes",
        "Size of the disk content is stored on.",
        value=figures.disk_bytes or 0,
    )


async def serve(config: FileserverConfig, stop: asyncio.Event) -> None:
    log = get_logger(config.role, host=config.host)
    store = ContentStore(config)
    await store.open()
    lanes = PutLanes(store, role=config.role, host=config.host)
    plane = ControlPlane(
        config,
        FileserverSnapshot,
        store.apply_snapshot,
        health=store.health,
        routes=content_routes(store),
        client_max_size=_MAX_BODY,
        # Big uploads stream in: a deeper buffer pauses the socket less often.
        read_bufsize=4 * 1024 * 1024,
        lanes={PUT_LANE_ALPN: lanes.protocol},
    )
    plane.metrics.register(FiguresCollector(lambda: _metrics(store)))
    await plane.load_last_known_good()
    await plane.start()
    upkeep = asyncio.create_task(store.maintain(stop))
    log.info("serving content on port %s", config.control_port)
    try:
        await stop.wait()
    finally:
        log.info("stopping")
        # Long polls return at once instead of holding the shutdown for their full wait.
        store.feed.stop_waiting()
        await plane.stop()
        await lanes.close()
        # The upkeep ends its round first (stop is set): a checkpoint it is in the middle of would
        # otherwise make the store's own last one a no-op, and its cancel leave the journal unfolded.
        stop.set()
        await upkeep
        await store.close()


if __name__ == "__main__":
    role_main(FileserverConfig, serve)
