"""The controller's health loop outlives a pass that fails (the runtime DB down or locked).

Before, an exception from recording what the loop saw ended the task for good: `role list` then said
every role was Unknown ("is the controller running?") while the controller ran, and nothing was
revived or routed around any more, also after the DB came back.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

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
