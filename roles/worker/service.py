"""The worker process: control plane, content sync and data server, started and stopped in order."""

from __future__ import annotations

import asyncio
from typing import Any

from roles.worker._cache import ContentCache
from roles.worker._static import HotCache
from roles.worker.config import WorkerConfig
from roles.worker.content import ContentSync
from roles.worker.server import DataServer
from shared.control import ControlPlane
from shared.logs import get_logger

__all__ = ["serve"]


async def serve(config: WorkerConfig, stop: asyncio.Event) -> None:
    log = get_logger("worker", host=config.host)
    hot = HotCache(config.hot_cache_bytes)
    sync = ContentSync(config, ContentCache(config.home), on_flip=hot.purge)
    server = DataServer(config, sync.lookup, hot)

    def health() -> dict[str, Any]:
        return {**sync.figures(), "connections": server.connections, "hot_cache_bytes": hot.size}

    plane = ControlPlane(config, sync.apply, health=health)
    # Last-known-good first: a restarted worker serves what it has on disk before anyone answers.
    await plane.load_last_known_good()
    await server.start()
    await plane.start()
    sync.start()
    log.info("serving sites on %s:%s", config.bind, config.data_port)
    try:
        await stop.wait()
    finally:
        log.info("stopping: draining connections")
        await server.stop()
        await sync.stop()
        await plane.stop()
