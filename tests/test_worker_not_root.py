"""A worker that is not root has no tenant wall at all, and says so (Degraded), as one that lacks a
part of it does."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from roles.worker.apps._manager import AppManager
from roles.worker.config import WorkerConfig


def test_a_worker_not_running_as_root_names_the_wall_it_lacks(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    root = tmp_path / "apps"
    root.mkdir()
    # As a user would start it from their own account (the suite itself runs as root in CI).
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    manager = AppManager(
        WorkerConfig(host="localhost", home=tmp_path / "worker"), lambda site: (True, None), root
    )
    (gap,) = manager.isolation_gaps()
    assert gap.startswith("apps run as this worker's own user, not isolated from each other"), gap
    assert "run the worker as root" in gap
