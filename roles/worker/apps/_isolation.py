"""Who a site's processes run as, where they may write, and what they may use.

When the worker runs as root each site incarnation gets a numeric uid/gid of its own from a range
(no /etc/passwd entries; the child gets it through setgroups/setgid/setuid in ``subprocess``). Its
content directory is ``root:<gid> 0750``, its home and temp directory are its own ``0700``, and the
apps root (the worker's home, or a directory of its own elsewhere: see ``roles/worker/_layout.py``) is
``0711`` with blobs, packs and trash ``0700``; keys, config and state stay ``0700``/``0600`` in the home, so a
site reads its own files and nobody else's. Not as root, apps run as the worker's user (no isolation; said once in the log).
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import resource
import shutil
import signal
import stat
from dataclasses import dataclass
from pathlib import Path

from roles.worker.apps._spec import AppLimits
from shared.contracts.fields import ContentId, UnixUid
from shared.errors import NotSupported
from shared.files import atomic_write_json, read_json

__all__ = [
    "Identities",
    "SiteIdentity",
    "harden_home",
    "lower_priority",
    "process_tree",
    "protect_site_dir",
    "reap_orphans",
    "rlimit_prefix",
    "set_rlimits",
    "tree_usage",
    "usable_by_others",
]

UID_BASE = 1_100_000
PAGE = os.sysconf("SC_PAGE_SIZE")
TICKS = os.sysconf("SC_CLK_TCK")


@dataclass(frozen=True, slots=True)
class SiteIdentity:
    # Short id for directory names; the Unix uid/gid when isolating (None: the worker's own).
    number: int
    unix_uid: UnixUid | None
    gid: int | None


# Site uids are one namespace per kernel: several workers (netns hosts, two clouds on one machine)
# share it, so isolating workers take numbers from this one registry, under a lock.
MACHINE_REGISTRY = Path("/var/lib/sitecloud/app-ids.json")


class Identities:
    """Numbers per site incarnation (by the site's immutable content id), persisted so files keep owners.

    Isolating (root) workers number sites in :data:`MACHINE_REGISTRY`, so one site has one uid on
    every worker of the machine and two sites never share one; others keep their own file.
    """

    def __init__(self, path: Path, *, isolate: bool, registry: Path = MACHINE_REGISTRY) -> None:
        self._path = registry if isolate else path
        self.isolate = isolate
        self._numbers: dict[str, int] = {}

    def _load(self) -> None:
        with contextlib.suppress(OSError, ValueError):
            self._numbers = {str(k): int(v) for k, v in read_json(self._path).items()}

    def owners(self) -> dict[int, str]:
        """Blocking: number -> the content id it was given to (every site numbered so far)."""
        self._load()
        return {number: content_id for content_id, number in self._numbers.items()}

    def get(self, content_id: ContentId) -> SiteIdentity:
        number = self._numbers.get(content_id)
        if number is None:
            self._path.parent.mkdir(parents=True, exist_ok=True)
            with open(self._path.with_suffix(".lock"), "a") as lock:
                fcntl.flock(lock, fcntl.LOCK_EX)
                self._load()  # another worker may have numbered sites since
                number = self._numbers.get(content_id)
                if number is None:
                    # Never reused: a number's files may outlive its site for a while.
                    number = max(self._numbers.values(), default=0) + 1
                    self._numbers[content_id] = number
                    atomic_write_json(self._path, self._numbers, mode=0o600)
        unix_uid = UID_BASE + number if self.isolate else None
        return SiteIdentity(number, unix_uid, unix_uid)


def reap_orphans(apps_dir: Path) -> int:
    """Kill app processes a worker that died hard left running; returns how many.

    Every app of a worker has its HOME under that worker's ``apps/`` directory, so the test picks
    exactly this worker's leftovers, and never the apps of another worker on the same kernel (a
    netns host) that serves the same site under the same uid.
    """
    prefix = f"{apps_dir}/".encode()
    killed = 0
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            if entry.stat().st_uid < UID_BASE:
                continue
            environ = (entry / "environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if any(v.startswith(b"HOME=" + prefix) for v in environ):
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(int(entry.name), signal.SIGKILL)
                killed += 1
    return killed


def harden_home(home: Path, root: Path) -> None:
    """The role home and the apps root as apps may see them: traverse only, nothing private readable.

    A home apps need not pass through (``root`` is elsewhere) is closed to them altogether."""
    # Search only: a site reaches its own directory.
    os.chmod(home, 0o711 if root == home else 0o700)
    os.chmod(root, 0o711)  # noqa: S103
    for path in (home / "tls", home / "state", root / "blobs", root / "packs", root / "trash"):
        with contextlib.suppress(FileNotFoundError):
            os.chmod(path, 0o700)
    for name in ("sites", "apps"):
        (root / name).mkdir(exist_ok=True)
        os.chmod(root / name, 0o711)  # noqa: S103 - search only, no listing
    for d in {home, root}:
        for entry in d.iterdir():
            if entry.is_file() and not entry.is_symlink():
                os.chmod(entry, entry.stat().st_mode & 0o700)


def protect_site_dir(site_dir: Path, version_root: str | None, gid: int | None) -> None:
    """Only the site's own group (and root) get into its content; the version inside is readable."""
    with contextlib.suppress(FileNotFoundError):
        if gid is not None:
            os.chown(site_dir, 0, gid)
            os.chmod(site_dir, 0o750)  # noqa: S103 - the site's own group only
        else:
            os.chmod(site_dir, 0o700 if os.geteuid() == 0 else 0o755)
        if version_root is not None:
            os.chmod(version_root, 0o755)  # noqa: S103 - behind the 0750 site directory


def usable_by_others(path: str, *, read: bool = False) -> bool:
    """Whether another uid can run ``path`` (or, with ``read``, list and read it): every directory on
    the way searchable, the path as given and where its symlinks lead."""
    need = stat.S_IXOTH | (stat.S_IROTH if read else 0)
    for p in dict.fromkeys((os.path.abspath(path), os.path.realpath(path))):
        try:
            if os.stat(p).st_mode & need != need:
                return False
            parent = os.path.dirname(p)
            while True:
                if not os.stat(parent).st_mode & stat.S_IXOTH:
                    return False
                if parent == "/":
                    break
                parent = os.path.dirname(parent)
        except OSError:
            return False
    return True


def _rlimits(limits: AppLimits, *, own_uid: bool, cgroup: bool) -> dict[str, int]:
    """An app's resource limits (soft = hard) by ``prlimit`` option name.

    RLIMIT_NPROC counts every process of the uid, so it is set only when the site has a uid of its own.
    With a cgroup holding memory and CPU, the address-space and CPU-time backstops are left off: they
    would only hurt (runtimes that reserve address space, such as Node and the JVM, fail to start under
    RLIMIT_AS, and an always-on app would be killed after its CPU seconds).
    """
    found = {"nofile": limits.nofile, "core": 0}
    if not cgroup:
        found["as"] = (limits.memory_mb * 2 + 256) * 1024 * 1024
        found["cpu"] = limits.cpu_seconds
    if own_uid:
        found["nproc"] = limits.nproc
    return found


_RESOURCES = {
    "nofile": resource.RLIMIT_NOFILE,
    "as": resource.RLIMIT_AS,
    "cpu": resource.RLIMIT_CPU,
    "core": resource.RLIMIT_CORE,
    "nproc": resource.RLIMIT_NPROC,
}


def rlimit_prefix(limits: AppLimits, *, own_uid: bool, cgroup: bool) -> list[str]:
    """The ``prlimit`` command that sets an app's limits on itself and then runs it.

    Limits cannot be set from outside on another uid's process without CAP_SYS_RESOURCE, and
    ``preexec_fn`` is unsafe in a threaded parent; util-linux's ``prlimit`` (one small exec, after
    the switch to the site's uid) lowers them in the process that becomes the app. (A sandboxed app
    gets them from :func:`set_rlimits` instead.)
    """
    prlimit = shutil.which("prlimit", path="/usr/bin:/bin:/usr/sbin:/sbin")
    if prlimit is None:
        raise NotSupported("this worker host has no prlimit", hint="install util-linux")
    argv = [prlimit]
    for name, value in _rlimits(limits, own_uid=own_uid, cgroup=cgroup).items():
        # CPU time: SIGXCPU at the soft limit, a few seconds to stop before SIGKILL at the hard one.
        argv.append(f"--{name}={value}:{value + 5 if name == 'cpu' else value}")
    return [*argv, "--"]


def set_rlimits(pid: int, limits: AppLimits, *, own_uid: bool, cgroup: bool) -> None:
    """Set an app's limits on ``pid``, from outside (the worker is root): the pid 1 of a sandbox, held
    on bwrap's block fd, so the app process it forks next starts with them, before any of its code
    runs. One exec fewer per start than ``prlimit`` inside the sandbox."""
    for name, value in _rlimits(limits, own_uid=own_uid, cgroup=cgroup).items():
        hard = value + 5 if name == "cpu" else value
        resource.prlimit(pid, _RESOURCES[name], (value, hard))


def lower_priority(pid: int) -> None:
    """Below the worker, so front-end traffic keeps its share when apps spin."""
    with contextlib.suppress(OSError):
        os.setpriority(os.PRIO_PROCESS, pid, 10)


def process_tree(pid: int) -> list[int]:
    """``pid`` and its live descendants (from /proc/<pid>/task/<tid>/children)."""
    seen: list[int] = []
    todo = [pid]
    while todo and len(seen) < 4096:
        p = todo.pop()
        seen.append(p)
        with contextlib.suppress(OSError, ValueError):
            for task in os.listdir(f"/proc/{p}/task"):
                with open(f"/proc/{p}/task/{task}/children") as f:
                    todo.extend(int(c) for c in f.read().split())
    return seen


def tree_usage(pid: int) -> tuple[int, float]:
    """(resident bytes, CPU seconds) of a process tree, the reaped children's CPU included."""
    rss, cpu = 0, 0.0
    tree = process_tree(pid)
    for p in tree:
        with contextlib.suppress(OSError, ValueError, IndexError):
            if len(tree) > 1:
                # Forked children share their parent's pages: proportional shares (PSS) add up
                # to what the tree holds, where summed RSS would count a page once per process.
                rss += _pss(p)
            else:
                with open(f"/proc/{p}/statm") as f:
                    rss += int(f.read().split()[1]) * PAGE
            with open(f"/proc/{p}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            # utime, stime, cutime, cstime are fields 14-17 (1-based), here 11-14 after the name.
            cpu += sum(int(x) for x in fields[11:15]) / TICKS
    return rss, cpu


def _pss(pid: int) -> int:
    with open(f"/proc/{pid}/smaps_rollup") as f:
        for line in f:
            if line.startswith("Pss:"):
                return int(line.split()[1]) * 1024
    return 0
