"""The public REST API (``/api/v1``): JSON over HTTPS, ``Authorization: Bearer <token>``.

Handlers only translate HTTP to :class:`ManagementService` calls; rights are enforced there.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

from aiohttp import web

from roles.management.service import ManagementService, Principal
from shared.errors import BadRequest, InvalidInput
from shared.internal import error_middleware
from shared.version import CODE_VERSION

__all__ = ["SERVICE", "make_api_app"]

SERVICE = web.AppKey("service", ManagementService)

_CHUNK = 256 * 1024


def _service(request: web.Request) -> ManagementService:
    return request.app[SERVICE]


async def _principal(request: web.Request) -> Principal:
    return await _service(request).authenticate(request.headers.get("Authorization"))


async def _body(request: web.Request) -> dict[str, Any]:
    try:
        body = await request.json()
    except (ValueError, UnicodeDecodeError) as exc:
        raise BadRequest("the request body is not valid JSON") from exc
    if not isinstance(body, dict):
        raise InvalidInput("the request body must be a JSON object")
    return body


async def health(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok", "code_version": CODE_VERSION})


async def create_plan(request: web.Request) -> web.Response:
    who = await _principal(request)
    return web.json_response(await _service(request).create_plan(who, await _body(request)), status=201)


async def list_plans(request: web.Request) -> web.Response:
    return web.json_response(await _service(request).list_plans(await _principal(request)))


async def create_tenant(request: web.Request) -> web.Response:
    who = await _principal(request)
    return web.json_response(await _service(request).create_tenant(who, await _body(request)), status=201)


async def list_tenants(request: web.Request) -> web.Response:
    return web.json_response(await _service(request).list_tenants(await _principal(request)))


async def create_subscription(request: web.Request) -> web.Response:
    who = await _principal(request)
    answer = await _service(request).create_subscription(who, await _body(request))
    return web.json_response(answer, status=201)


async def list_subscriptions(request: web.Request) -> web.Response:
    return web.json_response(await _service(request).list_subscriptions(await _principal(request)))


async def create_site(request: web.Request) -> web.Response:
    who = await _principal(request)
    answer = await _service(request).create_site(who, await _body(request))
    # The passwords are in this answer only: never cache it anywhere.
    return web.json_response(answer, status=201, headers={"Cache-Control": "no-store"})


async def list_sites(request: web.Request) -> web.Response:
    return web.json_response(await _service(request).list_sites(await _principal(request)))


async def show_site(request: web.Request) -> web.Response:
    who = await _principal(request)
    return web.json_response(await _service(request).show_site(who, request.match_info["name"]))


async def delete_site(request: web.Request) -> web.Response:
    who = await _principal(request)
    await _service(request).delete_site(who, request.match_info["name"])
    return web.Response(status=204)


async def deploy_site(request: web.Request) -> web.Response:
    who = await _principal(request)

    async def chunks() -> AsyncIterator[bytes]:
        async for chunk in request.content.iter_chunked(_CHUNK):
            yield chunk

    answer = await _service(request).deploy(who, request.match_info["name"], chunks())
    return web.json_response(answer)


async def list_roles(request: web.Request) -> web.Response:
    return web.json_response(await _service(request).list_roles(await _principal(request)))


def make_api_app(service: ManagementService) -> web.Application:
    app = web.Application(middlewares=[error_middleware], client_max_size=1024 * 1024)
    app[SERVICE] = service
    app.add_routes(
        [
            web.get("/api/v1/health", health),
            web.post("/api/v1/plans", create_plan),
            web.get("/api/v1/plans", list_plans),
            web.post("/api/v1/tenants", create_tenant),
            web.get("/api/v1/tenants", list_tenants),
            web.post("/api/v1/subscriptions", create_subscription),
            web.get("/api/v1/subscriptions", list_subscriptions),
            web.post("/api/v1/sites", create_site),
            web.get("/api/v1/sites", list_sites),
            web.get("/api/v1/sites/{name}", show_site),
            web.delete("/api/v1/sites/{name}", delete_site),
            web.post("/api/v1/sites/{name}/deploy", deploy_site),
            web.get("/api/v1/roles", list_roles),
        ]
    )
    return app
