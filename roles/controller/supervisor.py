"""Keeps role processes on this machine running: start, restart with back-off, adopt, stop.

Role processes run in their own session, so they outlive a controller that crashes: the data plane
keeps serving. The next controller finds them by pid file and adopts them instead of starting again.

The supervisor holds the role's listening sockets (:mod:`shared.listeners`) from the first start to
the final stop and hands them to every process it starts, so a restart or an upgrade never frees a
port for another process to take; an adopted role hands them back over a unix socket.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import sys
import time
from pathlib import Path

from roles.controller._pids import STABLE_AFTER, pid_alive, running_role
from roles.controller.fabric._wheelhouse import code_hash
from roles.controller.fabric.base import RoleSpec
from shared.backoff import Backoff
from shared.listeners import ENV_HANDBACK, HeldListeners, listener_specs
from shared.logfile import ROLE_LOG_CHECK_EVERY, keep_bounded
from shared.logs import get_logger

__all__ = ["STOP_TIMEOUT", "RoleProcessSupervisor"]

# Seconds a role process has to stop on SIGTERM before it is killed (CloudConfig.role_stop_timeout).
STOP_TIMEOUT = 10.0
_RESTART = Backoff(first=0.5, cap=30.0)


class RoleProcessSupervisor:
    """One role process: ``python -m roles.<kind> --config <home>/role.json``."""

    def __init__(self, spec: RoleSpec, log_file: Path, *, stop_timeout: float = STOP_TIMEOUT) -> None:
        self.spec = spec
        self.log_file = log_file
        self._stop_timeout = stop_timeout
        self._pid_file = spec.pid_file
        self._proc: asyncio.subprocess.Process | None = None
        self._adopted_pid: int | None = None
        self._task: asyncio.Task[None] | None = None
        self._bounding: asyncio.Task[None] | None = None
        self._stopping = False
        self._listeners = HeldListeners()
        self.restarts = 0
        self.state = "stopped"
        self.reason = ""
        self._log = get_logger("controller", kind=spec.kind, host=spec.host)

    @property
    def argv(self) -> list[str]:
        return [sys.executable, "-m", f"roles.{self.spec.kind}", "--config", str(self.spec.config_file)]

    @property
    def pid(self) -> int | None:
        if self._proc is not None and self._proc.returncode is None:
            return self._proc.pid
        return self._adopted_pid

    def _running_orphan(self) -> int | None:
        """The pid of this role left running by an earlier controller, if there is one."""
        return running_role(self.spec)

    @property
    def listeners(self) -> dict[str, int]:
        """The ports this supervisor holds for the role, by listener name."""
        return self._listeners.ports()

    def _hold_listeners(self) -> None:
        """Bind what the role's config asks for that is not held yet (a first start, a changed port)."""
        try:
            specs = listener_specs(json.loads(self.spec.config_file.read_text()))
            bound = self._listeners.update(specs)
        except (OSError, ValueError) as exc:
            # The role then binds what it can itself, as one started by hand would.
            self._log.error("cannot hold the listeners of %s: %s", self.spec.kind, exc)
            return
        if bound:
            self._log.info("holding %s listeners %s", self.spec.kind, self._listeners.ports())

    async def _spawn(self) -> None:
        self.log_file.parent.mkdir(parents=True, exist_ok=True)
        # The checkout's code as the new process imports it (read before it starts).
        started_on = await asyncio.to_thread(code_hash)
        self._hold_listeners()
        listen_env, fds = self._listeners.child_env()
        with self.log_file.open("ab") as log:
            self._proc = await asyncio.create_subprocess_exec(
                *self.argv,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=log,
                stderr=log,
                env={
                    **os.environ,
                    **self.spec.env,
                    **listen_env,
                    ENV_HANDBACK: "1",
                    "PYTHONUNBUFFERED": "1",
                },
                start_new_session=True,
                pass_fds=fds,
            )
        self._adopted_pid = None
        self._pid_file.write_text(f"{self._proc.pid}\n")
        self.spec.code_file.write_text(f"{started_on}\n")
        self.state, self.reason = "running", ""

    async def _wait_exit(self) -> int | None:
        if self._proc is not None:
            return await self._proc.wait()
        # An adopted process is not our child: nothing to wait() on, so poll it.
        while self._adopted_pid is not None and pid_alive(self._adopted_pid):  # noqa: ASYNC110
            await asyncio.sleep(0.2)
        return None

    async def start(self) -> None:
        orphan = self._running_orphan()
        if orphan is not None:
            self._adopted_pid = orphan
            self.state, self.reason = "running", ""
            try:
                self._listeners = await asyncio.to_thread(HeldListeners.fetch, orphan)
            except OSError as exc:
                # An older role, or one started by hand: its next start binds anew (a moment with the
                # port free, as before listeners were held).
                self._log.warning(
                    "adopted %s (pid %d) did not hand its listeners over: %s", self.spec.kind, orphan, exc
                )
            self._log.info(
                "adopted running %s process %d, listeners %s", self.spec.kind, orphan, self._listeners.ports()
            )
        else:
            await self._spawn()
            self._log.info("started %s (pid %s)", self.spec.kind, self.pid)
        self._task = asyncio.create_task(self._watch(), name=f"supervise-{self.spec.kind}")
        if self._bounding is None:
            self._bounding = asyncio.create_task(self._bound_log(), name=f"bound-{self.spec.kind}-log")

    async def _bound_log(self) -> None:
        """Keep the role's output file to its bound for as long as the role is supervised here."""
        while True:
            await asyncio.sleep(ROLE_LOG_CHECK_EVERY)
            try:
                if await asyncio.to_thread(keep_bounded, self.log_file):
                    self._log.info(
                        "%s's log passed its bound: its earlier lines are in %s.1",
                        self.spec.kind,
                        self.log_file.name,
                    )
            except OSError as exc:
                self._log.warning("cannot keep %s to its bound: %s", self.log_file, exc)

    async def _watch(self) -> None:
        failures = 0  # restarts since the process last ran long enough to count as stable
        while not self._stopping:
            started = time.monotonic()
            code = await self._wait_exit()
            if self._stopping:
                break
            ran = time.monotonic() - started
            if ran >= STABLE_AFTER:
                failures = 0
            backoff = _RESTART.delay(failures)
            self.restarts += 1
            how = f"exited with code {code}" if code is not None else "exited"
            self.state, self.reason = "failed", f"{how}; restarting in {backoff:.1f}s (see {self.log_file})"
            self._log.warning(
                "%s %s after %.1fs; restart %d in %.1fs", self.spec.kind, how, ran, self.restarts, backoff
            )
            await asyncio.sleep(backoff)
            failures += 1
            if self._stopping:
                break
            try:
                await self._spawn()
            except OSError as exc:
                self.state, self.reason = "failed", f"cannot start: {exc}"

    async def _terminate(self) -> None:
        """End the role process (SIGTERM, SIGKILL after the bound) and its watch; keep the listeners."""
        self._stopping = True
        pid = self.pid
        if pid is not None and pid_alive(pid):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)
            deadline = time.monotonic() + self._stop_timeout
            while pid_alive(pid) and time.monotonic() < deadline:
                if self._proc is not None and self._proc.returncode is None:
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(self._proc.wait(), 0.1)
                else:
                    await asyncio.sleep(0.02)
            if pid_alive(pid):
                self._log.warning(
                    "%s did not stop within %gs; killing it", self.spec.kind, self._stop_timeout
                )
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
        if self._proc is not None and self._proc.returncode is None:
            await self._proc.wait()
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        self._adopted_pid = None

    async def restart(self) -> None:
        """Stop the role process and start a new one on the same listeners: connections that arrive
        in between wait in the listeners' backlog, and no other process can bind the ports."""
        await self._terminate()
        self._stopping = False
        await self._spawn()
        self._log.info("restarted %s (pid %s)", self.spec.kind, self.pid)
        self._task = asyncio.create_task(self._watch(), name=f"supervise-{self.spec.kind}")

    async def stop(self) -> None:
        """Stop for good: the role process, then its listeners."""
        await self._terminate()
        if self._bounding is not None:
            self._bounding.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._bounding
            self._bounding = None
        self._listeners.close()
        self._pid_file.unlink(missing_ok=True)
        self.state, self.reason = "stopped", ""
