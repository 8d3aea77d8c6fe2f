"""What a supervisor needs to know about a process it may not be the parent of."""

from __future__ import annotations

import os
from pathlib import Path

from roles.controller.fabric.base import RoleSpec

__all__ = ["STABLE_AFTER", "cmdline", "pid_alive", "running_role"]

# A process that stayed up this long is healthy again: its next crash restarts without delay.
STABLE_AFTER = 30.0


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie is dead for our purposes.
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        return stat.rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return True


def cmdline(pid: int) -> list[str]:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").split("\x00")
    except OSError:
        return []


def running_role(spec: RoleSpec) -> int | None:
    """The pid of the role process in ``spec``'s pid file, if it still runs with ``spec``'s config
    (a pid reused by some other process does not count)."""
    try:
        pid = int(spec.pid_file.read_text().strip())
    except (OSError, ValueError):
        return None
    if pid_alive(pid) and str(spec.config_file) in cmdline(pid):
        return pid
    return None
