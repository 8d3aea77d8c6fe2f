"""Access metering: requests and bytes in/out per site, reported to the controller by
:class:`shared.usage.UsageReporter`.

Counters live on the sites (:attr:`Site.usage`) and are bumped on the request path with plain integer
adds. A report takes the non-zero ones off the counters; until the controller takes it, it is sent
again as it is, so a controller that is down loses nothing.
"""

from __future__ import annotations

from roles.frontend.config import FrontendConfig
from shared.contracts.usage import UsageFigures
from shared.logs import ContextLogger
from shared.usage import UsageReporter as _Reporter

__all__ = ["UsageReporter"]


class UsageReporter(_Reporter):
    def __init__(self, config: FrontendConfig, usage: dict[str, list[int]], log: ContextLogger) -> None:
        super().__init__(config, log, interval=config.usage_interval)
        self._usage = usage
        # Everything taken off the counters so far, per site: with them, the running totals metrics show.
        self.taken: dict[str, list[int]] = {}

    def pending(self) -> dict[str, int]:
        """Counted and not yet taken by the controller."""
        totals = [0, 0, 0]
        for counters in self._usage.values():
            for i in range(3):
                totals[i] += counters[i]
        for figures in (self.unsent.sites if self.unsent else {}).values():
            totals[0] += figures.requests
            totals[1] += figures.bytes_in
            totals[2] += figures.bytes_out
        return {"requests": totals[0], "bytes_in": totals[1], "bytes_out": totals[2]}

    def take(self) -> dict[str, UsageFigures]:
        sites: dict[str, UsageFigures] = {}
        for name, c in self._usage.items():
            if c[0] or c[1] or c[2]:
                sites[name] = UsageFigures(requests=c[0], bytes_in=c[1], bytes_out=c[2])
                total = self.taken.get(name)
                if total is None:
                    self.taken[name] = [c[0], c[1], c[2]]
                else:
                    total[0] += c[0]
                    total[1] += c[1]
                    total[2] += c[2]
                c[0] = c[1] = c[2] = 0
        return sites
