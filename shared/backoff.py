"""How long to wait before trying again after failures in a row: a delay that doubles, up to a cap.

One rule for every retry loop (content sync, app starts, role restarts), each with its own first delay
and cap, so that a thing that keeps failing is tried less and less often but never given up on.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["Backoff"]

# 2.0 ** 1024 overflows a float; every cap is reached long before this many doublings.
_MAX_DOUBLINGS = 64


@dataclass(frozen=True)
class Backoff:
    """``first`` seconds after no failure so far, doubled with each failure, never more than ``cap``."""

    first: float
    cap: float

    def __post_init__(self) -> None:
        if not 0 < self.first <= self.cap:
            raise ValueError(f"a back-off needs 0 < first <= cap, not first={self.first} cap={self.cap}")

    def delay(self, failures: int) -> float:
        """The wait after ``failures`` failures in a row (``first`` for 0, ``2 * first`` for 1, ...)."""
        return min(self.cap, self.first * 2.0 ** min(max(failures, 0), _MAX_DOUBLINGS))
