"""The fileserver's change feed on its own: what a long poll is told, and when it must reset."""

from __future__ import annotations

import asyncio
from pathlib import Path

from roles.fileserver.feed import ChangeFeed


def test_a_poll_gets_the_changes_after_its_cursor_in_order_and_an_old_cursor_resets(tmp_path: Path) -> None:
    async def main() -> None:
        feed = ChangeFeed(tmp_path / "feed.json", keep=5)
        feed.open()
        start = feed.seq
        for n in range(8):
            await feed.publish(f"site{n}", n + 1)
        # The log keeps the last five: seqs start+4 .. start+8.
        changes, reset = feed.since(start + 6)
        assert not reset and [(c["seq"], c["site"]) for c in changes] == [
            (start + 7, "site6"),
            (start + 8, "site7"),
        ]
        assert feed.since(start + 8) == ([], False)
        assert [c["seq"] for c in feed.since(start + 3)[0]] == [
            start + 4,
            start + 5,
            start + 6,
            start + 7,
            start + 8,
        ]
        assert feed.since(start + 2) == ([], True)  # older than the log
        assert feed.since(start + 9) == ([], True)  # from the future
        page = await feed.wait(start + 8, 0.05)
        assert page.changes == [] and not page.reset
        await feed.close()

    asyncio.run(main())
