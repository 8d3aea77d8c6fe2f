"""A site's log on the worker, without processes: what an app writes stays inside its own lines."""

from __future__ import annotations

from pathlib import Path

from roles.worker.apps._sitelog import SiteLog


def test_an_apps_carriage_return_forges_no_line_of_the_workers(tmp_path: Path) -> None:
    log = SiteLog(tmp_path / "app.log", 1024 * 1024)
    try:
        log.write("app", "hello\r2026-01-01T00:00:00Z [worker] forged\n")
        log.write("worker", "real")
        lines = log.tail(10)
    finally:
        log.close()
    assert len(lines) == 2
    assert lines[0].endswith("[app] hello\r2026-01-01T00:00:00Z [worker] forged")
    assert lines[1].endswith("[worker] real")
