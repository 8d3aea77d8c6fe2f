"""Hosts, roles and upgrades in the REST API (admin only): desired state into the DB, then the controller.

Management writes what the admin wants (a host row, a role row with its size, reservation and desired
run state) and asks the controller over mTLS to act on it. Long operations (role add and the role
actions, upgrade) answer ``application/x-ndjson``: the controller's progress lines as they happen, and a
last line ``{"result": ...}`` or ``{"error": {...}}``.

| call | body → answer |
| --- | --- |
| ``GET /api/v1/hosts`` | ``{"hosts": [{name, fabric, address, state, roles}]}`` |
| ``POST /api/v1/hosts`` | ``{name, fabric}`` → 201 host (provisioned) |
| ``DELETE /api/v1/hosts/{name}`` | 204 (a host with roles is refused) |
| ``GET /api/v1/roles`` | ``{"roles": [...]}`` |
| ``POST /api/v1/roles`` | ``{role, host, ssh_user?, ssh_key?, size?, reserved_for?}`` → NDJSON |
| ``POST /api/v1/roles/{role}/{host}/{action}`` | start, stop, restart, repair, remove → NDJSON |
| ``POST /api/v1/upgrade`` | ``{force?}`` → NDJSON |
"""

from __future__ import annotations

import asyncio
from typing import Any

import aiohttp
from aiohttp import web
from sqlalchemy import select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import joinedload

from roles.management._store import WORKER_SIZES, iso, require_admin
from roles.management.api import json_body, principal, service_of
from roles.management.config import ManagementConfig
from shared.config import ROLE_KINDS
from shared.db import Database, Host, Role, Subscription, current_generation
from shared.errors import AlreadyExists, InvalidInput, NotFound, NotSupported, Unavailable, error_from_json
from shared.internal import InternalClient
from shared.names import validate_hostname

__all__ = ["fabric_openapi_paths", "fabric_routes"]

Json = dict[str, Any]

_FABRICS = ("netns", "ssh")
_ACTIONS = ("start", "stop", "restart", "repair", "remove")
_KINDS = tuple(k for k in ROLE_KINDS if k != "controller")
# Installing a role may take minutes on a cold host; lines arrive as steps end.
_STREAM_TIMEOUT = 3600.0


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
                raise AlreadyExists(f"host {name} already exists", hint="see `sitecloud host list`")
            existing.fabric = fabric
            existing.state = "provisioning"
            return
        s.add(Host(name=name, fabric=fabric, address="", state="provisioning"))


def _check_host_delete(db: Database, name: str) -> None:
    with db.session() as s:
        host = s.scalar(select(Host).where(Host.name == name).options(joinedload(Host.roles)))
        if host is None:
            raise NotFound(f"no host {name}", hint="see `sitecloud host list`")
        if host.fabric == "local":
            raise NotSupported("the local host is this machine: it cannot be deleted")
        if host.roles:
            kinds = ", ".join(sorted(r.kind for r in host.roles))
            raise InvalidInput(
                f"host {name} still runs {kinds}", hint=f"sitecloud role remove ROLE {name} first"
            )


def _delete_host(db: Database, name: str) -> None:
    with db.session() as s:
        host = s.scalar(select(Host).where(Host.name == name))
        if host is not None:
            s.delete(host)


def _list_roles(db: Database) -> Json:
    with db.session() as s:
        desired = current_generation(s)
        rows = s.scalars(select(Role).options(joinedload(Role.host)))
        roles = [
            {
                "role": r.kind,
                "host": r.host.name,
                "fabric": r.host.fabric,
                "host_state": r.host.state,
                "state": r.state,
                "reason": r.reason,
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


def _add_role(db: Database, body: Json) -> int:
    """The role row (state Installing) for ``role add``; its id. A failed one may be added again."""
    kind, host_name = body.get("role"), body.get("host")
    if kind not in _KINDS:
        raise InvalidInput(f"{kind!r} is not a role", hint=f"one of {', '.join(_KINDS)}")
    if not isinstance(host_name, str):
        raise InvalidInput("'host' is required")
    host_name = validate_hostname(host_name)
    size, reserved = body.get("size"), body.get("reserved_for")
    if size is not None and (kind != "worker" or size not in WORKER_SIZES):
        raise InvalidInput("--size is for workers: small, medium or large")
    if reserved is not None and (kind != "worker" or not isinstance(reserved, int)):
        raise InvalidInput("--reserved-for takes a subscription id, and is for workers")
    with db.session() as s:
        if reserved is not None and s.get(Subscription, reserved) is None:
            raise NotFound(f"no subscription {reserved}", hint="see `sitecloud subscription list`")
        host = s.scalar(select(Host).where(Host.name == host_name))
        if host is None:
            # A host never created here is an existing machine reached over SSH by its DNS name.
            host = Host(name=host_name, fabric="ssh", address="", state="ready")
            s.add(host)
            s.flush()
        elif host.fabric == "local":
            raise NotSupported(
                "roles on this machine are the ones `sitecloud up` runs",
                hint="add the role on another host, or restart `up` with --local-roles",
            )
        role = s.scalar(select(Role).where(Role.kind == kind, Role.host_id == host.id))
        if role is not None and role.state not in ("Failed", "Installing"):
            raise AlreadyExists(
                f"{host_name} already runs a {kind}", hint=f"sitecloud role repair {kind} {host_name}"
            )
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


def _role_for_action(db: Database, kind: str, host_name: str, action: str) -> int:
    if kind not in _KINDS:
        raise InvalidInput(f"{kind!r} is not a role", hint=f"one of {', '.join(_KINDS)}")
    if action not in _ACTIONS:
        raise InvalidInput(f"no role action {action!r}", hint=f"one of {', '.join(_ACTIONS)}")
    with db.session() as s:
        role = s.scalar(select(Role).join(Host).where(Role.kind == kind, Host.name == host_name.lower()))
        if role is None:
            raise NotFound(f"no {kind} role on {host_name}", hint="see `sitecloud role list`")
        if action == "stop":
            role.desired_state = "stopped"
        elif action != "remove":
            role.desired_state = "running"
        return role.id


# -- calls to the controller -----------------------------------------------------------------------


def _controller(config: ManagementConfig) -> str:
    if not config.controller_url:
        raise Unavailable("no controller is configured for this management role")
    return config.controller_url.rstrip("/")


async def _relay(request: web.Request, path: str, body: Json) -> web.StreamResponse:
    """POST to the controller and pass its NDJSON lines on to the caller as they come."""
    config = service_of(request).config
    client = InternalClient(config, timeout=_STREAM_TIMEOUT)
    try:
        async with client.session.post(f"{_controller(config)}{path}", json=body) as upstream:
            if upstream.status >= 400:
                raise error_from_json(upstream.status, await upstream.json(content_type=None))
            out = web.StreamResponse(
                headers={"Content-Type": "application/x-ndjson", "Cache-Control": "no-store"}
            )
            await out.prepare(request)
            async for line in upstream.content:
                await out.write(line)
            await out.write_eof()
            return out
    except (aiohttp.ClientConnectionError, TimeoutError) as exc:
        raise Unavailable(f"cannot reach the controller: {exc or type(exc).__name__}") from exc
    finally:
        await client.close()


async def _call(request: web.Request, method: str, path: str, body: Json | None = None) -> Any:
    config = service_of(request).config
    client = InternalClient(config, timeout=120)
    try:
        return await client.request_json(method, f"{_controller(config)}{path}", json=body)
    finally:
        await client.close()


# -- handlers --------------------------------------------------------------------------------------


async def _admin_db(request: web.Request) -> Database:
    require_admin(await principal(request))
    return service_of(request).db


async def list_hosts(request: web.Request) -> web.Response:
    db = await _admin_db(request)
    return web.json_response(await asyncio.to_thread(_list_hosts, db))


async def create_host(request: web.Request) -> web.Response:
    db = await _admin_db(request)
    body = await json_body(request)
    name, fabric = body.get("name"), body.get("fabric", "netns")
    if not isinstance(name, str):
        raise InvalidInput("'name' is required")
    name = validate_hostname(name)
    if fabric not in _FABRICS:
        raise InvalidInput(f"no fabric {fabric!r} to create hosts with", hint=f"one of {', '.join(_FABRICS)}")
    await asyncio.to_thread(_create_host, db, name, fabric)
    try:
        host = await _call(request, "POST", "/v1/hosts", {"name": name})
    except BaseException:
        await asyncio.to_thread(_delete_host, db, name)
        raise
    return web.json_response(host, status=201)


async def delete_host(request: web.Request) -> web.Response:
    db = await _admin_db(request)
    name = validate_hostname(request.match_info["name"])
    await asyncio.to_thread(_check_host_delete, db, name)
    await _call(request, "DELETE", f"/v1/hosts/{name}")
    await asyncio.to_thread(_delete_host, db, name)
    return web.Response(status=204)


async def list_roles(request: web.Request) -> web.Response:
    db = await _admin_db(request)
    return web.json_response(await asyncio.to_thread(_list_roles, db))


async def add_role(request: web.Request) -> web.StreamResponse:
    db = await _admin_db(request)
    body = await json_body(request)
    role_id = await asyncio.to_thread(_add_role, db, body)
    ssh = {k: body[k] for k in ("ssh_user", "ssh_key") if isinstance(body.get(k), str) and body[k]}
    return await _relay(request, "/v1/roles", {"id": role_id, **ssh})


async def role_action(request: web.Request) -> web.StreamResponse:
    db = await _admin_db(request)
    m = request.match_info
    role_id = await asyncio.to_thread(_role_for_action, db, m["role"], m["host"], m["action"])
    return await _relay(request, f"/v1/roles/{role_id}/{m['action']}", {})


async def upgrade(request: web.Request) -> web.StreamResponse:
    await _admin_db(request)
    body = await json_body(request) if request.can_read_body else {}
    return await _relay(request, "/v1/upgrade", {"force": bool(body.get("force", False))})


def fabric_routes() -> list[web.RouteDef]:
    p = "/api/v1"
    return [
        web.get(f"{p}/hosts", list_hosts),
        web.post(f"{p}/hosts", create_host),
        web.delete(f"{p}/hosts/{{name}}", delete_host),
        web.get(f"{p}/roles", list_roles),
        web.post(f"{p}/roles", add_role),
        web.post(f"{p}/roles/{{role}}/{{host}}/{{action}}", role_action),
        web.post(f"{p}/upgrade", upgrade),
    ]


# -- the OpenAPI description of these routes (merged into /openapi.json) ---------------------------


def _error() -> Json:
    return {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}


def _doc(
    summary: str, ok: int, answer: Json | None, *, body: Json | None = None, errors: tuple[int, ...] = ()
) -> Json:
    responses: Json = {}
    if ok == 204:
        responses["204"] = {"description": "done"}
    elif answer is None:
        responses[str(ok)] = {
            "description": "progress lines as they happen, then {result} or {error}",
            "content": {"application/x-ndjson": {"schema": {"type": "object"}}},
        }
    else:
        responses[str(ok)] = {"description": "OK", "content": {"application/json": {"schema": answer}}}
    codes = {401, 403, 503, *errors} | ({400} if body else set())
    for code in sorted(codes):
        responses[str(code)] = {"description": f"error {code}", "content": _error()}
    out: Json = {"summary": summary, "tags": ["fabric"], "responses": responses}
    if body is not None:
        out["requestBody"] = {"required": True, "content": {"application/json": {"schema": body}}}
    return out


_HOSTNAME = {"type": "string", "minLength": 1, "maxLength": 253}
_OBJ: Json = {"type": "object"}


def fabric_openapi_paths() -> Json:
    """The OpenAPI ``paths`` entries of :func:`fabric_routes`."""
    host_param = {"name": "name", "in": "path", "required": True, "schema": _HOSTNAME}
    role_params = [
        {"name": "role", "in": "path", "required": True, "schema": {"type": "string", "enum": list(_KINDS)}},
        {"name": "host", "in": "path", "required": True, "schema": _HOSTNAME},
        {
            "name": "action",
            "in": "path",
            "required": True,
            "schema": {"type": "string", "enum": list(_ACTIONS)},
        },
    ]
    host_body = {
        "type": "object",
        "properties": {"name": _HOSTNAME, "fabric": {"type": "string", "enum": list(_FABRICS)}},
        "required": ["name"],
    }
    role_body = {
        "type": "object",
        "properties": {
            "role": {"type": "string", "enum": list(_KINDS)},
            "host": _HOSTNAME,
            "ssh_user": {"type": "string"},
            "ssh_key": {"type": "string", "description": "a key file on the controller's machine"},
            "size": {"type": "string", "enum": list(WORKER_SIZES)},
            "reserved_for": {"type": "integer", "description": "a subscription id (workers only)"},
        },
        "required": ["role", "host"],
    }
    upgrade_body = {"type": "object", "properties": {"force": {"type": "boolean"}}}
    return {
        "/api/v1/hosts": {
            "get": _doc("Role hosts (admin)", 200, _OBJ),
            "post": _doc("Provision a host on a fabric (admin)", 201, _OBJ, body=host_body, errors=(409,)),
        },
        "/api/v1/hosts/{name}": {
            "parameters": [host_param],
            "delete": _doc("Destroy a host without roles (admin)", 204, None, errors=(404, 409)),
        },
        "/api/v1/roles": {
            "get": _doc("Role processes, their health, code and config versions (admin)", 200, _OBJ),
            "post": _doc(
                "Add a role on a host by DNS name (admin)", 200, None, body=role_body, errors=(404, 409)
            ),
        },
        "/api/v1/roles/{role}/{host}/{action}": {
            "parameters": role_params,
            "post": _doc(
                "Start, stop, restart, repair or remove a role (admin)", 200, None, errors=(404, 409)
            ),
        },
        "/api/v1/upgrade": {
            "post": _doc(
                "Rolling upgrade of every role to the current code (admin)", 200, None, body=upgrade_body
            ),
        },
    }
