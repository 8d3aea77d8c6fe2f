"""The controller's fabric API (roles/controller/_fleet_api.py), as management calls it: the request
bodies, the host it made, and the lines of a long operation's stream (progress events, then its
outcome or its error)."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import Field

from shared.contracts._base import Contract
from shared.contracts.fields import Hostname
from shared.states import RoleState

__all__ = [
    "ErrorDetail",
    "FleetEnd",
    "FleetProgress",
    "HostCreate",
    "HostCreated",
    "RoleAdd",
    "RoleOutcome",
    "UpgradeOutcome",
    "UpgradeRequest",
    "UpgradedRole",
]

_Seconds = Annotated[float, Field(ge=0)]


class HostCreate(Contract):
    """``POST /v1/hosts``: provision the host row management wrote."""

    name: Hostname


class HostCreated(Contract):
    """The answer: the host, provisioned."""

    name: Hostname
    fabric: str
    address: str
    state: Literal["ready"] = "ready"


class RoleAdd(Contract):
    """``POST /v1/roles``: install and start the role row management wrote (with SSH details for a
    host the controller does not reach yet)."""

    id: Annotated[int, Field(ge=1)]
    ssh_user: str | None = None
    ssh_key: str | None = None


class UpgradeRequest(Contract):
    """``POST /v1/upgrade``: bring every role to the current code (``force``: even those already on it)."""

    force: bool = False


class FleetProgress(Contract):
    """One line of a long operation's stream while it runs: a step started or done (or skipped), of
    a role on a host or of the operation as a whole."""

    role: str | None = None
    host: str | None = None
    step: str
    phase: Literal["started", "done"] | None = None
    seconds: _Seconds | None = None
    detail: str | None = None

    def to_json(self) -> dict[str, Any]:
        return self.model_dump(mode="json", exclude_none=True)


class RoleOutcome(Contract):
    """The outcome of adding a role or of an action on it: the state it reached (and why, when not
    Ready); for an added one, how long it took, in all and by step."""

    role: str
    host: str
    # The wire holds the plain string ("Ready", ...).
    state: Annotated[RoleState, Field(strict=False)]
    reason: str | None = None
    seconds: _Seconds | None = None
    steps: dict[str, float] | None = None

    def to_json(self) -> dict[str, Any]:
        return self.model_dump(mode="json", exclude_none=True)


class UpgradedRole(Contract):
    role: str
    host: str
    seconds: _Seconds | None = None  # upgraded: how long it took
    reason: str | None = None  # skipped: why

    def to_json(self) -> dict[str, Any]:
        return self.model_dump(mode="json", exclude_none=True)


class UpgradeOutcome(Contract):
    """The outcome of a rolling upgrade: the code now run, and each role upgraded or skipped."""

    code: str
    upgraded: list[UpgradedRole]
    skipped: list[UpgradedRole]
    seconds: _Seconds

    def to_json(self) -> dict[str, Any]:
        return self.model_dump(mode="json", exclude_none=True)


class ErrorDetail(Contract):
    """An error as :meth:`shared.errors.SitecloudError.to_json` writes it (under ``"error"``)."""

    code: str
    message: str
    hint: str | None = None


class FleetEnd(Contract):
    """The last line of a stream: the operation's outcome, or the error it ended with."""

    result: RoleOutcome | UpgradeOutcome | None = None
    error: ErrorDetail | None = None

    def to_json(self) -> dict[str, Any]:
        return self.model_dump(mode="json", exclude_none=True)
