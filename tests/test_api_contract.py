"""The API contract from a client's side: a Python client generated from /openapi.json by
openapi-python-client runs a tenant's flow against a real management process; lists page with
limit/cursor and filter; unknown query parameters and bad pages are refused saying what is allowed."""

from __future__ import annotations

import contextlib
import hashlib
import importlib
import json
import os
import shutil
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any
from urllib.parse import quote

import pytest

from roles.management._cli_client import ApiClient, Endpoints
from tests.support import call
from tests.test_management_api import ManagementCloud, start_management

# Generated clients are cached by the document's hash: a second run with the same API skips generation.
_CACHE = Path("/tmp/sitecloud-openapi-client")
_PACKAGE = "sitecloud_api_client"


@pytest.fixture(scope="module")
def cloud(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ManagementCloud]:
    yield from start_management(tmp_path_factory.mktemp("contract"))


def _unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


def _tenant(cloud: ManagementCloud, max_sites: int = 10) -> tuple[str, str, int]:
    """A new tenant subscribed to a new plan: its name, token and subscription id."""
    plan, tenant = _unique("plan"), _unique("ten")
    cloud.ok("POST", "/plans", body={"name": plan, "max_sites": max_sites, "storage_mb": 10})
    token = cloud.ok("POST", "/tenants", body={"name": tenant})["token"]
    sub = cloud.ok("POST", "/subscriptions", body={"tenant": tenant, "plan": plan})
    return tenant, token, int(sub["id"])


def _generate(document: dict[str, Any]) -> Path:
    """The generated client package's parent directory, from the cache when the document is unchanged."""
    spec = json.dumps(document, sort_keys=True).encode()
    digest = hashlib.sha256(spec).hexdigest()[:16]
    home = _CACHE / digest
    if (home / _PACKAGE / "__init__.py").exists():
        return home
    generator = shutil.which("openapi-python-client", path=str(Path(sys.executable).parent))
    if generator is None:
        pytest.skip("openapi-python-client is not installed (pip install -e '.[test]')")
    work = _CACHE / f"{digest}.{os.getpid()}.tmp"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    (work / "spec.json").write_bytes(spec)
    # No post hooks: formatting the generated code is not needed to use it.
    (work / "config.json").write_text(json.dumps({"package_name_override": _PACKAGE, "post_hooks": []}))
    started = time.monotonic()
    done = subprocess.run(
        [
            generator,
            "generate",
            "--path",
            str(work / "spec.json"),
            "--config",
            str(work / "config.json"),
            "--meta",
            "none",
            "--output-path",
            str(work / "out" / _PACKAGE),
        ],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert time.monotonic() - started < 30
    # Everything but the binary-bodied and non-JSON calls (deploy, profile, logs, NDJSON) is generated.
    assert "Endpoint will not be generated" not in done.stdout.replace(
        "POST /api/v1/sites/{name}/deploy within sites. Endpoint will not be generated", ""
    ), done.stdout
    # Another run may have put the same client there first.
    with contextlib.suppress(OSError):
        (work / "out").rename(home)
    shutil.rmtree(work, ignore_errors=True)
    return home


@pytest.fixture(scope="module")
def client_package(cloud: ManagementCloud) -> Iterator[ModuleType]:
    status, document = call(
        f"https://localhost:{cloud.config.api_port}/openapi.json", cloud.pki.client_ssl(None)
    )
    assert status == 200
    home = _generate(document)
    sys.path.insert(0, str(home))
    try:
        yield importlib.import_module(_PACKAGE)
    finally:
        sys.path.remove(str(home))
        for name in [n for n in sys.modules if n == _PACKAGE or n.startswith(f"{_PACKAGE}.")]:
            del sys.modules[name]


def test_a_generated_client_runs_a_tenant_flow(cloud: ManagementCloud, client_package: ModuleType) -> None:
    pkg = _PACKAGE
    api = {
        name: importlib.import_module(f"{pkg}.api.{tag}.{name}")
        for tag, name in [
            ("plans", "create_plan"),
            ("tenants", "create_tenant"),
            ("subscriptions", "create_subscription"),
            ("sites", "create_site"),
            ("sites", "list_sites"),
            ("sites", "show_site"),
            ("sites", "delete_site"),
            ("accounts", "whoami"),
        ]
    }
    models = importlib.import_module(f"{pkg}.models")
    base = f"https://localhost:{cloud.config.api_port}"
    ssl = cloud.pki.client_ssl(None)

    def client(token: str) -> Any:
        return client_package.AuthenticatedClient(base_url=base, token=token, verify_ssl=ssl)

    with client(cloud.admin) as admin:
        _flow(admin, client, models, api, client_package)


def _flow(admin: Any, client: Any, models: Any, api: dict[str, Any], package: Any) -> None:
    plan_name, tenant_name = _unique("gen-plan"), _unique("gen-ten")
    plan = api["create_plan"].sync(
        client=admin, body=models.PlanCreate(name=plan_name, max_sites=5, storage_mb=20)
    )
    assert isinstance(plan, models.Plan) and plan.name == plan_name and plan.max_sites == 5
    tenant = api["create_tenant"].sync(client=admin, body=models.TenantCreate(name=tenant_name))
    assert isinstance(tenant, models.TenantCreatedToken) and tenant.token.startswith("sct_")
    sub = api["create_subscription"].sync(
        client=admin, body=models.SubscriptionCreate(plan=plan_name, tenant=tenant_name)
    )
    assert isinstance(sub, models.Subscription) and sub.tenant == tenant_name and sub.state.value == "active"

    with client(tenant.token) as owner:
        me = api["whoami"].sync(client=owner)
        assert isinstance(me, models.Me) and me.tenant == tenant_name and me.admin is False
        names = sorted(_unique("gen") for _ in range(3))
        for name in names:
            site = api["create_site"].sync(
                client=owner, body=models.SiteCreate(name=name, subscription=sub.id)
            )
            assert isinstance(site, models.Site) and site.name == name and site.ftp.password
        # A refusal comes back as the shared Error model.
        refused = api["create_site"].sync(
            client=owner, body=models.SiteCreate(name="Bad_Name", subscription=sub.id)
        )
        assert isinstance(refused, models.Error) and refused.error.code == "invalid_input"
        assert "'bad-name'" in refused.error.hint

        # Two pages of two, then one: every site once, in order.
        seen: list[str] = []
        cursor: Any = package.types.UNSET
        pages = 0
        while True:
            page = api["list_sites"].sync(client=owner, limit=2, cursor=cursor)
            assert isinstance(page, models.SiteList), page
            seen += [s.name for s in page.sites]
            pages += 1
            if page.next_cursor is None:
                break
            cursor = page.next_cursor
        assert seen == names and pages == 2

        shown = api["show_site"].sync(client=owner, name=names[0])
        assert isinstance(shown, models.Site) and shown.tenant == tenant_name
        deleted = api["delete_site"].sync_detailed(client=owner, name=names[0])
        assert deleted.status_code == 204
        gone = api["show_site"].sync(client=owner, name=names[0])
        assert isinstance(gone, models.Error) and gone.error.code == "not_found"
        left = api["list_sites"].sync(client=owner)
        assert isinstance(left, models.SiteList) and [s.name for s in left.sites] == names[1:]
        assert left.next_cursor is None


def _pages(cloud: ManagementCloud, path: str, key: str, limit: int, token: str = "admin") -> list[list[Any]]:
    pages: list[list[Any]] = []
    cursor = None
    sep = "&" if "?" in path else "?"
    while True:
        query = f"{sep}limit={limit}" + (f"&cursor={quote(cursor)}" if cursor else "")
        answer = cloud.ok("GET", f"{path}{query}", token=token)
        pages.append(answer[key])
        cursor = answer["next_cursor"]
        if cursor is None:
            return pages
        assert len(answer[key]) == limit


def test_every_list_pages_to_the_same_items_as_one_call(cloud: ManagementCloud) -> None:
    tenant, token, sub = _tenant(cloud)
    for i in range(5):
        cloud.ok("POST", "/sites", token=token, body={"name": f"{tenant}-s{i}", "subscription": sub})
    cloud.ok("POST", "/tokens", token=token, body={"name": "second"})
    cloud.ok("POST", "/users", body={"username": _unique("user"), "tenant": tenant})
    for path, key, who in [
        ("/sites", "sites", token),
        ("/sites", "sites", "admin"),
        ("/subscriptions", "subscriptions", "admin"),
        ("/plans", "plans", "admin"),
        ("/tenants", "tenants", "admin"),
        ("/users", "users", "admin"),
        ("/tokens", "tokens", token),
        ("/roles", "roles", "admin"),
        ("/hosts", "hosts", "admin"),
        (f"/sites/{tenant}-s0/hostnames", "hostnames", token),
    ]:
        whole = cloud.ok("GET", path, token=who)
        assert whole["next_cursor"] is None, path
        pages = _pages(cloud, path, key, 2, token=who)
        assert [item for page in pages for item in page] == whole[key], path
    assert [len(p) for p in _pages(cloud, "/sites", "sites", 2, token=token)] == [2, 2, 1]


def test_a_site_deleted_between_pages_neither_repeats_nor_skips_another(cloud: ManagementCloud) -> None:
    tenant, token, sub = _tenant(cloud)
    names = [f"{tenant}-k{i}" for i in range(4)]
    for name in names:
        cloud.ok("POST", "/sites", token=token, body={"name": name, "subscription": sub})
    first = cloud.ok("GET", "/sites?limit=2", token=token)
    assert [s["name"] for s in first["sites"]] == names[:2]
    cloud.ok("DELETE", f"/sites/{names[1]}", token=token)
    rest = cloud.ok("GET", f"/sites?limit=2&cursor={first['next_cursor']}", token=token)
    assert [s["name"] for s in rest["sites"]] == names[2:] and rest["next_cursor"] is None


def test_filters(cloud: ManagementCloud) -> None:
    tenant, token, sub = _tenant(cloud)
    other, other_token, other_sub = _tenant(cloud)
    cloud.ok("POST", "/sites", token=token, body={"name": f"{tenant}-a", "subscription": sub})
    cloud.ok("POST", "/sites", token=token, body={"name": f"{tenant}-b", "subscription": sub})
    cloud.ok("POST", "/sites", token=other_token, body={"name": f"{other}-a", "subscription": other_sub})
    cloud.ok("POST", f"/sites/{tenant}-b/stop", token=token)

    def names(path: str, key: str = "sites", who: str = "admin") -> list[str]:
        return [item.get("name", item.get("id")) for item in cloud.ok("GET", path, token=who)[key]]

    assert names(f"/sites?tenant={tenant}") == [f"{tenant}-a", f"{tenant}-b"]
    assert names(f"/sites?tenant={tenant}&state=stopped") == [f"{tenant}-b"]
    assert names(f"/sites?subscription={other_sub}") == [f"{other}-a"]
    # A tenant's filter works inside what it may see: another tenant's name finds nothing.
    assert names(f"/sites?tenant={other}", who=token) == []
    assert names(f"/sites?tenant={tenant}", who=token) == [f"{tenant}-a", f"{tenant}-b"]
    assert names(f"/subscriptions?tenant={other}", "subscriptions") == [other_sub]
    cloud.ok("POST", f"/subscriptions/{other_sub}/suspend")
    suspended = names("/subscriptions?state=suspended", "subscriptions")
    assert other_sub in suspended and sub not in suspended
    plan = cloud.ok("GET", f"/subscriptions/{sub}")["plan"]
    assert names(f"/subscriptions?plan={plan}", "subscriptions") == [sub]
    users = cloud.ok("GET", f"/users?tenant={tenant}")["users"]
    assert all(u["tenant"] == tenant for u in users)
    assert names("/roles?role=worker", "roles") == [None] and names("/roles?role=frontend", "roles") == []


@pytest.mark.parametrize(
    ("query", "says", "hint"),
    [
        (
            "?page=2",
            "unknown query parameter(s): page",
            "allowed: cursor, limit, state, subscription, tenant",
        ),
        ("?limit=0", "'limit' must be an integer from 1 to 1000", "got '0'"),
        ("?limit=1001", "'limit' must be an integer from 1 to 1000", "got '1001'"),
        ("?limit=many", "'limit' must be an integer from 1 to 1000", "got 'many'"),
        ("?state=asleep", "'state' must be one of running, stopped", "got 'asleep'"),
        ("?cursor=not-a-cursor", "the cursor is not one this list gave", "next_cursor"),
        ("?limit=1&limit=2", "more than once: limit", ""),
    ],
)
def test_bad_list_queries_get_400_saying_what_is_allowed(
    cloud: ManagementCloud, query: str, says: str, hint: str
) -> None:
    status, body = cloud.call("GET", f"/sites{query}")
    assert status == 400 and body["error"]["code"] == "invalid_input", body
    assert says in body["error"]["message"] and hint in body["error"].get("hint", ""), body


def test_a_cursor_of_another_list_is_refused(cloud: ManagementCloud) -> None:
    _, token, sub = _tenant(cloud)
    for name in ("x1", "x2"):
        cloud.ok("POST", "/sites", token=token, body={"name": f"{_unique(name)}", "subscription": sub})
    site_cursor = cloud.ok("GET", "/sites?limit=1", token=token)["next_cursor"]
    # Sites page by name, subscriptions by id: one's cursor is no good for the other.
    status, body = cloud.call("GET", f"/subscriptions?cursor={site_cursor}")
    assert status == 400 and "cursor" in body["error"]["message"]


def test_unknown_query_parameters_are_refused_on_every_call(cloud: ManagementCloud) -> None:
    status, body = cloud.call("GET", "/me?verbose=1")
    assert status == 400 and body["error"]["hint"] == "this call takes no query parameters"
    status, body = cloud.call("GET", "/health?x=1", token=None)
    assert status == 400
    # Still authenticated first: no token is a 401 whatever the query.
    assert cloud.call("GET", "/sites?page=2", token=None)[0] == 401


def test_bad_bodies_name_the_field_and_what_it_takes(cloud: ManagementCloud) -> None:
    status, body = cloud.call("POST", "/plans", body={"name": "p", "max_sites": 1, "storage_mb": 10**9})
    assert status == 400 and body["error"]["message"] == "'storage_mb' must be an integer from 1 to 10000000"
    status, body = cloud.call(
        "POST", "/plans", body={"name": "p", "max_sites": 1, "storage_mb": 1, "colour": 1}
    )
    assert status == 400 and body["error"]["message"] == "unknown field(s) for a plan: colour"
    assert "storage_mb" in body["error"]["hint"]
    status, body = cloud.call("POST", "/plans", body={"max_sites": 1, "storage_mb": 1})
    assert status == 400 and body["error"]["message"] == "'name' is required"
    status, body = cloud.call("POST", "/sites/nothing/scale", body={"instances": True})
    assert status == 400 and body["error"]["message"] == "'instances' must be an integer from 1 to 1000"


def test_the_cli_client_follows_every_page(cloud: ManagementCloud, tmp_path: Path) -> None:
    tenant, token, sub = _tenant(cloud)
    names = [f"{tenant}-c{i}" for i in range(5)]
    for name in names:
        cloud.ok("POST", "/sites", token=token, body={"name": name, "subscription": sub})
    home = cloud.write_endpoints(tmp_path / "home")
    client = ApiClient(Endpoints.load(home), token)
    listed = client.list_all(client.path("sites"), "sites", page_size=2)
    assert [s["name"] for s in listed["sites"]] == names and "next_cursor" not in listed
