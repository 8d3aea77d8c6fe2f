"""The sandbox every app process runs in when the worker runs as root: bubblewrap and setpriv.

``bwrap`` (as root, no user namespace) gives the app namespaces of its own:

- network: its own loopback and nothing else; no host port, role or other site is reachable. The
  worker reaches it only through the unix listener it passes as fd 0;
- mount: a fresh root with the system read-only (``/usr``, ``/etc``, the lib and bin links, the
  Python the app runs under and our app server), the site's content read-only, its home and TMPDIR
  writable (a size-capped volume, see ``_volume.py``), private size-capped ``/tmp`` and ``/dev/shm``
  tmpfs (their pages count against the site's memory cgroup), its own ``/proc`` and a minimal ``/dev``;
- PID (plus IPC and UTS): bwrap's own init is pid 1 and reaps orphans; when the app's first process
  exits the kernel kills every process left in the namespace, double-forked and setsid or not.
  ``--die-with-parent`` ends the sandbox with the worker.

Paths stay what they are on the host (content root, HOME, TMPDIR), so the environment and php.ini
need no rewriting. Inside, util-linux ``setpriv`` drops to the site's uid with no groups, no
capabilities and no_new_privs before ``prlimit`` and the app. ``--block-fd`` holds the sandbox
before anything of the app runs, so the worker puts it in its cgroup first (no fork escapes it).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

from shared.logs import ContextLogger

__all__ = ["EGRESS_MODES", "Sandbox", "SandboxMounts", "read_info"]

_TOOLS = "/usr/bin:/bin:/usr/sbin:/sbin"
# Read-only as they are; the /bin, /sbin and /lib* links of a merged /usr are made as links.
_SYSTEM = ("/usr", "/etc", "/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32")
EGRESS_MODES = ("off", "slirp4netns")
INFO_TIMEOUT = 5.0


@dataclass(frozen=True, slots=True)
class SandboxMounts:
    """What one app sees besides the system: each path the same inside as on the host."""

    site_dir: str  # the site's content (every version and ``current``), read-only
    cwd: str
    home: tuple[str, str]  # (host source, path inside)
    tmp: tuple[str, str]
    read_only: tuple[str, ...] = ()  # e.g. the site's package directory
    tmpfs_bytes: int = 64 * 1024 * 1024  # each of /tmp and /dev/shm


@dataclass(frozen=True, slots=True)
class Sandbox:
    bwrap: str
    setpriv: str
    # Read-only paths every app needs beyond the system: its Python's prefixes, our app server.
    runtime_paths: tuple[str, ...]
    slirp4netns: str | None  # outbound internet through a user-mode NAT; None: no egress at all

    @classmethod
    def detect(
        cls, log: ContextLogger, *, python: str, appserver: str, egress: str, enabled: bool = True
    ) -> Sandbox | None:
        """The sandbox this worker can build; None (and one log line saying why) when it cannot."""
        if not enabled:
            log.warning("app sandbox: off in the worker's settings; apps share the host's network and /tmp")
            return None
        if os.geteuid() != 0:
            log.warning("app sandbox: the worker is not root; apps run unsandboxed as the worker's user")
            return None
        bwrap = shutil.which("bwrap", path=_TOOLS)
        setpriv = shutil.which("setpriv", path=_TOOLS)
        if bwrap is None or setpriv is None:
            log.warning(
                "app sandbox: %s missing (apt-get install bubblewrap util-linux); apps run with a uid "
                "and rlimits only",
                " and ".join(n for n, p in (("bwrap", bwrap), ("setpriv", setpriv)) if p is None),
            )
            return None
        slirp = None
        if egress == "slirp4netns":
            slirp = shutil.which("slirp4netns", path=_TOOLS)
            if slirp is None:
                log.warning("app sandbox: egress is slirp4netns but it is not installed; apps get no egress")
        log.info(
            "app sandbox: bwrap network, mount and pid namespaces; outbound internet %s",
            "through slirp4netns (no host loopback)" if slirp else "off",
        )
        return cls(bwrap, setpriv, _runtime_paths(python, appserver), slirp)

    def argv(self, mounts: SandboxMounts, *, uid: int, gid: int, block_fd: int, info_fd: int) -> list[str]:
        """bwrap and setpriv, to go before ``prlimit ... -- app``."""
        size = str(mounts.tmpfs_bytes)
        argv = [self.bwrap, "--unshare-net", "--unshare-pid", "--unshare-ipc", "--unshare-uts"]
        argv += ["--unshare-cgroup-try", "--die-with-parent", "--new-session", "--hostname", "app"]
        # /tmp first: content or homes may live under the host's /tmp, and binds go on top of it.
        argv += ["--perms", "1777", "--size", size, "--tmpfs", "/tmp"]  # noqa: S108 - the sandbox's own
        for path in _SYSTEM:
            if os.path.islink(path):
                argv += ["--symlink", os.readlink(path), path]
            elif os.path.isdir(path):
                argv += ["--ro-bind", path, path]
        argv += ["--proc", "/proc", "--dev", "/dev"]
        argv += ["--perms", "1777", "--size", size, "--tmpfs", "/dev/shm"]  # noqa: S108 - its own too
        binds = [(p, p, "--ro-bind") for p in self.runtime_paths]
        binds.append((mounts.site_dir, mounts.site_dir, "--ro-bind"))
        binds += [(p, p, "--ro-bind") for p in mounts.read_only]
        binds += [(source, inside, "--bind") for source, inside in (mounts.home, mounts.tmp)]
        made: set[str] = {"/", "/tmp"}  # noqa: S108 - the sandbox's tmpfs, made above
        bound: list[str] = []
        for source, inside, kind in binds:
            # bwrap makes missing parents 0700 (root's): the app could not pass them. Parents
            # inside an earlier bind are that bind's own (and may be read-only).
            for parent in reversed(Path(inside).parents):
                name = str(parent)
                if name not in made and not any(name.startswith(b + "/") or name == b for b in bound):
                    argv += ["--perms", "0755", "--dir", name]
                made.add(name)
            argv += [kind, source, inside]
            bound.append(inside)
        argv += ["--chdir", mounts.cwd, "--block-fd", str(block_fd), "--info-fd", str(info_fd), "--"]
        argv += [
            self.setpriv,
            f"--reuid={uid}",
            f"--regid={gid}",
            "--clear-groups",
            "--no-new-privs",
            "--inh-caps=-all",
            "--bounding-set=-all",
            "--",
        ]
        return argv

    async def start_egress(self, child_pid: int) -> asyncio.subprocess.Process:
        """slirp4netns on the sandbox's network namespace (a NAT in user space, on the host side):
        outbound connections only, and ``--disable-host-loopback`` keeps the host's 127.0.0.1 out
        of reach. The caller starts it beside the app, so the cold start does not wait for it."""
        assert self.slirp4netns is not None
        return await asyncio.create_subprocess_exec(
            self.slirp4netns,
            "--configure",
            "--mtu=65520",
            "--disable-host-loopback",
            "--enable-sandbox",
            "--enable-seccomp",
            str(child_pid),
            "tap0",
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.DEVNULL,
        )


def _runtime_paths(python: str, appserver: str) -> tuple[str, ...]:
    """The app's Python installation (the prefixes of the venv it may be, and of the Python that
    venv is made from) and our app server: read-only, unless /usr already holds them."""
    paths: list[str] = [appserver]
    if os.path.realpath(python) == os.path.realpath(sys.executable):
        paths += [sys.prefix, sys.base_prefix, sys.exec_prefix, sys.base_exec_prefix]
    else:
        # Another interpreter: its installation is two levels above the binary (<prefix>/bin/python).
        paths += [str(Path(python).parent.parent), str(Path(os.path.realpath(python)).parent.parent)]
    keep: list[str] = []
    for p in dict.fromkeys(os.path.realpath(p) for p in paths):
        if p == "/" or not os.path.isdir(p) or any(p == s or p.startswith(s + "/") for s in ("/usr", "/etc")):
            continue
        keep.append(p)
    return tuple(keep)


async def read_info(fd: int, timeout: float = INFO_TIMEOUT) -> int:
    """The host pid of the sandbox's pid 1, from bwrap's ``--info-fd`` JSON (ValueError: none came)."""
    loop = asyncio.get_running_loop()
    done: asyncio.Future[None] = loop.create_future()
    data = bytearray()

    def readable() -> None:
        try:
            chunk = os.read(fd, 4096)
        except BlockingIOError:
            return
        except OSError:
            chunk = b""
        data.extend(chunk)
        if (not chunk or data.rstrip().endswith(b"}")) and not done.done():
            done.set_result(None)

    os.set_blocking(fd, False)
    loop.add_reader(fd, readable)
    try:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(done, timeout)
    finally:
        loop.remove_reader(fd)
    try:
        pid = json.loads(bytes(data))["child-pid"]
    except (ValueError, KeyError, TypeError):
        raise ValueError("the sandbox did not start (its log says why)") from None
    if not isinstance(pid, int):
        raise ValueError("the sandbox reported no pid")
    return pid
