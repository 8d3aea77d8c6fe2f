"""Per-site cgroups for app processes, on cgroup v2 (a delegated subtree) and on cgroup v1.

One API and one set of logic; only the file names differ, so each version is a small table
(:class:`CgroupFiles`), and a site's group (:class:`AppGroup`) is one directory per controller (on v2
they are all the same directory).

- **v2** (what current distributions run): the worker's own cgroup ``<cg>`` must be delegated to it.
  The worker moves itself to ``<cg>/worker`` (a v2 cgroup with children may hold no processes) and
  makes ``<cg>/apps/<site>`` with ``memory.max``, ``memory.swap.max``, ``cpu.max`` and ``pids.max``.
- **v1**: per controller (memory, pids, cpu, cpuacct, freezer), a group
  ``<mount>/<worker's own path>/sitecloud-apps/<pid>.<token>/<site>``, with ``memory.limit_in_bytes``,
  ``memory.memsw.limit_in_bytes``, ``cpu.cfs_quota_us`` and ``pids.max``. The ``<pid>.<token>`` level
  keeps workers that share a cgroup (tests, several on one host) out of each other's groups, and tells a
  dead worker's leftovers apart. A v1 cgroup may hold processes beside child groups, so the worker
  stays where it is.

Memory covers tmpfs and shm too: their pages are charged to the memory cgroup of the process that
wrote them, so an app cannot hide memory in a tmpfs of its own mount namespace.
Without either version the worker falls back to rlimits.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import secrets
import signal
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from roles.worker.apps._spec import AppLimits
from shared.logs import ContextLogger

__all__ = ["V1", "V2", "AppGroup", "CgroupFiles", "CgroupTree"]

ROOT = Path("/sys/fs/cgroup")
_REQUIRED = ("memory", "cpu", "pids")
# v1 only: CPU seconds live in cpuacct, freezing in freezer; without them usage reads 0 and kill loops.
_OPTIONAL_V1 = ("cpuacct", "freezer")
CPU_PERIOD_US = 100_000
V1_DIR = "sitecloud-apps"
# How long kill() waits for a group to freeze; it kills what is listed even if freezing lags.
_FREEZE_WAIT = 0.5
_KILL_ROUNDS = 20
# cgroup v1: an app's TCP buffers may take this fraction of its memory limit, beside it. A quarter
# of a small app's 256 MB is 16 connections with full 4 MB buffers; 15 such apps stay well under
# the kernel's default tcp_mem pressure mark (about 6 % of RAM).
TCP_SHARE = 4


@dataclass(frozen=True, slots=True)
class CgroupFiles:
    """Where one cgroup version keeps each knob: ``(controller, file name)`` pairs, and the values
    that differ. The logic in :class:`CgroupTree` reads and writes only through this table."""

    version: int
    memory_limit: tuple[str, str]
    # v1's memsw limit counts memory plus swap (so it equals the memory limit); v2's counts swap alone.
    swap_limit: tuple[str, str]
    swap_counts_memory: bool
    memory_usage: tuple[str, str]
    memory_stat: tuple[str, str]
    inactive_file_key: str
    oom_events: tuple[str, str]
    # Failed charges, for a v1 kernel too old to count OOM kills (before 4.13): a hint, not a count.
    oom_fallback: tuple[str, str] | None
    pids_limit: tuple[str, str]
    pids_events: tuple[str, str]
    # v2: "quota period" in one file; v1: quota and period in two.
    cpu_quota: tuple[str, str]
    cpu_period: tuple[str, str] | None
    # (controller, file, key in a "key value" file or "" for a bare number, seconds per unit)
    cpu_usage: tuple[str, str, str, float]
    # (controller, file, frozen value, thawed value)
    freeze: tuple[str, str, str, str]
    kill_file: tuple[str, str] | None
    # v1 only: a cap on the group's TCP buffers, which v1 charges to no group until one is set
    # (v2 counts them in memory.max). None: they are in the memory limit already.
    tcp_limit: tuple[str, str] | None = None
    procs: str = "cgroup.procs"


V2 = CgroupFiles(
    version=2,
    memory_limit=("memory", "memory.max"),
    swap_limit=("memory", "memory.swap.max"),
    swap_counts_memory=False,
    memory_usage=("memory", "memory.current"),
    memory_stat=("memory", "memory.stat"),
    inactive_file_key="inactive_file",
    oom_events=("memory", "memory.events"),
    oom_fallback=None,
    pids_limit=("pids", "pids.max"),
    pids_events=("pids", "pids.events"),
    cpu_quota=("cpu", "cpu.max"),
    cpu_period=None,
    cpu_usage=("cpu", "cpu.stat", "usage_usec", 1e-6),
    freeze=("cgroup", "cgroup.freeze", "1", "0"),
    kill_file=("cgroup", "cgroup.kill"),
)

V1 = CgroupFiles(
    version=1,
    memory_limit=("memory", "memory.limit_in_bytes"),
    swap_limit=("memory", "memory.memsw.limit_in_bytes"),
    swap_counts_memory=True,
    memory_usage=("memory", "memory.usage_in_bytes"),
    memory_stat=("memory", "memory.stat"),
    inactive_file_key="total_inactive_file",
    oom_events=("memory", "memory.oom_control"),
    oom_fallback=("memory", "memory.failcnt"),
    pids_limit=("pids", "pids.max"),
    pids_events=("pids", "pids.events"),
    cpu_quota=("cpu", "cpu.cfs_quota_us"),
    cpu_period=("cpu", "cpu.cfs_period_us"),
    cpu_usage=("cpuacct", "cpuacct.usage", "", 1e-9),
    freeze=("freezer", "freezer.state", "FROZEN", "THAWED"),
    kill_file=None,
    tcp_limit=("memory", "memory.kmem.tcp.limit_in_bytes"),
)


@dataclass(frozen=True, slots=True)
class AppGroup:
    """One site's cgroup: its directory per controller (``"cgroup"`` is where cgroup.procs is
    read; v2 maps every controller to one directory)."""

    name: str
    files: CgroupFiles
    dirs: Mapping[str, Path]

    def file(self, where: tuple[str, str]) -> Path | None:
        base = self.dirs.get(where[0])
        return None if base is None else base / where[1]

    def unique_dirs(self) -> list[Path]:
        return list(dict.fromkeys(self.dirs.values()))


def _read_int(path: Path | None) -> int | None:
    if path is None:
        return None
    with contextlib.suppress(OSError, ValueError):
        return int(path.read_text().split()[0])
    return None


def _read_key(path: Path | None, key: str) -> int | None:
    """The number after ``key`` in a ``key value`` per line file (memory.events, pids.events...)."""
    if path is None:
        return None
    with contextlib.suppress(OSError, ValueError):
        for line in path.read_text().splitlines():
            name, _, value = line.partition(" ")
            if name == key:
                return int(value)
    return None


def _write(path: Path | None, value: str) -> None:
    if path is not None:
        path.write_text(value)


def _pids(path: Path | None) -> list[int]:
    if path is None:
        return []
    with contextlib.suppress(OSError, ValueError):
        return [int(p) for p in path.read_text().split()]
    return []


class CgroupTree:
    """Where this worker makes its sites' groups: ``bases`` maps each controller to its directory."""

    def __init__(self, files: CgroupFiles, bases: Mapping[str, Path], own: Path | None = None) -> None:
        self.files = files
        self.bases = dict(bases)
        # The group the worker itself is in (one hierarchy's), and the process that found it there.
        self._own = own
        self._owner = os.getpid()

    @classmethod
    def detect(cls, log: ContextLogger) -> CgroupTree | None:
        """The worker's tree, set up; None (and one log line saying why) when there is none."""
        if (ROOT / "cgroup.controllers").is_file():
            return cls._detect_v2(log)
        mounts = _v1_mounts(Path("/proc/self/mountinfo"))
        if not mounts:
            log.info("app limits: no cgroups here; using rlimits (memory: RLIMIT_AS and an RSS watch)")
            return None
        return cls._detect_v1(log, mounts, Path("/proc/self/cgroup"))

    @classmethod
    def _detect_v2(cls, log: ContextLogger) -> CgroupTree | None:
        available = (ROOT / "cgroup.controllers").read_text().split()
        if not all(c in available for c in _REQUIRED):
            log.info("app limits: cgroup v2 lacks %s; using rlimits", ", ".join(_REQUIRED))
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
            (base / "cgroup.subtree_control").write_text(" ".join(f"+{c}" for c in _REQUIRED))
            (base / "apps").mkdir(exist_ok=True)
            (base / "apps" / "cgroup.subtree_control").write_text(" ".join(f"+{c}" for c in _REQUIRED))
        except (OSError, StopIteration) as exc:
            log.info("app limits: cgroup v2 subtree is not delegated to the worker (%s); using rlimits", exc)
            return None
        # The subtree is this worker's alone: empty groups in it are a previous worker's.
        _remove_empty(base / "apps")
        log.info("app limits: cgroup v2 at %s", base / "apps")
        return cls(V2, dict.fromkeys((*_REQUIRED, "cgroup"), base / "apps"), base / "worker")

    @classmethod
    def _detect_v1(
        cls, log: ContextLogger, mounts: Mapping[str, tuple[Path, str]], proc_cgroup: Path
    ) -> CgroupTree | None:
        missing = [c for c in _REQUIRED if c not in mounts]
        if missing:
            log.info("app limits: cgroup v1 lacks %s; using rlimits", ", ".join(missing))
            return None
        own = _v1_own_paths(proc_cgroup)
        me = f"{os.getpid()}.{secrets.token_hex(4)}"
        bases: dict[str, Path] = {}
        home: Path | None = None
        try:
            for controller in (*_REQUIRED, *_OPTIONAL_V1):
                if controller not in mounts:
                    continue
                group = _v1_group_dir(*mounts[controller], own.get(controller, "/"))
                if group is None or not group.is_dir():
                    raise FileNotFoundError(
                        f"the worker's own {controller} group is not under {mounts[controller][0]}"
                    )
                home = home or group
                top = group / V1_DIR
                top.mkdir(exist_ok=True)
                _remove_dead_workers(top)
                (top / me).mkdir(exist_ok=True)
                bases[controller] = top / me
        except OSError as exc:
            log.info("app limits: cannot make cgroup v1 groups (%s); using rlimits", exc)
            for made in bases.values():
                with contextlib.suppress(OSError):
                    made.rmdir()
            return None
        bases["cgroup"] = bases["pids"]  # every process of the group is in its pids group
        lacking = [c for c in _OPTIONAL_V1 if c not in bases]
        log.info(
            "app limits: cgroup v1 at %s%s",
            bases["memory"],
            f" (no {', '.join(lacking)}: CPU seconds or freezing unavailable)" if lacking else "",
        )
        tree = cls(V1, bases, home)
        # A worker that exits leaves no empty level behind (one that dies hard: the next detect).
        atexit.register(tree.close)
        return tree

    def create(self, name: str, limits: AppLimits, *, boost: bool = False) -> AppGroup:
        """The app's group with its limits; ``boost`` lifts its CPU to at least a whole core until
        :meth:`settle` (a start's own CPU, not the app's steady state: see the manager)."""
        group = AppGroup(name, self.files, {c: base / name for c, base in self.bases.items()})
        for path in group.unique_dirs():
            path.mkdir(exist_ok=True)
        f = self.files
        memory = str(limits.memory_mb * 1024 * 1024)
        if f.swap_counts_memory:
            # memory+swap may never be below memory: lift it first, so a smaller limit on a reused
            # group is accepted, then pin it to the memory limit (no escape into swap).
            with contextlib.suppress(OSError):  # absent where swap accounting is off
                _write(group.file(f.swap_limit), "-1")
            _write(group.file(f.memory_limit), memory)
            with contextlib.suppress(OSError):
                _write(group.file(f.swap_limit), memory)
        else:
            _write(group.file(f.memory_limit), memory)
            with contextlib.suppress(OSError):
                _write(group.file(f.swap_limit), "0")
        if f.tcp_limit is not None:
            # Unset, an app's never-read loopback connections pin the host-wide TCP pool
            # (net.ipv4.tcp_mem), whose exhaustion fails every connection on the host. Set before
            # the app runs: a socket is charged to the group it was made in only once this is set.
            with contextlib.suppress(OSError):  # a kernel without it (removed upstream in time)
                _write(group.file(f.tcp_limit), str(limits.memory_mb * 1024 * 1024 // TCP_SHARE))
        quota = _cpu_quota(limits)
        _set_cpu(group, max(quota, CPU_PERIOD_US) if boost else quota)
        _write(group.file(f.pids_limit), str(limits.nproc))
        return group

    @staticmethod
    def settle(group: AppGroup, limits: AppLimits) -> None:
        """The plan's CPU limit again after a boosted start (a group already gone is left)."""
        with contextlib.suppress(OSError):
            _set_cpu(group, _cpu_quota(limits))

    def ready_attach(self) -> None:
        """Make the next attach fast: the first move into any cgroup after a quiet spell waits out
        an RCU grace period (~10 ms) to take the kernel's migration lock, the moves within about one
        grace period after it do not. So as a start begins, from a thread, this moves the worker to
        the group it is in already (nothing changes), and that wait overlaps the start's mounts
        instead of holding the app at its block fd."""
        if self._own is None or os.getpid() != self._owner:
            return  # a forked process: it may be elsewhere, and this must move nothing
        with contextlib.suppress(OSError):
            (self._own / self.files.procs).write_text(str(self._owner))

    @staticmethod
    def attach(group: AppGroup, pid: int) -> None:
        for path in CgroupTree.procs_files(group):
            path.write_text(str(pid))

    @staticmethod
    def procs_files(group: AppGroup) -> list[Path]:
        """The files a process writes its pid to, to join the group (one per directory)."""
        return [path / group.files.procs for path in group.unique_dirs()]

    @staticmethod
    def cpu_seconds(group: AppGroup) -> float:
        controller, name, key, unit = group.files.cpu_usage
        path = group.file((controller, name))
        value = _read_key(path, key) if key else _read_int(path)
        return (value or 0) * unit

    @staticmethod
    def memory_bytes(group: AppGroup) -> int:
        """Memory in use minus inactive page cache: the working set, as ``docker stats`` and the
        kubelet count it. Both versions' usage files include page cache, which the kernel reclaims
        before any OOM kill, so without this a site that reads many files would look close to its
        limit; tmpfs and anonymous memory, which cannot be reclaimed without swap, stay counted."""
        f = group.files
        usage = _read_int(group.file(f.memory_usage)) or 0
        inactive = _read_key(group.file(f.memory_stat), f.inactive_file_key) or 0
        return max(0, usage - inactive)

    @staticmethod
    def oom_kills(group: AppGroup) -> int:
        f = group.files
        kills = _read_key(group.file(f.oom_events), "oom_kill")
        if kills is None and f.oom_fallback is not None:
            return _read_int(group.file(f.oom_fallback)) or 0
        return kills or 0

    @staticmethod
    def pids_max_hits(group: AppGroup) -> int:
        """How often a fork failed on ``pids.max``."""
        return _read_key(group.file(group.files.pids_events), "max") or 0

    @staticmethod
    def pids(group: AppGroup) -> list[int]:
        return _pids(group.file(("cgroup", group.files.procs)))

    @staticmethod
    def kill(group: AppGroup) -> None:
        """SIGKILL every process in the group, including ones it forks meanwhile."""
        f = group.files
        kill_file = group.file(f.kill_file) if f.kill_file else None
        if kill_file is not None and kill_file.exists():
            with contextlib.suppress(OSError):
                kill_file.write_text("1")
                return
        # Frozen, nothing forks; SIGKILL lands as the group thaws.
        controller, name, frozen, thawed = f.freeze
        state = group.file((controller, name))
        froze = False
        if state is not None:
            with contextlib.suppress(OSError):
                state.write_text(frozen)
                froze = True
        try:
            deadline = time.monotonic() + _FREEZE_WAIT
            while froze and state is not None and time.monotonic() < deadline:
                with contextlib.suppress(OSError):
                    # v1 reads FREEZING until every task stopped; v2 has "frozen 1" in cgroup.events.
                    if f.version == 1 and state.read_text().strip() == frozen:
                        break
                    if f.version == 2 and _read_key(state.parent / "cgroup.events", "frozen") == 1:
                        break
                time.sleep(0.002)
            _kill_listed(CgroupTree.pids(group))
        finally:
            if froze and state is not None:
                with contextlib.suppress(OSError):
                    state.write_text(thawed)
        # Without a freezer (or if one raced us), kill until the group stays empty.
        for _ in range(_KILL_ROUNDS):
            left = CgroupTree.pids(group)
            if not left:
                return
            _kill_listed(left)
            time.sleep(0.002)

    @staticmethod
    def remove(group: AppGroup) -> bool:
        """Remove the group's directories; False if one is still busy (processes still in it)."""
        done = True
        for path in group.unique_dirs():
            try:
                path.rmdir()
            except FileNotFoundError:
                pass
            except OSError:
                done = False
        return done

    def close(self) -> None:
        """Remove this worker's own v1 level, once its sites' groups are gone."""
        if self.files.version == 1:
            for path in dict.fromkeys(self.bases.values()):
                _remove_empty(path)
                with contextlib.suppress(OSError):
                    path.rmdir()


def _cpu_quota(limits: AppLimits) -> int:
    return max(1000, CPU_PERIOD_US * limits.cpu_percent // 100)


def _set_cpu(group: AppGroup, quota: int) -> None:
    f = group.files
    if f.cpu_period is None:
        _write(group.file(f.cpu_quota), f"{quota} {CPU_PERIOD_US}")
    else:
        _write(group.file(f.cpu_period), str(CPU_PERIOD_US))
        _write(group.file(f.cpu_quota), str(quota))


def _kill_listed(pids: Iterable[int]) -> None:
    for pid in pids:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, signal.SIGKILL)


def _remove_empty(parent: Path) -> None:
    """rmdir each child group; the kernel refuses those that still hold processes or groups."""
    with contextlib.suppress(OSError):
        for child in parent.iterdir():
            if child.is_dir():
                with contextlib.suppress(OSError):
                    child.rmdir()


def _remove_dead_workers(top: Path) -> None:
    """Empty groups left by workers that are gone (``<pid>.<token>`` whose pid no longer runs)."""
    with contextlib.suppress(OSError):
        for level in top.iterdir():
            pid, dot, _ = level.name.partition(".")
            if not level.is_dir() or not dot or not pid.isdigit() or Path(f"/proc/{pid}").exists():
                continue
            _remove_empty(level)
            with contextlib.suppress(OSError):
                level.rmdir()


def _v1_mounts(mountinfo: Path) -> dict[str, tuple[Path, str]]:
    """Controller -> (mount point, the hierarchy's path mounted there) of each cgroup v1 hierarchy;
    co-mounted controllers share one. A container without a cgroup namespace mounts its own group
    (``/docker/<id>``) as the root, while /proc/self/cgroup still names the full path."""
    found: dict[str, tuple[Path, str]] = {}
    with contextlib.suppress(OSError):
        for line in mountinfo.read_text().splitlines():
            head, sep, tail = line.partition(" - ")
            fields, post = head.split(), tail.split()
            if not sep or len(fields) < 5 or len(post) < 3 or post[0] != "cgroup":
                continue
            mount = Path(fields[4].replace("\\040", " "))
            for option in post[2].split(","):
                if option in (*_REQUIRED, *_OPTIONAL_V1):
                    found.setdefault(option, (mount, fields[3]))
    return found


def _v1_group_dir(mount: Path, mounted: str, own: str) -> Path | None:
    """Where the group at hierarchy path ``own`` is, under a mount of hierarchy path ``mounted``."""
    rel = PurePosixPath(own).relative_to("/") if mounted == "/" else None
    if rel is None:
        try:
            rel = PurePosixPath(own).relative_to(mounted)
        except ValueError:
            return None  # our group is not visible in this mount
    return mount / rel


def _v1_own_paths(proc_cgroup: Path) -> dict[str, str]:
    """Controller -> this process's path in that hierarchy, from ``id:controllers:path`` lines."""
    own: dict[str, str] = {}
    with contextlib.suppress(OSError):
        for line in proc_cgroup.read_text().splitlines():
            parts = line.split(":", 2)
            if len(parts) == 3 and parts[1]:
                for controller in parts[1].split(","):
                    own[controller] = parts[2]
    return own
