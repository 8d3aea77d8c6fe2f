"""The controller's fabric work: hosts from providers, roles installed and lifecycled on them, upgrades.

Management writes what the admin wants (host and role rows, a role's desired run state) and asks the
controller to act; this module does the acting. Long operations report progress as dicts (one per step,
streamed to the CLI as NDJSON). Operations on one host run one at a time (they share its venvs).
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from sqlalchemy import select

from roles.controller.config import CloudConfig
from roles.controller.desired import unreachable_needs
from roles.controller.fabric._wheelhouse import Wheelhouse
from roles.controller.fabric.base import FabricProvider, ProgressStep, RoleLauncher, RoleSpec
from roles.controller.fabric.local import LOCAL_HOST, LocalFabric, LocalLauncher
from roles.controller.fabric.netns import NetnsFabric
from roles.controller.fabric.remote import RemoteLauncher
from roles.controller.fabric.ssh import SshFabric
from roles.controller.home import CloudHome
from shared.contracts.fleet import FleetProgress, HostCreated, RoleOutcome, UpgradedRole, UpgradeOutcome
from shared.db import Database, Host, Role
from shared.errors import InvalidInput, NotFound, NotSupported, SitecloudError, Unavailable
from shared.logs import get_logger
from shared.states import RoleState

__all__ = ["UPGRADE_ORDER", "Fleet", "FleetHooks", "Progress"]

Progress = Callable[[FleetProgress], None]

# Upgrade domains: one role type after another, one host at a time within a type. The content store
# first (workers serve from their caches meanwhile), front ends last (clients move to the others).
UPGRADE_ORDER = ("fileserver", "publisher", "worker", "management", "frontend")
_READY_TIMEOUT = 60.0
# The health loop records what it saw in the DB about once a second; a few passes at most.
_LISTED_TIMEOUT = 10.0
_SERVING = (RoleState.READY, RoleState.DEGRADED)


class FleetHooks(Protocol):
    """What the fabric work needs from the controller's reconciliation and health loops."""

    def route_around(self, role_id: int, on: bool) -> None: ...

    async def converge(self, timeout: float = 10.0) -> None: ...

    def look_now(self) -> None:
        """Check every role's health now rather than at the next pass (and record what it saw)."""
        ...

    async def wait_ready(self, role_id: int, url: str, timeout: float) -> tuple[RoleState, str]:
        """Until the role answers with the current config: Ready, or Degraded (it serves, not all)
        with its reason."""
        ...


@dataclass(frozen=True)
class _RoleRow:
    id: int
    kind: str
    host: str
    fabric: str
    address: str
    code_hash: str
    desired_state: str
    control_port: int
    # A worker's size (small, medium, large); None: the default.
    size: str | None = None

    @property
    def control_url(self) -> str:
        return f"https://{self.host}:{self.control_port}"


class Fleet:
    def __init__(
        self,
        home: CloudHome,
        config: CloudConfig,
        db: Database,
        local: LocalFabric,
        client_ssl: ssl.SSLContext,
        hooks: FleetHooks,
    ) -> None:
        self.home = home
        self.config = config
        self.db = db
        self.hooks = hooks
        self.wheelhouse = Wheelhouse(config.wheelhouse_dir)
        self.netns = NetnsFabric(config.home, wheelhouse=self.wheelhouse, client_ssl=client_ssl)
        self.ssh = SshFabric(config.home, wheelhouse=self.wheelhouse, client_ssl=client_ssl)
        self.fabrics: dict[str, FabricProvider] = {"local": local, "netns": self.netns, "ssh": self.ssh}
        self._host_locks: dict[str, asyncio.Lock] = {}
        self._upgrade = asyncio.Lock()
        self._log = get_logger("controller", host=LOCAL_HOST)
        # Set by the controller: where roles on netns hosts reach its internal API.
        self.gateway_url = ""

    def provider(self, fabric: str) -> FabricProvider:
        try:
            return self.fabrics[fabric]
        except KeyError:
            raise InvalidInput(f"no fabric {fabric!r}", hint=f"one of {', '.join(self.fabrics)}") from None

    def launcher(self, host: str, fabric: str) -> RoleLauncher:
        return self.provider(fabric).launcher(host)

    def describe(self, kind: str, host: str, fabric: str) -> tuple[str, str]:
        try:
            return self.launcher(host, fabric).describe(kind)
        except SitecloudError:
            return "stopped", ""

    @contextlib.asynccontextmanager
    async def _host(self, name: str) -> AsyncIterator[None]:
        lock = self._host_locks.setdefault(name, asyncio.Lock())
        async with lock:
            yield

    # -- the DB -----------------------------------------------------------------------------------

    def _role_row(self, role_id: int) -> _RoleRow:
        with self.db.session() as s:
            role = s.get(Role, role_id)
            if role is None:
                raise NotFound(f"no role with id {role_id}")
            return _RoleRow(
                role.id,
                role.kind,
                role.host.name,
                role.host.fabric,
                role.host.address,
                role.code_hash,
                role.desired_state,
                role.control_port,
                role.size,
            )

    def _all_roles(self) -> list[_RoleRow]:
        with self.db.session() as s:
            return [
                _RoleRow(
                    r.id,
                    r.kind,
                    h.name,
                    h.fabric,
                    h.address,
                    r.code_hash,
                    r.desired_state,
                    r.control_port,
                    r.size,
                )
                for r, h in s.execute(select(Role, Host).join(Host).order_by(Host.name, Role.id))
            ]

    def _set_role(self, role_id: int, **fields: Any) -> None:
        with self.db.session() as s:
            role = s.get(Role, role_id)
            if role is not None:
                for key, value in fields.items():
                    setattr(role, key, value)

    def _listed_state(self, role_id: int) -> str:
        with self.db.session() as s:
            role = s.get(Role, role_id)
            return role.state if role is not None else RoleState.REMOVED

    async def _until_listed(self, role_id: int, states: tuple[RoleState, ...]) -> None:
        """Until `role list` shows the role in one of ``states``, so an action's answer is not ahead
        of the list; after the bound, the answer goes as it is (the list catches up on its own)."""
        # The health loop writes the list: have it look now rather than within a second.
        self.hooks.look_now()
        deadline = time.monotonic() + _LISTED_TIMEOUT
        while time.monotonic() < deadline:
            if await asyncio.to_thread(self._listed_state, role_id) in states:
                return
            await asyncio.sleep(0.1)

    def _set_host(self, name: str, **fields: Any) -> None:
        with self.db.session() as s:
            host = s.scalar(select(Host).where(Host.name == name))
            if host is not None:
                for key, value in fields.items():
                    setattr(host, key, value)

    def _delete_role(self, role_id: int) -> None:
        with self.db.session() as s:
            role = s.get(Role, role_id)
            if role is not None:
                s.delete(role)

    def _host_fabric(self, name: str) -> str:
        with self.db.session() as s:
            host = s.scalar(select(Host).where(Host.name == name))
            if host is None:
                raise NotFound(f"no host {name!r}", hint="sitecloud host create NAME --fabric netns")
            return host.fabric

    def _publisher_url(self) -> str:
        with self.db.session() as s:
            row = s.execute(
                select(Role.control_port, Host.name, Host.fabric)
                .join(Host)
                .where(Role.kind == "publisher")
                .order_by(Host.fabric == "local", Role.id)
            ).first()
        return f"https://{row[1]}:{row[0]}" if row else ""

    # -- hosts ------------------------------------------------------------------------------------

    async def create_host(self, name: str) -> HostCreated:
        fabric = await asyncio.to_thread(self._host_fabric, name)
        if fabric == "local":
            raise NotSupported("the local fabric has one host, this machine", hint="use --fabric netns")
        async with self._host(name):
            try:
                info = await self.provider(fabric).provision(name)
            except BaseException:
                await asyncio.to_thread(self._set_host, name, state="failed")
                raise
        await asyncio.to_thread(self._set_host, name, address=info.address, state="ready")
        self._log.info("host %s (%s) is up at %s", name, fabric, info.address)
        return HostCreated(name=name, fabric=fabric, address=info.address)

    async def delete_host(self, name: str) -> None:
        fabric = await asyncio.to_thread(self._host_fabric, name)
        if fabric == "local":
            raise NotSupported("the local host is this machine: it cannot be deleted")
        async with self._host(name):
            await self.provider(fabric).destroy(name)

    # -- roles ------------------------------------------------------------------------------------

    def _controller_url(self, fabric: str) -> str:
        """Where a role on a host of ``fabric`` reports to the controller (usage): the netns bridge, or
        the advertised address; none when the controller serves only this machine."""
        if fabric == "netns" and self.gateway_url:
            return self.gateway_url
        host = self.config.advertise
        if not host:
            return ""
        return f"https://{f'[{host}]' if ':' in host else host}:{self.home.controller_identity.control_port}"

    async def _install(self, row: _RoleRow, progress: Progress) -> dict[str, float]:
        launcher = self.launcher(row.host, row.fabric)
        if not isinstance(launcher, RemoteLauncher):
            raise NotSupported(f"{row.host} is not a host roles are installed on over SSH")
        home = Path(str(launcher.role_home(row.kind)))
        publisher = await asyncio.to_thread(self._publisher_url) if row.kind == "management" else ""
        if row.kind == "management" and self.config.database_url.startswith("sqlite"):
            raise NotSupported(
                "management on another host needs a runtime DB it can reach",
                hint="start the cloud with `sitecloud up --db postgresql://...`",
            )
        config = self.home.remote_role_config(
            row.kind,
            row.host,
            home,
            controller_url=self._controller_url(row.fabric),
            publisher_url=publisher,
            size=row.size,
        )
        cert = await asyncio.to_thread(self.home.issue_role_cert, row.kind, row.host, row.address)
        extra: dict[str, tuple[bytes, int]] = {}
        if row.kind == "frontend":
            key, pem = self.home.wildcard_pems()
            extra = {"tls/wildcard.key": (key, 0o600), "tls/wildcard.pem": (pem, 0o644)}

        def step(s: ProgressStep) -> None:
            progress(
                FleetProgress(
                    role=row.kind,
                    host=row.host,
                    step=s.step,
                    phase=s.phase,
                    seconds=round(s.seconds, 2),
                    detail=s.detail,
                )
            )

        await asyncio.to_thread(self._set_role, row.id, state=RoleState.INSTALLING, reason="")
        try:
            timings = await launcher.install(
                config,
                cert,
                self.home.ca_pem,
                env=dict(self.config.extra_env),
                progress=step,
                extra_files=extra,
            )
        except SitecloudError as err:
            await asyncio.to_thread(self._set_role, row.id, state=RoleState.FAILED, reason=err.message[:512])
            raise
        digest, _ = await self.wheelhouse.ensure()
        await asyncio.to_thread(self._set_role, row.id, code_hash=digest, state=RoleState.STARTING, reason="")
        return timings

    async def _ready(self, row: _RoleRow, progress: Progress) -> tuple[float, RoleState, str]:
        """Wait until the role serves with the current config; reported as the step ``ready``."""
        started = time.monotonic()
        progress(FleetProgress(role=row.kind, host=row.host, step="ready", phase="started"))
        await self.hooks.converge(timeout=10.0)
        state, reason = await self.hooks.wait_ready(row.id, row.control_url, _READY_TIMEOUT)
        await self._until_listed(row.id, _SERVING)
        seconds = time.monotonic() - started
        progress(
            FleetProgress(role=row.kind, host=row.host, step="ready", phase="done", seconds=round(seconds, 2))
        )
        return seconds, state, reason

    async def add_role(
        self, role_id: int, *, ssh_user: str | None, ssh_key: str | None, progress: Progress
    ) -> RoleOutcome:
        try:
            return await self._add_role(role_id, ssh_user=ssh_user, ssh_key=ssh_key, progress=progress)
        except SitecloudError as err:
            await asyncio.to_thread(self._set_role, role_id, state=RoleState.FAILED, reason=str(err)[:512])
            raise

    async def _add_role(
        self, role_id: int, *, ssh_user: str | None, ssh_key: str | None, progress: Progress
    ) -> RoleOutcome:
        started = time.monotonic()
        row = await asyncio.to_thread(self._role_row, role_id)
        if row.fabric == "local":
            raise NotSupported(
                "roles on this machine are the ones `sitecloud up` runs",
                hint="start `up` with --local-roles, or add the role on another host",
            )
        await self._refuse_unreachable(row)
        control, ports = self.home.remote_ports(row.kind)
        await asyncio.to_thread(self._set_role, role_id, control_port=control, ports=ports)
        row = await asyncio.to_thread(self._role_row, role_id)
        async with self._host(row.host):
            if row.fabric == "ssh" and (ssh_user or ssh_key or row.host not in await self._ssh_hosts()):
                progress(FleetProgress(role=row.kind, host=row.host, step="reach", phase="started"))
                try:
                    info = await self.ssh.add(
                        row.host, user=ssh_user, key_file=Path(ssh_key) if ssh_key else None
                    )
                except SitecloudError:
                    if row.host not in await self._ssh_hosts():  # never reached: not a ready host
                        await asyncio.to_thread(self._set_host, row.host, state="failed")
                    raise
                await asyncio.to_thread(self._set_host, row.host, address=info.address, state="ready")
                row = await asyncio.to_thread(self._role_row, role_id)
            timings = await self._install(row, progress)
        timings["ready"], ready, reason = await self._ready(row, progress)
        total = time.monotonic() - started
        self._log.info("%s on %s is %s in %.1fs", row.kind, row.host, ready.lower(), total)
        return RoleOutcome(
            role=row.kind,
            host=row.host,
            state=ready,
            reason=reason or None,
            seconds=round(total, 2),
            steps={k: round(v, 2) for k, v in timings.items()},
        )

    async def _refuse_unreachable(self, row: _RoleRow) -> None:
        """Refuse (and forget) a role on another host that could not reach the roles it needs."""
        others = [
            (r.kind, r.fabric == "local")
            for r in await asyncio.to_thread(self._all_roles)
            if r.id != row.id and r.desired_state == "running"
        ]
        needed = unreachable_needs(row.kind, row.fabric != "local", others, bool(self.config.advertise))
        if not needed:
            return
        await asyncio.to_thread(self._delete_role, row.id)
        raise NotSupported(
            f"a {row.kind} on {row.host} needs a {needed}, and this cloud's {needed} runs on this "
            "machine where only this machine can reach it",
            hint="restart the cloud with `sitecloud up --advertise ADDRESS` (this machine's address on "
            f"the network its hosts share), or add a {needed} on another host first",
        )

    async def _ssh_hosts(self) -> set[str]:
        return {h.name for h in await self.ssh.list_hosts()}

    async def act(
        self, role_id: int, action: str, progress: Progress, *, forget: bool = False
    ) -> RoleOutcome:
        """start, stop, restart, repair or remove one role. ``forget``: a remove whose host cannot be
        reached deletes the role's record anyway (a host gone for good), saying what is left there."""
        if action not in ("start", "stop", "restart", "repair", "remove"):
            raise InvalidInput(f"no role action {action!r}")
        started = time.monotonic()
        row = await asyncio.to_thread(self._role_row, role_id)
        if row.fabric == "local":
            done = await self._act_local(row, action, progress)
            return done.model_copy(update={"seconds": round(time.monotonic() - started, 2)})
        if action == "remove" and row.fabric == "ssh" and row.host not in await self._ssh_hosts():
            # Its add never reached the host (a name that does not resolve, say): nothing of it is
            # there, so only its record goes.
            return await self._forget(row, started, None)
        launcher = self.launcher(row.host, row.fabric)
        assert isinstance(launcher, RemoteLauncher)
        spec = RoleSpec(row.kind, row.host, Path(str(launcher.role_home(row.kind))))
        state = {"stop": RoleState.STOPPED, "remove": RoleState.REMOVED}.get(action, RoleState.READY)
        reason = ""
        if forget:
            try:
                return await self._removed_or_forgotten(row, launcher, progress, started)
            finally:
                self.hooks.route_around(row.id, False)
        try:
            async with self._host(row.host):
                if action != "start":
                    await self._drain(row, progress)
                progress(FleetProgress(role=row.kind, host=row.host, step=action, phase="started"))
                if action == "start":
                    await launcher.start(spec)
                elif action == "stop":
                    await launcher.stop(row.kind)
                elif action == "restart":
                    await launcher.restart(spec)
                elif action == "repair":
                    await self._install(row, progress)
                else:
                    await launcher.uninstall(row.kind)
                progress(FleetProgress(role=row.kind, host=row.host, step=action, phase="done"))
            if action == "remove":
                await asyncio.to_thread(self._delete_role, row.id)
            elif action != "stop":
                _, state, reason = await self._ready(row, progress)
        except Unavailable as err:
            if action != "remove":
                raise
            raise Unavailable(
                err.message,
                hint=f"if {row.host} is gone for good: sitecloud role remove {row.kind} {row.host} --forget "
                "(deletes the role's record; whatever is on the host stays there)",
            ) from err
        finally:
            # Back into the routes only once it serves (a stopped role stays out by its desired state).
            self.hooks.route_around(row.id, False)
        await self.hooks.converge()
        if action == "stop":
            await self._until_listed(row.id, (RoleState.STOPPED,))
        return RoleOutcome(
            role=row.kind,
            host=row.host,
            state=state,
            reason=reason or None,
            seconds=round(time.monotonic() - started, 2),
        )

    async def _removed_or_forgotten(
        self, row: _RoleRow, launcher: RemoteLauncher, progress: Progress, started: float
    ) -> RoleOutcome:
        """A remove that deletes the role's record even when its host cannot be reached."""
        reason = None
        await self._drain(row, progress)
        progress(FleetProgress(role=row.kind, host=row.host, step="remove", phase="started"))
        try:
            async with self._host(row.host):
                await launcher.uninstall(row.kind)
        except (Unavailable, OSError) as err:
            why = err.message if isinstance(err, Unavailable) else str(err)
            reason = (
                f"forgotten without reaching {row.host} ({why}): its files and process, if any, "
                f"are left on it under {launcher.role_home(row.kind)}"
            )
            self._log.warning("role %s on %s %s", row.kind, row.host, reason)
        progress(FleetProgress(role=row.kind, host=row.host, step="remove", phase="done"))
        return await self._forget(row, started, reason)

    async def _forget(self, row: _RoleRow, started: float, reason: str | None) -> RoleOutcome:
        """The role's record goes (whatever was done on its host before), and the routes follow."""
        await asyncio.to_thread(self._delete_role, row.id)
        await self.hooks.converge()
        return RoleOutcome(
            role=row.kind,
            host=row.host,
            state=RoleState.REMOVED,
            reason=reason,
            seconds=round(time.monotonic() - started, 2),
        )

    async def _drain(self, row: _RoleRow, progress: Progress) -> None:
        """Take a worker out of every front end's routes before it goes down."""
        if row.kind != "worker":
            return
        progress(FleetProgress(role=row.kind, host=row.host, step="drain", phase="started"))
        self.hooks.route_around(row.id, True)
        await self.hooks.converge()
        progress(FleetProgress(role=row.kind, host=row.host, step="drain", phase="done"))

    async def _act_local(self, row: _RoleRow, action: str, progress: Progress) -> RoleOutcome:
        launcher = self.launcher(LOCAL_HOST, "local")
        spec = RoleSpec(row.kind, LOCAL_HOST, self.home.role_home(row.kind), dict(self.config.extra_env))
        if action == "remove":
            raise NotSupported(
                "roles on this machine are the ones `sitecloud up` runs",
                hint="stop it with `sitecloud role stop`, or restart `up` with --local-roles",
            )

        async def run() -> None:
            if action == "repair":
                await asyncio.to_thread(self.home.renew_certificates, row.kind)
            if action in ("restart", "repair") and isinstance(launcher, LocalLauncher):
                # On the listeners its supervisor holds: the ports are never free in between.
                await launcher.restart(spec)
                return
            if action in ("stop", "restart", "repair"):
                await launcher.stop(row.kind)
            if action != "stop":
                await launcher.start(spec)

        if row.kind == "management":
            # Management carries this very request: answer first, act a moment later.
            task = asyncio.get_running_loop().call_later(0.5, lambda: asyncio.ensure_future(run()))
            del task
            return RoleOutcome(
                role=row.kind,
                host=row.host,
                state=RoleState.RESTARTING if action != "stop" else RoleState.STOPPING,
            )
        progress(FleetProgress(role=row.kind, host=row.host, step=action, phase="started"))
        await run()
        progress(FleetProgress(role=row.kind, host=row.host, step=action, phase="done"))
        if action == "stop":
            # The health loop sees the stop once it has the new desired state.
            await self.hooks.converge()
            await self._until_listed(row.id, (RoleState.STOPPED,))
            return RoleOutcome(role=row.kind, host=row.host, state=RoleState.STOPPED)
        _, state, reason = await self._ready(row, progress)
        return RoleOutcome(role=row.kind, host=row.host, state=state, reason=reason or None)

    # -- rolling upgrade --------------------------------------------------------------------------

    async def upgrade(self, *, force: bool, progress: Progress) -> UpgradeOutcome:
        """Bring every role to the current code, one host at a time per role type, gated on health."""
        if self._upgrade.locked():
            raise Unavailable("an upgrade is already running")
        async with self._upgrade:
            started = time.monotonic()
            progress(FleetProgress(step="wheelhouse", phase="started"))
            digest, _ = await self.wheelhouse.ensure()
            progress(
                FleetProgress(
                    step="wheelhouse",
                    phase="done",
                    seconds=round(time.monotonic() - started, 2),
                    detail=digest,
                )
            )
            rows = await asyncio.to_thread(self._all_roles)
            rows.sort(key=lambda r: (UPGRADE_ORDER.index(r.kind), r.host))
            upgraded: list[UpgradedRole] = []
            skipped: list[UpgradedRole] = []
            for row in rows:
                why = self._skip(row, digest, force)
                if why:
                    skipped.append(UpgradedRole(role=row.kind, host=row.host, reason=why))
                    progress(FleetProgress(role=row.kind, host=row.host, step="skip", detail=why))
                    continue
                one = time.monotonic()
                progress(FleetProgress(role=row.kind, host=row.host, step="upgrade", phase="started"))
                try:
                    await self._upgrade_one(row, progress)
                except SitecloudError as err:
                    raise Unavailable(
                        f"upgrade stopped at {row.kind} on {row.host}: {err.message}",
                        hint="the roles after it were not touched; fix it and run `sitecloud upgrade` again",
                    ) from err
                seconds = round(time.monotonic() - one, 2)
                upgraded.append(UpgradedRole(role=row.kind, host=row.host, seconds=seconds))
                progress(
                    FleetProgress(role=row.kind, host=row.host, step="upgrade", phase="done", seconds=seconds)
                )
            return UpgradeOutcome(
                code=digest, upgraded=upgraded, skipped=skipped, seconds=round(time.monotonic() - started, 2)
            )

    def _skip(self, row: _RoleRow, digest: str, force: bool) -> str:
        if row.desired_state != "running":
            return "stopped"
        if row.fabric == "local" and row.kind == "management":
            return "serves this request; restart it with `sitecloud role restart management localhost`"
        if row.fabric == "local":
            # A process here runs the checkout's code as it was when the process started.
            started_on = _read_or_empty(
                RoleSpec(row.kind, LOCAL_HOST, self.home.role_home(row.kind)).code_file
            )
            if not force and started_on == digest:
                return f"already on {digest}"
            return ""
        if not force and row.code_hash == digest:
            return f"already on {digest}"
        return ""

    async def _upgrade_one(self, row: _RoleRow, progress: Progress) -> None:
        try:
            if row.fabric == "local":
                await self._drain(row, progress)
                await self._act_local(row, "restart", lambda _: None)  # the upgrade reports its own steps
            else:
                async with self._host(row.host):
                    await self._drain(row, progress)
                    await self._install(row, progress)
                await self._ready(row, progress)
        finally:
            self.hooks.route_around(row.id, False)
        await self.hooks.converge()


def _read_or_empty(path: Path) -> str:
    try:
        return path.read_text().strip()
    except OSError:
        return ""
