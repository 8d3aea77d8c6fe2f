"""Control-port endpoints about apps (mTLS; management and the controller may ask, and the publisher,
which follows a deploy's build to show it to whoever deployed).

``GET /v1/sites/{site}/logs[?follow=1&lines=N]``: the site's app log as text lines; with ``follow``
the response stays open and streams new lines until the caller goes away.
``GET /v1/sites/{site}/app``: runtime, version, state, whether it is building, pid, memory, CPU
seconds, starts and crashes.
``POST /v1/sites/{site}/app/probe?version=N[&timeout=S]``: the app started and asked for ``/`` once
(:class:`~shared.contracts.apps.AppProbe`); the publisher and management ask it after a deploy.
``POST /v1/sites/{site}/commands``: a command run once in the site's app sandbox, its output back
(:class:`~shared.contracts.apps.CommandRun`, :class:`~shared.contracts.apps.CommandResult`).
"""

from __future__ import annotations

import asyncio
import contextlib
import re

from aiohttp import web

from roles.worker.apps._manager import AppManager
from shared.contracts.apps import CommandRun
from shared.errors import InvalidInput
from shared.internal import require_role

__all__ = ["app_routes"]

MAX_LINES = 10_000
_HOST = re.compile(r"[A-Za-z0-9.-]{1,253}")
# The longest a probe waits for an app's first answer (a deploy waits on it).
PROBE_MAX = 30.0
KEEPALIVE = 15.0
# Both endpoints only read.
_READERS = ("management", "controller", "publisher")


def app_routes(manager: AppManager) -> list[web.RouteDef]:
    async def logs(request: web.Request) -> web.StreamResponse:
        require_role(request, *_READERS)
        log = manager.log_for(request.match_info["site"])
        try:
            count = min(MAX_LINES, int(request.query.get("lines", "100")))
        except ValueError:
            raise InvalidInput("lines must be a number") from None
        follow = request.query.get("follow", "") in ("1", "true", "yes")
        queue = log.follow() if follow else None
        resp = web.StreamResponse(
            headers={"Content-Type": "text/plain; charset=utf-8", "Cache-Control": "no-store"}
        )
        await resp.prepare(request)
        try:
            past = log.tail(count)
            if past:
                await resp.write(("\n".join(past) + "\n").encode())
            while queue is not None:
                try:
                    line = await asyncio.wait_for(queue.get(), KEEPALIVE)
                except TimeoutError:
                    await resp.write(b"")  # notices a caller that went away
                    continue
                if line is None:
                    break
                await resp.write((line + "\n").encode())
        except ConnectionResetError:
            pass
        finally:
            if queue is not None:
                log.unfollow(queue)
        with contextlib.suppress(ConnectionResetError):
            await resp.write_eof()
        return resp

    async def describe(request: web.Request) -> web.Response:
        require_role(request, *_READERS)
        return web.json_response(manager.describe(request.match_info["site"]).to_json())

    async def probe(request: web.Request) -> web.Response:
        require_role(request, "publisher", "management")
        try:
            version = int(request.query.get("version", ""))
            timeout = min(PROBE_MAX, float(request.query.get("timeout", str(PROBE_MAX))))
        except ValueError:
            raise InvalidInput("version must be a number, timeout seconds") from None
        host = request.query.get("host", "") or request.match_info["site"]
        if not _HOST.fullmatch(host):
            raise InvalidInput("host must be a host name (letters, digits, dots and dashes)")
        found = await manager.probe(request.match_info["site"], version, host, max(timeout, 0.1))
        return web.json_response(found.to_json())

    async def command(request: web.Request) -> web.Response:
        require_role(request, "management", "publisher")
        try:
            raw = await request.json()
        except ValueError:
            raise InvalidInput('the body must be JSON: {"command": "...", "timeout": seconds}') from None
        run = CommandRun.parse(raw, what="command")
        result = await manager.run_command(request.match_info["site"], run.command, run.timeout)
        return web.json_response(result.to_json())

    return [
        web.get("/v1/sites/{site}/logs", logs),
        web.post("/v1/sites/{site}/commands", command),
        web.get("/v1/sites/{site}/app", describe),
        web.post("/v1/sites/{site}/app/probe", probe),
    ]
