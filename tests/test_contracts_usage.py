"""Usage reports as types, without processes: the wire form each role sends, and what the controller
refuses."""

from __future__ import annotations

import pytest

from shared.contracts.usage import UsageFigures, UsageReport
from shared.errors import InvalidInput


def test_each_role_sends_only_what_it_measures_and_it_parses_back() -> None:
    front = UsageReport(
        id="r1",
        role="frontend",
        host="fe1",
        pid=7,
        start=10.5,
        to=40.5,
        sites={"blog": UsageFigures(requests=3, bytes_in=100, bytes_out=2000)},
    )
    wire = {
        "id": "r1",
        "role": "frontend",
        "host": "fe1",
        "pid": 7,
        "from": 10.5,
        "to": 40.5,
        "sites": {"blog": {"requests": 3, "bytes_in": 100, "bytes_out": 2000}},
    }
    assert front.to_json() == wire
    parsed = UsageReport.parse(wire)
    assert parsed.start == 10.5 and parsed.sites["blog"].cpu_seconds == 0.0
    worker = UsageReport(
        id="r2", to=1.0, sites={"shop": UsageFigures(cpu_seconds=1.25, memory_mb_seconds=64.0)}
    )
    assert worker.to_json()["sites"] == {"shop": {"cpu_seconds": 1.25, "memory_mb_seconds": 64.0}}


@pytest.mark.parametrize(
    ("report", "expected"),
    [
        ({"sites": {}}, "id: Field required; to: Field required"),
        ({"id": "", "to": 1.0, "sites": {}}, "id: String should have at least 1 character"),
        ({"id": "x", "to": "soon", "sites": {}}, "to: Input should be a valid number"),
        ({"id": "x", "to": 1e300, "sites": {}}, "to: Input should be less than"),
        ({"id": "x", "to": 1.0, "sites": {"Bad Name": {}}}, "sites.Bad Name.[key]"),
        ({"id": "x", "to": 1.0, "sites": {"blog": {"requests": -1}}}, "sites.blog.requests"),
        ({"id": "x", "to": 1.0, "sites": {"blog": {"requests": 1.5}}}, "sites.blog.requests"),
        ({"id": "x", "to": 1.0, "sites": {"blog": {"cpu_seconds": -0.1}}}, "sites.blog.cpu_seconds"),
    ],
)
def test_bad_reports_are_refused_naming_the_field(report: dict[str, object], expected: str) -> None:
    with pytest.raises(InvalidInput) as caught:
        UsageReport.parse(report, what="usage report")
    assert caught.value.message.startswith("usage report: ") and expected in caught.value.message


def test_fields_a_newer_role_adds_are_ignored() -> None:
    report = UsageReport.parse(
        {"id": "x", "to": 1.0, "region": "eu", "sites": {"blog": {"requests": 1, "websockets": 4}}}
    )
    assert report.sites["blog"].requests == 1 and "region" not in report.to_json()
