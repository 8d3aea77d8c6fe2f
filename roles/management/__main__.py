"""``python -m roles.management --config role.json``: the public REST API and the control endpoint."""

from __future__ import annotations

import asyncio

from aiohttp import web

from roles.management._input import ProtocolErrorLog
from roles.management.app import make_app
from roles.management.config import ManagementConfig
from roles.management.service import ManagementService
from shared.contracts.health import ManagementFigures
from shared.contracts.snapshots import ManagementSnapshot
from shared.control import ControlPlane
from shared.db import Database
from shared.listeners import listener
from shared.logs import get_logger
from shared.process import role_main
from shared.tls import public_server_context


async def serve(config: ManagementConfig, stop: asyncio.Event) -> None:
    log = get_logger(config.role, host=config.host)
    if not config.db_url:
        raise SystemExit("management needs db_url in its role.json")
    db = Database(config.db_url)
    service = ManagementService(config, db)
    control = ControlPlane(
        config,
        ManagementSnapshot,
        service.apply_snapshot,
        health=lambda: ManagementFigures(api_port=config.api_port),
    )
    runner = web.AppRunner(make_app(service), access_log=None, shutdown_timeout=5, logger=ProtocolErrorLog())
    try:
        await control.load_last_known_good()
        await control.start()
        await service.start()
        await runner.setup()
        site = web.SockSite(
            runner,
            listener("api", config.bind, config.api_port),
            ssl_context=public_server_context(config.cert_file, config.key_file),
        )
        await site.start()
        log.info("management API and portals on https://%s:%s/", config.bind, config.api_port)
        await stop.wait()
        log.info("stopping")
    finally:
        service.end_follows()
        await runner.cleanup()
        await control.stop()
        await service.close()
        db.dispose()


if __name__ == "__main__":
    role_main(ManagementConfig, serve)
