"""One worker's app slots and cold starts, shared out between subscriptions (tenants).

Without this a tenant with many sites could keep the worker starting apps (each start costs the host
about 0.1 s of CPU outside any app's cgroup: 11 a second put another tenant's warm app's p99 from 6
to 290 ms) and, at the active-app cap, have other tenants' warm apps stopped, least recently used
first. Two rules keep each to its own: a budget of starts per window per subscription
(:class:`StartBudget`), and at the cap the slot comes from whoever holds the most
(:func:`pick_victims`). Both are pure: the app manager applies them.

The worker's disk for chunked request bodies (``app_spool_total``) is shared the same way
(:func:`spool_victims`): one tenant's unfinished uploads may fill it while nobody else needs it,
and give way when somebody does.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Hashable, Iterable
from dataclasses import dataclass
from typing import Generic, TypeVar

__all__ = [
    "Slot",
    "Spool",
    "StartBudget",
    "fair_share",
    "owner_of",
    "pick_victims",
    "retry_seconds",
    "spool_victims",
]

T = TypeVar("T", bound=Hashable)


def owner_of(site: str, subscription: int) -> str:
    """Whose share a site's app counts against: its subscription's, or its own when not said."""
    return f"subscription {subscription}" if subscription else f"site {site}"


class StartBudget:
    """A token bucket per owner: ``starts`` at once, refilled evenly over ``window`` seconds."""

    def __init__(self, starts: int, window: float) -> None:
        self._starts = starts
        self._rate = starts / window if starts else 0.0
        # Owner → (tokens, when they were counted); an owner whose bucket is full needs no entry.
        self._buckets: dict[str, tuple[float, float]] = {}

    @property
    def limited(self) -> bool:
        return self._starts > 0

    def take(self, owner: str, now: float) -> float:
        """Take one start: 0 when there was one, else the seconds until there is."""
        if not self._starts:
            return 0.0
        tokens, then = self._buckets.get(owner, (float(self._starts), now))
        tokens = min(float(self._starts), tokens + (now - then) * self._rate)
        if tokens >= 1.0:
            self._buckets[owner] = (tokens - 1.0, now)
            return 0.0
        self._buckets[owner] = (tokens, now)
        return (1.0 - tokens) / self._rate

    def forget(self, now: float) -> None:
        """Drop the buckets that are full again (the sweep calls it: memory stays bounded)."""
        full = [o for o, (t, then) in self._buckets.items() if t + (now - then) * self._rate >= self._starts]
        for owner in full:
            del self._buckets[owner]


@dataclass(frozen=True)
class Slot(Generic[T]):
    """A running app process as the choice of which to stop sees it."""

    key: T
    owner: str
    last_used: float
    always_on: bool


def fair_share(holding: Counter[str], owner: str, cap: int) -> int:
    """The slots one owner may count on with the others that hold some now (at least one)."""
    owners = {o for o, n in holding.items() if n > 0} | {owner}
    return max(1, cap // len(owners))


def pick_victims(
    idle: Iterable[Slot[T]], holding: Counter[str], count: int, *, for_owner: str | None = None
) -> list[T]:
    """Up to ``count`` idle processes to stop, each from the owner that holds the most slots then
    (``holding``: running processes per owner), least recently used first within it; always-on
    ones last. For a start of ``for_owner``'s, another owner's process goes only if that owner would
    still hold at least as many as ``for_owner`` then: a tenant's churn stops its own apps."""
    held = Counter(holding)
    pool = list(idle)
    chosen: list[T] = []
    while pool and len(chosen) < count:
        wanted = held[for_owner] + 1 if for_owner is not None else 0
        fair = [s for s in pool if s.owner == for_owner or held[s.owner] >= wanted]
        if not fair:
            break
        victim = min(fair, key=lambda s: (s.always_on, -held[s.owner], s.last_used))
        pool.remove(victim)
        held[victim.owner] -= 1
        chosen.append(victim.key)
    return chosen


@dataclass(frozen=True)
class Spool(Generic[T]):
    """A request body in the worker's spool as the choice of which to drop sees it."""

    key: T
    owner: str
    size: int
    # Still arriving: dropping it costs its visitor a 503, not an app a half-sent body.
    droppable: bool


def spool_victims(spools: Iterable[Spool[T]], owner: str, size: int, total: int) -> list[T] | None:
    """Room for ``size`` more bytes of ``owner``'s in a spool of ``total`` bytes: [] when there is
    some, the bodies to drop to make it, or None when ``owner`` must be refused instead. A body is
    dropped only from an owner over its fair share (``total`` over the owners holding some, this one
    included) that would still hold more than ``owner`` will, the biggest holder first: so a tenant
    may use the whole spool while nobody else wants it, and another's upload never waits on it."""
    pool = list(spools)
    held: Counter[str] = Counter()
    for spool in pool:
        held[spool.owner] += spool.size
    free = total - sum(held.values())
    if size <= free:
        return []
    share = total // len({o for o, n in held.items() if n > 0} | {owner})
    mine = held[owner] + size
    chosen: list[T] = []
    while free < size:
        fair = [
            s
            for s in pool
            if s.droppable and s.owner != owner and held[s.owner] > share and held[s.owner] > mine
        ]
        if not fair:
            return None
        victim = max(fair, key=lambda s: (held[s.owner], s.size))
        pool.remove(victim)
        held[victim.owner] -= victim.size
        free += victim.size
        chosen.append(victim.key)
    return chosen


def retry_seconds(wait: float) -> int:
    """A Retry-After for a wait: whole seconds, at least one."""
    return max(1, math.ceil(wait))
