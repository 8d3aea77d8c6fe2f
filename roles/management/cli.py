"""``sitecloud``: the admin and tenant command line, a client of the management REST API.

``sitecloud up`` is the exception: it starts the cloud (the controller's job), so it is handed over to
:func:`roles.controller.up.run_up` before any parsing here.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from roles.management._cli_client import ApiClient, Endpoints, zipped
from shared.errors import SitecloudError

__all__ = ["main"]

_DEFAULT_HOME = Path.home() / ".local" / "share" / "sitecloud"
# Global options that take a value: skipped when looking for the command word.
_VALUED_GLOBALS = ("--home", "--token")

Command = Callable[[argparse.Namespace, ApiClient], Any]
Show = Callable[[Any, argparse.Namespace], None]


def _out(line: str = "") -> None:
    sys.stdout.write(line + "\n")


def _table(headers: Sequence[str], rows: Sequence[Sequence[Any]], *, empty: str) -> None:
    if not rows:
        _out(empty)
        return
    cells = [[str(h) for h in headers]] + [["-" if c is None or c == "" else str(c) for c in r] for r in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    for row in cells:
        _out("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip())


def _fields(pairs: Sequence[tuple[str, Any]]) -> None:
    width = max(len(k) for k, _ in pairs)
    for key, value in pairs:
        _out(f"  {key.ljust(width)}  {value}")


def _ago(when: str | None) -> str:
    if not when:
        return "never"
    try:
        seen = dt.datetime.fromisoformat(when)
    except ValueError:
        return when
    seconds = int((dt.datetime.now(dt.UTC) - seen).total_seconds())
    if seconds < 120:
        return f"{max(seconds, 0)}s ago"
    if seconds < 7200:
        return f"{seconds // 60}m ago"
    return seen.strftime("%Y-%m-%d %H:%M:%S UTC")


# -- commands: each calls the API and returns its answer; a matching _show_* prints it for people


def _plan_create(a: argparse.Namespace, api: ApiClient) -> Any:
    body = {"name": a.name, "max_sites": a.max_sites, "storage_mb": a.storage_mb}
    return api.request("POST", api.path("plans"), body)


def _show_plan_create(plan: Any, a: argparse.Namespace) -> None:
    _out(f"created plan {plan['name']}: up to {plan['max_sites']} site(s), {plan['storage_mb']} MB storage")


def _show_plans(answer: Any, a: argparse.Namespace) -> None:
    rows = [(p["name"], p["max_sites"], p["storage_mb"]) for p in answer["plans"]]
    _table(("NAME", "MAX SITES", "STORAGE MB"), rows, empty="no plans yet (`sitecloud plan create`)")


def _show_tenant_create(tenant: Any, a: argparse.Namespace) -> None:
    _out(f"created tenant {tenant['name']} (id {tenant['id']})")
    _out(f"token: {tenant['token']}")
    _out("This token is shown only once: give it to the tenant now (sitecloud --token TOKEN ...).")


def _show_tenants(answer: Any, a: argparse.Namespace) -> None:
    rows = [(t["id"], t["name"]) for t in answer["tenants"]]
    _table(("ID", "NAME"), rows, empty="no tenants yet (`sitecloud tenant create`)")


def _show_subscription_create(sub: Any, a: argparse.Namespace) -> None:
    _out(f"created subscription {sub['id']}: tenant {sub['tenant']}, plan {sub['plan']} ({sub['state']})")


def _show_subscriptions(answer: Any, a: argparse.Namespace) -> None:
    rows = [(s["id"], s["tenant"], s["plan"], s["state"]) for s in answer["subscriptions"]]
    _table(("ID", "TENANT", "PLAN", "STATE"), rows, empty="no subscriptions")


def _site_fields(site: Any) -> list[tuple[str, Any]]:
    ftp, deploy = site["ftp"], site["deploy"]
    pairs: list[tuple[str, Any]] = [
        ("url", site["url"]),
        ("state", site["state"]),
        ("tenant", site["tenant"]),
        ("subscription", site["subscription"]),
        ("ftp host", f"{ftp['host']}:{ftp['port']}"),
        ("ftp user", ftp["user"]),
    ]
    if "password" in ftp:
        pairs.append(("ftp password", ftp["password"]))
    pairs += [("deploy url", deploy["url"]), ("deploy user", deploy["user"])]
    if "password" in deploy:
        pairs.append(("deploy password", deploy["password"]))
    return pairs


def _show_site_create(site: Any, a: argparse.Namespace) -> None:
    _out(f"created site {site['name']}")
    _fields(_site_fields(site))
    _out()
    _out("The password is shown only this once: store it now. FTP and web deploy use the same one.")


def _show_site(site: Any, a: argparse.Namespace) -> None:
    _out(f"site {site['name']}")
    _fields(_site_fields(site))


def _show_sites(answer: Any, a: argparse.Namespace) -> None:
    rows = [(s["name"], s["tenant"], s["subscription"], s["state"], s["url"]) for s in answer["sites"]]
    _table(("NAME", "TENANT", "SUBSCRIPTION", "STATE", "URL"), rows, empty="no sites")


def _site_delete(a: argparse.Namespace, api: ApiClient) -> Any:
    api.request("DELETE", api.path("sites", a.name))
    return {"site": a.name, "deleted": True}


def _deploy(a: argparse.Namespace, api: ApiClient) -> Any:
    with zipped(Path(a.path)) as zip_file:
        return api.upload(api.path("sites", a.site, "deploy"), zip_file)


def _show_deploy(answer: Any, a: argparse.Namespace) -> None:
    _out(
        f"deployed {answer.get('files')} file(s), {answer.get('bytes')} bytes to {answer.get('site')}: "
        f"content version {answer.get('version')}"
    )


def _show_roles(answer: Any, a: argparse.Namespace) -> None:
    rows = [
        (
            r["role"],
            r["host"],
            r["state"],
            r["config_version"],
            r["desired_version"],
            _ago(r["last_heartbeat"]),
            r.get("reason"),
        )
        for r in answer["roles"]
    ]
    _table(("ROLE", "HOST", "STATE", "CONFIG", "DESIRED", "HEARTBEAT", "REASON"), rows, empty="no roles")


# -- the parser


def _parser() -> argparse.ArgumentParser:
    # --json, --home and --token work before or after the command word; SUPPRESS keeps a subcommand
    # from overwriting what was given globally.
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--json", action="store_true", default=argparse.SUPPRESS, help="JSON output")
    common.add_argument("--home", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
    common.add_argument("--token", default=argparse.SUPPRESS, help=argparse.SUPPRESS)

    p = argparse.ArgumentParser(prog="sitecloud", description="Manage a sitecloud: plans, tenants, sites.")
    p.add_argument("--home", default=None, help="the cloud's home (env SITECLOUD_HOME)")
    p.add_argument("--token", default=None, help="API token (env SITECLOUD_TOKEN; default: the admin token)")
    p.add_argument("--json", action="store_true", default=False, help="JSON output")
    top = p.add_subparsers(dest="group", metavar="COMMAND")
    top.add_parser("up", help="start the cloud on this machine (see `sitecloud up --help`)", add_help=False)

    def leaf(
        parent: Any, name: str, help_: str, run: Command, show: Show | None = None
    ) -> argparse.ArgumentParser:
        sp: argparse.ArgumentParser = parent.add_parser(name, help=help_, parents=[common])
        sp.set_defaults(run=run, show=show)
        return sp

    def group(name: str, help_: str) -> Any:
        gp = top.add_parser(name, help=help_, parents=[common])
        return gp.add_subparsers(dest="action", metavar="ACTION", required=True)

    plan = group("plan", "hosting plans (admin)")
    sp = leaf(plan, "create", "create a plan", _plan_create, _show_plan_create)
    sp.add_argument("name")
    sp.add_argument("--max-sites", type=int, required=True)
    sp.add_argument("--storage-mb", type=int, required=True)
    leaf(plan, "list", "list plans", lambda a, api: api.request("GET", api.path("plans")), _show_plans)

    tenant = group("tenant", "tenants (admin)")
    sp = leaf(
        tenant,
        "create",
        "create a tenant and print its token",
        lambda a, api: api.request("POST", api.path("tenants"), {"name": a.name}),
        _show_tenant_create,
    )
    sp.add_argument("name")
    leaf(
        tenant, "list", "list tenants", lambda a, api: api.request("GET", api.path("tenants")), _show_tenants
    )

    sub = group("subscription", "subscriptions of tenants to plans")
    sp = leaf(
        sub,
        "create",
        "subscribe a tenant to a plan (admin)",
        lambda a, api: api.request("POST", api.path("subscriptions"), {"tenant": a.tenant, "plan": a.plan}),
        _show_subscription_create,
    )
    sp.add_argument("--tenant", required=True)
    sp.add_argument("--plan", required=True)
    leaf(
        sub,
        "list",
        "list subscriptions",
        lambda a, api: api.request("GET", api.path("subscriptions")),
        _show_subscriptions,
    )

    site = group("site", "sites")
    sp = leaf(
        site,
        "create",
        "create a site; prints its publishing password once",
        lambda a, api: api.request(
            "POST", api.path("sites"), {"name": a.name, "subscription": a.subscription}
        ),
        _show_site_create,
    )
    sp.add_argument("name")
    sp.add_argument("--subscription", type=int, required=True, help="subscription id")
    leaf(site, "list", "list sites", lambda a, api: api.request("GET", api.path("sites")), _show_sites)
    sp = leaf(
        site, "show", "show a site", lambda a, api: api.request("GET", api.path("sites", a.name)), _show_site
    )
    sp.add_argument("name")
    sp = leaf(site, "delete", "delete a site and its content", _site_delete)
    sp.add_argument("name")

    sp = leaf(top, "deploy", "replace a site's content with a directory or a .zip", _deploy, _show_deploy)
    sp.add_argument("site")
    sp.add_argument("path", help="a directory (zipped on the fly) or a .zip file")

    role = group("role", "role processes (admin)")
    leaf(
        role,
        "list",
        "list roles and their health",
        lambda a, api: api.request("GET", api.path("roles")),
        _show_roles,
    )
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
        _out(json.dumps(err.to_json(), indent=2, ensure_ascii=False))
    else:
        sys.stderr.write(f"error: {err.message}\n")
        if err.hint:
            sys.stderr.write(f"hint: {err.hint}\n")
    return 1


def main(argv: Sequence[str] | None = None) -> int:
    args_list = list(sys.argv[1:] if argv is None else argv)
    at = _command_word(args_list)
    if at is not None and args_list[at] == "up":
        return _run_up(args_list)
    parser = _parser()
    args = parser.parse_args(args_list)
    if getattr(args, "run", None) is None:
        parser.print_help(sys.stderr)
        return 2
    home = Path(args.home or os.environ.get("SITECLOUD_HOME") or _DEFAULT_HOME).expanduser()
    try:
        endpoints = Endpoints.load(home)
        token = args.token or os.environ.get("SITECLOUD_TOKEN") or endpoints.admin_token()
        answer = args.run(args, ApiClient(endpoints, token))
    except SitecloudError as err:
        return _fail(err, args.json)
    except KeyboardInterrupt:
        return 130
    if args.json:
        _out(json.dumps(answer, indent=2, ensure_ascii=False))
    elif args.show is not None:
        args.show(answer, args)
    elif isinstance(answer, dict) and answer.get("deleted"):
        _out(f"deleted site {answer['site']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
