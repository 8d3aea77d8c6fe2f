"""The public REST API (``/api/v1``): JSON over HTTPS, ``Authorization: Bearer <token>``.

Handlers only translate HTTP to :class:`ManagementService` calls; rights are enforced there. The
route table at the end (:func:`operations`) is served and documented at once: each route's query
and body are validated with its models before the handler runs (:mod:`roles.management._request`),
and ``/openapi.json`` is generated from the same table (:mod:`roles.management._openapi`).
"""

from __future__ import annotations

import datetime as dt
from collections.abc import AsyncIterator
from functools import lru_cache
from typing import Any

from aiohttp import web

from roles.management import _models as m
from roles.management._fabric_api import fabric_operations
from roles.management._metering import parse_range, usage_csv
from roles.management._openapi import (
    BACKUP,
    HOSTNAME,
    PLAN,
    SITE,
    SLOT,
    SUBSCRIPTION,
    TENANT,
    TOKEN,
    USER,
    VERSION,
    Operation,
    openapi_document,
)
from roles.management._paging import paged
from roles.management._request import (
    CHUNK,
    NDJSON,
    body_of,
    checked,
    client_address,
    page_of,
    principal,
    query_of,
    relay_lines,
    service_of,
)
from roles.management._store import require_admin
from roles.management.service import Principal
from shared.version import CODE_VERSION

__all__ = ["RESET_PATH", "api_routes", "backup_download", "operations", "reset_url", "zip_download"]

# The portal page a password reset link opens (its token follows).
RESET_PATH = "/reset-password"
_NO_STORE = {"Cache-Control": "no-store"}


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
    return web.json_response(_document())


@lru_cache(maxsize=1)
def _document() -> dict[str, Any]:
    return openapi_document(operations())


async def issue_token(request: web.Request) -> web.Response:
    body = body_of(request, m.TokenRequest).model_dump()
    answer = await service_of(request).issue_token(body, client_address(request))
    return _json(answer, 201, secret=True)


async def sign_up(request: web.Request) -> web.Response:
    return _json(await service_of(request).sign_up(body_of(request, m.SignUp).fields()), 201)


# -- the caller, tokens, users, settings


async def me(request: web.Request) -> web.Response:
    who = await principal(request)
    return web.json_response({"admin": who.is_admin, "tenant": who.tenant, "username": who.username})


async def create_token(request: web.Request) -> web.Response:
    who = await principal(request)
    body = body_of(request, m.TokenCreate).fields()
    return _json(await service_of(request).create_token(who, body), 201, secret=True)


async def list_tokens(request: web.Request) -> web.Response:
    _, page = page_of(request, m.ListQuery)
    return web.json_response(await service_of(request).list_tokens(await principal(request), page=page))


async def revoke_token(request: web.Request) -> web.Response:
    who = await principal(request)
    await service_of(request).revoke_token(who, _int_param(request, "id"))
    return web.Response(status=204)


async def create_user(request: web.Request) -> web.Response:
    who = await principal(request)
    body = body_of(request, m.UserCreate).fields()
    return _json(await service_of(request).create_user(who, body), 201, secret=True)


async def list_users(request: web.Request) -> web.Response:
    q, page = page_of(request, m.UserListQuery)
    who = await principal(request)
    return web.json_response(await service_of(request).list_users(who, page=page, tenant=q.tenant))


async def issue_reset_link(request: web.Request) -> web.Response:
    """A one-time link to the portal page where the user sets a new password (there is no mail)."""
    who = await principal(request)
    answer = await service_of(request).issue_reset_link(who, request.match_info["username"])
    answer["url"] = reset_url(request, answer.pop("token"))
    return _json(answer, 201, secret=True)


def reset_url(request: web.Request, token: str) -> str:
    """The portal page a password reset token opens, at the address the caller reached us by."""
    return f"{request.scheme}://{request.host}{RESET_PATH}/{token}"


async def get_settings(request: web.Request) -> web.Response:
    require_admin(await principal(request))
    return web.json_response(await service_of(request).get_settings())


async def update_settings(request: web.Request) -> web.Response:
    who = await principal(request)
    body = body_of(request, m.CloudSettingsUpdate).fields()
    return web.json_response(await service_of(request).update_settings(who, body))


# -- plans, tenants, subscriptions


async def create_plan(request: web.Request) -> web.Response:
    who = await principal(request)
    return _json(await service_of(request).create_plan(who, body_of(request, m.PlanCreate).fields()), 201)


async def list_plans(request: web.Request) -> web.Response:
    _, page = page_of(request, m.ListQuery)
    return web.json_response(await service_of(request).list_plans(await principal(request), page=page))


async def show_plan(request: web.Request) -> web.Response:
    who = await principal(request)
    return web.json_response(await service_of(request).show_plan(who, request.match_info["name"]))


async def update_plan(request: web.Request) -> web.Response:
    who = await principal(request)
    body = body_of(request, m.PlanUpdate).fields()
    return web.json_response(await service_of(request).update_plan(who, request.match_info["name"], body))


async def delete_plan(request: web.Request) -> web.Response:
    who = await principal(request)
    await service_of(request).delete_plan(who, request.match_info["name"])
    return web.Response(status=204)


async def create_tenant(request: web.Request) -> web.Response:
    who = await principal(request)
    body = body_of(request, m.TenantCreate).fields()
    return _json(await service_of(request).create_tenant(who, body), 201, secret=True)


async def list_tenants(request: web.Request) -> web.Response:
    _, page = page_of(request, m.ListQuery)
    return web.json_response(await service_of(request).list_tenants(await principal(request), page=page))


async def show_tenant(request: web.Request) -> web.Response:
    who = await principal(request)
    return web.json_response(await service_of(request).show_tenant(who, request.match_info["name"]))


async def delete_tenant(request: web.Request) -> web.Response:
    who = await principal(request)
    await service_of(request).delete_tenant(who, request.match_info["name"])
    return web.Response(status=204)


async def create_subscription(request: web.Request) -> web.Response:
    who = await principal(request)
    body = body_of(request, m.SubscriptionCreate).fields()
    return _json(await service_of(request).create_subscription(who, body), 201)


async def list_subscriptions(request: web.Request) -> web.Response:
    q, page = page_of(request, m.SubscriptionListQuery)
    answer = await service_of(request).list_subscriptions(
        await principal(request), page=page, tenant=q.tenant, plan=q.plan, state=q.state
    )
    return web.json_response(answer)


async def show_subscription(request: web.Request) -> web.Response:
    who = await principal(request)
    return web.json_response(await service_of(request).show_subscription(who, _int_param(request, "id")))


async def update_subscription(request: web.Request) -> web.Response:
    who = await principal(request)
    body = body_of(request, m.SubscriptionUpdate)
    answer = await service_of(request).change_plan(who, _int_param(request, "id"), body.plan)
    return web.json_response(answer)


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
    body = body_of(request, m.SiteCreate).fields()
    return _json(await service_of(request).create_site(who, body), 201, secret=True)


async def list_sites(request: web.Request) -> web.Response:
    q, page = page_of(request, m.SiteListQuery)
    answer = await service_of(request).list_sites(
        await principal(request), page=page, tenant=q.tenant, subscription=q.subscription, state=q.state
    )
    return web.json_response(answer)


async def show_site(request: web.Request) -> web.Response:
    who = await principal(request)
    return web.json_response(await service_of(request).show_site(who, request.match_info["name"]))


async def delete_site(request: web.Request) -> web.Response:
    who = await principal(request)
    await service_of(request).delete_site(who, request.match_info["name"])
    return web.Response(status=204)


async def start_site(request: web.Request) -> web.StreamResponse:
    who = await principal(request)
    service, name = service_of(request), request.match_info["name"]
    if NDJSON in request.headers.get("Accept", ""):
        return await relay_lines(request, service.start_site_following(who, name))
    return web.json_response(await service.start_site(who, name))


async def scale_site(request: web.Request) -> web.Response:
    who = await principal(request)
    instances = body_of(request, m.SiteScale).instances
    return web.json_response(await service_of(request).scale_site(who, request.match_info["name"], instances))


async def restart_site(request: web.Request) -> web.Response:
    who = await principal(request)
    return web.json_response(await service_of(request).restart_site(who, request.match_info["name"]))


async def run_site_command(request: web.Request) -> web.Response:
    who = await principal(request)
    run = body_of(request, m.SiteCommand)
    return web.json_response(
        await service_of(request).run_command(who, request.match_info["name"], run.command, run.timeout)
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


def _usage_range(request: web.Request) -> tuple[dt.date, dt.date]:
    today = service_of(request).metering.today()
    q = query_of(request, m.UsageQuery)
    return parse_range(q.from_.isoformat() if q.from_ else None, q.to.isoformat() if q.to else None, today)


async def site_usage(request: web.Request) -> web.Response:
    who = await principal(request)
    start, end = _usage_range(request)
    return web.json_response(
        await service_of(request).site_usage(who, request.match_info["name"], start, end)
    )


async def usage_export(request: web.Request) -> web.Response:
    """Every site's usage per day, for billing: JSON, or CSV (``Accept: text/csv`` or ``?format=csv``)."""
    who = await principal(request)
    start, end = _usage_range(request)
    fmt = query_of(request, m.UsageExportQuery).format
    export = await service_of(request).usage_export(who, start, end)
    if fmt == "csv" or (not fmt and "text/csv" in request.headers.get("Accept", "")):
        return web.Response(
            text=usage_csv(export),
            content_type="text/csv",
            headers={
                **_NO_STORE,
                "Content-Disposition": f'attachment; filename="usage-{export["from"]}-{export["to"]}.csv"',
            },
        )
    return web.json_response(export)


async def lift_quota(request: web.Request) -> web.Response:
    who = await principal(request)
    return web.json_response(await service_of(request).lift_quota(who, request.match_info["name"]))


async def site_logs(request: web.Request) -> web.StreamResponse:
    who = await principal(request)
    q = query_of(request, m.LogsQuery)
    follow = q.follow in ("1", "true", "yes")
    stream = service_of(request).site_logs(who, request.match_info["name"], follow=follow, lines=q.lines)
    return await relay_lines(request, stream, "text/plain; charset=utf-8")


async def get_app_settings(request: web.Request) -> web.Response:
    who = await principal(request)
    return web.json_response(await service_of(request).get_app_settings(who, request.match_info["name"]))


async def update_app_settings(request: web.Request) -> web.Response:
    who = await principal(request)
    changes = body_of(request, m.AppSettingsPatch).fields()
    answer = await service_of(request).update_app_settings(who, request.match_info["name"], changes)
    return web.json_response(answer)


async def list_hostnames(request: web.Request) -> web.Response:
    who = await principal(request)
    q, page = page_of(request, m.HostnameListQuery)
    answer = await service_of(request).list_hostnames(
        who, request.match_info["name"], page=page, state=q.state
    )
    return web.json_response(answer)


async def add_hostname(request: web.Request) -> web.Response:
    who = await principal(request)
    body = body_of(request, m.HostnameAdd).fields()
    answer = await service_of(request).add_hostname(who, request.match_info["name"], body)
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


async def renew_hostname(request: web.Request) -> web.Response:
    who = await principal(request)
    answer = await service_of(request).renew_hostname(
        who, request.match_info["name"], request.match_info["hostname"]
    )
    return web.json_response(answer, status=202)


async def hostname_availability(request: web.Request) -> web.Response:
    who = await principal(request)
    answer = await service_of(request).hostname_availability(who, request.match_info["hostname"])
    return web.json_response(answer)


async def deploy_site(request: web.Request) -> web.StreamResponse:
    who = await principal(request)

    async def chunks() -> AsyncIterator[bytes]:
        async for chunk in request.content.iter_chunked(CHUNK):
            yield chunk

    service, name = service_of(request), request.match_info["name"]
    if NDJSON in request.headers.get("Accept", ""):
        return await relay_lines(request, service.deploy_following(who, name, chunks()))
    return web.json_response(await service.deploy(who, name, chunks()))


async def site_versions(request: web.Request) -> web.Response:
    who = await principal(request)
    _, page = page_of(request, m.ListQuery)
    answer = await service_of(request).site_versions(who, request.match_info["name"])
    versions, cursor = paged(answer["versions"], lambda v: int(v["version"]), page, int)
    return web.json_response({**answer, "versions": versions, "next_cursor": cursor})


async def zip_download(request: web.Request, who: Principal, name: str, version: int) -> web.StreamResponse:
    """A kept version as a zip download (the API's and the portal's)."""
    stream = service_of(request).site_zip(who, name, version)
    # The first chunk (or the error: no such site or version) before the answer starts.
    first = await anext(stream, b"")
    resp = web.StreamResponse(
        headers={
            "Content-Type": "application/zip",
            "Content-Disposition": f'attachment; filename="{name}-v{version}.zip"',
            **_NO_STORE,
        }
    )
    await resp.prepare(request)
    await resp.write(first)
    async for chunk in stream:
        await resp.write(chunk)
    await resp.write_eof()
    return resp


async def site_version_zip(request: web.Request) -> web.StreamResponse:
    who = await principal(request)
    return await zip_download(request, who, request.match_info["name"], int(request.match_info["version"]))


async def site_backups(request: web.Request) -> web.Response:
    who = await principal(request)
    _, page = page_of(request, m.ListQuery)
    answer = await service_of(request).site_backups(who, request.match_info["name"])
    backups, cursor = paged(answer["backups"], lambda b: str(b["name"]), page, str)
    return web.json_response({**answer, "backups": backups, "next_cursor": cursor})


async def site_backup_download(request: web.Request) -> web.StreamResponse:
    who = await principal(request)
    return await backup_download(request, who, request.match_info["name"], request.match_info["backup"])


async def restore_site_backup(request: web.Request) -> web.Response:
    who = await principal(request)
    answer = await service_of(request).restore_site_backup(
        who, request.match_info["name"], request.match_info["backup"]
    )
    return web.json_response(answer)


async def backup_download(
    request: web.Request, who: Principal, name: str, backup_name: str
) -> web.StreamResponse:
    """A scheduled backup as a zip download (the API's and the portal's)."""
    backup = await service_of(request).site_backup(who, name, backup_name)
    return web.FileResponse(
        backup.path,
        headers={
            "Content-Type": "application/zip",
            "Content-Disposition": f'attachment; filename="{name}-{backup.name}"',
            **_NO_STORE,
        },
    )


async def take_backup(request: web.Request) -> web.Response:
    who = await principal(request)
    return web.json_response(await service_of(request).backup(who), headers=_NO_STORE)


async def restore_backup(request: web.Request) -> web.Response:
    who = await principal(request)
    body = body_of(request, m.BackupRestore)
    answer = await service_of(request).restore(who, body.alembic_revision, body.tables, body.force)
    return web.json_response(answer)


async def rollback_site(request: web.Request) -> web.Response:
    who = await principal(request)
    version = body_of(request, m.Rollback).version
    answer = await service_of(request).rollback_site(who, request.match_info["name"], version)
    return web.json_response(answer)


async def create_slot(request: web.Request) -> web.Response:
    who = await principal(request)
    slot = body_of(request, m.SlotCreate).slot
    answer = await service_of(request).create_slot(who, request.match_info["name"], slot)
    return web.json_response(answer, status=201)


async def list_slots(request: web.Request) -> web.Response:
    who = await principal(request)
    _, page = page_of(request, m.ListQuery)
    return web.json_response(await service_of(request).list_slots(who, request.match_info["name"], page))


async def delete_slot(request: web.Request) -> web.Response:
    who = await principal(request)
    await service_of(request).delete_slot(who, request.match_info["name"], request.match_info["slot"])
    return web.Response(status=204)


async def swap_slot(request: web.Request) -> web.Response:
    who = await principal(request)
    timeout = body_of(request, m.Swap).warm_timeout
    name, slot = request.match_info["name"], request.match_info["slot"]
    return web.json_response(await service_of(request).swap_slot(who, name, slot, timeout))


async def set_sticky(request: web.Request) -> web.Response:
    who = await principal(request)
    keys = body_of(request, m.StickySettings).sticky
    return web.json_response(await service_of(request).set_sticky(who, request.match_info["name"], keys))


# -- the route table


_ID = r"{id:\d{1,9}}"
_VERSION = r"{version:\d{1,9}}"
_P = "/api/v1"
# A restored dump may hold years of usage rows: beyond the usual body limit.
_RESTORE_MAX = 256 * 1024 * 1024


def operations() -> list[Operation]:
    """Every route of the API with its models, in the order the document lists them."""

    def op(
        method: str, path: str, handler: Any, operation_id: str, summary: str, tag: str, **kw: Any
    ) -> Operation:
        return Operation(
            method,
            path if path.startswith("/openapi") else _P + path,
            handler,
            operation_id,
            summary,
            tag,
            **kw,
        )

    site = (SITE,)
    host = (SITE, HOSTNAME)
    slot = (SITE, SLOT)
    return [
        op("GET", "/health", health, "health", "Liveness of the API", "meta", answer=m.Health, public=True),
        op(
            "GET",
            "/openapi.json",
            openapi,
            "openapi",
            "This document",
            "meta",
            answer=m.OpenApiDocument,
            public=True,
        ),
        op(
            "POST",
            "/auth/token",
            issue_token,
            "issue_token",
            "Sign in with a user name and password and get an API token (rate limited)",
            "accounts",
            ok=201,
            answer=m.TokenCreated,
            body=m.TokenRequest,
            errors=(401, 429),
            public=True,
        ),
        op(
            "POST",
            "/signup",
            sign_up,
            "sign_up",
            "Sign up: a new tenant and its first user (when the admin allows sign-up)",
            "accounts",
            ok=201,
            answer=m.User,
            body=m.SignUp,
            errors=(403, 409),
            public=True,
        ),
        op("GET", "/me", me, "whoami", "Who the token belongs to", "accounts", answer=m.Me),
        op(
            "POST",
            "/tokens",
            create_token,
            "create_token",
            "Create an API token (shown once)",
            "accounts",
            ok=201,
            answer=m.TokenCreated,
            body=m.TokenCreate,
        ),
        op(
            "GET",
            "/tokens",
            list_tokens,
            "list_tokens",
            "The caller's API tokens",
            "accounts",
            answer=m.TokenList,
            query=m.ListQuery,
        ),
        op(
            "DELETE",
            f"/tokens/{_ID}",
            revoke_token,
            "revoke_token",
            "Revoke one of the caller's tokens",
            "accounts",
            ok=204,
            params=(TOKEN,),
        ),
        op(
            "POST",
            "/users",
            create_user,
            "create_user",
            "Create an admin account, or a user of a tenant (admin)",
            "accounts",
            ok=201,
            answer=m.User,
            body=m.UserCreate,
            errors=(403, 404, 409),
        ),
        op(
            "GET",
            "/users",
            list_users,
            "list_users",
            "Every user (admin)",
            "accounts",
            answer=m.UserList,
            query=m.UserListQuery,
            errors=(403,),
        ),
        op(
            "POST",
            "/users/{username}/reset-link",
            issue_reset_link,
            "issue_reset_link",
            "Issue a one-time password reset link for a portal user, valid for an hour (admin)",
            "accounts",
            ok=201,
            answer=m.ResetLink,
            params=(USER,),
            errors=(403,),
        ),
        op(
            "GET",
            "/settings",
            get_settings,
            "get_settings",
            "Cloud settings (admin)",
            "accounts",
            answer=m.CloudSettings,
            errors=(403,),
        ),
        op(
            "PATCH",
            "/settings",
            update_settings,
            "update_settings",
            "Change cloud settings (admin)",
            "accounts",
            answer=m.CloudSettings,
            body=m.CloudSettingsUpdate,
            errors=(403,),
        ),
        op(
            "POST",
            "/plans",
            create_plan,
            "create_plan",
            "Create a plan (admin)",
            "plans",
            ok=201,
            answer=m.Plan,
            body=m.PlanCreate,
            errors=(403, 409),
        ),
        op(
            "GET",
            "/plans",
            list_plans,
            "list_plans",
            "Plans: all for admins, public ones for tenants",
            "plans",
            answer=m.PlanList,
            query=m.ListQuery,
        ),
        op(
            "GET", "/plans/{name}", show_plan, "show_plan", "One plan", "plans", answer=m.Plan, params=(PLAN,)
        ),
        op(
            "PATCH",
            "/plans/{name}",
            update_plan,
            "update_plan",
            "Change a plan's quotas, make it public or private, retire it (admin); applies to its subscriptions",
            "plans",
            answer=m.Plan,
            body=m.PlanUpdate,
            params=(PLAN,),
            errors=(403,),
        ),
        op(
            "DELETE",
            "/plans/{name}",
            delete_plan,
            "delete_plan",
            "Delete a plan that no subscription uses (admin); one in use answers 409",
            "plans",
            ok=204,
            params=(PLAN,),
            errors=(403, 409),
        ),
        op(
            "POST",
            "/tenants",
            create_tenant,
            "create_tenant",
            "Create a tenant and its first token (admin)",
            "tenants",
            ok=201,
            answer=m.TenantCreatedToken,
            body=m.TenantCreate,
            errors=(403, 409),
        ),
        op(
            "GET",
            "/tenants",
            list_tenants,
            "list_tenants",
            "Tenants (admin)",
            "tenants",
            answer=m.TenantList,
            query=m.ListQuery,
            errors=(403,),
        ),
        op(
            "GET",
            "/tenants/{name}",
            show_tenant,
            "show_tenant",
            "A tenant with its subscriptions, sites and users (admin)",
            "tenants",
            answer=m.TenantDetail,
            params=(TENANT,),
            errors=(403,),
        ),
        op(
            "DELETE",
            "/tenants/{name}",
            delete_tenant,
            "delete_tenant",
            "Delete a tenant with its subscriptions, sites (and their content), users and tokens (admin)",
            "tenants",
            ok=204,
            params=(TENANT,),
            errors=(403,),
        ),
        op(
            "POST",
            "/subscriptions",
            create_subscription,
            "create_subscription",
            "Subscribe a tenant to a plan (admin), or oneself to a public plan (tenant)",
            "subscriptions",
            ok=201,
            answer=m.Subscription,
            body=m.SubscriptionCreate,
            errors=(403, 404),
        ),
        op(
            "GET",
            "/subscriptions",
            list_subscriptions,
            "list_subscriptions",
            "Subscriptions with quotas and usage: all for admins, own for tenants",
            "subscriptions",
            answer=m.SubscriptionList,
            query=m.SubscriptionListQuery,
        ),
        op(
            "GET",
            f"/subscriptions/{_ID}",
            show_subscription,
            "show_subscription",
            "One subscription with its quotas and usage",
            "subscriptions",
            answer=m.Subscription,
            params=(SUBSCRIPTION,),
        ),
        op(
            "DELETE",
            f"/subscriptions/{_ID}",
            delete_subscription,
            "delete_subscription",
            "Delete a subscription and its sites (admin)",
            "subscriptions",
            ok=204,
            params=(SUBSCRIPTION,),
            errors=(403,),
        ),
        op(
            "PATCH",
            f"/subscriptions/{_ID}",
            update_subscription,
            "update_subscription",
            "Move a subscription to another plan (an admin: any plan that takes subscriptions; a tenant: "
            "a public one); refused (409) while it holds more sites, hostnames, instances or storage "
            "than that plan allows",
            "subscriptions",
            answer=m.Subscription,
            body=m.SubscriptionUpdate,
            params=(SUBSCRIPTION,),
            errors=(403, 409),
        ),
        op(
            "POST",
            f"/subscriptions/{_ID}/suspend",
            suspend_subscription,
            "suspend_subscription",
            "Suspend: its sites go offline and cannot be published to; their content is kept (admin)",
            "subscriptions",
            answer=m.Subscription,
            params=(SUBSCRIPTION,),
            errors=(403,),
        ),
        op(
            "POST",
            f"/subscriptions/{_ID}/resume",
            resume_subscription,
            "resume_subscription",
            "Resume a suspended subscription (admin)",
            "subscriptions",
            answer=m.Subscription,
            params=(SUBSCRIPTION,),
            errors=(403,),
        ),
        op(
            "POST",
            "/sites",
            create_site,
            "create_site",
            "Create a site; the answer has its publishing password, once",
            "sites",
            ok=201,
            answer=m.Site,
            body=m.SiteCreate,
            errors=(403, 404, 409),
        ),
        op(
            "GET",
            "/sites",
            list_sites,
            "list_sites",
            "Sites: all for admins, own for tenants",
            "sites",
            answer=m.SiteList,
            query=m.SiteListQuery,
        ),
        op(
            "GET",
            "/sites/{name}",
            show_site,
            "show_site",
            "One site, with its app on each worker",
            "sites",
            answer=m.Site,
            params=site,
        ),
        op(
            "DELETE",
            "/sites/{name}",
            delete_site,
            "delete_site",
            "Delete a site and its content",
            "sites",
            ok=204,
            params=site,
        ),
        op(
            "POST",
            "/sites/{name}/deploy",
            deploy_site,
            "deploy_site",
            "Replace the site's content with a zip (web deploy). With Accept: application/x-ndjson the "
            "answer is lines: the deploy's and its build's ({source, text}) as they come, then {result} once "
            "the site's workers serve it built, or {error} (code build_failed when the version is stored but "
            "its requirements.txt or package.json could not be installed; not_served when it is stored but "
            "no worker of the running site is running to serve it). A stopped site takes it and "
            "serves it once started; a suspended subscription's site takes it from an admin only (403)",
            "sites",
            answer=m.Deployed,
            params=site,
            raw_body="application/zip",
            errors=(403, 413, 503),
        ),
        op(
            "POST",
            "/sites/{name}/start",
            start_site,
            "start_site",
            "Start a site: it is routed and served. With Accept: application/x-ndjson the answer is lines: "
            "the build of its newest version ({source, text}) as it runs (a version published while the site "
            "was stopped is built now), then {result} once its workers serve it, or {error} (code "
            "build_failed: started, but the version's requirements.txt or package.json could not be "
            "installed; not_served: started, but no worker runs to serve it)",
            "sites",
            answer=m.Site,
            params=site,
            errors=(403, 503),
        ),
        op(
            "GET",
            "/sites/{name}/versions",
            site_versions,
            "list_site_versions",
            "The site's kept content versions, oldest first",
            "sites",
            answer=m.SiteVersions,
            query=m.ListQuery,
            params=site,
            errors=(503,),
        ),
        op(
            "GET",
            f"/sites/{{name}}/versions/{_VERSION}/zip",
            site_version_zip,
            "download_site_version",
            "A kept version of the site's content as a zip, streamed as it is made",
            "sites",
            content="application/zip",
            params=(SITE, VERSION),
            errors=(503,),
        ),
        op(
            "GET",
            "/sites/{name}/backups",
            site_backups,
            "list_site_backups",
            "The site's scheduled backups (its plan's backup_every_seconds), oldest first",
            "sites",
            answer=m.SiteBackups,
            query=m.ListQuery,
            params=site,
        ),
        op(
            "GET",
            "/sites/{name}/backups/{backup}",
            site_backup_download,
            "download_site_backup",
            "One scheduled backup of the site: the zip of its content at that time",
            "sites",
            content="application/zip",
            params=(SITE, BACKUP),
        ),
        op(
            "POST",
            "/sites/{name}/backups/{backup}/restore",
            restore_site_backup,
            "restore_site_backup",
            "Put a scheduled backup's content back as the site's newest version (as a web deploy of it)",
            "sites",
            answer=m.BackupRestored,
            params=(SITE, BACKUP),
            errors=(403, 413, 503),
        ),
        op(
            "POST",
            "/sites/{name}/rollback",
            rollback_site,
            "rollback_site",
            "Make an earlier version the site's content again, as a new version (every worker flips to it)",
            "sites",
            answer=m.RolledBack,
            body=m.Rollback,
            body_required=False,
            params=site,
            errors=(403, 413, 503),
        ),
        op(
            "POST",
            "/sites/{name}/scale",
            scale_site,
            "scale_site",
            "Run the site on N workers, balanced by the front ends (at most the plan's max_instances_per_site); with one, one worker takes its requests and another stands by where the pool has two",
            "sites",
            answer=m.Site,
            body=m.SiteScale,
            params=site,
            errors=(409,),
        ),
        op(
            "POST",
            "/sites/{name}/restart",
            restart_site,
            "restart_site",
            "Restart a running site's app on every worker: requests under way finish on the old processes, the next ones start new ones (a static site has none; nothing changes for it)",
            "sites",
            answer=m.Site,
            params=site,
            errors=(409,),
        ),
        op(
            "POST",
            "/sites/{name}/commands",
            run_site_command,
            "run_site_command",
            "Run a command once in the site's app sandbox, as its app runs (its uid, packages, settings and writable folder; no port), and get its exit status and output: `python manage.py migrate`, `php artisan cache:clear`, `ls`. One at a time per site, on one of its servers; what it writes in the app's folder stays on that server. The site's log says it ran and how it ended",
            "sites",
            answer=m.SiteCommandResult,
            body=m.SiteCommand,
            params=site,
            errors=(409, 503),
        ),
        op(
            "POST",
            "/sites/{name}/stop",
            stop_site,
            "stop_site",
            "Stop a site: visitors get a 'stopped' page; its content is kept and can still be published to",
            "sites",
            answer=m.Site,
            params=site,
        ),
        op(
            "POST",
            "/sites/{name}/publishing-password",
            reset_password,
            "reset_publishing_password",
            "Set a new FTP / web deploy password (shown once)",
            "sites",
            answer=m.Site,
            params=site,
        ),
        op(
            "POST",
            "/sites/{name}/publish-profile",
            publish_profile,
            "publish_profile",
            "A .PublishSettings file for Visual Studio / WebMatrix. Passwords are stored hashed only, so this sets a new publishing password: the old one stops working.",
            "sites",
            content="application/xml",
            params=site,
        ),
        op(
            "GET",
            "/sites/{name}/settings",
            get_app_settings,
            "get_app_settings",
            "The site's app settings",
            "sites",
            answer=m.AppSettings,
            params=site,
        ),
        op(
            "PATCH",
            "/sites/{name}/settings",
            update_app_settings,
            "update_app_settings",
            "Set (string) or remove (null) app settings",
            "sites",
            answer=m.AppSettings,
            body=m.AppSettingsPatch,
            params=site,
            errors=(409,),
        ),
        op(
            "PUT",
            "/sites/{name}/settings/sticky",
            set_sticky,
            "set_sticky_settings",
            "Which app settings stay with the site's address (not its content) when slots are swapped",
            "sites",
            answer=m.AppSettings,
            body=m.StickySettings,
            params=site,
        ),
        op(
            "POST",
            "/sites/{name}/slots",
            create_slot,
            "create_slot",
            "Create a deployment slot <name>-<slot>: a site of its own (content, publishing credentials, settings; counted against the plan's max sites); the answer has its publishing password, once",
            "sites",
            ok=201,
            answer=m.SlotCreated,
            body=m.SlotCreate,
            params=site,
            errors=(403, 409),
        ),
        op(
            "GET",
            "/sites/{name}/slots",
            list_slots,
            "list_slots",
            "The production site and its slots: each address, the site answering it, its sticky settings",
            "sites",
            answer=m.SlotList,
            query=m.ListQuery,
            params=site,
        ),
        op(
            "DELETE",
            "/sites/{name}/slots/{slot}",
            delete_slot,
            "delete_slot",
            "Delete a slot and its content (not while it is swapped into production)",
            "sites",
            ok=204,
            params=slot,
            errors=(409,),
        ),
        op(
            "POST",
            "/sites/{name}/slots/{slot}/swap",
            swap_slot,
            "swap_slot",
            "Swap a slot with production: the slot's app is warmed (its first request answered 2xx/3xx through every front end), then both addresses flip on every front end at once; sticky settings stay with their address",
            "sites",
            answer=m.Swapped,
            body=m.Swap,
            body_required=False,
            params=slot,
            errors=(409, 503),
        ),
        op(
            "GET",
            "/sites/{name}/logs",
            site_logs,
            "site_logs",
            "The site's log from its workers: app output and access lines, as text; with follow=1 the answer stays open and new lines stream as they come",
            "sites",
            content="text/plain",
            query=m.LogsQuery,
            params=site,
            errors=(503,),
        ),
        op(
            "GET",
            "/sites/{name}/usage",
            site_usage,
            "site_usage",
            "The site's usage per UTC day (requests, bytes in/out, app CPU seconds, memory MB-seconds, storage), totals, and today's use against the plan's daily quotas",
            "sites",
            answer=m.SiteUsage,
            query=m.UsageQuery,
            params=site,
        ),
        op(
            "POST",
            "/sites/{name}/quota-reset",
            lift_quota,
            "lift_quota",
            "Admin: let a site stopped by its daily quota serve again for the rest of the UTC day",
            "sites",
            answer=m.QuotaLifted,
            params=site,
            errors=(403,),
        ),
        op(
            "GET",
            "/usage",
            usage_export,
            "usage_export",
            "Admin: every site's usage per UTC day with tenant, subscription and plan, for billing: JSON, or CSV with Accept: text/csv or format=csv",
            "sites",
            answer=m.UsageExport,
            content="text/csv",
            query=m.UsageExportQuery,
            errors=(403,),
        ),
        op(
            "GET",
            "/sites/{name}/hostnames",
            list_hostnames,
            "list_hostnames",
            "The site's custom host names",
            "hostnames",
            answer=m.Hostnames,
            query=m.HostnameListQuery,
            params=site,
        ),
        op(
            "POST",
            "/sites/{name}/hostnames",
            add_hostname,
            "add_hostname",
            "Claim a custom host name (pending until DNS proves it; a name another site claims is taken only with that proof), with a certificate (PEM or base64 PFX) that must cover it",
            "hostnames",
            ok=201,
            answer=m.HostnameInfo,
            body=m.HostnameAdd,
            params=site,
            errors=(409,),
        ),
        op(
            "DELETE",
            "/sites/{name}/hostnames/{hostname}",
            delete_hostname,
            "delete_hostname",
            "Remove a custom host name",
            "hostnames",
            ok=204,
            params=host,
        ),
        op(
            "POST",
            "/sites/{name}/hostnames/{hostname}/verify",
            verify_hostname,
            "verify_hostname",
            "Check DNS now for proof that the tenant owns a pending host name",
            "hostnames",
            answer=m.HostnameInfo,
            params=host,
        ),
        op(
            "POST",
            "/sites/{name}/hostnames/{hostname}/renew",
            renew_hostname,
            "renew_hostname",
            "Order the host name's ACME certificate now (an early renewal, or a retry after a failure)",
            "hostnames",
            ok=202,
            answer=m.HostnameInfo,
            params=host,
            errors=(429,),
        ),
        op(
            "GET",
            "/hostnames/{hostname}/availability",
            hostname_availability,
            "hostname_availability",
            "Whether a host name is free for a site",
            "hostnames",
            answer=m.Availability,
            params=(HOSTNAME,),
        ),
        op(
            "GET",
            "/backup",
            take_backup,
            "take_backup",
            "Admin: the runtime DB's tenant data (plans, tenants, users, tokens and credentials as hashes, settings, subscriptions, sites, custom hostnames, usage) read in one transaction, tagged with its schema revision, and each site's content version at that moment (download them as zips)",
            "backups",
            answer=m.Backup,
            errors=(403, 503),
        ),
        op(
            "POST",
            "/backup/restore",
            restore_backup,
            "restore_backup",
            "Admin: put a backup's tenant data into this cloud, refused unless it has no plans, tenants, users or sites (or force); answers once the roles run the restored sites, so their content can be deployed",
            "backups",
            answer=m.Restored,
            body=m.BackupRestore,
            body_limit=_RESTORE_MAX,
            errors=(403, 409, 413),
        ),
        # Hosts, roles and upgrades: their own module, which builds on this one's helpers.
        *fabric_operations(),
    ]


def api_routes() -> list[web.RouteDef]:
    return [web.route(op.method, op.path, checked(op)) for op in operations()]
