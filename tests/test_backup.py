"""Content as archives, end to end through `sitecloud up`: any kept version downloaded as a zip (CLI,
API), and a backup of a whole cloud restored on a fresh one."""

from __future__ import annotations

import http.client
import io
import json
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select

from tests.cloud import LocalCloud, basic_tenant, running_cloud, site_ftp
from tests.support import TinyDns

pytestmark = pytest.mark.timeout(300)


@pytest.fixture(scope="module")
def cloud(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalCloud]:
    yield from running_cloud(tmp_path_factory)


@pytest.fixture(scope="module")
def tenant(cloud: LocalCloud) -> dict[str, Any]:
    return basic_tenant(cloud)


def _site_dir(root: Path) -> Path:
    site = root / "site"
    site.mkdir()
    (site / "index.html").write_bytes(b"<h1>private</h1>")
    return site


def _unzipped(path: Path) -> dict[str, bytes]:
    with zipfile.ZipFile(path) as zf:
        assert zf.testzip() is None
        return {i.filename: zf.read(i) for i in zf.infolist()}


def test_each_kept_version_downloads_as_the_zip_that_was_published(
    cloud: LocalCloud, tenant: dict[str, Any], tmp_path: Path
) -> None:
    token = tenant["token"]
    site = cloud.cli("site", "create", "blog", "--subscription", str(tenant["subscription"]), token=token)
    tenant["blog"] = site
    tree = tmp_path / "v1"
    (tree / "css").mkdir(parents=True)
    (tree / "empty").mkdir()
    v1 = {"index.html": b"<h1>v1</h1>", "css/site.css": b"body{color:red}" * 500}
    for name, data in v1.items():
        (tree / name).write_bytes(data)
    first = cloud.cli("deploy", "blog", str(tree), token=token)["version"]
    ftp = site_ftp(site)
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
    from tests.test_portal import post_and_follow, signed_in_page, submit

    versions = cloud.cli("site", "versions", "blog")["versions"]
    first, newest = versions[0]["version"], versions[-1]["version"]
    with signed_in_page(cloud.home, cloud.ports["api_port"], "root") as (page, portal):
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
    assert cloud.cli("site", "versions", "blog")["versions"][-1]["source"] == "rollback"


@pytest.fixture(scope="module")
def tiny_dns() -> Iterator[TinyDns]:
    server = TinyDns()
    try:
        yield server
    finally:
        server.close()


def _visit(cloud: LocalCloud, host: str, path: str = "/") -> tuple[int, bytes]:
    """Plain HTTP to the front end with ``Host: <host>``, as a visitor whose DNS points here."""
    conn = http.client.HTTPConnection("127.0.0.1", cloud.ports["http_port"], timeout=10)
    try:
        conn.request("GET", path, headers={"Host": host})
        resp = conn.getresponse()
        return resp.status, resp.read()
    finally:
        conn.close()


def _state(cloud: LocalCloud) -> dict[str, Any]:
    """What a restore must bring back, as the API shows it."""
    sites = cloud.cli("site", "list")["sites"]
    return {
        "plans": cloud.cli("plan", "list")["plans"],
        "settings": cloud.cli("settings", "show"),
        "tenants": [t["name"] for t in cloud.cli("tenant", "list")["tenants"]],
        "subscriptions": [
            (s["id"], s["tenant"], s["plan"], s["state"])
            for s in cloud.cli("subscription", "list")["subscriptions"]
        ],
        "sites": [(s["name"], s["subscription"], s["state"]) for s in sites],
        "app_settings": {s["name"]: cloud.cli("site", "settings", s["name"])["settings"] for s in sites},
        "hostnames": {
            s["name"]: [
                (h["hostname"], h["state"])
                for h in cloud.cli("site", "hostname", "list", s["name"])["hostnames"]
            ]
            for s in sites
        },
    }


def test_backup_restores_on_a_fresh_cloud_with_the_same_bytes_and_passwords(
    cloud: LocalCloud,
    tenant: dict[str, Any],
    tiny_dns: TinyDns,
    tmp_path: Path,
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    token = tenant["token"]
    cloud.cli("settings", "set", "--dns-resolver", f"127.0.0.1:{tiny_dns.port}", "--acme-directory", "off")
    cloud.cli("plan", "update", "basic", "--max-custom-hostnames", "2")
    shop = cloud.cli("site", "create", "shop", "--subscription", str(tenant["subscription"]), token=token)
    ftp = site_ftp(shop)
    try:
        ftp.storbinary("STOR index.html", io.BytesIO(b"<h1>shop</h1>"))
        ftp.mkd("img")
        ftp.storbinary("STOR img/logo.bin", io.BytesIO(bytes(range(256)) * 64))
    finally:
        ftp.quit()
    cloud.wait_for_content("shop", "/img/logo.bin", bytes(range(256)) * 64)
    cloud.cli("site", "set", "shop", "GREETING=hello", token=token)
    sub = cloud.cli("subscription", "show", str(tenant["subscription"]))
    cloud.cli("site", "hostname", "add", "shop", "www.shop.test", token=token)
    tiny_dns.set("asuid.www.shop.test", "TXT", sub["verification_id"])
    verified = cloud.cli("site", "hostname", "verify", "shop", "www.shop.test", token=token)
    assert verified["state"] == "verified", verified
    assert _visit(cloud, "www.shop.test") == (200, b"<h1>shop</h1>")
    before = _state(cloud)
    served = {
        ("blog", "/"): cloud.get("blog", "/")[2],
        ("blog", "/css/site.css"): cloud.get("blog", "/css/site.css")[2],
        ("shop", "/"): b"<h1>shop</h1>",
        ("shop", "/img/logo.bin"): bytes(range(256)) * 64,
    }

    target = tmp_path / "backup"
    made = cloud.cli("backup", "create", "--to", str(target))
    # What it leaves out is said every time, not learnt from a restore.
    assert "files the sites' apps wrote while they ran" in made["not_included"], made
    versions = cloud.cli("site", "versions", "shop")["versions"]
    assert made["sites"] == {"blog": made["sites"]["blog"], "shop": versions[-1]["version"]}
    manifest = json.loads((target / "manifest.json").read_text())
    assert manifest["alembic_revision"] and set(manifest["sites"]) == {"blog", "shop"}
    assert _unzipped(target / "sites" / "shop.zip") == {
        "index.html": b"<h1>shop</h1>",
        "img/logo.bin": bytes(range(256)) * 64,
    }
    refused = cloud.cli("backup", "create", "--to", str(target), check=False)
    assert "not an empty directory" in refused["error"]["message"], refused
    one = cloud.cli("backup", "create", "--to", str(tmp_path / "one"), "--site", "shop")
    assert list(one["sites"]) == ["shop"] and not (tmp_path / "one" / "sites" / "blog.zip").exists()

    # A second, fresh cloud: the backup brings it all back.
    fresh = LocalCloud(tmp_path_factory.mktemp("fresh") / "home")
    fresh.start()
    try:
        restored = fresh.cli("backup", "restore", str(target))
        assert set(restored["sites"]) == {"blog", "shop"}
        assert restored["rows"]["sites"] == 2 and restored["rows"]["custom_hostnames"] == 1
        for (site, path), body in served.items():
            fresh.wait_for_content(site, path, body)
        assert _state(fresh) == before
        assert _visit(fresh, "www.shop.test") == (200, b"<h1>shop</h1>")
        # The same FTP passwords and the tenant's token work on the new cloud.
        for creds in (tenant["blog"], shop):
            moved = {**creds, "ftp": {**creds["ftp"], "port": fresh.ports["ftp_port"]}}
            ftp = site_ftp(moved)
            assert "index.html" in ftp.nlst()
            ftp.quit()
        assert [s["name"] for s in fresh.cli("site", "list", token=token)["sites"]] == ["blog", "shop"]

        # Not twice: the cloud is no longer empty.
        again = fresh.cli("backup", "restore", str(target), check=False)
        assert again["error"]["code"] == "already_exists", again
        assert "not empty" in again["error"]["message"]
        # --force deletes every tenant and site this cloud has: it asks first, as `site delete` does.
        unconfirmed = fresh.cli("backup", "restore", str(target), "--force", check=False)
        assert unconfirmed["error"]["code"] == "confirmation_required", unconfirmed
        assert "every plan, tenant, user and site" in unconfirmed["error"]["message"]
        assert [s["name"] for s in fresh.cli("site", "list", token=token)["sites"]] == ["blog", "shop"]
        missing = fresh.cli("backup", "restore", "--from", str(tmp_path / "nowhere"), check=False)
        assert missing["error"]["message"] == f"there is no directory {tmp_path / 'nowhere'}", missing
        # A damaged backup is refused before anything changes.
        zip_path = target / "sites" / "shop.zip"
        zip_path.write_bytes(zip_path.read_bytes()[:-1] + b"x")
        damaged = fresh.cli("backup", "restore", str(target), "--force", check=False)
        assert "does not match its checksum" in damaged["error"]["message"], damaged
    finally:
        fresh.kill_everything()


def test_a_backup_is_readable_by_its_owner_alone(
    cloud: LocalCloud, tenant: dict[str, Any], tmp_path: Path
) -> None:
    # It holds password and token hashes, custom hostnames' private keys and every site's content:
    # kept as the home keeps the CA's key, not open to every user of the machine.
    cloud.cli(
        "site", "create", "private", "--subscription", str(tenant["subscription"]), token=tenant["token"]
    )
    cloud.cli("deploy", "private", str(_site_dir(tmp_path)), token=tenant["token"])
    made, given = tmp_path / "new" / "backup", tmp_path / "given"
    given.mkdir(mode=0o755)
    for target in (made, given):
        cloud.cli("backup", "create", "--to", str(target))
        files = sorted(p for p in target.rglob("*"))
        assert target / "sites" / "private.zip" in files
        modes = {str(p.relative_to(target)): p.stat().st_mode & 0o777 for p in files}
        assert all(mode & 0o077 == 0 for mode in modes.values()), modes
    # A directory it makes is its own; one the admin made keeps the mode the admin gave it.
    assert (made.stat().st_mode & 0o777, given.stat().st_mode & 0o777) == (0o700, 0o755)


def test_a_plan_sets_how_many_versions_its_sites_keep(cloud: LocalCloud, tenant: dict[str, Any]) -> None:
    from tests.support import wait_until

    plan = cloud.cli("plan", "show", "basic")
    assert (plan["keep_versions"], plan["keep_days"]) == (20, 0)
    assert len(cloud.cli("site", "versions", "blog")["versions"]) > 3
    bad = cloud.cli("plan", "update", "basic", "--keep-versions", "0", check=False)
    assert bad["error"]["code"] == "invalid_input" and "keep_versions" in bad["error"]["message"], bad
    plan = cloud.cli("plan", "update", "basic", "--keep-versions", "3", "--keep-days", "0")
    assert (plan["keep_versions"], plan["keep_days"]) == (3, 0)

    # The fileserver prunes at its next commit once the plan's snapshot reaches it. An upload before
    # that starts a run of FTP uploads, one publish however long, which keeps the two publishes before
    # it among the plan's last 3: the count would not come down to 3.
    def fileserver_has_the_plan() -> bool:
        role = next(r for r in cloud.cli("role", "list")["roles"] if r["role"] == "fileserver")
        return bool(role["config_version"] >= role["desired_version"])

    wait_until(fileserver_has_the_plan, timeout=30, what="the plan to reach the fileserver")
    uploads = iter(range(100))

    def pruned() -> bool:
        ftp = site_ftp(tenant["blog"])
        try:
            ftp.storbinary(f"STOR later{next(uploads)}.txt", io.BytesIO(b"later"))
        finally:
            ftp.quit()
        return len(cloud.cli("site", "versions", "blog")["versions"]) == 3

    wait_until(pruned, timeout=30, interval=0.5, what="blog's versions to be pruned to the plan's 3")
    gone = cloud.cli("site", "download", "blog", "1", "-o", "/dev/null", check=False)
    assert gone["error"]["code"] == "not_found" and "no longer kept" in gone["error"]["message"], gone
    # A rollback to it says the same, with the plan's rule, not that it never was.
    back = cloud.cli("site", "rollback", "blog", "1", check=False)
    assert back["error"]["code"] == "not_found", back
    assert back["error"]["message"] == "version 1 of site blog is no longer kept", back
    assert back["error"]["hint"].startswith("the last 3 versions and publishes are kept; kept: "), back
    newest = cloud.cli("site", "versions", "blog")["versions"][-1]["version"]
    current = cloud.cli("site", "rollback", "blog", str(newest), check=False)
    assert current["error"]["message"] == f"version {newest} is site blog's content now", current


def test_a_dump_keeps_no_config_generation_of_the_cloud_that_wrote_it(tmp_path: Path) -> None:
    """A site's live_from counts this cloud's config generations: in another cloud it would keep the
    site pending until that one's count passed it."""
    from roles.management._backup import dump_tables, restore_tables
    from shared.db import Database
    from shared.db.models import Plan, Site, Subscription, Tenant

    source = Database.sqlite(tmp_path / "source.db")
    source.migrate()
    with source.session() as s:
        sub = Subscription(tenant=Tenant(name="contoso"), plan=Plan(name="basic", max_sites=2, storage_mb=5))
        s.add(Site(name="blog", subscription=sub, live_from=4711))
    dump = dump_tables(source)
    source.dispose()
    (row,) = dump["tables"]["sites"]
    assert row["name"] == "blog" and "live_from" not in row, row
    target = Database.sqlite(tmp_path / "target.db")
    target.migrate()
    try:
        restore_tables(target, dump["alembic_revision"], dump["tables"], force=False)
        with target.session() as s:
            assert s.execute(select(Site.live_from)).scalar_one() is None
    finally:
        target.dispose()


def test_a_dump_taken_while_a_slot_is_swapped_restores_swapped(tmp_path: Path) -> None:
    """Swapped, production's row points at its slot's, which is restored after it: the restore failed
    on that reference (a 500) and put nothing back."""
    from roles.management._backup import dump_tables, restore_tables
    from shared.db import Database
    from shared.db.models import Plan, Site, Subscription, Tenant

    source = Database.sqlite(tmp_path / "source.db")
    source.migrate()
    with source.session() as s:
        sub = Subscription(tenant=Tenant(name="contoso"), plan=Plan(name="basic", max_sites=2, storage_mb=5))
        blog = Site(name="blog", subscription=sub)
        s.add(blog)
        s.flush()
        staging = Site(name="blog-staging", subscription=sub, slot_of_id=blog.id, slot_name="staging")
        s.add(staging)
        s.flush()
        blog.routed_to_id, staging.routed_to_id = staging.id, blog.id
    dump = dump_tables(source)
    source.dispose()
    target = Database.sqlite(tmp_path / "target.db")
    target.migrate()
    try:
        counts = restore_tables(target, dump["alembic_revision"], dump["tables"], force=False)
        assert counts["sites"] == 2
        with target.session() as s:
            routes = {site.name: site.routed_to_id for site in s.scalars(select(Site))}
            ids = {site.name: site.id for site in s.scalars(select(Site))}
        assert routes == {"blog": ids["blog-staging"], "blog-staging": ids["blog"]}
    finally:
        target.dispose()


def test_a_sqlite_dump_restores_into_postgresql_and_ids_go_on_from_there(tmp_path: Path) -> None:
    """The logical dump is the same on both DBs: a cloud moves from SQLite to PostgreSQL with it."""
    from roles.management._backup import dump_tables, restore_tables
    from shared.db import Database
    from shared.db.models import Plan, Subscription, Tenant
    from tests.postgres import postgres_server

    source = Database.sqlite(tmp_path / "runtime.db")
    source.migrate()
    with source.session() as s:
        plan = Plan(name="basic", max_sites=2, storage_mb=5, keep_versions=7)
        tenant = Tenant(name="contoso")
        s.add_all([plan, tenant])
        s.flush()
        s.add(Subscription(tenant_id=tenant.id, plan_id=plan.id))
    dump = dump_tables(source)
    source.dispose()
    assert dump["dialect"] == "sqlite" and dump["tables"]["plans"][0]["keep_versions"] == 7
    with postgres_server() as url:
        target = Database(url)
        try:
            target.migrate()
            counts = restore_tables(target, dump["alembic_revision"], dump["tables"], force=False)
            assert counts["plans"] == counts["tenants"] == counts["subscriptions"] == 1
            again = dump_tables(target)
            assert again["tables"] == dump["tables"]
            # New rows get ids past the restored ones.
            with target.session() as s:
                second = Plan(name="pro", max_sites=9, storage_mb=50)
                s.add(second)
                s.flush()
                assert second.id == dump["tables"]["plans"][0]["id"] + 1
        finally:
            target.dispose()
