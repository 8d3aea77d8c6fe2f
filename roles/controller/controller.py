"""The controller: brings the cloud up on its fabric, keeps every role configured, watches health.

Reconciliation is level-triggered: each pass reads the desired state (DB generation), places sites
on workers, and pushes the snapshot of that generation to every role that has not acknowledged it.
Management nudges it after a change; a timer catches everything else (a restarted role, a failed push).
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from aiohttp import web
from sqlalchemy import select

from roles.controller.config import CloudConfig
from roles.controller.desired import DesiredState, RoleEndpoint, place_sites, read_desired, snapshots_for
from roles.controller.fabric.base import FabricProvider, RoleSpec
from roles.controller.fabric.local import LOCAL_HOST, LocalFabric
from roles.controller.home import LOCAL_ROLES, CloudHome
from shared.db import Database, Host, Role, bump_generation
from shared.errors import SitecloudError
from shared.internal import InternalClient, error_middleware, require_role
from shared.logs import get_logger
from shared.tls import server_context

__all__ = ["Controller"]

_RECONCILE_EVERY = 2.0
_UNHEALTHY_AFTER = 3


@dataclass
class RoleObservation:
    """What the controller last saw of one role; written to the DB when it changes."""

    state: str = "Starting"
    reason: str = ""
    code_version: str = ""
    config_version: int = 0
    last_heartbeat: dt.datetime | None = None
    failures: int = 0
    ever_healthy: bool = False


class Controller:
    def __init__(self, config: CloudConfig, *, progress: Callable[[str], None] = lambda _: None) -> None:
        self.config = config
        self.home = CloudHome(config)
        self.db = Database(config.database_url)
        self.fabric: FabricProvider = LocalFabric(self.home.logs_dir, address="localhost")
        self._progress = progress
        self._log = get_logger("controller", host=LOCAL_HOST)
        self._nudge = asyncio.Event()
        self._observed: dict[int, RoleObservation] = {}
        self._acked: dict[int, int] = {}
        self._desired: DesiredState | None = None
        self._client: InternalClient | None = None
        self._runner: web.AppRunner | None = None
        self._roles: dict[int, RoleEndpoint] = {}

    # -- lifecycle --------------------------------------------------------------------------------

    async def run(self, stop: asyncio.Event) -> None:
        started = time.monotonic()
        await asyncio.to_thread(self._prepare)
        identity = self.home.controller_identity
        self._client = InternalClient(identity, timeout=10)
        await self._start_api()
        launcher = self.fabric.launcher(LOCAL_HOST)
        try:
            for kind in LOCAL_ROLES:
                self._progress(f"starting {kind}")
                await launcher.start(
                    RoleSpec(kind, LOCAL_HOST, self.home.role_home(kind), dict(self.config.extra_env))
                )
            tasks = [
                asyncio.create_task(self._reconcile_loop(stop), name="reconcile"),
                asyncio.create_task(self._health_loop(stop), name="health"),
            ]
            await self._wait_ready(stop, timeout=60)
            if not stop.is_set():
                self.home.write_endpoints()
                self._progress(f"ready in {time.monotonic() - started:.1f}s")
            await stop.wait()
            for task in tasks:
                task.cancel()
            for task in tasks:
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        finally:
            self._progress("stopping roles")
            await launcher.stop_all()
            await self._stop_api()
            if self._client is not None:
                await self._client.close()
            await asyncio.to_thread(self._mark_stopped)
            self.db.dispose()

    def _prepare(self) -> None:
        self.home.prepare()
        self.db.migrate()
        self.home.ensure_admin_token(self.db)
        self._register_local_roles()

    def _register_local_roles(self) -> None:
        """The local host and its role rows, with the ports this home uses."""
        ports = self.home.internal_ports
        with self.db.session() as session:
            host = session.scalar(select(Host).where(Host.name == LOCAL_HOST))
            if host is None:
                host = Host(name=LOCAL_HOST, fabric="local", address="localhost")
                session.add(host)
                session.flush()
            for kind in LOCAL_ROLES:
                role = session.scalar(select(Role).where(Role.kind == kind, Role.host_id == host.id))
                if role is None:
                    role = Role(kind=kind, host_id=host.id, control_port=ports[kind])
                    session.add(role)
                role.control_port = ports[kind]
                role.ports = self._public_ports(kind)
                role.state, role.reason = "Starting", ""
                role.config_version = 0
            # Ports or hosts may have moved since the last run: every role gets a fresh snapshot.
            bump_generation(session)

    def _public_ports(self, kind: str) -> dict[str, Any]:
        c = self.config
        return {
            "frontend": {"http": c.http_port, "https": c.https_port},
            "worker": {"data": self.home.internal_ports["worker_data"]},
            "publisher": {"ftp": c.ftp_port, "deploy": c.deploy_port},
            "management": {"api": c.api_port},
        }.get(kind, {})

    def _mark_stopped(self) -> None:
        with self.db.session() as session:
            for role in session.scalars(select(Role)):
                role.state, role.reason = "Stopped", ""

    async def _wait_ready(self, stop: asyncio.Event, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        reported: set[int] = set()
        while not stop.is_set() and time.monotonic() < deadline:
            desired = self._desired
            if desired is not None and self._roles:
                for rid, obs in self._observed.items():
                    if obs.state == "Ready" and rid not in reported and rid in self._roles:
                        reported.add(rid)
                        self._progress(f"{self._roles[rid].kind} ready")
                if all(
                    self._observed.get(rid, RoleObservation()).state == "Ready"
                    and self._acked.get(rid, 0) >= desired.generation
                    for rid in self._roles
                ):
                    return
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), 0.1)
        if not stop.is_set():
            lagging = [
                r.kind
                for rid, r in self._roles.items()
                if self._observed.get(rid, RoleObservation()).state != "Ready"
            ]
            self._progress(f"still waiting for {', '.join(lagging)}; see {self.home.logs_dir}")

    # -- internal API -----------------------------------------------------------------------------

    async def _start_api(self) -> None:
        identity = self.home.controller_identity
        app = web.Application(middlewares=[error_middleware])
        app.router.add_post("/v1/reconcile", self._api_reconcile)
        app.router.add_get("/v1/health", self._api_health)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        await web.TCPSite(
            self._runner, identity.bind, identity.control_port, ssl_context=server_context(identity)
        ).start()

    async def _stop_api(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    async def _api_reconcile(self, request: web.Request) -> web.Response:
        require_role(request, "management", "controller")
        self._nudge.set()
        return web.json_response({"ok": True})

    async def _api_health(self, request: web.Request) -> web.Response:
        return web.json_response({"role": "controller", "status": "ready"})

    # -- reconciliation ---------------------------------------------------------------------------

    def _read(self) -> DesiredState:
        with self.db.session() as session:
            place_sites(session)
        with self.db.session() as session:
            return read_desired(session, self.config.domain)

    async def _reconcile_loop(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            self._nudge.clear()
            try:
                await self.reconcile_once()
            except Exception:
                self._log.exception("reconcile pass failed; retrying")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._nudge.wait(), _RECONCILE_EVERY)

    async def reconcile_once(self) -> None:
        desired = await asyncio.to_thread(self._read)
        self._desired = desired
        self._roles = {r.id: r for r in desired.roles}
        snapshots = snapshots_for(desired)
        stale = [r for r in desired.roles if self._acked.get(r.id, 0) < desired.generation]
        await asyncio.gather(*(self._push(role, snapshots[role.id]) for role in stale))

    async def _push(self, role: RoleEndpoint, snapshot: dict[str, Any]) -> None:
        assert self._client is not None
        try:
            answer = await self._client.put_json(f"{role.control_url}/v1/config", snapshot)
        except SitecloudError as err:
            self._log.debug("push of version %s to %s failed: %s", snapshot["version"], role.kind, err)
            return
        self._acked[role.id] = int(answer.get("config_version", 0))

    # -- health -----------------------------------------------------------------------------------

    async def _health_loop(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            roles = list(self._roles.values())
            if roles:
                await asyncio.gather(*(self._check(role) for role in roles))
                await asyncio.to_thread(self._record, roles)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), self.config.health_interval)

    async def _check(self, role: RoleEndpoint) -> None:
        assert self._client is not None
        obs = self._observed.setdefault(role.id, RoleObservation())
        launcher_state, launcher_reason = self.fabric.launcher(LOCAL_HOST).describe(role.kind)
        try:
            health = await asyncio.wait_for(self._client.get_json(f"{role.control_url}/v1/health"), 3)
        except (SitecloudError, TimeoutError) as err:
            obs.failures += 1
            if launcher_state == "failed":
                obs.state, obs.reason = "Failed", launcher_reason
            elif obs.ever_healthy and obs.failures >= _UNHEALTHY_AFTER:
                obs.state, obs.reason = "Unhealthy", f"health check failed: {err}"
            elif not obs.ever_healthy:
                obs.state, obs.reason = "Starting", ""
            return
        obs.failures, obs.ever_healthy = 0, True
        obs.state, obs.reason = "Ready", ""
        obs.code_version = str(health.get("code_version", ""))
        obs.config_version = int(health.get("config_version", 0))
        obs.last_heartbeat = dt.datetime.now(dt.UTC)
        # A role that restarted from an older persisted config needs the current one again.
        if obs.config_version < self._acked.get(role.id, 0):
            self._acked[role.id] = obs.config_version
            self._nudge.set()

    def _record(self, roles: list[RoleEndpoint]) -> None:
        with self.db.session() as session:
            for endpoint in roles:
                role = session.get(Role, endpoint.id)
                obs = self._observed.get(endpoint.id)
                if role is None or obs is None:
                    continue
                role.state, role.reason = obs.state, obs.reason[:512]
                role.code_version = obs.code_version
                role.config_version = obs.config_version
                role.last_heartbeat = obs.last_heartbeat
