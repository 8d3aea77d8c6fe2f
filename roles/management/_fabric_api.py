"""Hosts, roles and upgrades in the REST API (admin only); the work is in :mod:`roles.management._fabric`.

| call | body → answer |
| --- | --- |
| ``GET /api/v1/hosts`` | ``{"hosts": [{name, fabric, address, state, roles}], "next_cursor"}`` |
| ``POST /api/v1/hosts`` | ``{name, fabric}`` → 201 host (provisioned) |
| ``DELETE /api/v1/hosts/{name}`` | 204 (a host with roles is refused) |
| ``GET /api/v1/roles`` | ``{"roles": [...], "next_cursor"}`` |
| ``POST /api/v1/roles`` | ``{role, host, ssh_user?, ssh_key?, size?, reserved_for?}`` → NDJSON |
| ``POST /api/v1/roles/{role}/{host}/{action}`` | start, stop, restart, repair, remove; ``{confirm?}`` → NDJSON |
| ``POST /api/v1/upgrade`` | ``{force?}`` → NDJSON |

Stopping or removing the last running management role is refused (409); the last running worker or
front end needs ``{"confirm": true}`` (else 400 ``confirmation_required``).
"""

from __future__ import annotations

from typing import Any

from aiohttp import web

from roles.management import _models as m
from roles.management._fabric import ACTIONS, KINDS
from roles.management._openapi import HOST, Operation, Param
from roles.management._paging import paged
from roles.management._request import NDJSON, body_of, page_of, principal, relay_lines, service_of

__all__ = ["fabric_operations"]


async def list_hosts(request: web.Request) -> web.Response:
    q, page = page_of(request, m.HostListQuery)
    hosts = (await service_of(request).fabric.list_hosts(await principal(request)))["hosts"]
    chosen = [h for h in hosts if q.fabric is None or h["fabric"] == q.fabric]
    items, cursor = paged(chosen, lambda h: str(h["name"]), page, str)
    return web.json_response({"hosts": items, "next_cursor": cursor})


async def create_host(request: web.Request) -> web.Response:
    who = await principal(request)
    body = body_of(request, m.HostCreate)
    host = await service_of(request).fabric.create_host(who, body.name, body.fabric)
    return web.json_response(host, status=201)


async def delete_host(request: web.Request) -> web.Response:
    await service_of(request).fabric.delete_host(await principal(request), request.match_info["name"])
    return web.Response(status=204)


def _role_key(role: dict[str, Any]) -> str:
    # Role kinds are lower-case words: a space sorts before any of their letters, so this orders
    # by kind, then host, as the list is.
    return f"{role['role']} {role['host']}"


async def list_roles(request: web.Request) -> web.Response:
    q, page = page_of(request, m.RoleListQuery)
    roles = (await service_of(request).fabric.list_roles(await principal(request)))["roles"]
    chosen = sorted(
        (
            r
            for r in roles
            if (q.role is None or r["role"] == q.role) and (q.host is None or r["host"] == q.host)
        ),
        key=_role_key,
    )
    items, cursor = paged(chosen, _role_key, page, str)
    return web.json_response({"roles": items, "next_cursor": cursor})


async def add_role(request: web.Request) -> web.StreamResponse:
    who = await principal(request)
    body = body_of(request, m.RoleAdd).fields()
    return await relay_lines(request, service_of(request).fabric.add_role(who, body))


async def role_action(request: web.Request) -> web.StreamResponse:
    who = await principal(request)
    p = request.match_info
    wanted = body_of(request, m.RoleActionRequest)
    return await relay_lines(
        request,
        service_of(request).fabric.role_action(
            who, p["role"], p["host"], p["action"], confirmed=wanted.confirm, forget=wanted.forget
        ),
    )


async def upgrade(request: web.Request) -> web.StreamResponse:
    who = await principal(request)
    force = body_of(request, m.UpgradeRequest).force
    return await relay_lines(request, service_of(request).fabric.upgrade(who, force=force))


_ROLE = Param("role", {"type": "string", "enum": list(KINDS)}, "role kind")
_ROLE_HOST = Param("host", HOST.schema, "host name")
_ACTION = Param("action", {"type": "string", "enum": list(ACTIONS)}, "what to do")


def fabric_operations() -> list[Operation]:
    p = "/api/v1"
    admin = (403, 503)
    return [
        Operation(
            "GET",
            f"{p}/hosts",
            list_hosts,
            "list_hosts",
            "Role hosts (admin)",
            "fabric",
            answer=m.HostList,
            query=m.HostListQuery,
            errors=admin,
        ),
        Operation(
            "POST",
            f"{p}/hosts",
            create_host,
            "create_host",
            "Provision a host on a fabric (admin)",
            "fabric",
            ok=201,
            answer=m.HostInfo,
            body=m.HostCreate,
            errors=(*admin, 409),
        ),
        Operation(
            "DELETE",
            f"{p}/hosts/{{name}}",
            delete_host,
            "delete_host",
            "Destroy a host without roles (admin)",
            "fabric",
            ok=204,
            params=(HOST,),
            errors=(*admin, 409),
        ),
        Operation(
            "GET",
            f"{p}/roles",
            list_roles,
            "list_roles",
            "Role processes, their health, code and config versions (admin)",
            "roles",
            answer=m.RoleList,
            query=m.RoleListQuery,
            errors=admin,
        ),
        Operation(
            "POST",
            f"{p}/roles",
            add_role,
            "add_role",
            "Add a role on a host by DNS name (admin); progress lines, then the result",
            "roles",
            content=NDJSON,
            body=m.RoleAdd,
            errors=(*admin, 404, 409),
        ),
        Operation(
            "POST",
            f"{p}/roles/{{role}}/{{host}}/{{action}}",
            role_action,
            "role_action",
            "Start, stop, restart, repair or remove a role (admin); progress lines, then the result",
            "roles",
            content=NDJSON,
            params=(_ROLE, _ROLE_HOST, _ACTION),
            body=m.RoleActionRequest,
            body_required=False,
            errors=(*admin, 409),
        ),
        Operation(
            "POST",
            f"{p}/upgrade",
            upgrade,
            "upgrade",
            "Rolling upgrade of every role to the current code (admin); progress lines, then the result",
            "roles",
            content=NDJSON,
            body=m.UpgradeRequest,
            body_required=False,
            errors=admin,
        ),
    ]
