"""The publisher's deploy slots, shared out between subscriptions (tenants).

A deploy holds a slot while its zip unpacks and commits, which for a big zip takes minutes. With one
queue for every site, a tenant with two sites and big zips held all the slots and queued every other
tenant's deploys behind its own. So one owner holds at most ``per_owner`` slots at once, whether or
not anybody waits: a slot is never taken back from a deploy under way, so a rule that applied only
while others wait would leave the first comer holding them all for as long as its zips take. A free
slot goes to the waiting owner served least recently (round robin), each owner's deploys in the
order they came.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import Counter, deque
from collections.abc import AsyncIterator

__all__ = ["FairSlots"]


class FairSlots:
    """``slots`` holders at once, at most ``per_owner`` of them one owner's."""

    def __init__(self, slots: int, per_owner: int) -> None:
        self._slots = slots
        self._per_owner = max(1, min(per_owner, slots))
        self._running: Counter[str] = Counter()
        # Owner → its waiters, first come first.
        self._waiting: dict[str, deque[asyncio.Future[None]]] = {}
        # Owner (running or waiting) → when it was last given a slot (-1: not yet): the turn.
        self._served: dict[str, int] = {}
        self._grants = 0

    @property
    def running(self) -> int:
        return sum(self._running.values())

    @property
    def waiting(self) -> int:
        return sum(len(q) for q in self._waiting.values())

    @contextlib.asynccontextmanager
    async def hold(self, owner: str) -> AsyncIterator[None]:
        """A slot for ``owner`` while the block runs (waiting for its turn first)."""
        await self._acquire(owner)
        try:
            yield
        finally:
            self._release(owner)

    async def _acquire(self, owner: str) -> None:
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiting.setdefault(owner, deque()).append(waiter)
        self._served.setdefault(owner, -1)
        self._grant()
        try:
            await waiter
        except asyncio.CancelledError:
            if waiter.done() and not waiter.cancelled():
                self._release(owner)  # given a slot as it was cancelled
            else:
                self._forget(owner, waiter)
            raise

    def _release(self, owner: str) -> None:
        self._running[owner] -= 1
        if self._running[owner] <= 0:
            del self._running[owner]
        self._idle(owner)
        self._grant()

    def _forget(self, owner: str, waiter: asyncio.Future[None]) -> None:
        queue = self._waiting.get(owner)
        if queue is not None:
            with contextlib.suppress(ValueError):
                queue.remove(waiter)
            if not queue:
                del self._waiting[owner]
        self._idle(owner)
        self._grant()

    def _idle(self, owner: str) -> None:
        if owner not in self._waiting and owner not in self._running:
            self._served.pop(owner, None)

    def _grant(self) -> None:
        while self.running < self._slots:
            ready = [o for o in self._waiting if self._running[o] < self._per_owner]
            if not ready:
                return
            owner = min(ready, key=self._served.__getitem__)  # ties: the first to come
            queue = self._waiting[owner]
            waiter = queue.popleft()
            if not queue:
                del self._waiting[owner]
            if waiter.done():
                self._idle(owner)
                continue  # cancelled: its deploy is gone
            self._running[owner] += 1
            self._served[owner] = self._grants
            self._grants += 1
            waiter.set_result(None)
