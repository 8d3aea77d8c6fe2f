"""A bound on the share of a serving process's time that new TLS handshakes may take.

A handshake's first step (the server's key exchange and signature over the visitor's ClientHello) is
the costliest thing the front end does for anyone: some 220 µs, as much as ten held hits. A wave of
new connections (a slowloris attack reconnecting after its heads were cut, a handshake flood) would
otherwise take one loop turn after another while the process is busy serving, and every visitor
already connected would wait them out. So those first steps draw on a budget of loop time, at most
``burst`` ahead, that refills at ``share`` of the clock while the loop's thread is busy (over 80% of its
time on a CPU or waiting for one, sampled every 50 ms: on cores shared with other work a loop that
has more to do than it gets CPU for is busy too) and at the whole clock while it has time to spare (HAProxy's
``maxsslrate`` bounds the same thing as a fixed rate; this one leaves a crowd of new visitors alone on
a process with room for them). A step that finds the budget spent waits in a queue served one client
address after another, so one address's flood does not hold back another's first connection. The
rest of a handshake (checking the visitor's Finished) is cheap and is not held.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections import OrderedDict, deque
from collections.abc import Callable

__all__ = ["HandshakeGate"]

# How often the loop thread's busy share is sampled, and the share above which it counts as busy.
_SAMPLE = 0.05
_BUSY = 0.8


class HandshakeGate:
    """Runs handshake steps within ``share`` of the loop's time (0 < share <= 1); ``share`` 1: at once."""

    def __init__(self, loop: asyncio.AbstractEventLoop, share: float, burst: float = 0.002) -> None:
        self._loop = loop
        self.share = share
        self._burst = burst
        self._budget = burst
        self._at = loop.time()
        # The loop thread's time running or runnable and the clock at the last sample, and the share of
        # time it was busy.
        self._schedstat = (-1, 0)  # (fd, the pid that opened it: a forked serving process opens its own)
        self._sampled = (self._demand(), self._at)
        self._busy = 0.0
        # Client key -> its waiting steps; served round-robin, oldest address first.
        self._waiting: OrderedDict[str, deque[Callable[[], None]]] = OrderedDict()
        self.queued = 0
        self.held = 0  # steps that waited (a figure for /health)
        self._timer: asyncio.TimerHandle | None = None

    def run(self, key: str, step: Callable[[], None]) -> None:
        """Run ``step`` now if the budget allows and none waits before it, else when its turn comes.
        A step that finds its connection gone meanwhile should do nothing."""
        if self.share >= 1.0:
            step()
            return
        if not self._waiting and self._refill() > 0:
            self._timed(step)
            return
        waiting = self._waiting.get(key)
        if waiting is None:
            waiting = self._waiting[key] = deque()
        waiting.append(step)
        self.queued += 1
        self.held += 1
        if self._timer is None:
            self._schedule()

    def _refill(self) -> float:
        now = self._loop.time()
        cpu, then = self._sampled
        if now - then >= _SAMPLE:
            used = self._demand()
            self._busy = (used - cpu) / (now - then)
            self._sampled = (used, now)
        rate = self.share if self._busy > _BUSY else 1.0
        self._budget = min(self._burst, self._budget + (now - self._at) * rate)
        self._at = now
        return self._budget

    def _demand(self) -> float:
        """Seconds this thread has run or waited for a CPU (its schedstat; without one, its CPU time)."""
        try:
            fd, pid = self._schedstat
            if pid != os.getpid():
                fd = os.open("/proc/thread-self/schedstat", os.O_RDONLY | os.O_CLOEXEC)
                self._schedstat = (fd, os.getpid())
            ran, waited = os.pread(fd, 64, 0).split()[:2]
            return (int(ran) + int(waited)) / 1e9
        except (OSError, ValueError):
            return time.thread_time()

    def _timed(self, step: Callable[[], None]) -> None:
        started = time.perf_counter()
        try:
            step()
        finally:
            self._budget -= time.perf_counter() - started

    def _schedule(self) -> None:
        # When the budget is back above zero (plus a little: the clock's granularity).
        rate = self.share if self._busy > _BUSY else 1.0
        delay = max(0.0, -self._budget) / rate + 0.0005
        self._timer = self._loop.call_later(delay, self._drain)

    def _drain(self) -> None:
        self._timer = None
        waiting = self._waiting
        while waiting and self._refill() > 0:
            key, steps = next(iter(waiting.items()))
            step = steps.popleft()
            self.queued -= 1
            if steps:
                waiting.move_to_end(key)  # its next one after every other address's
            else:
                del waiting[key]
            self._timed(step)
        if waiting:
            self._schedule()
