"""The controller's reconciliation rules: placement and per-role snapshots from the runtime DB."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

from sqlalchemy import select

from roles.controller.desired import (
    DesiredSite,
    DesiredState,
    RoleEndpoint,
    WorkerSlot,
    place_sites,
    plan_placement,
    read_desired,
    unreachable_needs,
)
from roles.controller.desired import snapshots_for as snapshot_objects
from roles.publisher._sites import SiteTable
from shared.acme import AcmeChallenge
from shared.contracts.snapshots import PublisherSnapshot, Refused
from shared.db import (
    CustomHostname,
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
from shared.states import SiteState


def snapshots_for(state: DesiredState) -> dict[int, Any]:
    """Each role's snapshot as it goes over the wire."""
    return {
        role: snap.raw if isinstance(snap, Refused) else snap.to_json()
        for role, snap in snapshot_objects(state).items()
    }


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


def test_sites_are_placed_on_two_workers_once(tmp_path: Path) -> None:
    db = _db(tmp_path)
    with db.session() as s:
        assert place_sites(s) == 6
        generation = current_generation(s)
    with db.session() as s:
        assert place_sites(s) == 0
        assert current_generation(s) == generation
        state = read_desired(s, "sites.test")
    per_worker = sorted(
        len([x for x in state.sites if w.id in x.worker_ids]) for w in state.of_kind("worker")
    )
    assert per_worker == [3, 3]


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
    assert all(
        len(v["workers"]) == 2 and all(w.startswith("h900") for w in v["workers"])
        for v in fe["sites"].values()
    )

    workers = [snaps[r.id] for r in state.of_kind("worker")]
    held = sorted(name for w in workers for name in w["sites"])
    assert held == ["alpha", "alpha", "beta", "beta", "gamma", "gamma"]
    assert all(w["fileserver"] == "https://localhost:9004" for w in workers)

    pub = by_kind["publisher"]["sites"]["alpha"]
    assert pub["users"] == {"alpha": "hash-alpha"} and pub["quota_bytes"] == 2 * 1024 * 1024
    # The workers whose logs a deploy follows for the site's build: the two that serve it.
    assert sorted(pub["workers"]) == ["https://h9002:9002", "https://h9003:9003"]
    # Its subscription, whose share of the deploy slots its deploys count against.
    assert pub["subscription"] == workers[0]["sites"][held[0]]["subscription"] > 0
    fs = by_kind["fileserver"]["sites"]["beta"]
    assert set(fs) == {"uid", "quota_bytes", "keep_versions", "keep_days"}
    assert (fs["keep_versions"], fs["keep_days"]) == (20, 0)
    # Secrets go only where they are checked.
    assert (
        "users" not in str(fe) and "hash-" not in str(workers) and "hash-" not in str(by_kind["fileserver"])
    )


def test_a_suspended_subscription_takes_its_sites_off_the_serving_roles_only(tmp_path: Path) -> None:
    db = _db(tmp_path)
    with db.session() as s:
        place_sites(s)
        for sub in s.query(Subscription):
            sub.state = "suspended"
    with db.session() as s:
        state = read_desired(s, "sites.test")
    snaps = snapshots_for(state)
    by_kind = {r.kind: snaps[r.id] for r in state.roles}
    assert not by_kind["frontend"]["sites"]
    # Front ends know them to tell visitors they are suspended, rather than that there is no such site.
    assert by_kind["frontend"]["offline"] == {n: {"state": "suspended"} for n in ("alpha", "beta", "gamma")}
    assert all(not snaps[r.id]["sites"] for r in state.of_kind("worker"))
    # The fileserver keeps their content: a site left out of its snapshot goes to the trash.
    assert sorted(by_kind["fileserver"]["sites"]) == ["alpha", "beta", "gamma"]
    # The publisher knows their users only to refuse them, saying why; none of them may publish.
    pub = by_kind["publisher"]
    assert not pub["sites"] and sorted(pub["suspended"]) == ["alpha", "beta", "gamma"]
    assert pub["suspended"]["alpha"] == {
        "uid": pub["suspended"]["alpha"]["uid"],
        "quota_bytes": 2 * 1024 * 1024,
        "users": {"alpha": "hash-alpha"},
        "workers": [],
        "state": "suspended",
        "subscription": pub["suspended"]["alpha"]["subscription"],
    }


def test_a_stopped_site_keeps_its_content_and_its_publishing_but_is_served_by_nothing(
    tmp_path: Path,
) -> None:
    db = _db(tmp_path)
    with db.session() as s:
        place_sites(s)
        s.scalars(select(Site).where(Site.name == "beta")).one().state = "stopped"
    with db.session() as s:
        place_sites(s)
        state = read_desired(s, "sites.test")
    snaps = snapshots_for(state)
    by_kind = {r.kind: snaps[r.id] for r in state.roles}
    assert sorted(by_kind["frontend"]["sites"]) == ["alpha", "gamma"]
    assert by_kind["frontend"]["offline"] == {"beta": {"state": "stopped"}}
    held = sorted(name for r in state.of_kind("worker") for name in snaps[r.id]["sites"])
    assert held == ["alpha", "alpha", "gamma", "gamma"]
    assert sorted(by_kind["fileserver"]["sites"]) == ["alpha", "beta", "gamma"]
    pub = by_kind["publisher"]
    assert sorted(pub["sites"]) == ["alpha", "beta", "gamma"] and "suspended" not in pub
    # Published to as ever, with no worker to follow a build on.
    beta = pub["sites"]["beta"]
    assert beta["users"] == {"beta": "hash-beta"} and beta["workers"] == [] and beta["state"] == "stopped"
    assert "state" not in pub["sites"]["alpha"]


def _workers(*ids: int, reserved: dict[int, int] | None = None) -> list[WorkerSlot]:
    return [WorkerSlot(i, (reserved or {}).get(i)) for i in ids]


def test_placement_spreads_sites_two_each_over_the_least_loaded() -> None:
    adds, removes = plan_placement([(1, 10), (2, 10), (3, 10)], _workers(7, 8, 9), {})
    per_worker = {w: sum(1 for _, x in adds if x == w) for w in (7, 8, 9)}
    assert sorted(per_worker.values()) == [2, 2, 2] and not removes
    assert all(len({w for s, w in adds if s == site}) == 2 for site in (1, 2, 3))
    # Already placed: nothing to do.
    held = {s: {w for x, w in adds if x == s} for s in (1, 2, 3)}
    assert plan_placement([(1, 10), (2, 10), (3, 10)], _workers(7, 8, 9), held) == ([], [])


def test_a_down_worker_s_sites_go_to_another_and_it_rejoins_with_them() -> None:
    held = {1: {7, 8}}
    adds, removes = plan_placement([(1, 10)], _workers(7, 8, 9), held, down={7})
    assert adds == [(1, 9)] and removes == []  # 7 keeps its assignment: it rejoins with the site
    held[1].add(9)
    # 7 is back: three healthy replicas, one too many; the least loaded ones stay.
    adds, removes = plan_placement([(1, 10)], _workers(7, 8, 9), held)
    assert adds == [] and len(removes) == 1
    # Only one worker and it is down: nothing to move to, nothing lost.
    assert plan_placement([(1, 10)], _workers(7), {1: {7}}, down={7}) == ([], [])


def test_reserved_workers_take_only_their_subscription_s_sites() -> None:
    workers = _workers(7, 8, 9, reserved={9: 20})
    adds, _ = plan_placement([(1, 10), (2, 20)], workers, {})
    assert {w for s, w in adds if s == 1} == {7, 8}
    assert {w for s, w in adds if s == 2} == {9}
    # A worker reserved later: the subscription's sites move there, off the shared pool.
    adds, removes = plan_placement([(1, 10)], _workers(7, 8, reserved={8: 10}), {1: {7}})
    assert adds == [(1, 8)] and removes == [(1, 7)]


def test_a_reserved_plan_s_sites_go_to_workers_of_its_size_reserved_for_them() -> None:
    # Workers 7, 8 shared (small); 9 reserved for subscription 20, small; 10 and 11 for 20, large.
    workers = [
        WorkerSlot(7),
        WorkerSlot(8),
        WorkerSlot(9, 20, "small"),
        WorkerSlot(10, 20, "large"),
        WorkerSlot(11, 20, "large"),
    ]
    adds, _ = plan_placement([(1, 20, None, "large"), (2, 20, None, "small"), (3, 20)], workers, {})
    assert {w for s, w in adds if s == 1} == {10, 11}
    assert {w for s, w in adds if s == 2} == {9}
    # A shared plan's site of the same subscription takes every worker reserved for it, of any size.
    assert {w for s, w in adds if s == 3} <= {9, 10, 11}
    # A reserved plan with no worker of its size reserved for it runs on the shared workers for now
    # (the site says so), and moves once one is reserved.
    adds, _ = plan_placement([(4, 30, None, "medium")], workers, {})
    assert {w for _, w in adds} == {7, 8}
    adds, removes = plan_placement(
        [(4, 30, None, "medium")], [*workers, WorkerSlot(12, 30, "medium")], {4: {7, 8}}
    )
    assert adds == [(4, 12)] and sorted(removes) == [(4, 7), (4, 8)]


def _state(down: frozenset[int] = frozenset()) -> DesiredState:
    roles = [
        RoleEndpoint(1, "frontend", "fe1", 7404, {}, fabric="netns"),
        RoleEndpoint(2, "frontend", "localhost", 9001, {}, fabric="local"),
        RoleEndpoint(3, "worker", "web1", 7402, {"data": 7412}, fabric="netns"),
        RoleEndpoint(4, "worker", "web2", 7402, {"data": 7412}, fabric="netns"),
        RoleEndpoint(5, "worker", "localhost", 9002, {"data": 9102}, fabric="local"),
        RoleEndpoint(6, "fileserver", "localhost", 9004, {}, fabric="local"),
        RoleEndpoint(7, "fileserver", "files1", 7401, {}, fabric="netns"),
        RoleEndpoint(8, "publisher", "pub1", 7403, {}, fabric="netns"),
    ]
    site = DesiredSite("blog", "u1", 1, {"blog": "h"}, (3, 4, 5), 10)
    return DesiredState(generation=5, domain="sites.test", roles=roles, sites=[site], down=down)


def _fe_workers(snap: dict[str, Any], site: str = "blog") -> set[str]:
    return set(snap["sites"][site]["workers"])


def test_many_front_ends_get_the_same_routes_without_down_or_unreachable_workers() -> None:
    snaps = snapshots_for(_state())
    assert _fe_workers(snaps[1]) == {"web1:7412", "web2:7412"}
    # The local front end reaches every host; a netns one never gets this machine's loopback roles.
    assert _fe_workers(snaps[2]) == {"web1:7412", "web2:7412", "localhost:9102"}
    # web1's host stops answering: every front end routes around it.
    down = snapshots_for(_state(frozenset({3})))
    assert _fe_workers(down[1]) == {"web2:7412"}
    assert _fe_workers(down[2]) == {"web2:7412", "localhost:9102"}
    assert down[3]["sites"] == {
        "blog": {"uid": "u1", "subscription": 10}
    }  # it keeps its sites for when it rejoins
    # Every worker of the site down (a probe that timed out on a busy host, say): the routes keep them
    # all, since the front end may hold this snapshot for as long as the controller stays away.
    all_down = snapshots_for(_state(frozenset({3, 4, 5})))
    assert _fe_workers(all_down[1]) == {"web1:7412", "web2:7412"}
    assert _fe_workers(all_down[2]) == {"web1:7412", "web2:7412", "localhost:9102"}


def test_a_site_of_one_instance_is_taken_by_one_worker_the_same_on_every_front_end() -> None:
    # Its app runs once, with one writable folder (a SQLite database, PHP sessions): the others of
    # its workers stand by.
    snaps = snapshots_for(_state())
    local, netns = snaps[2]["sites"]["blog"], snaps[1]["sites"]["blog"]
    assert local["active"] == 1 and netns["active"] == 1
    # The same order everywhere: netns's list is the local one without the loopback worker.
    assert netns["workers"] == [w for w in local["workers"] if w != "localhost:9102"]
    # Scaled to every worker, all take requests.
    state = _state()
    state.sites[0] = replace(state.sites[0], instances=3)
    assert "active" not in snapshots_for(state)[2]["sites"]["blog"]
    # The order is each site's own, so the sites of two workers do not all go first to one of them.
    state = _state()
    state.sites = [DesiredSite(f"s{n}", f"uid{n}", 1, {}, (3, 4), 10) for n in range(40)]
    firsts = [snap["workers"][0] for snap in snapshots_for(state)[1]["sites"].values()]
    assert 10 <= firsts.count("web1:7412") <= 30, firsts
    # A worker a site was placed on later (a second host added to a cloud of one) stands by, whatever
    # the hash says: the app's data is where it ran.
    for first, later in ((3, 4), (4, 3)):
        state.sites = [
            DesiredSite(f"s{n}", f"uid{n}", 1, {}, (3, 4), 10, placed={first: 1000.0, later: 2000.0})
            for n in range(10)
        ]
        host = {3: "web1:7412", 4: "web2:7412"}[first]
        assert all(s["workers"][0] == host for s in snapshots_for(state)[1]["sites"].values())


def test_a_publisher_learns_how_many_of_a_site_s_workers_it_cannot_reach() -> None:
    # pub1 (another host) reaches web1 and web2, not this machine's loopback worker: a deploy it sees
    # served by none of the two it asks may still be served there, so it must not say otherwise.
    blog = snapshots_for(_state())[8]["sites"]["blog"]
    assert blog["workers"] == ["https://web1:7402", "https://web2:7402"] and blog["unreached_workers"] == 1
    # A local publisher reaches every worker: the field is left out, as it always was.
    state = _state()
    state.roles[-1] = RoleEndpoint(8, "publisher", "localhost", 9005, {}, fabric="local")
    blog = snapshots_for(state)[8]["sites"]["blog"]
    assert len(blog["workers"]) == 3 and "unreached_workers" not in blog


def test_acme_challenges_go_to_every_front_end_and_nowhere_else() -> None:
    state = _state()
    token = "t" * 43
    state.acme_challenges = (AcmeChallenge("www.blog.example", token, f"{token}.{'k' * 43}"),)
    snaps = snapshots_for(state)
    for frontend in (1, 2):
        assert snaps[frontend]["acme_challenges"] == [
            {"host": "www.blog.example", "token": token, "key_authorization": f"{token}.{'k' * 43}"}
        ]
    assert all("acme_challenges" not in snaps[i] for i in (3, 4, 5, 6, 7, 8))
    assert "acme_challenges" not in snapshots_for(_state())[1]


def test_the_fileserver_is_reached_by_host_name_one_for_all() -> None:
    snaps = snapshots_for(_state())
    assert {snaps[i]["fileserver"] for i in (3, 4, 5, 8)} == {"https://files1:7401"}


def test_an_advertised_machine_s_roles_are_reached_at_its_address_from_other_hosts() -> None:
    """`up --advertise 10.0.0.5`, then roles on other hosts: they call this machine's roles at the
    advertised address; this machine's own roles keep calling each other by name."""
    roles = [
        RoleEndpoint(1, "frontend", "fe7", 7404, {}, fabric="netns"),
        RoleEndpoint(2, "frontend", "localhost", 9001, {}, advertised="10.0.0.5"),
        RoleEndpoint(3, "worker", "web7", 7402, {"data": 7412}, fabric="netns"),
        RoleEndpoint(5, "worker", "localhost", 9002, {"data": 9102}, advertised="10.0.0.5"),
        RoleEndpoint(6, "fileserver", "localhost", 9004, {}, advertised="10.0.0.5"),
    ]
    site = DesiredSite("blog", "u1", 1, {"blog": "h"}, (3, 5), 10)
    snaps = snapshots_for(DesiredState(generation=2, domain="sites.test", roles=roles, sites=[site]))
    assert snaps[1]["sites"]["blog"]["workers"] == ["web7:7412", "10.0.0.5:9102"]
    assert snaps[2]["sites"]["blog"]["workers"] == ["web7:7412", "localhost:9102"]
    assert snaps[3]["fileserver"] == "https://10.0.0.5:9004"
    assert snaps[5]["fileserver"] == "https://localhost:9004"


def test_a_role_on_another_host_that_could_reach_nothing_it_needs_is_refused() -> None:
    local_only = [("fileserver", True), ("worker", True), ("publisher", True), ("frontend", True)]
    assert unreachable_needs("worker", True, local_only, advertised=False) == "fileserver"
    assert unreachable_needs("publisher", True, local_only, advertised=False) == "fileserver"
    assert unreachable_needs("frontend", True, local_only, advertised=False) == "worker"
    # Advertised, on this machine, with one remote peer, or with nothing to reach yet: allowed.
    assert unreachable_needs("worker", True, local_only, advertised=True) == ""
    assert unreachable_needs("worker", False, local_only, advertised=False) == ""
    assert unreachable_needs("worker", True, [*local_only, ("fileserver", False)], advertised=False) == ""
    assert unreachable_needs("fileserver", True, local_only, advertised=False) == ""
    assert unreachable_needs("frontend", True, [("fileserver", True)], advertised=False) == ""


def test_app_settings_and_custom_hostnames_reach_the_roles_that_use_them(tmp_path: Path) -> None:
    db = _db(tmp_path)
    with db.session() as s:
        place_sites(s)
        alpha = s.query(Site).filter_by(name="alpha").one()
        alpha.app_settings = {
            "runtime": "python",
            "entry": "app:app",
            "always_on": "true",
            "https_only": "true",
            "affinity": "no",
            "GREETING": "hi",
        }
        alpha.hostnames.append(
            CustomHostname(hostname="www.alpha.example", cert_pem="CERT", key_pem="KEY", state="verified")
        )
        alpha.hostnames.append(CustomHostname(hostname="alpha.example", state="verified"))
        # A claim DNS has not proven is never routed.
        alpha.hostnames.append(CustomHostname(hostname="pending.example", state="pending"))
    with db.session() as s:
        state = read_desired(s, "sites.test")
    snaps = snapshots_for(state)
    fe = next(snaps[r.id] for r in state.roles if r.kind == "frontend")
    assert fe["sites"]["alpha"]["hostnames"] == [
        "alpha.example",
        {"name": "www.alpha.example", "cert": "CERT", "key": "KEY"},
    ]
    assert fe["sites"]["alpha"]["https_only"] is True and "affinity" not in fe["sites"]["alpha"]
    assert "hostnames" not in fe["sites"]["beta"] and "https_only" not in fe["sites"]["beta"]
    held = [snaps[r.id]["sites"]["alpha"] for r in state.of_kind("worker") if "alpha" in snaps[r.id]["sites"]]
    assert held and all(
        entry
        == {
            "uid": entry["uid"],
            "subscription": entry["subscription"],
            "runtime": "python",
            "entry": "app:app",
            "always_on": False,
            "env": {"GREETING": "hi"},
            # The plan's 2 MB of storage, raised to the smallest app disk there is.
            "limits": {"disk_mb": 16},
        }
        for entry in held
    ), "always_on is off: the plan does not allow it"
    # A certificate's key goes to the front ends only.
    others = [snaps[r.id] for r in state.roles if r.kind != "frontend"]
    assert "KEY" not in str(others)
    # Every site serves: no offline entry, as front ends always got.
    assert "offline" not in fe

    # Stopped, its verified names (and the certificate to answer them over HTTPS) stay with the front
    # ends, to say it is stopped.
    with db.session() as s:
        s.query(Site).filter_by(name="alpha").one().state = "stopped"
    with db.session() as s:
        state = read_desired(s, "sites.test")
    fe = next(snapshots_for(state)[r.id] for r in state.roles if r.kind == "frontend")
    assert "alpha" not in fe["sites"]
    assert fe["offline"] == {
        "alpha": {
            "state": "stopped",
            "hostnames": ["alpha.example", {"name": "www.alpha.example", "cert": "CERT", "key": "KEY"}],
        }
    }


def test_a_scaled_site_gets_its_instance_count_and_others_the_default() -> None:
    adds, _ = plan_placement([(1, 10, 4), (2, 10, None)], _workers(6, 7, 8, 9), {})
    assert len([a for a in adds if a[0] == 1]) == 4
    assert len([a for a in adds if a[0] == 2]) == 2
    # Scaling down drops the extra workers once enough healthy ones remain.
    held = {1: {6, 7, 8, 9}}
    _, removes = plan_placement([(1, 10, 2)], _workers(6, 7, 8, 9), held)
    assert len(removes) == 2


def test_a_swap_routes_each_slot_s_addresses_to_the_other_s_workers_and_nothing_else_moves() -> None:
    state = _state()
    state.sites = [
        DesiredSite(
            "blog",
            "u1",
            1,
            {"blog": "h"},
            (3,),
            10,
            hostnames=("www.blog.example",),
            routed_to="blog-staging",
        ),
        DesiredSite("blog-staging", "u2", 1, {"blog-staging": "h2"}, (4,), 10, routed_to="blog"),
    ]
    snaps = snapshots_for(state)
    front = snaps[1]["sites"]
    # The production name and its custom hostnames go to the staging site's workers, under its name.
    assert front["blog"] == {
        "workers": ["web2:7412"],
        "serve_as": "blog-staging",
        "hostnames": ["www.blog.example"],
    }
    assert front["blog-staging"] == {"workers": ["web1:7412"], "serve_as": "blog"}
    # Workers, file server and publisher keep each site's content where it was: nothing restarts.
    assert snaps[3]["sites"] == {"blog": {"uid": "u1", "subscription": 10}} and snaps[4]["sites"] == {
        "blog-staging": {"uid": "u2", "subscription": 10}
    }
    assert snaps[8]["sites"]["blog"]["uid"] == "u1"
    # Unswapped, or swapped to a site that left the state: each answers its own.
    state.sites = [DesiredSite("blog", "u1", 1, {}, (3,), 10, routed_to="gone")]
    assert snapshots_for(state)[1]["sites"]["blog"] == {"workers": ["web1:7412"]}
    # Swapped with a stopped slot: production answers its own names with its own content and users;
    # the stopped slot is published to under its own name, and no address is claimed twice.
    state.sites = [
        DesiredSite("blog", "u1", 1, {"blog": "h"}, (3,), 10, routed_to="blog-staging"),
        DesiredSite(
            "blog-staging",
            "u2",
            1,
            {"blog-staging": "h2"},
            (4,),
            10,
            routed_to="blog",
            state=SiteState.STOPPED,
        ),
    ]
    snaps = snapshots_for(state)
    assert snaps[1]["sites"] == {"blog": {"workers": ["web1:7412"]}}
    assert snaps[8]["sites"] == {
        "blog": {
            "uid": "u1",
            "quota_bytes": 1,
            "workers": ["https://web1:7402"],
            "users": {"blog": "h"},
            "subscription": 10,
        },
        "blog-staging": {
            "uid": "u2",
            "quota_bytes": 1,
            "workers": [],
            "users": {"blog-staging": "h2"},
            "state": "stopped",
            "subscription": 10,
        },
    }
    # The publisher takes it (one address claimed twice would refuse the whole snapshot).
    SiteTable().apply(PublisherSnapshot.parse(snaps[8]))


def test_management_is_told_where_the_publisher_runs_wherever_that_is() -> None:
    """Tenants are given the publisher's host (FTP, web deploy) and management forwards deploys to its
    control port: on a host of its own, by its name; on this machine, at the public or advertised
    address; none running, none given."""
    publisher_ports = {"ftp": 2121, "deploy": 8172}
    management = RoleEndpoint(1, "management", "localhost", 9000, {"api": 8090})

    def told(*publishers: RoleEndpoint, public: str = "127.0.0.1") -> Any:
        state = DesiredState(generation=4, domain="sites.test", roles=[management, *publishers])
        state.public_host = public
        return snapshots_for(state)[1]["publisher"]

    remote = RoleEndpoint(2, "publisher", "pub7", 7403, publisher_ports, fabric="netns")
    assert told(remote) == {
        "control_url": "https://pub7:7403",
        "public_host": "pub7",
        "ftp_port": 2121,
        "deploy_port": 8172,
    }
    local = RoleEndpoint(3, "publisher", "localhost", 9005, publisher_ports)
    assert told(local, public="192.0.2.7") == {
        "control_url": "https://localhost:9005",
        "public_host": "192.0.2.7",
        "ftp_port": 2121,
        "deploy_port": 8172,
    }
    advertised = RoleEndpoint(3, "publisher", "localhost", 9005, publisher_ports, advertised="10.0.0.5")
    assert told(advertised)["public_host"] == "10.0.0.5"
    # Moved: the stopped one is left for the one that runs.
    stopped = RoleEndpoint(
        2, "publisher", "pub7", 7403, publisher_ports, fabric="netns", desired_state="stopped"
    )
    assert told(stopped, local)["public_host"] == "127.0.0.1"
    assert told(stopped) is None
    assert told() is None
    # Management on another host never gets this machine's loopback publisher.
    elsewhere = RoleEndpoint(1, "management", "mgmt7", 7405, {"api": 8090}, fabric="netns")
    state = DesiredState(generation=4, domain="sites.test", roles=[elsewhere, local])
    assert snapshots_for(state)[1]["publisher"] is None
