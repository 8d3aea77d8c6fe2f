"""The public REST API (``/api/v1``): JSON over HTTPS, ``Authorization: Bearer <token>``.

Handlers only translate HTTP to :class:`ManagementService` calls; rights are enforced there. The
OpenAPI document (:mod:`roles.management._openapi`) describes every route added here.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

from aiohttp import web

from roles.management._input import check_authorization, parse_json_object
from roles.management._openapi import openapi_document
from roles.management._store import require_admin
from roles.management.service import ManagementService, Principal
from shared.errors import InvalidInput
from shared.version import CODE_VERSION

__all__ = ["SERVICE", "api_routes", "client_address", "json_body", "principal", "service_of"]

SERVICE = web.AppKey("service", ManagementService)

_CHUNK = 256 * 1024
_NO_STORE = {"Cache-Control": "no-store"}


def service_of(request: web.Request) -> ManagementService:
    return request.app[SERVICE]


async def principal(request: web.Request) -> Principal:
    header = request.headers.get("Authorization")
    check_authorization(header)
    return await service_of(request).authenticate(header)


def client_address(request: web.Request) -> str:
    return request.remote or "unknown"


async def json_body(request: web.Request) -> dict[str, Any]:
    """The request's JSON object (see :func:`parse_json_object` for what is refused)."""
    return parse_json_object(await request.read())


def _int_param(request: web.Request, key: str) -> int:
    # The route pattern admits 1-9 digits only.
    return int(request.match_info[key])


def _json(body: Any, status: int = 200, *, secret: bool = False) -> web.Response:
    # Answers that carry a password or token are never cached anywhere.
    return web.json_response(body, status=status, headers=_NO_STORE if secret else None)


# -- public


async def health(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok", "code_version": CODE_VERSION})


async def openapi(request: web.Request) -> web.Response:
    return web.json_response(openapi_document())


async def issue_token(request: web.Request) -> web.Response:
    answer = await service_of(request).issue_token(await json_body(request), client_address(request))
    return _json(answer, 201, secret=True)


async def sign_up(request: web.Request) -> web.Response:
    return _json(await service_of(request).sign_up(await json_body(request)), 201)


# -- the caller, tokens, users, settings


async def me(request: web.Request) -> web.Response:
    who = await principal(request)
    return web.json_response({"admin": who.is_admin, "tenant": who.tenant, "username": who.username})


async def create_token(request: web.Request) -> web.Response:
    who = await principal(request)
    return _json(await service_of(request).create_token(who, await json_body(request)), 201, secret=True)


async def list_tokens(request: web.Request) -> web.Response:
    return web.json_response(await service_of(request).list_tokens(await principal(request)))


async def revoke_token(request: web.Request) -> web.Response:
    who = await principal(request)
    await service_of(request).revoke_token(who, _int_param(request, "id"))
    return web.Response(status=204)


async def create_user(request: web.Request) -> web.Response:
    who = await principal(request)
    return _json(await service_of(request).create_user(who, await json_body(request)), 201, secret=True)


async def list_users(request: web.Request) -> web.Response:
    return web.json_response(await service_of(request).list_users(await principal(request)))


async def get_settings(request: web.Request) -> web.Response:
    require_admin(await principal(request))
    return web.json_response(await service_of(request).get_settings())


async def update_settings(request: web.Request) -> web.Response:
    who = await principal(request)
    return web.json_response(await service_of(request).update_settings(who, await json_body(request)))


# -- plans, tenants, subscriptions


async def create_plan(request: web.Request) -> web.Response:
    who = await principal(request)
    return _json(await service_of(request).create_plan(who, await json_body(request)), 201)


async def list_plans(request: web.Request) -> web.Response:
    return web.json_response(await service_of(request).list_plans(await principal(request)))


async def show_plan(request: web.Request) -> web.Response:
    who = await principal(request)
    return web.json_response(await service_of(request).show_plan(who, request.match_info["name"]))


async def update_plan(request: web.Request) -> web.Response:
    who = await principal(request)
    answer = await service_of(request).update_plan(who, request.match_info["name"], await json_body(request))
    return web.json_response(answer)


async def create_tenant(request: web.Request) -> web.Response:
    who = await principal(request)
    return _json(await service_of(request).create_tenant(who, await json_body(request)), 201, secret=True)


async def list_tenants(request: web.Request) -> web.Response:
    return web.json_response(await service_of(request).list_tenants(await principal(request)))


async def create_subscription(request: web.Request) -> web.Response:
    who = await principal(request)
    return _json(await service_of(request).create_subscription(who, await json_body(request)), 201)


async def list_subscriptions(request: web.Request) -> web.Response:
    return web.json_response(await service_of(request).list_subscriptions(await principal(request)))


async def show_subscription(request: web.Request) -> web.Response:
    who = await principal(request)
    return web.json_response(await service_of(request).show_subscription(who, _int_param(request, "id")))


async def suspend_subscription(request: web.Request) -> web.Response:
    who = await principal(request)
    return web.json_response(await service_of(request).suspend_subscription(who, _int_param(request, "id")))


async def resume_subscription(request: web.Request) -> web.Response:
    who = await principal(request)
    return web.json_response(await service_of(request).resume_subscription(who, _int_param(request, "id")))


async def delete_subscription(request: web.Request) -> web.Response:
    who = await principal(request)
    await service_of(request).delete_subscription(who, _int_param(request, "id"))
    return web.Response(status=204)


# -- sites


async def create_site(request: web.Request) -> web.Response:
    who = await principal(request)
    return _json(await service_of(request).create_site(who, await json_body(request)), 201, secret=True)


async def list_sites(request: web.Request) -> web.Response:
    return web.json_response(await service_of(request).list_sites(await principal(request)))


async def show_site(request: web.Request) -> web.Response:
    who = await principal(request)
    return web.json_response(await service_of(request).show_site(who, request.match_info["name"]))


async def delete_site(request: web.Request) -> web.Response:
    who = await principal(request)
    await service_of(request).delete_site(who, request.match_info["name"])
    return web.Response(status=204)


async def start_site(request: web.Request) -> web.Response:
    who = await principal(request)
    return web.json_response(await service_of(request).start_site(who, request.match_info["name"]))


async def scale_site(request: web.Request) -> web.Response:
    who = await principal(request)
    body = await json_body(request)
    return web.json_response(
        await service_of(request).scale_site(who, request.match_info["name"], body.get("instances"))
    )


async def stop_site(request: web.Request) -> web.Response:
    who = await principal(request)
    return web.json_response(await service_of(request).stop_site(who, request.match_info["name"]))


async def reset_password(request: web.Request) -> web.Response:
    who = await principal(request)
    answer = await service_of(request).reset_publishing_password(who, request.match_info["name"])
    return _json(answer, secret=True)


async def publish_profile(request: web.Request) -> web.Response:
    who = await principal(request)
    name = request.match_info["name"]
    body = await service_of(request).publish_profile(who, name)
    return web.Response(
        body=body,
        content_type="application/xml",
        headers={**_NO_STORE, "Content-Disposition": f'attachment; filename="{name}.PublishSettings"'},
    )


async def site_logs(request: web.Request) -> web.StreamResponse:
    who = await principal(request)
    try:
        lines = max(0, min(10_000, int(request.query.get("lines", "100"))))
    except ValueError:
        raise InvalidInput("lines must be a whole number") from None
    follow = request.query.get("follow", "") in ("1", "true", "yes")
    stream = service_of(request).site_logs(who, request.match_info["name"], follow=follow, lines=lines)
    # The first line (or the error, e.g. no such site) before the answer starts.
    first = await anext(stream, b"")
    resp = web.StreamResponse(
        headers={"Content-Type": "text/plain; charset=utf-8", "Cache-Control": "no-store"}
    )
    await resp.prepare(request)
    await resp.write(first)
    async for line in stream:
        await resp.write(line)
    await resp.write_eof()
    return resp


async def get_app_settings(request: web.Request) -> web.Response:
    who = await principal(request)
    return web.json_response(await service_of(request).get_app_settings(who, request.match_info["name"]))


async def update_app_settings(request: web.Request) -> web.Response:
    who = await principal(request)
    answer = await service_of(request).update_app_settings(
        who, request.match_info["name"], await json_body(request)
    )
    return web.json_response(answer)


async def list_hostnames(request: web.Request) -> web.Response:
    who = await principal(request)
    return web.json_response(await service_of(request).list_hostnames(who, request.match_info["name"]))


async def add_hostname(request: web.Request) -> web.Response:
    who = await principal(request)
    answer = await service_of(request).add_hostname(who, request.match_info["name"], await json_body(request))
    return web.json_response(answer, status=201)


async def delete_hostname(request: web.Request) -> web.Response:
    who = await principal(request)
    await service_of(request).delete_hostname(who, request.match_info["name"], request.match_info["hostname"])
    return web.Response(status=204)


async def verify_hostname(request: web.Request) -> web.Response:
    who = await principal(request)
    answer = await service_of(request).verify_hostname(
        who, request.match_info["name"], request.match_info["hostname"]
    )
    return web.json_response(answer)


async def hostname_availability(request: web.Request) -> web.Response:
    who = await principal(request)
    answer = await service_of(request).hostname_availability(who, request.match_info["hostname"])
    return web.json_response(answer)


async def deploy_site(request: web.Request) -> web.Response:
    who = await principal(request)

    async def chunks() -> AsyncIterator[bytes]:
        async for chunk in request.content.iter_chunked(_CHUNK):
            yield chunk

    answer = await service_of(request).deploy(who, request.match_info["name"], chunks())
    return web.json_response(answer)


async def site_versions(request: web.Request) -> web.Response:
    who = await principal(request)
    return web.json_response(await service_of(request).site_versions(who, request.match_info["name"]))


async def rollback_site(request: web.Request) -> web.Response:
    who = await principal(request)
    body = await json_body(request) if request.can_read_body else {}
    return web.json_response(await service_of(request).rollback_site(who, request.match_info["name"], body))


_ID = r"{id:\d{1,9}}"


def api_routes() -> list[web.RouteDef]:
    from roles.management._fabric_api import fabric_routes  # lazily: it imports this module

    p = "/api/v1"
    return [
        web.get(f"{p}/health", health),
        web.get("/openapi.json", openapi),
        web.post(f"{p}/auth/token", issue_token),
        web.post(f"{p}/signup", sign_up),
        web.get(f"{p}/me", me),
        web.post(f"{p}/tokens", create_token),
        web.get(f"{p}/tokens", list_tokens),
        web.delete(f"{p}/tokens/{_ID}", revoke_token),
        web.post(f"{p}/users", create_user),
        web.get(f"{p}/users", list_users),
        web.get(f"{p}/settings", get_settings),
        web.patch(f"{p}/settings", update_settings),
        web.post(f"{p}/plans", create_plan),
        web.get(f"{p}/plans", list_plans),
        web.get(f"{p}/plans/{{name}}", show_plan),
        web.patch(f"{p}/plans/{{name}}", update_plan),
        web.post(f"{p}/tenants", create_tenant),
        web.get(f"{p}/tenants", list_tenants),
        web.post(f"{p}/subscriptions", create_subscription),
        web.get(f"{p}/subscriptions", list_subscriptions),
        web.get(f"{p}/subscriptions/{_ID}", show_subscription),
        web.delete(f"{p}/subscriptions/{_ID}", delete_subscription),
        web.post(f"{p}/subscriptions/{_ID}/suspend", suspend_subscription),
        web.post(f"{p}/subscriptions/{_ID}/resume", resume_subscription),
        web.post(f"{p}/sites", create_site),
        web.get(f"{p}/sites", list_sites),
        web.get(f"{p}/sites/{{name}}", show_site),
        web.delete(f"{p}/sites/{{name}}", delete_site),
        web.post(f"{p}/sites/{{name}}/deploy", deploy_site),
        web.get(f"{p}/sites/{{name}}/versions", site_versions),
        web.post(f"{p}/sites/{{name}}/rollback", rollback_site),
        web.post(f"{p}/sites/{{name}}/start", start_site),
        web.post(f"{p}/sites/{{name}}/scale", scale_site),
        web.post(f"{p}/sites/{{name}}/stop", stop_site),
        web.post(f"{p}/sites/{{name}}/publishing-password", reset_password),
        web.post(f"{p}/sites/{{name}}/publish-profile", publish_profile),
        web.get(f"{p}/sites/{{name}}/settings", get_app_settings),
        web.get(f"{p}/sites/{{name}}/logs", site_logs),
        web.patch(f"{p}/sites/{{name}}/settings", update_app_settings),
        web.get(f"{p}/sites/{{name}}/hostnames", list_hostnames),
        web.post(f"{p}/sites/{{name}}/hostnames", add_hostname),
        web.delete(f"{p}/sites/{{name}}/hostnames/{{hostname}}", delete_hostname),
        web.post(f"{p}/sites/{{name}}/hostnames/{{hostname}}/verify", verify_hostname),
        web.get(f"{p}/hostnames/{{hostname}}/availability", hostname_availability),
        # Hosts, roles and upgrades (issue 3): their own module, which builds on this one's helpers.
        *fabric_routes(),
    ]
