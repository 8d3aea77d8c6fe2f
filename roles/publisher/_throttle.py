"""Failed-login throttling shared by FTP and web deploy.

Each failure fills a leaky bucket that drains evenly over the window: one for the account from that
client address, one for the client address over all accounts, and one for the account over all
addresses. A client is refused when its next failure would overflow its own buckets; an account under
attack from many addresses refuses only the addresses that have already failed on it, so the owner
logging in from a clean address is never held up by someone else's guessing. The tables are LRU maps
of bounded size, so a flood of addresses costs bounded memory.
"""

from __future__ import annotations

import math
import threading
import time
from collections import OrderedDict
from collections.abc import Callable

from shared.net import client_key

__all__ = ["LoginThrottle"]

# An account failing from many addresses this many times its per-address allowance is under attack.
_ACCOUNT_WIDE_FACTOR = 10


class _Buckets:
    """Leaky buckets by key: (level, when it was last updated), in least-recently-used order."""

    def __init__(self, rate: float, max_entries: int) -> None:
        self._rate = rate
        self._max = max_entries
        self._levels: OrderedDict[str, tuple[float, float]] = OrderedDict()

    def level(self, key: str, now: float) -> float:
        entry = self._levels.get(key)
        if entry is None:
            return 0.0
        level = max(0.0, entry[0] - (now - entry[1]) * self._rate)
        if level == 0.0:
            del self._levels[key]
        return level

    def add(self, key: str, now: float) -> None:
        self._levels[key] = (self.level(key, now) + 1.0, now)
        self._levels.move_to_end(key)
        while len(self._levels) > self._max:
            self._levels.popitem(last=False)

    def clear(self, key: str) -> None:
        self._levels.pop(key, None)

    def wait(self, key: str, limit: int, now: float) -> float:
        """Seconds until one more failure fits under ``limit``; 0 when it fits now."""
        excess = self.level(key, now) + 1.0 - limit
        return excess / self._rate if excess > 0 else 0.0

    def __len__(self) -> int:
        return len(self._levels)


class LoginThrottle:
    """Thread-safe: FTP sessions run in threads of their own, web deploy in the event loop."""

    def __init__(
        self,
        *,
        per_account: int,
        per_address: int,
        window: float,
        max_entries: int,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._per_account = max(1, per_account)
        self._per_address = max(1, per_address)
        self._account_wide = self._per_account * _ACCOUNT_WIDE_FACTOR
        self._clock = clock
        self._lock = threading.Lock()
        # Running totals for metrics: failed logins, and tries refused for throttling.
        self.failures = 0
        self.refusals = 0
        self._pairs = _Buckets(self._per_account / window, max_entries)
        self._addresses = _Buckets(self._per_address / window, max_entries)
        self._accounts = _Buckets(self._account_wide / window, max_entries)

    def retry_after(self, account: str, address: str) -> int:
        """Whole seconds this client must wait before it may try ``account`` again; 0 if it may now."""
        client = client_key(address)
        pair = f"{account}\n{client}"
        now = self._clock()
        with self._lock:
            wait = max(
                self._pairs.wait(pair, self._per_account, now),
                self._addresses.wait(client, self._per_address, now),
            )
            if self._pairs.level(pair, now) > 0:
                wait = max(wait, self._accounts.wait(account, self._account_wide, now))
            if wait > 0:
                self.refusals += 1
        return math.ceil(wait)

    def failed(self, account: str, address: str) -> None:
        client = client_key(address)
        now = self._clock()
        with self._lock:
            self.failures += 1
            self._pairs.add(f"{account}\n{client}", now)
            self._addresses.add(client, now)
            self._accounts.add(account, now)

    def succeeded(self, account: str, address: str) -> None:
        """The client knows the password: forget its failures on this account."""
        with self._lock:
            self._pairs.clear(f"{account}\n{client_key(address)}")

    @property
    def entries(self) -> int:
        with self._lock:
            return len(self._pairs) + len(self._addresses) + len(self._accounts)
