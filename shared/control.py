"""The control endpoint every role runs: health, and the versioned config the controller pushes.

The controller ``PUT``s ``/v1/config`` with a snapshot ``{"version": N, ...}``. The role applies it,
then persists it as its last-known-good config, so that after a restart it serves from it at once,
whether or not the controller is there. ``GET /v1/health`` answers any cloud role; ``GET /metrics``
(Prometheus text, see :mod:`shared.metrics`) the controller and management.
"""

from __future__ import annotations

import os
import time
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web

from shared.config import RoleConfig
from shared.errors import InvalidInput
from shared.files import atomic_write_json, read_json
from shared.internal import error_middleware, require_role
from shared.listeners import listener, listening_ports
from shared.logs import get_logger
from shared.metrics import metrics_handler, role_registry
from shared.tls import server_context
from shared.version import CODE_VERSION

__all__ = ["ControlPlane", "Snapshot"]

Snapshot = dict[str, Any]
ApplyConfig = Callable[[Snapshot], Awaitable[None]]
HealthFigures = Callable[[], dict[str, Any]]


class ControlPlane:
    """Owns a role's pushed config and its control listener (an mTLS aiohttp app)."""

    def __init__(
        self,
        config: RoleConfig,
        apply: ApplyConfig,
        *,
        health: HealthFigures | None = None,
        routes: list[web.RouteDef] | None = None,
        client_max_size: int = 16 * 1024 * 1024,
        read_bufsize: int = 64 * 1024,
    ) -> None:
        self.config = config
        self._apply = apply
        self._health = health
        self._routes = routes or []
        self._client_max_size = client_max_size
        # What a request body may hold buffered before reading from the socket pauses.
        self._read_bufsize = read_bufsize
        self._path = config.state_dir / "config.json"
        self._log = get_logger(config.role, host=config.host)
        self._started = time.time()
        self.snapshot: Snapshot | None = None
        self._runner: web.AppRunner | None = None
        self._metrics_runner: web.AppRunner | None = None
        # This process's metrics: roles register their collectors on it.
        self.metrics = role_registry(config.role, config.host, lambda: self.config_version)

    @property
    def config_version(self) -> int:
        return int(self.snapshot["version"]) if self.snapshot else 0

    async def load_last_known_good(self) -> bool:
        """Apply the persisted snapshot, if any; True when the role has a config to serve from."""
        if not self._path.exists():
            return False
        snapshot = read_json(self._path)
        await self._apply(snapshot)
        self.snapshot = snapshot
        self._log.info("serving last-known-good config version %s", self.config_version)
        return True

    async def accept(self, snapshot: Snapshot) -> None:
        version = snapshot.get("version")
        if not isinstance(version, int) or version < 1:
            raise InvalidInput("config snapshot needs an integer 'version' >= 1")
        if version < self.config_version:
            # A stale push (an older controller, a retry that lost a race): keep what is newer.
            return
        await self._apply(snapshot)
        atomic_write_json(self._path, snapshot, mode=0o600)
        self.snapshot = snapshot
        self._log.info("applied config version %s", version)

    def health(self) -> dict[str, Any]:
        figures = self._health() if self._health else {}
        return {
            "role": self.config.role,
            "host": self.config.host,
            "status": "ready",
            "code_version": CODE_VERSION,
            "config_version": self.config_version,
            "pid": os.getpid(),
            "uptime": round(time.time() - self._started, 1),
            # The real ports (a config may say 0, or a supervisor may hold others): name -> port.
            "listeners": listening_ports(),
            **figures,
        }

    async def _get_health(self, request: web.Request) -> web.Response:
        return web.json_response(self.health())

    async def _put_config(self, request: web.Request) -> web.Response:
        require_role(request, "controller")
        snapshot = await request.json()
        if not isinstance(snapshot, dict):
            raise InvalidInput("config snapshot must be a JSON object")
        await self.accept(snapshot)
        return web.json_response({"config_version": self.config_version})

    def make_app(self) -> web.Application:
        app = web.Application(middlewares=[error_middleware], client_max_size=self._client_max_size)
        app.router.add_get("/v1/health", self._get_health)
        app.router.add_put("/v1/config", self._put_config)
        app.router.add_get("/metrics", metrics_handler(self.metrics))
        app.add_routes(self._routes)
        return app

    async def _start_metrics_port(self) -> None:
        """The optional plain-HTTP /metrics (no client certificate), for a Prometheus scraper."""
        app = web.Application(middlewares=[error_middleware])
        app.router.add_get("/metrics", metrics_handler(self.metrics, mtls=False))
        self._metrics_runner = web.AppRunner(app, access_log=None, shutdown_timeout=2)
        await self._metrics_runner.setup()
        sock = listener("metrics", self.config.metrics_bind, self.config.metrics_port)
        await web.SockSite(self._metrics_runner, sock).start()
        self._log.info("metrics over plain HTTP on %s:%s", self.config.metrics_bind, sock.getsockname()[1])

    async def start(self) -> None:
        self._runner = web.AppRunner(
            self.make_app(), access_log=None, shutdown_timeout=5, read_bufsize=self._read_bufsize
        )
        await self._runner.setup()
        sock = listener("control", self.config.bind, self.config.control_port)
        site = web.SockSite(self._runner, sock, ssl_context=server_context(self.config))
        await site.start()
        if self.config.metrics_port:
            await self._start_metrics_port()

    async def stop(self) -> None:
        if self._metrics_runner is not None:
            await self._metrics_runner.cleanup()
            self._metrics_runner = None
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
