"""The controller's internal API for fabric work (mTLS; management and the controller may call it).

| call | body → answer |
| --- | --- |
| ``POST /v1/hosts`` | ``HostCreate`` (the host row management wrote) → ``HostCreated``, provisioned |
| ``DELETE /v1/hosts/{name}`` | → 204 once the fabric destroyed it |
| ``POST /v1/roles`` | ``RoleAdd`` → NDJSON: ``FleetProgress`` lines, then a ``FleetEnd`` (``RoleOutcome``) |
| ``POST /v1/roles/{id}/{action}`` | start, stop, restart, repair, remove → NDJSON as above |
| ``POST /v1/upgrade`` | ``UpgradeRequest`` → NDJSON as above, ending in an ``UpgradeOutcome`` |

The types are in :mod:`shared.contracts.fleet`. Long operations answer a stream of JSON lines: progress
steps as they happen, and a last line with the outcome or the error. The operation itself runs on even
if the caller goes away.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web

from roles.controller._fleet import Fleet, Progress
from shared.contracts._base import Contract
from shared.contracts.fleet import (
    ErrorDetail,
    FleetEnd,
    HostCreate,
    RoleAdd,
    RoleOutcome,
    UpgradeOutcome,
    UpgradeRequest,
)
from shared.errors import InvalidInput, SitecloudError
from shared.internal import require_role

__all__ = ["fleet_routes"]

_log = logging.getLogger("sitecloud.controller.fleet")
_CALLERS = ("management", "controller")
_ACTIONS = ("start", "stop", "restart", "repair", "remove")
_INTERNAL = "internal error in the controller; see its log"

Operation = Callable[[Progress], Awaitable[RoleOutcome | UpgradeOutcome]]
# Called after a host is made: the controller may now have to listen where that host reaches it.
HostAdded = Callable[[], Awaitable[None]]


async def _body(request: web.Request) -> dict[str, Any]:
    try:
        body = await request.json()
    except ValueError as exc:
        raise InvalidInput("the request body is not JSON") from exc
    if not isinstance(body, dict):
        raise InvalidInput("the request body must be a JSON object")
    return body


def fleet_routes(fleet: Fleet, host_added: HostAdded) -> list[web.RouteDef]:
    running: set[asyncio.Task[None]] = set()

    async def stream(request: web.Request, operation: Operation) -> web.StreamResponse:
        queue: asyncio.Queue[Contract | None] = asyncio.Queue()

        async def run() -> None:
            try:
                queue.put_nowait(FleetEnd(result=await operation(queue.put_nowait)))
            except SitecloudError as err:
                queue.put_nowait(
                    FleetEnd(error=ErrorDetail(code=err.code, message=err.message, hint=err.hint or None))
                )
            except Exception:
                _log.exception("fabric operation %s %s failed", request.method, request.path)
                queue.put_nowait(FleetEnd(error=ErrorDetail(code=SitecloudError.code, message=_INTERNAL)))
            finally:
                queue.put_nowait(None)

        task = asyncio.create_task(run(), name=f"fleet {request.path}")
        running.add(task)
        task.add_done_callback(running.discard)
        response = web.StreamResponse(headers={"Content-Type": "application/x-ndjson"})
        await response.prepare(request)
        listening = True
        while (item := await queue.get()) is not None:
            if not listening:
                continue
            try:
                await response.write(json.dumps(item.to_json()).encode() + b"\n")
            except (ConnectionResetError, RuntimeError):
                listening = False  # the caller left; the operation finishes anyway
        if listening:
            await response.write_eof()
        return response

    async def create_host(request: web.Request) -> web.Response:
        require_role(request, *_CALLERS)
        wanted = HostCreate.parse(await _body(request), what="the host")
        host = await fleet.create_host(wanted.name)
        await host_added()
        return web.json_response(host.to_json(), status=201)

    async def delete_host(request: web.Request) -> web.Response:
        require_role(request, *_CALLERS)
        await fleet.delete_host(request.match_info["name"])
        return web.Response(status=204)

    async def add_role(request: web.Request) -> web.StreamResponse:
        require_role(request, *_CALLERS)
        add = RoleAdd.parse(await _body(request), what="the role to add")
        return await stream(
            request,
            lambda progress: fleet.add_role(
                add.id, ssh_user=add.ssh_user or None, ssh_key=add.ssh_key or None, progress=progress
            ),
        )

    async def role_action(request: web.Request) -> web.StreamResponse:
        require_role(request, *_CALLERS)
        action = request.match_info["action"]
        if action not in _ACTIONS:
            raise InvalidInput(f"no role action {action!r}", hint=f"one of {', '.join(_ACTIONS)}")
        role_id = int(request.match_info["id"])
        forget = request.query.get("forget") == "1" and action == "remove"
        return await stream(request, lambda progress: fleet.act(role_id, action, progress, forget=forget))

    async def upgrade(request: web.Request) -> web.StreamResponse:
        require_role(request, *_CALLERS)
        wanted = UpgradeRequest.parse(await _body(request), what="the upgrade")
        return await stream(request, lambda progress: fleet.upgrade(force=wanted.force, progress=progress))

    return [
        web.post("/v1/hosts", create_host),
        web.delete("/v1/hosts/{name}", delete_host),
        web.post("/v1/roles", add_role),
        web.post(r"/v1/roles/{id:\d{1,9}}/{action}", role_action),
        web.post("/v1/upgrade", upgrade),
    ]
