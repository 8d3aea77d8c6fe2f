"""The controller: brings the cloud up on its fabric, keeps every role configured, watches health.

Reconciliation is level-triggered: each pass reads the desired state (DB generation), places sites
on workers, and pushes the snapshot of that generation to every role that has not acknowledged it.
Management nudges it after a change; a timer catches everything else (a restarted role, a failed push).
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import ssl
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from aiohttp import web
from prometheus_client import Counter, Histogram
from prometheus_client.metrics_core import GaugeMetricFamily, Metric
from sqlalchemy import select

from roles.controller._certificates import CertificateManager
from roles.controller._fleet import Fleet
from roles.controller._fleet_api import fleet_routes
from roles.controller._pids import running_role
from roles.controller._preflight import check_internal_ports, check_public_ports
from roles.controller._usage import UsageBook, usage_routes
from roles.controller.config import CloudConfig
from roles.controller.desired import DesiredState, RoleEndpoint, place_sites, read_desired, snapshots_for
from roles.controller.fabric.base import RoleSpec
from roles.controller.fabric.local import LOCAL_HOST, LocalFabric
from roles.controller.fabric.netns import BRIDGE, SUBNET
from roles.controller.home import CloudHome
from shared.acme import AcmeChallenge
from shared.contracts.health import HEALTHS, ControllerHealth, RoleHealth
from shared.contracts.snapshots import ConfigAck, Refused, Snapshot
from shared.db import Database, Host, Role, bump_generation
from shared.errors import SitecloudError, Unavailable
from shared.files import read_json
from shared.home_lock import hold_home
from shared.internal import InternalClient, error_middleware, require_role
from shared.logs import get_logger
from shared.metrics import FiguresCollector, metrics_handler, role_registry
from shared.quota import quota_stops
from shared.states import RoleState
from shared.tls import client_context, server_context

__all__ = ["Controller"]

_RECONCILE_EVERY = 2.0
# Two missed health answers in a row (about 3-6 s) take a role out of the routes: front ends stop
# sending to a dead host's workers well within 10 s.
_UNHEALTHY_AFTER = 2
_HEALTH_TIMEOUT = 2.0
_PUSH_TIMEOUT = 5.0
# A hung role (see CloudConfig.revive_after) is restarted at most once per _REVIVE_EVERY while it does
# not come back.
_REVIVE_EVERY = 120.0
# A role on another host that stays silent: its host's supervisor is asked (over SSH) at most this often
# whether it keeps dying there, and given this long to say.
_ASK_SUPERVISOR_EVERY = 10.0
_ASK_SUPERVISOR_TIMEOUT = 10.0


@dataclass
class RoleObservation:
    """What the controller last saw of one role; written to the DB when it changes."""

    state: RoleState = RoleState.STARTING
    reason: str = ""
    code_version: str = ""
    config_version: int = 0
    last_heartbeat: dt.datetime | None = None
    failures: int = 0
    ever_healthy: bool = False
    load: dict[str, Any] | None = None
    # Monotonic times: since when it has not answered, and when the controller last restarted it.
    silent_since: float | None = None
    revived_at: float | None = None
    # A silent role on another host: what its host's supervisor said (state, reason), and when asked.
    supervisor: tuple[str, str] | None = None
    supervisor_asked_at: float | None = None


# Seconds after `up` is ready before the wheelhouse for role hosts is built.
_WHEELHOUSE_AHEAD_DELAY = 20.0


class Controller:
    def __init__(self, config: CloudConfig, *, progress: Callable[[str], None] = lambda _: None) -> None:
        self.config = config
        self.home = CloudHome(config)
        self.db = Database(config.database_url)
        self.fabric = LocalFabric(
            self.home.logs_dir, address="localhost", stop_timeout=config.role_stop_timeout
        )
        self._progress = progress
        self._log = get_logger("controller", host=LOCAL_HOST)
        self._nudge = asyncio.Event()
        # Set to have the health loop look at every role now (see look_now).
        self._look = asyncio.Event()
        self._observed: dict[int, RoleObservation] = {}
        self._acked: dict[int, int] = {}
        # Why a role refused its last snapshot outright (an error answer to the push), by role.
        self._refused: dict[int, str] = {}
        self._desired: DesiredState | None = None
        self._client: InternalClient | None = None
        self._runner: web.AppRunner | None = None
        self._on_gateway = False
        self._server_ssl: ssl.SSLContext | None = None
        self._roles: dict[int, RoleEndpoint] = {}
        # Roles front ends route around (down, stopped, draining), as last written into a generation.
        self._routed_down: frozenset[int] = frozenset()
        self._draining: set[int] = set()
        self._pushing: dict[int, asyncio.Task[None]] = {}
        self._reviving: dict[int, asyncio.Task[None]] = {}
        self._asking: dict[int, asyncio.Task[None]] = {}
        self.fleet: Fleet | None = None
        # What quota stops the current generation carries; the clock decides the UTC day (tests set it).
        self._quota_seen: dict[str, tuple[str, float, dt.datetime]] | None = None
        self.clock: Callable[[], dt.datetime] = lambda: dt.datetime.now(dt.UTC)
        # HTTP-01 answers of the ACME orders in flight, by token: every front end snapshot carries them.
        self._challenges: dict[str, AcmeChallenge] = {}
        self.certificates = CertificateManager(
            self.db, config.home / "acme", self, self._log.bind(part="acme"), domain=config.domain
        )
        # Metrics: the reconcile pass timed as it runs (a few a second at most); the rest read when scraped.
        self.metrics = role_registry("controller", LOCAL_HOST, self._generation)
        self._reconcile_seconds = Histogram(
            "sitecloud_controller_reconcile_duration_seconds",
            "Time of one reconcile pass (read desired state, push snapshots).",
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0),
            registry=self.metrics,
        )
        self._reconcile_failures = Counter(
            "sitecloud_controller_reconcile_failures", "Reconcile passes that failed.", registry=self.metrics
        )
        self.metrics.register(FiguresCollector(self._role_metrics))

    # -- lifecycle --------------------------------------------------------------------------------

    async def _build_wheelhouse_ahead(self) -> None:
        """Build what `role add` ships to a new host now, so the first add does not wait for pip."""
        assert self.fleet is not None
        # Not in the first seconds, which belong to the roles starting and the first requests.
        await asyncio.sleep(_WHEELHOUSE_AHEAD_DELAY)
        started = time.monotonic()
        try:
            digest, path = await self.fleet.wheelhouse.ensure()
        except SitecloudError as err:
            self._log.warning("the wheelhouse for role hosts is not built ahead: %s", err.message)
            return
        self._log.info(
            "wheelhouse %s for role hosts ready at %s (%.1fs)", digest, path, time.monotonic() - started
        )

    async def run(self, stop: asyncio.Event) -> None:
        """Bring the cloud up and keep it so until ``stop``; refused before anything starts when
        another controller runs on this home or a public port is taken."""
        with hold_home(self.config.home):
            check_public_ports(self.config, self._runs_already)
            check_internal_ports(self.config, self._chosen_ports(), self.home.state_file, self._runs_already)
            await self._serve(stop)

    def _chosen_ports(self) -> dict[str, int]:
        """The internal ports an earlier `up` chose for this home (none on a first `up`)."""
        try:
            ports = read_json(self.home.state_file).get("internal_ports")
        except (OSError, ValueError, AttributeError):
            return {}
        return {str(k): v for k, v in ports.items() if isinstance(v, int)} if isinstance(ports, dict) else {}

    def _runs_already(self, kind: str) -> bool:
        """Whether a role of this home still runs, left by a controller that died (it is adopted)."""
        return running_role(RoleSpec(kind, LOCAL_HOST, self.home.role_home(kind))) is not None

    async def _serve(self, stop: asyncio.Event) -> None:
        started = time.monotonic()
        await asyncio.to_thread(self._prepare)
        identity = self.home.controller_identity
        self._client = InternalClient(identity, timeout=10)
        self.fleet = Fleet(self.home, self.config, self.db, self.fabric, client_context(identity), self)
        await self._start_api()
        launcher = self.fabric.launcher(LOCAL_HOST)
        try:
            for kind in self.home.local_roles:
                self._progress(f"starting {kind}")
                await launcher.start(
                    RoleSpec(kind, LOCAL_HOST, self.home.role_home(kind), dict(self.config.extra_env))
                )
            tasks = [
                asyncio.create_task(self._reconcile_loop(stop), name="reconcile"),
                asyncio.create_task(self._health_loop(stop), name="health"),
                asyncio.create_task(self.certificates.run(stop), name="certificates"),
            ]
            await self._wait_ready(stop, timeout=60)
            if not stop.is_set():
                self.home.write_endpoints()
                self._progress(f"ready in {time.monotonic() - started:.1f}s")
                tasks.append(asyncio.create_task(self._build_wheelhouse_ahead(), name="wheelhouse"))
            await stop.wait()
            for task in [*tasks, *self._pushing.values(), *self._asking.values()]:
                task.cancel()
            for task in [*tasks, *self._pushing.values(), *self._asking.values()]:
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
        if self._netns_in_use():
            self.home.ensure_controller_address(self._gateway())
        self.db.migrate()
        self.home.ensure_admin_token(self.db)
        self._register_local_roles()

    @staticmethod
    def _gateway() -> str:
        return str(SUBNET.network_address + 1)

    def _netns_in_use(self) -> bool:
        return (self.config.home / "fabric" / "netns" / "state.json").exists() and Path(
            f"/sys/class/net/{BRIDGE}"
        ).exists()

    def _register_local_roles(self) -> None:
        """The local host and its role rows, with the ports this home uses."""
        ports = self.home.internal_ports
        with self.db.session() as session:
            host = session.scalar(select(Host).where(Host.name == LOCAL_HOST))
            if host is None:
                host = Host(name=LOCAL_HOST, fabric="local", address="localhost")
                session.add(host)
                session.flush()
            for old in session.scalars(select(Role).where(Role.host_id == host.id)):
                if old.kind not in self.home.local_roles:
                    session.delete(old)
            for kind in self.home.local_roles:
                role = session.scalar(select(Role).where(Role.kind == kind, Role.host_id == host.id))
                if role is None:
                    role = Role(kind=kind, host_id=host.id, control_port=ports[kind])
                    session.add(role)
                role.control_port = ports[kind]
                role.ports = self._public_ports(kind)
                role.state, role.reason = RoleState.STARTING, ""
                role.config_version = 0
                if kind == "management" and role.desired_state == "stopped":
                    # Stopped (by an older version that allowed it), it is the one door the admin has
                    # to start anything: `up` always brings it back.
                    self._log.warning("management on %s was stopped; starting it again", LOCAL_HOST)
                    role.desired_state = "running"
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
        # Roles on other hosts keep running under their hosts' supervisors; only ours stopped.
        with self.db.session() as session:
            for role in session.scalars(select(Role).join(Host).where(Host.fabric == "local")):
                role.state, role.reason = RoleState.STOPPED, ""

    async def _wait_ready(self, stop: asyncio.Event, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        reported: set[int] = set()
        while not stop.is_set() and time.monotonic() < deadline:
            desired = self._desired
            local = {rid: r for rid, r in self._roles.items() if r.is_local}
            if desired is not None and local:
                for rid, obs in self._observed.items():
                    if self._serves(rid) and rid not in reported and rid in local:
                        reported.add(rid)
                        said = "ready" if obs.state == RoleState.READY else f"degraded: {obs.reason}"
                        self._progress(f"{local[rid].kind} {said}")
                if all(self._serves(rid) and self._acked.get(rid, 0) >= desired.generation for rid in local):
                    return
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), 0.1)
        if not stop.is_set():
            lagging = [r.kind for rid, r in self._roles.items() if r.is_local and not self._serves(rid)]
            self._progress(f"still waiting for {', '.join(lagging)}; see {self.home.logs_dir}")

    def _serves(self, role_id: int) -> bool:
        """Whether a role serves with what it was given: Ready, or Degraded for a part of its job only
        (one refusing its snapshot outright is not waited for)."""
        state = self._observed.get(role_id, RoleObservation()).state
        return state == RoleState.READY or (state == RoleState.DEGRADED and role_id not in self._refused)

    # -- internal API -----------------------------------------------------------------------------

    async def _start_api(self) -> None:
        identity = self.home.controller_identity
        app = web.Application(middlewares=[error_middleware])
        app.router.add_post("/v1/reconcile", self._api_reconcile)
        app.router.add_get("/v1/health", self._api_health)
        app.router.add_get("/metrics", metrics_handler(self.metrics))
        assert self.fleet is not None
        app.add_routes(fleet_routes(self.fleet, self.listen_on_gateway))
        loop = asyncio.get_running_loop()

        def recorded(_: set[str]) -> None:
            # A report may put a site over its quota: look now rather than at the next pass.
            loop.call_soon_threadsafe(self._nudge.set)

        book = UsageBook(self.db, on_recorded=recorded)
        app.add_routes(usage_routes(book))
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        self._server_ssl = server_context(identity)
        await web.TCPSite(
            self._runner, identity.bind, identity.control_port, ssl_context=self._server_ssl
        ).start()
        await self.listen_on_gateway()

    async def listen_on_gateway(self) -> None:
        """Also serve the internal API on the netns bridge, where roles on netns hosts reach us."""
        if self._on_gateway or self._runner is None or not self._netns_in_use():
            return
        gateway = self._gateway()
        renewed = await asyncio.to_thread(self.home.ensure_controller_address, gateway)
        identity = self.home.controller_identity
        if identity.bind in ("0.0.0.0", "::"):
            # Listening on every address already (`up --advertise`), the API is on the bridge too; its
            # next handshakes show the certificate that names the bridge.
            if renewed and self._server_ssl is not None:
                self._server_ssl.load_cert_chain(identity.cert_file, identity.key_file)
        else:
            site = web.TCPSite(
                self._runner, gateway, identity.control_port, ssl_context=server_context(identity)
            )
            try:
                await site.start()
            except OSError as exc:
                self._log.warning("cannot listen on the netns gateway %s: %s", gateway, exc)
                return
        self._on_gateway = True
        assert self.fleet is not None
        self.fleet.gateway_url = f"https://{gateway}:{identity.control_port}"

    async def _stop_api(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    async def _api_reconcile(self, request: web.Request) -> web.Response:
        """Reconcile now; with ``{"wait_for": N}``, answer once every serving role runs generation N."""
        require_role(request, "management", "controller")
        self._nudge.set()
        # A name may have been verified, or a renewal asked for.
        self.certificates.wake()
        body = await request.json() if request.can_read_body else {}
        wait_for = body.get("wait_for") if isinstance(body, dict) else None
        if not isinstance(wait_for, int) or isinstance(wait_for, bool):
            return web.json_response({"ok": True})
        timeout = min(float(body.get("timeout", 5)), 10.0)
        return web.json_response({"ok": True, "applied": await self.wait_applied(wait_for, timeout)})

    async def wait_applied(self, generation: int, timeout: float) -> bool:
        """Whether every role that serves now (running, healthy) took ``generation`` within ``timeout``."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            desired = self._desired
            if desired is not None and desired.generation >= generation:
                serving = [
                    r
                    for r in self._roles.values()
                    if r.desired_state == "running" and r.id not in self._routed_down and self._serves(r.id)
                ]
                if all(self._acked.get(r.id, 0) >= generation for r in serving):
                    return True
            await asyncio.sleep(0.02)
        return False

    def _generation(self) -> int:
        return self._desired.generation if self._desired is not None else 0

    def _role_metrics(self) -> Iterator[Metric]:
        """Roles by state, and each role's config lag (generations it is behind), from the last checks."""
        generation = self._generation()
        yield GaugeMetricFamily(
            "sitecloud_controller_desired_generation", "The desired state's generation.", value=generation
        )
        by_state = {state: 0 for state in RoleState}
        lag = GaugeMetricFamily(
            "sitecloud_controller_role_config_lag",
            "Config generations a role is behind the desired one (0: it applied the newest).",
            labels=["role", "kind", "host"],
        )
        for role in self._roles.values():
            obs = self._observed.get(role.id, RoleObservation())
            by_state[obs.state] += 1
            lag.add_metric([str(role.id), role.kind, role.host], max(0, generation - obs.config_version))
        states = GaugeMetricFamily("sitecloud_controller_roles", "Roles by state.", labels=["state"])
        for state, n in by_state.items():
            states.add_metric([state.value], n)
        yield states
        yield lag

    async def _api_health(self, request: web.Request) -> web.Response:
        return web.json_response(ControllerHealth(role="controller").to_json())

    # -- reconciliation ---------------------------------------------------------------------------

    def _read(self, down: frozenset[int]) -> DesiredState:
        with self.db.session() as session:
            place_sites(session, down, absent=self._never_up())
        with self.db.session() as session:
            stops = quota_stops(session, self.clock())
            # A site stopped or let go (a report, a new day, a plan change, an admin's lift) is a
            # change of desired state like any other: a new generation carries it to the front ends.
            seen = {name: (stop.what, stop.limit, stop.until) for name, stop in stops.items()}
            if seen != self._quota_seen:
                if self._quota_seen is not None or seen:
                    bump_generation(session)
                self._quota_seen = seen
        with self.db.session() as session:
            state = read_desired(
                session,
                self.config.domain,
                advertise=self.config.advertise,
                # People on other machines reach this one where its roles are advertised.
                public_host=self.config.advertise or self.config.public_host,
            )
        state.down = down
        state.quota_stops = stops
        return state

    async def _reconcile_loop(self, stop: asyncio.Event) -> None:
        failing = ""
        while not stop.is_set():
            self._nudge.clear()
            started = time.perf_counter()
            try:
                await self.reconcile_once()
            except Exception as exc:
                self._reconcile_failures.inc()
                # The whole traceback once per kind of failure, not every pass of an outage (the
                # runtime DB down printed one every 2 s on the `up` terminal).
                why = f"{type(exc).__name__}: {exc}".splitlines()[0][:200]
                if why != failing:
                    self._log.exception("reconcile pass failed; retrying every %s s", _RECONCILE_EVERY)
                failing = why
            else:
                if failing:
                    self._log.info("reconcile passes work again")
                failing = ""
            self._reconcile_seconds.observe(time.perf_counter() - started)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._nudge.wait(), _RECONCILE_EVERY)

    async def reconcile_once(self) -> None:
        desired = await asyncio.to_thread(self._read, self._routed_down)
        # Taken after the read: a challenge is added before its generation is bumped, so a read that
        # sees that generation always goes out with the challenge.
        desired.acme_challenges = tuple(self._challenges.values())
        self._desired = desired
        self._roles = {r.id: r for r in desired.roles}
        # A role that is down gets its snapshot when it answers health again (see _check); a push
        # still in flight is not doubled. Pushes run on their own, so one dead host never holds up
        # the front ends' new routes. Only the snapshots due are built (none while nothing changed).
        due = [
            role
            for role in desired.roles
            if self._acked.get(role.id, 0) < desired.generation
            and not self._observed.get(role.id, RoleObservation()).state.down
            and role.desired_state == "running"
            and role.id not in self._pushing
        ]
        if not due:
            return
        snapshots = snapshots_for(desired, only={role.id for role in due})
        for role in due:
            task = asyncio.create_task(
                self._push(role, desired.generation, snapshots[role.id]), name=f"push-{role.id}"
            )
            self._pushing[role.id] = task
            task.add_done_callback(self._pushed(role.id))

    def _pushed(self, role_id: int) -> Callable[[asyncio.Task[None]], None]:
        def done(_: asyncio.Task[None]) -> None:
            self._pushing.pop(role_id, None)

        return done

    async def _push(self, role: RoleEndpoint, version: int, snapshot: Snapshot | Refused) -> None:
        assert self._client is not None
        # One the role would refuse goes as it is: the role says why, in its own words.
        body = snapshot.raw if isinstance(snapshot, Refused) else snapshot.to_json()
        try:
            answer = ConfigAck.parse(
                await asyncio.wait_for(
                    self._client.put_json(f"{role.control_url}/v1/config", body), _PUSH_TIMEOUT
                ),
                what=f"{role.kind}'s answer to a config push",
            )
        except SitecloudError as err:
            if 400 <= err.status < 500:
                # The role answered and will not take it: no retry fixes that, so it is Degraded.
                if self._refused.get(role.id) != str(err):
                    self._log.warning(
                        "%s on %s refused config version %s: %s",
                        role.kind,
                        role.host,
                        version,
                        err,
                    )
                self._refused[role.id] = str(err)
            else:
                self._log.debug("push of version %s to %s failed: %s", version, role.kind, err)
            return
        except TimeoutError:
            self._log.debug("push of version %s to %s timed out", version, role.kind)
            return
        self._refused.pop(role.id, None)
        self._acked[role.id] = answer.config_version
        desired = self._desired
        if desired is not None and self._acked[role.id] < desired.generation:
            self._nudge.set()

    # -- ACME challenges (ChallengeBoard) ---------------------------------------------------------

    async def publish_challenges(self, challenges: Sequence[AcmeChallenge]) -> bool:
        """Put HTTP-01 answers into a new generation; whether every serving role took it in time."""
        for challenge in challenges:
            self._challenges[challenge.token] = challenge
        generation = await asyncio.to_thread(self._bump)
        self._nudge.set()
        return await self.wait_applied(generation, timeout=10.0)

    async def withdraw_challenges(self, challenges: Sequence[AcmeChallenge]) -> None:
        for challenge in challenges:
            self._challenges.pop(challenge.token, None)
        await asyncio.to_thread(self._bump)
        self._nudge.set()

    # -- what the fabric work needs (FleetHooks) ---------------------------------------------------

    def route_around(self, role_id: int, on: bool) -> None:
        if on:
            self._draining.add(role_id)
        else:
            self._draining.discard(role_id)

    def _bump(self) -> int:
        with self.db.session() as session:
            return bump_generation(session)

    async def converge(self, timeout: float = 10.0) -> None:
        """Write the current routes into a new generation and wait for every front end to take it."""
        down = self._down_set()
        self._routed_down = down
        generation = await asyncio.to_thread(self._bump)
        self._nudge.set()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            # Front ends that serve now; one still being installed gets the routes with its first push.
            frontends = [
                r
                for r in self._roles.values()
                if r.kind == "frontend"
                and r.desired_state == "running"
                and r.id not in self._routed_down
                and self._serves(r.id)
            ]
            desired = self._desired
            if (
                desired is not None
                and desired.generation >= generation
                and all(self._acked.get(r.id, 0) >= generation for r in frontends)
            ):
                return
            await asyncio.sleep(0.05)
        self._log.warning("front ends did not all take generation %s within %.0fs", generation, timeout)

    async def wait_ready(self, role_id: int, url: str, timeout: float) -> tuple[RoleState, str]:
        """Until the role answers health with the current config (its own fresh answer, not a memory):
        Ready, or Degraded when it serves but says it cannot do all of its job."""
        assert self._client is not None
        deadline = time.monotonic() + timeout
        last: Exception | None = None
        while time.monotonic() < deadline:
            desired = self._desired
            role = self._roles.get(role_id)
            try:
                health = await self._health_of(role.kind if role else "", url)
                if desired is not None and health.config_version >= desired.generation:
                    return health.state()
                self._nudge.set()
            except (SitecloudError, TimeoutError) as err:
                last = err
            await asyncio.sleep(0.1)
        if role_id in self._refused:
            last = Unavailable(f"it refused the config: {self._refused[role_id]}")
        raise Unavailable(f"{url} did not become ready with the current config within {timeout:.0f}s: {last}")

    async def _health_of(self, kind: str, url: str) -> RoleHealth:
        """A role's health answer, read with the type of its kind."""
        assert self._client is not None
        raw = await asyncio.wait_for(self._client.get_json(f"{url}/v1/health"), _HEALTH_TIMEOUT)
        return HEALTHS.get(kind, RoleHealth).parse(raw, what=f"{kind}'s health answer")

    def _never_up(self) -> frozenset[int]:
        """Roles asked about that never answered (a host that does not resolve or answer, an install
        that failed): no site is placed or kept on them, nor routed to them, until they answer once."""
        return frozenset(
            rid for rid, obs in self._observed.items() if not obs.ever_healthy and obs.failures > 0
        )

    def _down_set(self) -> frozenset[int]:
        down = {rid for rid in self._draining}
        never_up = self._never_up()
        for rid, role in self._roles.items():
            obs = self._observed.get(rid)
            if role.desired_state != "running" or (obs is not None and obs.state.down) or rid in never_up:
                down.add(rid)
        return frozenset(down)

    # -- health -----------------------------------------------------------------------------------

    async def _health_loop(self, stop: asyncio.Event) -> None:
        failing = False
        while not stop.is_set():
            try:
                await self._look_once()
            except Exception:
                # A pass that fails (the runtime DB down or locked, say) must not end the loop: with
                # it would go every health check, revive and route-around, for good. Said once per
                # outage, not every second.
                if not failing:
                    self._log.exception(
                        "health pass failed; retrying every %s s", self.config.health_interval
                    )
                failing = True
            else:
                if failing:
                    self._log.info("health passes work again")
                failing = False
            await self._until_next_look(stop)

    async def _look_once(self) -> None:
        roles = list(self._roles.values())
        if not roles:
            return
        await asyncio.gather(*(self._check(role) for role in roles))
        down = self._down_set()
        changed = down != self._routed_down
        await asyncio.to_thread(self._record, roles, changed)
        # Only once recorded: a pass whose record failed sees the change again next time.
        if changed:
            self._routed_down = down
            self._log.info("routing around roles %s", sorted(down) or "none")
            self._nudge.set()

    async def _until_next_look(self, stop: asyncio.Event) -> None:
        """The health interval, or less when stopped or asked to look now."""
        waits = [asyncio.ensure_future(stop.wait()), asyncio.ensure_future(self._look.wait())]
        try:
            await asyncio.wait(
                waits, timeout=self.config.health_interval, return_when=asyncio.FIRST_COMPLETED
            )
        finally:
            for wait in waits:
                wait.cancel()
        self._look.clear()

    def look_now(self) -> None:
        self._look.set()

    async def _check(self, role: RoleEndpoint) -> None:
        assert self._client is not None and self.fleet is not None
        obs = self._observed.setdefault(role.id, RoleObservation())
        if role.desired_state != "running":
            obs.state, obs.reason, obs.failures = RoleState.STOPPED, "stopped by the admin", 0
            obs.silent_since = None
            return
        launcher_state, launcher_reason = self.fleet.describe(role.kind, role.host, role.fabric)
        try:
            health = await self._health_of(role.kind, role.control_url)
        except (SitecloudError, TimeoutError) as err:
            obs.failures += 1
            if obs.silent_since is None:
                obs.silent_since = time.monotonic()
            why = str(err) or f"no answer within {_HEALTH_TIMEOUT:g} s"
            if not role.is_local and obs.failures >= _UNHEALTHY_AFTER:
                self._ask_supervisor(role, obs)
            said = obs.supervisor
            if launcher_state == "failed" and role.is_local:
                obs.state, obs.reason = RoleState.FAILED, launcher_reason
            elif said is not None and said[0] == "failed":
                # Not a host that is down: the process keeps dying there.
                obs.state = RoleState.FAILED
                obs.reason = f"keeps failing on {role.host}: {said[1] or 'its supervisor gave up'}"
                self._revive_if_hung(role, obs)
            elif obs.ever_healthy and obs.failures >= _UNHEALTHY_AFTER:
                obs.state, obs.reason = RoleState.UNHEALTHY, f"health check failed: {why}"
                if said is not None:
                    obs.reason += f"; its supervisor on {role.host} says: {' '.join(filter(None, said))}"
                self._revive_if_hung(role, obs)
            elif not obs.ever_healthy:
                obs.state, obs.reason = RoleState.STARTING, ""
            return
        obs.failures, obs.ever_healthy, obs.silent_since = 0, True, None
        obs.supervisor, obs.supervisor_asked_at = None, None
        obs.state, obs.reason = health.state()
        obs.code_version = health.code_version
        obs.config_version = health.config_version
        refused = self._refused.get(role.id)
        desired = self._desired
        if refused is not None and desired is not None and obs.config_version < desired.generation:
            obs.state = RoleState.DEGRADED
            obs.reason = f"refused config version {desired.generation}: {refused}" + (
                f"; {obs.reason}" if obs.reason else ""
            )
        obs.last_heartbeat = dt.datetime.now(dt.UTC)
        obs.load = health.load()
        # A role that restarted from an older persisted config needs the current one again.
        if obs.config_version < self._acked.get(role.id, 0):
            self._acked[role.id] = obs.config_version
            self._nudge.set()

    def _ask_supervisor(self, role: RoleEndpoint, obs: RoleObservation) -> None:
        """Ask a silent role's host supervisor, in the background, whether the process keeps dying
        there (Failed, with its exit) or runs but does not answer; a host that cannot be asked may be
        down."""
        assert self.fleet is not None
        now = time.monotonic()
        if role.id in self._asking or (
            obs.supervisor_asked_at is not None and now - obs.supervisor_asked_at < _ASK_SUPERVISOR_EVERY
        ):
            return
        obs.supervisor_asked_at = now
        fleet = self.fleet

        async def ask() -> None:
            try:
                launcher = fleet.launcher(role.host, role.fabric)
                said = await asyncio.wait_for(launcher.ask_supervisor(role.kind), _ASK_SUPERVISOR_TIMEOUT)
            except Exception as exc:  # a host that cannot be reached: the health checks say the rest
                self._log.info("cannot ask the supervisor of %s on %s: %s", role.kind, role.host, exc)
                obs.supervisor = None
                return
            if obs.silent_since is not None:  # still silent: an answer since would have cleared it
                obs.supervisor = said
                self.look_now()

        task = asyncio.create_task(ask(), name=f"ask-supervisor-{role.id}")
        self._asking[role.id] = task
        task.add_done_callback(lambda _: self._asking.pop(role.id, None))

    def _revive_if_hung(self, role: RoleEndpoint, obs: RoleObservation) -> None:
        """Restart a role that answered before and has stayed silent for ``revive_after`` (hung, or its
        host's agent lost it); the restart kills it if it does not stop in time."""
        now = time.monotonic()
        if obs.silent_since is None or role.id in self._reviving:
            return
        if now - obs.silent_since < self.config.revive_after:
            return
        if obs.revived_at is not None and now - obs.revived_at < _REVIVE_EVERY:
            return
        obs.revived_at = now
        silent = now - obs.silent_since
        self._log.warning("%s on %s has not answered for %.0f s: restarting it", role.kind, role.host, silent)
        obs.reason += f"; silent for {silent:.0f} s, restarting it"

        async def revive() -> None:
            assert self.fleet is not None
            try:
                outcome = await self.fleet.act(role.id, "restart", lambda _: None)
            except Exception as exc:  # a host that cannot be reached: the next try is _REVIVE_EVERY on
                self._log.warning("restarting %s on %s failed: %s", role.kind, role.host, exc)
                return
            self._log.info("restarted %s on %s: %s", role.kind, role.host, outcome.state)

        task = asyncio.create_task(revive(), name=f"revive-{role.id}")
        self._reviving[role.id] = task
        task.add_done_callback(lambda _: self._reviving.pop(role.id, None))

    def _record(self, roles: list[RoleEndpoint], bump: bool) -> None:
        with self.db.session() as session:
            hosts: dict[str, list[tuple[RoleState, bool]]] = {}
            for endpoint in roles:
                role = session.get(Role, endpoint.id)
                obs = self._observed.get(endpoint.id)
                if role is None or obs is None:
                    continue
                if role.state == RoleState.INSTALLING and obs.state not in (
                    RoleState.READY,
                    RoleState.DEGRADED,
                ):
                    continue  # the fabric work owns the state until the role first answers
                if role.state == RoleState.FAILED and not obs.ever_healthy and obs.state != RoleState.FAILED:
                    continue  # its install failed (and said why): not "Starting" while nothing starts it
                role.state, role.reason = obs.state, obs.reason[:512]
                role.code_version = obs.code_version
                role.config_version = obs.config_version
                role.last_heartbeat = obs.last_heartbeat
                role.load = obs.load
                if not endpoint.is_local and endpoint.desired_state == "running":
                    # A role whose host's supervisor answered for it says the host is up.
                    answered = (
                        obs.state in (RoleState.READY, RoleState.DEGRADED) or obs.supervisor is not None
                    )
                    hosts.setdefault(endpoint.host, []).append((obs.state, answered))
            # A host none of whose roles (nor their supervisor) answers is down; one that answers rejoins.
            for name, seen in hosts.items():
                host = session.scalar(select(Host).where(Host.name == name))
                if host is None or host.state not in ("ready", "down"):
                    continue
                if any(answered for _, answered in seen):
                    host.state = "ready"
                elif all(state == RoleState.UNHEALTHY for state, _ in seen):
                    host.state = "down"
            if bump:
                bump_generation(session)
