"""What `sitecloud up` checks before it starts a role: that the public ports it was given, and the
internal ones an earlier `up` chose for this home, are free (that no other controller runs on its home
is :mod:`shared.home_lock`'s).

A taken port used to show only once the roles were starting, as roles restarted for ever.
"""

from __future__ import annotations

import errno
import os
from collections.abc import Callable, Mapping
from pathlib import Path

from roles.controller.config import CloudConfig
from shared.errors import InUse, InvalidInput
from shared.listeners import ListenerSpec, bind_listener

__all__ = ["PUBLIC_PORTS", "check_internal_ports", "check_public_ports"]

# The ports people and other machines use, by the role that listens on them: `up`'s option for each
# and the CloudConfig field it sets.
PUBLIC_PORTS: dict[str, tuple[tuple[str, str], ...]] = {
    "frontend": (("--http-port", "http_port"), ("--https-port", "https_port")),
    "publisher": (("--ftp-port", "ftp_port"), ("--deploy-port", "deploy_port")),
    "management": (("--api-port", "api_port"),),
}


def check_public_ports(config: CloudConfig, running: Callable[[str], bool]) -> None:
    """Refuse, naming each port and its option, when a public port of a role about to be started
    cannot be bound; ``running(kind)`` says a role of this home still runs (and is adopted, ports
    and all)."""
    given: dict[int, str] = {}
    problems: list[tuple[int, str, int]] = []
    for kind, ports in PUBLIC_PORTS.items():
        if kind not in config.local_roles:
            continue
        for option, field in ports:
            port = int(getattr(config, field))
            if port in given:
                raise InvalidInput(
                    f"{given[port]} and {option} are both {port}; each needs a port of its own",
                    hint=f"choose another with {option}",
                )
            given[port] = option
            if running(kind):
                continue
            try:
                bind_listener(ListenerSpec(option, config.bind, port)).close()
            except OSError as exc:
                problems.append((port, option, exc.errno or 0))
    if problems:
        raise _port_error(problems, config.bind)


def _port_error(problems: list[tuple[int, str, int]], bind: str) -> InUse | InvalidInput:
    taken = [(port, option) for port, option, code in problems if code == errno.EADDRINUSE]
    options = " and ".join(option for _, option in taken)
    if len(taken) == 1:
        port, option = taken[0]
        return InUse(
            f"port {port} ({option}) is in use by another process; choose another with {option}",
            hint=f"`ss -ltnp 'sport = :{port}'` shows which process holds it",
        )
    if taken:
        listed = ", ".join(f"{port} ({option})" for port, option in taken)
        return InUse(
            f"ports {listed} are in use by other processes; choose others with {options}",
            hint="`ss -ltnp` shows which processes hold them",
        )
    port, option, code = problems[0]
    why = os.strerror(code) if code else "unknown error"
    hint = (
        "ports below 1024 need root (or CAP_NET_BIND_SERVICE)"
        if code == errno.EACCES
        else "check --bind: it must be an address of this machine"
    )
    return InvalidInput(
        f"port {port} ({option}) cannot be bound on {bind}: {why}; choose another with {option}", hint=hint
    )


def check_internal_ports(
    config: CloudConfig, chosen: Mapping[str, int], state_file: Path, running: Callable[[str], bool]
) -> None:
    """Refuse when a port an earlier `up` chose for this home (``chosen``, by name: a role's control
    port, ``worker_data``, ``controller``) is held by another process; a role of this home that still
    runs holds its own."""
    for name, port in chosen.items():
        kind = "worker" if name == "worker_data" else name
        if kind not in (*config.local_roles, "controller") or not port or running(kind):
            continue
        try:
            bind_listener(ListenerSpec(name, config.bind, int(port))).close()
        except OSError as exc:
            if exc.errno != errno.EADDRINUSE:
                continue  # the role says why when it binds
            what = {"controller": "the controller's port", "worker_data": "the worker's data port"}.get(
                name, f"the {name}'s control port"
            )
            raise InUse(
                f"port {port} ({what}, chosen by the first `up` on this home) is in use by another process",
                hint=f'stop that process, or remove "{name}" from "internal_ports" in {state_file} and '
                "`up` chooses a free port",
            ) from None
