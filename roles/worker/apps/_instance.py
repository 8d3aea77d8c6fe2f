"""One running app process of a site: spawned, limited, its output logged, watched until it exits."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

from roles.worker.apps._cgroup import AppGroup, CgroupTree
from roles.worker.apps._isolation import SiteIdentity, lower_priority, rlimit_prefix, tree_usage
from roles.worker.apps._launch import LaunchPlan
from roles.worker.apps._sitelog import SiteLog
from roles.worker.apps._spec import AppLimits

__all__ = ["AppInstance"]

STOP_GRACE = 5.0


class AppInstance:
    """``address`` is what the proxy connects to: ``("unix", path)`` or ``("tcp", "127.0.0.1:port")``."""

    def __init__(
        self,
        *,
        plan: LaunchPlan,
        identity: SiteIdentity,
        limits: AppLimits,
        log: SiteLog,
        socket_path: Path,
        cgroup: AppGroup | None,
        on_exit: Callable[[AppInstance, int], None],
    ) -> None:
        self.plan = plan
        self.identity = identity
        self.limits = limits
        self.log = log
        self.cgroup = cgroup
        self._socket_path = socket_path
        self._on_exit = on_exit
        self._listener: socket.socket | None = None
        self.proc: subprocess.Popen[bytes] | None = None
        self._pidfd = -1
        self._pipe_done: asyncio.Future[None] | None = None
        self._reaped = asyncio.Event()
        self.started = time.monotonic()
        self.inflight = 0
        self.retiring = False
        self.stopping: str | None = None  # why the worker stopped it (idle, memory, ...), if it did
        self.cpu_seconds = 0.0
        self.rss = 0
        self.served = False

    @property
    def address(self) -> tuple[str, str]:
        if self.plan.listen == "unix":
            return "unix", str(self._socket_path)
        return "tcp", f"127.0.0.1:{self.plan.port}"

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None else None

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.returncode is None

    async def start(self) -> None:
        """Spawn it. ``subprocess`` rather than the loop's spawn: uvloop's cannot switch uid, group
        or umask, and stdlib's does it in C after fork without running Python (no preexec_fn)."""
        stdin = subprocess.DEVNULL
        if self.plan.listen == "unix":
            self._socket_path.unlink(missing_ok=True)
            self._listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            self._listener.bind(str(self._socket_path))
            self._listener.listen(256)
            stdin = self._listener.fileno()
        ident = self.identity
        try:
            argv = rlimit_prefix(self.limits, own_uid=ident.uid is not None) + self.plan.argv
            # Blocking for the fork and exec only (a millisecond); the loop's own spawn cannot set uids.
            self.proc = subprocess.Popen(  # noqa: ASYNC220
                argv,
                stdin=stdin,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                cwd=self.plan.cwd,
                env=self.plan.env,
                user=ident.uid,
                group=ident.gid,
                extra_groups=[] if ident.uid is not None else None,
                start_new_session=True,
                umask=0o077,
            )
        except BaseException:
            self._close_listener()
            raise
        pid = self.proc.pid
        lower_priority(pid)
        if self.cgroup is not None:
            try:
                CgroupTree.attach(self.cgroup, pid)
            except OSError as exc:
                self.log.write("worker", f"could not put the app in its cgroup ({exc}); stopping it")
                self.kill("limits")
        loop = asyncio.get_running_loop()
        assert self.proc.stdout is not None
        done: asyncio.Future[None] = loop.create_future()
        self._pipe_done = done
        await loop.connect_read_pipe(lambda: _LogPipe(self.log, done), self.proc.stdout)
        # A pidfd becomes readable when the process exits: no SIGCHLD handler, no thread.
        self._pidfd = os.pidfd_open(pid)
        loop.add_reader(self._pidfd, self._reap)

    async def wait_listening(self, timeout: float) -> bool:
        """For ``command`` apps: poll until something accepts on $PORT."""
        deadline = time.monotonic() + timeout
        delay = 0.005
        while self.alive and time.monotonic() < deadline:
            try:
                _, writer = await asyncio.open_connection("127.0.0.1", self.plan.port)
            except OSError:
                await asyncio.sleep(delay)
                delay = min(0.05, delay * 1.5)
                continue
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()
            return True
        return False

    def sample(self) -> tuple[int, float]:
        """(resident bytes, CPU seconds) now; also kept as the last known figures."""
        if self.cgroup is not None:
            self.rss = CgroupTree.memory_bytes(self.cgroup)
            self.cpu_seconds = CgroupTree.cpu_seconds(self.cgroup)
        elif self.alive and self.pid is not None:
            self.rss, cpu = tree_usage(self.pid)
            self.cpu_seconds = max(self.cpu_seconds, cpu)
        return self.rss, self.cpu_seconds

    def terminate(self, why: str) -> None:
        """Ask it to stop (SIGTERM to its process group), and kill it if it is still there later."""
        if not self.alive or self.proc is None:
            return
        self.stopping = self.stopping or why
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.proc.pid, signal.SIGTERM)
        asyncio.get_running_loop().call_later(STOP_GRACE, self.kill, why)

    def kill(self, why: str) -> None:
        if not self.alive or self.proc is None:
            return
        self.stopping = self.stopping or why
        if self.cgroup is not None:
            CgroupTree.kill(self.cgroup)
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.proc.pid, signal.SIGKILL)

    async def wait_closed(self) -> None:
        await self._reaped.wait()
        if self._pipe_done is not None:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.shield(self._pipe_done), 1)

    def _reap(self) -> None:
        assert self.proc is not None
        if self.proc.poll() is None:
            return
        loop = asyncio.get_running_loop()
        loop.remove_reader(self._pidfd)
        os.close(self._pidfd)
        self._pidfd = -1
        # The listener goes with the process: connections still queued on it are refused now.
        self._close_listener()
        self._reaped.set()
        self._on_exit(self, self.proc.returncode)

    def _close_listener(self) -> None:
        if self._listener is not None:
            self._listener.close()
            self._listener = None
            self._socket_path.unlink(missing_ok=True)


class _LogPipe(asyncio.Protocol):
    """The app's stdout and stderr (one pipe), line by line into its site log."""

    def __init__(self, log: SiteLog, done: asyncio.Future[None]) -> None:
        self._log = log
        self._done = done
        self._partial = b""

    def data_received(self, data: bytes) -> None:
        data = self._partial + data
        lines, sep, self._partial = data.rpartition(b"\n")
        if sep:
            self._log.write("app", lines.decode("utf-8", "replace"))
        if len(self._partial) > 16 * 1024:
            self._log.write("app", self._partial.decode("utf-8", "replace"))
            self._partial = b""

    def eof_received(self) -> bool | None:
        return None

    def connection_lost(self, exc: Exception | None) -> None:
        if self._partial:
            self._log.write("app", self._partial.decode("utf-8", "replace"))
        if not self._done.done():
            self._done.set_result(None)
