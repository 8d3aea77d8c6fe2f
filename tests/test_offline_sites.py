"""What visitors, tenants and deployers are told while a site serves nothing, end to end through
`sitecloud up`: a stopped site and a suspended subscription's site say so to their visitors (not "no
site here"), and the tenant sees `suspended`; with every worker stopped a deploy is stored but not
claimed to be served, and a tenant's `site show` names no internal address."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from tests.cloud import LocalCloud, basic_tenant, running_cloud
from tests.support import wait_until

pytestmark = pytest.mark.timeout(300)


@pytest.fixture(scope="module")
def cloud(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalCloud]:
    yield from running_cloud(tmp_path_factory)


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
