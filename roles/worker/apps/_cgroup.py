"""cgroup v2 limits for app processes, where the host delegates a writable subtree to the worker.

Layout under the worker's own cgroup ``<cg>``: the worker moves itself to ``<cg>/worker`` (a cgroup
with children may hold no processes) and makes ``<cg>/apps/<site id>`` per site, with ``memory.max``,
``memory.swap.max``, ``cpu.max`` and ``pids.max``. Without it the worker falls back to rlimits.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

from roles.worker.apps._spec import AppLimits
from shared.logs import ContextLogger

__all__ = ["CgroupTree"]

ROOT = Path("/sys/fs/cgroup")
_CONTROLLERS = ("memory", "cpu", "pids")
CPU_PERIOD_US = 100_000


class CgroupTree:
    def __init__(self, apps: Path) -> None:
        self.apps = apps

    @classmethod
    def detect(cls, log: ContextLogger) -> CgroupTree | None:
        """The delegated tree, set up; None (and one log line saying why) when there is none."""
        try:
            available = (ROOT / "cgroup.controllers").read_text().split()
        except OSError:
            log.info("app limits: no cgroup v2 here; using rlimits (memory: RLIMIT_AS and an RSS watch)")
            return None
        if not all(c in available for c in _CONTROLLERS):
            log.info("app limits: cgroup v2 lacks %s; using rlimits", ", ".join(_CONTROLLERS))
            return None
        try:
            own = next(
                line.split("::", 1)[1].strip()
                for line in Path("/proc/self/cgroup").read_text().splitlines()
                if line.startswith("0::")
            )
            base = ROOT / own.lstrip("/")
            if base.name == "worker" and (base.parent / "apps").is_dir():
                base = base.parent  # a restarted worker that set this up before
            (base / "worker").mkdir(exist_ok=True)
            (base / "worker" / "cgroup.procs").write_text(str(os.getpid()))
            (base / "cgroup.subtree_control").write_text(" ".join(f"+{c}" for c in _CONTROLLERS))
            (base / "apps").mkdir(exist_ok=True)
            (base / "apps" / "cgroup.subtree_control").write_text(" ".join(f"+{c}" for c in _CONTROLLERS))
        except (OSError, StopIteration) as exc:
            log.info("app limits: cgroup v2 subtree is not delegated to the worker (%s); using rlimits", exc)
            return None
        log.info("app limits: cgroup v2 at %s", base / "apps")
        return cls(base / "apps")

    def create(self, name: str, limits: AppLimits) -> Path:
        group = self.apps / name
        group.mkdir(exist_ok=True)
        (group / "memory.max").write_text(str(limits.memory_mb * 1024 * 1024))
        with contextlib.suppress(OSError):
            (group / "memory.swap.max").write_text("0")
        quota = max(1000, CPU_PERIOD_US * limits.cpu_percent // 100)
        (group / "cpu.max").write_text(f"{quota} {CPU_PERIOD_US}")
        (group / "pids.max").write_text(str(limits.nproc))
        return group

    @staticmethod
    def attach(group: Path, pid: int) -> None:
        (group / "cgroup.procs").write_text(str(pid))

    @staticmethod
    def cpu_seconds(group: Path) -> float:
        with contextlib.suppress(OSError, ValueError):
            for line in (group / "cpu.stat").read_text().splitlines():
                if line.startswith("usage_usec "):
                    return int(line.split()[1]) / 1e6
        return 0.0

    @staticmethod
    def memory_bytes(group: Path) -> int:
        with contextlib.suppress(OSError, ValueError):
            return int((group / "memory.current").read_text())
        return 0

    @staticmethod
    def oom_kills(group: Path) -> int:
        with contextlib.suppress(OSError, ValueError):
            for line in (group / "memory.events").read_text().splitlines():
                if line.startswith("oom_kill "):
                    return int(line.split()[1])
        return 0

    @staticmethod
    def kill(group: Path) -> None:
        with contextlib.suppress(OSError):
            (group / "cgroup.kill").write_text("1")
