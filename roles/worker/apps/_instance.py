"""One running app process of a site: spawned (in its sandbox where the worker can build one), limited,
its output logged, watched until it exits."""

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
from typing import cast

from roles.worker.apps._cgroup import AppGroup, CgroupTree
from roles.worker.apps._isolation import (
    SiteIdentity,
    lower_priority,
    process_tree,
    rlimit_prefix,
    set_rlimits,
    tree_usage,
)
from roles.worker.apps._launch import LaunchPlan
from roles.worker.apps._netns import AppPort, NetnsDialer
from roles.worker.apps._pipe import PipeReader
from roles.worker.apps._pool import IDLE_LIMIT, UpstreamPool
from roles.worker.apps._sandbox import Sandbox, SandboxMounts, egress_nofile, read_info
from roles.worker.apps._sitelog import SiteLog
from roles.worker.apps._spec import AppLimits
from shared.appsettings import loader_variable

__all__ = ["AppInstance", "Captured"]

STOP_GRACE = 5.0


class AppInstance:
    """``address`` is what the proxy connects to: ``("unix", path)``, ``("tcp", "127.0.0.1:port")``,
    or ``("netns", where)`` (:attr:`AppPort.where`) for a port in the app's own network namespace."""

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
        sandbox: Sandbox | None = None,
        mounts: SandboxMounts | None = None,
        serial: str = "",
        source: str = "app",
        capture: Captured | None = None,
        dialer: NetnsDialer | None = None,
    ) -> None:
        # Which start of which site this is (its socket's and cgroup's name).
        self.serial = serial
        # What its output lines are marked as in the site log, and where else they go (a command's).
        self.source = source
        self.capture = capture
        self.plan = plan
        self.identity = identity
        self.limits = limits
        self.log = log
        self.cgroup = cgroup
        self.sandbox = sandbox if mounts is not None and identity.unix_uid is not None else None
        self._mounts = mounts
        # The host pid of the sandbox's pid 1 (bwrap's reaper); the app is its child.
        self.init_pid: int | None = None
        self._app_pid: int | None = None
        self._egress: asyncio.subprocess.Process | None = None
        self._egress_task: asyncio.Task[None] | None = None
        self._egress_exit = -1
        self._socket_path = socket_path
        self._on_exit = on_exit
        self._listener: socket.socket | None = None
        self._dialer = dialer
        # Where it listens in its own network namespace ("netns" plans), once its sandbox is there.
        self.netns: AppPort | None = None
        self.proc: subprocess.Popen[bytes] | None = None
        self._pidfd = -1
        # The read end of its output pipe, ours until the reader takes it (see _pipe).
        self._out = -1
        self._output: PipeReader | None = None
        self._pipe_done: asyncio.Future[None] | None = None
        self._reaped = asyncio.Event()
        # Set when the platform's app server says it serves (its app module loaded): see wait_loaded.
        self._loaded = asyncio.Event()
        self.started = time.monotonic()
        self.inflight = 0
        self.retiring = False
        self.stopping: str | None = None  # why the worker stopped it (idle, memory, ...), if it did
        self.cpu_seconds = 0.0
        self.rss = 0
        self.tmpfs_bytes = 0  # its private /tmp and /dev/shm (memory, not disk)
        self.processes = 0
        self.pids_hits_seen = 0  # the cgroup's count of refused forks, as last logged
        self.at_pids_limit = False
        self.served = False
        # The content version its code was loaded from, as a front end keeps its answers by (set by
        # the manager; PHP's children take each request's script from its version instead).
        self.version_line = b""
        # The content version it was started on (set by the manager): kept on disk while it runs.
        self.version = 0
        # The version, entry and settings it was started with (the manager's: a newer one replaces it).
        self.generation: tuple[object, ...] = ()
        # This process's kept connections to the app.
        # php-cgi's children each hold one connection while it is open: no more open than they are.
        children = plan.env.get("PHP_FCGI_CHILDREN")
        self.pool = UpstreamPool(
            min(IDLE_LIMIT, max(4, limits.nofile // 4)), max_open=int(children) if children else None
        )

    @property
    def address(self) -> tuple[str, str]:
        if self.plan.listen == "unix":
            return "unix", str(self._socket_path)
        if self.netns is not None:
            return "netns", self.netns.where
        return "tcp", f"127.0.0.1:{self.plan.port}"

    @property
    def pid(self) -> int | None:
        """The app's own process (in a sandbox: the child of its pid 1, once it is there)."""
        if self.proc is None:
            return None
        if self.init_pid is None:
            return self.proc.pid
        if self._app_pid is None:
            path = f"/proc/{self.init_pid}/task/{self.init_pid}/children"
            with contextlib.suppress(OSError, ValueError, IndexError), open(path) as f:
                self._app_pid = int(f.read().split()[0])
        return self._app_pid

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.returncode is None

    async def start(self) -> None:
        """Spawn it. ``subprocess`` rather than the loop's spawn: uvloop's cannot switch uid, group
        or umask, and stdlib's does it in C after fork without running Python (no preexec_fn). A
        start that fails leaves nothing behind: see :meth:`_discard`."""
        loop = asyncio.get_running_loop()
        try:
            stdin = subprocess.DEVNULL
            if self.plan.listen == "unix":
                self._socket_path.unlink(missing_ok=True)
                self._listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                self._listener.bind(str(self._socket_path))
                self._listener.listen(256)
                stdin = self._listener.fileno()
            self._out, out_w = os.pipe()
            try:
                if self.sandbox is not None:
                    await self._spawn_sandboxed(stdin, out_w)
                else:
                    self._spawn(stdin, out_w)
            finally:
                os.close(out_w)
            assert self.proc is not None
            done: asyncio.Future[None] = loop.create_future()
            self._pipe_done = done
            out, self._out = self._out, -1
            self._output = PipeReader(
                out, _LogPipe(self.log, done, self.source, self.capture, loaded=self._loaded)
            )
            # A pidfd becomes readable when the process exits: no SIGCHLD handler, no thread.
            pidfd = os.pidfd_open(self.proc.pid)
            try:
                loop.add_reader(pidfd, self._reap)
            except BaseException:
                os.close(pidfd)
                raise
            self._pidfd = pidfd
        except BaseException:
            self._discard()
            raise

    def _discard(self) -> None:
        """Undo a start that failed part way: its processes (bwrap, its pid 1, the app, slirp4netns)
        killed and reaped, each descriptor it opened closed. Its cgroup and mounts are the caller's,
        which can remove them once nothing runs there."""
        # Egress under way is not cancelled (a task cancelled before it ran would keep its end of the
        # pipe open): with this end closed, slirp4netns ends, or starts and ends at once.
        if self._egress_exit >= 0:
            os.close(self._egress_exit)
            self._egress_exit = -1
        if self.proc is not None and self.proc.returncode is None:
            self.kill("start")
            self.proc.wait()  # killed: gone at once
        if self._pidfd >= 0:
            asyncio.get_running_loop().remove_reader(self._pidfd)
            os.close(self._pidfd)
            self._pidfd = -1
        if self._output is not None:
            self._output.close()
        if self._out >= 0:
            os.close(self._out)
            self._out = -1
        self._close_listener()
        self._close_netns()

    def _spawn(self, stdin: int, out: int) -> None:
        ident = self.identity
        argv = (
            rlimit_prefix(self.limits, own_uid=ident.unix_uid is not None, cgroup=self.cgroup is not None)
            + self.plan.argv
        )
        # Blocking for the fork and exec only (a millisecond); the loop's own spawn cannot set uids.
        self.proc = subprocess.Popen(
            argv,
            stdin=stdin,
            stdout=out,
            stderr=subprocess.STDOUT,
            cwd=self.plan.cwd,
            env=self._safe_env(),
            user=ident.unix_uid,
            group=ident.gid,
            extra_groups=[] if ident.unix_uid is not None else None,
            start_new_session=True,
            umask=0o077,
        )
        lower_priority(self.proc.pid)
        self._attach(self.proc.pid)

    def _safe_env(self) -> dict[str, str]:
        """The app's environment without loader variables: settings stored before they were refused
        must not reach a process that starts as root (bwrap, setpriv)."""
        return {key: value for key, value in self.plan.env.items() if not loader_variable(key)}

    async def _spawn_sandboxed(self, stdin: int, out: int) -> None:
        """bwrap holds the sandbox on ``--block-fd`` until its pids are in the site's cgroup and its
        pid 1 has the app's rlimits: the app cannot fork before it is counted, nor run unlimited.
        bwrap runs as root; setpriv drops to the site's uid. A start that fails kills bwrap before
        the block fd closes: bwrap takes its end of file for a go too."""
        assert self.sandbox is not None and self._mounts is not None
        ident = self.identity
        assert ident.unix_uid is not None and ident.gid is not None
        block_r, block_w = os.pipe()
        info_r, info_w = os.pipe()
        passed = [block_r, info_w]
        seccomp_fd = -1
        go = False
        try:
            if self.sandbox.seccomp:
                seccomp_fd = _memfd("seccomp", self.sandbox.seccomp)
                passed.append(seccomp_fd)
            argv = self.sandbox.argv(
                self._mounts,
                uid=ident.unix_uid,
                gid=ident.gid,
                block_fd=block_r,
                info_fd=info_w,
                seccomp_fd=seccomp_fd,
            )
            argv += self.plan.argv
            try:
                self.proc = subprocess.Popen(  # noqa: ASYNC220 - fork and exec only, as above
                    argv,
                    stdin=stdin,
                    stdout=out,
                    stderr=subprocess.STDOUT,
                    cwd="/",
                    env=self._safe_env(),
                    pass_fds=passed,
                    start_new_session=True,
                    umask=0o077,
                )
            finally:
                for fd in passed:
                    os.close(fd)
                passed.clear()
            try:
                self.init_pid = await read_info(info_r)
            except ValueError:
                raise OSError(f"its sandbox could not be built: {self._abandon()}") from None
            if self.plan.listen == "netns":
                self._join_netns(self.init_pid)
            # Before the block fd lets pid 1 fork the app: the app inherits them.
            try:
                set_rlimits(self.init_pid, self.limits, own_uid=True, cgroup=self.cgroup is not None)
            except ProcessLookupError:
                # pid 1 ended while bwrap built the rest of the sandbox (a bind it could not make):
                # nothing to limit, and its exit and bwrap's reason reach the site log as any exit's.
                pass
            except OSError as exc:
                self._abandon()
                raise OSError(f"could not set the app's limits: {exc}") from None
            for pid in (self.proc.pid, self.init_pid):
                lower_priority(pid)
            # Only now that bwrap has cloned pid 1 (its pid came on the info fd): bwrap's cgroup
            # namespace is rooted where bwrap was at the clone, so moving bwrap any earlier would race
            # it and the app would see its group's path one way or the other by timing.
            await self._attach_off_loop(self.init_pid, self.proc.pid)
            if self.sandbox.slirp4netns is not None:
                self._spawn_egress(self.init_pid)
            go = True
        except BaseException:
            if self.proc is not None:
                self._abandon()
            raise
        finally:
            for fd in passed:
                os.close(fd)  # (only if Popen was never reached)
            if go:
                with contextlib.suppress(OSError):
                    os.write(block_w, b"go")
            os.close(block_w)
            os.close(info_r)

    def _join_netns(self, init_pid: int) -> None:
        """Its namespace held open, and sockets made there while the app starts."""
        assert self._dialer is not None, "a netns plan needs the worker's dialer"
        try:
            self.netns = AppPort.of_pid(self._dialer, init_pid, self.plan.port)
        except OSError as exc:
            raise OSError(f"cannot reach its sandbox's network: {exc}; {self._abandon()}") from None
        self.netns.prepare()

    def _close_netns(self) -> None:
        if self.netns is not None:
            self.netns.close()

    def _abandon(self) -> str:
        """Kill and reap a sandbox that never came up; what bwrap said about it (once)."""
        assert self.proc is not None
        if self.proc.returncode is None:
            self.kill("start")
            self.proc.wait()  # a process that never ran the app: gone at once
        said: list[str] = []
        if self._out >= 0:
            said = _read_left(self._out).decode("utf-8", "replace").strip().splitlines()
            os.close(self._out)
            self._out = -1
        return said[-1] if said else "bwrap said nothing"

    def _spawn_egress(self, init_pid: int) -> None:
        assert self.sandbox is not None
        sandbox = self.sandbox
        # slirp4netns ends when this pipe's write end closes: at the app's exit, or with the worker.
        exit_r, self._egress_exit = os.pipe()
        procs = [str(p) for p in CgroupTree.procs_files(self.cgroup)] if self.cgroup is not None else []

        async def run() -> None:
            try:
                self._egress = await sandbox.start_egress(
                    init_pid, exit_r, nofile=egress_nofile(self.limits.nofile), cgroup_procs=procs
                )
                lower_priority(self._egress.pid)
            except OSError as exc:
                self.log.write("worker", f"no outbound network for this app: {exc}")
            finally:
                os.close(exit_r)

        # Beside the app's start, not before it: the cold start never waits for egress.
        self._egress_task = asyncio.get_running_loop().create_task(run())

    def _attach(self, pid: int) -> None:
        if self.cgroup is None:
            return
        try:
            CgroupTree.attach(self.cgroup, pid)
        except OSError as exc:
            self._not_attached(exc)

    async def _attach_off_loop(self, *pids: int) -> None:
        """From a thread: the first cgroup write of a start waits out an RCU grace period (~10 ms on
        cgroup v1), the ones right after it do not."""
        cgroup = self.cgroup
        if cgroup is None:
            return

        def attach() -> None:
            for pid in pids:
                CgroupTree.attach(cgroup, pid)

        try:
            await asyncio.to_thread(attach)
        except ProcessLookupError:
            pass  # it ended already (a sandbox bwrap could not finish): its exit says why
        except OSError as exc:
            self._not_attached(exc)

    def _not_attached(self, exc: OSError) -> None:
        self.log.write("worker", f"could not put the app in its cgroup ({exc}); stopping it")
        self.kill("limits")

    async def wait_loaded(self, timeout: float) -> bool:
        """For apps the platform's app server runs: whether it said it serves (``serving …``, once
        the site's module is imported) within ``timeout``; False as soon as the process is gone."""
        loaded = asyncio.ensure_future(self._loaded.wait())
        gone = asyncio.ensure_future(self._reaped.wait())
        try:
            await asyncio.wait((loaded, gone), timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
        finally:
            loaded.cancel()
            gone.cancel()
        return self._loaded.is_set() and self.alive

    async def wait_listening(self, timeout: float) -> bool:
        """For ``command`` apps: poll until something accepts on $PORT."""
        if self.netns is not None:
            return await self.netns.wait_listening(
                timeout, alive=lambda: self.alive, say=lambda line: self.log.write("worker", line)
            )
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
            # tmpfs pages are in memory.current already.
            self.rss = CgroupTree.memory_bytes(self.cgroup)
            self.cpu_seconds = CgroupTree.cpu_seconds(self.cgroup)
        elif self.alive and self.proc is not None:
            rss, cpu = tree_usage(self.proc.pid)
            self.cpu_seconds = max(self.cpu_seconds, cpu)
            # Without a memory cgroup, the private tmpfs is counted here, by the watch.
            self.tmpfs_bytes = self._tmpfs_used()
            self.rss = rss + self.tmpfs_bytes
        return self.rss, self.cpu_seconds

    def count_processes(self) -> int:
        """The app's tasks (threads too, as RLIMIT_NPROC and pids.max count them), the sandbox's
        own two processes (root's, not the site's) left out."""
        if not self.alive or self.proc is None:
            return 0
        tree = process_tree(self.proc.pid)[2 if self.init_pid is not None else 0 :]
        tasks = 0
        for pid in tree:
            with contextlib.suppress(OSError):
                tasks += len(os.listdir(f"/proc/{pid}/task"))
        self.processes = tasks
        return tasks

    def _tmpfs_used(self) -> int:
        if self.init_pid is None:
            return 0
        used = 0
        for path in ("tmp", "dev/shm"):
            with contextlib.suppress(OSError):
                st = os.statvfs(f"/proc/{self.init_pid}/root/{path}")
                used += (st.f_blocks - st.f_bfree) * st.f_frsize
        return used

    def terminate(self, why: str) -> None:
        """Ask it to stop (SIGTERM to its process group), and kill it if it is still there later."""
        if not self.alive or self.proc is None:
            return
        self.stopping = self.stopping or why
        self.pool.close()
        if self.init_pid is not None:
            # Not bwrap itself: it would die at once and take the sandbox with it (SIGKILL).
            for pid in process_tree(self.init_pid)[1:]:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.kill(pid, signal.SIGTERM)
        else:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.proc.pid, signal.SIGTERM)
        asyncio.get_running_loop().call_later(STOP_GRACE, self.kill, why)

    def kill(self, why: str) -> None:
        if not self.alive or self.proc is None:
            return
        self.stopping = self.stopping or why
        if self.cgroup is not None:
            CgroupTree.kill(self.cgroup)
        if self.init_pid is not None:
            # The end of a pid namespace's pid 1 ends every process in it.
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(self.init_pid, signal.SIGKILL)
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
        if self._egress_exit >= 0:
            os.close(self._egress_exit)  # slirp4netns, if any, goes with it
            self._egress_exit = -1
        # The listener goes with the process: connections still queued on it are refused now.
        self._close_listener()
        self.pool.close()
        self._close_netns()
        self._reaped.set()
        self._on_exit(self, self.proc.returncode)

    def _close_listener(self) -> None:
        if self._listener is not None:
            self._listener.close()
            self._listener = None
            self._socket_path.unlink(missing_ok=True)


def _read_left(fd: int) -> bytes:
    """What is in a pipe now, without waiting for its end (a sandbox's pid 1 may hold it a moment
    longer than bwrap, whose last words are there once it is reaped)."""
    os.set_blocking(fd, False)
    chunks: list[bytes] = []
    with contextlib.suppress(BlockingIOError):
        while chunk := os.read(fd, 65536):
            chunks.append(chunk)
    return b"".join(chunks)


def _memfd(name: str, data: bytes) -> int:
    """A file of ``data`` only in memory, read from its start by whoever it is passed to."""
    fd = os.memfd_create(name, os.MFD_CLOEXEC)
    try:
        os.write(fd, data)
        os.lseek(fd, 0, os.SEEK_SET)
    except BaseException:
        os.close(fd)
        raise
    return fd


# What an app may print, sustained and in a burst: reading its output costs the worker's CPU (shared
# by every site, outside the app's cgroup), so past this the worker stops reading for a while and
# the app's own writes block on the full pipe. About 2,000 log lines a second.
LOG_BYTES_PER_SECOND = 256 * 1024
LOG_BURST_BYTES = 1024 * 1024


class Captured:
    """A process's output kept as it comes (a command's, for whoever ran it), up to ``limit`` bytes:
    the start of it, the rest counted as cut."""

    __slots__ = ("data", "limit", "truncated")

    def __init__(self, limit: int) -> None:
        self.data = bytearray()
        self.limit = limit
        self.truncated = False

    def add(self, chunk: bytes) -> None:
        room = self.limit - len(self.data)
        if len(chunk) > room:
            self.truncated = True
            chunk = chunk[: max(room, 0)]
        self.data += chunk


# The line the platform's app server prints once the site's module is loaded (sitecloud_appserver).
_SERVING = b"\nserving "


class _LogPipe(asyncio.Protocol):
    """The app's stdout and stderr (one pipe), line by line into its site log, at most
    :data:`LOG_BYTES_PER_SECOND` (a token bucket; the pipe is paused while it is empty)."""

    def __init__(
        self,
        log: SiteLog,
        done: asyncio.Future[None],
        source: str = "app",
        capture: Captured | None = None,
        *,
        loaded: asyncio.Event | None = None,
    ) -> None:
        self._log = log
        self._done = done
        self._loaded = loaded
        self._source = source
        self._capture = capture
        self._partial = b""
        self._transport: asyncio.ReadTransport | None = None
        self._allowance = float(LOG_BURST_BYTES)
        self._counted_at = time.monotonic()
        self._resume: asyncio.TimerHandle | None = None
        self._told_at = -60.0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's pipe transport has the methods but not the class.
        self._transport = cast(asyncio.ReadTransport, transport)

    def _meter(self, size: int) -> None:
        now = time.monotonic()
        self._allowance = min(
            float(LOG_BURST_BYTES), self._allowance + (now - self._counted_at) * LOG_BYTES_PER_SECOND
        )
        self._counted_at = now
        self._allowance -= size
        if self._allowance >= 0 or self._transport is None or self._resume is not None:
            return
        self._transport.pause_reading()
        wait = -self._allowance / LOG_BYTES_PER_SECOND
        self._resume = asyncio.get_running_loop().call_later(wait, self._read_again)
        if now - self._told_at >= 60:
            self._told_at = now
            self._log.write(
                "worker",
                f"the app prints more than {LOG_BYTES_PER_SECOND // 1024} KB/s: its output is read at "
                "that rate, and its writes wait meanwhile",
            )

    def _read_again(self) -> None:
        self._resume = None
        if self._transport is not None and not self._transport.is_closing():
            self._transport.resume_reading()

    def data_received(self, data: bytes) -> None:
        self._meter(len(data))
        if self._capture is not None:
            # Whoever ran it gets its output; the site log only says that it ran. Past what is kept,
            # its pipe closes: it ends on EPIPE, as `cmd | head -c 1M` would, not at its time limit.
            self._capture.add(data)
            if self._capture.truncated and self._transport is not None:
                self._transport.close()
            return
        data = self._partial + data
        lines, sep, self._partial = data.rpartition(b"\n")
        if sep:
            loaded = self._loaded
            if loaded is not None and not loaded.is_set() and _SERVING in b"\n" + lines:
                loaded.set()
            self._log.write(self._source, lines.decode("utf-8", "replace"))
        if len(self._partial) > 16 * 1024:
            self._log.write(self._source, self._partial.decode("utf-8", "replace"))
            self._partial = b""

    def eof_received(self) -> bool | None:
        return None

    def connection_lost(self, exc: Exception | None) -> None:
        if self._resume is not None:
            self._resume.cancel()
            self._resume = None
        self._transport = None
        if self._partial:
            self._log.write(self._source, self._partial.decode("utf-8", "replace"))
        if not self._done.done():
            self._done.set_result(None)
