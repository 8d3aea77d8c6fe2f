"""Content as archives, end to end through `sitecloud up`: any kept version downloaded as a zip (CLI,
API), and a backup of a whole cloud restored on a fresh one."""

from __future__ import annotations

import ftplib
import io
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.cloud import LocalCloud

pytestmark = pytest.mark.timeout(300)


@pytest.fixture(scope="module")
def cloud(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalCloud]:
    cloud = LocalCloud(tmp_path_factory.mktemp("cloud") / "home")
    cloud.start()
    try:
        yield cloud
    finally:
        cloud.kill_everything()


@pytest.fixture(scope="module")
def tenant(cloud: LocalCloud) -> dict[str, Any]:
    cloud.cli("plan", "create", "basic", "--max-sites", "3", "--storage-mb", "5")
    tenant = cloud.cli("tenant", "create", "contoso")
    sub = cloud.cli("subscription", "create", "--tenant", "contoso", "--plan", "basic")
    return {**tenant, "subscription": sub["id"]}


def _ftp(site: dict[str, Any]) -> ftplib.FTP:
    ftp = ftplib.FTP()
    ftp.connect(site["ftp"]["host"], site["ftp"]["port"], timeout=10)
    ftp.login(site["ftp"]["user"], site["ftp"]["password"])
    return ftp


def _unzipped(path: Path) -> dict[str, bytes]:
    with zipfile.ZipFile(path) as zf:
        assert zf.testzip() is None
        return {i.filename: zf.read(i) for i in zf.infolist()}


def test_each_kept_version_downloads_as_the_zip_that_was_published(
    cloud: LocalCloud, tenant: dict[str, Any], tmp_path: Path
) -> None:
    token = tenant["token"]
    site = cloud.cli("site", "create", "blog", "--subscription", str(tenant["subscription"]), token=token)
    tree = tmp_path / "v1"
    (tree / "css").mkdir(parents=True)
    (tree / "empty").mkdir()
    v1 = {"index.html": b"<h1>v1</h1>", "css/site.css": b"body{color:red}" * 500}
    for name, data in v1.items():
        (tree / name).write_bytes(data)
    first = cloud.cli("deploy", "blog", str(tree), token=token)["version"]
    ftp = _ftp(site)
    try:
        ftp.storbinary("STOR index.html", io.BytesIO(b"<h1>v2 by FTP</h1>"))
        ftp.storbinary("STOR notes.txt", io.BytesIO(b"new"))
    finally:
        ftp.quit()
    cloud.wait_for_content("blog", "/notes.txt", b"new")
    newest = cloud.cli("site", "versions", "blog", token=token)["versions"][-1]["version"]
    assert newest == first + 2

    old = cloud.cli("site", "download", "blog", str(first), "-o", str(tmp_path / "old.zip"), token=token)
    assert old == {"site": "blog", "version": first, "file": str(tmp_path / "old.zip"), "bytes": old["bytes"]}
    assert old["bytes"] == (tmp_path / "old.zip").stat().st_size
    assert _unzipped(tmp_path / "old.zip") == {**v1, "empty/": b""}

    # No VERSION: the newest, named after it.
    new = cloud.cli("site", "download", "blog", "-o", str(tmp_path / "new.zip"), token=token)
    assert new["version"] == newest
    assert _unzipped(tmp_path / "new.zip") == {
        **v1,
        "empty/": b"",
        "index.html": b"<h1>v2 by FTP</h1>",
        "notes.txt": b"new",
    }
    # What the front end serves is what the zip holds.
    assert cloud.get("blog", "/css/site.css")[2] == v1["css/site.css"]


def test_a_version_that_is_not_kept_is_a_clear_404(cloud: LocalCloud, tenant: dict[str, Any]) -> None:
    answer = cloud.cli("site", "download", "blog", "999999", check=False, token=tenant["token"])
    assert answer["error"]["code"] == "not_found", answer
    assert "no version 999999" in answer["error"]["message"], answer
    other = cloud.cli("tenant", "create", "fabrikam")
    hidden = cloud.cli("site", "download", "blog", "1", check=False, token=other["token"])
    assert hidden["error"]["code"] == "not_found", hidden


def test_versions_in_the_portal_download_and_roll_back(
    cloud: LocalCloud, tenant: dict[str, Any], tmp_path: Path
) -> None:
    from tests.test_portal import CHROMIUM, CHROMIUM_ARGS, admin_user, post_and_follow, sign_in, submit

    if not CHROMIUM.exists():
        pytest.skip("Debian chromium is not installed (apt-get install chromium)")
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed")
    versions = cloud.cli("site", "versions", "blog")["versions"]
    first, newest = versions[0]["version"], versions[-1]["version"]
    portal = f"https://localhost:{cloud.ports['api_port']}"
    name, password = admin_user(cloud.home)
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            ctx: Any = browser.new_context(ignore_https_errors=True, java_script_enabled=False)
            page = ctx.new_page()
            sign_in(page, portal, name, password)
            page.goto(f"{portal}/portal/sites/blog")
            rows = page.locator("table[aria-label='Content versions, newest first'] tbody tr")
            assert rows.count() == len(versions)
            assert rows.first.inner_text().split()[:2] == [str(newest), "current"]
            assert "FTP" in rows.first.inner_text() and "deploy" in rows.last.inner_text()

            with page.expect_download() as got:
                page.click(f"a[aria-label='Download version {first} as a zip']")
            saved = tmp_path / "from-portal.zip"
            got.value.save_as(saved)
            assert got.value.suggested_filename == f"blog-v{first}.zip"
            assert _unzipped(saved)["index.html"] == b"<h1>v1</h1>"

            # Rollback asks first, then the POST answers 303 to the site page with a notice.
            submit(page, f"a[aria-label='Roll back to version {first}']")
            assert f"Roll blog back to version {first}?" in page.inner_text("main")
            status = post_and_follow(page, f"button:text-is('Roll back to version {first}')")
            assert status == 303
            notice = page.inner_text(".notice")
            assert f"Rolled back to version {first}: it is served as version {newest + 1}." in notice
            cloud.wait_for_content("blog", "/", b"<h1>v1</h1>")
            assert cloud.get("blog", "/notes.txt")[0] == 404
            top = rows.first.inner_text()
            assert top.split()[:2] == [str(newest + 1), "current"] and "rollback" in top, top
            ctx.close()
        finally:
            browser.close()
    assert cloud.cli("site", "versions", "blog")["versions"][-1]["source"] == "rollback"
