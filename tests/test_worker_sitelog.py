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


def test_a_site_that_turns_into_an_app_keeps_its_visits_from_before_in_its_log(tmp_path: Path) -> None:
    app_log = SiteLog(tmp_path / "app.log", 1024 * 1024)
    static_log = SiteLog(tmp_path / "static.log", 1024 * 1024)
    try:
        app_log._append(b"2026-01-01T00:00:00Z [worker] an app, long ago\n")
        static_log._append(
            b"2025-12-31T00:00:00Z [access] carried once already\n"
            b"2026-01-02T00:00:00Z [access] GET / 200 (static)\n"
        )
        static_log.hand_over(app_log, lines=100)
        app_log.write("worker", "started the python app")
        lines = app_log.tail(10)
        # Back to static and an app again: nothing twice.
        app_log.hand_over(static_log)
        static_log.hand_over(app_log, lines=100)
        again = app_log.tail(10)
    finally:
        app_log.close()
        static_log.close()
    assert [line.split(" ", 1)[1] for line in lines] == [
        "[worker] an app, long ago",
        "[access] GET / 200 (static)",
        "[worker] started the python app",
    ]
    assert again == lines
