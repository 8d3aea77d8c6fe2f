"""The control endpoint every role runs: mTLS admission by role, versioned config, last-known-good."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from roles.controller.home import _renew_due
from shared.config import RoleConfig
from shared.contracts.snapshots import WorkerSnapshot
from shared.control import ControlPlane
from shared.net import free_port
from tests.support import CloudPKI


async def _started(pki: CloudPKI, home: Path, applied: list[WorkerSnapshot]) -> ControlPlane[WorkerSnapshot]:
    config = pki.make_role_home(
        RoleConfig(role="worker", host="localhost", home=home, control_port=free_port())
    )

    async def apply(snapshot: WorkerSnapshot) -> None:
        applied.append(snapshot)

    plane = ControlPlane(config, WorkerSnapshot, apply)
    await plane.load_last_known_good()
    await plane.start()
    return plane


async def _call(pki: CloudPKI, role: str | None, method: str, url: str, body: Any = None) -> tuple[int, Any]:
    async with (
        aiohttp.ClientSession() as session,
        session.request(method, url, json=body, ssl=pki.client_ssl(role)) as resp,
    ):
        return resp.status, await resp.json()


async def test_config_push_persists_and_survives_restart(pki: CloudPKI, tmp_path: Path) -> None:
    applied: list[WorkerSnapshot] = []
    plane = await _started(pki, tmp_path / "w", applied)
    url = plane.config.control_url
    try:
        status, body = await _call(
            pki, "controller", "PUT", f"{url}/v1/config", {"version": 3, "sites": {"a": {}}}
        )
        assert (status, body) == (200, {"config_version": 3})
        # An older version is ignored, not applied.
        status, body = await _call(pki, "controller", "PUT", f"{url}/v1/config", {"version": 2, "sites": {}})
        assert body == {"config_version": 3}
        status, health = await _call(pki, "frontend", "GET", f"{url}/v1/health")
        assert status == 200 and health["config_version"] == 3 and health["role"] == "worker"
    finally:
        await plane.stop()
    assert [s.version for s in applied] == [3]

    again: list[WorkerSnapshot] = []
    plane = await _started(pki, tmp_path / "w", again)
    await plane.stop()
    assert [s.to_json() for s in again] == [{"version": 3, "sites": {"a": {}}}]


async def test_only_the_controller_may_push_config(pki: CloudPKI, tmp_path: Path) -> None:
    plane = await _started(pki, tmp_path / "w", [])
    try:
        status, body = await _call(
            pki, "frontend", "PUT", f"{plane.config.control_url}/v1/config", {"version": 1}
        )
        assert status == 403 and body["error"]["code"] == "forbidden"
        status, body = await _call(
            pki, "controller", "PUT", f"{plane.config.control_url}/v1/config", {"v": 1}
        )
        assert status == 400 and body["error"]["code"] == "invalid_input"
    finally:
        await plane.stop()


async def test_a_peer_without_a_cloud_certificate_is_refused(pki: CloudPKI, tmp_path: Path) -> None:
    plane = await _started(pki, tmp_path / "w", [])
    try:
        with pytest.raises(aiohttp.ClientError):
            await _call(pki, None, "GET", f"{plane.config.control_url}/v1/health")
    finally:
        await plane.stop()
    await asyncio.sleep(0)


async def test_an_older_push_slower_to_parse_never_replaces_a_newer_one(
    pki: CloudPKI, tmp_path: Path
) -> None:
    """Pushes are parsed side by side off the loop; the newer one may be applied first, and the older one
    must then be dropped, not applied over it."""
    config = pki.make_role_home(
        RoleConfig(role="worker", host="localhost", home=tmp_path / "w", control_port=free_port())
    )
    applied: list[int] = []

    async def apply(snapshot: WorkerSnapshot) -> None:
        await asyncio.sleep(0.2)  # an apply that takes a while (a big routing table, a disk scan)
        applied.append(snapshot.version)

    plane = ControlPlane(config, WorkerSnapshot, apply)
    big = {f"s{i}": {"uid": f"{i:032x}"} for i in range(20_000)}
    older = json.dumps({"version": 5, "sites": big}).encode()
    newer = json.dumps({"version": 6, "sites": {}}).encode()
    await asyncio.gather(plane.accept(older), plane.accept(newer))
    assert plane.config_version == 6 and applied[-1] == 6, applied
    assert json.loads((config.state_dir / "config.json").read_bytes())["version"] == 6


async def test_a_last_known_good_config_that_no_longer_parses_waits_for_the_controller(
    pki: CloudPKI, tmp_path: Path
) -> None:
    home = tmp_path / "w"
    applied: list[WorkerSnapshot] = []
    plane = await _started(pki, home, applied)
    await plane.stop()
    plane.config.state_dir.mkdir(parents=True, exist_ok=True)
    (plane.config.state_dir / "config.json").write_text('{"version": 0, "sites": []}')
    plane = await _started(pki, home, applied)
    try:
        assert plane.config_version == 0 and applied == []
        status, body = await _call(
            pki, "controller", "PUT", f"{plane.config.control_url}/v1/config", {"version": 2, "sites": {}}
        )
        assert (status, body) == (200, {"config_version": 2})
    finally:
        await plane.stop()


async def test_a_role_whose_certificate_nears_its_end_says_degraded_with_what_renews_it(
    pki: CloudPKI, tmp_path: Path
) -> None:
    plane = await _started(pki, tmp_path / "w", [])
    try:
        _, health = await _call(pki, "controller", "GET", f"{plane.config.control_url}/v1/health")
        assert health["status"] == "ready" and "reason" not in health
    finally:
        await plane.stop()
    # Another with a certificate 10 days from its end (issued 815 days ago, say).
    config = pki.make_role_home(
        RoleConfig(role="worker", host="localhost", home=tmp_path / "w2", control_port=free_port())
    )
    names = {"dns_names": ["localhost"], "ip_addresses": ["127.0.0.1"]}
    pki.ca.issue("worker@localhost", role="worker", days=10, **names).write(config.key_file, config.cert_file)

    async def apply(snapshot: WorkerSnapshot) -> None:
        pass

    plane = ControlPlane(config, WorkerSnapshot, apply)
    await plane.start()
    try:
        _, health = await _call(pki, "controller", "GET", f"{config.control_url}/v1/health")
        assert health["status"] == "degraded", health
        assert health["reason"].startswith("its certificate expires in 9 days"), health
        assert "sitecloud role repair worker localhost" in health["reason"], health
    finally:
        await plane.stop()


def test_up_issues_a_role_certificate_again_within_its_last_30_days(pki: CloudPKI, tmp_path: Path) -> None:
    fresh, ending = tmp_path / "fresh.pem", tmp_path / "ending.pem"
    pki.ca.issue("worker@localhost", role="worker").write(tmp_path / "fresh.key", fresh)
    pki.ca.issue("worker@localhost", role="worker", days=29).write(tmp_path / "ending.key", ending)
    assert not _renew_due(fresh)
    assert _renew_due(ending)
    assert _renew_due(tmp_path / "missing.pem")
