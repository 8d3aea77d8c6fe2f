"""A small supervisor for one role process on a host without systemd.

``python -m roles.controller.hostagent [run] --config <role home>/role.json`` runs
``python -m roles.<kind> --config <role home>/role.json`` and keeps it running: a process that dies is
started again with back-off, SIGTERM is forwarded for a clean stop, and pid files and a status file in
the role home say what is going on. The controller drives it over SSH with the other actions:

- ``start``: start a detached agent (its own session) unless one already runs for this role;
- ``stop``: SIGTERM the agent (which stops the role) and wait; SIGKILL both after a bound;
- ``restart``: stop, then start, with the role's listeners handed from the old agent to the new one;
- ``status``: print the agent's and the role's state as JSON.

The agent holds the role's listening sockets (:mod:`shared.listeners`) for as long as it runs and
hands them to each role process it starts, so a role that dies or is restarted never leaves its port
free for another process to take. ``restart`` (also how an upgrade starts the new code) first takes the
listeners from the running agent over a unix socket (SCM_RIGHTS) and passes them to the new agent, so
they stay open throughout; a new agent that finds its role still running (its agent was killed)
adopts the role and takes the listeners back from it the same way.

Files in the role home: ``hostagent.pid``, ``role.pid``, ``hostagent.json`` (state, reason, restarts,
role pid), ``role.log`` (the role's output) and ``hostagent.log``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from types import FrameType
from typing import Any

from roles.controller._pids import STABLE_AFTER, cmdline, pid_alive
from shared.backoff import Backoff
from shared.files import atomic_write_json
from shared.listeners import ENV_HANDBACK, HeldListeners, child_env, inherited, listener_specs, serve_handback
from shared.logfile import ROLE_LOG_CHECK_EVERY, keep_bounded

__all__ = ["main"]

_STOP_TIMEOUT = 10.0
_RESTART = Backoff(first=0.5, cap=30.0)
_KIND = re.compile(r"^[a-z]{1,32}$")


class _Files:
    def __init__(self, config: Path) -> None:
        self.config = config.resolve()
        self.home = self.config.parent
        self.agent_pid = self.home / "hostagent.pid"
        self.role_pid = self.home / "role.pid"
        self.status = self.home / "hostagent.json"
        self.role_log = self.home / "role.log"
        self.agent_log = self.home / "hostagent.log"

    def kind(self) -> str:
        kind = json.loads(self.config.read_text()).get("role", "")
        if not isinstance(kind, str) or not _KIND.match(kind) or kind == "controller":
            raise SystemExit(f"{self.config}: not a role config (role={kind!r})")
        return kind

    def _pid_of(self, path: Path, marker: str) -> int | None:
        """The pid in ``path`` if that process is alive and is the one we started (not a reused pid)."""
        try:
            pid = int(path.read_text().strip())
        except (OSError, ValueError):
            return None
        if pid_alive(pid) and marker in cmdline(pid):
            return pid
        return None

    def running_agent(self) -> int | None:
        pid = self._pid_of(self.agent_pid, str(self.config))
        return pid if pid is not None and "roles.controller.hostagent" in cmdline(pid) else None

    def running_role(self) -> int | None:
        return self._pid_of(self.role_pid, str(self.config))


class _Agent:
    """The ``run`` action: supervise the role in the foreground until SIGTERM."""

    def __init__(self, files: _Files) -> None:
        self.files = files
        self.kind = files.kind()
        self.stopping = threading.Event()
        self.child: subprocess.Popen[bytes] | None = None
        # A role process left running by an agent that was killed, until it exits.
        self.adopted: int | None = None
        self.restarts = 0
        # Handed over by `restart` (from the agent before this one), else bound at the first spawn.
        self.listeners = HeldListeners(inherited())
        self.log_checked_at = 0.0  # when role.log's size was last looked at (monotonic)

    def log(self, message: str) -> None:
        stamp = time.strftime("%Y-%m-%d %H:%M:%S")
        with self.files.agent_log.open("a") as f:
            f.write(f"{stamp} hostagent[{os.getpid()}] {self.kind}: {message}\n")

    @property
    def role_pid(self) -> int | None:
        if self.child is not None:
            return self.child.pid
        return self.adopted

    def write_status(self, state: str, reason: str = "") -> None:
        atomic_write_json(
            self.files.status,
            {
                "kind": self.kind,
                "state": state,
                "reason": reason,
                "restarts": self.restarts,
                "agent_pid": os.getpid(),
                "role_pid": self.role_pid if state == "running" else None,
                "listeners": self.listeners.ports(),
                "since": time.time(),
            },
        )

    def on_signal(self, signum: int, frame: FrameType | None) -> None:
        self.stopping.set()
        child = self.child
        if child is not None and child.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                child.send_signal(signal.SIGTERM)
        elif self.adopted is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.adopted, signal.SIGTERM)

    def hold_listeners(self) -> None:
        """Bind what role.json asks for that is not held yet (the first start, a port that changed)."""
        try:
            bound = self.listeners.update(listener_specs(json.loads(self.files.config.read_text())))
        except (OSError, ValueError) as exc:
            # The role then binds what it can itself, as one started by hand would.
            self.log(f"cannot hold the listeners: {exc}")
            return
        if bound:
            self.log(f"holding listeners {self.listeners.ports()}")

    def spawn(self) -> subprocess.Popen[bytes]:
        argv = [sys.executable, "-m", f"roles.{self.kind}", "--config", str(self.files.config)]
        self.hold_listeners()
        listen_env, fds = self.listeners.child_env()
        with self.files.role_log.open("ab") as log:
            child = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=self.files.home,
                env={**os.environ, **listen_env, ENV_HANDBACK: "1", "PYTHONUNBUFFERED": "1"},
                pass_fds=fds,
            )
        self.child = child
        if self.stopping.is_set():  # SIGTERM arrived while it was being started
            child.send_signal(signal.SIGTERM)
        self.files.role_pid.write_text(f"{child.pid}\n")
        self.write_status("running")
        self.log(f"started {self.kind} (pid {child.pid})")
        return child

    def run(self) -> int:
        if self.files.running_agent() not in (None, os.getpid()):
            print(f"a hostagent already supervises {self.files.config}", file=sys.stderr)
            return 1
        self.files.agent_pid.write_text(f"{os.getpid()}\n")
        signal.signal(signal.SIGTERM, self.on_signal)
        signal.signal(signal.SIGINT, self.on_signal)
        self.adopt()
        # The same dict the agent updates: a successor always gets what is held now.
        serve_handback(self.listeners.socks, force=True)
        failures = 0  # restarts since the role last ran long enough to count as stable
        try:
            while not self.stopping.is_set():
                started = time.monotonic()
                if self.adopted is not None:
                    code: int | None = self.wait_adopted(self.adopted)
                else:
                    code = self.wait(self.spawn())
                if self.stopping.is_set():
                    break
                ran = time.monotonic() - started
                if ran >= STABLE_AFTER:
                    failures = 0
                backoff = _RESTART.delay(failures)
                self.restarts += 1
                how = f"exited with code {code}" if code is not None else "exited"
                reason = f"{how} after {ran:.1f}s; restarting in {backoff:.1f}s"
                self.write_status("failed", reason)
                self.log(reason)
                if self.stopping.wait(backoff):
                    break
                failures += 1
        finally:
            self.files.role_pid.unlink(missing_ok=True)
            self.files.agent_pid.unlink(missing_ok=True)
            self.child = None
            self.adopted = None
            self.listeners.close()
            self.write_status("stopped")
            self.log("stopped")
        return 0

    def adopt(self) -> None:
        """A role process still running from a killed agent: watch it rather than start a second one
        (which could not bind its ports), and take its listeners for the processes after it."""
        orphan = self.files.running_role()
        if orphan is None:
            return
        self.adopted = orphan
        if not self.listeners.socks:
            try:
                self.listeners.socks.update(HeldListeners.fetch(orphan, timeout=1.0).socks)
            except OSError as exc:
                self.log(f"the running {self.kind} (pid {orphan}) did not hand its listeners over: {exc}")
        self.write_status("running")
        self.log(f"adopted running {self.kind} (pid {orphan}), listeners {self.listeners.ports()}")

    def wait_adopted(self, pid: int) -> int | None:
        """Wait for an adopted role (not our child: polled); once stopping, the same bound as :meth:`wait`."""
        deadline: float | None = None
        while pid_alive(pid):
            self.bound_log()
            if self.stopping.is_set():
                if deadline is None:  # the signal may have come before the adoption
                    deadline = time.monotonic() + _STOP_TIMEOUT
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(pid, signal.SIGTERM)
                if time.monotonic() > deadline:
                    self.log(f"{self.kind} did not stop within {_STOP_TIMEOUT:.0f}s; killing it")
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(pid, signal.SIGKILL)
            time.sleep(0.05)
        self.adopted = None
        return None

    def bound_log(self) -> None:
        """Keep ``role.log`` to its bound (looked at every so often while the role runs)."""
        now = time.monotonic()
        if now < self.log_checked_at + ROLE_LOG_CHECK_EVERY:
            return
        self.log_checked_at = now
        try:
            if keep_bounded(self.files.role_log):
                self.log(f"role.log passed its bound: its earlier lines are in {self.files.role_log.name}.1")
        except OSError as exc:
            self.log(f"cannot keep role.log to its bound: {exc}")

    def wait(self, child: subprocess.Popen[bytes]) -> int:
        """Wait for the role to exit; once stopping, give it a bound to drain, then kill it."""
        while True:
            self.bound_log()
            try:
                return child.wait(timeout=0.5 if not self.stopping.is_set() else _STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                if self.stopping.is_set():
                    self.log(f"{self.kind} did not stop within {_STOP_TIMEOUT:.0f}s; killing it")
                    child.kill()
                    return child.wait()


def _status(files: _Files) -> dict[str, Any]:
    try:
        recorded: dict[str, Any] = json.loads(files.status.read_text())
    except (OSError, ValueError):
        recorded = {}
    agent, role = files.running_agent(), files.running_role()
    if agent is None:
        state, reason = "stopped", ""
    else:
        state, reason = str(recorded.get("state", "starting")), str(recorded.get("reason", ""))
    result: dict[str, Any] = {
        "state": state,
        "reason": reason,
        "restarts": int(recorded.get("restarts", 0)) if agent is not None else 0,
        "agent_pid": agent,
        "role_pid": role,
    }
    if agent is not None:
        result["listeners"] = dict(recorded.get("listeners") or {})
    return result


def _start(files: _Files, listeners: HeldListeners | None = None) -> dict[str, Any]:
    if files.running_agent() is None:
        files.kind()  # refuse a bad config before detaching anything
        listen_env, fds = child_env(listeners.socks) if listeners is not None else ({}, ())
        with files.agent_log.open("ab") as log:
            agent = subprocess.Popen(
                [sys.executable, "-m", "roles.controller.hostagent", "run", "--config", str(files.config)],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=files.home,
                env={**os.environ, **listen_env},
                pass_fds=fds,
                # Its own session: it outlives the SSH session that started it, and no hangup reaches it.
                start_new_session=True,
            )
        deadline = time.monotonic() + 10
        while files.running_agent() != agent.pid and time.monotonic() < deadline:
            if agent.poll() is not None:
                raise SystemExit(
                    f"hostagent exited at once with code {agent.returncode}; see {files.agent_log}"
                )
            time.sleep(0.02)
    return _status(files)


def _stop(files: _Files) -> dict[str, Any]:
    agent, role = files.running_agent(), files.running_role()
    if agent is not None:
        os.kill(agent, signal.SIGTERM)
    elif role is not None:
        # A role left running by an agent that was killed: stop it directly.
        os.kill(role, signal.SIGTERM)
    deadline = time.monotonic() + _STOP_TIMEOUT + 3
    pids = [p for p in (agent, role) if p is not None]
    while any(pid_alive(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(0.05)
    for pid in pids:
        if pid_alive(pid):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
    files.agent_pid.unlink(missing_ok=True)
    files.role_pid.unlink(missing_ok=True)
    return _status(files)


def _restart(files: _Files) -> dict[str, Any]:
    """Stop and start, holding the role's listeners in this process in between: taken from the
    running agent (or an orphaned role), handed to the new agent, so the ports are never free."""
    held: HeldListeners | None = None
    for pid in (files.running_agent(), files.running_role()):
        if pid is None:
            continue
        try:
            # Long running: one that does not answer at once predates held listeners.
            held = HeldListeners.fetch(pid, timeout=0.5)
            break
        except OSError as exc:
            # An agent from before listeners were held: a plain stop and start, as it always was.
            print(f"pid {pid} did not hand its listeners over: {exc}", file=sys.stderr)
    try:
        _stop(files)
        return _start(files, held)
    finally:
        if held is not None:
            held.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m roles.controller.hostagent")
    parser.add_argument(
        "action", nargs="?", default="run", choices=["run", "start", "stop", "restart", "status"]
    )
    parser.add_argument("--config", type=Path, required=True, help="the role.json the controller wrote")
    args = parser.parse_args(argv)
    files = _Files(args.config)
    if args.action == "run":
        return _Agent(files).run()
    if args.action == "start":
        result = _start(files)
    elif args.action == "stop":
        result = _stop(files)
    elif args.action == "restart":
        result = _restart(files)
    else:
        result = _status(files)
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
