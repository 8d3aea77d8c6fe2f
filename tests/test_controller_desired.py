"""The controller's reconciliation rules: placement and per-role snapshots from the runtime DB."""

from __future__ import annotations

from pathlib import Path

from roles.controller.desired import place_sites, read_desired, snapshots_for
from shared.db import (
    Database,
    Host,
    Plan,
    PublishingCredential,
    Role,
    Site,
    Subscription,
    Tenant,
    current_generation,
)


def _db(tmp_path: Path) -> Database:
    db = Database.sqlite(tmp_path / "runtime.db")
    db.migrate()
    with db.session() as s:
        host = Host(name="localhost", address="localhost")
        s.add(host)
        s.flush()
        for kind, port, ports in [
            ("frontend", 9001, {}),
            ("worker", 9002, {"data": 9102}),
            ("worker", 9003, {"data": 9103}),
            ("fileserver", 9004, {}),
            ("publisher", 9005, {}),
        ]:
            other = Host(name=f"h{port}", address=f"h{port}.example.net")
            s.add(other)
            s.flush()
            s.add(
                Role(
                    kind=kind,
                    host_id=other.id if kind == "worker" else host.id,
                    control_port=port,
                    ports=ports,
                )
            )
        plan = Plan(name="basic", max_sites=10, storage_mb=2)
        tenant = Tenant(name="contoso")
        s.add_all([plan, tenant])
        s.flush()
        sub = Subscription(tenant_id=tenant.id, plan_id=plan.id)
        s.add(sub)
        s.flush()
        for name in ("alpha", "beta", "gamma"):
            site = Site(name=name, subscription_id=sub.id)
            site.credentials.append(PublishingCredential(username=name, password_hash=f"hash-{name}"))
            s.add(site)
    return db


def test_sites_are_spread_over_workers_once(tmp_path: Path) -> None:
    db = _db(tmp_path)
    with db.session() as s:
        assert place_sites(s) == 3
        generation = current_generation(s)
    with db.session() as s:
        assert place_sites(s) == 0
        assert current_generation(s) == generation
        state = read_desired(s, "sites.test")
    per_worker = sorted(
        len([x for x in state.sites if w.id in x.worker_ids]) for w in state.of_kind("worker")
    )
    assert per_worker == [1, 2]


def test_each_role_gets_only_what_it_needs(tmp_path: Path) -> None:
    db = _db(tmp_path)
    with db.session() as s:
        place_sites(s)
        state = read_desired(s, "sites.test")
    snaps = snapshots_for(state)
    by_kind = {r.kind: snaps[r.id] for r in state.roles}
    assert {s["version"] for s in snaps.values()} == {state.generation}

    fe = by_kind["frontend"]
    assert fe["domain"] == "sites.test"
    assert sorted(fe["sites"]) == ["alpha", "beta", "gamma"]
    assert all(len(v["workers"]) == 1 and v["workers"][0].startswith("h900") for v in fe["sites"].values())

    workers = [snaps[r.id] for r in state.of_kind("worker")]
    held = sorted(name for w in workers for name in w["sites"])
    assert held == ["alpha", "beta", "gamma"]
    assert all(w["fileserver"] == "https://localhost:9004" for w in workers)

    pub = by_kind["publisher"]["sites"]["alpha"]
    assert pub["users"] == {"alpha": "hash-alpha"} and pub["quota_bytes"] == 2 * 1024 * 1024
    fs = by_kind["fileserver"]["sites"]["beta"]
    assert set(fs) == {"uid", "quota_bytes"}
    # Secrets go only where they are checked.
    assert (
        "users" not in str(fe) and "hash-" not in str(workers) and "hash-" not in str(by_kind["fileserver"])
    )


def test_a_suspended_subscription_takes_its_sites_off_every_role(tmp_path: Path) -> None:
    db = _db(tmp_path)
    with db.session() as s:
        place_sites(s)
        for sub in s.query(Subscription):
            sub.state = "suspended"
    with db.session() as s:
        snaps = snapshots_for(read_desired(s, "sites.test"))
    assert all(not snap.get("sites") for snap in snaps.values())
