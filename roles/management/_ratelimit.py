"""How fast one tenant may call the REST API: a token bucket per tenant for reads and one for changes.

A tenant's flood of calls costs the management role (and its runtime DB) for every other tenant, and
each settings change or restart starts an app anew on a worker that serves other tenants too: one
tenant changing 55 sites' settings 13 times a second took every other site on its worker from a p99 of
10 ms to 300 ms. Admins are not limited (their tools are the cloud's own). The buckets are generous
for people and scripts: a burst, then a steady rate.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field

__all__ = ["TenantBuckets"]

# Buckets of tenants not heard from for this long are forgotten (they start full again).
_FORGET_SECONDS = 600.0


@dataclass
class _Bucket:
    tokens: float
    at: float


@dataclass
class TenantBuckets:
    reads_per_second: float
    read_burst: int
    writes_per_second: float
    write_burst: int
    _buckets: dict[tuple[int, bool], _Bucket] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _swept_at: float = 0.0

    def take(self, tenant_id: int, *, write: bool) -> float:
        """0 when the call may go now; else the seconds until it may."""
        rate = self.writes_per_second if write else self.reads_per_second
        burst = float(self.write_burst if write else self.read_burst)
        now = time.monotonic()
        with self._lock:
            if now - self._swept_at > _FORGET_SECONDS:
                self._sweep(now)
            bucket = self._buckets.get((tenant_id, write))
            if bucket is None:
                bucket = self._buckets[(tenant_id, write)] = _Bucket(burst, now)
            bucket.tokens = min(burst, bucket.tokens + (now - bucket.at) * rate)
            bucket.at = now
            if bucket.tokens >= 1.0:
                bucket.tokens -= 1.0
                return 0.0
            return (1.0 - bucket.tokens) / rate

    def _sweep(self, now: float) -> None:
        self._swept_at = now
        for key in [k for k, b in self._buckets.items() if now - b.at > _FORGET_SECONDS]:
            del self._buckets[key]
