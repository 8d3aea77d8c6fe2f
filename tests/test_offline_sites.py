"""What visitors, tenants and deployers are told while a site serves nothing, end to end through
`sitecloud up`: a stopped site and a suspended subscription's site say so to their visitors (not "no
site here"), and the tenant sees `suspended`; with every worker stopped a deploy is stored but not
claimed to be served, and a tenant's `site show` names no internal address."""

from __future__ import annotations

import base64
import json
import os
import ssl
import subprocess
import sys
import urllib.error
import urllib.request
import zipfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from tests.cloud import LocalCloud, basic_tenant, running_cloud
from tests.support import wait_until

pytestmark = pytest.mark.timeout(300)


@pytest.fixture(scope="module")
def cloud(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalCloud]:
    # A deploy goes on without a worker it cannot ask after 5 s; the stopped ones here need not wait.
    yield from running_cloud(tmp_path_factory, settings={"publisher": {"build_unreached_grace": 1}})


@pytest.fixture(scope="module")
def tenant(cloud: LocalCloud, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    tenant = basic_tenant(cloud)
    tenant["site"] = cloud.cli(
        "site", "create", "shop", "--subscription", str(tenant["subscription"]), token=tenant["token"]
    )
    tree = tmp_path_factory.mktemp("shop")
    (tree / "index.html").write_bytes(b"<h1>shop</h1>")
    cloud.cli("deploy", "shop", str(tree), token=tenant["token"])
    cloud.wait_for_content("shop", "/", b"<h1>shop</h1>")
    return tenant


def _page(cloud: LocalCloud, status: int, title: bytes) -> None:
    def shown() -> bool:
        got, _, body = cloud.get("shop", "/cart")
        return got == status and title in body

    wait_until(shown, timeout=20, what=f"shop to answer {status} {title!r}")


def test_a_stopped_and_a_suspended_site_tell_their_visitors_so_and_the_tenant_sees_it(
    cloud: LocalCloud, tenant: dict[str, Any]
) -> None:
    # Before, both got the front end's 404 "No site here ... check the address you typed", and the
    # tenant's CLI said `running` for a suspended subscription's sites.
    token, sub = tenant["token"], str(tenant["subscription"])
    cloud.cli("site", "stop", "shop", token=token)
    _page(cloud, 403, b"This site is stopped")
    cloud.cli("site", "start", "shop", token=token)
    cloud.wait_for_content("shop", "/", b"<h1>shop</h1>")

    assert cloud.cli("subscription", "suspend", sub)["state"] == "suspended"
    try:
        _page(cloud, 403, b"This site is suspended")
        _, _, body = cloud.get("shop", "/")
        # The state, and nothing of the tenant, its plan or why.
        assert b"contoso" not in body and b"basic" not in body and b"shop" not in body, body
        assert cloud.cli("site", "show", "shop", token=token)["state"] == "suspended"
        listed = {s["name"]: s["state"] for s in cloud.cli("site", "list", token=token)["sites"]}
        assert listed == {"shop": "suspended"}, listed
        assert "suspended" in cloud.cli_text("site", "show", "shop", "--token", token)
    finally:
        assert cloud.cli("subscription", "resume", sub)["state"] == "active"
    cloud.wait_for_content("shop", "/", b"<h1>shop</h1>")
    assert cloud.cli("site", "show", "shop", token=token)["state"] == "running"
    assert cloud.get("nosuchsite")[0] == 404


def test_suspending_and_resuming_a_subscription_answer_its_stored_content(
    cloud: LocalCloud, tenant: dict[str, Any]
) -> None:
    # Before, `subscription suspend` and `resume` printed "storage  ?/5 MB".
    sub = str(tenant["subscription"])
    stored = cloud.cli("subscription", "show", sub)["usage"]["storage_bytes"]
    assert stored, stored
    try:
        printed = cloud.cli_text("subscription", "suspend", sub)
        assert "?" not in printed and "storage" in printed, printed
        assert cloud.cli("subscription", "show", sub)["usage"]["storage_bytes"] == stored
    finally:
        resumed = cloud.cli("subscription", "resume", sub)
    assert resumed["state"] == "active" and resumed["usage"]["storage_bytes"] == stored, resumed
    cloud.wait_for_content("shop", "/", b"<h1>shop</h1>")


def _sitecloud(cloud: LocalCloud, *args: str, token: str) -> subprocess.CompletedProcess[str]:
    """`sitecloud ...` as a tenant types it: its exit code and what it printed."""
    return subprocess.run(
        [sys.executable, "-m", "roles.management.cli", "--home", str(cloud.home), *args],
        capture_output=True,
        text=True,
        env={**os.environ, "SITECLOUD_TOKEN": token},
        timeout=120,
    )


def _worker_state(cloud: LocalCloud) -> str:
    return str(next(r["state"] for r in cloud.cli("role", "list")["roles"] if r["role"] == "worker"))


def _zipdeploy(cloud: LocalCloud, site: dict[str, Any], tmp_path: Path) -> tuple[int, dict[str, Any]]:
    """Kudu's synchronous zip deploy with the site's publishing credentials: its status and record."""
    archive = tmp_path / "site.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        zf.writestr("index.html", b"<h1>zipped</h1>")
    url = site["deploy"]["url"].replace(f"/api/deploy/{site['name']}", f"/api/zipdeploy?site={site['name']}")
    auth = base64.b64encode(f"{site['deploy']['user']}:{site['deploy']['password']}".encode()).decode()
    request = urllib.request.Request(
        url, data=archive.read_bytes(), method="POST", headers={"Authorization": f"Basic {auth}"}
    )
    ctx = ssl.create_default_context(cafile=str(cloud.ca_file))
    try:
        with urllib.request.urlopen(request, context=ctx, timeout=60) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


@contextmanager
def _workers_stopped(cloud: LocalCloud) -> Iterator[None]:
    """Every worker of the cloud stopped (`role stop worker`), as an admin may; started again after."""
    cloud.cli("role", "stop", "worker", "localhost", "--yes")
    try:
        wait_until(lambda: _worker_state(cloud) == "Stopped", timeout=30, what="the worker to stop")
        yield
    finally:
        cloud.cli("role", "start", "worker", "localhost")
    wait_until(lambda: _worker_state(cloud) == "Ready", timeout=60, what="the worker to be back")


def test_with_every_worker_stopped_a_deploy_is_stored_but_not_called_served(
    cloud: LocalCloud, tenant: dict[str, Any], tmp_path: Path
) -> None:
    token = tenant["token"]
    tree = tmp_path / "tree"
    tree.mkdir()
    (tree / "index.html").write_bytes(b"<h1>new</h1>")
    with _workers_stopped(cloud):
        # Before, this said "content version N, served" and exited 0 while visitors got 502.
        done = _sitecloud(cloud, "deploy", "shop", str(tree), token=token)
        assert done.returncode == 6, (done.returncode, done.stdout, done.stderr)
        assert "served" not in done.stdout, done.stdout
        assert "is stored, but no worker is running to serve it" in done.stderr, done.stderr
        assert "hint: ask an admin to start the site's workers" in done.stderr, done.stderr
        # Kudu's deploy record is not a success either.
        status, record = _zipdeploy(cloud, tenant["site"], tmp_path)
        assert status == 503 and record["status_text"] == "failed" and not record["active"], (status, record)
        assert "no worker is running to serve it" in record["message"], record
    # What was stored is served once a worker runs, and a deploy says served again.
    cloud.wait_for_content("shop", "/", b"<h1>zipped</h1>", timeout=30)
    done = _sitecloud(cloud, "deploy", "shop", str(tree), token=token)
    assert done.returncode == 0 and done.stdout.rstrip().endswith(", served"), (done.stdout, done.stderr)
    cloud.wait_for_content("shop", "/", b"<h1>new</h1>")


def test_a_tenant_s_site_show_names_no_internal_address_when_its_workers_cannot_be_reached(
    cloud: LocalCloud, tenant: dict[str, Any]
) -> None:
    token = tenant["token"]
    with _workers_stopped(cloud):
        # Before, it printed "app on localhost: unknown (cannot reach https://<address>:<control
        # port>/v1/sites/...: Cannot connect to host ...)": the worker's host, address and port.
        shown = cloud.cli("site", "show", "shop", token=token)
        assert shown["apps"] == [{"state": "unknown", "reason": "the server is unavailable"}], shown["apps"]
        printed = _sitecloud(cloud, "site", "show", "shop", token=token).stdout
        assert printed.splitlines()[-1] == "app: state unknown (the server is unavailable)", printed
        assert "localhost" not in printed.replace("sites.localhost", "") and "/v1/" not in printed, printed
        # Nor does its log, which cannot be read now.
        logs = _sitecloud(cloud, "site", "logs", "shop", token=token)
        assert logs.returncode == 6, (logs.stdout, logs.stderr)
        assert logs.stderr.startswith("error: the site's log cannot be read now: its server is unavailable")
        assert "https://" not in logs.stderr and "localhost" not in logs.stderr, logs.stderr
        # The admin sees which worker and what to look at, but not the client library's error either.
        admin = cloud.cli("site", "show", "shop")
        assert [(a["worker"], a["state"]) for a in admin["apps"]] == [("localhost", "unknown")], admin
        assert admin["apps"][0]["reason"] == (
            "the worker cannot be reached (connection refused): see `sitecloud role list`"
        ), admin["apps"]


def test_a_stopped_site_shows_no_app(cloud: LocalCloud, tenant: dict[str, Any]) -> None:
    # Before, a stopped static site's `site show` ended "app on localhost: state unknown (its server
    # could not say)": a stopped site has no app to ask about.
    token = tenant["token"]
    cloud.cli("site", "stop", "shop", token=token)
    try:
        assert cloud.cli("site", "show", "shop", token=token)["apps"] == []
        printed = _sitecloud(cloud, "site", "show", "shop", token=token).stdout
        assert "app" not in printed.splitlines()[-1], printed
    finally:
        cloud.cli("site", "start", "shop", token=token)
