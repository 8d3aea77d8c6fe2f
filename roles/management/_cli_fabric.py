"""``sitecloud host ...``, ``sitecloud role ...`` and ``sitecloud upgrade``: many hosts, many roles.

Role add, the role actions and upgrade print the controller's steps as they happen (streamed from the
API as JSON lines); with ``--json`` only the final answer is printed.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from roles.management._cli_client import ApiClient
from roles.management._cli_output import ago, out, print_table
from roles.management._cli_ux import ask
from shared.errors import ConfirmationRequired, InvalidInput, Unavailable
from shared.states import RoleState
from shared.words import counted

__all__ = ["add_fabric_commands"]

Command = Callable[[argparse.Namespace, ApiClient], Any]
Show = Callable[[Any, argparse.Namespace], None]
Leaf = Callable[..., argparse.ArgumentParser]

_KINDS = ("frontend", "worker", "publisher", "fileserver", "management")
# Seconds without a line before the CLI gives up on a stream (a cold install takes a while per step).
_STREAM_TIMEOUT = 900.0
# Management restarting itself: it goes half a second after its answer, and should be back within this.
_RESTART_GRACE = 1.5
_RESTART_TIMEOUT = 60.0


def _step_line(event: dict[str, Any]) -> str | None:
    """One progress event as a line for people; None for events not worth a line."""
    where = f"{event['role']} on {event['host']}: " if "role" in event else ""
    step, phase, detail = event.get("step", ""), event.get("phase"), event.get("detail") or ""
    if phase == "started":
        return None
    if phase == "done":
        seconds = event.get("seconds")
        took = f" ({seconds:.1f}s)" if isinstance(seconds, int | float) and seconds >= 0.05 else ""
        return f"  {where}{step} done{took}" + (f"  {detail}" if detail else "")
    return f"  {where}{step}" + (f": {detail}" if detail else "")


def _stream(api: ApiClient, path: str, body: dict[str, Any], *, quiet: bool) -> Any:
    """POST, print each progress line as it comes, and return the final result (or raise its error)."""

    def show(event: dict[str, Any]) -> None:
        text = _step_line(event)
        if text and not quiet:
            out(text)

    return api.request_lines(
        "POST",
        path,
        body,
        on_line=show,
        timeout=_STREAM_TIMEOUT,
        what="the controller",
        hint="see `sitecloud role list`",
    )


# -- commands --------------------------------------------------------------------------------------


def _host_create(a: argparse.Namespace, api: ApiClient) -> Any:
    return api.request("POST", api.path("hosts"), {"name": a.name, "fabric": a.fabric})


def _host_delete(a: argparse.Namespace, api: ApiClient) -> Any:
    api.request("DELETE", api.path("hosts", a.name))
    return {"host": a.name, "deleted": True}


def _role_add(a: argparse.Namespace, api: ApiClient) -> Any:
    body: dict[str, Any] = {"role": a.role, "host": a.host}
    if a.ssh_user:
        body["ssh_user"] = a.ssh_user
    if a.ssh_key:
        key = Path(a.ssh_key).expanduser().resolve()
        if not key.is_file():
            raise InvalidInput(f"no SSH key file at {key}")
        body["ssh_key"] = str(key)
    if a.size:
        body["size"] = a.size
    if a.reserved_for is not None:
        body["reserved_for"] = a.reserved_for
    if not a.json:
        out(f"adding {a.role} on {a.host}")
    return _stream(api, api.path("roles"), body, quiet=a.json)


def _role_action(action: str) -> Command:
    def run(a: argparse.Namespace, api: ApiClient) -> Any:
        started = time.monotonic()
        if not a.json:
            out(f"{action} {a.role} on {a.host}")
        path = api.path("roles", a.role, a.host, action)
        body = {"confirm": a.yes, **({"forget": True} if getattr(a, "forget", False) else {})}
        try:
            answer = _stream(api, path, body, quiet=a.json)
        except ConfirmationRequired:
            # The server asks only for the last running worker or front end: ask the admin, then
            # send the action again as confirmed.
            what = f"{action} the last running {a.role} ({a.role} on {a.host}): every site goes down"
            ask(a, lambda _: (f"{what} until one runs again", None))
            started = time.monotonic()
            answer = _stream(api, path, {**body, "confirm": True}, quiet=a.json)
        if answer.get("state") == RoleState.RESTARTING:
            # Management restarting itself answers before it goes: wait for the new one here.
            answer = _until_serving(api, a, answer)
        return {**answer, "seconds": round(time.monotonic() - started, 2)}

    return run


def _until_serving(api: ApiClient, a: argparse.Namespace, answer: dict[str, Any]) -> dict[str, Any]:
    """Poll the role list until the role serves again (the API itself may be restarting meanwhile);
    after the bound, the answer as it was."""
    if not a.json:
        out(f"  {a.role} on {a.host}: waiting until it serves again")
    # The restart begins a moment after the answer: the list must not be read before it.
    time.sleep(_RESTART_GRACE)
    deadline = time.monotonic() + _RESTART_TIMEOUT
    while time.monotonic() < deadline:
        try:
            roles = api.list_all(api.path("roles"), "roles")["roles"]
        except Unavailable:
            roles = []
        role = next((r for r in roles if r["role"] == a.role and r["host"] == a.host), None)
        if role is not None and role["state"] in (RoleState.READY, RoleState.DEGRADED):
            return {**answer, "state": role["state"], "reason": role.get("reason") or None}
        time.sleep(0.5)
    return answer


def _upgrade(a: argparse.Namespace, api: ApiClient) -> Any:
    if not a.json:
        out("rolling upgrade: one host at a time per role type, each gated on health")
    return _stream(api, api.path("upgrade"), {"force": a.force}, quiet=a.json)


# -- output for people -----------------------------------------------------------------------------


def _show_host(host: Any, a: argparse.Namespace) -> None:
    out(f"host {host['name']} ({host['fabric']}) is {host['state']} at {host['address']}")


def _show_hosts(answer: Any, a: argparse.Namespace) -> None:
    rows = [
        (h["name"], h["fabric"], h["address"], h["state"], ", ".join(h["roles"])) for h in answer["hosts"]
    ]
    print_table(("HOST", "FABRIC", "ADDRESS", "STATE", "ROLES"), rows, empty="no hosts")


def _show_roles(answer: Any, a: argparse.Namespace) -> None:
    rows = []
    for r in answer["roles"]:
        state = r["state"] if r["host_state"] != "down" else f"{r['state']} (host down)"
        code = r["code_version"] + (f"/{r['code_hash'][:8]}" if r.get("code_hash") else "")
        rows.append(
            (
                _role_kind(r),
                r["host"],
                state,
                code,
                f"{r['config_version']}/{r['desired_version']}",
                ago(r["last_heartbeat"]),
                r.get("reason"),
            )
        )
    print_table(("ROLE", "HOST", "STATE", "CODE", "CONFIG", "HEARTBEAT", "REASON"), rows, empty="no roles")


def _role_kind(role: Any) -> str:
    """The role's kind, and for a worker given a size or reserved for a subscription, which."""
    notes = [role["size"]] if role.get("size") else []
    if role.get("reserved_for") is not None:
        notes.append(f"reserved for {role['reserved_for']}")
    return str(role["role"]) + (f" ({', '.join(notes)})" if notes else "")


def _show_role_done(answer: Any, a: argparse.Namespace) -> None:
    took = f" ({answer['seconds']:.1f}s)" if answer.get("seconds") is not None else ""
    out(f"{answer['role']} on {answer['host']} is {answer['state']}{took}")
    if answer.get("reason"):
        out(f"  why: {answer['reason']}")


def _show_upgrade(answer: Any, a: argparse.Namespace) -> None:
    done = len(answer["upgraded"])
    out(
        f"upgraded {counted(done, 'role')} to code {answer['code']} in {answer['seconds']:.1f}s; "
        f"{len(answer['skipped'])} left as they were"
    )


def _done(text: str) -> Show:
    return lambda answer, a: out(text.format(a=a))


def _role_remove(a: argparse.Namespace) -> tuple[str, str | None]:
    return (f"stop {a.role} on {a.host} and delete it from that host", None)


def add_fabric_commands(group: Callable[[str, str], Any], leaf: Leaf, top: Any) -> None:
    """``host``, ``role`` and ``upgrade`` on the CLI's parser (``group`` and ``leaf`` are its builders)."""
    host = group("host", "role hosts from a fabric (admin)")
    sp = leaf(host, "create", "provision a host", _host_create, _show_host)
    sp.add_argument("name", help="the host's DNS name")
    sp.add_argument("--fabric", choices=["netns", "ssh"], default="netns", help="default %(default)s")
    leaf(host, "list", "list hosts", lambda a, api: api.list_all(api.path("hosts"), "hosts"), _show_hosts)
    sp = leaf(
        host,
        "delete",
        "destroy a host that runs no roles",
        _host_delete,
        _done("deleted host {a.name}"),
        confirm=lambda a: (f"destroy host {a.name} and everything on it", a.name),
    )
    sp.add_argument("name")

    role = group("role", "role processes on hosts (admin)")
    leaf(
        role,
        "list",
        "roles, their state and health",
        lambda a, api: api.list_all(api.path("roles"), "roles"),
        _show_roles,
    )
    sp = leaf(role, "add", "install and start a role on a host, by DNS name", _role_add, _show_role_done)
    sp.add_argument("role", choices=_KINDS)
    sp.add_argument("host", help="a host from `host create`, or any machine reachable over SSH")
    sp.add_argument("--ssh-user", help="log in as this user (default root)")
    sp.add_argument("--ssh-key", help="private key file to log in with (default: the controller's own)")
    sp.add_argument("--size", choices=["small", "medium", "large"], help="worker size")
    sp.add_argument(
        "--reserved-for", type=int, metavar="SUBSCRIPTION", help="a worker only for this subscription's sites"
    )
    for action, help_ in [
        ("start", "start a stopped role"),
        ("stop", "stop a role (workers leave the front ends' routes first)"),
        ("restart", "restart a role"),
        ("repair", "install the role again and restart it"),
        ("remove", "stop a role and delete it from its host"),
    ]:
        sp = leaf(
            role,
            action,
            help_,
            _role_action(action),
            _show_role_done,
            confirm=_role_remove if action == "remove" else None,
        )
        if action != "remove":
            # Stopping the last running worker or front end asks first; the others take --yes too, so
            # a script may pass it to every role action.
            sp.add_argument(
                "-y", "--yes", action="store_true", help="do not ask (needed where there is no terminal)"
            )
        else:
            sp.add_argument(
                "--forget",
                action="store_true",
                help="when the host cannot be reached (gone for good), delete the role's record anyway; "
                "whatever is left on the host stays there",
            )
        sp.add_argument("role", choices=_KINDS)
        sp.add_argument("host")

    sp = leaf(top, "upgrade", "rolling upgrade of every role to the current code", _upgrade, _show_upgrade)
    sp.add_argument("--force", action="store_true", help="also roll roles already on the current code")
