"""Access metering: requests and bytes in/out per site, sent to the controller in batches.

Counters live on the sites (:attr:`Site.usage`) and are bumped on the request path with plain integer
adds. Every ``usage_interval`` seconds the non-zero ones are posted to ``{controller_url}/v1/usage``
over mTLS; what was sent is subtracted only once the controller has taken it, so a controller that is
down loses nothing (the counts keep growing until a report gets through).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
import uuid
from typing import Any

from roles.frontend.config import FrontendConfig
from shared.errors import SitecloudError
from shared.internal import InternalClient
from shared.logs import ContextLogger

__all__ = ["UsageReporter"]


class UsageReporter:
    def __init__(self, config: FrontendConfig, usage: dict[str, list[int]], log: ContextLogger) -> None:
        self._config = config
        self._usage = usage
        self._log = log
        self._url = f"{config.controller_url.rstrip('/')}/v1/usage" if config.controller_url else ""
        self._client: InternalClient | None = None
        self._task: asyncio.Task[None] | None = None
        self._since = time.time()
        # A report the controller has not taken yet: sent again as it is (same id) until it is.
        self._unsent: dict[str, Any] | None = None
        self._failures = 0
        self.reports_sent = 0
        # Everything taken off the counters so far, per site: with them, the running totals metrics show.
        self.taken: dict[str, list[int]] = {}

    def start(self) -> None:
        if self._url and self._config.usage_interval > 0:
            self._client = InternalClient(self._config, timeout=10)
            self._task = asyncio.get_running_loop().create_task(self._run())

    def pending(self) -> dict[str, int]:
        """Counted and not yet taken by the controller."""
        totals = [0, 0, 0]
        for counters in self._usage.values():
            for i in range(3):
                totals[i] += counters[i]
        for counts in (self._unsent or {}).get("sites", {}).values():
            totals[0] += counts["requests"]
            totals[1] += counts["bytes_in"]
            totals[2] += counts["bytes_out"]
        return {"requests": totals[0], "bytes_in": totals[1], "bytes_out": totals[2]}

    def _take_batch(self) -> dict[str, Any]:
        """The report body (see docs/architecture.md, "Usage reports"); its counts leave the counters."""
        now = time.time()
        sites: dict[str, dict[str, int]] = {}
        for name, c in self._usage.items():
            if c[0] or c[1] or c[2]:
                sites[name] = {"requests": c[0], "bytes_in": c[1], "bytes_out": c[2]}
                total = self.taken.get(name)
                if total is None:
                    self.taken[name] = [c[0], c[1], c[2]]
                else:
                    total[0] += c[0]
                    total[1] += c[1]
                    total[2] += c[2]
                c[0] = c[1] = c[2] = 0
        body = {
            "id": uuid.uuid4().hex,
            "role": "frontend",
            "host": self._config.host,
            "pid": os.getpid(),
            "from": round(self._since, 3),
            "to": round(now, 3),
            "sites": sites,
        }
        self._since = now
        return body

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self._config.usage_interval)
            await self.send()

    async def send(self) -> None:
        if self._client is None:
            return
        if self._unsent is None:
            body = self._take_batch()
            if not body["sites"]:
                return
            self._unsent = body
        try:
            await self._client.post_json(self._url, self._unsent)
        except SitecloudError as err:
            self._failures += 1
            if self._failures == 1 or self._failures % 20 == 0:
                self._log.warning("usage report not taken (%s times so far): %s", self._failures, err)
            return
        if self._failures:
            self._log.info("usage reports get through again")
        self._failures = 0
        self._unsent = None
        self.reports_sent += 1

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        if self._client is not None:
            try:
                await asyncio.wait_for(self.send(), 3)
            except Exception as exc:  # the stop goes on; what it drops is said, not lost without a word
                self._log.warning("last usage report not sent (%r); dropped: %s", exc, self.pending())
            await self._client.close()
