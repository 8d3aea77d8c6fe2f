"""The hostagent keeps one role process running on a host without systemd: a real fileserver here."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from roles.fileserver.config import FileserverConfig
from tests.support import CloudPKI, call, wait_until


def _agent(action: str, config: Path) -> dict[str, Any]:
    out = subprocess.run(
        [sys.executable, "-m", "roles.controller.hostagent", action, "--config", str(config)],
        capture_output=True,
        text=True,
        check=True,
        timeout=30,
    ).stdout
    return dict(json.loads(out))


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


@pytest.fixture
def fileserver(pki: CloudPKI, tmp_path: Path) -> Iterator[FileserverConfig]:
    config = pki.role_config(FileserverConfig, "fileserver", tmp_path / "fileserver")
    try:
        yield config
    finally:
        _agent("stop", config.home / "role.json")


def _health(pki: CloudPKI, config: FileserverConfig) -> dict[str, Any]:
    status, body = call(f"https://localhost:{config.control_port}/v1/health", pki.client_ssl(), timeout=2)
    assert status == 200, body
    return dict(body)


def test_restarts_a_dead_role_and_stops_it_cleanly(pki: CloudPKI, fileserver: FileserverConfig) -> None:
    role_json = fileserver.home / "role.json"
    assert _agent("status", role_json)["state"] == "stopped"
    started = _agent("start", role_json)
    assert started["state"] in ("running", "starting") and started["agent_pid"]
    # Starting again adopts the agent that runs: still one of it.
    assert _agent("start", role_json)["agent_pid"] == started["agent_pid"]
    first = wait_until(lambda: _health(pki, fileserver), timeout=20, what="fileserver health")

    os.kill(first["pid"], signal.SIGKILL)
    second = wait_until(
        lambda: (h := _health(pki, fileserver))["pid"] != first["pid"] and h, timeout=20, what="a restart"
    )
    status = _agent("status", role_json)
    assert status["restarts"] == 1 and status["role_pid"] == second["pid"] and status["state"] == "running"
    assert "exited with code -9" in (fileserver.home / "hostagent.log").read_text()

    stopped = _agent("stop", role_json)
    assert stopped == {"state": "stopped", "reason": "", "restarts": 0, "agent_pid": None, "role_pid": None}
    assert not _alive(second["pid"]) and not _alive(started["agent_pid"])
    assert not (fileserver.home / "hostagent.pid").exists() and not (fileserver.home / "role.pid").exists()
    with pytest.raises(OSError):
        _health(pki, fileserver)


def test_sigterm_to_the_agent_drains_the_role(pki: CloudPKI, fileserver: FileserverConfig) -> None:
    role_json = fileserver.home / "role.json"
    agent = _agent("start", role_json)["agent_pid"]
    role = wait_until(lambda: _health(pki, fileserver), timeout=20, what="fileserver health")["pid"]
    os.kill(agent, signal.SIGTERM)
    wait_until(lambda: not _alive(agent) and not _alive(role), timeout=15, what="agent and role to exit")
    assert json.loads((fileserver.home / "hostagent.json").read_text())["state"] == "stopped"


def test_refuses_a_config_that_is_not_a_role(tmp_path: Path) -> None:
    bad = tmp_path / "role.json"
    bad.write_text(json.dumps({"role": "controller"}))
    result = subprocess.run(
        [sys.executable, "-m", "roles.controller.hostagent", "start", "--config", str(bad)],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode != 0 and "not a role config" in result.stderr
