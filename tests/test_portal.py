"""The admin and tenant portals in headless Chromium (Playwright), against a real management process.

A tenant signs up, subscribes, creates a site, downloads its publish profile, uploads a zip from the
browser; an admin creates a plan and sees the new site. The tenant's browser runs with JavaScript off:
the portals must work without it. (tests/test_portal_cloud.py deploys and opens the site on a whole
cloud.)

Set SITECLOUD_SCREENSHOTS=docs/screenshots to (re)write the screenshots of the main pages.
"""

from __future__ import annotations

import contextlib
import io
import os
import subprocess
import sys
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from xml.etree import ElementTree as ET

import pytest

from tests.test_management_api import ManagementCloud, start_management

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]

pytestmark = [
    pytest.mark.timeout(180),
    pytest.mark.skipif(
        not CHROMIUM.exists(), reason="Debian chromium is not installed (apt-get install chromium)"
    ),
]
sync_api = pytest.importorskip(
    "playwright.sync_api", reason="playwright is not installed (pip install playwright)"
)

SHOTS = os.environ.get("SITECLOUD_SCREENSHOTS")
PASSWORD = "correct horse battery"


@pytest.fixture(scope="module")
def cloud(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ManagementCloud]:
    yield from start_management(tmp_path_factory.mktemp("portal"))


@pytest.fixture
def browser() -> Iterator[Any]:
    # Function scope: Playwright's threads end with the test, as the leak check wants.
    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            yield b
        finally:
            b.close()


def shot(page: Any, name: str) -> None:
    if SHOTS:
        Path(SHOTS).mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(Path(SHOTS) / f"{name}.png"), full_page=True)


def admin_user(home: Path, username: str = "root") -> tuple[str, str]:
    """An admin account made the documented way: `sitecloud admin create-user` with the admin token."""
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "roles.management.cli",
            "--home",
            str(home),
            "admin",
            "create-user",
            username,
            "--password-stdin",
            "--json",
        ],
        input=PASSWORD + "\n",
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert proc.returncode == 0, proc.stderr
    return username, PASSWORD


def make_zip(files: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for name, data in files.items():
            zf.writestr(name, data)
    return buf.getvalue()


def submit(page: Any, selector: str) -> None:
    """Click a submit button and wait for the answer page (a POST, then maybe a redirect)."""
    with page.expect_navigation():
        page.click(selector)


def post_and_follow(page: Any, selector: str) -> int:
    """Click a form's submit button; the status the POST itself got (it should be a 303 to a page)."""
    with page.expect_response(lambda r: r.request.method == "POST") as answer, page.expect_navigation():
        page.click(selector)
    return int(answer.value.status)


def csrf_of(page: Any) -> str:
    return str(page.get_attribute("input[name=csrf]", "value"))


def sign_in(page: Any, portal: str, username: str, password: str) -> None:
    page.goto(f"{portal}/signin")
    page.fill("#username", username)
    page.fill("#password", password)
    submit(page, "button[type=submit]")


@contextlib.contextmanager
def signed_in_page(home: Path, api_port: int, username: str) -> Iterator[tuple[Any, str]]:
    """A page of Debian's Chromium (no JavaScript) signed in to the portal of the cloud at ``home`` as
    a new admin ``username``, and the portal's base URL; skips where Chromium or Playwright is missing."""
    if not CHROMIUM.exists():
        pytest.skip("Debian chromium is not installed (apt-get install chromium)")
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed")
    portal = f"https://localhost:{api_port}"
    name, password = admin_user(home, username)
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            ctx: Any = browser.new_context(ignore_https_errors=True, java_script_enabled=False)
            page = ctx.new_page()
            sign_in(page, portal, name, password)
            yield page, portal
            ctx.close()
        finally:
            browser.close()


def test_tenant_and_admin_in_the_browser(cloud: ManagementCloud, browser: Any, tmp_path: Path) -> None:
    portal = f"https://localhost:{cloud.config.api_port}"
    admin_name, admin_password = admin_user(cloud.write_endpoints(cloud.home / "cli-home"))
    cloud.ok("PATCH", "/settings", body={"signup_enabled": True})
    viewport = {"width": 1280, "height": 860}

    # -- the admin signs in and builds a public plan
    admin_ctx = browser.new_context(ignore_https_errors=True, viewport=viewport)
    admin = admin_ctx.new_page()
    sign_in(admin, portal, "root", "not the password")
    assert "wrong user name or password" in admin.inner_text(".alert")
    shot(admin, "signin-error")
    sign_in(admin, portal, admin_name, admin_password)
    assert admin.url.endswith("/admin/")
    assert admin.locator("h1").inner_text() == "Cloud dashboard"
    rows = admin.locator("table tbody tr")
    assert rows.count() >= 1 and "worker" in admin.inner_text("table")
    # Role actions go to the fabric; with no controller running here the page says why it failed.
    with admin.expect_navigation():
        admin.locator("tr", has_text="worker").locator("button[value=repair]").click()
    assert admin.inner_text(".alert").strip()
    admin.goto(f"{portal}/admin/")
    shot(admin, "admin-dashboard")

    admin.goto(f"{portal}/admin/plans")
    assert "No plans yet" in admin.inner_text("main")
    admin.fill("#plan-name", "starter")
    admin.fill("#max_sites", "2")
    admin.fill("#storage_mb", "50")
    admin.fill("#max_custom_hostnames", "1")
    admin.fill("#bandwidth_mb_per_day", "1024")
    admin.fill("#backup_every", "1d")
    admin.fill("#backup_keep", "3")
    admin.check("input[name=public]")
    submit(admin, "button:text-is('Create plan')")
    assert "Plan created." in admin.inner_text(".notice")
    assert "starter" in admin.inner_text("table")
    shot(admin, "admin-plans")
    admin.goto(f"{portal}/admin/plans/starter")
    assert (admin.input_value("#backup_every"), admin.input_value("#backup_keep")) == ("1d", "3")

    # -- a tenant signs up (without JavaScript), subscribes and creates a site
    tenant_ctx = browser.new_context(
        ignore_https_errors=True, java_script_enabled=False, viewport=viewport, accept_downloads=True
    )
    tenant = tenant_ctx.new_page()
    tenant.goto(f"{portal}/signin")
    submit(tenant, "a:text-is('Create an account')")
    tenant.fill("#username", "fabrikam")
    tenant.fill("#password", PASSWORD)
    tenant.fill("#confirm", PASSWORD)
    submit(tenant, "button[type=submit]")
    assert tenant.url.endswith("/portal/")
    assert "No subscriptions yet" in tenant.inner_text("main")
    cookies = {c["name"]: c for c in tenant_ctx.cookies()}
    session = cookies["__Host-sitecloud_session"]
    assert session["secure"] and session["httpOnly"] and session["sameSite"] == "Lax"
    shot(tenant, "tenant-empty")

    submit(tenant, "button:text-is('Subscribe to starter')")
    assert "Subscribed" in tenant.inner_text(".notice")
    tenant.fill("#site-name", "portal-demo")
    assert post_and_follow(tenant, "button:text-is('Create site')") == 303
    assert tenant.url.endswith("/portal/sites/portal-demo"), tenant.inner_text("main")[:800]
    password = tenant.inner_text("#publishing-password")
    assert len(password) >= 16 and "shown only this once" in tenant.inner_text(".secret")
    assert "Site created." in tenant.inner_text(".notice")
    shot(tenant, "tenant-site-created")
    backups = tenant.locator("section", has=tenant.locator("#backups-h")).inner_text()
    assert "every 1d and keeps the last 3" in backups, backups
    # A reload asks for the page again, not the form: no second site, and the password is gone.
    tenant.reload()
    assert tenant.locator(".secret").count() == 0 and tenant.locator(".alert").count() == 0
    assert tenant.locator(".notice").count() == 0

    # A form posted without the CSRF token is refused, even with the session cookie.
    answer = tenant.request.post(f"{portal}/portal/sites/portal-demo/stop", form={"x": "1"})
    assert answer.status == 403
    assert (
        tenant_ctx.request.get(f"{portal}/api/v1/sites/portal-demo").status == 401
    )  # cookies are not API auth

    # -- the publish profile
    tenant.goto(f"{portal}/portal/sites/portal-demo")
    # It sets a new publishing password: the link leads to a page that asks first.
    submit(tenant, "a:text-is('Download publish profile')")
    assert "earlier profiles stop working" in tenant.inner_text("main")
    with tenant.expect_download() as info:
        tenant.click("button:text-is('Download publish profile')")
    download = info.value
    assert download.suggested_filename == "portal-demo.PublishSettings"
    root = ET.fromstring(Path(download.path()).read_bytes())
    profiles = {p.get("publishMethod"): p.attrib for p in root.findall("publishProfile")}
    assert set(profiles) == {"ZipDeploy", "FTP"}
    assert profiles["FTP"]["userName"] == "portal-demo" and profiles["FTP"]["userPWD"] != password
    assert profiles["ZipDeploy"]["destinationAppUrl"].startswith("https://portal-demo.sites.localhost")

    # -- upload a zip from the browser: it streams to the publisher, which is not running here, and the
    # page says so (tests/test_portal_cloud.py deploys for real).
    tenant.goto(f"{portal}/portal/sites/portal-demo")
    site_zip = tmp_path / "site.zip"
    site_zip.write_bytes(make_zip({"index.html": b"<h1>deployed from the portal</h1>"}))
    tenant.set_input_files("#zip", str(site_zip))
    submit(tenant, "button:text-is('Deploy')")
    alert = tenant.inner_text(".alert")
    assert "the publisher is unavailable now" in alert and "https://" not in alert, alert
    assert tenant.locator("h1").inner_text().startswith("portal-demo")

    # App settings and a custom hostname from the site page.
    tenant.fill("#key", "GREETING")
    tenant.fill("#value", "hello")
    submit(tenant, "button:text-is('Set')")
    assert "App settings saved." in tenant.inner_text(".notice") and "GREETING" in tenant.inner_text("main")
    # No controller runs here: a restart is stored and the page says it waits for one.
    submit(tenant, "button:text-is('Restart app')")
    assert "Restart asked: the cloud's controller has not applied it yet" in tenant.inner_text(".notice")
    tenant.fill("#check", "www.fabrikam.example")
    submit(tenant, "button:text-is('Check')")
    assert "www.fabrikam.example: free" in tenant.inner_text("main")
    tenant.fill("#hostname", "www.fabrikam.example")
    submit(tenant, "button:text-is('Add host name')")
    assert "Custom hostname added." in tenant.inner_text(".notice")
    # Pending until DNS proves it: the page shows the records to create and a Verify button.
    assert "pending" in tenant.inner_text("main") and "asuid.www.fabrikam.example" in tenant.inner_text(
        "main"
    )
    assert tenant.is_visible("button[aria-label='Verify www.fabrikam.example']")
    tenant.fill("#hostname", "shop.fabrikam.example")
    submit(tenant, "button:text-is('Add host name')")
    assert "allows 1 custom hostname" in tenant.inner_text(".alert")
    tenant.goto(f"{portal}/portal/sites/portal-demo")
    shot(tenant, "tenant-site")
    tenant.goto(f"{portal}/portal/")
    assert "1 of 2" in tenant.inner_text(".quota")
    shot(tenant, "tenant-home")

    # -- the admin sees the new site, the tenant and its usage
    admin.goto(f"{portal}/admin/sites")
    assert "portal-demo" in admin.inner_text("table") and "fabrikam" in admin.inner_text("table")
    shot(admin, "admin-sites")
    admin.goto(f"{portal}/admin/tenants")
    row = admin.locator("tr", has_text="fabrikam").first
    assert "starter" in row.inner_text()
    shot(admin, "admin-tenants")
    with admin.expect_navigation():
        row.locator("button[value=suspend]").click()
    assert "Subscription suspended" in admin.inner_text(".notice")
    tenant.goto(f"{portal}/portal/")
    assert "suspended" in tenant.inner_text("main")
    # Its site says so too (it said running), and is not offered a start that would be refused.
    tenant.goto(f"{portal}/portal/sites/portal-demo")
    assert tenant.locator("h1 .badge").inner_text() == "suspended"
    assert "Its subscription is suspended" in tenant.inner_text("main")
    assert tenant.locator("button:text-is('Start site')").count() == 0
    assert tenant.locator("button:text-is('Restart app')").count() == 0
    with admin.expect_navigation():
        admin.locator("tr", has_text="fabrikam").first.locator("button[value=resume]").click()
    assert "resumed" in admin.inner_text(".notice")

    # Tenants are kept out of the admin portal; the error page keeps the navigation, with a way back.
    tenant.goto(f"{portal}/admin/plans")
    assert "this page is for hosting admins" in tenant.inner_text(".alert")
    assert tenant.is_visible("button:text-is('Sign out')") and tenant.is_visible("nav a[href='/portal/']")
    assert tenant.get_attribute("main a:text-is('your sites')", "href") == "/portal/"
    # ... and nothing of the web's answers points to the command line.
    assert "sitecloud " not in tenant.inner_text("main")
    tenant.goto(f"{portal}/portal/sites/no-such-site")
    assert "no site 'no-such-site'" in tenant.inner_text(".alert") and "`" not in tenant.inner_text("main")
    # Signing out ends the session.
    tenant.goto(f"{portal}/portal/")
    submit(tenant, "button:text-is('Sign out')")
    assert tenant.url.endswith("/signin?n=signed-out")
    tenant.goto(f"{portal}/portal/")
    assert tenant.url.endswith("/signin")
    admin_ctx.close()
    tenant_ctx.close()


def test_a_site_the_controller_has_not_applied_says_so_on_its_pages(
    cloud: ManagementCloud, browser: Any
) -> None:
    # No controller runs here, and the worker's recorded config is older than the site: nothing
    # serves it, and its pages say so (before: "running", as if it served).
    portal = f"https://localhost:{cloud.config.api_port}"
    admin_name, admin_password = admin_user(cloud.write_endpoints(cloud.home / "cli-home-3"), "watcher")
    cloud.ok("POST", "/plans", body={"name": "waiting-plan", "max_sites": 1, "storage_mb": 10})
    cloud.ok("POST", "/tenants", body={"name": "waiter"})
    sub = cloud.ok("POST", "/subscriptions", body={"tenant": "waiter", "plan": "waiting-plan"})
    cloud.ok("POST", "/sites", body={"name": "not-yet", "subscription": sub["id"]})
    user = cloud.ok("POST", "/users", body={"username": "waiter-user", "tenant": "waiter"})
    ctx = browser.new_context(ignore_https_errors=True, java_script_enabled=False)
    page = ctx.new_page()
    sign_in(page, portal, "waiter-user", user["password"])
    admin_ctx = browser.new_context(ignore_https_errors=True, java_script_enabled=False)
    admin = admin_ctx.new_page()
    sign_in(admin, portal, admin_name, admin_password)

    def badges() -> dict[str, list[str]]:
        page.goto(f"{portal}/portal/")
        home = page.locator("tr", has_text="not-yet").locator(".badge").all_inner_texts()
        page.goto(f"{portal}/portal/sites/not-yet")
        admin.goto(f"{portal}/admin/sites")
        listed = admin.locator("tr", has_text="not-yet").locator(".badge").all_inner_texts()
        return {"home": home, "site": page.locator("h1 .badge").all_inner_texts(), "admin": listed}

    try:
        assert badges() == {k: ["running", "pending"] for k in ("home", "site", "admin")}
        assert page.inner_text(".not-live") == (
            "Not live yet: site not-yet is stored as running, but the cloud's controller has not applied "
            "that; nothing serves it until the controller runs again."
        )
        assert "running (pending)" in page.inner_text(".facts")
        # Once the roles run it, it is live: running, nothing more.
        cloud.worker_runs()
        assert badges() == {k: ["running"] for k in ("home", "site", "admin")}
        assert page.locator(".not-live").count() == 0
        # Live, and no worker placed it (no controller runs here to place it): its page says so.
        assert page.inner_text(".alert") == (
            "This site cannot be served: no worker runs it (the cloud's admin must add one)"
        )
    finally:
        cloud.worker_runs(1)  # as the module's cloud began
    ctx.close()
    admin_ctx.close()


def test_every_destructive_action_asks_and_no_post_is_sent_twice(
    cloud: ManagementCloud, browser: Any
) -> None:
    """Each confirmation, without JavaScript: a POST without it changes nothing; each POST answers 303,
    so a reload asks for a page, not the form again."""
    portal = f"https://localhost:{cloud.config.api_port}"
    admin_name, admin_password = admin_user(cloud.write_endpoints(cloud.home / "cli-home-2"), "ops")
    plan = cloud.ok(
        "POST",
        "/plans",
        body={"name": "confirm-plan", "max_sites": 3, "storage_mb": 10, "max_custom_hostnames": 2},
    )
    cloud.ok("POST", "/tenants", body={"name": "confirmer"})
    sub = cloud.ok("POST", "/subscriptions", body={"tenant": "confirmer", "plan": plan["name"]})
    cloud.ok("POST", "/sites", body={"name": "keep-me", "subscription": sub["id"]})
    cloud.ok("POST", "/sites/keep-me/hostnames", body={"hostname": "www.keep.example"})
    user = cloud.ok("POST", "/users", body={"username": "confirmer-user", "tenant": "confirmer"})
    ctx = browser.new_context(ignore_https_errors=True, java_script_enabled=False)
    page = ctx.new_page()
    sign_in(page, portal, "confirmer-user", user["password"])
    site = f"{portal}/portal/sites/keep-me"

    # Without the confirmation the form carries, a destructive POST changes nothing.
    page.goto(site)
    csrf = csrf_of(page)
    for path, form in [
        ("/delete", {"csrf": csrf}),
        ("/delete", {"csrf": csrf, "confirm": "keep"}),
        ("/password", {"csrf": csrf}),
        ("/hostnames/remove", {"csrf": csrf, "hostname": "www.keep.example"}),
    ]:
        answer = page.request.post(site + path, form=form, max_redirects=0)
        assert answer.status == 303 and answer.headers["location"] == "/portal/sites/keep-me", path
    page.goto(site)
    assert "nothing was changed" in page.inner_text(".alert")
    assert cloud.ok("GET", "/sites/keep-me")["name"] == "keep-me"
    assert [h["hostname"] for h in cloud.ok("GET", "/sites/keep-me/hostnames")["hostnames"]] == [
        "www.keep.example"
    ]

    # A custom hostname: Remove is a link to a page that asks; Cancel goes back and keeps it.
    submit(page, "a[aria-label='Remove www.keep.example']")
    assert page.locator("h1").inner_text() == "Remove www.keep.example?"
    shot(page, "tenant-confirm")
    submit(page, "a:text-is('Cancel')")
    assert page.url == site and "www.keep.example" in page.inner_text("main")
    submit(page, "a[aria-label='Remove www.keep.example']")
    assert post_and_follow(page, "button:text-is('Remove www.keep.example')") == 303
    assert page.url == site and "Custom hostname removed." in page.inner_text(".notice")
    page.reload()
    assert page.locator(".notice").count() == 0 and page.locator(".alert").count() == 0
    assert cloud.ok("GET", "/sites/keep-me/hostnames")["hostnames"] == []

    # A new publishing password: asked first, shown once, and a reload sets no other one.
    submit(page, "a:text-is('Reset password')")
    assert "stops working" in page.inner_text("main")
    assert post_and_follow(page, "button:text-is('Set a new password')") == 303
    password = page.inner_text("#publishing-password")
    page.reload()
    assert page.locator("#publishing-password").count() == 0
    profile = page.request.post(
        f"{site}/publish-profile", form={"csrf": csrf_of(page), "confirm": "yes"}, max_redirects=0
    )
    assert profile.status == 200 and f'userPWD="{password}"' not in profile.text()

    # Deleting a site: type its name (a wrong name changes nothing).
    page.goto(f"{site}/delete")
    page.fill("#confirm", "keep-m")
    assert post_and_follow(page, "button:text-is('Delete keep-me')") == 303
    assert "type keep-me to confirm" in page.inner_text(".alert")
    assert cloud.ok("GET", "/sites/keep-me")["name"] == "keep-me"
    page.goto(site)
    page.fill("#confirm", "keep-me")
    assert post_and_follow(page, "button:text-is('Delete keep-me')") == 303
    assert page.url.endswith("/portal/") and "Site deleted" in page.inner_text(".notice")
    assert cloud.call("GET", "/sites/keep-me")[0] == 404

    # API tokens: the new token is shown once; a reload makes no second one; revoking asks first.
    page.goto(f"{portal}/account/tokens")
    page.fill("#token-name", "laptop")
    assert post_and_follow(page, "button:text-is('Create token')") == 303
    assert page.inner_text("#new-token").startswith("sct_")
    page.reload()
    assert page.locator("#new-token").count() == 0 and page.locator("tbody tr").count() == 1
    submit(page, "a[aria-label='Revoke laptop']")
    assert page.locator("h1").inner_text() == "Revoke token laptop?"
    assert post_and_follow(page, "button:text-is('Revoke laptop')") == 303
    assert "Token revoked" in page.inner_text(".notice") and "No tokens yet." in page.inner_text("main")

    # The admin: deleting a subscription means typing its number; removing a role asks too.
    cloud.ok("POST", "/sites", body={"name": "goes-too", "subscription": sub["id"]})
    admin_ctx = browser.new_context(ignore_https_errors=True, java_script_enabled=False)
    admin = admin_ctx.new_page()
    sign_in(admin, portal, admin_name, admin_password)
    admin.goto(f"{portal}/admin/tenants")
    answer = admin.request.post(
        f"{portal}/admin/tenants",
        form={"csrf": csrf_of(admin), "action": "delete", "subscription": str(sub["id"])},
        max_redirects=0,
    )
    assert answer.status == 303
    admin.goto(f"{portal}{answer.headers['location']}")
    assert "nothing was changed" in admin.inner_text(".alert")
    assert cloud.ok("GET", f"/subscriptions/{sub['id']}")["id"] == sub["id"]
    submit(admin, f"a[aria-label='Delete subscription {sub['id']}']")
    assert "goes-too" in admin.inner_text("main ul")
    shot(admin, "admin-confirm-delete")
    admin.fill("#confirm", str(sub["id"]))
    assert post_and_follow(admin, f"button:text-is('Delete subscription {sub['id']}')") == 303
    assert "Subscription deleted" in admin.inner_text(".notice")
    admin.reload()
    assert admin.locator(".notice").count() == 0
    assert cloud.call("GET", "/sites/goes-too")[0] == 404

    admin.goto(f"{portal}/admin/")
    submit(admin, "a[aria-label='Remove worker from localhost']")
    assert admin.locator("h1").inner_text() == "Remove worker from localhost?"
    assert "It is the last running worker: every site goes down" in admin.inner_text("main")
    submit(admin, "a:text-is('Cancel')")
    answer = admin.request.post(
        f"{portal}/admin/roles",
        form={"csrf": csrf_of(admin), "action": "remove", "role": "worker", "host": "localhost"},
        max_redirects=0,
    )
    assert answer.status == 303
    admin.goto(f"{portal}/admin/")
    assert "nothing was changed" in admin.inner_text(".alert") and "worker" in admin.inner_text("table")

    # A 405 on a portal page says what is allowed, inside the layout.
    wrong = admin.request.fetch(f"{portal}/admin/plans", method="PUT")
    assert wrong.status == 405 and set(wrong.headers["allow"].replace(" ", "").split(",")) >= {"GET", "POST"}
    ctx.close()
    admin_ctx.close()


NARROW = {"width": 390, "height": 844}


def page_width(page: Any) -> int:
    return int(page.evaluate("document.scrollingElement.scrollWidth"))


def test_admin_opens_and_deletes_tenants_deletes_plans_and_issues_reset_links(
    cloud: ManagementCloud, browser: Any
) -> None:
    portal = f"https://localhost:{cloud.config.api_port}"
    admin_name, admin_password = admin_user(cloud.write_endpoints(cloud.home / "cli-home-3"), "keeper")
    for name in ("used-plan", "spare-plan"):
        cloud.ok("POST", "/plans", body={"name": name, "max_sites": 2, "storage_mb": 10, "public": True})
    cloud.ok("POST", "/tenants", body={"name": "opened"})
    sub = cloud.ok("POST", "/subscriptions", body={"tenant": "opened", "plan": "used-plan"})
    cloud.ok("POST", "/sites", body={"name": "opened-site", "subscription": sub["id"]})
    old_password = cloud.ok("POST", "/users", body={"username": "opened-user", "tenant": "opened"})[
        "password"
    ]

    admin_ctx = browser.new_context(ignore_https_errors=True, java_script_enabled=False)
    admin = admin_ctx.new_page()
    sign_in(admin, portal, admin_name, admin_password)

    # Role buttons: restart and repair at once, stop asks first (tests/test_portal_cloud.py restarts one).
    assert admin.is_visible("button[aria-label='Restart worker on localhost']")
    submit(admin, "a[aria-label='Stop worker on localhost']")
    assert admin.locator("h1").inner_text() == "Stop worker on localhost?"
    submit(admin, "a:text-is('Cancel')")

    # -- a tenant opens from the tenants list: its subscriptions, sites and users
    admin.goto(f"{portal}/admin/tenants")
    submit(admin, "table a:text-is('opened')")
    assert admin.url.endswith("/admin/tenants/opened") and admin.locator("h1").inner_text() == "opened"
    main = admin.inner_text("main")
    assert "used-plan" in main and "opened-site" in main and "opened-user" in main
    shot(admin, "admin-tenant")

    # -- a reset link: asked first, shown once on the tenant's page
    submit(admin, "a[aria-label='Password reset link for opened-user']")
    assert admin.locator("h1").inner_text() == "Issue a password reset link for opened-user?"
    assert post_and_follow(admin, "button:text-is('Issue reset link')") == 303
    assert admin.url.endswith(
        "/admin/tenants/opened"
    ) and "Reset link for opened-user issued" in admin.inner_text(".notice")
    link = admin.inner_text("#reset-link")
    assert link.startswith(f"{portal}/reset-password/")
    admin.reload()
    assert admin.locator("#reset-link").count() == 0

    # The user follows it (no JavaScript), sets a new password and signs in with it.
    user_ctx = browser.new_context(ignore_https_errors=True, java_script_enabled=False)
    user = user_ctx.new_page()
    user.goto(f"{portal}/signin")
    submit(user, "a:text-is('Forgot your password?')")
    assert "reset link" in user.inner_text("main") and "admin" in user.inner_text("main")
    user.goto(link)
    assert user.locator("h1").inner_text() == "Choose a new password" and "opened-user" in user.inner_text(
        "main"
    )
    new_password = "a brand new passphrase"
    user.fill("#password", new_password)
    user.fill("#confirm", new_password + "!")
    assert post_and_follow(user, "button:text-is('Set new password')") == 303
    assert "the two passwords differ" in user.inner_text(".alert")
    user.fill("#password", new_password)
    user.fill("#confirm", new_password)
    assert post_and_follow(user, "button:text-is('Set new password')") == 303
    assert user.url.endswith("/signin") and "New password set" in user.inner_text(".notice")
    sign_in(user, portal, "opened-user", old_password)
    assert "wrong user name or password" in user.inner_text(".alert")
    sign_in(user, portal, "opened-user", new_password)
    assert user.url.endswith("/portal/")
    # A plan the tenant has is not offered again; another one is.
    plans = user.inner_text("section[aria-labelledby=plans-h]")
    assert "Subscribed" in plans and user.locator("button:text-is('Subscribe to used-plan')").count() == 0
    assert user.is_visible("button:text-is('Subscribe to spare-plan')")
    # The link worked once.
    again = user_ctx.new_page()
    answer = again.goto(link)
    assert answer is not None and answer.status == 404
    assert "does not work" in again.inner_text(".alert") and again.locator("#password").count() == 0
    again.close()

    # -- a plan in use cannot be deleted: the page says why, a forged POST is refused with the reason
    admin.goto(f"{portal}/admin/plans/used-plan")
    assert "cannot be deleted while 1 subscription uses it" in admin.inner_text("main")
    assert admin.locator("a:text-is('Delete plan used-plan')").count() == 0
    answer = admin.request.post(
        f"{portal}/admin/plans/used-plan/delete",
        form={"csrf": csrf_of(admin), "confirm": "yes"},
        max_redirects=0,
    )
    assert answer.status == 303
    admin.goto(f"{portal}{answer.headers['location']}")
    assert "is used by 1 subscription\n" in admin.inner_text(".alert")
    assert cloud.ok("GET", "/plans/used-plan")["subscriptions"] == 1
    # ... an unused one can, once confirmed.
    admin.goto(f"{portal}/admin/plans/spare-plan")
    submit(admin, "a:text-is('Delete plan spare-plan')")
    assert admin.locator("h1").inner_text() == "Delete plan spare-plan?"
    assert post_and_follow(admin, "button:text-is('Delete plan spare-plan')") == 303
    assert admin.url.endswith("/admin/plans") and "Plan deleted." in admin.inner_text(".notice")
    assert cloud.call("GET", "/plans/spare-plan")[0] == 404

    # -- tables fit a 390 px wide phone: nothing makes the page scroll sideways
    for ctx_page, paths in (
        (
            admin,
            [
                "/admin/",
                "/admin/plans",
                "/admin/tenants",
                "/admin/tenants/opened",
                "/admin/sites",
                "/admin/settings",
                "/admin/plans/used-plan",
                "/portal/sites/opened-site",
            ],
        ),
        (user, ["/portal/", "/portal/sites/opened-site", "/account/tokens"]),
    ):
        ctx_page.set_viewport_size(NARROW)
        for path in paths:
            ctx_page.goto(f"{portal}{path}")
            assert page_width(ctx_page) <= NARROW["width"] + 2, (path, page_width(ctx_page))
    admin.goto(f"{portal}/admin/tenants")
    shot(admin, "admin-tenants-390")
    admin.set_viewport_size({"width": 1280, "height": 860})

    # -- deleting the tenant: type its name; a wrong one changes nothing
    admin.goto(f"{portal}/admin/tenants/opened")
    submit(admin, "a:text-is('Delete tenant opened')")
    assert admin.locator("h1").inner_text() == "Delete tenant opened?"
    assert "opened-site" in admin.inner_text("main ul")
    admin.fill("#confirm", "open")
    assert post_and_follow(admin, "button:text-is('Delete tenant opened')") == 303
    assert "type opened to confirm" in admin.inner_text(".alert")
    assert cloud.ok("GET", "/tenants/opened")["name"] == "opened"
    admin.goto(f"{portal}/admin/tenants/opened/delete")
    admin.fill("#confirm", "opened")
    assert post_and_follow(admin, "button:text-is('Delete tenant opened')") == 303
    assert admin.url.endswith("/admin/tenants") and "Tenant opened deleted" in admin.inner_text(".notice")
    admin.reload()
    assert admin.locator(".notice").count() == 0
    assert (
        cloud.call("GET", "/tenants/opened")[0] == 404 and cloud.call("GET", "/sites/opened-site")[0] == 404
    )
    # Its user's session went with it.
    user.goto(f"{portal}/portal/")
    assert user.url.endswith("/signin")
    admin_ctx.close()
    user_ctx.close()


def test_a_refused_form_keeps_what_was_typed(cloud: ManagementCloud) -> None:
    """A name the cloud refuses comes back in its field with the error, on the admin's tenants page and
    on a site's page, so the user corrects it rather than types it all again."""
    plan = cloud.ok(
        "POST",
        "/plans",
        body={"name": "typing-plan", "max_sites": 2, "storage_mb": 10, "max_custom_hostnames": 2},
    )
    cloud.ok("POST", "/tenants", body={"name": "typist"})
    sub = cloud.ok("POST", "/subscriptions", body={"tenant": "typist", "plan": plan["name"]})
    cloud.ok("POST", "/sites", body={"name": "typed", "subscription": sub["id"]})
    home = cloud.write_endpoints(cloud.home / "cli-home-typing")
    with signed_in_page(home, cloud.config.api_port, "typing-admin") as (page, portal):
        page.goto(f"{portal}/admin/tenants")
        page.fill("#tenant-name", "Not A Name")
        submit(page, "button:text-is('Create tenant')")
        assert "is not valid" in page.inner_text(".alert")
        assert page.input_value("#tenant-name") == "Not A Name"
        page.fill("#user-name", "No Such User")
        submit(page, "button:text-is('Create user')")
        assert "is not valid" in page.inner_text(".alert")
        assert page.input_value("#user-name") == "No Such User"

        page.goto(f"{portal}/portal/sites/typed")
        page.fill("#hostname", "typed.sites.localhost")
        submit(page, "button:text-is('Add host name')")
        assert "belong to the platform" in page.inner_text(".alert")
        assert page.input_value("#hostname") == "typed.sites.localhost"
        # A row's button typed nothing: the field is empty again after it.
        page.goto(f"{portal}/portal/sites/typed")
        assert page.input_value("#hostname") == ""
