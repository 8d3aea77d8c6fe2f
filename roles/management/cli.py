# PYTHON_ARGCOMPLETE_OK (argcomplete's marker: this entry point completes itself)
"""``sitecloud``: the admin and tenant command line, a client of the management REST API.

``sitecloud up`` is the exception: it starts the cloud (the controller's job), so it is handed over to
:func:`roles.controller.up.run_up` before any parsing here.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import getpass
import http.client
import json
import os
import re
import shlex
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

from roles.management._cli_backup import add_backup_commands
from roles.management._cli_client import ApiClient, Endpoints, clean_token, zipped
from roles.management._cli_fabric import add_fabric_commands
from roles.management._cli_output import ago, dumps, one_line, out, print_fields, print_table, printable
from roles.management._cli_ux import CliParser, Confirm, ExitCode, UsageError, ask, did_you_mean, exit_code
from roles.management._site_backups import human_every, parse_every
from shared.errors import InvalidInput, NotFound, SitecloudError, Unavailable
from shared.version import CODE_VERSION
from shared.words import counted

__all__ = ["main"]

_DEFAULT_HOME = Path.home() / ".local" / "share" / "sitecloud"
# Global options that take a value: skipped when looking for the command word.
_VALUED_GLOBALS = ("--home", "--token")
# Seconds without a line before `site start` stops waiting for the site's build (pip may be quiet a while).
_BUILD_TIMEOUT = 900.0

Command = Callable[[argparse.Namespace, ApiClient], Any]
Show = Callable[[Any, argparse.Namespace], None]


# -- commands: each calls the API and returns its answer; a matching _show_* prints it for people


def _yes_no(value: bool) -> str:
    return "yes" if value else "no"


def _per_day(value: int | None, unit: str) -> str:
    return "unlimited" if value is None else f"{value} {unit}/day"


def _plan_body(a: argparse.Namespace) -> dict[str, Any]:
    """The plan fields given on the command line (only those given, so an update changes only them)."""
    body: dict[str, Any] = {}
    for key in (
        "max_sites",
        "storage_mb",
        "max_custom_hostnames",
        "max_instances_per_site",
        "compute_mode",
        "worker_size",
        "keep_versions",
        "keep_days",
    ):
        value = getattr(a, key, None)
        if value is not None:
            body[key] = value
    for key in ("bandwidth_mb_per_day", "cpu_minutes_per_day"):
        value = getattr(a, key, None)
        if value is not None:
            body[key] = None if value == "unlimited" else _int_arg(value, key)
    for key in ("always_on", "public", "retired"):
        value = getattr(a, key, None)
        if value is not None:
            body[key] = value
    if getattr(a, "backup_every", None) is not None:
        body["backup_every_seconds"] = parse_every(a.backup_every)
    if getattr(a, "backup_keep", None) is not None:
        body["backup_keep"] = a.backup_keep
    return body


def _int_arg(value: str, key: str) -> int:
    try:
        return int(value)
    except ValueError:
        raise InvalidInput(f"--{key.replace('_', '-')} must be a number or 'unlimited'") from None


def _plan_create(a: argparse.Namespace, api: ApiClient) -> Any:
    return api.request("POST", api.path("plans"), {"name": a.name, **_plan_body(a)})


def _plan_update(a: argparse.Namespace, api: ApiClient) -> Any:
    body = _plan_body(a)
    if not body:
        raise InvalidInput("nothing to change", hint="see `sitecloud plan update --help`")
    return api.request("PATCH", api.path("plans", a.name), body)


def _show_plan_create(plan: Any, a: argparse.Namespace) -> None:
    out(
        f"created plan {plan['name']}: up to {counted(plan['max_sites'], 'site')}, {plan['storage_mb']} MB storage"
    )
    if plan["compute_mode"] == "reserved":
        size = plan["worker_size"]
        out(
            f"Its sites run on {size} workers reserved for their subscription (on the shared ones until "
            f"there is one): sitecloud role add worker HOST --size {size} --reserved-for SUBSCRIPTION"
        )


def _show_plan(plan: Any, a: argparse.Namespace) -> None:
    if plan.get("over_limit"):
        over = len(plan["over_limit"])
        holds = "holds" if over == 1 else "hold"
        out(f"warning: {counted(over, 'subscription')} now {holds} more than this plan allows:")
        for line in plan["over_limit"]:
            out(f"  {line}")
    offered = "retired" if plan["retired"] else "public" if plan["public"] else "private"
    compute = plan["compute_mode"] + (f" ({plan['worker_size']})" if plan["worker_size"] else "")
    out(f"plan {plan['name']} ({offered})")
    print_fields(
        [
            ("max sites", plan["max_sites"]),
            ("storage", f"{plan['storage_mb']} MB"),
            ("bandwidth", _per_day(plan["bandwidth_mb_per_day"], "MB")),
            ("cpu", _per_day(plan["cpu_minutes_per_day"], "min")),
            ("custom hostnames", plan["max_custom_hostnames"]),
            ("compute", compute),
            ("always on", _yes_no(plan["always_on"])),
            ("instances/site", plan["max_instances_per_site"]),
            (
                "versions kept",
                f"the last {counted(plan['keep_versions'], 'version')} and the last "
                f"{counted(plan['keep_versions'], 'publish', 'publishes')} (a deploy, a rollback or a run of FTP "
                f"uploads)"
                + (
                    f", and every version of the last {counted(plan['keep_days'], 'day')}"
                    if plan["keep_days"]
                    else ""
                ),
            ),
            ("backups", _backups_line(plan["backup_every_seconds"], plan["backup_keep"])),
            ("subscriptions", plan.get("subscriptions", 0)),
        ]
    )


def _backups_line(every: int, keep: int) -> str:
    return "off" if not every else f"every {human_every(every)}, the last {keep} kept"


def _show_plans(answer: Any, a: argparse.Namespace) -> None:
    rows = [
        (
            p["name"],
            p["max_sites"],
            p["storage_mb"],
            p["max_custom_hostnames"],
            p["compute_mode"] + (f"/{p['worker_size']}" if p["worker_size"] else ""),
            "retired" if p["retired"] else "public" if p["public"] else "private",
            p.get("subscriptions", ""),
        )
        for p in answer["plans"]
    ]
    print_table(
        ("NAME", "MAX SITES", "STORAGE MB", "HOSTNAMES", "COMPUTE", "OFFERED", "SUBSCRIPTIONS"),
        rows,
        empty="no plans yet (an admin makes them with `sitecloud plan create`; a tenant sees the public ones)",
    )


def _show_tenant_create(tenant: Any, a: argparse.Namespace) -> None:
    out(f"created tenant {tenant['name']} (id {tenant['id']})")
    out(f"token: {tenant['token']}")
    out("This token is shown only once: give it to the tenant now (sitecloud --token TOKEN ...).")


def _show_tenants(answer: Any, a: argparse.Namespace) -> None:
    rows = [
        (t["id"], t["name"], t.get("users"), t.get("subscriptions"), t.get("sites"))
        for t in answer["tenants"]
    ]
    print_table(
        ("ID", "NAME", "USERS", "SUBSCRIPTIONS", "SITES"),
        rows,
        empty="no tenants yet (`sitecloud tenant create`)",
    )


def _show_tenant(tenant: Any, a: argparse.Namespace) -> None:
    out(f"tenant {tenant['name']} (id {tenant['id']}), since {(tenant.get('created_at') or '-')[:10]}")
    out("")
    _show_subscriptions({"subscriptions": tenant["subscriptions"]}, a)
    out("")
    _show_sites({"sites": tenant["sites"]}, a)
    out("")
    rows = [(u["username"], ago(u["last_sign_in_at"])) for u in tenant["users"]]
    print_table(("USER", "LAST SIGN-IN"), rows, empty="no users")


def _tenant_delete(a: argparse.Namespace, api: ApiClient) -> Any:
    api.request("DELETE", api.path("tenants", a.name))
    return {"tenant": a.name, "deleted": True}


def _plan_delete(a: argparse.Namespace, api: ApiClient) -> Any:
    api.request("DELETE", api.path("plans", a.name))
    return {"plan": a.name, "deleted": True}


def _show_reset_link(answer: Any, a: argparse.Namespace) -> None:
    out(f"password reset link for {answer['username']} (works once, until {answer['expires_at']}):")
    out(answer["url"])
    out("Give it to the user: whoever opens it can set the password. An earlier link stops working.")


def _show_subscription_create(sub: Any, a: argparse.Namespace) -> None:
    out(f"created subscription {sub['id']}: tenant {sub['tenant']}, plan {sub['plan']} ({sub['state']})")


def _storage(sub: Any) -> str:
    used = sub["usage"]["storage_bytes"]
    shown = "?" if used is None else f"{used / 1048576:.1f}"
    return f"{shown}/{sub['quotas']['storage_mb']} MB"


def _show_subscription(sub: Any, a: argparse.Namespace) -> None:
    out(f"subscription {sub['id']}: tenant {sub['tenant']}, plan {sub['plan']} ({sub['state']})")
    usage, quotas = sub["usage"], sub["quotas"]
    print_fields(
        [
            ("sites", f"{usage['sites']}/{quotas['max_sites']}"),
            ("storage", _storage(sub)),
            ("custom hostnames", f"{usage['custom_hostnames']}/{quotas['max_custom_hostnames']}"),
            ("bandwidth", _per_day(quotas["bandwidth_mb_per_day"], "MB")),
            ("cpu", _per_day(quotas["cpu_minutes_per_day"], "min")),
            # A TXT record asuid.<hostname> with this value proves a custom hostname is the tenant's.
            ("verification id", sub.get("verification_id", "-")),
        ]
    )


def _show_subscriptions(answer: Any, a: argparse.Namespace) -> None:
    rows = [
        (
            s["id"],
            s["tenant"],
            s["plan"],
            s["state"],
            f"{s['usage']['sites']}/{s['quotas']['max_sites']}",
            _storage(s),
        )
        for s in answer["subscriptions"]
    ]
    print_table(("ID", "TENANT", "PLAN", "STATE", "SITES", "STORAGE"), rows, empty="no subscriptions")


def _site_create(a: argparse.Namespace, api: ApiClient) -> Any:
    subscription = a.subscription
    if subscription is None:
        # A tenant with one subscription (most of them) need not look its number up.
        listed = api.list_all(api.path("subscriptions"), "subscriptions")["subscriptions"]
        active = [s for s in listed if s["state"] == "active"]
        if len(active) != 1:
            ids = ", ".join(f"{s['id']} ({s['tenant']}, plan {s['plan']})" for s in active[:5])
            raise InvalidInput(
                "name the subscription the site goes in"
                + (f": there are {len(active)} active ones" if active else ": there is no active one"),
                hint=f"--subscription ID, one of {ids}"
                if active
                else "an admin makes one: sitecloud subscription create --tenant T --plan P",
            )
        subscription = active[0]["id"]
    return api.request("POST", api.path("sites"), {"name": a.name, "subscription": subscription})


def _subscription_delete(a: argparse.Namespace, api: ApiClient) -> Any:
    api.request("DELETE", api.path("subscriptions", str(a.id)))
    return {"subscription": a.id, "deleted": True}


def _site_state(site: Any) -> str:
    """A site's state as people read it: running is not serving while the controller has not applied it."""
    return f"{site['state']} (pending)" if site.get("pending") else str(site["state"])


def _site_fields(site: Any) -> list[tuple[str, Any]]:
    ftp, deploy = site["ftp"], site["deploy"]
    pairs: list[tuple[str, Any]] = [
        ("url", site["url"]),
        ("state", _site_state(site)),
        ("tenant", site["tenant"]),
        ("subscription", site["subscription"]),
    ]
    if site.get("hostnames"):
        pairs.append(("hostnames", ", ".join(site["hostnames"])))
    pairs += [("ftp host", f"{ftp['host']}:{ftp['port']}"), ("ftp user", ftp["user"])]
    if "password" in ftp:
        pairs.append(("ftp password", ftp["password"]))
    pairs += [("deploy url", deploy["url"]), ("deploy user", deploy["user"])]
    if "password" in deploy:
        pairs.append(("deploy password", deploy["password"]))
    if deploy.get("git"):
        pairs.append(("git url", deploy["git"]))
    return pairs


def _show_site_create(site: Any, a: argparse.Namespace) -> None:
    out(f"created site {site['name']}")
    print_fields(_site_fields(site))
    out()
    out("The password is shown only this once: store it now. FTP and web deploy use the same one.")


def _show_site(site: Any, a: argparse.Namespace) -> None:
    out(f"site {site['name']}")
    print_fields(_site_fields(site))
    for problem in site.get("problems", []):
        by = f" by worker {problem['worker']}" if problem.get("worker") else ""
        if problem.get("kind") == "placement":
            out(f"placement: {problem['reason']}")
        else:
            out(f"cannot be served{by}: {problem['reason']}")
    apps = site.get("apps") or []
    for number, app in enumerate(apps, 1):
        if app.get("runtime", "static") != "static" or app.get("state") == "unknown":
            # A tenant is not told the platform's host names: its servers are numbered.
            where = app.get("worker") or (f"server {number}" if len(apps) > 1 else "")
            out(f"app{' on ' + where if where else ''}: {_app_line(app, site['name'])}")
    for line in _quota_lines(site.get("quota")):
        out(line)


def _quota_lines(quota: dict[str, Any] | None) -> list[str]:
    """Today's use against the plan's daily limits, and the stop if the site is under one."""
    if not quota:
        return []
    lines = []
    stop = quota.get("stopped")
    if stop:
        lines.append(f"STOPPED (quota exceeded): {stop['message']}")
    parts = []
    if quota.get("bandwidth_mb_per_day") is not None:
        parts.append(f"bandwidth {quota['bandwidth_mb_today']:g}/{quota['bandwidth_mb_per_day']} MB")
    if quota.get("cpu_minutes_per_day") is not None:
        parts.append(f"CPU {quota['cpu_minutes_today']:g}/{quota['cpu_minutes_per_day']} min")
    if parts:
        lifted = " (stop lifted by an admin for today)" if quota.get("lifted_today") else ""
        lines.append(f"today: {', '.join(parts)}; resets {quota['resets_at']}{lifted}")
    return lines


def _site_usage(a: argparse.Namespace, api: ApiClient) -> Any:
    # Quoted: a date typed with a space or '&' must reach the server as what was typed, to be refused there.
    query = urlencode([(k, v) for k, v in (("from", a.since), ("to", a.until)) if v])
    return api.request("GET", api.path("sites", a.name, "usage") + (f"?{query}" if query else ""))


def _show_usage(answer: Any, a: argparse.Namespace) -> None:
    out(f"usage of {answer['site']} from {answer['from']} to {answer['to']} (UTC days)")
    rows = [
        (
            d["day"],
            str(d["requests"]),
            _mb(d["bytes_in"]),
            _mb(d["bytes_out"]),
            f"{d['cpu_seconds']:g}",
            f"{d['memory_mb_seconds']:g}",
            "-" if d["storage_bytes"] is None else _mb(d["storage_bytes"]),
        )
        for d in answer["days"]
        if any(d[k] for k in ("requests", "bytes_in", "bytes_out", "cpu_seconds", "storage_bytes"))
    ]
    t = answer["totals"]
    rows.append(
        (
            "total",
            str(t["requests"]),
            _mb(t["bytes_in"]),
            _mb(t["bytes_out"]),
            f"{t['cpu_seconds']:g}",
            f"{t['memory_mb_seconds']:g}",
            "-" if t["storage_bytes_max"] is None else _mb(t["storage_bytes_max"]),
        )
    )
    print_table(("DAY", "REQUESTS", "IN MB", "OUT MB", "CPU S", "MEM MB*S", "STORAGE MB"), rows, empty="")
    for line in _quota_lines(answer.get("quota")):
        out(line)


def _mb(size: int) -> str:
    return f"{size / 2**20:.2f}"


def _app_line(app: dict[str, Any], site: str) -> str:
    """One line per worker: the app's state and each limit it has run into."""
    if app.get("state") == "unknown":
        return f"state unknown ({app.get('reason', 'no answer')})"
    mb = 1024 * 1024
    parts = [f"{app['runtime']}, {app['state']}"]
    if app.get("memory_limit_bytes"):
        parts.append(f"memory {app.get('memory_bytes', 0) // mb} of {app['memory_limit_bytes'] // mb} MB")
    if app.get("disk_limit_bytes"):
        parts.append(f"disk {app.get('disk_used_bytes', 0) // mb} of {app['disk_limit_bytes'] // mb} MB")
    for key, what in (
        ("memory_kills", "stopped for memory"),
        ("pids_limit_hits", f"hit the limit of {app.get('pids_limit')} processes"),
        ("disk_quota_hits", "filled its disk"),
        ("crashes", "crashed"),
    ):
        if app.get(key):
            parts.append(f"{what} {app[key]}x")
    if app.get("crashes") and app.get("last_crash"):
        parts.append(f"last: {app['last_crash']} (sitecloud site logs {site})")
    if app.get("earlier_crashes"):
        # History: those crashes were of content or settings it no longer runs.
        parts.append(f"earlier versions or settings crashed {app['earlier_crashes']}x")
    if app.get("build_error"):
        # Its last error lines, one line here: `site logs` has the whole build.
        parts.append("DEGRADED, build failed: " + " / ".join(str(app["build_error"]).splitlines()))
    return "; ".join(parts)


def _show_scaled(answer: Any, a: argparse.Namespace) -> None:
    out(f"{a.name} runs on {counted(a.instances, 'instance')}")


def _show_password(site: Any, a: argparse.Namespace) -> None:
    out(f"new publishing password for {site['name']}: {site['ftp']['password']}")
    out("Shown only this once. The old password no longer works.")


def _show_sites(answer: Any, a: argparse.Namespace) -> None:
    rows = [(s["name"], s["tenant"], s["subscription"], _site_state(s), s["url"]) for s in answer["sites"]]
    print_table(("NAME", "TENANT", "SUBSCRIPTION", "STATE", "URL"), rows, empty="no sites")
    if any(s.get("pending") for s in answer["sites"]):
        out(
            "NOTE: a pending site is not live yet: the cloud's controller has not applied its creation "
            "or start; nothing serves it until the controller runs again"
        )


def _site_delete(a: argparse.Namespace, api: ApiClient) -> Any:
    api.request("DELETE", api.path("sites", a.name))
    return {"site": a.name, "deleted": True}


def _pairs(items: Sequence[str]) -> dict[str, str]:
    out: dict[str, str] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise InvalidInput(f"{item!r} is not KEY=VALUE")
        out[key] = value
    return out


def _site_set(a: argparse.Namespace, api: ApiClient) -> Any:
    return api.request("PATCH", api.path("sites", a.name, "settings"), _pairs(a.settings))


def _site_unset(a: argparse.Namespace, api: ApiClient) -> Any:
    return api.request("PATCH", api.path("sites", a.name, "settings"), dict.fromkeys(a.keys))


def _show_settings(answer: Any, a: argparse.Namespace) -> None:
    settings = answer["settings"]
    sticky = set(answer.get("sticky", []))
    if not settings:
        out(f"{answer['site']} has no app settings")
    for key, value in settings.items():
        out(f"{key}={one_line(value)}{'  (sticky to its slot)' if key in sticky else ''}")
    unset = sorted(sticky - set(settings))
    if unset:
        out(f"sticky to its slot, not set: {', '.join(unset)}")


def _site_sticky(a: argparse.Namespace, api: ApiClient) -> Any:
    if a.none and a.keys:
        raise InvalidInput("--none makes no setting sticky: name no KEY with it")
    if not a.keys and not a.none:
        # Shown, not cleared: with no names this reads as a question, and clearing would silently send
        # the production address's sticky values (a DB_URL) to a slot at the next swap.
        return api.request("GET", api.path("sites", a.name, "settings"))
    return api.request("PUT", api.path("sites", a.name, "settings", "sticky"), {"sticky": a.keys})


def _slot_list(a: argparse.Namespace, api: ApiClient) -> Any:
    return api.list_all(api.path("sites", a.name, "slots"), "slots")


def _slot_delete(a: argparse.Namespace, api: ApiClient) -> Any:
    api.request("DELETE", api.path("sites", a.name, "slots", a.slot))
    return {"site": a.name, "slot": a.slot, "deleted": True}


def _site_swap(a: argparse.Namespace, api: ApiClient) -> Any:
    body = {} if a.warm_timeout is None else {"warm_timeout": a.warm_timeout}
    return api.request("POST", api.path("sites", a.name, "slots", a.slot, "swap"), body)


def _show_slot_create(answer: Any, a: argparse.Namespace) -> None:
    out(f"created slot {answer['slot']} of {answer['production']}: site {answer['name']} at {answer['url']}")
    out(f"FTP:    {answer['ftp']['host']}:{answer['ftp']['port']} user {answer['ftp']['user']}")
    out(f"deploy: {answer['deploy']['url']} user {answer['deploy']['user']}")
    out(f"publishing password (shown once): {answer['ftp']['password']}")


def _show_slots(answer: Any, a: argparse.Namespace) -> None:
    rows = [
        (
            s["slot"],
            s["url"],
            s["served_by"],
            ", ".join(f"{k}={one_line(v)}" for k, v in s["sticky_settings"].items()) or "-",
        )
        for s in answer["slots"]
    ]
    print_table(("SLOT", "ADDRESS", "SERVED BY", "STICKY SETTINGS"), rows, empty="no slots")


def _show_versions(answer: Any, a: argparse.Namespace) -> None:
    current = answer.get("current")
    rows = [
        (
            f"{v['version']} (current)" if v["version"] == current else v["version"],
            time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(v["time"])),
            v["source"],
            v["files"],
            v["total_bytes"],
        )
        for v in answer["versions"]
    ]
    print_table(("VERSION", "TIME", "SOURCE", "FILES", "BYTES"), rows, empty="nothing published yet")


def _site_rollback(a: argparse.Namespace, api: ApiClient) -> Any:
    body = {} if a.to_version is None else {"version": a.to_version}
    return api.request("POST", api.path("sites", a.name, "rollback"), body)


def _site_download(a: argparse.Namespace, api: ApiClient) -> Any:
    version = a.to_version
    if version is None:
        versions = api.list_all(api.path("sites", a.name, "versions"), "versions")["versions"]
        if not versions:
            raise NotFound(f"site {a.name} has no content yet", hint="publish something first")
        version = int(versions[-1]["version"])
    path = api.path("sites", a.name, "versions", str(version), "zip")
    target = Path(a.output or f"{a.name}-v{version}.zip")
    if str(target) == "-":
        api.download(path, sys.stdout.buffer)
        sys.stdout.buffer.flush()
        return None
    size = _download_to(api, path, target)
    return {"site": a.name, "version": version, "file": str(target), "bytes": size}


def _download_to(api: ApiClient, path: str, target: Path) -> int:
    """Written beside the target and moved in place once whole: never half a zip under its name."""
    partial = target.with_name(target.name + ".part")
    try:
        with partial.open("wb") as f:
            size = api.download(path, f)
        partial.replace(target)
    except OSError as exc:
        partial.unlink(missing_ok=True)
        raise InvalidInput(f"cannot write {target}: {exc}") from None
    except BaseException:
        partial.unlink(missing_ok=True)
        raise
    return size


def _show_download(answer: Any, a: argparse.Namespace) -> None:
    if answer is not None:
        out(
            f"wrote {answer['file']}: version {answer['version']} of {a.name}, {counted(answer['bytes'], 'byte')}"
        )


def _show_backups(answer: Any, a: argparse.Namespace) -> None:
    out(f"scheduled backups of {answer['site']}: {_backups_line(answer['every_seconds'], answer['keep'])}")
    rows = [(b["name"], b["created_at"], b["version"], b["bytes"]) for b in answer["backups"]]
    print_table(("BACKUP", "TAKEN (UTC)", "VERSION", "BYTES"), rows, empty="no backups yet")


def _site_backup_download(a: argparse.Namespace, api: ApiClient) -> Any:
    name = a.backup
    if name is None:
        backups = api.list_all(api.path("sites", a.name, "backups"), "backups")["backups"]
        if not backups:
            raise NotFound(f"site {a.name} has no scheduled backups yet", hint="see its plan's backups")
        name = backups[-1]["name"]
    target = Path(a.to or f"{a.name}-{name}")
    size = _download_to(api, api.path("sites", a.name, "backups", name), target)
    return {"site": a.name, "backup": name, "file": str(target), "bytes": size}


# How long `site logs --follow` tries to open a cut stream again before it gives up.
_FOLLOW_RECONNECT_S = 60.0


def _site_logs(a: argparse.Namespace, api: ApiClient) -> Any:
    query = f"?lines={a.lines}" + ("&follow=1" if a.follow else "")
    stream = api.lines(api.path("sites", a.name, "logs") + query, timeout=None if a.follow else 60.0)
    if not a.follow:
        return {"site": a.name, "lines": list(stream)}
    # Following: print lines as they come, until Ctrl-C (exit 130). A stream that ends (management restarted,
    # or went away) is opened again rather than ending the command as if all were said.
    path = api.path("sites", a.name, "logs") + "?lines=0&follow=1"
    cut_at: list[float] = []

    def opened() -> None:
        if cut_at:
            sys.stderr.write("reconnected; lines written while cut off: `sitecloud site logs NAME -n 100`\n")
        cut_at.clear()

    try:
        while True:
            with contextlib.suppress(OSError, http.client.HTTPException, Unavailable):
                for line in stream:
                    out(dumps({"line": line}, indent=None) if a.json else line)
            if not cut_at:
                cut_at.append(time.monotonic())
                sys.stderr.write("the log stream was cut (management restarted?); reconnecting...\n")
            elif time.monotonic() - cut_at[0] > _FOLLOW_RECONNECT_S:
                raise Unavailable(
                    f"the log stream was cut and management did not answer for {_FOLLOW_RECONNECT_S:.0f} s",
                    hint="check `sitecloud role list`, then follow again",
                )
            else:
                time.sleep(1.0)
            stream = api.lines(path, timeout=None, on_open=opened)
    except KeyboardInterrupt:
        # As tail -f ends: the exit status of an interrupt (130), which main gives.
        sys.stdout.flush()
        raise


def _show_logs(answer: Any, a: argparse.Namespace) -> None:
    for line in answer["lines"] if answer else ():
        out(line)


def _publish_profile(a: argparse.Namespace, api: ApiClient) -> Any:
    data = api.request_raw("POST", api.path("sites", a.name, "publish-profile"))
    target = Path(a.output or f"{a.name}.PublishSettings")
    if str(target) == "-":
        sys.stdout.write(data.decode())
        return None
    fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    return {"site": a.name, "file": str(target), "bytes": len(data)}


def _show_publish_profile(answer: Any, a: argparse.Namespace) -> None:
    if answer is None:
        return
    out(f"wrote {answer['file']} (import it in Visual Studio or WebMatrix)")
    out("It holds a new publishing password: the old password and earlier profiles no longer work.")


def _read(path: str | None) -> str | None:
    if path is None:
        return None
    try:
        return Path(path).read_text()
    except (OSError, UnicodeDecodeError) as exc:
        raise InvalidInput(f"cannot read {path}: {exc}") from None


def _secret(a: argparse.Namespace, prompt: str) -> str | None:
    if getattr(a, "password_stdin", False):
        return sys.stdin.readline().rstrip("\n")
    return None


def _hostname_add(a: argparse.Namespace, api: ApiClient) -> Any:
    body: dict[str, Any] = {"hostname": a.hostname}
    if a.pfx:
        try:
            body["pfx"] = base64.b64encode(Path(a.pfx).read_bytes()).decode()
        except OSError as exc:
            raise InvalidInput(f"cannot read {a.pfx}: {exc.strerror}") from None
    elif a.cert:
        body["certificate"] = _read(a.cert)
        if a.key:
            body["key"] = _read(a.key)
    password = _secret(a, "certificate password: ")
    if password:
        body["password"] = password
    return api.request("POST", api.path("sites", a.site, "hostnames"), body)


def cert_state_text(state: dict[str, Any] | None) -> str:
    """``valid until 2027-03-01``, ``failed: <reason> (next try 2026-12-04 10:05)``, ``issuing``, ..."""
    if not state:
        return "-"
    kind = state.get("state")
    if kind == "valid":
        source = " (uploaded)" if state.get("source") == "upload" else ""
        return f"valid until {(state.get('until') or '')[:10]}{source}"
    if kind == "failed":
        retry = f" (next try {state['retry_at'][:16].replace('T', ' ')} UTC)" if state.get("retry_at") else ""
        return f"failed: {state.get('reason') or 'unknown'}{retry}"
    return {
        "pending_verification": "pending verification",
        "issuing": "issuing",
        "none": "none (ACME is off)",
    }.get(str(kind), str(kind))


def _show_hostname(answer: Any, a: argparse.Namespace) -> None:
    cert = answer["certificate"]
    extra = f" with a certificate until {cert['not_after'][:10]}" if cert else " (no certificate: HTTP only)"
    if answer["state"] == "verified":
        out(f"{answer['hostname']} is verified and serves {answer['site']}{extra}")
        out(f"certificate: {cert_state_text(answer.get('certificate_state'))}")
        return
    out(
        f"{answer['hostname']} is pending for {answer['site']}{extra}: it is not served until DNS proves it is yours."
    )
    if answer.get("problem"):
        out(f"last check: {answer['problem']}")
    out("create these records at your DNS provider (the TXT proves the name is yours, the CNAME sends")
    out("visitors here; an apex name takes an A/AAAA record to the front end instead), then run")
    out(f"`sitecloud site hostname verify {answer['site']} {answer['hostname']}`:")
    for record in answer["records"]:
        out(f"  {record['type']:<5} {record['name']}  {record['value']}")


def _show_hostnames(answer: Any, a: argparse.Namespace) -> None:
    rows = [
        (
            h["hostname"],
            h["state"],
            cert_state_text(h.get("certificate_state")),
            ", ".join((h["certificate"] or {}).get("names", [])),
        )
        for h in answer["hostnames"]
    ]
    print_table(
        ("HOSTNAME", "STATE", "CERTIFICATE", "CERT NAMES"),
        rows,
        empty=f"{answer['site']} has no custom hostnames",
    )
    pending = [h for h in answer["hostnames"] if h["state"] != "verified"]
    if pending:
        out("\npending names are not served; create one record per name at your DNS provider:")
        for h in pending:
            for record in h["records"]:
                out(f"  {record['type']:<5} {record['name']}  {record['value']}")


def _hostname_remove(a: argparse.Namespace, api: ApiClient) -> Any:
    api.request("DELETE", api.path("sites", a.site, "hostnames", a.hostname))
    return {"site": a.site, "hostname": a.hostname, "deleted": True}


def _show_availability(answer: Any, a: argparse.Namespace) -> None:
    out(
        f"{answer['hostname']} is free"
        if answer["available"]
        else f"{answer['hostname']} is not free: {answer['reason']}"
    )


def _build_lines(a: argparse.Namespace) -> Callable[[dict[str, Any]], None]:
    """What prints a deploy's or a start's lines: the build's own as pip or npm wrote them, indented
    under the platform's."""

    def show(line: dict[str, Any]) -> None:
        if not a.json:
            out(("  " if line.get("source") in ("build", "worker") else "") + str(line.get("text", "")))

    return show


def _deploy(a: argparse.Namespace, api: ApiClient) -> Any:
    with zipped(Path(a.path)) as zip_file:
        answer = api.upload(
            api.path("sites", a.site, "deploy"), zip_file, on_line=None if a.no_wait else _build_lines(a)
        )
    if not a.no_wait:
        # A stopped site takes the deploy but serves nothing: neither the last line nor --json's
        # "served" may say it is served.
        state = api.request("GET", api.path("sites", a.site)).get("state")
        answer = {**answer, "site_state": state, "served": state != "stopped"}
    return answer


def _site_start(a: argparse.Namespace, api: ApiClient) -> Any:
    path = api.path("sites", a.name, "start")
    if a.no_wait:
        return api.request("POST", path)
    # A version published while the site was stopped builds now: its failure is reported here.
    return api.request_lines(
        "POST",
        path,
        on_line=_build_lines(a),
        timeout=_BUILD_TIMEOUT,
        what="the start",
        hint=f"see `sitecloud site show {a.name}` and `sitecloud site logs {a.name}`",
    )


def _site_run(a: argparse.Namespace, api: ApiClient) -> Any:
    words = list(a.command)
    # Options given after the site's name land here (everything after it is the command's): take
    # this command's own off the front, up to "--".
    while words and (words[0].startswith("--timeout") or words[0] == "--json"):
        flag = words.pop(0)
        if flag == "--json":
            a.json = True
            continue
        value = flag.partition("=")[2] if "=" in flag else (words.pop(0) if words else "")
        try:
            a.timeout = float(value)
        except ValueError:
            raise InvalidInput(
                f"--timeout {value!r} is not a number of seconds", hint="e.g. --timeout 300"
            ) from None
    if words[:1] == ["--"]:
        words = words[1:]
    if not words:
        raise InvalidInput("give the command to run", hint="e.g. sitecloud site run mysite -- ls -la")
    # One word is taken as the shell would read it ("ls | head"); several are quoted back as given.
    command = words[0] if len(words) == 1 else shlex.join(words)
    return api.request(
        "POST",
        api.path("sites", a.name, "commands"),
        {"command": command, "timeout": a.timeout},
        timeout=a.timeout + 60,
    )


def _show_run(answer: Any, a: argparse.Namespace) -> None:
    output = str(answer.get("output", ""))
    if output:
        sys.stdout.write(printable(output if output.endswith("\n") else output + "\n"))
        sys.stdout.flush()
    if answer.get("truncated"):
        sys.stderr.write("sitecloud: (its output went on past 1 MiB; the rest is not shown)\n")
    if answer.get("timed_out"):
        sys.stderr.write(
            f"sitecloud: the command was stopped after {a.timeout:g} s (--timeout sets how long)\n"
        )
    elif answer.get("exit_code") is None:
        sys.stderr.write("sitecloud: the command was stopped at its memory limit\n")


def _run_exit(answer: Any) -> int:
    code = answer.get("exit_code") if isinstance(answer, dict) else None
    if isinstance(code, int):
        return code if 0 <= code <= 255 else 1
    return 124 if isinstance(answer, dict) and answer.get("timed_out") else 137


def _show_deploy(answer: Any, a: argparse.Namespace) -> None:
    stopped = answer.get("site_state") == "stopped"
    served = (
        "" if a.no_wait else ", kept until the site is started (it is built then)" if stopped else ", served"
    )
    out(
        f"deployed {counted(answer.get('files', 0), 'file')}, {counted(answer.get('bytes', 0), 'byte')} "
        f"to {answer.get('site')}: "
        f"content version {answer.get('version')}{served}"
    )


def _user_create(a: argparse.Namespace, api: ApiClient) -> Any:
    body: dict[str, Any] = {"username": a.username}
    if getattr(a, "tenant", None):
        body["tenant"] = a.tenant
    password = _secret(a, "password: ")
    if password:
        body["password"] = password
    return api.request("POST", api.path("users"), body)


def _show_user_create(user: Any, a: argparse.Namespace) -> None:
    kind = "admin" if user["admin"] else f"user of tenant {user['tenant']}"
    out(f"created {kind} {user['username']}")
    if "password" in user:
        out(f"password: {user['password']}")
        out("This password is shown only once. Sign in to the portal with it.")


def _show_users(answer: Any, a: argparse.Namespace) -> None:
    rows = [
        (u["username"], "admin" if u["admin"] else "tenant", u["tenant"], ago(u["last_sign_in_at"]))
        for u in answer["users"]
    ]
    print_table(("USER", "KIND", "TENANT", "LAST SIGN-IN"), rows, empty="no users yet")


def _login(a: argparse.Namespace, api: ApiClient) -> Any:
    password = _secret(a, "password: ")
    if password is None:
        if not sys.stdin.isatty():
            raise InvalidInput("no password", hint="use --password-stdin")
        password = getpass.getpass("password: ")
    body = {"username": a.username, "password": password, "name": a.name}
    return api.request("POST", api.path("auth", "token"), body)


def _show_token_create(token: Any, a: argparse.Namespace) -> None:
    out(f"token {token['name']} (id {token['id']}): {token['token']}")
    out("Shown only once. Use it with --token or SITECLOUD_TOKEN.")


def _show_tokens(answer: Any, a: argparse.Namespace) -> None:
    rows = [
        (t["id"], t["name"], f"{t['prefix']}…", ago(t["created_at"]), ago(t["last_used_at"]))
        for t in answer["tokens"]
    ]
    print_table(("ID", "NAME", "STARTS WITH", "CREATED", "LAST USED"), rows, empty="no tokens")


def _token_revoke(a: argparse.Namespace, api: ApiClient) -> Any:
    api.request("DELETE", api.path("tokens", str(a.id)))
    return {"token": a.id, "deleted": True}


def _settings_set(a: argparse.Namespace, api: ApiClient) -> Any:
    body: dict[str, Any] = {}
    if a.signup:
        body["signup_enabled"] = a.signup == "open"
    if a.dns_resolver:
        body["dns_resolvers"] = [r for r in a.dns_resolver if r != "system"]
    if a.acme_directory is not None:
        body["acme_directory_url"] = a.acme_directory
    if a.acme_ca_bundle is not None:
        body["acme_ca_bundle"] = _read(a.acme_ca_bundle) if a.acme_ca_bundle not in ("", "system") else ""
    if a.acme_email is not None:
        body["acme_email"] = a.acme_email
    if a.wildcard_dns01 is not None:
        body["wildcard_dns01"] = a.wildcard_dns01 == "on"
    for flag in ("server", "zone", "key_name", "key_algorithm"):
        value = getattr(a, f"dns_update_{flag}")
        if value is not None:
            body[f"dns_update_{flag}"] = value
    if a.dns_update_key_secret_file is not None:
        body["dns_update_key_secret"] = _tsig_secret(a.dns_update_key_secret_file)
    if not body:
        raise InvalidInput(
            "nothing to change",
            hint="pass --signup, --dns-resolver, --acme-directory, --acme-ca-bundle, --acme-email, "
            "--wildcard-dns01 or --dns-update-...",
        )
    return api.request("PATCH", api.path("settings"), body)


# The secret in a key file as the DNS servers write them: BIND's tsig-keygen (secret "..."; ), Knot's
# keymgr (secret: ...), or the bare base64 that pdnsutil and providers show.
_KEY_FILE_SECRET = re.compile(r'\bsecret\s*[:\s]\s*"?([A-Za-z0-9+/=]+)"?')


def _tsig_secret(path: str) -> str:
    """The TSIG secret in ``path`` ('' for none; '-' reads standard input)."""
    if path == "":
        return ""
    text = sys.stdin.read() if path == "-" else _read(path) or ""
    found = _KEY_FILE_SECRET.search(text)
    return found.group(1) if found else text.strip()


def _wildcard_state(view: Any) -> str:
    if not isinstance(view, dict):
        return "-"
    state = view.get("state", "off")
    if state == "valid":
        return f"valid until {(view.get('until') or '')[:16].replace('T', ' ')} ({', '.join(view['names'])})"
    if state == "failed":
        retry = (view.get("retry_at") or "")[:16].replace("T", " ")
        held = f"; serving the one valid until {view['until'][:10]}" if view.get("until") else ""
        return f"failed: {view.get('reason')} (next try {retry}){held}"
    if state == "off":
        return "off (the cloud CA's wildcard is served)"
    return str(state)


def _show_cloud_settings(answer: Any, a: argparse.Namespace) -> None:
    print_fields(
        [
            ("sign-up", "open" if answer["signup_enabled"] else "closed"),
            ("DNS resolvers", ", ".join(answer.get("dns_resolvers") or []) or "the system's"),
            ("wildcard-IP DNS", ", ".join(answer.get("ip_dns_services") or [])),
            ("ACME directory", answer.get("acme_directory_url") or "off (no automatic certificates)"),
            ("ACME CA bundle", "given" if answer.get("acme_ca_bundle") else "the system's"),
            ("ACME contact", answer.get("acme_email") or "-"),
            ("wildcard by DNS-01", "on" if answer.get("wildcard_dns01") else "off"),
            ("DNS update server", answer.get("dns_update_server") or "-"),
            ("DNS update zone", answer.get("dns_update_zone") or "-"),
            (
                "TSIG key",
                f"{answer.get('dns_update_key_name') or '-'} ({answer.get('dns_update_key_algorithm')}, "
                f"secret {'set' if answer.get('dns_update_key_secret_set') else 'not set'})",
            ),
            ("wildcard certificate", _wildcard_state(answer.get("wildcard_certificate"))),
        ]
    )


def _new_password(a: argparse.Namespace) -> tuple[str, str | None]:
    return (f"set a new publishing password for {a.name}: the old one stops working for FTP and deploy", None)


def _show_restarted(answer: Any, a: argparse.Namespace) -> None:
    if answer.get("pending"):
        out(f"restart of {a.name} asked, {answer['pending']}")
    else:
        out(
            f"restarted the app of {a.name}: requests under way finished on the old processes, the next start new ones"
        )


def _done(text: str) -> Show:
    def show(answer: Any, a: argparse.Namespace) -> None:
        out(text.format(a=a, answer=answer))

    return show


# -- the parser


def _plan_options(sp: argparse.ArgumentParser, *, create: bool) -> None:
    sp.add_argument("--max-sites", type=int, required=create)
    sp.add_argument("--storage-mb", type=int, required=create)
    sp.add_argument("--bandwidth-mb-per-day", metavar="MB|unlimited")
    sp.add_argument("--cpu-minutes-per-day", metavar="MIN|unlimited")
    sp.add_argument("--max-custom-hostnames", type=int)
    sp.add_argument("--max-instances-per-site", type=int)
    sp.add_argument(
        "--keep-versions", type=int, metavar="N", help="content versions each site keeps (default 20)"
    )
    sp.add_argument(
        "--keep-days", type=int, metavar="D", help="and every version of the last D days (default 0)"
    )
    sp.add_argument(
        "--backup-every",
        metavar="1d|6h|1h|off",
        help="write each site's current content as a zip this often (default off; an hour at least)",
    )
    sp.add_argument(
        "--backup-keep", type=int, metavar="N", help="scheduled backups each site keeps (default 7)"
    )
    sp.add_argument("--compute-mode", choices=["shared", "reserved"])
    sp.add_argument("--worker-size", choices=["small", "medium", "large"])
    on = sp.add_mutually_exclusive_group()
    on.add_argument("--always-on", dest="always_on", action="store_const", const=True)
    on.add_argument("--no-always-on", dest="always_on", action="store_const", const=False)
    pub = sp.add_mutually_exclusive_group()
    pub.add_argument(
        "--public", dest="public", action="store_const", const=True, help="tenants may subscribe"
    )
    pub.add_argument("--private", dest="public", action="store_const", const=False)
    if not create:
        ret = sp.add_mutually_exclusive_group()
        ret.add_argument(
            "--retire", dest="retired", action="store_const", const=True, help="no new subscriptions"
        )
        ret.add_argument("--unretire", dest="retired", action="store_const", const=False)


def _parser() -> argparse.ArgumentParser:
    # --json, --home and --token work before or after the command word; SUPPRESS keeps a subcommand
    # from overwriting what was given globally.
    common = CliParser(add_help=False)
    common.add_argument("--json", action="store_true", default=argparse.SUPPRESS, help="JSON output")
    common.add_argument("--home", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
    common.add_argument("--token", default=argparse.SUPPRESS, help=argparse.SUPPRESS)

    p = CliParser(
        prog="sitecloud",
        description="Manage a sitecloud: plans, tenants, sites.",
        epilog="Exit codes: 0 done, 1 error, 2 usage, 3 not found, 4 refused or not confirmed, "
        "5 conflict, 6 unavailable (see docs/operations.md).",
    )
    p.strict = False  # its own parse_args reports what is left; its pre-parse of global options keeps it
    p.add_argument("--version", action="store_true", help="print the version and exit")
    p.add_argument("--home", default=None, help="the cloud's home (env SITECLOUD_HOME)")
    p.add_argument("--token", default=None, help="API token (env SITECLOUD_TOKEN; default: the admin token)")
    p.add_argument("--json", action="store_true", default=False, help="JSON output")
    top = p.add_subparsers(dest="group", metavar="COMMAND")
    top.add_parser("up", help="start the cloud on this machine (see `sitecloud up --help`)", add_help=False)

    def leaf(
        parent: Any,
        name: str,
        help_: str,
        run: Command,
        show: Show | None = None,
        *,
        anonymous: bool = False,
        confirm: Confirm | None = None,
        exit_of: Callable[[Any], int] | None = None,
    ) -> argparse.ArgumentParser:
        sp: argparse.ArgumentParser = parent.add_parser(name, help=help_, parents=[common])
        if confirm is not None:
            sp.add_argument(
                "-y", "--yes", action="store_true", help="do not ask (needed where there is no terminal)"
            )
        sp.set_defaults(run=run, show=show, anonymous=anonymous, confirm=confirm, exit_of=exit_of)
        return sp

    def group(name: str, help_: str) -> Any:
        gp = top.add_parser(name, help=help_, parents=[common])
        return gp.add_subparsers(dest="action", metavar="ACTION", required=True)

    def get(*segments: str) -> Command:
        return lambda a, api: api.request("GET", api.path(*(s.format(a=a) for s in segments)))

    def every(key: str, *segments: str) -> Command:
        """A list command: every page of the list, as one answer."""
        return lambda a, api: api.list_all(api.path(*(s.format(a=a) for s in segments)), key)

    def post(*segments: str) -> Command:
        return lambda a, api: api.request("POST", api.path(*(s.format(a=a) for s in segments)))

    plan = group("plan", "hosting plans (admin)")
    sp = leaf(plan, "create", "create a plan", _plan_create, _show_plan_create)
    sp.add_argument("name")
    _plan_options(sp, create=True)
    sp = leaf(plan, "update", "change a plan; applies to its subscriptions at once", _plan_update, _show_plan)
    sp.add_argument("name")
    _plan_options(sp, create=False)
    leaf(plan, "list", "list plans (tenants: the public ones)", every("plans", "plans"), _show_plans)
    sp = leaf(plan, "show", "show a plan", get("plans", "{a.name}"), _show_plan)
    sp.add_argument("name")
    sp = leaf(
        plan,
        "delete",
        "delete a plan no subscription uses (one in use is refused: retire it instead)",
        _plan_delete,
        _done("deleted plan {a.name}"),
        confirm=lambda a: (f"delete plan {a.name}", None),
    )
    sp.add_argument("name")

    tenant = group("tenant", "tenants (admin)")
    sp = leaf(
        tenant,
        "create",
        "create a tenant and print its token",
        lambda a, api: api.request("POST", api.path("tenants"), {"name": a.name}),
        _show_tenant_create,
    )
    sp.add_argument("name")
    leaf(tenant, "list", "list tenants", every("tenants", "tenants"), _show_tenants)
    sp = leaf(
        tenant,
        "show",
        "show a tenant's subscriptions, sites and users",
        get("tenants", "{a.name}"),
        _show_tenant,
    )
    sp.add_argument("name")
    sp = leaf(
        tenant,
        "delete",
        "delete a tenant with its subscriptions, sites, users and tokens",
        _tenant_delete,
        _done("deleted tenant {a.name}"),
        confirm=lambda a: (
            f"delete tenant {a.name} with every subscription, site (and its content), user and token it has",
            a.name,
        ),
    )
    sp.add_argument("name")

    user = group("user", "portal users (admin)")
    sp = leaf(
        user,
        "create",
        "create a user of a tenant, or an admin without --tenant",
        _user_create,
        _show_user_create,
    )
    sp.add_argument("username")
    sp.add_argument("--tenant")
    sp.add_argument(
        "--password-stdin", action="store_true", help="read the password from stdin (else generated)"
    )
    leaf(user, "list", "list users", every("users", "users"), _show_users)
    sp = leaf(
        user,
        "reset-link",
        "a one-time link (valid 1 h) at which the user sets a new password; give it to them",
        post("users", "{a.username}", "reset-link"),
        _show_reset_link,
    )
    sp.add_argument("username")

    admin = group("admin", "admin accounts")
    sp = leaf(
        admin, "create-user", "create an admin account for the admin portal", _user_create, _show_user_create
    )
    sp.add_argument("username")
    sp.add_argument(
        "--password-stdin", action="store_true", help="read the password from stdin (else generated)"
    )

    sp = leaf(
        top,
        "login",
        "sign in with a user name and password; prints a new API token",
        _login,
        _show_token_create,
        anonymous=True,
    )
    sp.add_argument("username")
    sp.add_argument("--name", default="cli", help="the token's name (default %(default)s)")
    sp.add_argument("--password-stdin", action="store_true", help="read the password from stdin")

    token = group("token", "your API tokens")
    sp = leaf(
        token,
        "create",
        "create an API token (shown once)",
        lambda a, api: api.request("POST", api.path("tokens"), {"name": a.name}),
        _show_token_create,
    )
    sp.add_argument("name")
    leaf(token, "list", "list your API tokens", every("tokens", "tokens"), _show_tokens)
    sp = leaf(
        token,
        "revoke",
        "revoke an API token",
        _token_revoke,
        _done("revoked token {a.id}"),
        confirm=lambda a: (f"revoke token {a.id}: whatever uses it loses access", None),
    )
    sp.add_argument("id", type=int)

    settings = group("settings", "cloud settings (admin)")
    leaf(settings, "show", "show cloud settings", get("settings"), _show_cloud_settings)
    sp = leaf(
        settings,
        "set",
        "change cloud settings",
        _settings_set,
        _show_cloud_settings,
    )
    sp.add_argument("--signup", choices=["open", "closed"], help="may tenants sign up?")
    sp.add_argument(
        "--dns-resolver",
        action="append",
        metavar="IP[:PORT]",
        help="where custom hostname ownership is checked (repeat for more; 'system' for the host's own)",
    )
    sp.add_argument(
        "--acme-directory",
        metavar="URL",
        help="ACME directory for custom hostnames' certificates: letsencrypt (default), letsencrypt-staging, "
        "an https:// URL, or off",
    )
    sp.add_argument(
        "--acme-ca-bundle",
        metavar="FILE",
        help="PEM CA certificates to trust for the ACME directory; 'system'",
    )
    sp.add_argument(
        "--acme-email", metavar="ADDRESS", help="contact address given to the ACME CA ('' for none)"
    )
    sp.add_argument(
        "--wildcard-dns01",
        choices=["on", "off"],
        help="get the platform's wildcard *.<domain> from the ACME directory by DNS-01 (needs --dns-update-...)",
    )
    sp.add_argument(
        "--dns-update-server", metavar="HOST[:PORT]", help="DNS server taking RFC 2136 updates (its primary)"
    )
    sp.add_argument("--dns-update-zone", metavar="ZONE", help="the zone holding _acme-challenge.<domain>")
    sp.add_argument("--dns-update-key-name", metavar="NAME", help="the TSIG key's name")
    sp.add_argument(
        "--dns-update-key-algorithm",
        metavar="ALG",
        help="the TSIG key's algorithm: hmac-sha256 (default), hmac-sha384, hmac-sha512, hmac-sha224, hmac-sha1",
    )
    sp.add_argument(
        "--dns-update-key-secret-file",
        metavar="FILE",
        help="file with the TSIG secret (base64, or a tsig-keygen/keymgr key file); '-' for stdin",
    )

    sub = group("subscription", "subscriptions of tenants to plans")
    sp = leaf(
        sub,
        "create",
        "subscribe a tenant to a plan (admin), or yourself to a public plan",
        lambda a, api: api.request(
            "POST", api.path("subscriptions"), {"plan": a.plan, **({"tenant": a.tenant} if a.tenant else {})}
        ),
        _show_subscription_create,
    )
    sp.add_argument("--tenant")
    sp.add_argument("--plan", required=True)
    leaf(
        sub,
        "list",
        "list subscriptions with usage",
        every("subscriptions", "subscriptions"),
        _show_subscriptions,
    )
    for name, help_, run in [
        ("show", "show a subscription's quotas and usage", get("subscriptions", "{a.id}")),
        (
            "suspend",
            "suspend a subscription: its sites go offline and take no publishing; content is kept (admin)",
            post("subscriptions", "{a.id}", "suspend"),
        ),
        ("resume", "resume a suspended subscription (admin)", post("subscriptions", "{a.id}", "resume")),
    ]:
        sp = leaf(sub, name, help_, run, _show_subscription)
        sp.add_argument("id", type=int)
    sp = leaf(
        sub,
        "update",
        "move a subscription to another plan (a tenant: to a public plan)",
        lambda a, api: api.request("PATCH", api.path("subscriptions", str(a.id)), {"plan": a.plan}),
        _show_subscription,
    )
    sp.add_argument("id", type=int)
    sp.add_argument("--plan", required=True, help="the plan to move to")
    sp = leaf(
        sub,
        "delete",
        "delete a subscription and its sites (admin)",
        _subscription_delete,
        _done("deleted subscription {a.id}"),
        confirm=lambda a: (f"delete subscription {a.id} and every site in it, with their content", str(a.id)),
    )
    sp.add_argument("id", type=int)

    site = group("site", "sites")
    sp = leaf(
        site, "create", "create a site; prints its publishing password once", _site_create, _show_site_create
    )
    sp.add_argument("name")
    sp.add_argument(
        "--subscription", type=int, help="subscription id (default: the only active one there is)"
    )
    leaf(site, "list", "list sites", every("sites", "sites"), _show_sites)
    sp = leaf(site, "show", "show a site", get("sites", "{a.name}"), _show_site)
    sp.add_argument("name")
    sp = leaf(
        site,
        "delete",
        "delete a site and its content",
        _site_delete,
        _done("deleted site {a.name}"),
        confirm=lambda a: (f"delete site {a.name} and all its content", a.name),
    )
    sp.add_argument("name")
    sp = leaf(
        site,
        "start",
        "start a site; ends once its workers serve it, built (a version published while it was stopped "
        "builds now)",
        _site_start,
        _done("started {a.name}"),
    )
    sp.add_argument("name")
    sp.add_argument(
        "--no-wait", action="store_true", help="answer once it is started, without waiting for its build"
    )
    sp = leaf(
        site,
        "restart",
        "restart a site's app on every worker (requests under way finish first)",
        post("sites", "{a.name}", "restart"),
        _show_restarted,
    )
    sp.add_argument("name")
    sp = leaf(
        site,
        "run",
        "run a command once in a site's app sandbox, as its app runs, and print its output "
        "(e.g. sitecloud site run mysite -- python manage.py migrate); exits with its status",
        _site_run,
        _show_run,
        exit_of=_run_exit,
    )
    sp.add_argument("name")
    sp.add_argument(
        "--timeout",
        type=float,
        default=60.0,
        help="seconds it may run before it is stopped (default 60, at most 600)",
    )
    sp.add_argument(
        "command",
        nargs=argparse.REMAINDER,
        help="the command and its arguments (one quoted string keeps shell syntax)",
    )
    sp = leaf(
        site,
        "stop",
        "stop a site (visitors get a 'stopped' page; its content is kept and can be published to)",
        post("sites", "{a.name}", "stop"),
        _done("stopped {a.name}"),
    )
    sp.add_argument("name")
    sp = leaf(
        site, "settings", "show a site's app settings", get("sites", "{a.name}", "settings"), _show_settings
    )
    sp.add_argument("name")
    sp = leaf(site, "set", "set app settings", _site_set, _show_settings)
    sp.add_argument("name")
    sp.add_argument("settings", nargs="+", metavar="KEY=VALUE")
    sp = leaf(site, "unset", "remove app settings", _site_unset, _show_settings)
    sp.add_argument("name")
    sp.add_argument("keys", nargs="+", metavar="KEY")
    sp = leaf(
        site,
        "sticky",
        "name the app settings that stay with the site's address (not its content) in slot swaps",
        _site_sticky,
        _show_settings,
    )
    sp.add_argument("name")
    sp.add_argument(
        "keys", nargs="*", metavar="KEY", help="the sticky settings (these replace the list); none: show it"
    )
    sp.add_argument("--none", action="store_true", help="make no setting sticky")
    slot = site.add_parser("slot", help="deployment slots", parents=[common]).add_subparsers(
        dest="slot_action", metavar="ACTION", required=True
    )
    sp = leaf(
        slot,
        "create",
        "create a deployment slot NAME-SLOT with its own content, credentials and settings",
        lambda a, api: api.request("POST", api.path("sites", a.name, "slots"), {"slot": a.slot}),
        _show_slot_create,
    )
    sp.add_argument("name")
    sp.add_argument("slot")
    sp = leaf(slot, "list", "list a site's slots", _slot_list, _show_slots)
    sp.add_argument("name")
    sp = leaf(
        slot,
        "delete",
        "delete a slot and its content",
        _slot_delete,
        _done("deleted slot {a.slot} of {a.name}"),
        confirm=lambda a: (f"delete slot {a.slot} of {a.name} and all its content", f"{a.name}-{a.slot}"),
    )
    sp.add_argument("name")
    sp.add_argument("slot")
    sp = leaf(
        site,
        "swap",
        "swap a slot with production on every front end at once, after warming the slot's app",
        _site_swap,
        _done(
            "swapped: {a.name} is served by {answer[production_served_by]}, "
            "the {a.slot} slot by {answer[slot_served_by]}"
        ),
    )
    sp.add_argument("name")
    sp.add_argument("slot")
    sp.add_argument(
        "--warm-timeout", type=float, help="seconds the slot's app has to answer first (default 60)"
    )
    sp = leaf(
        site,
        "reset-password",
        "set a new publishing password (shown once)",
        post("sites", "{a.name}", "publishing-password"),
        _show_password,
        confirm=_new_password,
    )
    sp.add_argument("name")
    sp = leaf(
        site,
        "scale",
        "run a site on N workers, balanced by the front ends",
        lambda a, api: api.request("POST", api.path("sites", a.name, "scale"), {"instances": a.instances}),
        _show_scaled,
    )
    sp.add_argument("name")
    sp.add_argument("--instances", type=int, required=True)
    sp = leaf(site, "usage", "a site's usage per UTC day and today's quota", _site_usage, _show_usage)
    sp.add_argument("name")
    sp.add_argument("--from", dest="since", metavar="YYYY-MM-DD", help="first day (default 30 days ago)")
    sp.add_argument("--to", dest="until", metavar="YYYY-MM-DD", help="last day (default today)")
    sp = leaf(
        site,
        "quota-reset",
        "let a site stopped by its daily quota serve again for the rest of the day (admin)",
        post("sites", "{a.name}", "quota-reset"),
        _done("{a.name} serves again: its quota stop is lifted for the rest of the UTC day"),
    )
    sp.add_argument("name")
    sp = leaf(
        site,
        "versions",
        "list a site's kept content versions",
        get("sites", "{a.name}", "versions"),
        _show_versions,
    )
    sp.add_argument("name")
    sp = leaf(
        site,
        "rollback",
        "make an earlier version the site's content again (default: the one before the newest)",
        _site_rollback,
        _done("{a.name} rolled back to version {answer[rolled_back_to]} (now version {answer[version]})"),
    )
    sp.add_argument("name")
    # Not "version": that name is the global --version's.
    sp.add_argument("to_version", metavar="VERSION", type=int, nargs="?", help="the version to go back to")
    sp = leaf(
        site,
        "download",
        "download a version of the site's content as a zip (default: the newest)",
        _site_download,
        _show_download,
    )
    sp.add_argument("name")
    sp.add_argument(
        "to_version", metavar="VERSION", type=int, nargs="?", help="the version (see site versions)"
    )
    sp.add_argument("-o", "--output", help="file to write (default NAME-vVERSION.zip; '-' for stdout)")
    sp = leaf(
        site,
        "backups",
        "list a site's scheduled backups (its plan says how often and how many)",
        every("backups", "sites", "{a.name}", "backups"),
        _show_backups,
    )
    sp.add_argument("name")
    sp = leaf(
        site,
        "backup-download",
        "download one of a site's scheduled backups as a zip (default: the newest)",
        _site_backup_download,
        _done("wrote {answer[file]}: backup {answer[backup]} of {a.name}, {answer[bytes]} bytes"),
    )
    sp.add_argument("name")
    sp.add_argument("backup", nargs="?", help="the backup's name (see site backups)")
    sp.add_argument("--to", help="file to write (default NAME-BACKUP)")
    sp = leaf(
        site,
        "backup-restore",
        "put a scheduled backup's content back as the site's newest version",
        post("sites", "{a.name}", "backups", "{a.backup}", "restore"),
        _done("{a.name} restored from backup {a.backup} (now version {answer[version]})"),
    )
    sp.add_argument("name")
    sp.add_argument("backup", help="the backup's name (see site backups)")
    sp = leaf(site, "logs", "show a site's app output and access lines", _site_logs, _show_logs)
    sp.add_argument("name")
    sp.add_argument("-f", "--follow", action="store_true", help="keep streaming new lines (Ctrl-C stops)")
    sp.add_argument("-n", "--lines", type=int, default=100, help="how many past lines (default 100)")
    sp = leaf(
        site,
        "publish-profile",
        "download a .PublishSettings file (sets a new publishing password)",
        _publish_profile,
        _show_publish_profile,
        confirm=_new_password,
    )
    sp.add_argument("name")
    sp.add_argument("-o", "--output", help="file to write (default NAME.PublishSettings; '-' for stdout)")

    def hostname_commands(hostname: Any) -> None:
        sp = leaf(
            hostname,
            "add",
            "claim a custom hostname (pending until DNS proves it is yours), with a certificate",
            _hostname_add,
            _show_hostname,
        )
        sp.add_argument("site")
        sp.add_argument("hostname")
        sp.add_argument("--cert", help="PEM certificate (chain) file; may hold the key too")
        sp.add_argument("--key", help="PEM private key file")
        sp.add_argument("--pfx", help="PFX / PKCS#12 file instead of --cert/--key")
        sp.add_argument(
            "--password-stdin", action="store_true", help="read the PFX or key password from stdin"
        )
        sp = leaf(
            hostname,
            "list",
            "list a site's custom hostnames, with the DNS record each pending one needs",
            every("hostnames", "sites", "{a.site}", "hostnames"),
            _show_hostnames,
        )
        sp.add_argument("site")
        sp = leaf(
            hostname,
            "verify",
            "check DNS now for a pending hostname's proof of ownership",
            post("sites", "{a.site}", "hostnames", "{a.hostname}", "verify"),
            _show_hostname,
        )
        sp.add_argument("site")
        sp.add_argument("hostname")
        sp = leaf(
            hostname,
            "renew",
            "order the hostname's ACME certificate now (an early renewal, or a retry after a failure)",
            post("sites", "{a.site}", "hostnames", "{a.hostname}", "renew"),
            _done(
                "{a.hostname}: a new certificate is being ordered; see `sitecloud site hostname list {a.site}`"
            ),
        )
        sp.add_argument("site")
        sp.add_argument("hostname")
        sp = leaf(
            hostname,
            "remove",
            "remove a custom hostname",
            _hostname_remove,
            _done("removed {a.hostname} from {a.site}"),
            confirm=lambda a: (f"remove {a.hostname} from {a.site}: it is no longer served", None),
        )
        sp.add_argument("site")
        sp.add_argument("hostname")
        sp = leaf(
            hostname,
            "check",
            "is a host name free?",
            get("hostnames", "{a.hostname}", "availability"),
            _show_availability,
        )
        sp.add_argument("hostname")

    hostname_commands(group("hostname", "custom hostnames of sites"))
    # The same commands as `sitecloud site hostname ...`, where a site's other settings are.
    hostname_commands(
        site.add_parser("hostname", help="custom hostnames of sites", parents=[common]).add_subparsers(
            dest="hostname_action", metavar="ACTION", required=True
        )
    )

    sp = leaf(top, "deploy", "replace a site's content with a directory or a .zip", _deploy, _show_deploy)
    sp.add_argument("site")
    sp.add_argument("path", help="a directory (zipped on the fly) or a .zip file")
    sp.add_argument(
        "--no-wait",
        action="store_true",
        help="answer once the new version is stored, without waiting for the workers to build and serve it",
    )

    # Hosts, roles and upgrades.
    add_fabric_commands(group, leaf, top)
    add_backup_commands(group, leaf)
    return p


def _command_word(argv: Sequence[str]) -> int | None:
    """Index of the first word that is not a global option (or its value)."""
    i = 0
    while i < len(argv):
        arg = argv[i]
        if arg in _VALUED_GLOBALS:
            i += 2
        elif arg.startswith("-"):
            i += 1
        else:
            return i
    return None


def _run_up(argv: list[str]) -> int:
    at = _command_word(argv)
    assert at is not None
    # A global --home given before `up` reaches it the way every sitecloud command reads it.
    pre = _parser().parse_known_args(argv[:at])[0]
    if pre.home:
        os.environ["SITECLOUD_HOME"] = pre.home
    from roles.controller.up import run_up  # lazily: the controller is heavy, other commands are not

    return int(run_up(argv[at + 1 :]))


def _fail(err: SitecloudError, as_json: bool) -> int:
    if as_json:
        out(dumps(err.to_json()))
    else:
        sys.stderr.write(f"error: {printable(err.message)}\n")
        if err.hint:
            sys.stderr.write(f"hint: {printable(err.hint)}\n")
    return int(exit_code(err))


def _usage_failed(err: UsageError, as_json: bool) -> int:
    if as_json:
        out(dumps(err.to_json()))
    else:
        sys.stderr.write(err.usage)
        sys.stderr.write(f"{err.prog}: error: {err.message}\n")
    return int(ExitCode.USAGE)


# Commands that name one thing of a kind: where to list that kind, which field names it, and which
# argument held the name (the first one set).
_NAMED = {
    "site": ("sites", "name", ("site", "name")),
    "deploy": ("sites", "name", ("site",)),
    "hostname": ("sites", "name", ("site",)),
    "plan": ("plans", "name", ("name",)),
    "subscription": ("subscriptions", "id", ("id",)),
    "token": ("tokens", "id", ("id",)),
    "host": ("hosts", "name", ("name",)),
}


def _not_found_hint(a: argparse.Namespace, api: ApiClient) -> str | None:
    """When the thing the command names is not in its list: a close name, or where to list them.

    Only for the thing the command is about: ``site create --subscription 9`` names a site that is not
    there yet, so ``create`` is left alone.
    """
    named = _NAMED.get(a.group)
    if named is None or getattr(a, "action", None) == "create":
        return None
    collection, field, attrs = named
    wanted = next((getattr(a, x) for x in attrs if getattr(a, x, None) is not None), None)
    if wanted is None:
        return None
    try:
        listed = api.list_all(api.path(collection), collection)[collection]
    except SitecloudError:
        return None
    names = [str(item[field]) for item in listed]
    if str(wanted) in names:
        return None  # something else was not found: the server's message says what
    close = did_you_mean(str(wanted), names)
    kind = "hostname" if a.group == "deploy" else a.group
    listing = f"`sitecloud {'site' if kind in ('deploy', 'hostname') else kind} list`"
    return f"did you mean {close!r}? (see {listing})" if close else f"see {listing}"


def _not_text(args: list[str]) -> InvalidInput | None:
    """An argument the shell passed as bytes that are not UTF-8 (Python keeps them as lone
    surrogates) can name nothing on the server; ``--home`` is a local path, and may be any bytes."""
    for i, arg in enumerate(args):
        if arg.startswith("--home=") or (i > 0 and args[i - 1] == "--home"):
            continue
        try:
            arg.encode("utf-8")
        except UnicodeEncodeError:
            try:
                raw = arg.encode("utf-8", "surrogateescape")
            except UnicodeEncodeError:
                raw = arg.encode("utf-8", "backslashreplace")
            shown = raw.decode("utf-8", "backslashreplace")
            return InvalidInput(
                f"argument {shown!r} is not valid UTF-8 text",
                hint="names are letters, digits and dashes; check the terminal's encoding",
            )
    return None


def _given_token(flag: str | None) -> str | None:
    """The token from ``--token`` or else ``SITECLOUD_TOKEN``, cleaned; None when neither is set.

    An empty value counts as not set (``SITECLOUD_TOKEN=`` in a script); one of only whitespace is
    refused rather than falling back to the admin token, which the user did not mean to use.
    """
    if flag:
        return clean_token(flag, "--token")
    env = os.environ.get("SITECLOUD_TOKEN")
    return clean_token(env, "SITECLOUD_TOKEN") if env else None


def main(argv: Sequence[str] | None = None) -> int:
    try:
        return _main(argv)
    except BrokenPipeError:
        # The reader went away (`sitecloud site list | head -1`): nothing left to say, and no
        # traceback; stdout points at nothing so the interpreter's last flush is quiet too.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1


def _main(argv: Sequence[str] | None = None) -> int:
    args_list = list(sys.argv[1:] if argv is None else argv)
    as_json = "--json" in args_list
    bad = _not_text(args_list)
    if bad is not None:
        return _fail(bad, as_json)
    at = _command_word(args_list)
    if at is not None and args_list[at] == "up":
        try:
            return _run_up(args_list)
        except UsageError as err:
            return _usage_failed(err, as_json)
        except SitecloudError as err:
            return _fail(err, as_json)
    parser = _parser()
    if "_ARGCOMPLETE" in os.environ:
        # The shell asks for completions (see docs/operations.md); imported only then, to start fast.
        import argcomplete

        argcomplete.autocomplete(parser)
    try:
        args = parser.parse_args(args_list)
    except UsageError as err:
        return _usage_failed(err, as_json)
    if args.version:
        out(json.dumps({"version": CODE_VERSION}) if args.json else f"sitecloud {CODE_VERSION}")
        return int(ExitCode.OK)
    if getattr(args, "run", None) is None:
        if args.json:
            return _usage_failed(
                UsageError("a command is required", parser.format_usage(), parser.prog), True
            )
        parser.print_help(sys.stderr)
        return int(ExitCode.USAGE)
    home = Path(args.home or os.environ.get("SITECLOUD_HOME") or _DEFAULT_HOME).expanduser()
    api: ApiClient | None = None
    try:
        endpoints = Endpoints.load(home)
        token = _given_token(args.token)
        if not token and not args.anonymous:
            token = endpoints.admin_token()
        api = ApiClient(endpoints, token)
        if args.confirm is not None:
            ask(args, args.confirm)
        answer = args.run(args, api)
    except NotFound as err:
        hint = _not_found_hint(args, api) if api is not None else None
        return _fail(NotFound(err.message, hint=hint or err.hint), args.json)
    except SitecloudError as err:
        return _fail(err, args.json)
    except KeyboardInterrupt:
        return int(ExitCode.INTERRUPTED)
    if args.json and answer is not None:
        out(dumps(answer))
    elif args.show is not None:
        args.show(answer, args)
        if isinstance(answer, dict) and answer.get("pending"):
            out(f"NOTE: {answer['pending']}")
    # A command run on the site ends as the command did (as ssh and `heroku run` do).
    return args.exit_of(answer) if args.exit_of is not None else int(ExitCode.OK)


if __name__ == "__main__":
    sys.exit(main())
