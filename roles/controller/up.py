"""`sitecloud up`: the whole cloud on this machine, with the controller in the foreground."""

from __future__ import annotations

import argparse
import json
import socket
import sys
from collections.abc import Collection
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.exc import SQLAlchemyError

from roles.controller.config import CloudConfig
from roles.controller.controller import Controller
from roles.controller.home import LOCAL_ROLES, role_settings
from shared.db.models import Plan, Site, Subscription, Tenant
from shared.db.session import Database
from shared.files import read_json
from shared.logs import setup_logging
from shared.process import run_until_stopped

__all__ = ["run_up"]


def _port_range(text: str) -> tuple[int, int]:
    try:
        low, high = (int(p) for p in text.split("-", 1))
    except ValueError:
        raise argparse.ArgumentTypeError("expected LOW-HIGH, e.g. 30000-30100") from None
    if not 0 < low <= high < 65536:
        raise argparse.ArgumentTypeError("ports must satisfy 0 < LOW <= HIGH < 65536")
    return low, high


def _port(text: str) -> int:
    try:
        port = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a port number") from None
    if not 0 < port < 65536:
        # (The kernel would take 99999 as 34463, and `up` would print the one it was given.)
        raise argparse.ArgumentTypeError("give a port from 1 to 65535")
    return port


def _positive_seconds(value: str) -> float:
    try:
        seconds = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value!r} is not a number of seconds") from None
    if not 0.1 <= seconds <= 3600:
        raise argparse.ArgumentTypeError("give between 0.1 and 3600 seconds")
    return seconds


def _processes(value: str) -> int:
    try:
        count = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value!r} is not a whole number") from None
    if not 1 <= count <= 64:
        raise argparse.ArgumentTypeError("give between 1 and 64 processes")
    return count


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="sitecloud up", description="Start the whole cloud on this machine.")
    p.add_argument(
        "--home", help="cloud home directory (env SITECLOUD_HOME; default ~/.local/share/sitecloud)"
    )
    p.add_argument("--domain", help="sites are <site>.DOMAIN (default sites.localhost)")
    p.add_argument("--bind", help="address every listener binds (default 127.0.0.1)")
    p.add_argument(
        "--advertise",
        metavar="ADDRESS",
        help="address (or DNS name) where roles on other hosts reach this machine's roles; they then "
        "listen on all addresses (default: this machine's roles serve only this machine)",
    )
    p.add_argument("--http-port", type=_port, help="default 8080")
    p.add_argument("--https-port", type=_port, help="default 8443")
    p.add_argument("--ftp-port", type=_port, help="default 2121")
    p.add_argument("--api-port", type=_port, help="default 8090")
    p.add_argument("--deploy-port", type=_port, help="default 8172")
    p.add_argument("--passive-ports", type=_port_range, metavar="LOW-HIGH", help="FTP passive port range")
    p.add_argument("--db", help="runtime DB URL, e.g. postgresql://user:pw@host/db (default: SQLite)")
    p.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    p.add_argument(
        "--local-roles",
        metavar="ROLE,...",
        help="roles to run on this machine (default all five; a later `up` on the home keeps what the "
        "last one had); e.g. 'management' when the data plane lives on other hosts (sitecloud role add)",
    )
    p.add_argument(
        "--wheelhouse",
        help="where wheelhouses for role hosts are built, one per code version, ahead of the first "
        "`role add` (default $SITECLOUD_WHEELHOUSE or ~/.cache/sitecloud/wheelhouse)",
    )
    p.add_argument(
        "--usage-interval",
        type=_positive_seconds,
        metavar="SECONDS",
        help="how often front ends and workers report usage, so how soon a site over its daily quota "
        "is stopped (default 30.0)",
    )
    p.add_argument(
        "--processes",
        type=_processes,
        metavar="N",
        help="serving processes of this machine's front end and worker, sharing their ports; about one "
        "per core for static sites, 1 where most sites are apps (default 1)",
    )
    p.add_argument("--json", action="store_true", help="print the endpoints as JSON once the cloud is ready")
    return p


@dataclass(frozen=True)
class _HomeState:
    """How far the home's admin has come: what `up` suggests doing next depends on it."""

    plans: int = 0
    tenants: int = 0
    subscriptions: int = 0
    sites: int = 0


def _home_state(db: Database) -> _HomeState | None:
    """What the runtime DB holds (None: it cannot say now)."""
    try:
        with db.session() as s:
            counts = [
                s.scalar(select(func.count()).select_from(m)) or 0 for m in (Plan, Tenant, Subscription, Site)
            ]
    except SQLAlchemyError:
        return None
    return _HomeState(*counts)


def _next_step(state: _HomeState | None) -> str:
    """The command to run next on a home in this state, as the README's walk-through goes."""
    if state is None:
        return "sitecloud --help"
    if not state.plans:
        return "sitecloud plan create basic --max-sites 10 --storage-mb 100"
    if not state.tenants:
        return "sitecloud tenant create NAME"
    if not state.subscriptions:
        return "sitecloud subscription create --tenant NAME --plan PLAN"
    if not state.sites:
        return "sitecloud site create NAME --subscription ID"
    return "sitecloud site list"


def _summary(
    endpoints: dict[str, Any],
    local_roles: Collection[str] = LOCAL_ROLES,
    *,
    then: str = _next_step(_HomeState()),
) -> str:
    # A role `up` does not run here is reached on the host it is added to, never on this machine.
    sites = [
        f"  sites (HTTPS)    {endpoints['sites']['https']}",
        f"  sites (HTTP)     {endpoints['sites']['http']}",
    ]
    if "frontend" not in local_roles:
        sites = ["  sites            through the front ends' hosts (sitecloud role add frontend HOST)"]
    publishing = [
        f"  FTP              ftp://{endpoints['ftp']['host']}:{endpoints['ftp']['port']}",
        f"  web deploy       {endpoints['deploy']}",
    ]
    if "publisher" not in local_roles:
        publishing = [
            "  FTP, web deploy  on the publisher's host (sitecloud role add publisher HOST; "
            "sitecloud site show SITE gives it)"
        ]
    return "\n".join(
        [
            "",
            "sitecloud is up.",
            f"  management API   {endpoints['api']}",
            *sites,
            *publishing,
            f"  admin token      {endpoints['admin_token_file']}",
            f"  CA certificate   {endpoints['ca_cert']}  (trust it: curl --cacert ...)",
            f"  role logs        {endpoints['logs']}",
            "",
            f"Next: {then}   (Ctrl-C stops the cloud)",
            "",
        ]
    )


# What `up` was told once and keeps using on the same home until told otherwise: the addresses
# tenants were given (a second `up` without the flags must not move every site to other ports), and
# the runtime DB (without --db, a home on PostgreSQL must not come up empty on SQLite).
_REMEMBERED: dict[str, Any] = {
    "domain": "sites.localhost",
    "bind": "127.0.0.1",
    "advertise": "",
    "http_port": 8080,
    "https_port": 8443,
    "ftp_port": 2121,
    "api_port": 8090,
    "deploy_port": 8172,
    "passive_ports": None,
    "db": "",
    # Which roles this machine runs: a plain `up` after a restart must not add a second fileserver
    # (and a worker, publisher and front end) to a cloud whose data plane lives on other hosts.
    "local_roles": "fileserver,worker,publisher,frontend,management",
    "usage_interval": 30.0,
    "processes": 1,
}


def _remembered_choices(home: Path, args: argparse.Namespace) -> dict[str, Any]:
    """Each option as given now, else as the last `up` on this home had it (HOME/cloud.json's "up"
    object, written by the home once `up` holds it), else its default."""
    state_file = home / "cloud.json"
    state = read_json(state_file) if state_file.exists() else {}
    saved = state.get("up") if isinstance(state, dict) else None
    remembered: dict[str, Any] = saved if isinstance(saved, dict) else {}
    chosen = {}
    for name, default in _REMEMBERED.items():
        given = getattr(args, name)
        chosen[name] = given if given is not None else remembered.get(name, default)
    return chosen


def _controller_settings(home: Path) -> dict[str, Any]:
    """The admin's settings of the controller itself: HOME/cloud.json's "controller" object."""
    state_file = home / "cloud.json"
    state = read_json(state_file) if state_file.exists() else {}
    return role_settings(state_file, state if isinstance(state, dict) else {}, "controller")


def _is_this_machine(address: str) -> bool:
    """Whether ``address`` (or any address a DNS name resolves to) belongs to one of this machine's
    interfaces: only such an address can be bound (a name that does not resolve here says nothing)."""
    try:
        found = {str(info[4][0]) for info in socket.getaddrinfo(address, None, proto=socket.IPPROTO_UDP)}
    except OSError:
        return True
    for ip in found:
        family = socket.AF_INET6 if ":" in ip else socket.AF_INET
        with socket.socket(family, socket.SOCK_DGRAM) as probe:
            try:
                probe.bind((ip, 0))
            except OSError:
                continue
            return True
    return False


def run_up(argv: list[str]) -> int:
    """Run the cloud until Ctrl-C or SIGTERM. A :class:`SitecloudError` (a bad option, a home or port
    in use) is raised to the CLI, which prints it as every command's errors are printed."""
    args = _parser().parse_args(argv)
    home = CloudConfig.home_from_env(args.home)
    chosen = _remembered_choices(home, args)
    passive = chosen["passive_ports"]
    config = CloudConfig(
        home=home,
        domain=chosen["domain"],
        bind=chosen["bind"],
        advertise=chosen["advertise"],
        http_port=chosen["http_port"],
        https_port=chosen["https_port"],
        ftp_port=chosen["ftp_port"],
        api_port=chosen["api_port"],
        deploy_port=chosen["deploy_port"],
        passive_ports=tuple(passive) if passive else None,
        db_url=chosen["db"],
        log_level=args.log_level,
        local_roles=tuple(r.strip() for r in str(chosen["local_roles"]).split(",") if r.strip()),
        wheelhouse=Path(args.wheelhouse).resolve() if args.wheelhouse else None,
        usage_interval=float(chosen["usage_interval"]),
        processes=int(chosen["processes"]),
        **_controller_settings(home),
    )
    setup_logging("controller", "localhost", args.log_level if args.log_level != "INFO" else "WARNING")

    def progress(line: str) -> None:
        print(f"sitecloud: {line}", file=sys.stderr, flush=True)
        if line.startswith("ready in"):
            endpoints = controller.home.endpoints()
            if args.json:
                print(json.dumps(endpoints), flush=True)
            else:
                then = _next_step(_home_state(controller.db))
                print(_summary(endpoints, controller.home.local_roles, then=then), flush=True)

    controller = Controller(config, progress=progress)

    progress(f"home {config.home}")
    if config.advertise and not _is_this_machine(config.advertise):
        progress(
            f"warning: --advertise {config.advertise} is not an address of this machine: roles on other "
            "hosts reach this machine's roles there only through a NAT or a forward to it; if that is "
            "not so, start again with one of this machine's addresses (`ip -4 addr`)"
        )
    run_until_stopped(controller.run)
    progress("stopped")
    return 0


if __name__ == "__main__":
    from roles.management.cli import main  # where errors are printed, as for `sitecloud up`

    sys.exit(main(["up", *sys.argv[1:]]))
