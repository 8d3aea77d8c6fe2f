"""Process set-up every role shares (shared/process.py)."""

from __future__ import annotations

import asyncio
import resource
import subprocess
import sys
from pathlib import Path

import pytest

from shared.config import ServingConfig
from shared.prefork import PreforkedRole, ServingProcesses


def test_a_role_takes_the_hard_open_files_limit() -> None:
    """A front end holds a descriptor per visitor: a soft limit of 1,024 would cap it at a thousand."""
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or hard <= 256:
        pytest.skip(f"the hard open-files limit here ({hard}) leaves nothing to raise to")
    code = (
        "import resource\n"
        "from shared.process import _raise_open_files_limit\n"
        f"resource.setrlimit(resource.RLIMIT_NOFILE, (256, {hard}))\n"
        "_raise_open_files_limit()\n"
        "print(resource.getrlimit(resource.RLIMIT_NOFILE)[0])\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert int(out) == hard


def _shape_picked(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, env: dict[str, str]) -> list[str]:
    """Which of a pre-forked role's shapes ``PreforkedRole.serve`` runs in a process with ``env``."""
    for name in ("SITECLOUD_SERVING_PROCESS", "SITECLOUD_SERVING_PARENT", "SITECLOUD_PROCESSES"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    picked: list[str] = []

    async def single(config: ServingConfig, stop: asyncio.Event) -> None:
        picked.append("single")

    async def main(config: ServingConfig, stop: asyncio.Event, children: ServingProcesses) -> None:
        picked.append(f"main of {children.count}")

    async def serving(config: ServingConfig, stop: asyncio.Event, index: int) -> None:
        picked.append(f"serving {index}")

    role = PreforkedRole(single=single, main=main, serving=serving)
    config = ServingConfig(role="worker", host="localhost", home=tmp_path, processes=1)
    asyncio.run(role.serve(config, asyncio.Event()))
    return picked


def test_a_preforked_role_runs_the_shape_its_process_is_started_as(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    assert _shape_picked(monkeypatch, tmp_path, {}) == ["single"]
    # --processes N (moved to the environment before --config is parsed) wins over the config's 1.
    assert _shape_picked(monkeypatch, tmp_path, {"SITECLOUD_PROCESSES": "3"}) == ["main of 3"]
    # A serving process is told its index by its main process; it never starts processes itself.
    assert _shape_picked(
        monkeypatch, tmp_path, {"SITECLOUD_SERVING_PROCESS": "2", "SITECLOUD_PROCESSES": "3"}
    ) == ["serving 2"]
