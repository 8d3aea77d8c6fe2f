"""A request that fails because the runtime DB cannot be reached answers 503 `unavailable` with a hint
(the CLI's exit 6, "retry later"), not 500 "internal error" with nothing to act on."""

from __future__ import annotations

import sqlite3

from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer
from sqlalchemy.exc import OperationalError

from shared.internal import error_middleware


async def test_a_db_that_cannot_be_reached_is_unavailable_not_an_internal_error() -> None:
    async def down(request: web.Request) -> web.Response:
        raise OperationalError("SELECT 1", {}, sqlite3.OperationalError("connection refused"))

    async def bug(request: web.Request) -> web.Response:
        raise KeyError("x")

    app = web.Application(middlewares=[error_middleware])
    app.router.add_get("/down", down)
    app.router.add_get("/bug", bug)
    async with TestClient(TestServer(app)) as client:
        answer = await client.get("/down")
        assert answer.status == 503
        error = (await answer.json())["error"]
        assert error["code"] == "unavailable"
        assert "runtime DB" in error["message"] and "retry" in error["hint"]
        # Anything else stays an internal error.
        answer = await client.get("/bug")
        assert answer.status == 500
