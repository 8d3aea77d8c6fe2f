"""The tenant portal: subscriptions and quota use, sites and everything on a site's page.

Every action calls the same :class:`ManagementService` method as the REST API; admins may open any
site's page too (the service decides what each principal may do).
"""

from __future__ import annotations

import base64
import contextlib
import datetime as dt
import json
from collections.abc import AsyncIterator
from typing import Any

from aiohttp import BodyPartReader, web

from roles.management._request import service_of
from roles.management.api import backup_download, zip_download
from roles.management.portal._charts import bar_chart
from roles.management.portal._web import (
    Page,
    check_confirmed,
    check_csrf,
    check_origin,
    confirm_page,
    posted,
    render,
    require_page,
    see_other,
)
from roles.management.service import ManagementService
from shared.errors import (
    BadRequest,
    BuildFailed,
    InvalidInput,
    NotFound,
    NotServed,
    SitecloudError,
    Unavailable,
    error_from_json,
)
from shared.words import counted

__all__ = ["tenant_routes"]

_CHUNK = 256 * 1024
# As the API's default: the slot's app has this long to answer its first request.
_SWAP_WARM_SECONDS = 60.0
# The site page's forms whose fields the owner types in.
_TYPED = frozenset({"hostname", "settings", "slot-create"})
# The log page shows this many of the newest lines (the CLI's `site logs --lines` reads more).
_LOG_LINES = 200
# A start's page waits this long for the site's build; a longer one goes on, and the page says so.
_START_WAIT = 120.0
# What to do when a start fails, as the CLI says it, in the portal's words.
_REBUILD = "fix what the build says and deploy again, or roll back to an earlier version under Versions below"
_NO_WORKER = (
    "ask your hosting provider to start the site's servers: it serves this version as soon as one runs"
)


def _site(request: web.Request) -> str:
    return request.match_info["name"]


async def _home(
    request: web.Request, page: Page, *, status: int = 200, error: SitecloudError | None = None, **extra: Any
) -> web.Response:
    service = service_of(request)
    subs = (await service.list_subscriptions(page.who))["subscriptions"]
    sites = (await service.list_sites(page.who))["sites"]
    plans = (await service.list_plans(page.who))["plans"] if not page.who.is_admin else []
    return render(
        request,
        "tenant_home.html",
        page=page,
        status=status,
        error=error,
        subs=subs,
        sites=sites,
        plans=plans,
        **extra,
    )


async def home(request: web.Request) -> web.StreamResponse:
    return await _home(request, await require_page(request))


async def subscribe(request: web.Request) -> web.StreamResponse:
    page = await require_page(request)
    form = await posted(request, page)
    try:
        await service_of(request).create_subscription(page.who, {"plan": str(form.get("plan", ""))})
    except SitecloudError as err:
        raise see_other(request, "/portal/", error=err) from None
    raise see_other(request, "/portal/", notice="subscribed")


async def create_site(request: web.Request) -> web.StreamResponse:
    page = await require_page(request)
    form = await posted(request, page)
    name = str(form.get("name", "")).strip()
    try:
        sub = int(str(form.get("subscription", "")))
    except ValueError:
        error = InvalidInput("choose a subscription for the site")
        raise see_other(request, "/portal/", error=error, new_name=name) from None
    try:
        site = await service_of(request).create_site(page.who, {"name": name, "subscription": sub})
    except SitecloudError as err:
        raise see_other(request, "/portal/", error=err, new_name=name) from None
    # The password is shown once, on the page this redirect leads to.
    raise see_other(request, _site_url(site["name"]), notice="site-created", secret=_secret(site))


def _site_url(name: str) -> str:
    return f"/portal/sites/{name}"


def _secret(site: dict[str, Any]) -> dict[str, Any]:
    """Only what the page shows of a new publishing password."""
    return {"ftp": {"user": site["ftp"]["user"], "password": site["ftp"]["password"]}}


async def _site_page(
    request: web.Request,
    page: Page,
    name: str,
    *,
    status: int = 200,
    error: SitecloudError | None = None,
    **extra: Any,
) -> web.Response:
    service = service_of(request)
    site = await service.show_site(page.who, name)
    app_settings = await service.get_app_settings(page.who, name)
    settings = app_settings["settings"]
    hostnames = (await service.list_hostnames(page.who, name))["hostnames"]
    storage = await service.site_storage(page.who, name)
    today = service.metering.today()
    usage = await service.site_usage(page.who, name, today - dt.timedelta(days=13), today)
    days = usage["days"]
    charts = {
        "requests": bar_chart(
            [(d["day"], d["requests"]) for d in days], label="Requests per day, last 14 days", unit="requests"
        ),
        "bandwidth": bar_chart(
            [(d["day"], round((d["bytes_in"] + d["bytes_out"]) / 2**20, 2)) for d in days],
            label="Bandwidth (in and out) per day, last 14 days",
            unit="MB",
        ),
        "cpu": bar_chart(
            [(d["day"], d["cpu_seconds"]) for d in days], label="App CPU seconds per day", unit="s"
        ),
    }
    # The page still works when the fileserver cannot be reached: the versions say why they are missing.
    versions: list[dict[str, Any]] = []
    current_version = None
    versions_problem = None
    try:
        listed = await service.site_versions(page.who, name)
        versions, current_version = list(reversed(listed["versions"])), listed.get("current")
    except SitecloudError as err:
        versions_problem = err.message
    backups = await service.site_backups(page.who, name)
    backups["backups"].reverse()
    # A slot has no slots of its own: its page says so instead (refused as not a production site).
    slots: list[dict[str, Any]] | None = None
    with contextlib.suppress(InvalidInput):
        slots = (await service.list_slots(page.who, name))["slots"]
    check = None
    wanted = request.query.get("check", "").strip()
    if wanted:
        try:
            check = await service.hostname_availability(page.who, wanted)
        except SitecloudError as err:
            check = {"hostname": wanted, "available": False, "reason": err.message}
    extra.setdefault("secret", None)
    return render(
        request,
        "site.html",
        page=page,
        status=status,
        error=error,
        site=site,
        settings=settings,
        hostnames=hostnames,
        storage=storage,
        usage=usage,
        charts=charts,
        check=check,
        versions=versions,
        current_version=current_version,
        versions_problem=versions_problem,
        backups=backups,
        slots=slots,
        sticky=set(app_settings.get("sticky", [])),
        **extra,
    )


async def site_page(request: web.Request) -> web.StreamResponse:
    return await _site_page(request, await require_page(request), _site(request))


async def site_logs(request: web.Request) -> web.StreamResponse:
    """The site's last log lines, as `sitecloud site logs` prints them; a worker that cannot be read
    is said on the page, which still works."""
    page, name = await require_page(request), _site(request)
    service = service_of(request)
    await service.check_site(page.who, name)
    lines: list[str] = []
    problem: SitecloudError | None = None
    try:
        async for line in service.site_logs(page.who, name, follow=False, lines=_LOG_LINES):
            lines.append(line.decode("utf-8", "replace"))
    except SitecloudError as err:
        problem = err
    return render(
        request, "site_logs.html", page=page, site=name, log="".join(lines), lines=_LOG_LINES, problem=problem
    )


async def site_console(request: web.Request) -> web.StreamResponse:
    """A command run once in the site's app sandbox from the browser (`sitecloud site run`): the
    form, and after a POST its output on the same page (an answer to read, not a state to go back to)."""
    page, name = await require_page(request), _site(request)
    service = service_of(request)
    await service.check_site(page.who, name)
    command, timeout = "", 60
    result: dict[str, Any] | None = None
    problem: SitecloudError | None = None
    if request.method == "POST":
        form = await posted(request, page)
        command = str(form.get("command", "")).strip()
        try:
            timeout = int(str(form.get("timeout", "60")) or "60")
        except ValueError:
            problem = InvalidInput("stop it after a whole number of seconds", hint="1 to 600")
        if problem is None:
            try:
                result = await service.run_command(page.who, name, command, float(timeout))
            except SitecloudError as err:
                problem = err
    return render(
        request,
        "site_console.html",
        page=page,
        site=name,
        command=command,
        timeout=timeout,
        result=result,
        problem=problem,
    )


async def _site_action(request: web.Request, action: str) -> web.StreamResponse:
    page = await require_page(request)
    form = await posted(request, page)
    service, name = service_of(request), _site(request)
    back = _site_url(name)
    try:
        if action == "start":
            raise see_other(request, back, notice=await _start(service, page, name))
        if action == "stop":
            await service.stop_site(page.who, name)
            raise see_other(request, back, notice="stopped")
        if action == "restart":
            done = await service.restart_site(page.who, name)
            raise see_other(request, back, notice="restart-pending" if done.get("pending") else "restarted")
        if action == "delete":
            check_confirmed(form, f"delete {name} and its content", name)
            await service.delete_site(page.who, name)
            raise see_other(request, "/portal/", notice="site-deleted")
        if action == "password":
            check_confirmed(form, f"set a new publishing password for {name}")
            secret = await service.reset_publishing_password(page.who, name)
            raise see_other(request, back, notice="password-reset", secret=_secret(secret))
        if action == "settings":
            key, value = str(form.get("key", "")).strip(), form.get("value")
            remove = form.get("remove")
            if isinstance(remove, str) and remove:
                await service.update_app_settings(page.who, name, {remove: None})
            else:
                await service.update_app_settings(
                    page.who, name, {key: value if isinstance(value, str) else ""}
                )
            raise see_other(request, back, notice="settings-saved")
        if action == "rollback":
            version = _version(form.get("version"))
            check_confirmed(form, f"roll {name} back to version {version}")
            done = await service.rollback_site(page.who, name, version)
            raise see_other(
                request,
                back,
                notice=f"Rolled back to version {done['rolled_back_to']}: it is served as version {done['version']}.",
            )
        if action == "backup-restore":
            backup = str(form.get("backup", ""))
            check_confirmed(form, f"restore {name} from the backup {backup}")
            done = await service.restore_site_backup(page.who, name, backup)
            raise see_other(
                request,
                back,
                notice=f"Restored from {done['restored']}: it is served as version {done['version']}.",
            )
        if action == "slot-create":
            created = await service.create_slot(page.who, name, str(form.get("slot", "")).strip())
            # The slot's password is shown once, on its own page.
            raise see_other(
                request, _site_url(created["name"]), notice="slot-created", secret=_secret(created)
            )
        if action == "slot-delete":
            slot = str(form.get("slot", ""))
            check_confirmed(form, f"delete the slot {slot} of {name} and its content", f"{name}-{slot}")
            await service.delete_slot(page.who, name, slot)
            raise see_other(request, back, notice="slot-deleted")
        if action == "swap":
            slot = str(form.get("slot", ""))
            check_confirmed(form, f"swap {name} with its slot {slot}")
            swapped = await service.swap_slot(page.who, name, slot, _SWAP_WARM_SECONDS)
            raise see_other(
                request,
                back,
                notice=f"Swapped: {name}'s address now serves {swapped['production_served_by']}, "
                f"the {slot} address serves {swapped['slot_served_by']}.",
            )
        if action == "sticky":
            key, on = str(form.get("key", "")), form.get("sticky") == "on"
            current = set((await service.get_app_settings(page.who, name)).get("sticky", []))
            await service.set_sticky(page.who, name, sorted(current | {key} if on else current - {key}))
            raise see_other(request, back, notice="settings-saved")
        if action == "hostname-remove":
            hostname = str(form.get("hostname", ""))
            check_confirmed(form, f"remove {hostname} from {name}")
            await service.delete_hostname(page.who, name, hostname)
            raise see_other(request, back, notice="hostname-removed")
        if action == "hostname-renew":
            await service.renew_hostname(page.who, name, str(form.get("hostname", "")))
            raise see_other(request, back, notice="hostname-renewing")
        if action == "hostname-verify":
            checked = await service.verify_hostname(page.who, name, str(form.get("hostname", "")))
            raise see_other(request, back, notice=f"hostname-{checked['state']}")
        if action == "hostname":
            await service.add_hostname(page.who, name, _hostname_body(form))
            raise see_other(request, back, notice="hostname-added")
    except SitecloudError as err:
        # What was typed comes back; a row's button (verify, remove) typed nothing.
        typed = form if action in _TYPED else None
        raise see_other(request, back, error=err, form=typed) from None
    raise web.HTTPNotFound()


async def _start(service: ManagementService, page: Page, name: str) -> str:
    """Start the site and wait for its build, as `sitecloud site start` does: a failed build, or no
    worker to serve it, is raised, with what to do on this portal; what is left is the notice."""
    try:
        started, built = await service.start_site_built(page.who, name, wait=_START_WAIT)
    except BuildFailed as err:
        raise BuildFailed(err.message, hint=_REBUILD) from None
    except NotServed as err:
        raise NotServed(err.message, hint=_NO_WORKER) from None
    if started.get("pending"):
        return f"Site started, but {started['pending']}."
    if not built:
        return "Site started; its newest version may still be building: it serves that once it is built."
    return "started"


def _version(raw: object) -> int:
    if not isinstance(raw, str) or not raw.isascii() or not raw.isdigit() or len(raw) > 9:
        raise InvalidInput(f"the version must be a version number from the list, not {raw!r}")
    return int(raw)


# -- the pages that ask before a destructive POST


async def confirm_delete(request: web.Request) -> web.StreamResponse:
    page, name = await require_page(request), _site(request)
    site = await service_of(request).show_site(page.who, name)
    return confirm_page(
        request,
        page,
        title=f"Delete {name}?",
        consequences=[
            f"This deletes the site {name} and all its content, for good.",
            f"{site['url']} stops serving at once; a new site with this name starts empty.",
        ],
        items=site.get("hostnames") or (),
        action=f"{_site_url(name)}/delete",
        button=f"Delete {name}",
        cancel=_site_url(name),
        word=name,
    )


async def confirm_password(request: web.Request) -> web.StreamResponse:
    page, name = await require_page(request), _site(request)
    await service_of(request).show_site(page.who, name)
    return confirm_page(
        request,
        page,
        title=f"New publishing password for {name}?",
        consequences=[
            "The old password stops working at once for FTP, web deploy and git, "
            "and so do the publish profiles downloaded before.",
        ],
        action=f"{_site_url(name)}/password",
        button="Set a new password",
        cancel=_site_url(name),
    )


async def confirm_publish_profile(request: web.Request) -> web.StreamResponse:
    page, name = await require_page(request), _site(request)
    await service_of(request).show_site(page.who, name)
    return confirm_page(
        request,
        page,
        title=f"Download a publish profile for {name}?",
        consequences=[
            "Passwords are stored only as hashes, so the profile holds a new publishing password.",
            "The old password and earlier profiles stop working at once.",
        ],
        action=f"{_site_url(name)}/publish-profile",
        button="Download publish profile",
        cancel=_site_url(name),
    )


async def confirm_remove_hostname(request: web.Request) -> web.StreamResponse:
    page, name = await require_page(request), _site(request)
    hostname = request.query.get("hostname", "")
    known = (await service_of(request).list_hostnames(page.who, name))["hostnames"]
    if hostname not in [h["hostname"] for h in known]:
        raise NotFound(f"{name} has no custom hostname {hostname!r}")
    return confirm_page(
        request,
        page,
        title=f"Remove {hostname}?",
        consequences=[f"{hostname} stops serving {name} at once, and its certificate is deleted."],
        action=f"{_site_url(name)}/hostnames/remove",
        button=f"Remove {hostname}",
        cancel=_site_url(name),
        fields={"hostname": hostname},
    )


async def confirm_rollback(request: web.Request) -> web.StreamResponse:
    page, name = await require_page(request), _site(request)
    version = _version(request.query.get("version"))
    versions = (await service_of(request).site_versions(page.who, name))["versions"]
    chosen = next((v for v in versions if v["version"] == version), None)
    if chosen is None or version == versions[-1]["version"]:
        raise NotFound(
            f"{name} has no earlier kept version {version}",
            hint="pick one from the site's versions",
        )
    return confirm_page(
        request,
        page,
        title=f"Roll {name} back to version {version}?",
        consequences=[
            f"The whole site flips at once to version {version}'s content "
            f"({counted(chosen['files'], 'file')}, {counted(chosen['total_bytes'], 'byte')}), as a new version.",
            "Nothing is lost: the current content stays a kept version you can roll forward to.",
        ],
        action=f"{_site_url(name)}/rollback",
        button=f"Roll back to version {version}",
        cancel=_site_url(name),
        fields={"version": str(version)},
    )


async def confirm_backup_restore(request: web.Request) -> web.StreamResponse:
    page, name = await require_page(request), _site(request)
    backup = request.query.get("backup", "")
    found = await service_of(request).site_backup(page.who, name, backup)
    return confirm_page(
        request,
        page,
        title=f"Restore {name} from {backup}?",
        consequences=[
            f"The whole site flips at once to the content of version {found.version}, "
            f"backed up {found.created:%Y-%m-%d %H:%M} UTC, as a new version.",
            "Nothing is lost: the current content stays a kept version you can roll back to.",
        ],
        action=f"{_site_url(name)}/backups/restore",
        button="Restore this backup",
        cancel=_site_url(name),
        fields={"backup": backup},
    )


async def _slot_row(request: web.Request, page: Page, name: str) -> dict[str, Any]:
    slot = request.query.get("slot", "")
    slots: list[dict[str, Any]] = (await service_of(request).list_slots(page.who, name))["slots"]
    row = next((s for s in slots if s["slot"] == slot and slot != "production"), None)
    if row is None:
        raise NotFound(f"site {name} has no slot {slot!r}", hint="pick one from the site's slots")
    return row


async def confirm_swap(request: web.Request) -> web.StreamResponse:
    page, name = await require_page(request), _site(request)
    row = await _slot_row(request, page, name)
    slot = row["slot"]
    return confirm_page(
        request,
        page,
        title=f"Swap {name} with its {slot} slot?",
        consequences=[
            f"First the app serving the {slot} address is warmed (its first request answered); "
            "if it does not answer, nothing changes.",
            f"Then {name}'s address serves what the {slot} address serves now, and the other way "
            "round, on every front end at once. Visitors' requests do not fail.",
            "Sticky settings stay with their address. Swap again to go back.",
        ],
        action=f"{_site_url(name)}/slots/swap",
        button=f"Swap with {slot}",
        cancel=_site_url(name),
        fields={"slot": slot},
    )


async def confirm_slot_delete(request: web.Request) -> web.StreamResponse:
    page, name = await require_page(request), _site(request)
    row = await _slot_row(request, page, name)
    return confirm_page(
        request,
        page,
        title=f"Delete the slot {row['slot']} of {name}?",
        consequences=[
            f"This deletes the site {row['site']} and all its content, for good.",
            f"{row['url']} stops serving at once.",
        ],
        action=f"{_site_url(name)}/slots/delete",
        button=f"Delete {row['site']}",
        cancel=_site_url(name),
        word=row["site"],
        fields={"slot": row["slot"]},
    )


async def download_version(request: web.Request) -> web.StreamResponse:
    page, name = await require_page(request), _site(request)
    return await zip_download(request, page.who, name, _version(request.match_info["version"]))


async def download_backup(request: web.Request) -> web.StreamResponse:
    page, name = await require_page(request), _site(request)
    return await backup_download(request, page.who, name, request.match_info["backup"])


def _file(form: Any, key: str) -> bytes | None:
    field = form.get(key)
    if isinstance(field, web.FileField):
        data = field.file.read()
        return data or None
    return None


def _hostname_body(form: Any) -> dict[str, Any]:
    body: dict[str, Any] = {"hostname": str(form.get("hostname", "")).strip()}
    pfx, cert, key = _file(form, "pfx"), _file(form, "certificate"), _file(form, "key")
    password = str(form.get("password", "")) or None
    if pfx:
        body["pfx"] = base64.b64encode(pfx).decode()
    elif cert:
        try:
            body["certificate"] = cert.decode()
            body["key"] = key.decode() if key else None
        except UnicodeDecodeError:
            raise InvalidInput(
                "the certificate and key must be PEM text files", hint="or upload a .pfx file"
            ) from None
    if password and (pfx or cert):
        body["password"] = password
    return body


async def start(request: web.Request) -> web.StreamResponse:
    return await _site_action(request, "start")


async def stop(request: web.Request) -> web.StreamResponse:
    return await _site_action(request, "stop")


async def restart(request: web.Request) -> web.StreamResponse:
    return await _site_action(request, "restart")


async def delete(request: web.Request) -> web.StreamResponse:
    return await _site_action(request, "delete")


async def reset_password(request: web.Request) -> web.StreamResponse:
    return await _site_action(request, "password")


async def app_settings(request: web.Request) -> web.StreamResponse:
    return await _site_action(request, "settings")


async def add_hostname(request: web.Request) -> web.StreamResponse:
    return await _site_action(request, "hostname")


async def rollback(request: web.Request) -> web.StreamResponse:
    return await _site_action(request, "rollback")


async def restore_backup(request: web.Request) -> web.StreamResponse:
    return await _site_action(request, "backup-restore")


async def create_slot(request: web.Request) -> web.StreamResponse:
    return await _site_action(request, "slot-create")


async def delete_slot(request: web.Request) -> web.StreamResponse:
    return await _site_action(request, "slot-delete")


async def swap(request: web.Request) -> web.StreamResponse:
    return await _site_action(request, "swap")


async def sticky(request: web.Request) -> web.StreamResponse:
    return await _site_action(request, "sticky")


async def remove_hostname(request: web.Request) -> web.StreamResponse:
    return await _site_action(request, "hostname-remove")


async def verify_hostname(request: web.Request) -> web.StreamResponse:
    return await _site_action(request, "hostname-verify")


async def renew_hostname(request: web.Request) -> web.StreamResponse:
    return await _site_action(request, "hostname-renew")


async def publish_profile(request: web.Request) -> web.StreamResponse:
    page = await require_page(request)
    form = await posted(request, page)
    name = _site(request)
    try:
        check_confirmed(form, f"set a new publishing password for {name} in a publish profile")
        body = await service_of(request).publish_profile(page.who, name)
    except SitecloudError as err:
        raise see_other(request, _site_url(name), error=err) from None
    return web.Response(
        body=body,
        content_type="application/xml",
        headers={
            "Cache-Control": "no-store",
            "Content-Disposition": f'attachment; filename="{name}.PublishSettings"',
        },
    )


async def deploy(request: web.Request) -> web.StreamResponse:
    """A zip from the browser, streamed to the publisher the way the API's deploy does it.

    The form puts the CSRF field before the file, so it is checked before any upload is read.
    """
    page = await require_page(request)
    name = _site(request)
    check_origin(request)
    try:
        reader = await request.multipart()
        part = await reader.next()
        if not isinstance(part, BodyPartReader) or part.name != "csrf":
            raise BadRequest("the upload form is incomplete", hint="reload the page and try again")
        check_csrf(page, (await part.read()).decode(errors="replace"))
        part = await reader.next()
        if not isinstance(part, BodyPartReader) or part.name != "zip" or not part.filename:
            raise InvalidInput("choose a .zip file to deploy")
        upload = part

        async def chunks() -> AsyncIterator[bytes]:
            while chunk := await upload.read_chunk(_CHUNK):
                yield chunk

        answer = await _deployed_and_built(service_of(request), page, name, chunks())
    except BuildFailed as err:
        err = BuildFailed(err.message, hint=_REBUILD)
        raise see_other(request, _site_url(name), error=err) from None
    except NotServed as err:
        err = NotServed(err.message, hint=_NO_WORKER)
        raise see_other(request, _site_url(name), error=err) from None
    except SitecloudError as err:
        raise see_other(request, _site_url(name), error=err) from None
    said = (
        f"Deployed {counted(answer.get('files', 0), 'file')}, {counted(answer.get('bytes', 0), 'byte')}: "
        f"content version {answer.get('version')}"
    )
    message = str(answer.get("message") or "")
    raise see_other(request, _site_url(name), notice=f"{said}. {message}" if message else f"{said}, served.")


async def _deployed_and_built(
    service: ManagementService, page: Page, name: str, body: AsyncIterator[bytes]
) -> dict[str, Any]:
    """The deploy's answer once the site's workers serve it built, as `sitecloud deploy` waits for
    it: a version whose build fails is put back and raised (BuildFailed), with pip's or npm's lines."""
    answer: dict[str, Any] | None = None
    async for line in service.deploy_following(page.who, name, body):
        event = json.loads(line)
        if not isinstance(event, dict):
            continue
        if "error" in event:
            raise error_from_json(500, event)
        if isinstance(event.get("result"), dict):
            answer = event["result"]
    if answer is None:
        raise Unavailable(
            "the deploy ended without an answer", hint="look at the site's versions, then try again"
        )
    return answer


def tenant_routes() -> list[web.RouteDef]:
    s = "/portal/sites/{name}"
    return [
        web.get("/portal/", home),
        web.post("/portal/subscribe", subscribe),
        web.post("/portal/sites", create_site),
        web.get(s, site_page),
        web.post(f"{s}/start", start),
        web.post(f"{s}/stop", stop),
        web.post(f"{s}/restart", restart),
        web.get(f"{s}/logs", site_logs),
        web.get(f"{s}/console", site_console),
        web.post(f"{s}/console", site_console),
        web.get(f"{s}/delete", confirm_delete),
        web.post(f"{s}/delete", delete),
        web.get(f"{s}/password", confirm_password),
        web.post(f"{s}/password", reset_password),
        web.get(f"{s}/publish-profile", confirm_publish_profile),
        web.post(f"{s}/publish-profile", publish_profile),
        web.post(f"{s}/settings", app_settings),
        web.post(f"{s}/hostnames", add_hostname),
        web.get(f"{s}/hostnames/remove", confirm_remove_hostname),
        web.post(f"{s}/hostnames/remove", remove_hostname),
        web.post(f"{s}/hostnames/verify", verify_hostname),
        web.post(f"{s}/hostnames/renew", renew_hostname),
        web.post(f"{s}/deploy", deploy),
        web.get(f"{s}/rollback", confirm_rollback),
        web.post(f"{s}/rollback", rollback),
        web.get(f"{s}/versions/{{version:\\d{{1,9}}}}/zip", download_version),
        web.get(f"{s}/backups/restore", confirm_backup_restore),
        web.post(f"{s}/backups/restore", restore_backup),
        web.get(f"{s}/backups/{{backup}}", download_backup),
        web.post(f"{s}/settings/sticky", sticky),
        web.post(f"{s}/slots", create_slot),
        web.get(f"{s}/slots/swap", confirm_swap),
        web.post(f"{s}/slots/swap", swap),
        web.get(f"{s}/slots/delete", confirm_slot_delete),
        web.post(f"{s}/slots/delete", delete_slot),
    ]
