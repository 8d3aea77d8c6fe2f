"""The control endpoint every role runs: health, and the versioned config the controller pushes.

The controller ``PUT``s ``/v1/config`` with a snapshot (:mod:`shared.contracts.snapshots`), parsed
here once into the role's snapshot type. The role applies it, then the body is persisted as its
last-known-good config, so that after a restart it serves from it at once, whether or not the
controller is there. ``GET /v1/health`` answers any cloud role (:mod:`shared.contracts.health`);
``GET /metrics`` (Prometheus text, see :mod:`shared.metrics`) the controller and management.
A role may also serve *lanes* on the same port: protocols other than HTTP that a client asks for by
ALPN (the fileserver's put lane, :mod:`shared.contracts.putlane`).
"""

from __future__ import annotations

import asyncio
import gc
import json
import os
import socket
import ssl
import time
from collections.abc import Awaitable, Callable, Mapping
from typing import Generic, TypeVar

from aiohttp import web

from shared.config import RoleConfig
from shared.contracts.health import HEALTHS, RoleFigures, RoleHealth
from shared.contracts.snapshots import ConfigAck, Snapshot
from shared.errors import InvalidInput
from shared.files import atomic_write_bytes
from shared.internal import error_middleware, require_role
from shared.listeners import listener, listening_ports
from shared.logs import get_logger
from shared.metrics import metrics_handler, role_registry
from shared.pki import certificate_expiry, expiry_warning
from shared.states import HealthStatus
from shared.tls import server_context
from shared.version import CODE_VERSION

__all__ = ["ControlPlane", "parse_snapshot"]

S = TypeVar("S", bound=Snapshot)
HealthFigures = Callable[[], RoleFigures]


def parse_snapshot(kind: type[S], raw: bytes, *, what: str) -> S:
    """Parse a pushed snapshot with the cyclic collector paused: it holds no cycles, but the objects
    of a big one (100k sites) would have the collector walk them over and over while they are made,
    which costs more than the parse itself.

    The stdlib decodes the JSON: pydantic's own parser refuses a lone surrogate escape, which would
    refuse the whole snapshot for one site's bad value instead of that one site."""
    paused = gc.isenabled()
    gc.disable()
    try:
        try:
            decoded = json.loads(raw)
        except ValueError as exc:
            raise InvalidInput(f"{what} is not JSON: {exc}") from None
        return kind.parse(decoded, what=what)
    finally:
        if paused:
            gc.enable()


LaneFactory = Callable[[], asyncio.Protocol]


class _Dispatch(asyncio.Protocol):
    """Stands in for a new connection's protocol until its TLS handshake is done, then hands the
    connection to the protocol of the ALPN it selected: a lane's, or aiohttp's for HTTP."""

    def __init__(self, http: Callable[[], asyncio.BaseProtocol], lanes: Mapping[str, LaneFactory]) -> None:
        self._http = http
        self._lanes = lanes

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        ssl_object = transport.get_extra_info("ssl_object")
        alpn = ssl_object.selected_alpn_protocol() if ssl_object is not None else None
        lane = self._lanes.get(alpn) if alpn is not None else None
        protocol = lane() if lane is not None else self._http()
        transport.set_protocol(protocol)
        protocol.connection_made(transport)


class _Site(web.SockSite):
    """aiohttp's site on a held socket, with the lanes beside HTTP on the same port."""

    def __init__(
        self,
        runner: web.AppRunner,
        sock: socket.socket,
        ssl_context: ssl.SSLContext,
        lanes: Mapping[str, LaneFactory],
    ) -> None:
        super().__init__(runner, sock, ssl_context=ssl_context)
        self._lanes = lanes

    async def start(self) -> None:
        await web.BaseSite.start(self)
        http = self._runner.server
        assert http is not None
        self._server = await asyncio.get_running_loop().create_server(
            lambda: _Dispatch(http, self._lanes),
            sock=self._sock,
            ssl=self._ssl_context,
            backlog=self._backlog,
        )


class ControlPlane(Generic[S]):
    """Owns a role's pushed config (of type ``kind``) and its control listener (an mTLS aiohttp app)."""

    def __init__(
        self,
        config: RoleConfig,
        kind: type[S],
        apply: Callable[[S], Awaitable[None]],
        *,
        health: HealthFigures | None = None,
        routes: list[web.RouteDef] | None = None,
        client_max_size: int = 16 * 1024 * 1024,
        read_bufsize: int = 64 * 1024,
        lanes: Mapping[str, LaneFactory] | None = None,
    ) -> None:
        self.config = config
        self._kind = kind
        self._apply = apply
        self._health = health
        self._routes = routes or []
        self._client_max_size = client_max_size
        # What a request body may hold buffered before reading from the socket pauses.
        self._read_bufsize = read_bufsize
        # Protocols other than HTTP on the control port, by the ALPN name a client offers for them.
        self._lanes = dict(lanes or {})
        self._path = config.state_dir / "config.json"
        self._log = get_logger(config.role, host=config.host)
        self._started = time.time()
        self.snapshot: S | None = None
        self._accepting = asyncio.Lock()
        self._runner: web.AppRunner | None = None
        self._metrics_runner: web.AppRunner | None = None
        # This process's metrics: roles register their collectors on it.
        self.metrics = role_registry(config.role, config.host, lambda: self.config_version)
        # When the certificate it serves and calls with stops being valid (read once: a new one comes
        # with a new process, from `role repair`, `upgrade` or a new `sitecloud up`).
        self._cert_expires = certificate_expiry(config.cert_file)

    @property
    def config_version(self) -> int:
        return self.snapshot.version if self.snapshot else 0

    async def _parse(self, raw: bytes) -> S:
        # Off the loop: a snapshot of many thousand sites takes a moment to check.
        return await asyncio.to_thread(parse_snapshot, self._kind, raw, what=f"{self.config.role} snapshot")

    async def load_last_known_good(self) -> bool:
        """Apply the persisted snapshot, if any; True when the role has a config to serve from."""
        if not self._path.exists():
            return False
        try:
            snapshot = await self._parse(await asyncio.to_thread(self._path.read_bytes))
        except InvalidInput as exc:
            # Written by a release with looser checks: wait for the controller's push rather than die.
            self._log.warning("the last-known-good config cannot be used: %s", exc)
            return False
        await self._apply(snapshot)
        self.snapshot = snapshot
        self._log.info("serving last-known-good config version %s", self.config_version)
        return True

    async def accept(self, raw: bytes) -> None:
        """Take a pushed snapshot (its JSON body): :class:`InvalidInput` when it cannot be used."""
        snapshot = await self._parse(raw)
        # Parses run side by side; applies one at a time, so an older push that was slower to parse
        # never replaces a newer one.
        async with self._accepting:
            if snapshot.version < self.config_version:
                # A stale push (an older controller, a retry that lost a race): keep what is newer.
                return
            await self._apply(snapshot)
            # The body as it came: a restart reads it with the same checks (and a newer role's fields).
            atomic_write_bytes(self._path, raw, mode=0o600)
            self.snapshot = snapshot
        self._log.info("applied config version %s", snapshot.version)

    def health(self) -> RoleHealth:
        common = {
            "role": self.config.role,
            "host": self.config.host,
            "code_version": CODE_VERSION,
            "config_version": self.config_version,
            "pid": os.getpid(),
            "uptime": round(time.time() - self._started, 1),
            "listeners": listening_ports(),
        }
        figures = self._health() if self._health else RoleFigures()
        answer = HEALTHS.get(self.config.role, RoleHealth).answer(common, figures)
        warning = expiry_warning(self._cert_expires, self.config.role, self.config.host)
        if warning is None:
            return answer
        reason = (
            f"{answer.reason}; {warning}"
            if answer.status == HealthStatus.DEGRADED and answer.reason
            else warning
        )
        return answer.model_copy(update={"status": HealthStatus.DEGRADED, "reason": reason[:500]})

    async def _get_health(self, request: web.Request) -> web.Response:
        return web.json_response(self.health().to_json())

    async def _put_config(self, request: web.Request) -> web.Response:
        require_role(request, "controller")
        await self.accept(await request.read())
        return web.json_response(ConfigAck(config_version=self.config_version).to_json())

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
        tls = server_context(self.config)
        site: web.SockSite
        if self._lanes:
            tls.set_alpn_protocols([*self._lanes, "http/1.1"])
            site = _Site(self._runner, sock, tls, self._lanes)
        else:
            site = web.SockSite(self._runner, sock, ssl_context=tls)
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
