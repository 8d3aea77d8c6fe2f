"""Usage reports: what each front end (requests, bytes) and worker (CPU and memory-seconds) counted per
site, posted to the controller's ``POST /v1/usage``.

A report carries what was counted since the last report the controller took; it is sent again, same
``id``, until it is taken, and the controller drops a repeat by its id.
"""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import ConfigDict, Field

from shared.contracts._base import Contract
from shared.contracts.fields import ByteCount, SiteName

__all__ = ["UsageFigures", "UsageReport"]

# Seconds of CPU, or MB held times seconds: numbers that need not be whole.
_Measure = Annotated[float, Field(ge=0, lt=1e12)]
# Seconds since the epoch, before the year 10000 (what a date can hold).
_Time = Annotated[float, Field(ge=0, lt=253_402_300_800)]


class UsageFigures(Contract):
    """One site's figures in a report. Each role sends only what it measures; the rest count as 0."""

    requests: ByteCount = 0
    bytes_in: ByteCount = 0
    bytes_out: ByteCount = 0
    cpu_seconds: _Measure = 0.0
    memory_mb_seconds: _Measure = 0.0


class UsageReport(Contract):
    model_config = ConfigDict(populate_by_name=True)

    id: Annotated[str, Field(min_length=1)]
    role: str = ""
    host: str = ""
    pid: int = 0
    # Seconds since the epoch; the day a report counts for is the UTC day of ``to``.
    start: _Time = Field(default=0.0, validation_alias="from", serialization_alias="from")
    to: _Time
    sites: dict[SiteName, UsageFigures]

    def to_json(self) -> dict[str, Any]:
        # Figures a role does not measure are left out rather than sent as zeros.
        return self.model_dump(mode="json", by_alias=True, exclude_unset=True)
