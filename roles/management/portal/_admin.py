"""The admin portal: roles and hosts, plans, tenants and subscriptions, every site, cloud settings."""

from __future__ import annotations

import asyncio
import datetime as dt
import re
from typing import Any

from aiohttp import web

from roles.management._fabric import SITES_NEED, last_running, outcome
from roles.management._request import service_of
from roles.management._site_backups import parse_every
from roles.management._store import WORKER_SIZES
from roles.management.api import reset_url
from roles.management.portal._charts import bar_chart
from roles.management.portal._web import (
    Page,
    check_confirmed,
    confirm_page,
    posted,
    render,
    require_page,
    see_other,
)
from shared.config import ROLE_KINDS
from shared.errors import InUse, InvalidInput, NotFound, SitecloudError
from shared.words import counted

__all__ = ["admin_routes"]

_INT_FIELDS = ("max_sites", "storage_mb", "max_custom_hostnames", "max_instances_per_site", "backup_keep")
_OPTIONAL_INT_FIELDS = ("bandwidth_mb_per_day", "cpu_minutes_per_day")


def _plan_body(form: Any, *, create: bool) -> dict[str, Any]:
    """A plan form as the API's JSON body; an empty bandwidth or CPU field means unlimited."""
    body: dict[str, Any] = {}
    if create:
        body["name"] = str(form.get("name", "")).strip()
    for key in (*_INT_FIELDS, *_OPTIONAL_INT_FIELDS):
        text = str(form.get(key, "")).strip()
        if not text:
            if key in _OPTIONAL_INT_FIELDS:
                body[key] = None
            continue
        try:
            body[key] = int(text)
        except ValueError:
            raise InvalidInput(f"{key.replace('_', ' ')} must be a whole number") from None
    body["compute_mode"] = "reserved" if form.get("compute_mode") == "reserved" else "shared"
    size = str(form.get("worker_size", ""))
    body["worker_size"] = size if body["compute_mode"] == "reserved" and size else None
    every = str(form.get("backup_every", "")).strip()
    if every:
        body["backup_every_seconds"] = parse_every(every)
    body["always_on"] = form.get("always_on") == "on"
    body["public"] = form.get("public") == "on"
    if not create:
        body["retired"] = form.get("retired") == "on"
    return body


async def _render(
    request: web.Request,
    template: str,
    page: Page,
    *,
    status: int = 200,
    error: SitecloudError | None = None,
    **ctx: Any,
) -> web.Response:
    return render(request, template, page=page, status=status, error=error, **ctx)


# -- dashboard: hosts and roles


async def _usage_charts(request: web.Request, page: Page) -> dict[str, Any]:
    """The cloud's usage per day over the last 14 days (every site summed), as SVG charts."""
    metering = service_of(request).metering
    today = metering.today()
    first = today - dt.timedelta(days=13)
    rows = (await asyncio.to_thread(metering.export, page.who, first, today))["rows"]
    days = [(first + dt.timedelta(days=i)).isoformat() for i in range(14)]
    requests = dict.fromkeys(days, 0.0)
    mb = dict.fromkeys(days, 0.0)
    cpu = dict.fromkeys(days, 0.0)
    for row in rows:
        requests[row["day"]] += row["requests"]
        mb[row["day"]] += (row["bytes_in"] + row["bytes_out"]) / 2**20
        cpu[row["day"]] += row["cpu_seconds"]
    return {
        "requests": bar_chart(list(requests.items()), label="Requests per day, all sites", unit="requests"),
        "bandwidth": bar_chart(
            [(d, round(v, 2)) for d, v in mb.items()], label="Bandwidth per day, all sites", unit="MB"
        ),
        "cpu": bar_chart(
            [(d, round(v, 1)) for d, v in cpu.items()], label="App CPU seconds per day", unit="s"
        ),
    }


async def _dashboard(
    request: web.Request, page: Page, *, status: int = 200, error: SitecloudError | None = None
) -> web.Response:
    service = service_of(request)
    roles = (await service.fabric.list_roles(page.who))["roles"]
    hosts: dict[str, list[dict[str, Any]]] = {}
    for role in roles:
        hosts.setdefault(role["host"], []).append(role)
    counts = {
        "sites": len((await service.list_sites(page.who))["sites"]),
        "tenants": len((await service.list_tenants(page.who))["tenants"]),
        "plans": len((await service.list_plans(page.who))["plans"]),
        "ready": sum(1 for r in roles if r["state"] == "Ready"),
        "roles": len(roles),
    }
    kinds = [k for k in ROLE_KINDS if k != "controller"]
    return await _render(
        request,
        "admin_home.html",
        page,
        status=status,
        error=error,
        hosts=hosts,
        counts=counts,
        kinds=kinds,
        usage=await _usage_charts(request, page),
    )


async def dashboard(request: web.Request) -> web.StreamResponse:
    return await _dashboard(request, await require_page(request, admin=True))


async def role_action(request: web.Request) -> web.StreamResponse:
    page = await require_page(request, admin=True)
    form = await posted(request, page)
    action = str(form.get("action", ""))
    kind, host = str(form.get("role", "")), str(form.get("host", ""))
    fabric = service_of(request).fabric
    try:
        if action == "add":
            await outcome(fabric.add_role(page.who, {"role": kind, "host": host}))
        elif action in _ROLE_NOTICES:
            if action in _ASKS_FIRST:
                check_confirmed(form, f"{action} {kind} {'from' if action == 'remove' else 'on'} {host}")
            # Confirmed on the page that asked first (stop and remove), as the API's "confirm" does.
            await outcome(fabric.role_action(page.who, kind, host, action, confirmed=True))
        else:
            raise InvalidInput("unknown role action")
    except SitecloudError as err:
        raise see_other(request, "/admin/", error=err) from None
    raise see_other(request, "/admin/", notice=_ROLE_NOTICES.get(action, "role-added"))


# What each role action's redirect shows; stop and remove ask first (they take a role's service away).
_ROLE_NOTICES = {
    "start": "role-started",
    "stop": "role-stopped",
    "restart": "role-restarted",
    "repair": "role-repaired",
    "remove": "role-removed",
}
_ASKS_FIRST = ("stop", "remove")


async def confirm_role_action(request: web.Request) -> web.StreamResponse:
    page = await require_page(request, admin=True)
    action = request.match_info["action"]
    kind, host = request.query.get("role", ""), request.query.get("host", "")
    roles = (await service_of(request).fabric.list_roles(page.who))["roles"]
    if not any(r["role"] == kind and r["host"] == host for r in roles):
        raise NotFound(f"no {kind} role on {host}", hint="see the list of roles on the dashboard")
    if action == "remove":
        title = f"Remove {kind} from {host}?"
        consequences = [f"This stops {kind} on {host} and deletes it from that host."]
    else:
        title = f"Stop {kind} on {host}?"
        consequences = [
            f"This stops {kind} on {host} until you start it again; the others of its kind go on."
        ]
    if kind == "management":
        consequences.append("The API and these portals are served by management roles: keep one running.")
    elif kind in SITES_NEED and last_running(roles, kind, host):
        consequences.append(
            f"It is the last running {kind}: every site goes down until one runs again ({SITES_NEED[kind]})."
        )
    return confirm_page(
        request,
        page,
        title=title,
        consequences=consequences,
        action="/admin/roles",
        button=f"{action.capitalize()} {kind}",
        cancel="/admin/",
        fields={"action": action, "role": kind, "host": host},
    )


# -- plans


async def _plans(
    request: web.Request,
    page: Page,
    *,
    status: int = 200,
    error: SitecloudError | None = None,
    form: Any = None,
) -> web.Response:
    plans = (await service_of(request).list_plans(page.who))["plans"]
    return await _render(
        request,
        "admin_plans.html",
        page,
        status=status,
        error=error,
        plans=plans,
        sizes=WORKER_SIZES,
        form=form or {},
    )


async def plans(request: web.Request) -> web.StreamResponse:
    return await _plans(request, await require_page(request, admin=True))


async def create_plan(request: web.Request) -> web.StreamResponse:
    page = await require_page(request, admin=True)
    form = await posted(request, page)
    try:
        await service_of(request).create_plan(page.who, _plan_body(form, create=True))
    except SitecloudError as err:
        sent = {k: v for k, v in form.items() if isinstance(v, str) and k != "csrf"}
        raise see_other(request, "/admin/plans", error=err, form=sent) from None
    raise see_other(request, "/admin/plans", notice="plan-created")


async def _plan(
    request: web.Request, page: Page, *, status: int = 200, error: SitecloudError | None = None
) -> web.Response:
    plan = await service_of(request).show_plan(page.who, request.match_info["name"])
    return await _render(
        request, "admin_plan.html", page, status=status, error=error, plan=plan, sizes=WORKER_SIZES
    )


async def plan(request: web.Request) -> web.StreamResponse:
    return await _plan(request, await require_page(request, admin=True))


async def confirm_plan_delete(request: web.Request) -> web.StreamResponse:
    page = await require_page(request, admin=True)
    plan = await service_of(request).show_plan(page.who, request.match_info["name"])
    name = plan["name"]
    if plan["subscriptions"]:
        raise see_other(
            request,
            f"/admin/plans/{name}",
            error=InUse(
                f"plan {name} is used by {counted(plan['subscriptions'], 'subscription')}",
                hint="delete those subscriptions first, or retire the plan so it takes no new ones",
            ),
        )
    return confirm_page(
        request,
        page,
        title=f"Delete plan {name}?",
        consequences=[f"No subscription uses plan {name}; it goes from the list of plans for good."],
        action=f"/admin/plans/{name}/delete",
        button=f"Delete plan {name}",
        cancel=f"/admin/plans/{name}",
    )


async def delete_plan(request: web.Request) -> web.StreamResponse:
    page = await require_page(request, admin=True)
    form = await posted(request, page)
    name = request.match_info["name"]
    try:
        check_confirmed(form, f"delete plan {name}")
        await service_of(request).delete_plan(page.who, name)
    except SitecloudError as err:
        raise see_other(request, f"/admin/plans/{name}", error=err) from None
    raise see_other(request, "/admin/plans", notice="plan-deleted")


async def update_plan(request: web.Request) -> web.StreamResponse:
    page = await require_page(request, admin=True)
    form = await posted(request, page)
    name = request.match_info["name"]
    try:
        await service_of(request).update_plan(page.who, name, _plan_body(form, create=False))
    except SitecloudError as err:
        raise see_other(request, f"/admin/plans/{name}", error=err) from None
    raise see_other(request, f"/admin/plans/{name}", notice="plan-saved")


# -- tenants and subscriptions


async def _tenants(
    request: web.Request, page: Page, *, status: int = 200, error: SitecloudError | None = None, **extra: Any
) -> web.Response:
    service = service_of(request)
    return await _render(
        request,
        "admin_tenants.html",
        page,
        status=status,
        error=error,
        tenants=(await service.list_tenants(page.who))["tenants"],
        subs=(await service.list_subscriptions(page.who))["subscriptions"],
        plans=[p for p in (await service.list_plans(page.who))["plans"] if not p["retired"]],
        new_tenant=extra.pop("new_tenant", None),
        new_user=extra.pop("new_user", None),
        **extra,
    )


async def tenants(request: web.Request) -> web.StreamResponse:
    return await _tenants(request, await require_page(request, admin=True))


async def tenant_action(request: web.Request) -> web.StreamResponse:
    page = await require_page(request, admin=True)
    form = await posted(request, page)
    service, action = service_of(request), str(form.get("action", ""))
    back = _back(form)
    try:
        if action == "delete-tenant":
            name = str(form.get("tenant", ""))
            check_confirmed(form, f"delete tenant {name} and everything it has", name)
            await service.delete_tenant(page.who, name)
            raise see_other(
                request, "/admin/tenants", notice=f"Tenant {name} deleted, with its sites and users."
            )
        if action == "create-tenant":
            tenant = await service.create_tenant(page.who, {"name": str(form.get("name", "")).strip()})
            # The token is shown once, on the page this redirect leads to.
            raise see_other(
                request,
                back,
                notice=f"Tenant {tenant['name']} created.",
                new_tenant={"name": tenant["name"], "token": tenant["token"]},
            )
        if action == "create-user":
            body = {
                "username": str(form.get("username", "")).strip(),
                "tenant": str(form.get("tenant", "")) or None,
            }
            user = await service.create_user(page.who, body)
            raise see_other(
                request,
                back,
                notice=f"User {user['username']} created.",
                new_user={"username": user["username"], "password": user.get("password")},
            )
        if action == "subscribe":
            await service.create_subscription(
                page.who, {"tenant": str(form.get("tenant", "")), "plan": str(form.get("plan", ""))}
            )
            raise see_other(request, back, notice="subscribed")
        sub_id = int(str(form.get("subscription", "0")) or 0)
        if action == "suspend":
            await service.suspend_subscription(page.who, sub_id)
            raise see_other(request, back, notice="suspended")
        if action == "resume":
            await service.resume_subscription(page.who, sub_id)
            raise see_other(request, back, notice="resumed")
        if action == "delete":
            check_confirmed(form, f"delete subscription {sub_id} and its sites", str(sub_id))
            await service.delete_subscription(page.who, sub_id)
            raise see_other(request, back, notice="subscription-deleted")
        raise InvalidInput("unknown action")
    except SitecloudError as err:
        typed = form if action in ("create-tenant", "create-user") else None
        raise see_other(request, back, error=err, form=typed) from None
    except ValueError:
        # Only a hand-made request sends a subscription that is not a number: a plain 400.
        raise InvalidInput("choose a subscription", hint="subscriptions are numbers") from None


def _back(form: Any) -> str:
    """Where a tenants form returns to: the tenants page, or the tenant's own page it was sent from."""
    back = str(form.get("back", ""))
    if back.startswith("/admin/tenants/") and _TENANT_PAGE.fullmatch(back):
        return back
    return "/admin/tenants"


_TENANT_PAGE = re.compile(r"/admin/tenants/[a-z0-9][a-z0-9._-]{0,63}")


async def tenant(request: web.Request) -> web.StreamResponse:
    page = await require_page(request, admin=True)
    service = service_of(request)
    detail = await service.show_tenant(page.who, request.match_info["name"])
    plans = [p for p in (await service.list_plans(page.who))["plans"] if not p["retired"]]
    return await _render(
        request, "admin_tenant.html", page, tenant=detail, plans=plans, reset_link=None, new_user=None
    )


async def confirm_tenant_delete(request: web.Request) -> web.StreamResponse:
    page = await require_page(request, admin=True)
    detail = await service_of(request).show_tenant(page.who, request.match_info["name"])
    name = detail["name"]
    sites = [s["name"] for s in detail["sites"]]
    return confirm_page(
        request,
        page,
        title=f"Delete tenant {name}?",
        consequences=[
            f"This deletes tenant {name} for good: its {counted(len(detail['subscriptions']), 'subscription')}, "
            f"its {counted(len(detail['users']), 'portal user')} and every API token it has"
            + (
                f", and its {counted(len(sites), 'site')} with all their content:"
                if sites
                else " (it has no sites)."
            ),
        ],
        items=sites,
        action="/admin/tenants",
        button=f"Delete tenant {name}",
        cancel=f"/admin/tenants/{name}",
        word=name,
        fields={"action": "delete-tenant", "tenant": name},
    )


async def confirm_reset_link(request: web.Request) -> web.StreamResponse:
    page = await require_page(request, admin=True)
    username = request.match_info["username"]
    users = (await service_of(request).list_users(page.who))["users"]
    user = next((u for u in users if u["username"] == username), None)
    if user is None:
        raise NotFound(f"no user {username!r}", hint="see the list of users")
    back = f"/admin/tenants/{user['tenant']}" if user["tenant"] else "/admin/settings"
    return confirm_page(
        request,
        page,
        title=f"Issue a password reset link for {username}?",
        consequences=[
            f"Whoever opens the link within an hour can set {username}'s password, once. "
            "Give it to the user yourself: this cloud sends no mail.",
            "Until it is used the current password keeps working; an earlier link stops working.",
        ],
        action="/admin/users/reset-link",
        button="Issue reset link",
        cancel=back,
        fields={"username": username, "back": back},
    )


async def issue_reset_link(request: web.Request) -> web.StreamResponse:
    page = await require_page(request, admin=True)
    form = await posted(request, page)
    username = str(form.get("username", ""))
    back = "/admin/settings" if form.get("back") == "/admin/settings" else _back(form)
    try:
        check_confirmed(form, f"issue a password reset link for {username}")
        link = await service_of(request).issue_reset_link(page.who, username)
    except SitecloudError as err:
        raise see_other(request, back, error=err) from None
    url = reset_url(request, link["token"])
    raise see_other(
        request,
        back,
        notice=f"Reset link for {username} issued.",
        reset_link={"username": username, "url": url, "expires_at": link["expires_at"]},
    )


async def confirm_subscription_delete(request: web.Request) -> web.StreamResponse:
    page = await require_page(request, admin=True)
    service, sub_id = service_of(request), int(request.match_info["id"])
    sub = await service.show_subscription(page.who, sub_id)
    sites = [s["name"] for s in (await service.list_sites(page.who))["sites"] if s["subscription"] == sub_id]
    return confirm_page(
        request,
        page,
        title=f"Delete subscription {sub_id}?",
        consequences=[
            f"This deletes subscription {sub_id} of tenant {sub['tenant']} (plan {sub['plan']}) "
            + (
                f"and its {counted(len(sites), 'site')} with all their content, for good:"
                if sites
                else "(it has no sites)."
            ),
        ],
        items=sites,
        action="/admin/tenants",
        button=f"Delete subscription {sub_id}",
        cancel="/admin/tenants",
        word=str(sub_id),
        fields={"action": "delete", "subscription": str(sub_id)},
    )


# -- sites and settings


async def sites(request: web.Request) -> web.StreamResponse:
    page = await require_page(request, admin=True)
    return await _render(
        request, "admin_sites.html", page, sites=(await service_of(request).list_sites(page.who))["sites"]
    )


async def _settings(
    request: web.Request, page: Page, *, status: int = 200, error: SitecloudError | None = None, **extra: Any
) -> web.Response:
    service = service_of(request)
    return await _render(
        request,
        "admin_settings.html",
        page,
        status=status,
        error=error,
        settings=await service.get_settings(),
        users=(await service.list_users(page.who))["users"],
        new_user=extra.pop("new_user", None),
        reset_link=extra.pop("reset_link", None),
        **extra,
    )


async def settings(request: web.Request) -> web.StreamResponse:
    return await _settings(request, await require_page(request, admin=True))


async def update_settings(request: web.Request) -> web.StreamResponse:
    page = await require_page(request, admin=True)
    form = await posted(request, page)
    service = service_of(request)
    try:
        if form.get("action") == "create-admin":
            user = await service.create_user(page.who, {"username": str(form.get("username", "")).strip()})
            raise see_other(
                request,
                "/admin/settings",
                notice=f"Admin {user['username']} created.",
                new_user={"username": user["username"], "password": user.get("password")},
            )
        await service.update_settings(page.who, {"signup_enabled": form.get("signup_enabled") == "on"})
    except SitecloudError as err:
        raise see_other(request, "/admin/settings", error=err) from None
    raise see_other(request, "/admin/settings", notice="cloud-saved")


def admin_routes() -> list[web.RouteDef]:
    return [
        web.get("/admin/", dashboard),
        web.post("/admin/roles", role_action),
        web.get("/admin/roles/{action:remove|stop}", confirm_role_action),
        web.get("/admin/plans", plans),
        web.post("/admin/plans", create_plan),
        web.get("/admin/plans/{name}", plan),
        web.post("/admin/plans/{name}", update_plan),
        web.get("/admin/plans/{name}/delete", confirm_plan_delete),
        web.post("/admin/plans/{name}/delete", delete_plan),
        web.get("/admin/tenants", tenants),
        web.post("/admin/tenants", tenant_action),
        web.get("/admin/tenants/{name}", tenant),
        web.get("/admin/tenants/{name}/delete", confirm_tenant_delete),
        web.get("/admin/users/{username}/reset-link", confirm_reset_link),
        web.post("/admin/users/reset-link", issue_reset_link),
        web.get(r"/admin/subscriptions/{id:\d{1,9}}/delete", confirm_subscription_delete),
        web.get("/admin/sites", sites),
        web.get("/admin/settings", settings),
        web.post("/admin/settings", update_settings),
    ]
