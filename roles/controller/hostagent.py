"""A small supervisor for one role process on a host without systemd.

``python -m roles.controller.hostagent [run] --config <role home>/role.json`` runs
``python -m roles.<kind> --config <role home>/role.json`` and keeps it running: a process that dies is
started again with back-off, SIGTERM is forwarded for a clean stop, and pid files and a status file in
the role home say what is going on. The controller drives it over SSH with the other actions:

- ``start``: start a detached agent (its own session) unless one already runs for this role;
- ``stop``: SIGTERM the agent (which stops the role) and wait; SIGKILL both after a bound;
- ``restart``: stop, then start;
- ``status``: print the agent's and the role's state as JSON.

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
from shared.files import atomic_write_json

__all__ = ["main"]

_STOP_TIMEOUT = 10.0
_MAX_BACKOFF = 30.0
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
        self.restarts = 0

    def log(self, message: str) -> None:
        stamp = time.strftime("%Y-%m-%d %H:%M:%S")
        with self.files.agent_log.open("a") as f:
            f.write(f"{stamp} hostagent[{os.getpid()}] {self.kind}: {message}\n")

    def write_status(self, state: str, reason: str = "") -> None:
        atomic_write_json(
            self.files.status,
            {
                "kind": self.kind,
                "state": state,
                "reason": reason,
                "restarts": self.restarts,
                "agent_pid": os.getpid(),
                "role_pid": self.child.pid if self.child is not None and state == "running" else None,
                "since": time.time(),
            },
        )

    def on_signal(self, signum: int, frame: FrameType | None) -> None:
        self.stopping.set()
        child = self.child
        if child is not None and child.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                child.send_signal(signal.SIGTERM)

    def spawn(self) -> subprocess.Popen[bytes]:
        argv = [sys.executable, "-m", f"roles.{self.kind}", "--config", str(self.files.config)]
        with self.files.role_log.open("ab") as log:
            child = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=self.files.home,
                env={**os.environ, "PYTHONUNBUFFERED": "1"},
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
        backoff = 0.5
        try:
            while not self.stopping.is_set():
                started = time.monotonic()
                child = self.spawn()
                code = self.wait(child)
                if self.stopping.is_set():
                    break
                ran = time.monotonic() - started
                if ran >= STABLE_AFTER:
                    backoff = 0.5
                self.restarts += 1
                reason = f"exited with code {code} after {ran:.1f}s; restarting in {backoff:.1f}s"
                self.write_status("failed", reason)
                self.log(reason)
                if self.stopping.wait(backoff):
                    break
                backoff = min(backoff * 2, _MAX_BACKOFF)
        finally:
            self.files.role_pid.unlink(missing_ok=True)
            self.files.agent_pid.unlink(missing_ok=True)
            self.child = None
            self.write_status("stopped")
            self.log("stopped")
        return 0

    def wait(self, child: subprocess.Popen[bytes]) -> int:
        """Wait for the role to exit; once stopping, give it a bound to drain, then kill it."""
        while True:
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
    return {
        "state": state,
        "reason": reason,
        "restarts": int(recorded.get("restarts", 0)) if agent is not None else 0,
        "agent_pid": agent,
        "role_pid": role,
    }


def _start(files: _Files) -> dict[str, Any]:
    if files.running_agent() is None:
        files.kind()  # refuse a bad config before detaching anything
        with files.agent_log.open("ab") as log:
            agent = subprocess.Popen(
                [sys.executable, "-m", "roles.controller.hostagent", "run", "--config", str(files.config)],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=files.home,
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
        _stop(files)
        result = _start(files)
    else:
        result = _status(files)
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
