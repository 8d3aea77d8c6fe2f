"""The tenant portal on a whole cloud (`sitecloud up`): a zip deployed from the browser goes live, and the
tenant opens the site in Chromium; the admin dashboard shows every role and the storage used."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.cloud import LocalCloud
from tests.test_portal import (
    CHROMIUM,
    CHROMIUM_ARGS,
    PASSWORD,
    admin_user,
    make_zip,
    shot,
    sign_in,
    submit,
    sync_api,
)

pytestmark = [
    pytest.mark.timeout(180),
    pytest.mark.skipif(
        not CHROMIUM.exists(), reason="Debian chromium is not installed (apt-get install chromium)"
    ),
]


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
        # A zombie waiting for its parent counts as gone.
        return "zombie" not in Path(f"/proc/{pid}/status").read_text().lower()
    except (ProcessLookupError, FileNotFoundError):
        return False


@pytest.fixture
def cloud(tmp_path: Path) -> Iterator[LocalCloud]:
    cloud = LocalCloud(tmp_path / "home")
    cloud.start()
    try:
        yield cloud
    finally:
        cloud.stop()


def test_deploy_from_the_browser_and_open_the_site(cloud: LocalCloud, tmp_path: Path) -> None:
    portal = f"https://localhost:{cloud.ports['api_port']}"
    admin_name, admin_password = admin_user(cloud.home)
    cloud.cli("plan", "create", "basic", "--max-sites", "3", "--storage-mb", "20", "--public")
    cloud.cli("settings", "set", "--signup", "open")
    site_zip = tmp_path / "site.zip"
    site_zip.write_bytes(
        make_zip({"index.html": b"<h1>deployed from the portal</h1>", "css/site.css": b"h1{}"})
    )

    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            ctx: Any = browser.new_context(
                ignore_https_errors=True, java_script_enabled=False, viewport={"width": 1280, "height": 860}
            )
            tenant = ctx.new_page()
            tenant.goto(f"{portal}/signup")
            tenant.fill("#username", "northwind")
            tenant.fill("#password", PASSWORD)
            tenant.fill("#confirm", PASSWORD)
            submit(tenant, "button[type=submit]")
            submit(tenant, "button:text-is('Subscribe to basic')")
            tenant.fill("#site-name", "shop")
            submit(tenant, "button:text-is('Create site')")
            assert tenant.locator("h1").inner_text().startswith("shop")

            tenant.set_input_files("#zip", str(site_zip))
            submit(tenant, "button:text-is('Deploy')")
            assert "Deployed 2 file(s)" in tenant.inner_text(".notice"), tenant.inner_text("main")[:500]
            cloud.wait_for_content("shop", "/", b"<h1>deployed from the portal</h1>")
            # Chromium resolves *.localhost to loopback itself.
            site = ctx.new_page()
            site.goto(f"https://shop.sites.localhost:{cloud.ports['https_port']}/")
            assert site.inner_text("h1") == "deployed from the portal"
            site.close()
            tenant.goto(f"{portal}/portal/")
            shot(tenant, "tenant-home")
            tenant.goto(f"{portal}/portal/sites/shop")
            assert "Storage used" in tenant.inner_text("main")

            admin_ctx: Any = browser.new_context(
                ignore_https_errors=True, viewport={"width": 1280, "height": 860}
            )
            admin = admin_ctx.new_page()
            sign_in(admin, portal, admin_name, admin_password)
            table = admin.inner_text("main")
            for kind in ("fileserver", "worker", "publisher", "frontend", "management"):
                assert kind in table
            shot(admin, "admin-dashboard")
            # Restart a role from the dashboard: a new process, Ready again, and the site still served.
            before = cloud.role_pids()["worker"]
            submit(admin, "button[aria-label='Restart worker on localhost']")
            assert "Role restarted." in admin.inner_text(".notice"), admin.inner_text("main")[:500]
            assert cloud.role_pids()["worker"] != before
            assert "ready" in admin.locator("tr", has_text="worker").inner_text().lower()
            cloud.wait_for_content("shop", "/", b"<h1>deployed from the portal</h1>")
            # Stopping asks first; the row then offers Start, which brings it back.
            submit(admin, "a[aria-label='Stop publisher on localhost']")
            submit(admin, "button:text-is('Stop publisher')")
            assert "Role stopped" in admin.inner_text(".notice"), admin.inner_text("main")[:500]
            assert "publisher" not in cloud.role_pids() or not _alive(cloud.role_pids()["publisher"])
            submit(admin, "button[aria-label='Start publisher on localhost']")
            assert "Role started." in admin.inner_text(".notice"), admin.inner_text("main")[:500]
            assert _alive(cloud.role_pids()["publisher"])
            admin.goto(f"{portal}/admin/tenants")
            assert "northwind" in admin.inner_text("table")
            shot(admin, "admin-tenants")
            admin_ctx.close()
            ctx.close()
        finally:
            browser.close()
