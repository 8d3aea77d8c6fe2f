"""CPU time of a group of processes, read from /proc: what a server spends per request."""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["CpuMeter", "family"]

_TICK = os.sysconf("SC_CLK_TCK")


def _stat(pid: int) -> tuple[int, float] | None:
    """(parent pid, user + system seconds of it and of its children it has reaped) of ``pid``; None
    once it is gone. Reaped children count: a pool that replaces its workers (php-fpm's and php-cgi's
    max requests) would otherwise lose their time from the tally."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # The command name (field 2) may hold spaces and parentheses: split after its last ")".
    fields = text[text.rindex(")") + 2 :].split()
    return int(fields[1]), sum(int(f) for f in fields[11:15]) / _TICK


def family(pid: int) -> list[int]:
    """``pid`` and its descendants (a role's forked serving processes, nginx's workers)."""
    parents: dict[int, int] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            st = _stat(int(entry.name))
            if st is not None:
                parents[int(entry.name)] = st[0]
    found, todo = [pid], [pid]
    while todo:
        parent = todo.pop()
        kids = [p for p, pp in parents.items() if pp == parent]
        found += kids
        todo += kids
    return found


def _waited(pid: int) -> float:
    """Seconds ``pid``'s threads have spent runnable but waiting for a CPU (schedstat, field 2)."""
    waited = 0.0
    try:
        for task in Path(f"/proc/{pid}/task").iterdir():
            waited += int((task / "schedstat").read_text().split()[1]) / 1e9
    except (OSError, ValueError, IndexError):
        pass
    return waited


class CpuMeter:
    """CPU seconds of named groups of processes between ``start()`` and ``stop()``, and the seconds
    they waited for a CPU meanwhile (``waited``: how contended the box was for them)."""

    def __init__(self, groups: dict[str, list[int]]) -> None:
        # name -> root pids; a group is its roots and every process under them, found at start().
        self.groups = groups
        self._pids: dict[str, list[int]] = {}
        self._before: dict[str, float] = {}
        self._waited_before: dict[str, float] = {}
        self.waited: dict[str, float] = {}

    def _read(self) -> dict[str, float]:
        out: dict[str, float] = {}
        for name, pids in self._pids.items():
            out[name] = sum(st[1] for pid in pids if (st := _stat(pid)) is not None)
        return out

    def _read_waited(self) -> dict[str, float]:
        return {name: sum(_waited(pid) for pid in pids) for name, pids in self._pids.items()}

    def start(self) -> None:
        # A process counts once, in the first group that holds it (a role may be its starter's child).
        seen: set[int] = set()
        self._pids = {}
        for name, roots in self.groups.items():
            pids = {p for root in roots for p in family(root)} - seen
            seen |= pids
            self._pids[name] = sorted(pids)
        self._before = self._read()
        self._waited_before = self._read_waited()

    def stop(self) -> dict[str, float]:
        after = self._read()
        waited = self._read_waited()
        self.waited = {name: waited[name] - self._waited_before[name] for name in self._pids}
        return {name: after[name] - self._before[name] for name in self._pids}
