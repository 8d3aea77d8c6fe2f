"""The tenant portal on a whole cloud (`sitecloud up`): a zip deployed from the browser goes live, and the
tenant opens the site in Chromium; a scheduled backup is restored, a slot is made, published and swapped
in from the browser; the admin dashboard shows every role and the storage used."""

from __future__ import annotations

import ftplib
import io
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from roles.management.config import BACKUP_MIN_EVERY_ENV
from tests.cloud import LocalCloud
from tests.support import wait_until
from tests.test_portal import (
    CHROMIUM,
    CHROMIUM_ARGS,
    PASSWORD,
    admin_user,
    make_zip,
    shot,
    sign_in,
    signed_in_page,
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
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv(BACKUP_MIN_EVERY_ENV, "2")  # scheduled backups every 2 s, so one is taken during the test
        cloud.start()
    try:
        yield cloud
    finally:
        cloud.stop()


def test_deploy_from_the_browser_and_open_the_site(cloud: LocalCloud, tmp_path: Path) -> None:
    portal = f"https://localhost:{cloud.ports['api_port']}"
    admin_name, admin_password = admin_user(cloud.home)
    cloud.cli(
        "plan", "create", "basic", "--max-sites", "3", "--storage-mb", "20", "--public",
        "--backup-every", "2s",
    )  # fmt: skip
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
            assert "Deployed 2 files" in tenant.inner_text(".notice"), tenant.inner_text("main")[:500]
            cloud.wait_for_content("shop", "/", b"<h1>deployed from the portal</h1>")
            # Chromium resolves *.localhost to loopback itself.
            site = ctx.new_page()
            site.goto(f"https://shop.sites.localhost:{cloud.ports['https_port']}/")
            assert site.inner_text("h1") == "deployed from the portal"
            site.close()
            _restore_a_backup(cloud, tenant, portal, tmp_path)
            _make_publish_and_swap_a_slot(cloud, tenant, tmp_path)
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
            cloud.wait_for_content("shop", "/", b"<h1>staging edition</h1>")  # swapped in above
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


def _restore_a_backup(cloud: LocalCloud, tenant: Any, portal: str, tmp_path: Path) -> None:
    """The scheduled backup of the first deploy, restored from the site's page after a second deploy."""
    for _ in range(60):
        tenant.goto(f"{portal}/portal/sites/shop")
        if tenant.locator("a[aria-label^='Restore the backup']").count():
            break
        tenant.wait_for_timeout(500)
    else:
        raise AssertionError("no scheduled backup listed: " + tenant.inner_text("main")[:500])
    second = tmp_path / "second.zip"
    second.write_bytes(make_zip({"index.html": b"<h1>second edition</h1>"}))
    tenant.set_input_files("#zip", str(second))
    submit(tenant, "button:text-is('Deploy')")
    cloud.wait_for_content("shop", "/", b"<h1>second edition</h1>")
    # The backup lists oldest last on the page: the only one holding the first deploy.
    submit(tenant, "a[aria-label^='Restore the backup'] >> nth=-1")
    assert "as a new version" in tenant.inner_text("main"), tenant.inner_text("main")[:500]
    submit(tenant, "button:text-is('Restore this backup')")
    assert "Restored from" in tenant.inner_text(".notice"), tenant.inner_text("main")[:500]
    cloud.wait_for_content("shop", "/", b"<h1>deployed from the portal</h1>")


def _make_publish_and_swap_a_slot(cloud: LocalCloud, tenant: Any, tmp_path: Path) -> None:
    tenant.fill("#key", "DB_URL")
    tenant.fill("#value", "postgres://production")
    submit(tenant, "button:text-is('Set')")
    submit(tenant, "button[aria-label='Make sticky DB_URL']")
    assert "sticky" in tenant.locator("tr", has_text="DB_URL").inner_text()

    tenant.fill("#slot", "staging")
    submit(tenant, "button:text-is('Add slot')")
    # The slot's own page, with its publishing password shown once.
    assert tenant.locator("h1").inner_text().startswith("shop-staging"), tenant.inner_text("main")[:500]
    assert tenant.inner_text("#publishing-password").strip()
    assert "deployment slot" in tenant.inner_text("main")
    # Sticky settings stay with production's address: the slot starts without it.
    assert "DB_URL" not in tenant.inner_text("main")
    staging = tmp_path / "staging.zip"
    staging.write_bytes(make_zip({"index.html": b"<h1>staging edition</h1>"}))
    tenant.set_input_files("#zip", str(staging))
    submit(tenant, "button:text-is('Deploy')")
    cloud.wait_for_content("shop-staging", "/", b"<h1>staging edition</h1>")

    tenant.goto(tenant.url.replace("/shop-staging", "/shop"))
    row = tenant.locator("tr", has_text="staging").inner_text()
    assert "shop-staging" in row, row
    submit(tenant, "a[aria-label='Swap with staging']")
    assert "warmed" in tenant.inner_text("main")
    submit(tenant, "button:text-is('Swap with staging')")
    assert "Swapped" in tenant.inner_text(".notice"), tenant.inner_text("main")[:500]
    cloud.wait_for_content("shop", "/", b"<h1>staging edition</h1>")
    cloud.wait_for_content("shop-staging", "/", b"<h1>deployed from the portal</h1>")
    assert "swapped" in tenant.locator("tr", has_text="production").inner_text()
    shot(tenant, "tenant-slots")
    # Deleting a slot that is swapped in is refused with what to do.
    submit(tenant, "a[aria-label='Delete the staging slot']")
    tenant.fill("#confirm", "shop-staging")
    submit(tenant, "button:text-is('Delete shop-staging')")
    assert "swap back first" in tenant.inner_text("main"), tenant.inner_text("main")[:500]


def test_the_site_page_says_when_its_app_does_not_start_and_shows_the_log(cloud: LocalCloud) -> None:
    """A Python site whose app.py has a SyntaxError, published by FTP (no deploy checks it): the site is
    "running", but visitors get a 502; its page must say so, where the error is, and show the log."""
    cloud.cli("plan", "create", "basic", "--max-sites", "3", "--storage-mb", "20")
    cloud.cli("tenant", "create", "contoso")
    sub = cloud.cli("subscription", "create", "--tenant", "contoso", "--plan", "basic")
    site = cloud.cli("site", "create", "blog", "--subscription", str(sub["id"]))
    ftp = ftplib.FTP()
    ftp.connect(site["ftp"]["host"], site["ftp"]["port"], timeout=10)
    ftp.login(site["ftp"]["user"], site["ftp"]["password"])
    try:
        ftp.storbinary("STOR app.py", io.BytesIO(b"import os\n\ndef oops(:\n    pass\n"))
    finally:
        ftp.quit()
    wait_until(lambda: cloud.get("blog", "/")[0] == 502, timeout=30, interval=0.2, what="the 502")

    with signed_in_page(cloud.home, cloud.ports["api_port"], "root") as (page, portal):
        page.goto(f"{portal}/portal/sites/blog")
        trouble = page.inner_text(".alert")
        assert "crashed" in trouble and "app.py, line 3" in trouble, page.inner_text("main")[:800]
        submit(page, 'a:text-is("See the site\'s log")')
        assert page.locator("h1").inner_text() == "Log of blog"
        log = page.inner_text("pre.log")
        assert "SyntaxError" in log and "def oops(:" in log, log[-800:]
        page.set_viewport_size({"width": 375, "height": 800})
        assert page.evaluate("document.documentElement.scrollWidth") <= 375
        # The console runs a command in the app's sandbox, even while the app itself cannot start,
        # and shows its output and status.
        page.set_viewport_size({"width": 1280, "height": 800})
        page.goto(f"{portal}/portal/sites/blog")
        submit(page, 'a:text-is("Run a command in the app\'s sandbox")')
        page.fill("#command", "python -c 'import app' ; echo seen by $(id -u)")
        submit(page, "button:text-is('Run')")
        heading, output = page.inner_text("main h2"), page.inner_text("pre.log")
        assert heading.startswith("Exited with status 0"), heading
        assert "SyntaxError" in output and "seen by " in output, output
        assert page.input_value("#command").startswith("python -c")
        shot(page, "tenant-console")
