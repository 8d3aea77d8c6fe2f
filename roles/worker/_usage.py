"""Apps' CPU seconds and memory-seconds per site, reported to the controller in batches.

The app manager keeps running totals per site (from the site's cgroup, or its process tree without
one); every ``usage_interval`` seconds what grew since the last taken report is posted to
``{controller_url}/v1/usage`` over mTLS, in the front ends' report shape (docs/architecture.md,
"Usage reports"). A report the controller did not take is sent again, same id, so none is counted
twice and a controller that is down loses nothing.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
import uuid
from collections.abc import Callable
from typing import Any

from roles.worker.config import WorkerConfig
from shared.errors import SitecloudError
from shared.internal import InternalClient
from shared.logs import ContextLogger

__all__ = ["WorkerUsageReporter"]


class WorkerUsageReporter:
    def __init__(
        self, config: WorkerConfig, totals: Callable[[], dict[str, tuple[float, float]]], log: ContextLogger
    ) -> None:
        self._config = config
        self._totals = totals
        self._log = log
        self._url = f"{config.controller_url.rstrip('/')}/v1/usage" if config.controller_url else ""
        self._client: InternalClient | None = None
        self._task: asyncio.Task[None] | None = None
        # The totals the last taken report went up to, and a report not taken yet (with its totals).
        self._base: dict[str, tuple[float, float]] = {}
        self._unsent: tuple[dict[str, Any], dict[str, tuple[float, float]]] | None = None
        self._since = time.time()
        self._failures = 0

    def start(self) -> None:
        if self._url and self._config.usage_interval > 0:
            self._client = InternalClient(self._config, timeout=10)
            self._task = asyncio.get_running_loop().create_task(self._run())

    def _batch(self) -> tuple[dict[str, Any], dict[str, tuple[float, float]]]:
        now = time.time()
        totals = self._totals()
        sites: dict[str, dict[str, float]] = {}
        for name, (cpu, mem) in totals.items():
            base_cpu, base_mem = self._base.get(name, (0.0, 0.0))
            # A total below the base is a site that came back anew: it counts from zero.
            d_cpu = cpu - base_cpu if cpu >= base_cpu else cpu
            d_mem = mem - base_mem if mem >= base_mem else mem
            if d_cpu >= 0.001 or d_mem >= 0.1:
                sites[name] = {"cpu_seconds": round(d_cpu, 3), "memory_mb_seconds": round(d_mem, 1)}
        body = {
            "id": uuid.uuid4().hex,
            "role": "worker",
            "host": self._config.host,
            "pid": os.getpid(),
            "from": round(self._since, 3),
            "to": round(now, 3),
            "sites": sites,
        }
        self._since = now
        return body, totals

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self._config.usage_interval)
            await self.send()

    async def send(self) -> None:
        if self._client is None:
            return
        if self._unsent is None:
            body, totals = self._batch()
            if not body["sites"]:
                return
            self._unsent = (body, totals)
        try:
            await self._client.post_json(self._url, self._unsent[0])
        except SitecloudError as err:
            self._failures += 1
            if self._failures == 1 or self._failures % 20 == 0:
                self._log.warning("usage report not taken (%s times so far): %s", self._failures, err)
            return
        self._failures = 0
        self._base = self._unsent[1]
        self._unsent = None

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
                dropped = sorted(self._unsent[0]["sites"]) if self._unsent is not None else []
                self._log.warning("last usage report not sent (%r); dropped the usage of %s", exc, dropped)
            await self._client.close()
