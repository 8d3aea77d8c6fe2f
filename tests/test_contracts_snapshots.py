"""The snapshots the controller pushes and the health answers roles give, as typed contracts: what
goes over the wire, what is refused and how it says so, without processes."""

from __future__ import annotations

import json
from typing import Any

import pytest

from roles.controller.desired import DesiredSite, DesiredState, RoleEndpoint, snapshots_for
from roles.worker.apps._spec import SIZES, app_spec
from shared.acme import AcmeChallenge
from shared.appsettings import app_fields, frontend_fields
from shared.contracts.apps import AppDescription
from shared.contracts.health import (
    HEALTHS,
    FileserverFigures,
    RoleHealth,
    WorkerFigures,
    WorkerHealth,
)
from shared.contracts.snapshots import (
    BareSnapshot,
    ConfigAck,
    FileserverSnapshot,
    FrontendSite,
    FrontendSnapshot,
    ManagementSnapshot,
    OfflineSite,
    PublisherSnapshot,
    Refused,
    WorkerSite,
    WorkerSnapshot,
)
from shared.control import parse_snapshot
from shared.dns01 import PlatformCertificate
from shared.errors import InvalidInput
from shared.states import HealthStatus, RoleState, SiteState

UID = "0f1e2d3c4b5a69788796a5b4c3d2e1f0"
PEM = "-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n"
KEY = "-----BEGIN PRIVATE KEY-----\nMIIE\n-----END PRIVATE KEY-----\n"

FRONTEND: dict[str, Any] = {
    "version": 7,
    "domain": "sites.test",
    "sites": {
        "blog": {
            "workers": ["web1:7412", "http://127.0.0.1:7413"],
            "hostnames": ["www.blog.example", {"name": "shop.example", "cert": PEM, "key": KEY}],
            "https_only": True,
            "affinity": True,
        },
        "shop": {
            "workers": ["web2:7412"],
            "serve_as": "shop-staging",
            "quota_stop": {
                "what": "bandwidth",
                "limit": 100.0,
                "unit": "MB",
                "until": "2026-01-02T00:00:00Z",
            },
        },
        "empty": {"workers": []},
    },
    "acme_challenges": [
        {"host": "www.blog.example", "token": "A" * 43, "key_authorization": f"{'A' * 43}.{'b' * 43}"}
    ],
    "wildcard": {"cert": PEM, "key": KEY},
}
WORKER: dict[str, Any] = {
    "version": 7,
    "fileserver": "https://files.example:9004",
    "sites": {
        "blog": {"uid": UID},
        "app": {
            "uid": "aa" * 16,
            "runtime": "python",
            "entry": "app:app",
            "env": {"GREETING": "hello"},
            "always_on": True,
            "idle_timeout": 60,
            "limits": {"disk_mb": 64},
        },
    },
}
FILESERVER: dict[str, Any] = {
    "version": 7,
    "sites": {"blog": {"uid": UID, "quota_bytes": 5 << 20, "keep_versions": 3, "keep_days": 7}},
}
PUBLISHER: dict[str, Any] = {
    "version": 7,
    "fileserver": "https://files.example:9004",
    "site_url": "https://{site}.sites.test/",
    "sites": {"blog": {"uid": UID, "quota_bytes": 5 << 20, "users": {"blog": "scrypt$hash"}}},
}


@pytest.mark.parametrize(
    ("kind", "wire"),
    [
        (FrontendSnapshot, FRONTEND),
        (
            FrontendSnapshot,
            {
                **FRONTEND,
                "offline": {
                    "news": {
                        "state": "stopped",
                        "hostnames": [{"name": "news.example", "cert": PEM, "key": KEY}],
                    },
                    "old": {"state": "suspended"},
                },
            },
        ),
        (WorkerSnapshot, WORKER),
        (FileserverSnapshot, FILESERVER),
        (PublisherSnapshot, PUBLISHER),
        (
            PublisherSnapshot,
            {
                **PUBLISHER,
                "sites": {"blog": {**PUBLISHER["sites"]["blog"], "state": "stopped"}},
                "suspended": {
                    "shop": {"uid": "b" * 32, "quota_bytes": 1, "users": {"shop": "h"}, "state": "suspended"}
                },
            },
        ),
        (BareSnapshot, {"version": 3}),
        (
            ManagementSnapshot,
            {
                "version": 3,
                "publisher": {
                    "control_url": "https://pub1:7403",
                    "public_host": "pub1",
                    "ftp_port": 2121,
                    "deploy_port": 8172,
                },
            },
        ),
        (ManagementSnapshot, {"version": 3, "publisher": None}),
        (ManagementSnapshot, {"version": 3}),
        # No file server runs (every one stopped): the publisher takes it and says it is degraded.
        (PublisherSnapshot, {**PUBLISHER, "fileserver": ""}),
    ],
)
def test_each_snapshot_goes_over_the_wire_and_back_unchanged(kind: Any, wire: dict[str, Any]) -> None:
    parsed = kind.parse(wire)
    assert parsed.to_json() == wire
    # From the bytes as a role gets them, too.
    assert kind.parse_json(json.dumps(wire)).to_json() == wire
    assert kind.parse(parsed.to_json()) == parsed


def test_an_offline_site_is_stopped_or_suspended_and_a_bad_entry_fails_alone() -> None:
    front = FrontendSnapshot.parse(
        {
            **FRONTEND,
            "offline": {
                "news": {"state": "suspended", "hostnames": ["news.example"]},
                "live": {"state": "running"},
                "odd": {"state": "stopped", "hostnames": ["not a name"]},
            },
        }
    )
    news = front.offline["news"]
    assert isinstance(news, OfflineSite) and news.state is SiteState.SUSPENDED
    assert news.hostnames == ["news.example"]
    for name in ("live", "odd"):
        assert isinstance(front.offline[name], Refused), front.offline[name]
    # The serving sites stand; without offline sites the field is left out, as it always was.
    assert sorted(front.sites) == ["blog", "empty", "shop"]
    assert "offline" not in FrontendSnapshot.parse(FRONTEND).to_json()


def test_a_parsed_snapshot_holds_typed_values() -> None:
    front = FrontendSnapshot.parse(FRONTEND)
    blog = front.sites["blog"]
    assert isinstance(blog, FrontendSite) and blog.https_only and blog.affinity and not blog.hsts
    assert blog.hostnames[0] == "www.blog.example"
    assert isinstance(front.acme_challenges, tuple) and isinstance(front.acme_challenges[0], AcmeChallenge)
    assert isinstance(front.wildcard, PlatformCertificate)
    shop = front.sites["shop"]
    assert isinstance(shop, FrontendSite) and shop.serve_as == "shop-staging"
    assert shop.quota_stop is not None and shop.quota_stop.what == "bandwidth"

    worker = WorkerSnapshot.parse(WORKER)
    app = worker.sites["app"]
    # The wire's "uid" is the content id; a Unix uid is another thing altogether.
    assert isinstance(app, WorkerSite) and app.content_id == "aa" * 16
    spec = app_spec(app, SIZES["small"].limits)
    assert spec is not None and spec.runtime == "python" and spec.idle_timeout == 60.0
    assert spec.env == (("GREETING", "hello"),) and spec.always_on
    assert spec.limits.disk_mb == 64 and spec.limits.memory_mb == SIZES["small"].limits.memory_mb
    plain = worker.sites["blog"]
    assert isinstance(plain, WorkerSite) and app_spec(plain, SIZES["small"].limits) is None


def test_unknown_fields_are_ignored_not_refused() -> None:
    """A newer controller may send what an older role does not know yet (a rolling upgrade)."""
    newer = {
        **WORKER,
        "brand_new": {"x": 1},
        "sites": {"blog": {"uid": UID, "future_setting": [1, 2]}},
    }
    parsed = WorkerSnapshot.parse(newer)
    assert isinstance(parsed.sites["blog"], WorkerSite)
    assert parsed.to_json() == {**WORKER, "sites": {"blog": {"uid": UID}}}
    assert FileserverSnapshot.parse({**FILESERVER, "replicas": 3}).to_json() == FILESERVER


@pytest.mark.parametrize(
    ("kind", "wire", "says"),
    [
        (WorkerSnapshot, {"sites": {}}, "version: Field required"),
        (WorkerSnapshot, {"version": 0}, "version: Input should be greater than or equal to 1"),
        (WorkerSnapshot, {"version": "7"}, "version: Input should be a valid integer"),
        (WorkerSnapshot, {"version": 1, "sites": []}, "sites: must be an object of site name to site entry"),
        (WorkerSnapshot, {"version": 1, "fileserver": 5}, "fileserver: Input should be a valid string"),
        (
            FrontendSnapshot,
            {"version": 1, "domain": "not a host"},
            "domain: 'not a host' is not a valid host name",
        ),
        (
            FileserverSnapshot,
            {"version": 1, "sites": {"odd": {"uid": "not a uid!", "quota_bytes": 1}}},
            "site 'odd': uid: String should match pattern",
        ),
        (
            FileserverSnapshot,
            {"version": 1, "sites": {"blog": {"uid": UID, "quota_bytes": -1}}},
            "site 'blog': quota_bytes: Input should be greater than or equal to 0",
        ),
        (
            FileserverSnapshot,
            {
                "version": 1,
                "sites": {"a": {"uid": UID, "quota_bytes": 1}, "b": {"uid": UID, "quota_bytes": 1}},
            },
            f"site 'b': uid {UID} is used by site 'a' too",
        ),
        (
            FileserverSnapshot,
            {"version": 1, "sites": {"Blog!": {"uid": UID, "quota_bytes": 1}}},
            "site 'Blog!'",
        ),
        (
            PublisherSnapshot,
            {**PUBLISHER, "fileserver": "http://files.example:9004"},
            "fileserver: String should match pattern '^(https://.+)?$'",
        ),
        (PublisherSnapshot, {**PUBLISHER, "site_url": "https://x/"}, "site_url: String should match pattern"),
        (
            PublisherSnapshot,
            {**PUBLISHER, "sites": {"blog": {"uid": UID, "quota_bytes": True}}},
            "site 'blog': quota_bytes: Input should be a valid integer",
        ),
        (
            PublisherSnapshot,
            {**PUBLISHER, "sites": {"blog": {"uid": UID, "quota_bytes": 1, "users": {"": "h"}}}},
            "site 'blog': users",
        ),
    ],
)
def test_a_bad_snapshot_is_refused_naming_the_field(kind: Any, wire: dict[str, Any], says: str) -> None:
    with pytest.raises(InvalidInput) as caught:
        kind.parse(wire, what="the snapshot")
    assert caught.value.message.startswith("the snapshot: ") and says in caught.value.message, caught.value
    assert len(caught.value.message) < 600


def test_one_bad_worker_site_fails_alone_with_the_words_management_uses() -> None:
    """A value stored past management's checks: that site is refused with the reason, the rest stands."""
    wire = {
        "version": 9,
        "fileserver": "https://files.example:9004",
        "sites": {
            "good": {"uid": UID},
            "bad-timeout": {
                "uid": "b1" * 16,
                **app_fields({"idle_timeout": "\u00b2"}, always_on_allowed=True),
            },
            "bad-env": {"uid": "b2" * 16, "env": {"SECRET": "lone \ud800 surrogate"}},
            "big-env": {"uid": "b3" * 16, "env": {f"V{i}": "x" * 4000 for i in range(20)}},
            "no-uid": {"runtime": "python"},
            "Bad Name": {"uid": "b4" * 16},
            "not-an-object": 5,
        },
    }
    snapshot = WorkerSnapshot.parse(wire)
    assert isinstance(snapshot.sites["good"], WorkerSite)
    refused = {name: e.reason for name, e in snapshot.sites.items() if isinstance(e, Refused)}
    assert set(refused) == set(wire["sites"]) - {"good"}
    assert "site 'bad-timeout'" in refused["bad-timeout"]
    assert "idle_timeout must be a whole number of seconds" in refused["bad-timeout"]
    assert "not valid UTF-8" in refused["bad-env"]
    assert "at most 65536 bytes" in refused["big-env"]
    assert "uid: Field required" in refused["no-uid"]
    assert "upper-case" in refused["Bad Name"]
    # The worker keeps the content of a site whose settings it refused, ready for when they are fixed.
    held, unheld = snapshot.content_ids()
    assert held == {"good": UID, "bad-timeout": "b1" * 16, "bad-env": "b2" * 16, "big-env": "b3" * 16}
    assert set(unheld) == {"no-uid", "Bad Name", "not-an-object"}
    # A refused entry goes on as it came (a role persists and hands over what it was given).
    assert snapshot.to_json() == wire


def test_one_bad_front_end_site_fails_alone() -> None:
    wire = {
        **FRONTEND,
        "sites": {
            **FRONTEND["sites"],
            "flag": {"workers": ["web1:7412"], "https_only": "yes"},
            "half-cert": {"workers": [], "hostnames": [{"name": "x.example", "cert": PEM}]},
        },
        "acme_challenges": [{"host": "x.test", "token": "../../etc", "key_authorization": "z"}],
        "wildcard": {"cert": "not pem", "key": KEY},
    }
    snapshot = FrontendSnapshot.parse(wire)
    flag, half = snapshot.sites["flag"], snapshot.sites["half-cert"]
    assert isinstance(flag, Refused) and "https_only: Input should be a valid boolean" in flag.reason
    assert isinstance(half, Refused) and "'cert' and 'key' must both be PEM text" in half.reason
    assert isinstance(snapshot.sites["blog"], FrontendSite)
    # ACME answers and the platform's wildcard are left out on their own, never the routes.
    assert isinstance(snapshot.acme_challenges, Refused) and "token" in snapshot.acme_challenges.reason
    assert isinstance(snapshot.wildcard, Refused) and "PEM" in snapshot.wildcard.reason
    assert snapshot.to_json() == wire


def _state() -> DesiredState:
    roles = [
        RoleEndpoint(1, "frontend", "fe1", 9001, {"https": 443}),
        RoleEndpoint(2, "worker", "web1", 9002, {"data": 7412}),
        RoleEndpoint(3, "fileserver", "files", 9004, {}),
        RoleEndpoint(4, "publisher", "pub", 9005, {}),
        RoleEndpoint(5, "management", "mgmt", 9006, {}),
    ]
    sites = [
        DesiredSite(
            "good",
            UID,
            5 << 20,
            {"good": "scrypt$h"},
            (2,),
            app={"runtime": "php"},
            routing=frontend_fields({"https_only": "on"}),
        ),
        DesiredSite(
            "bad",
            "b1" * 16,
            5 << 20,
            {},
            (2,),
            app=app_fields({"idle_timeout": "\u00b2"}, always_on_allowed=True),
            routing=frontend_fields({"hsts": "maybe"}),
        ),
    ]
    return DesiredState(generation=4, domain="sites.test", roles=roles, sites=sites)


def test_the_controller_builds_each_role_its_contract_and_passes_a_bad_value_on_as_it_is() -> None:
    snaps = snapshots_for(_state())
    front, worker, files, publisher, management = (snaps[i] for i in range(1, 6))
    assert isinstance(front, FrontendSnapshot) and isinstance(worker, WorkerSnapshot)
    assert isinstance(files, FileserverSnapshot) and isinstance(publisher, PublisherSnapshot)
    # The publisher has no public ports in this state: none is given to management.
    assert isinstance(management, ManagementSnapshot)
    assert management.to_json() == {"version": 4, "publisher": None}
    good = worker.sites["good"]
    assert isinstance(good, WorkerSite) and good.runtime == "php"
    # The controller never fails on one site's bad value: the role refuses that site, in the same words.
    bad = worker.sites["bad"]
    assert isinstance(bad, Refused) and bad.raw == {"uid": "b1" * 16, "idle_timeout": "\u00b2"}
    again = WorkerSnapshot.parse_json(json.dumps(worker.to_json()))
    assert isinstance(again.sites["bad"], Refused) and again.sites["bad"].reason == bad.reason
    assert isinstance(front.sites["bad"], Refused) and front.to_json()["sites"]["bad"]["hsts"] == "maybe"
    assert front.to_json()["sites"]["good"] == {"workers": ["web1:7412"], "https_only": True}
    assert files.to_json()["sites"]["good"] == {"uid": UID, "quota_bytes": 5 << 20}


def test_a_snapshot_its_role_would_refuse_goes_as_it_is() -> None:
    state = _state()
    state.sites.append(DesiredSite("odd", "not a content id!", 1, {}, ()))
    # A value stored past management's checks: the publisher refuses the whole snapshot, saying why.
    publisher = snapshots_for(state)[4]
    assert isinstance(publisher, Refused) and "site 'odd'" in publisher.reason
    assert publisher.raw["sites"]["odd"]["uid"] == "not a content id!" and publisher.raw["version"] == 4


def test_with_no_file_server_running_the_publisher_is_told_so_and_not_refused() -> None:
    state = _state()
    state.roles = [r for r in state.roles if r.kind != "fileserver"]
    # It keeps its sites and logins, and answers what needs storage "storage is unavailable".
    publisher = snapshots_for(state)[4]
    assert isinstance(publisher, PublisherSnapshot) and publisher.fileserver == ""
    assert publisher.to_json()["fileserver"] == "" and set(publisher.sites) == {"good", "bad"}


def test_a_config_push_answer_is_a_contract_too() -> None:
    assert ConfigAck.parse({"config_version": 3}).config_version == 3
    with pytest.raises(InvalidInput, match="config_version"):
        ConfigAck.parse({"config_version": "3"})


# -- health ----------------------------------------------------------------------------------------


def _common(role: str = "worker") -> dict[str, Any]:
    return {
        "role": role,
        "host": "web1",
        "code_version": "1.2.3",
        "config_version": 7,
        "pid": 4242,
        "uptime": 12.5,
        "listeners": {"control": 9002, "data": 7412},
    }


def test_a_health_answer_is_the_common_fields_and_the_roles_figures() -> None:
    figures = WorkerFigures(sites=2, sites_synced=2, fileserver_reachable=True, app_cpu_seconds={"a": 1.5})
    answer = WorkerHealth.answer(_common(), figures)
    wire = answer.to_json()
    assert wire == {
        **_common(),
        "status": "ready",
        "sites": 2,
        "sites_synced": 2,
        "fileserver_reachable": True,
        "app_cpu_seconds": {"a": 1.5},
    }
    # Absent figures stay absent (not null): "failed_sites" only while there are some.
    assert "failed_sites" not in wire and "reason" not in wire
    read = HEALTHS["worker"].parse(json.loads(json.dumps(wire)))
    assert read.state() == (RoleState.READY, "")
    assert read.config_version == 7 and read.code_version == "1.2.3"
    assert read.load() == {
        "sites": 2,
        "sites_synced": 2,
        "fileserver_reachable": True,
        "app_cpu_seconds": {"a": 1.5},
    }


def test_a_degraded_answer_reads_as_degraded_with_its_reason() -> None:
    figures = WorkerFigures.model_validate(
        {"status": "degraded", "reason": "1 site(s) cannot be served", "failed_sites": {"bad": "why"}}
    )
    wire = WorkerHealth.answer(_common(), figures).to_json()
    read = HEALTHS["worker"].parse(wire)
    assert read.status is HealthStatus.DEGRADED
    assert read.state() == (RoleState.DEGRADED, "1 site(s) cannot be served")
    assert read.load()["failed_sites"] == {"bad": "why"}
    # Degraded without a reason still says something.
    assert RoleHealth.parse({"role": "x", "status": "degraded"}).state()[1] == "the role says it is degraded"


def test_the_controller_reads_an_answer_it_does_not_know_all_of() -> None:
    """A newer role's new figures are left out of its load; the common fields still read."""
    newer = {**_common("fileserver"), "status": "ready", "sites": 3, "replication_lag": 0.5}
    read = HEALTHS["fileserver"].parse(newer)
    assert read.load() == {"sites": 3} and read.state() == (RoleState.READY, "")
    assert HEALTHS.get("some-new-kind", RoleHealth).parse(newer).config_version == 7


@pytest.mark.parametrize(
    ("answer", "says"),
    [
        ({"host": "x"}, "role: Field required"),
        ({"role": "worker", "status": "sleepy"}, "status: Input should be 'ready' or 'degraded'"),
        (
            {"role": "worker", "config_version": -1},
            "config_version: Input should be greater than or equal to 0",
        ),
        ({"role": "worker", "sites": "many"}, "sites: Input should be a valid integer"),
        (
            {"role": "worker", "listeners": {"data": 70000}},
            "listeners.data: Input should be less than or equal to 65535",
        ),
    ],
)
def test_a_bad_health_answer_is_refused_naming_the_field(answer: dict[str, Any], says: str) -> None:
    with pytest.raises(InvalidInput) as caught:
        WorkerHealth.parse(answer, what="worker's health answer")
    assert says in caught.value.message, caught.value


def test_figures_are_checked_where_they_are_made() -> None:
    with pytest.raises(ValueError, match="total_bytes"):
        FileserverFigures(sites=1, total_bytes=-5)


def test_a_lone_surrogate_in_one_site_fails_that_site_not_the_push() -> None:
    """The bytes as a role takes them: JSON may escape a lone surrogate (json.dumps does), and one site's
    value must not make the whole body unreadable."""
    body = json.dumps(
        {
            "version": 2,
            "sites": {"good": {"uid": UID}, "bad": {"uid": "b1" * 16, "env": {"S": "lone \ud800"}}},
        }
    ).encode()
    snapshot = parse_snapshot(WorkerSnapshot, body, what="worker snapshot")
    assert isinstance(snapshot.sites["good"], WorkerSite)
    bad = snapshot.sites["bad"]
    assert isinstance(bad, Refused) and "not valid UTF-8" in bad.reason
    with pytest.raises(InvalidInput, match="worker snapshot is not JSON"):
        parse_snapshot(WorkerSnapshot, b"{version: 2", what="worker snapshot")


def test_a_worker_s_figures_are_merged_from_the_parts_that_build_them() -> None:
    """Each part sets its own figures; one that says degraded wins over the default ready, and what
    no part set stays out of the answer."""
    merged = WorkerFigures.merge(
        WorkerFigures(sites=2, fileserver_reachable=True),
        WorkerFigures(processes=1),
        WorkerFigures(status=HealthStatus.DEGRADED, reason="1 site(s) cannot be served"),
        WorkerFigures(connections=5),
    )
    assert merged.to_json() == {
        "status": "degraded",
        "reason": "1 site(s) cannot be served",
        "sites": 2,
        "fileserver_reachable": True,
        "processes": 1,
        "connections": 5,
    }
    assert WorkerFigures.merge(WorkerFigures(sites=1), WorkerFigures()).to_json() == {
        "status": "ready",
        "sites": 1,
    }


def test_an_app_description_round_trips_and_a_static_one_stays_short() -> None:
    static = AppDescription(
        site="blog", runtime="static", version=None, state="static", building=False, cpu_seconds=0.0
    )
    assert static.to_json() == {
        "site": "blog",
        "runtime": "static",
        "version": None,
        "state": "static",
        "building": False,
        "cpu_seconds": 0.0,
    }
    app = {
        "site": "shop",
        "runtime": "python",
        "entry": "app:application",
        "version": 3,
        "state": "running",
        "building": False,
        "pid": 4242,
        "memory_bytes": 50_000_000,
        "cpu_seconds": 1.25,
        "starts": 2,
        "crashes": 0,
        "always_on": False,
        "sandboxed": True,
        "memory_limit_bytes": 268_435_456,
        "memory_kills": 0,
        "pids_limit": 64,
        "pids_limit_hits": 0,
        "disk_used_bytes": 4096,
        "disk_limit_bytes": None,
        "disk_quota_hits": 0,
        "disk_full": False,
    }
    for wire in (static.to_json(), app):
        assert AppDescription.parse(json.loads(json.dumps(wire))).to_json() == wire
    # A newer worker's new figure is ignored; the rest still reads.
    assert AppDescription.parse({**app, "gpu_seconds": 1.0}).to_json() == app


@pytest.mark.parametrize(
    ("wire", "expected"),
    [
        ({"state": "asleep"}, "state: Input should be 'static', 'running'"),
        ({"runtime": "cobol"}, "runtime: Input should be 'static', 'python'"),
        ({"memory_bytes": -1}, "memory_bytes: Input should be greater than or equal to 0"),
        ({"pid": 0}, "pid: Input should be greater than or equal to 1"),
        ({"building": "no"}, "building: Input should be a valid boolean"),
    ],
)
def test_a_bad_app_description_is_refused_naming_the_field(wire: dict[str, Any], expected: str) -> None:
    base = {
        "site": "shop",
        "runtime": "python",
        "version": 1,
        "state": "idle",
        "building": False,
        "cpu_seconds": 0,
    }
    with pytest.raises(InvalidInput) as caught:
        AppDescription.parse({**base, **wire})
    assert expected in caught.value.message
