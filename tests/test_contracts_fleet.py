"""The controller's fabric API as types, without processes: the requests management sends, the host
it gets back, and the lines of a long operation's stream round-trip; bad ones are refused naming the
field."""

from __future__ import annotations

import json
from typing import Any

import pytest

from shared.contracts.answers import parse_answer
from shared.contracts.fleet import (
    ErrorDetail,
    FleetEnd,
    FleetProgress,
    HostCreate,
    HostCreated,
    RoleAdd,
    RoleOutcome,
    UpgradedRole,
    UpgradeOutcome,
    UpgradeRequest,
)
from shared.errors import InvalidInput, Unavailable
from shared.states import RoleState


def _wire(data: dict[str, Any]) -> Any:
    return json.loads(json.dumps(data))


def test_requests_round_trip_and_bad_ones_name_the_field() -> None:
    assert HostCreate.parse({"name": "w7.dc1.example.net"}).to_json() == {"name": "w7.dc1.example.net"}
    add = RoleAdd(id=3, ssh_user="ops")
    assert RoleAdd.parse(_wire(add.to_json())) == add
    assert RoleAdd.parse({"id": 3}).ssh_key is None
    assert UpgradeRequest.parse({}).force is False
    for kind, body, expected in (
        (HostCreate, {}, "name: Field required"),
        (HostCreate, {"name": "bad host"}, "name: "),
        (RoleAdd, {"id": "3"}, "id: Input should be a valid integer"),
        (RoleAdd, {"id": 0}, "id: Input should be greater than or equal to 1"),
        (RoleAdd, {"id": 3, "ssh_key": 5}, "ssh_key: Input should be a valid string"),
        (UpgradeRequest, {"force": "yes"}, "force: Input should be a valid boolean"),
    ):
        with pytest.raises(InvalidInput) as caught:
            kind.parse(body)
        assert expected in caught.value.message, (kind, body)


def test_the_host_answer_is_checked_as_the_controller_s_not_the_caller_s() -> None:
    host = HostCreated(name="w7.dc1.example.net", fabric="netns", address="10.9.0.7")
    wire = host.to_json()
    assert wire == {"name": "w7.dc1.example.net", "fabric": "netns", "address": "10.9.0.7", "state": "ready"}
    assert parse_answer(HostCreated, _wire(wire), peer="the controller") == host
    with pytest.raises(Unavailable, match="the controller gave an unexpected answer: HostCreated: address"):
        parse_answer(HostCreated, {**wire, "address": None}, peer="the controller")


def test_progress_lines_leave_out_what_a_step_does_not_say() -> None:
    started = FleetProgress(role="worker", host="w7", step="ready", phase="started")
    assert started.to_json() == {"role": "worker", "host": "w7", "step": "ready", "phase": "started"}
    whole = FleetProgress(step="wheelhouse", phase="done", seconds=1.25, detail="abc123")
    assert FleetProgress.parse(_wire(whole.to_json())) == whole
    with pytest.raises(InvalidInput, match="phase: Input should be 'started' or 'done'"):
        FleetProgress.parse({"step": "x", "phase": "halfway"})


def test_a_stream_ends_in_an_outcome_or_an_error() -> None:
    added = RoleOutcome(
        role="worker", host="w7", state=RoleState.READY, seconds=12.5, steps={"install": 8.0, "ready": 1.5}
    )
    end = FleetEnd(result=added).to_json()
    assert end == {
        "result": {
            "role": "worker",
            "host": "w7",
            "state": "Ready",
            "seconds": 12.5,
            "steps": {"install": 8.0, "ready": 1.5},
        }
    }
    read = FleetEnd.parse(_wire(end))
    assert isinstance(read.result, RoleOutcome) and read.result.state is RoleState.READY

    upgrade = UpgradeOutcome(
        code="abc123",
        upgraded=[UpgradedRole(role="worker", host="w7", seconds=3.0)],
        skipped=[UpgradedRole(role="management", host="localhost", reason="stopped")],
        seconds=9.0,
    )
    read = FleetEnd.parse(_wire(FleetEnd(result=upgrade).to_json()))
    assert read.result == upgrade and read.error is None

    failed = FleetEnd(error=ErrorDetail(code="unavailable", message="host unreachable")).to_json()
    assert failed == {"error": {"code": "unavailable", "message": "host unreachable"}}
    assert FleetEnd.parse(failed).error == ErrorDetail(code="unavailable", message="host unreachable")

    with pytest.raises(InvalidInput, match="result"):
        FleetEnd.parse({"result": {"role": "worker", "host": "w7", "state": "Sleeping"}})
