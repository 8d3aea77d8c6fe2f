"""Apps' CPU seconds and memory-seconds per site, reported to the controller by
:class:`shared.usage.UsageReporter`.

The app manager keeps running totals per site (from the site's cgroup, or its process tree without
one); a report carries what grew since the totals of the last report the controller took.
"""

from __future__ import annotations

from collections.abc import Callable

from roles.worker.config import WorkerConfig
from shared.contracts.usage import UsageFigures
from shared.logs import ContextLogger
from shared.usage import UsageReporter

__all__ = ["WorkerUsageReporter"]


class WorkerUsageReporter(UsageReporter):
    def __init__(
        self, config: WorkerConfig, totals: Callable[[], dict[str, tuple[float, float]]], log: ContextLogger
    ) -> None:
        super().__init__(config, log, interval=config.usage_interval)
        self._totals = totals
        # The totals the last taken report went up to, and those of the report not taken yet.
        self._base: dict[str, tuple[float, float]] = {}
        self._reported: dict[str, tuple[float, float]] = {}

    def take(self) -> dict[str, UsageFigures]:
        totals = self._totals()
        sites: dict[str, UsageFigures] = {}
        for name, (cpu, mem) in totals.items():
            base_cpu, base_mem = self._base.get(name, (0.0, 0.0))
            # A total below the base is a site that came back anew: it counts from zero.
            d_cpu = cpu - base_cpu if cpu >= base_cpu else cpu
            d_mem = mem - base_mem if mem >= base_mem else mem
            if d_cpu >= 0.001 or d_mem >= 0.1:
                sites[name] = UsageFigures(cpu_seconds=round(d_cpu, 3), memory_mb_seconds=round(d_mem, 1))
        self._reported = totals
        return sites

    def accepted(self) -> None:
        self._base = self._reported
