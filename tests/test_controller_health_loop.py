"""The controller's health loop outlives a pass that fails (the runtime DB down or locked).

Before, an exception from recording what the loop saw ended the task for good: `role list` then said
every role was Unknown ("is the controller running?") while the controller ran, and nothing was
revived or routed around any more, also after the DB came back.
"""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

import pytest

from roles.controller.config import CloudConfig
from roles.controller.controller import Controller


def test_a_failing_record_does_not_end_the_health_loop(tmp_path: Path) -> None:
    controller = Controller(CloudConfig(home=tmp_path / "home", health_interval=0.01))
    records: list[bool] = []

    async def check(role: object) -> None:
        return None

    def record(roles: list[object], bump: bool) -> None:
        records.append(bump)
        if len(records) <= 3:  # the DB is down for the first three passes
            raise RuntimeError("connection refused")

    controller._roles = {1: object()}  # type: ignore[dict-item]
    controller._check = check  # type: ignore[method-assign]
    controller._down_set = lambda: frozenset({1})  # type: ignore[method-assign]
    controller._record = record  # type: ignore[method-assign,assignment]

    async def run() -> None:
        stop = asyncio.Event()
        task = asyncio.create_task(controller._health_loop(stop))
        for _ in range(500):
            if len(records) >= 6:
                break
            await asyncio.sleep(0.01)
        stop.set()
        await asyncio.wait_for(task, 2)

    asyncio.run(run())
    assert len(records) >= 6, records
    # The change of routes failed to be recorded three times, so it was tried again until it was;
    # after that nothing changed any more.
    assert records[:4] == [True, True, True, True] and not any(records[4:]), records
    assert controller._routed_down == frozenset({1})


def test_a_reconcile_outage_is_logged_once_not_every_pass(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # While the runtime DB is down every pass fails: its traceback once, then a line when passes work.
    controller = Controller(CloudConfig(home=tmp_path / "home"))
    passes: list[int] = []

    async def reconcile_once() -> None:
        passes.append(1)
        if len(passes) <= 5:
            raise RuntimeError("connection refused")
        controller._nudge.set()  # (no 2 s wait between passes in the test)

    controller.reconcile_once = reconcile_once  # type: ignore[method-assign]

    async def run() -> None:
        stop = asyncio.Event()
        task = asyncio.create_task(controller._reconcile_loop(stop))
        for _ in range(500):
            controller._nudge.set()
            if len(passes) >= 7:
                break
            await asyncio.sleep(0.01)
        stop.set()
        controller._nudge.set()
        await asyncio.wait_for(task, 5)

    with caplog.at_level(logging.INFO, logger="sitecloud.controller"):
        asyncio.run(run())
    failed = [r for r in caplog.records if "reconcile pass failed" in r.getMessage()]
    assert len(passes) >= 7 and len(failed) == 1 and failed[0].exc_info is not None, caplog.text
    assert sum("reconcile passes work again" in r.getMessage() for r in caplog.records) == 1
