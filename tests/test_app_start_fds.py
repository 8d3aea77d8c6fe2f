"""An app process's descriptors have one owner each, and a start that fails leaves nothing behind.

Straight on AppInstance, on uvloop as the worker runs, with a real process (unsandboxed: a plain
``sh``). Under cold-start churn, a descriptor closed twice by the worker closed whatever a thread had
opened in between (a cgroup file: "could not put the app in its cgroup ([Errno 9] Bad file
descriptor)"), and later a live transport's socket, and the next start failed with "File descriptor
N is used by transport"; that start then left its process running, unreaped.
"""

from __future__ import annotations

import asyncio
import io
import os
import subprocess
from pathlib import Path
from typing import Any

import pytest
import uvloop

from roles.worker.apps._instance import AppInstance
from roles.worker.apps._isolation import SiteIdentity
from roles.worker.apps._launch import LaunchPlan
from roles.worker.apps._sitelog import SiteLog
from roles.worker.apps._spec import AppLimits


def _instance(tmp_path: Path, script: str, exits: list[int], listen: str = "tcp") -> AppInstance:
    plan = LaunchPlan(
        argv=["/bin/sh", "-c", script], env={"PATH": "/usr/bin:/bin"}, cwd=str(tmp_path), listen=listen
    )
    return AppInstance(
        plan=plan,
        identity=SiteIdentity(1, None, None),
        limits=AppLimits(),
        log=SiteLog(tmp_path / "app.log", 1 << 20),
        socket_path=tmp_path / "app.sock",
        cgroup=None,
        on_exit=lambda _inst, code: exits.append(code),
    )


def _open_fds() -> set[int]:
    return {int(fd) for fd in os.listdir("/proc/self/fd")}


class _Opens(io.BufferedReader):
    """What a thread of the worker does at the worst moment: opens a file just as the app's output
    is closed. Were that output closed a second time, it would be this file that went."""

    opened: list[int] = []

    def close(self) -> None:
        if not self.closed:
            self.opened.append(os.open("/dev/null", os.O_RDONLY | os.O_CLOEXEC))
        super().close()


def test_the_apps_output_is_closed_once_and_a_file_opened_meanwhile_stays_open(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real_popen = subprocess.Popen

    def popen(*args: Any, **kwargs: Any) -> subprocess.Popen[bytes]:
        proc = real_popen(*args, **kwargs)
        if proc.stdout is not None:  # a pipe Popen made: whoever closes it goes through _Opens
            proc.stdout = _Opens(proc.stdout.detach())  # type: ignore[attr-defined]
        return proc

    monkeypatch.setattr(subprocess, "Popen", popen)
    _Opens.opened = []
    exits: list[int] = []

    async def run() -> set[int]:
        before = _open_fds()
        for _ in range(3):
            inst = _instance(tmp_path, "echo hi", exits)
            await inst.start()
            await asyncio.wait_for(inst.wait_closed(), 10)
        return before

    before = uvloop.run(run())
    for fd in _Opens.opened:
        os.fstat(fd)  # EBADF: the worker closed a number that was no longer the app's output
        os.close(fd)
    assert exits == [0, 0, 0]
    assert _open_fds() <= before
    assert (tmp_path / "app.log").read_text().count("[app] hi") == 3


def test_a_start_that_fails_after_the_spawn_kills_and_reaps_its_process_and_closes_all_it_opened(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """As the start that found its pidfd's number still taken by a transport failed."""

    def taken(pid: int, flags: int = 0) -> int:
        raise RuntimeError("File descriptor 106 is used by transport <UnixTransport closed=False>")

    exits: list[int] = []
    inst = _instance(tmp_path, "sleep 30", exits, listen="unix")

    async def run() -> set[int]:
        before = _open_fds()
        monkeypatch.setattr(os, "pidfd_open", taken)
        try:
            with pytest.raises(RuntimeError):
                await inst.start()
        finally:
            monkeypatch.undo()
        await asyncio.sleep(0)  # the output's end, told on the loop
        return before

    before = uvloop.run(run())
    assert inst.proc is not None and inst.proc.returncode == -9  # killed and reaped, not left running
    assert not (tmp_path / "app.sock").exists()
    assert _open_fds() <= before
    assert exits == []
