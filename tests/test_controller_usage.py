"""Usage reports from front ends: summed per site and day, repeats of one report counted once."""

from __future__ import annotations

import datetime as dt
import threading
import time
from pathlib import Path

import pytest

from roles.controller._usage import UsageBook
from shared.db import Database, SiteUsage, again_on_conflict, usage_day
from shared.errors import InvalidInput


def _book(tmp_path: Path) -> tuple[Database, UsageBook]:
    db = Database.sqlite(tmp_path / "runtime.db")
    db.migrate()
    return db, UsageBook(db)


def _report(rid: str, **sites: tuple[int, int, int]) -> dict[str, object]:
    now = time.time()
    return {
        "id": rid,
        "role": "frontend",
        "from": now - 30,
        "to": now,
        "sites": {n: {"requests": r, "bytes_in": i, "bytes_out": o} for n, (r, i, o) in sites.items()},
    }


def test_reports_add_up_and_a_resent_report_counts_once(tmp_path: Path) -> None:
    db, book = _book(tmp_path)
    assert book.record(_report("a1", blog=(3, 300, 3000), shop=(1, 10, 100)))
    assert book.record(_report("a2", blog=(2, 200, 2000)))
    assert not book.record(_report("a1", blog=(3, 300, 3000), shop=(1, 10, 100)))
    with db.session() as s:
        rows = {u.site: (u.requests, u.bytes_in, u.bytes_out) for u in s.query(SiteUsage)}
    assert rows == {"blog": (5, 500, 5000), "shop": (1, 10, 100)}


def test_concurrent_reports_for_one_site_are_all_counted(tmp_path: Path) -> None:
    db, book = _book(tmp_path)
    threads = [
        threading.Thread(target=book.record, args=(_report(f"r{i}", blog=(1, 1, 1)),)) for i in range(8)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    with db.session() as s:
        assert s.query(SiteUsage).one().requests == 8


@pytest.mark.parametrize(
    "bad",
    [
        {"sites": {}},
        {"id": "x", "to": "soon", "sites": {}},
        {"id": "x", "to": 1.0, "sites": {"Bad Name": {"requests": 1}}},
        {"id": "x", "to": 1.0, "sites": {"blog": {"requests": -1}}},
    ],
)
def test_malformed_reports_are_refused(tmp_path: Path, bad: dict[str, object]) -> None:
    _, book = _book(tmp_path)
    with pytest.raises(InvalidInput):
        book.record(bad)


def test_a_usage_day_that_another_process_added_first_is_added_to_not_lost(tmp_path: Path) -> None:
    # The controller (usage reports) and management (storage) add a site's day from two processes,
    # each under a lock of its own: the one that loses the race to insert the row tries again.
    controller, _ = _book(tmp_path)
    management = Database(controller.url)
    day = dt.date(2026, 12, 5)
    tries = 0

    def note_storage() -> None:
        nonlocal tries
        tries += 1
        with management.session() as s:
            row = usage_day(s, "blog", day)  # none yet: a new row, inserted at commit
            if tries == 1:
                # The other process adds the day between this one's look and its insert.
                with controller.session() as other:
                    usage_day(other, "blog", day).requests += 7
            row.storage_bytes = 1234

    try:
        again_on_conflict(note_storage)
        assert tries == 2
        with controller.session() as s:
            row = s.get(SiteUsage, ("blog", day))
            assert row is not None and (row.requests, row.storage_bytes) == (7, 1234)
    finally:
        management.dispose()
        controller.dispose()
