"""What `sitecloud up` checks before it starts anything: that no other controller runs on its home,
and that the public ports it was given are free.

Either failure used to show only once the roles were starting: a traceback from the controller's own
listener, or roles restarted for ever on a port someone else holds.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
from collections.abc import Callable, Iterator
from pathlib import Path

from roles.controller.config import CloudConfig
from shared.errors import InUse, InvalidInput
from shared.listeners import ListenerSpec, bind_listener

__all__ = ["PUBLIC_PORTS", "check_public_ports", "hold_home"]

# The ports people and other machines use, by the role that listens on them: `up`'s option for each
# and the CloudConfig field it sets.
PUBLIC_PORTS: dict[str, tuple[tuple[str, str], ...]] = {
    "frontend": (("--http-port", "http_port"), ("--https-port", "https_port")),
    "publisher": (("--ftp-port", "ftp_port"), ("--deploy-port", "deploy_port")),
    "management": (("--api-port", "api_port"),),
}


@contextlib.contextmanager
def hold_home(home: Path) -> Iterator[None]:
    """Hold ``HOME/controller.pid`` (with this pid in it) while the body runs; refuse if another
    process holds it.

    An flock rather than the pid alone: the kernel drops it when its holder dies, so a controller
    killed with SIGKILL leaves no lock behind and the next `up` adopts its roles. The descriptor is
    not inherited (Python's default), so the role processes, which outlive the controller, never hold it.
    """
    home.mkdir(parents=True, exist_ok=True)
    path = home / "controller.pid"
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as exc:
        raise InvalidInput(
            f"cannot open {path}: {exc.strerror}", hint="check the home's owner and mode"
        ) from None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            pid = os.pread(fd, 32, 0).decode(errors="replace").strip()
            raise InUse(
                f"a cloud is already running on this home ({home}, pid {pid or 'unknown'}); stop it first",
                hint=f"Ctrl-C where that `sitecloud up` runs, or `kill {pid}`" if pid else None,
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        try:
            yield
        finally:
            # Emptied, not removed: an `up` that opened it just before a removal would lock the
            # removed file while the next one locks a new file.
            os.ftruncate(fd, 0)
    finally:
        os.close(fd)


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
