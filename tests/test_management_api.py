"""The management REST API, driven over HTTPS against a real management process and a real SQLite DB."""

from __future__ import annotations

import datetime as dt
import http.client
import json
import re
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select

from roles.management._store import Principal, Store
from roles.management.config import ManagementConfig
from shared.credentials import hash_token, new_token, verify_password
from shared.db import (
    ApiToken,
    Database,
    Host,
    PasswordReset,
    PublishingCredential,
    Role,
    Site,
    Subscription,
    current_generation,
)
from shared.net import free_port
from tests.support import CloudPKI, RoleProcess, call


@dataclass
class ManagementCloud:
    """A management process on free ports over a migrated SQLite DB seeded with an admin token."""

    pki: CloudPKI
    proc: RoleProcess
    db: Database
    admin: str
    home: Path

    @property
    def config(self) -> ManagementConfig:
        assert isinstance(self.proc.config, ManagementConfig)
        return self.proc.config

    @property
    def api(self) -> str:
        return f"https://localhost:{self.config.api_port}/api/v1"

    def call(self, method: str, path: str, token: str | None = "admin", body: Any = None) -> tuple[int, Any]:
        headers = {}
        if token is not None:
            headers["Authorization"] = f"Bearer {self.admin if token == 'admin' else token}"
        return call(f"{self.api}{path}", self.pki.client_ssl(None), method=method, body=body, headers=headers)

    def ok(self, method: str, path: str, token: str | None = "admin", body: Any = None) -> Any:
        status, answer = self.call(method, path, token, body)
        assert status in (200, 201, 204), (status, answer)
        return answer

    def generation(self) -> int:
        with self.db.session() as s:
            return current_generation(s)

    def worker_runs(self, config_version: int | None = None, *, desired_state: str = "running") -> None:
        """Record the one worker as the controller would from its health: the config generation it
        runs (the current one when not given), and whether the admin wants it running."""
        with self.db.session() as s:
            role = s.execute(select(Role)).scalar_one()
            role.config_version = current_generation(s) if config_version is None else config_version
            role.desired_state = desired_state

    def write_endpoints(self, home: Path, *, api: str | None = None) -> Path:
        """The ``endpoints.json`` that `sitecloud up` writes, pointing at this process."""
        home.mkdir(parents=True, exist_ok=True)
        token_file = home / "admin-token"
        token_file.write_text(self.admin + "\n")
        endpoints = {
            "api": api or f"https://127.0.0.1:{self.config.api_port}",
            "ca_cert": str(self.pki.ca_file),
            "admin_token_file": str(token_file),
        }
        (home / "endpoints.json").write_text(json.dumps(endpoints))
        return home


def start_management(root: Path) -> Iterator[ManagementCloud]:
    pki = CloudPKI(root / "pki")
    db = Database.sqlite(root / "sitecloud.db")
    db.migrate()
    admin = new_token()
    with db.session() as s:
        s.add(ApiToken(token_hash=hash_token(admin), tenant_id=None, name="admin"))
        host = Host(name="localhost")
        s.add(host)
        s.add(
            Role(
                kind="worker",
                host=host,
                control_port=9100,
                state="Ready",
                config_version=1,
                code_version="0.1.0",
                last_heartbeat=dt.datetime.now(dt.UTC),
            )
        )
    config = pki.role_config(
        ManagementConfig,
        "management",
        root / "management",
        db_url=db.url,
        # Nothing listens there: nudges and deploys must fail soft.
        controller_url=f"https://localhost:{free_port()}",
        publisher_url=f"https://localhost:{free_port()}",
    )
    proc = RoleProcess(config, pki).start()
    try:
        yield ManagementCloud(pki, proc, db, admin, root)
    finally:
        code = proc.stop()
        db.dispose()
        assert code == 0, proc.log()


@pytest.fixture(scope="module")
def cloud(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ManagementCloud]:
    yield from start_management(tmp_path_factory.mktemp("mgmt"))


def _tenant_with_subscription(
    cloud: ManagementCloud, name: str, plan: str, max_sites: int = 5
) -> tuple[str, int]:
    cloud.ok("POST", "/plans", body={"name": plan, "max_sites": max_sites, "storage_mb": 50})
    token = cloud.ok("POST", "/tenants", body={"name": name})["token"]
    sub = cloud.ok("POST", "/subscriptions", body={"tenant": name, "plan": plan})
    return token, int(sub["id"])


def test_health_needs_no_token_and_control_plane_answers(cloud: ManagementCloud) -> None:
    status, body = cloud.call("GET", "/health", token=None)
    assert status == 200 and body["status"] == "ok"
    health = cloud.proc.health()
    assert health["role"] == "management" and health["status"] == "ready"
    # The controller may push a snapshot; management accepts and ignores it.
    assert cloud.proc.push_config({"version": 4}) == {"config_version": 4}


@pytest.mark.parametrize(
    "headers",
    [{}, {"Authorization": "Bearer sct_not-a-token"}, {"Authorization": "Basic YWRtaW46eA=="}],
)
def test_missing_or_bad_token_is_401(cloud: ManagementCloud, headers: dict[str, str]) -> None:
    for method, path in [("GET", "/sites"), ("POST", "/plans"), ("GET", "/roles"), ("DELETE", "/sites/x")]:
        status, body = call(f"{cloud.api}{path}", cloud.pki.client_ssl(None), method=method, headers=headers)
        assert status == 401, (path, body)
        assert body["error"]["code"] == "unauthorized" and body["error"]["message"]


def test_plans_tenants_subscriptions(cloud: ManagementCloud) -> None:
    status, plan = cloud.call("POST", "/plans", body={"name": "basic", "max_sites": 2, "storage_mb": 100})
    assert status == 201
    assert plan == {
        "id": plan["id"],
        "name": "basic",
        "max_sites": 2,
        "storage_mb": 100,
        # Quotas left out take their defaults: unlimited bandwidth and CPU, shared compute, private.
        "bandwidth_mb_per_day": None,
        "cpu_minutes_per_day": None,
        "max_custom_hostnames": 0,
        "compute_mode": "shared",
        "worker_size": None,
        "always_on": False,
        "max_instances_per_site": 1,
        "public": False,
        "retired": False,
        # The last 20 content versions, no age rule.
        "keep_versions": 20,
        "keep_days": 0,
        # No scheduled backups unless the plan asks; seven kept when it does.
        "backup_every_seconds": 0,
        "backup_keep": 7,
        "subscriptions": 0,
    }
    assert plan in cloud.ok("GET", "/plans")["plans"]
    status, body = cloud.call("POST", "/plans", body={"name": "basic", "max_sites": 1, "storage_mb": 1})
    assert status == 409 and body["error"]["code"] == "already_exists"
    for bad in [
        {"name": "x", "max_sites": "2", "storage_mb": 1},
        {"name": "Bad Name", "max_sites": 1, "storage_mb": 1},
    ]:
        status, body = cloud.call("POST", "/plans", body=bad)
        assert status == 400 and body["error"]["code"] == "invalid_input", body

    status, tenant = cloud.call("POST", "/tenants", body={"name": "acme"})
    assert status == 201 and tenant["name"] == "acme" and tenant["token"].startswith("sct_")
    listed = {t["name"]: t for t in cloud.ok("GET", "/tenants")["tenants"]}
    assert listed["acme"]["id"] == tenant["id"] and listed["acme"]["sites"] == 0
    assert cloud.call("POST", "/tenants", body={"name": "acme"})[0] == 409

    status, sub = cloud.call("POST", "/subscriptions", body={"tenant": "acme", "plan": "basic"})
    assert status == 201
    assert (sub["tenant"], sub["plan"], sub["state"]) == ("acme", "basic", "active")
    assert sub["usage"] == {"sites": 0, "custom_hostnames": 0, "storage_bytes": 0}
    assert sub["quotas"]["max_sites"] == 2 and sub["quotas"]["storage_mb"] == 100
    assert sub["id"] in [s["id"] for s in cloud.ok("GET", "/subscriptions")["subscriptions"]]
    mine = cloud.ok("GET", "/subscriptions", token=tenant["token"])["subscriptions"]
    assert [s["id"] for s in mine] == [sub["id"]]
    status, body = cloud.call("POST", "/subscriptions", body={"tenant": "nobody", "plan": "basic"})
    assert status == 404 and "nobody" in body["error"]["message"]
    status, body = cloud.call("POST", "/subscriptions", body={"tenant": "acme", "plan": "gold"})
    assert status == 404 and "gold" in body["error"]["message"]


def test_site_lifecycle(cloud: ManagementCloud) -> None:
    token, sub = _tenant_with_subscription(cloud, "lifecycle", "lifecycle-plan")
    before = cloud.generation()
    status, site = cloud.call("POST", "/sites", token=token, body={"name": "blog", "subscription": sub})
    assert status == 201, site
    # No controller runs here: the answer says the site is stored but not live yet.
    assert site.pop("pending").startswith("not live yet: site blog is created"), site
    port = cloud.config.https_port
    password = site["ftp"]["password"]
    assert site == {
        "name": "blog",
        "url": f"https://blog.sites.localhost:{port}/",
        "subscription": sub,
        "tenant": "lifecycle",
        "state": "running",
        "instances": 1,
        "hostnames": [],
        "ftp": {
            "host": cloud.config.ftp_host,
            "port": cloud.config.ftp_port,
            "user": "blog",
            "password": password,
        },
        "deploy": {
            "url": f"{cloud.config.deploy_url}/api/deploy/blog",
            "git": f"{cloud.config.deploy_url}/blog.git",
            "user": "blog",
            "password": password,
        },
        "problems": [],
    }
    assert len(password) >= 16
    assert cloud.generation() == before + 1

    with cloud.db.session() as s:
        row = s.execute(select(Site).where(Site.name == "blog")).scalar_one()
        (cred,) = row.credentials
        assert cred.username == "blog" and verify_password(password, cred.password_hash)
        first_uid = row.uid

    shown = cloud.ok("GET", "/sites/blog", token=token)
    # Nor is it live when shown: no role here runs the generation that made it.
    assert shown["pending"].startswith("not live yet: site blog is stored as running"), shown
    # Passwords are in the create answer only.
    assert shown == {
        **site,
        "pending": shown["pending"],
        "ftp": {k: v for k, v in site["ftp"].items() if k != "password"},
        "deploy": {k: v for k, v in site["deploy"].items() if k != "password"},
        "apps": [],  # no worker holds it in this cloud: nothing to ask
        "quota": shown["quota"],
    }
    # The plan has no daily limits: nothing is counted against one, nothing stopped.
    assert shown["quota"]["stopped"] is None and shown["quota"]["bandwidth_mb_per_day"] is None
    assert cloud.ok("GET", "/sites/blog") == shown  # the admin sees it too
    listed = {k: v for k, v in shown.items() if k not in ("apps", "quota")}  # lists ask less
    assert listed in cloud.ok("GET", "/sites", token=token)["sites"]
    assert listed in cloud.ok("GET", "/sites")["sites"]

    status, _ = cloud.call("DELETE", "/sites/blog", token=token)
    assert status == 204
    assert cloud.generation() == before + 2
    assert cloud.call("GET", "/sites/blog", token=token)[0] == 404
    with cloud.db.session() as s:
        assert (
            s.execute(select(PublishingCredential).where(PublishingCredential.username == "blog")).first()
            is None
        )

    # The same name again is a new site: a new uid, so it starts empty.
    cloud.ok("POST", "/sites", token=token, body={"name": "blog", "subscription": sub})
    with cloud.db.session() as s:
        assert s.execute(select(Site.uid).where(Site.name == "blog")).scalar_one() != first_uid


def test_a_running_site_is_pending_until_the_serving_roles_run_what_made_it_serve(
    cloud: ManagementCloud,
) -> None:
    # No controller runs here, and the one worker's recorded config is old: nothing serves a new site.
    # (Before, `site show` and `site list` said "running" as if it served.)
    token, sub = _tenant_with_subscription(cloud, "waiting", "waiting-plan")
    cloud.ok("POST", "/sites", token=token, body={"name": "waiting", "subscription": sub})
    shown = cloud.ok("GET", "/sites/waiting", token=token)
    assert shown["state"] == "running" and shown["apps"] == [], shown
    assert shown["pending"] == (
        "not live yet: site waiting is stored as running, but the cloud's controller has not applied "
        "that; nothing serves it until the controller runs again"
    )
    (listed,) = cloud.ok("GET", "/sites", token=token)["sites"]
    assert listed["pending"] == shown["pending"]
    try:
        cloud.worker_runs()
        assert "pending" not in cloud.ok("GET", "/sites/waiting", token=token)
        # Stopped, it is not meant to serve; started again, it waits for the roles once more.
        cloud.ok("POST", "/sites/waiting/stop", token=token)
        assert "pending" not in cloud.ok("GET", "/sites/waiting", token=token)
        cloud.ok("POST", "/sites/waiting/start", token=token)
        assert cloud.ok("GET", "/sites/waiting", token=token)["pending"] == shown["pending"]
        cloud.worker_runs()
        assert "pending" not in cloud.ok("GET", "/sites/waiting", token=token)
        # Only a change that makes it serve waits: another one, not yet applied, leaves it live.
        cloud.ok("POST", "/sites/waiting/scale", token=token, body={"instances": 1})
        assert "pending" not in cloud.ok("GET", "/sites/waiting", token=token)
        # Its subscription resumed, it waits again (suspended, it is not meant to serve).
        cloud.ok("POST", f"/subscriptions/{sub}/suspend")
        suspended = cloud.ok("GET", "/sites/waiting", token=token)
        assert suspended["state"] == "suspended" and "pending" not in suspended, suspended
        cloud.ok("POST", f"/subscriptions/{sub}/resume")
        assert cloud.ok("GET", "/sites/waiting", token=token)["pending"] == shown["pending"]
        cloud.worker_runs()
        assert "pending" not in cloud.ok("GET", "/sites/waiting", token=token)
        # A role the admin stopped serves nothing: it is not waited for.
        cloud.ok("POST", "/sites/waiting/stop", token=token)
        cloud.ok("POST", "/sites/waiting/start", token=token)
        cloud.worker_runs(1, desired_state="stopped")
        assert "pending" not in cloud.ok("GET", "/sites/waiting", token=token)
    finally:
        cloud.worker_runs(1)  # as the module's cloud began
    cloud.ok("DELETE", "/sites/waiting", token=token)


def test_tenant_isolation(cloud: ManagementCloud) -> None:
    token_a, sub_a = _tenant_with_subscription(cloud, "alice", "alice-plan")
    token_b, sub_b = _tenant_with_subscription(cloud, "bob", "bob-plan")
    cloud.ok("POST", "/sites", token=token_a, body={"name": "alices-site", "subscription": sub_a})
    cloud.ok("POST", "/sites", token=token_b, body={"name": "bobs-site", "subscription": sub_b})

    for mine, theirs, token in [("alices-site", "bobs-site", token_a), ("bobs-site", "alices-site", token_b)]:
        names = [s["name"] for s in cloud.ok("GET", "/sites", token=token)["sites"]]
        assert names == [mine]
        for method in ("GET", "DELETE"):
            status, body = cloud.call(method, f"/sites/{theirs}", token=token)
            # Exactly the answer for a site that does not exist.
            assert status == 404, body
            _, missing = cloud.call(method, "/sites/no-such-site", token=token)
            assert body["error"]["message"].replace(theirs, "X") == missing["error"]["message"].replace(
                "no-such-site", "X"
            )
            assert body["error"].get("hint") == missing["error"].get("hint")
            assert theirs in body["error"]["message"]
        status, body = cloud.call("POST", f"/sites/{theirs}/deploy", token=token)
        assert status == 404, body

    # Bob cannot create a site in Alice's subscription, and learns nothing about it.
    status, body = cloud.call("POST", "/sites", token=token_b, body={"name": "sneaky", "subscription": sub_a})
    assert status == 404 and body["error"]["code"] == "not_found"
    subs = cloud.ok("GET", "/subscriptions", token=token_b)["subscriptions"]
    assert [s["id"] for s in subs] == [sub_b]
    # Both sites still exist for the admin.
    admin_names = {s["name"] for s in cloud.ok("GET", "/sites")["sites"]}
    assert {"alices-site", "bobs-site"} <= admin_names and "sneaky" not in admin_names

    # Admin-only calls are 403 for a tenant.
    for method, path, body in [
        ("POST", "/plans", {"name": "free", "max_sites": 9, "storage_mb": 9}),
        ("POST", "/tenants", {"name": "mallory"}),
        ("GET", "/tenants", None),
        ("GET", "/roles", None),
    ]:
        status, answer = cloud.call(method, path, token=token_b, body=body)
        assert status == 403 and answer["error"]["code"] == "forbidden", (path, answer)
    assert "mallory" not in {t["name"] for t in cloud.ok("GET", "/tenants")["tenants"]}
    # A tenant subscribes itself only, and only to public plans: a private plan is as good as missing.
    status, answer = cloud.call("POST", "/subscriptions", token=token_b, body={"plan": "alice-plan"})
    assert status == 404 and answer["error"]["code"] == "not_found"
    status, answer = cloud.call(
        "POST", "/subscriptions", token=token_b, body={"tenant": "alice", "plan": "bob-plan"}
    )
    assert status == 403 and answer["error"]["code"] == "forbidden"


@pytest.mark.parametrize(
    ("name", "fragment"),
    [
        ("Blog", "upper-case"),
        ("a" * 64, "longer than 63"),
        ("my_site", "not a valid DNS label"),
        ("-blog", "not a valid DNS label"),
        ("blog.example", "not a valid DNS label"),
        ("admin", "reserved"),
        ("", "required"),
    ],
)
def test_bad_site_names_are_refused(cloud: ManagementCloud, name: str, fragment: str) -> None:
    unique = uuid.uuid4().hex[:8]
    token, sub = _tenant_with_subscription(cloud, f"names-{unique}", f"names-plan-{unique}")
    before = cloud.generation()
    status, body = cloud.call("POST", "/sites", token=token, body={"name": name, "subscription": sub})
    assert status == 400 and body["error"]["code"] == "invalid_input"
    assert fragment in body["error"]["message"]
    assert cloud.generation() == before
    assert cloud.ok("GET", "/sites", token=token) == {"sites": [], "next_cursor": None}


def test_duplicate_limits_unknown_and_inactive_subscriptions(cloud: ManagementCloud) -> None:
    token, sub = _tenant_with_subscription(cloud, "limits", "tiny", max_sites=2)
    other, other_sub = _tenant_with_subscription(cloud, "limits-other", "tiny-other")
    cloud.ok("POST", "/sites", token=token, body={"name": "one", "subscription": sub})
    before = cloud.generation()

    # Site names are global: taken is taken, whoever asks.
    for who, s in [(token, sub), (other, other_sub), ("admin", sub)]:
        status, body = cloud.call("POST", "/sites", token=who, body={"name": "one", "subscription": s})
        assert status == 409 and body["error"]["code"] == "already_exists", body

    cloud.ok("POST", "/sites", token=token, body={"name": "two", "subscription": sub})
    before = cloud.generation()
    status, body = cloud.call("POST", "/sites", token=token, body={"name": "three", "subscription": sub})
    assert status == 409 and body["error"]["code"] == "limit_reached"
    assert "allows 2 sites" in body["error"]["message"] and "tiny" in body["error"]["message"]
    assert body["error"]["hint"]
    assert cloud.generation() == before
    # The admin creates sites in any subscription, but within its plan too.
    assert cloud.call("POST", "/sites", body={"name": "three", "subscription": sub})[0] == 409

    status, body = cloud.call("POST", "/sites", token=token, body={"name": "four", "subscription": 999999})
    assert status == 404 and body["error"]["code"] == "not_found"
    status, body = cloud.call("POST", "/sites", token=token, body={"name": "four", "subscription": "1"})
    assert status == 400

    with cloud.db.session() as s:
        s.get_one(Subscription, other_sub).state = "suspended"
    status, body = cloud.call("POST", "/sites", token=other, body={"name": "four", "subscription": other_sub})
    assert status == 403 and "suspended" in body["error"]["message"]
    assert cloud.generation() == before


def test_a_suspended_subscription_s_sites_show_as_suspended_and_filter_so(cloud: ManagementCloud) -> None:
    # Before, they said "running" (their own state) while nothing served them.
    token, sub = _tenant_with_subscription(cloud, "frozen", "frozen-plan")
    for name in ("cold", "parked"):
        cloud.ok("POST", "/sites", token=token, body={"name": name, "subscription": sub})
    cloud.ok("POST", "/sites/parked/stop", token=token)

    def states(query: str = "") -> dict[str, str]:
        return {s["name"]: s["state"] for s in cloud.ok("GET", f"/sites{query}", token=token)["sites"]}

    assert states() == {"cold": "running", "parked": "stopped"}
    cloud.ok("POST", f"/subscriptions/{sub}/suspend")
    # A suspension wins over the site's own state, stopped or not.
    assert states() == {"cold": "suspended", "parked": "suspended"}
    assert cloud.ok("GET", "/sites/cold", token=token)["state"] == "suspended"
    assert states("?state=suspended") == {"cold": "suspended", "parked": "suspended"}
    assert states("?state=running") == {} and states("?state=stopped") == {}
    cloud.ok("POST", f"/subscriptions/{sub}/resume")
    assert states() == {"cold": "running", "parked": "stopped"}
    assert states("?state=stopped") == {"parked": "stopped"}


def test_a_failing_create_leaves_nothing_behind(cloud: ManagementCloud) -> None:
    token, sub = _tenant_with_subscription(cloud, "atomic", "atomic-plan")
    # A publishing user named like the new site already exists (left by some other writer): the site
    # row is inserted, then the credential insert fails; the whole create must roll back.
    cloud.ok("POST", "/sites", token=token, body={"name": "holder", "subscription": sub})
    with cloud.db.session() as s:
        holder = s.execute(select(Site).where(Site.name == "holder")).scalar_one()
        s.add(PublishingCredential(site=holder, username="orphan", password_hash="x"))
    before = cloud.generation()
    status, body = cloud.call("POST", "/sites", token=token, body={"name": "orphan", "subscription": sub})
    assert status == 409, body
    assert cloud.generation() == before
    with cloud.db.session() as s:
        assert s.execute(select(Site).where(Site.name == "orphan")).first() is None
    assert "orphan" not in {s["name"] for s in cloud.ok("GET", "/sites", token=token)["sites"]}


def test_bad_bodies(cloud: ManagementCloud) -> None:
    status, body = call(
        f"{cloud.api}/plans",
        cloud.pki.client_ssl(None),
        method="POST",
        data=b"{not json",
        headers={"Authorization": f"Bearer {cloud.admin}", "Content-Type": "application/json"},
    )
    assert status == 400 and body["error"]["code"] == "bad_request"
    status, body = cloud.call("POST", "/tenants", body=["acme"])
    assert status == 400 and body["error"]["code"] == "invalid_input"
    status, body = cloud.call("GET", "/nothing-here")
    assert status == 404 and body["error"]["code"] == "not_found"


def test_roles_list(cloud: ManagementCloud) -> None:
    (role,) = cloud.ok("GET", "/roles")["roles"]
    assert role["role"] == "worker" and role["host"] == "localhost" and role["state"] == "Ready"
    assert role["config_version"] == 1 and role["desired_version"] == cloud.generation()
    assert role["code_version"] == "0.1.0" and role["reason"] == ""
    assert dt.datetime.fromisoformat(role["last_heartbeat"]).tzinfo is not None


def test_deploy_fails_soft_when_the_publisher_is_down(cloud: ManagementCloud) -> None:
    token, sub = _tenant_with_subscription(cloud, "deployer", "deployer-plan")
    cloud.ok("POST", "/sites", token=token, body={"name": "shipit", "subscription": sub})
    status, body = cloud.call("POST", "/sites/shipit/deploy", token=token)
    assert status == 503 and body["error"]["code"] == "unavailable", body
    # The API is still there afterwards.
    assert cloud.call("GET", "/health", token=None)[0] == 200


def test_site_url_has_no_port_on_443(tmp_path: Path) -> None:
    db = Database.sqlite(tmp_path / "db.sqlite")
    db.migrate()
    config = ManagementConfig(host="localhost", home=tmp_path, https_port=443, domain="example.net")
    store = Store(db, config)
    admin = Principal(None)
    store.create_plan(admin, {"name": "p", "max_sites": 1, "storage_mb": 1})
    store.create_tenant(admin, {"name": "t"})
    sub = store.create_subscription(admin, {"tenant": "t", "plan": "p"})
    site = store.create_site(admin, {"name": "shop", "subscription": sub["id"]})
    assert site["url"] == "https://shop.example.net/"
    db.dispose()


@pytest.mark.parametrize(
    ("changes", "fragment"),
    [
        ({f"V{i}": "x" * 4000 for i in range(20)}, "at most 65536 bytes"),
        ({"idle_timeout": "9" * 400}, "whole number of seconds"),
        ({"idle_timeout": "\u00b2"}, "whole number of seconds"),
        ({"SECRET": "lone \ud800"}, "UTF-8"),
        ({"SECRET": "nul\x00"}, "NUL"),
        ({"runtime": "ruby"}, "one of static, python, php, node, command"),
        ({"entry": "a\nb"}, "one line"),
        ({"PATH": "/x"}, "set by the platform"),
        ({"always_on": "maybe"}, "true or false"),
        ({"1BAD": "x"}, "not valid"),
        ({"OK": 5}, "must be a string"),
    ],
)
def test_settings_the_worker_cannot_run_get_400_and_change_nothing(
    cloud: ManagementCloud, changes: dict[str, Any], fragment: str
) -> None:
    token, sub = _tenant_with_subscription(cloud, f"t-{uuid.uuid4().hex[:8]}", f"p-{uuid.uuid4().hex[:8]}")
    site = f"s-{uuid.uuid4().hex[:8]}"
    cloud.ok("POST", "/sites", token=token, body={"name": site, "subscription": sub})
    cloud.ok("PATCH", f"/sites/{site}/settings", token=token, body={"KEEP": "1"})
    generation = cloud.generation()
    status, body = cloud.call("PATCH", f"/sites/{site}/settings", token=token, body=changes)
    assert status == 400, body
    assert fragment in body["error"]["message"] + body["error"].get("hint", ""), body
    assert cloud.ok("GET", f"/sites/{site}/settings", token=token)["settings"] == {"KEEP": "1"}
    assert cloud.generation() == generation
    # Another tenant's change goes through right after.
    other, other_sub = _tenant_with_subscription(
        cloud, f"t-{uuid.uuid4().hex[:8]}", f"p-{uuid.uuid4().hex[:8]}"
    )
    cloud.ok("POST", "/sites", token=other, body={"name": f"{site}-b", "subscription": other_sub})
    answer = cloud.ok("PATCH", f"/sites/{site}-b/settings", token=other, body={"GREETING": "hi"})
    assert answer["settings"] == {"GREETING": "hi"}


def test_the_environment_total_counts_what_is_already_stored(cloud: ManagementCloud) -> None:
    token, sub = _tenant_with_subscription(cloud, "envtotal", "envtotal-plan")
    cloud.ok("POST", "/sites", token=token, body={"name": "envtotal", "subscription": sub})
    for i in range(16):  # each call fine, 64,000 bytes or so in all
        cloud.ok("PATCH", "/sites/envtotal/settings", token=token, body={f"V{i}": "x" * 4000})
    status, body = cloud.call("PATCH", "/sites/envtotal/settings", token=token, body={"V16": "x" * 4000})
    assert status == 400 and "65536" in body["error"].get("hint", ""), body
    stored = cloud.ok("GET", "/sites/envtotal/settings", token=token)["settings"]
    assert len(stored) == 16 and "V16" not in stored
    # Making room (a null removes) in the same call is judged on the result.
    cloud.ok("PATCH", "/sites/envtotal/settings", token=token, body={"V0": None, "V16": "x" * 4000})


def test_every_405_says_which_methods_are_allowed(cloud: ManagementCloud) -> None:
    """RFC 9110 §15.5.6: a 405 carries ``Allow``; checked on every path of the OpenAPI document."""
    ctx = cloud.pki.client_ssl(None)

    def ask(method: str, path: str) -> tuple[int, str | None, Any]:
        conn = http.client.HTTPSConnection("localhost", cloud.config.api_port, context=ctx, timeout=10)
        try:
            conn.request(method, path, headers={"Authorization": f"Bearer {cloud.admin}"})
            resp = conn.getresponse()
            raw = resp.read()
            return resp.status, resp.getheader("Allow"), json.loads(raw) if raw else None
        finally:
            conn.close()

    status, _, document = ask("GET", "/openapi.json")
    assert status == 200
    checked = 0
    for path, item in document["paths"].items():
        listed = {m.upper() for m in item if m in ("get", "post", "put", "patch", "delete")}
        unused = next(m for m in ("PUT", "PATCH", "DELETE", "POST") if m not in listed)
        # Ids are digits in the routes; any other parameter is a name.
        url = re.sub(r"\{(\w+)\}", lambda m: "1" if m.group(1).endswith(("id", "version")) else "x", path)
        status, allow, body = ask(unused, url)
        assert status == 405, (unused, url, status, body)
        assert allow is not None and listed <= {m.strip() for m in allow.split(",")}, (url, allow)
        assert body["error"]["code"] == "method_not_allowed" and allow in body["error"]["message"]
        checked += 1
    assert checked >= 18


def test_plans_delete_only_when_unused_and_tenants_delete_with_everything(cloud: ManagementCloud) -> None:
    token, sub_id = _tenant_with_subscription(cloud, "leaver", "leaver-plan")
    cloud.ok("POST", "/sites", token=token, body={"name": "leaver-site", "subscription": sub_id})
    user = cloud.ok("POST", "/users", body={"username": "leaver-user", "tenant": "leaver"})

    # A plan in use is refused with what to do instead; nothing changes.
    status, answer = cloud.call("DELETE", "/plans/leaver-plan")
    assert status == 409 and answer["error"]["code"] == "in_use", answer
    assert "1 subscription" in answer["error"]["message"] and "retire" in answer["error"]["hint"]
    assert cloud.ok("GET", "/plans/leaver-plan")["subscriptions"] == 1
    # Tenants may not delete plans or tenants, nor read another tenant.
    assert cloud.call("DELETE", "/plans/leaver-plan", token=token)[0] == 403
    assert cloud.call("DELETE", "/tenants/leaver", token=token)[0] == 403
    assert cloud.call("GET", "/tenants/leaver", token=token)[0] == 403

    detail = cloud.ok("GET", "/tenants/leaver")
    assert [s["id"] for s in detail["subscriptions"]] == [sub_id]
    assert [s["name"] for s in detail["sites"]] == ["leaver-site"]
    assert [u["username"] for u in detail["users"]] == ["leaver-user"]
    assert cloud.call("GET", "/tenants/no-such-tenant")[0] == 404

    before = cloud.generation()
    assert cloud.call("DELETE", "/tenants/leaver")[0] == 204
    assert cloud.generation() > before
    assert cloud.call("GET", "/tenants/leaver")[0] == 404
    assert cloud.call("GET", "/sites/leaver-site")[0] == 404
    assert cloud.call("GET", f"/subscriptions/{sub_id}")[0] == 404
    # Its token and its users went with it.
    assert cloud.call("GET", "/me", token=token)[0] == 401
    assert "leaver-user" not in [u["username"] for u in cloud.ok("GET", "/users")["users"]]
    assert user["username"] == "leaver-user"
    assert cloud.call("DELETE", "/tenants/leaver")[0] == 404

    # Unused now: the plan can go.
    assert cloud.call("DELETE", "/plans/leaver-plan")[0] == 204
    assert cloud.call("GET", "/plans/leaver-plan")[0] == 404
    assert cloud.call("DELETE", "/plans/leaver-plan")[0] == 404


def test_a_reset_link_is_issued_by_admins_only(cloud: ManagementCloud) -> None:
    token, _ = _tenant_with_subscription(cloud, "forgetful", "forgetful-plan")
    cloud.ok("POST", "/users", body={"username": "forgetful-user", "tenant": "forgetful"})
    link = cloud.ok("POST", "/users/forgetful-user/reset-link")
    assert link["username"] == "forgetful-user"
    assert re.fullmatch(r"https://localhost:\d+/reset-password/[A-Za-z0-9_-]{43}", link["url"]), link
    expires = dt.datetime.fromisoformat(link["expires_at"])
    assert dt.timedelta(minutes=59) < expires - dt.datetime.now(dt.UTC) <= dt.timedelta(hours=1)
    # Only a hash of the token is stored.
    with cloud.db.session() as s:
        stored = s.scalars(select(PasswordReset.token_hash)).all()
    secret = link["url"].rsplit("/", 1)[1]
    assert secret not in stored and hash_token(secret) in stored
    assert cloud.call("POST", "/users/forgetful-user/reset-link", token=token)[0] == 403
    status, answer = cloud.call("POST", "/users/nobody-here/reset-link")
    assert status == 404 and answer["error"]["message"] == "no user 'nobody-here'"
