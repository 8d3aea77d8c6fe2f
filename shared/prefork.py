"""Several serving processes for one data-plane role (front end, worker), on shared listeners.

With ``processes: N > 1`` the role's main process keeps the control plane (health, pushed config) and
starts N serving processes: the same ``python -m roles.<role> --config role.json`` with
``SITECLOUD_SERVING_PROCESS=<index>`` in their environment. They inherit the main process's data
listeners (the ones its supervisor holds, see :mod:`shared.listeners`) and all accept on them. Not
SO_REUSEPORT sockets of their own: a port open to SO_REUSEPORT lets another process of the same uid
bind beside it and take a share of the connections. The main process hands a new snapshot over as a
file in the role's own state directory and a SIGHUP; it restarts a serving process that dies and stops
them all (SIGTERM, then SIGKILL after the drain bound) when it stops.

A role that can run so describes its three process shapes as a :class:`PreforkedRole` (one process doing
everything, the main process, a serving process); :func:`shared.process.preforked_role_main` starts it
and the role's ``serve`` picks the shape: the role's own code never asks which process it is in.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import os
import signal
import socket
import subprocess
import sys
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Generic, TypeVar

from shared.config import ServingConfig
from shared.listeners import child_env, listener, listener_specs
from shared.logs import ContextLogger, get_logger

__all__ = [
    "PreforkedRole",
    "ServingProcesses",
    "reload_on_sighup",
    "serving_index",
    "strip_processes_flag",
    "take_processes_flag",
    "watch_parent",
]

_INDEX_ENV = "SITECLOUD_SERVING_PROCESS"
_PARENT_ENV = "SITECLOUD_SERVING_PARENT"
_COUNT_ENV = "SITECLOUD_PROCESSES"
# A serving process still draining this long after its drain bound is killed.
_STOP_GRACE = 2.0

S = TypeVar("S", bound=ServingConfig)


def serving_index() -> int | None:
    """This process's index among the serving processes, or None for a role's main process."""
    value = os.environ.get(_INDEX_ENV)
    return int(value) if value is not None and value.isdigit() else None


def take_processes_flag(configured: int) -> int:
    """``--processes N`` on the command line wins over the config's ``processes``.

    The flag is read before :func:`shared.process.role_main` parses ``--config`` (and taken out of
    ``sys.argv``); it reaches the role through the environment, read here and nowhere else.
    """
    value = os.environ.get(_COUNT_ENV)
    return max(1, int(value)) if value and value.isdigit() else max(1, configured)


def strip_processes_flag() -> None:
    """Called first thing in a data-plane role's ``__main__``: move ``--processes N`` to the environment."""
    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("--processes", type=int)
    args, rest = parser.parse_known_args(sys.argv[1:])
    if args.processes is not None:
        os.environ[_COUNT_ENV] = str(args.processes)
    sys.argv[1:] = rest


def reload_on_sighup(reload: Callable[[], Awaitable[None]]) -> Callable[[], None]:
    """In a serving process: run ``reload`` on every SIGHUP (the main process's word that it handed
    over something new), one at a time and in order, so an older handover never lands last.

    Returns what stops it again."""
    loop = asyncio.get_running_loop()
    lock = asyncio.Lock()
    pending: set[asyncio.Task[None]] = set()

    async def in_order() -> None:
        async with lock:
            await reload()

    def on_hup() -> None:
        task = loop.create_task(in_order())
        pending.add(task)
        task.add_done_callback(pending.discard)

    loop.add_signal_handler(signal.SIGHUP, on_hup)

    def stop() -> None:
        loop.remove_signal_handler(signal.SIGHUP)

    return stop


def watch_parent(stop: asyncio.Event) -> asyncio.Task[None]:
    """In a serving process: stop when the main process is gone (killed without a chance to stop us),
    so that no orphan goes on answering on the shared ports with an old config."""
    # From the environment, not getppid() now: the main process may already be gone by now.
    parent = int(os.environ.get(_PARENT_ENV) or os.getppid())

    async def watch() -> None:
        while not stop.is_set():
            if os.getppid() != parent:
                stop.set()
                return
            await asyncio.sleep(0.5)

    return asyncio.get_running_loop().create_task(watch())


class ServingProcesses:
    """The main process's view of its serving processes."""

    def __init__(self, config: ServingConfig, count: int, log: ContextLogger, *, stop_timeout: float) -> None:
        self._config = config
        self._count = count
        self._log = log
        self._stop_timeout = stop_timeout
        self._procs: list[subprocess.Popen[bytes] | None] = [None] * count
        self._watch: asyncio.Task[None] | None = None
        self._stopping = False
        self._listeners: dict[str, socket.socket] = {}

    @property
    def count(self) -> int:
        return self._count

    @property
    def pids(self) -> list[int]:
        return [p.pid for p in self._procs if p is not None and p.poll() is None]

    def _spawn(self, index: int) -> None:
        listen_env, fds = child_env(self._listeners)
        env = {**os.environ, **listen_env, _INDEX_ENV: str(index), _PARENT_ENV: str(os.getpid())}
        env.pop(_COUNT_ENV, None)
        config_file = Path(self._config.home) / "role.json"
        # Output goes where ours goes (the supervisor's log of this role).
        self._procs[index] = subprocess.Popen(
            [sys.executable, "-m", f"roles.{self._config.role}", "--config", str(config_file)],
            env=env,
            pass_fds=fds,
        )

    def start(self) -> None:
        # A serving process that gets SIGHUP before its handler is in would die of it; an ignored
        # signal stays ignored across exec, and the child reads the handed-over state once its
        # handler is in (so a reload in that window is not lost).
        signal.signal(signal.SIGHUP, signal.SIG_IGN)
        raw = {f.name: getattr(self._config, f.name) for f in dataclasses.fields(self._config)}
        for spec in listener_specs(raw):
            if spec.name not in ("control", "metrics"):  # the main process serves these itself
                self._listeners[spec.name] = listener(spec.name, spec.host, spec.port)
        for i in range(self._count):
            self._spawn(i)
        self._watch = asyncio.get_running_loop().create_task(self._supervise())

    async def _supervise(self) -> None:
        """Restart a serving process that exits while the role is up (with a pause, not in a loop)."""
        while not self._stopping:
            await asyncio.sleep(0.5)
            for i, proc in enumerate(self._procs):
                if proc is not None and proc.poll() is not None and not self._stopping:
                    self._log.warning(
                        "serving process %s (pid %s) exited with %s; restarting", i, proc.pid, proc.returncode
                    )
                    self._spawn(i)

    def reload(self) -> None:
        """Tell every serving process to read the handed-over state again."""
        for proc in self._procs:
            if proc is not None and proc.poll() is None:
                proc.send_signal(signal.SIGHUP)

    async def stop(self) -> None:
        self._stopping = True
        if self._watch is not None:
            self._watch.cancel()
        for proc in self._procs:
            if proc is not None and proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self._stop_timeout
        for proc in self._procs:
            if proc is None:
                continue
            try:
                await asyncio.to_thread(proc.wait, max(0.0, deadline - loop.time()))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        for sock in self._listeners.values():
            sock.close()
        self._listeners.clear()


@dataclass(frozen=True)
class PreforkedRole(Generic[S]):
    """The process shapes of a role that serves from one process or several.

    - ``single``: ``processes: 1``, one process does everything;
    - ``main``: the control plane, with the serving processes (not started yet: the role starts and
      stops them where its own order needs it);
    - ``serving``: a serving process (its index given); it stops, too, when the main process is gone.
    """

    single: Callable[[S, asyncio.Event], Coroutine[Any, Any, None]]
    main: Callable[[S, asyncio.Event, ServingProcesses], Coroutine[Any, Any, None]]
    serving: Callable[[S, asyncio.Event, int], Coroutine[Any, Any, None]]

    async def serve(self, config: S, stop: asyncio.Event) -> None:
        """Run the shape this process is started as, until ``stop`` is set."""
        index = serving_index()
        if index is not None:
            orphan_guard = watch_parent(stop)
            try:
                await self.serving(config, stop, index)
            finally:
                orphan_guard.cancel()
            return
        processes = take_processes_flag(config.processes)
        if processes == 1:
            await self.single(config, stop)
            return
        log = get_logger(config.role, host=config.host)
        children = ServingProcesses(config, processes, log, stop_timeout=config.drain_timeout + _STOP_GRACE)
        await self.main(config, stop, children)
