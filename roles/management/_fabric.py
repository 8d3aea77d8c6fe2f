"""Hosts, roles and upgrades: the fabric side of the management service (admin only).

Management writes what the admin wants (a host row, a role row with its size, reservation and desired
run state) and asks the controller over mTLS to act on it. Long operations (role add, the role actions,
upgrade) yield the controller's progress lines (NDJSON) as they happen; the last line is
``{"result": ...}`` or ``{"error": {...}}``. The REST API streams them on; the portal waits for the
outcome (:func:`outcome`).
"""

from __future__ import annotations

import asyncio
import datetime as dt
import json
from collections.abc import AsyncIterator, Sequence
from typing import Any

import aiohttp
from sqlalchemy import select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import joinedload

from roles.management._store import WORKER_SIZES, Principal, iso, require_admin
from roles.management.config import ManagementConfig
from shared.config import ROLE_KINDS
from shared.contracts.answers import parse_answer
from shared.contracts.fleet import (
    FleetEnd,
    HostCreate,
    HostCreated,
    RoleAdd,
    RoleOutcome,
    UpgradeOutcome,
    UpgradeRequest,
)
from shared.db import DEFAULT_WORKER_SIZE, Database, Host, Role, Subscription, current_generation
from shared.disk import disk_space
from shared.errors import (
    AlreadyExists,
    ConfirmationRequired,
    InUse,
    InvalidInput,
    NotFound,
    NotSupported,
    SitecloudError,
    Unavailable,
    error_from_json,
)
from shared.internal import InternalClient
from shared.names import validate_hostname
from shared.states import RoleState

__all__ = ["ACTIONS", "FABRICS", "KINDS", "SITES_NEED", "FabricService", "last_running", "outcome"]

Json = dict[str, Any]

FABRICS = ("netns", "ssh")
ACTIONS = ("start", "stop", "restart", "repair", "remove")
KINDS = tuple(k for k in ROLE_KINDS if k != "controller")
# Installing a role may take minutes on a cold host; lines arrive as steps end.
_STREAM_TIMEOUT = 3600.0
# Under this much free space, a local runtime DB cannot take the controller's writes.
_DB_ROOM = 1024 * 1024


# -- the DB (synchronous; run in a thread) ---------------------------------------------------------


def _host_json(host: Host) -> Json:
    return {
        "name": host.name,
        "fabric": host.fabric,
        "address": host.address,
        "state": host.state,
        "roles": sorted(r.kind for r in host.roles),
    }


def _list_hosts(db: Database) -> Json:
    with db.session() as s:
        hosts = s.scalars(select(Host).options(joinedload(Host.roles)).order_by(Host.name)).unique()
        return {"hosts": [_host_json(h) for h in hosts]}


def _create_host(db: Database, name: str, fabric: str) -> None:
    with db.session() as s:
        existing = s.scalar(select(Host).where(Host.name == name))
        if existing is not None:
            if existing.state != "failed":
                raise AlreadyExists(f"host {name} already exists", hint="see the list of hosts")
            existing.fabric = fabric
            existing.state = "provisioning"
            return
        s.add(Host(name=name, fabric=fabric, address="", state="provisioning"))


def _check_host_delete(db: Database, name: str) -> None:
    with db.session() as s:
        host = s.scalar(select(Host).where(Host.name == name).options(joinedload(Host.roles)))
        if host is None:
            raise NotFound(f"no host {name}", hint="see the list of hosts")
        if host.fabric == "local":
            raise NotSupported("the local host is this machine: it cannot be deleted")
        if host.roles:
            kinds = ", ".join(sorted(r.kind for r in host.roles))
            raise InvalidInput(f"host {name} still runs {kinds}", hint="remove its roles first")


def _delete_host(db: Database, name: str) -> None:
    with db.session() as s:
        host = s.scalar(select(Host).where(Host.name == name))
        if host is not None:
            s.delete(host)


def _list_roles(db: Database, stale_after: dt.timedelta) -> Json:
    now = dt.datetime.now(dt.UTC)
    unrecorded = _why_unrecorded(db)
    with db.session() as s:
        desired = current_generation(s)
        rows = s.scalars(select(Role).options(joinedload(Role.host)))
        roles = [
            {
                "role": r.kind,
                "host": r.host.name,
                "fabric": r.host.fabric,
                "host_state": r.host.state,
                **_seen_state(r, now, stale_after, unrecorded),
                "desired_state": r.desired_state,
                "config_version": r.config_version,
                "desired_version": desired,
                "code_version": r.code_version,
                "code_hash": r.code_hash,
                "size": r.size,
                "reserved_for": r.reserved_for_id,
                "last_heartbeat": iso(r.last_heartbeat),
                "load": r.load or {},
            }
            for r in rows
        ]
    roles.sort(key=lambda r: (r["role"], r["host"]))
    return {"roles": roles}


def _why_unrecorded(db: Database) -> str | None:
    """Why the controller cannot record what it sees, where this can tell: a local DB's full disk."""
    path = db.local_file()
    if path is None:
        return None
    try:
        space = disk_space(path.parent)
    except OSError:
        return None
    if space.free >= _DB_ROOM:
        return None
    return (
        f"the runtime DB's disk is full ({space.describe()}), so the controller cannot record what it "
        f"sees; free disk space there ({path.parent})"
    )


def _seen_state(
    role: Role, now: dt.datetime, stale_after: dt.timedelta, unrecorded: str | None = None
) -> dict[str, str]:
    """The role's state as the controller last recorded it; Unknown once that is stale (the
    controller is not running, or cannot reach the DB), rather than a Ready nobody checks."""
    beat = role.last_heartbeat
    if beat is not None and beat.tzinfo is None:
        beat = beat.replace(tzinfo=dt.UTC)
    if role.state in (RoleState.READY, RoleState.DEGRADED) and beat is not None and now - beat > stale_after:
        silent = int((now - beat).total_seconds())
        why = unrecorded or "is the controller running? `sitecloud up` runs it"
        return {"state": "Unknown", "reason": f"last checked {silent} s ago (then {role.state}): {why}"}
    return {"state": role.state, "reason": role.reason}


def _add_role(db: Database, body: Json) -> int:
    """The role row (state Installing) for ``role add``; its id. A failed one may be added again."""
    kind, host_name = body.get("role"), body.get("host")
    if kind not in KINDS:
        raise InvalidInput(f"{kind!r} is not a role", hint=f"one of {', '.join(KINDS)}")
    if not isinstance(host_name, str):
        raise InvalidInput("'host' is required")
    host_name = validate_hostname(host_name)
    size, reserved = body.get("size"), body.get("reserved_for")
    if size is not None and (kind != "worker" or size not in WORKER_SIZES):
        raise InvalidInput("--size is for workers: small, medium or large")
    if reserved is not None and (kind != "worker" or not isinstance(reserved, int)):
        raise InvalidInput("--reserved-for takes a subscription id, and is for workers")
    with db.session() as s:
        if reserved is not None:
            subscription = s.get(Subscription, reserved)
            if subscription is None:
                raise NotFound(f"no subscription {reserved}", hint="see the list of subscriptions")
            _check_reserved_size(subscription, size or DEFAULT_WORKER_SIZE)
        host = s.scalar(select(Host).where(Host.name == host_name))
        if host is None:
            # A host never created here is an existing machine reached over SSH by its DNS name; it
            # is ready once the controller has reached it.
            host = Host(name=host_name, fabric="ssh", address="", state="provisioning")
            s.add(host)
            s.flush()
        elif host.fabric == "local":
            raise NotSupported(
                "roles on this machine are the ones the cloud was started with",
                hint="add the role on another host, or start the cloud again with --local-roles",
            )
        if kind == "fileserver":
            _refuse_a_second_fileserver(s, host)
        role = s.scalar(select(Role).where(Role.kind == kind, Role.host_id == host.id))
        if role is not None and role.state not in ("Failed", "Installing"):
            raise AlreadyExists(f"{host_name} already runs a {kind}", hint="repair that role instead")
        if role is None:
            role = Role(kind=kind, host_id=host.id, control_port=0, ports={})
            s.add(role)
        role.state, role.reason, role.desired_state = "Installing", "", "running"
        role.size, role.reserved_for_id = size, reserved
        try:
            s.flush()
        except IntegrityError as exc:
            raise AlreadyExists(f"{host_name} already runs a {kind}") from exc
        return role.id


def _check_reserved_size(subscription: Subscription, size: str) -> None:
    """A worker reserved for a subscription whose plan is reserved for another size would take none of
    its sites (they go only to workers of the plan's size): refused before anything is installed."""
    plan = subscription.plan
    wanted = plan.worker_size or DEFAULT_WORKER_SIZE
    if plan.compute_mode == "reserved" and size != wanted:
        raise InvalidInput(
            f"subscription {subscription.id}'s plan {plan.name} runs its sites on {wanted} workers: a {size} "
            "worker reserved for it would take none of them",
            hint=f"add it with --size {wanted}",
        )


def _refuse_a_second_fileserver(s: Any, host: Host) -> None:
    """The fileserver holds every site's content, and several sharing it is not supported yet: a second
    one would become the cloud's content store (a remote one is chosen before this machine's) while
    holding none of it, so deploys would land there as new version numbers the workers think they have
    and management would read the old one's. Refused before anything is installed."""
    other = s.scalar(
        select(Host.name)
        .join(Role, Role.host_id == Host.id)
        .where(Role.kind == "fileserver", Host.id != host.id)
    )
    if other is not None:
        raise InUse(
            f"the cloud's fileserver runs on {other}, and several fileservers sharing the content are not "
            "supported yet: another one would take over as the content store without the content",
            hint="keep the one on " + other + "; to put the content on a new host, back the cloud up "
            "(sitecloud backup create) and restore it into a cloud started with --local-roles management",
        )


# Roles of these kinds carry every site: stopping the last one that runs takes every site down.
SITES_NEED = {"worker": "workers serve them", "frontend": "visitors reach them through front ends"}
_DOING = {"stop": "stopping", "remove": "removing"}
_SERVING = (RoleState.READY, RoleState.DEGRADED)


def last_running(roles: Sequence[Json], kind: str, host: str) -> bool:
    """Whether ``kind`` on ``host`` (from :func:`_list_roles`) is meant to run and no other role of
    its kind serves: stopping or removing it leaves none."""
    this = next((r for r in roles if r["role"] == kind and r["host"] == host), None)
    if this is None or this["desired_state"] != "running":
        return False
    return not any(
        r["role"] == kind and r["host"] != host and r["desired_state"] == "running" and r["state"] in _SERVING
        for r in roles
    )


def _check_not_last(roles: Sequence[Json], kind: str, host: str, action: str, *, confirmed: bool) -> None:
    """Refuse stopping or removing the last running management role (nothing could start it again:
    the CLI and the portals reach the cloud only through it), and ask for a confirmation before the
    last running worker or front end goes."""
    if action not in _DOING or not last_running(roles, kind, host):
        return
    doing = _DOING[action]
    if kind == "management":
        raise InUse(
            f"management on {host} is the last running management role: {doing} it would lock "
            "every admin out, as the CLI and the portals reach the cloud only through it "
            "(and `role start` would have nothing to go through)",
            hint=f"to restart it: `sitecloud role restart management {host}`; to move it, "
            "add a management role on another host first",
        )
    need = SITES_NEED.get(kind)
    if need is not None and not confirmed:
        raise ConfirmationRequired(
            f"not confirmed: {doing} {kind} on {host}, the last running {kind}, takes "
            f"every site down until one runs again ({need})",
            hint='pass --yes to confirm (API: {"confirm": true})',
        )


def _role_for_action(
    db: Database, kind: str, host_name: str, action: str, *, confirmed: bool, stale_after: dt.timedelta
) -> int:
    if kind not in KINDS:
        raise InvalidInput(f"{kind!r} is not a role", hint=f"one of {', '.join(KINDS)}")
    if action not in ACTIONS:
        raise InvalidInput(f"no role action {action!r}", hint=f"one of {', '.join(ACTIONS)}")
    roles = _list_roles(db, stale_after)["roles"]
    with db.session() as s:
        role = s.scalar(select(Role).join(Host).where(Role.kind == kind, Host.name == host_name.lower()))
        if role is None:
            raise NotFound(f"no {kind} role on {host_name}", hint="see the list of roles")
        _check_not_last(roles, kind, role.host.name, action, confirmed=confirmed)
        if action == "stop":
            role.desired_state = "stopped"
        elif action != "remove":
            role.desired_state = "running"
        return role.id


class FabricService:
    """Every fabric operation, with the caller's rights checked; shared by the API and the portal."""

    def __init__(self, config: ManagementConfig, db: Database) -> None:
        self.config = config
        self.db = db
        self._stale_after = dt.timedelta(seconds=config.role_stale_after)

    def _controller(self) -> str:
        if not self.config.controller_url:
            raise Unavailable("no controller is configured for this management role")
        return self.config.controller_url.rstrip("/")

    async def _call(self, method: str, path: str, body: Json | None = None) -> Any:
        client = InternalClient(self.config, timeout=120)
        try:
            return await client.request_json(method, f"{self._controller()}{path}", json=body)
        finally:
            await client.close()

    async def _stream(self, path: str, body: Json) -> AsyncIterator[bytes]:
        """POST to the controller and yield its NDJSON lines as they come.

        An error answer raises before the first line, so callers can still answer it as an error.
        """
        client = InternalClient(self.config, timeout=_STREAM_TIMEOUT)
        try:
            async with client.session.post(f"{self._controller()}{path}", json=body) as upstream:
                if upstream.status >= 400:
                    raise error_from_json(upstream.status, await upstream.json(content_type=None))
                async for line in upstream.content:
                    yield line
        except (aiohttp.ClientConnectionError, TimeoutError) as exc:
            raise Unavailable(f"cannot reach the controller: {exc or type(exc).__name__}") from exc
        finally:
            await client.close()

    async def list_hosts(self, who: Principal) -> Json:
        require_admin(who)
        return await asyncio.to_thread(_list_hosts, self.db)

    async def create_host(self, who: Principal, name: Any, fabric: Any) -> Json:
        require_admin(who)
        if not isinstance(name, str):
            raise InvalidInput("'name' is required")
        name = validate_hostname(name)
        if fabric not in FABRICS:
            raise InvalidInput(
                f"no fabric {fabric!r} to create hosts with", hint=f"one of {', '.join(FABRICS)}"
            )
        await asyncio.to_thread(_create_host, self.db, name, fabric)
        try:
            host = parse_answer(
                HostCreated,
                await self._call("POST", "/v1/hosts", HostCreate(name=name).to_json()),
                peer="the controller",
            )
        except BaseException:
            await asyncio.to_thread(_delete_host, self.db, name)
            raise
        return host.to_json()

    async def delete_host(self, who: Principal, name: str) -> None:
        require_admin(who)
        name = validate_hostname(name)
        await asyncio.to_thread(_check_host_delete, self.db, name)
        await self._call("DELETE", f"/v1/hosts/{name}")
        await asyncio.to_thread(_delete_host, self.db, name)

    async def list_roles(self, who: Principal) -> Json:
        require_admin(who)
        return await asyncio.to_thread(_list_roles, self.db, self._stale_after)

    async def add_role(self, who: Principal, body: Json) -> AsyncIterator[bytes]:
        require_admin(who)
        role_id = await asyncio.to_thread(_add_role, self.db, body)
        ssh = {k: body[k] for k in ("ssh_user", "ssh_key") if isinstance(body.get(k), str) and body[k]}
        async for line in self._stream("/v1/roles", RoleAdd(id=role_id, **ssh).to_json()):
            yield line

    async def role_action(
        self,
        who: Principal,
        kind: str,
        host: str,
        action: str,
        *,
        confirmed: bool = False,
        forget: bool = False,
    ) -> AsyncIterator[bytes]:
        """``confirmed``: the admin agreed to stop or remove the last running worker or front end;
        ``forget``: a remove whose host cannot be reached deletes the role's record anyway."""
        require_admin(who)
        if forget and action != "remove":
            raise InvalidInput(
                "forget goes with remove only", hint="sitecloud role remove KIND HOST --forget"
            )
        role_id = await asyncio.to_thread(
            _role_for_action, self.db, kind, host, action, confirmed=confirmed, stale_after=self._stale_after
        )
        path = f"/v1/roles/{role_id}/{action}" + ("?forget=1" if forget else "")
        async for line in self._stream(path, {}):
            yield line

    async def upgrade(self, who: Principal, *, force: bool) -> AsyncIterator[bytes]:
        require_admin(who)
        async for line in self._stream("/v1/upgrade", UpgradeRequest(force=force).to_json()):
            yield line


async def outcome(lines: AsyncIterator[bytes]) -> RoleOutcome | UpgradeOutcome:
    """Wait for a long operation to end: its outcome, or the error it ended with, raised."""
    last = b""
    async for line in lines:
        if line.strip():
            last = line
    try:
        data = json.loads(last) if last else {}
    except ValueError:
        raise Unavailable("the controller's stream ended in a line that is not JSON") from None
    end = parse_answer(FleetEnd, data, peer="the controller")
    if end.error is not None:
        raise error_from_json(500, {"error": end.error.to_json()})
    if end.result is None:
        raise SitecloudError("the controller ended the operation without a result")
    return end.result
