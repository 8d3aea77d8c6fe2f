"""What a worker says of a site's app: ``GET /v1/sites/{site}/app`` on its control port, read by
management for ``sitecloud site show`` and by the publisher while a deploy follows its build."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import Field

from shared.appsettings import Runtime
from shared.contracts._base import Contract
from shared.contracts.fields import ByteCount, SiteName, VersionNumber

__all__ = [
    "COMMAND_CHARS_MAX",
    "COMMAND_OUTPUT_MAX",
    "COMMAND_SECONDS_MAX",
    "AppDescription",
    "AppProbe",
    "AppProbeOutcome",
    "AppState",
    "CommandResult",
    "CommandRun",
]

# "static": a site without an app; "crashed": it exited and its restart waits out a back-off.
AppState = Literal["static", "running", "starting", "idle", "crashed"]

_Count = Annotated[int, Field(ge=0)]
# "answered": it answered ``GET /`` (any status: a 404 or a 500 is the app's own answer); "crashed":
# it exited before it answered (``detail``: how, and its last output); "slow": no answer in the time
# given (it may still be starting); "none": nothing to ask (a static or PHP site, or the worker serves
# another version by now).
AppProbeOutcome = Literal["answered", "crashed", "slow", "none"]


class AppDescription(Contract):
    """A site's app on one worker. A static site's description has the first six fields only; the
    rest are the app's process (none while idle) and the limits of its sandbox it has run into."""

    site: SiteName
    runtime: Runtime
    version: VersionNumber | None  # the content version served (None: none yet)
    state: AppState
    building: bool  # installing its requirements.txt or package.json for this version
    cpu_seconds: Annotated[float, Field(ge=0)]
    # Why this version's requirements.txt or package.json could not be installed: its app does not
    # start until a version builds (None: built, building, or nothing to build).
    build_error: str | None = None
    entry: str | None = None
    pid: Annotated[int, Field(ge=1)] | None = None
    memory_bytes: ByteCount = 0
    starts: _Count = 0
    # Crashes of what runs now (this version with these settings): its state, not its history.
    crashes: _Count = 0
    # The last of those: how it exited, and the app's last line of output if it came just before.
    last_crash: Annotated[str, Field(max_length=1000)] | None = None
    # Crashes of the versions and settings it ran before, on this worker (history).
    earlier_crashes: _Count = 0
    always_on: bool = False
    sandboxed: bool = False
    memory_limit_bytes: ByteCount = 0
    memory_kills: _Count = 0
    pids_limit: _Count = 0
    pids_limit_hits: _Count = 0
    disk_used_bytes: ByteCount = 0
    # The cap in force while its volume is mounted (None: not mounted).
    disk_limit_bytes: ByteCount | None = None
    disk_quota_hits: _Count = 0
    disk_full: bool = False

    def to_json(self) -> dict[str, Any]:
        # A static site's description says nothing of a process it does not have.
        return self.model_dump(mode="json", exclude_unset=True)


class AppProbe(Contract):
    """``POST /v1/sites/{site}/app/probe?version=N`` on a worker's control port: the site's app started
    as a first visitor starts it and asked for ``/`` once, so a deploy can say whether what it
    published runs at all (the publisher and management ask it once the version is served)."""

    site: SiteName
    outcome: AppProbeOutcome
    status: Annotated[int, Field(ge=100, le=999)] | None = None
    detail: Annotated[str, Field(max_length=2000)] = ""


# A command a site's owner runs in its app's sandbox (`sitecloud site run`): what it may be, how long
# it may run, and how much of its output comes back.
COMMAND_CHARS_MAX = 4096
COMMAND_SECONDS_MAX = 600.0
COMMAND_OUTPUT_MAX = 1024 * 1024


class CommandRun(Contract):
    """``POST /v1/sites/{site}/commands`` (management's API, then a worker's control port): run
    ``command`` once with ``/bin/sh -c`` in the site's app sandbox, as its app runs (its uid, packages,
    settings and writable folder, no port), for at most ``timeout`` seconds."""

    command: Annotated[str, Field(min_length=1, max_length=COMMAND_CHARS_MAX)]
    timeout: Annotated[float, Field(gt=0, le=COMMAND_SECONDS_MAX)] = 60.0


class CommandResult(Contract):
    """What the command did: its exit status (None when it was stopped at its time limit or its
    memory limit), its standard output and error as one text (at most COMMAND_OUTPUT_MAX bytes, the
    start of it kept), and how long it ran."""

    site: SiteName
    exit_code: int | None
    output: Annotated[str, Field(max_length=2 * COMMAND_OUTPUT_MAX)]
    truncated: bool = False
    timed_out: bool = False
    seconds: Annotated[float, Field(ge=0)] = 0.0
    # Which of the site's servers ran it (numbered; with one server, 1).
    server: Annotated[int, Field(ge=1)] = 1
