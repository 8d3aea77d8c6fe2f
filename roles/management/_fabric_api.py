"""Hosts, roles and upgrades in the REST API (admin only); the work is in :mod:`roles.management._fabric`.

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

from collections.abc import AsyncIterator
from typing import Any

from aiohttp import web

from roles.management._fabric import ACTIONS, FABRICS, KINDS
from roles.management._store import WORKER_SIZES
from roles.management.api import json_body, principal, service_of

__all__ = ["fabric_openapi_paths", "fabric_routes"]

Json = dict[str, Any]


async def _relay(request: web.Request, lines: AsyncIterator[bytes]) -> web.StreamResponse:
    """Pass progress lines on as they come; an error before the first line is answered as an error."""
    first = await anext(lines, b"")
    out = web.StreamResponse(headers={"Content-Type": "application/x-ndjson", "Cache-Control": "no-store"})
    await out.prepare(request)
    await out.write(first)
    async for line in lines:
        await out.write(line)
    await out.write_eof()
    return out


async def list_hosts(request: web.Request) -> web.Response:
    return web.json_response(await service_of(request).fabric.list_hosts(await principal(request)))


async def create_host(request: web.Request) -> web.Response:
    who = await principal(request)
    body = await json_body(request)
    host = await service_of(request).fabric.create_host(who, body.get("name"), body.get("fabric", "netns"))
    return web.json_response(host, status=201)


async def delete_host(request: web.Request) -> web.Response:
    await service_of(request).fabric.delete_host(await principal(request), request.match_info["name"])
    return web.Response(status=204)


async def list_roles(request: web.Request) -> web.Response:
    return web.json_response(await service_of(request).fabric.list_roles(await principal(request)))


async def add_role(request: web.Request) -> web.StreamResponse:
    who = await principal(request)
    body = await json_body(request)
    return await _relay(request, service_of(request).fabric.add_role(who, body))


async def role_action(request: web.Request) -> web.StreamResponse:
    who = await principal(request)
    m = request.match_info
    return await _relay(
        request, service_of(request).fabric.role_action(who, m["role"], m["host"], m["action"])
    )


async def upgrade(request: web.Request) -> web.StreamResponse:
    who = await principal(request)
    body = await json_body(request) if request.can_read_body else {}
    return await _relay(
        request, service_of(request).fabric.upgrade(who, force=bool(body.get("force", False)))
    )


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
        {"name": "role", "in": "path", "required": True, "schema": {"type": "string", "enum": list(KINDS)}},
        {"name": "host", "in": "path", "required": True, "schema": _HOSTNAME},
        {
            "name": "action",
            "in": "path",
            "required": True,
            "schema": {"type": "string", "enum": list(ACTIONS)},
        },
    ]
    host_body = {
        "type": "object",
        "properties": {"name": _HOSTNAME, "fabric": {"type": "string", "enum": list(FABRICS)}},
        "required": ["name"],
    }
    role_body = {
        "type": "object",
        "properties": {
            "role": {"type": "string", "enum": list(KINDS)},
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
