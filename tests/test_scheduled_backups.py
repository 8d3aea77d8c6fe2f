"""Scheduled backups as a plan option, end to end through `sitecloud up`: a plan's interval and count,
each site's current content written as a zip on time, the last N kept, a tenant's list and download."""

from __future__ import annotations

import asyncio
import datetime as dt
import time
import zipfile
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
from alembic import command
from alembic.config import Config
from sqlalchemy import text

from roles.management._site_backups import Due, ScheduledBackups
from roles.management.config import BACKUP_MIN_EVERY_ENV
from shared.db.session import _MIGRATIONS, Database
from shared.logs import get_logger
from tests.cloud import LocalCloud
from tests.postgres import postgres_server
from tests.support import wait_until

pytestmark = pytest.mark.timeout(300)

# The test cloud allows intervals down to this; a production cloud's floor is an hour.
MIN_EVERY = 2


@pytest.fixture(scope="module")
def cloud(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalCloud]:
    cloud = LocalCloud(tmp_path_factory.mktemp("cloud") / "home")
    with pytest.MonkeyPatch.context() as mp:
        # Read by the controller as it writes management's config: the roles need not inherit it.
        mp.setenv(BACKUP_MIN_EVERY_ENV, str(MIN_EVERY))
        cloud.start()
    try:
        yield cloud
    finally:
        cloud.kill_everything()


@pytest.fixture(scope="module")
def tenant(cloud: LocalCloud) -> dict[str, Any]:
    plan = cloud.cli(
        "plan", "create", "backed", "--max-sites", "3", "--storage-mb", "5",
        "--backup-every", f"{MIN_EVERY}s", "--backup-keep", "2",
    )  # fmt: skip
    assert (plan["backup_every_seconds"], plan["backup_keep"]) == (MIN_EVERY, 2), plan
    tenant = cloud.cli("tenant", "create", "contoso")
    sub = cloud.cli("subscription", "create", "--tenant", "contoso", "--plan", "backed")
    return {**tenant, "subscription": sub["id"]}


def _unzipped(path: Path) -> dict[str, bytes]:
    with zipfile.ZipFile(path) as zf:
        assert zf.testzip() is None
        return {i.filename: zf.read(i) for i in zf.infolist()}


def _backups(cloud: LocalCloud, token: str, site: str = "shop") -> dict[str, Any]:
    answer: dict[str, Any] = cloud.cli("site", "backups", site, token=token)
    return answer


def test_a_published_site_is_backed_up_on_schedule_with_its_bytes(
    cloud: LocalCloud, tenant: dict[str, Any], tmp_path: Path
) -> None:
    token = tenant["token"]
    cloud.cli("site", "create", "shop", "--subscription", str(tenant["subscription"]), token=token)
    # Nothing published yet: nothing to back up, and the list says what the plan does.
    empty = _backups(cloud, token)
    assert empty == {"site": "shop", "every_seconds": MIN_EVERY, "every": "2s", "keep": 2, "backups": []}
    tree = tmp_path / "site"
    (tree / "img").mkdir(parents=True)
    files = {"index.html": b"<h1>shop</h1>", "img/logo.svg": b"<svg/>" * 300}
    for name, data in files.items():
        (tree / name).write_bytes(data)
    version = cloud.cli("deploy", "shop", str(tree), token=token)["version"]

    backups = wait_until(
        lambda: [b for b in _backups(cloud, token)["backups"] if b["version"] == version],
        timeout=30,
        what="a scheduled backup of the published version",
    )
    newest = backups[-1]
    assert newest["name"].endswith(f"-v{version}.zip") and newest["bytes"] > 0, newest

    target = tmp_path / "got.zip"
    got = cloud.cli("site", "backup-download", "shop", newest["name"], "--to", str(target), token=token)
    assert got["file"] == str(target) and got["backup"] == newest["name"], got
    assert got["bytes"] == target.stat().st_size
    assert _unzipped(target) == files

    # Without a name: the newest one.
    default = cloud.cli("site", "backup-download", "shop", "--to", str(tmp_path / "newest.zip"), token=token)
    assert _unzipped(tmp_path / "newest.zip") == files, default

    # Put back: after a new deploy, the backup's content is the site's again, as a new version.
    (tree / "index.html").write_bytes(b"<h1>broken</h1>")
    broken = cloud.cli("deploy", "shop", str(tree), token=token)["version"]
    cloud.wait_for_content("shop", "/", b"<h1>broken</h1>")
    restored = cloud.cli("site", "backup-restore", "shop", newest["name"], token=token)
    assert restored["restored"] == newest["name"] and restored["version"] > broken, restored
    cloud.wait_for_content("shop", "/", files["index.html"])
    assert "scheduled backup " + newest["name"] + " written" in cloud.role_logs()

    # Written whole under the management role's home, never a temporary left beside them.
    folder = cloud.home / "roles" / "management" / "backups" / "shop"
    on_disk = sorted(p.name for p in folder.iterdir())
    assert on_disk and all(n.endswith(".zip") and not n.startswith(".") for n in on_disk), on_disk


def test_only_the_last_n_are_kept_and_unchanged_content_is_not_copied_again(
    cloud: LocalCloud, tenant: dict[str, Any], tmp_path: Path
) -> None:
    token = tenant["token"]
    wait_until(lambda: _backups(cloud, token)["backups"], timeout=30, what="a backup")
    # Several intervals with nothing published: no second copy of the same version.
    time.sleep(3 * MIN_EVERY + 1)
    versions = [b["version"] for b in _backups(cloud, token)["backups"]]
    assert len(versions) == len(set(versions)), versions

    tree = tmp_path / "site"
    tree.mkdir()
    published = []
    for n in range(3):
        (tree / "index.html").write_bytes(f"<h1>edition {n}</h1>".encode())
        version = cloud.cli("deploy", "shop", str(tree), token=token)["version"]
        published.append(version)
        wait_until(
            lambda v=version: [b for b in _backups(cloud, token)["backups"] if b["version"] == v],
            timeout=30,
            what=f"a backup of version {version}",
        )
    # The plan keeps two: the two newest versions, oldest first.
    kept = wait_until(
        lambda: (b := _backups(cloud, token)["backups"]) and len(b) == 2 and b,
        timeout=30,
        what="exactly two kept",
    )
    assert [b["version"] for b in kept] == published[-2:], kept
    names = [b["name"] for b in kept]
    assert sorted(names) == names  # stamped names sort by time


def test_another_tenant_cannot_see_or_fetch_them(cloud: LocalCloud, tenant: dict[str, Any]) -> None:
    other = cloud.cli("tenant", "create", "fabrikam")
    hidden = cloud.cli("site", "backups", "shop", check=False, token=other["token"])
    assert hidden["error"]["code"] == "not_found", hidden
    name = _backups(cloud, tenant["token"])["backups"][-1]["name"]
    fetch = cloud.cli(
        "site", "backup-download", "shop", name, "--to", "/dev/null", check=False, token=other["token"]
    )
    assert fetch["error"]["code"] == "not_found", fetch
    bad = cloud.cli("site", "backup-download", "shop", "cloud.json", check=False, token=tenant["token"])
    assert bad["error"]["code"] == "invalid_input" and "not a backup name" in bad["error"]["message"], bad


@pytest.mark.parametrize(
    ("args", "says"),
    [
        (("--backup-every", "1s"), f"must be 0 (off) or from {MIN_EVERY} (2s) to 31622400 (366d)"),
        (("--backup-every", "400d"), f"from {MIN_EVERY} (2s) to 31622400 (366d), not 34560000"),
        (("--backup-every", "soon"), "'soon' is not an interval"),
        (("--backup-keep", "0"), "backup_keep"),
        (("--backup-keep", "101"), "backup_keep"),
    ],
)
def test_bad_backup_settings_are_refused_clearly(
    cloud: LocalCloud, tenant: dict[str, Any], args: tuple[str, ...], says: str
) -> None:
    answer = cloud.cli("plan", "update", "backed", *args, check=False)
    assert answer["error"]["code"] == "invalid_input", answer
    assert says in answer["error"]["message"], answer
    plan = cloud.cli("plan", "show", "backed")
    assert (plan["backup_every_seconds"], plan["backup_keep"]) == (MIN_EVERY, 2), plan


def test_plan_shows_its_schedule_and_backups_can_be_turned_off(cloud: LocalCloud) -> None:
    listed = {p["name"]: p for p in cloud.cli("plan", "list")["plans"]}
    assert listed["backed"]["backup_every_seconds"] == MIN_EVERY
    assert "every 2s, the last 2 kept" in cloud.cli_text("plan", "show", "backed")
    off = cloud.cli("plan", "create", "plain", "--max-sites", "1", "--storage-mb", "1")
    assert (off["backup_every_seconds"], off["backup_keep"]) == (0, 7), off
    changed = cloud.cli("plan", "update", "plain", "--backup-every", "1d", "--backup-keep", "14")
    assert (changed["backup_every_seconds"], changed["backup_keep"]) == (86400, 14), changed
    assert "every 1d, the last 14 kept" in cloud.cli_text("plan", "show", "plain")


def test_the_schedule_follows_the_newest_file_across_restarts(tmp_path: Path) -> None:
    """A management that starts again takes the next backup when the newest file says, not at once."""
    taken: list[int] = []
    asked: list[str] = []

    async def schedule() -> tuple[list[Due], set[str]]:
        return [Due("blog", 3600, 2)], {"blog"}

    async def newest(site: str) -> int | None:
        asked.append(site)
        return 7

    async def zip_of(site: str, version: int) -> AsyncIterator[bytes]:
        taken.append(version)
        yield b"PK-zip-bytes"

    def backups() -> ScheduledBackups:
        return ScheduledBackups(
            tmp_path, min_every=3600, schedule=schedule, newest_version=newest, zip_of=zip_of,
            log=get_logger("management", host="test"),
        )  # fmt: skip

    folder = tmp_path / "blog"
    folder.mkdir()
    recent = dt.datetime.now(dt.UTC) - dt.timedelta(minutes=10)
    (folder / f"{recent:%Y%m%dT%H%M%SZ}-v6.zip").write_bytes(b"old")
    (folder / ".20200101T000000Z-v1.zip.part").write_bytes(b"half")  # a write cut short
    asyncio.run(backups().run_once())
    assert taken == []  # not due: ten minutes of an hour
    assert sorted(p.name for p in folder.iterdir()) == [f"{recent:%Y%m%dT%H%M%SZ}-v6.zip"]

    stale = dt.datetime.now(dt.UTC) - dt.timedelta(hours=2)
    (folder / f"{recent:%Y%m%dT%H%M%SZ}-v6.zip").rename(folder / f"{stale:%Y%m%dT%H%M%SZ}-v6.zip")
    (folder / "20200101T000000Z-v1.zip").write_bytes(b"oldest")
    asyncio.run(backups().run_once())
    assert taken == [7]
    names = [b.name for b in backups().of_site("blog")]
    # Two kept: the stale one and the new one; the oldest went.
    assert len(names) == 2 and names[0] == f"{stale:%Y%m%dT%H%M%SZ}-v6.zip" and names[1].endswith("-v7.zip")
    assert (folder / names[1]).read_bytes() == b"PK-zip-bytes"

    # Due again with the same version published: no second copy of it; a new version is taken.
    newest_file = folder / names[1]
    created = dt.datetime.now(dt.UTC) - dt.timedelta(hours=2)
    newest_file.rename(folder / f"{created:%Y%m%dT%H%M%SZ}-v7.zip")
    same = backups()
    asked.clear()
    asyncio.run(same.run_once())
    assert taken == [7] and len(same.of_site("blog")) == 2 and asked == ["blog"]
    asyncio.run(same.run_once())  # and the fileserver is not asked again until an interval later
    assert taken == [7] and asked == ["blog"]

    # A site that is gone takes its backups along.
    async def nothing() -> tuple[list[Due], set[str]]:
        return [], set()

    ScheduledBackups(
        tmp_path, min_every=3600, schedule=nothing, newest_version=newest, zip_of=zip_of,
        log=get_logger("management", host="test"),
    ).sweep(set())  # fmt: skip
    assert not folder.exists()


def _upgrade_from_0011(db: Database) -> list[tuple[str, int, int]]:
    cfg = Config()
    cfg.set_main_option("script_location", str(_MIGRATIONS))
    cfg.attributes["engine"] = db.engine
    command.upgrade(cfg, "0011")
    with db.engine.begin() as c:
        c.execute(text("insert into plans (name, max_sites, storage_mb) values ('old', 1, 10)"))
        c.execute(text("insert into tenants (name) values ('t')"))
        c.execute(
            text(
                "insert into subscriptions (tenant_id, plan_id, state, verification_id) values (1, 1, 'active', 'x')"
            )
        )
    command.upgrade(cfg, "head")
    with db.engine.begin() as c:
        rows = c.execute(text("select name, backup_every_seconds, backup_keep from plans")).all()
    # Down and up again keeps the plan and what refers to it.
    command.downgrade(cfg, "0011")
    command.upgrade(cfg, "head")
    with db.engine.begin() as c:
        assert c.execute(text("select count(*) from subscriptions")).scalar_one() == 1
    return [tuple(r) for r in rows]


def test_the_migration_adds_backups_off_to_existing_plans_on_sqlite(tmp_path: Path) -> None:
    db = Database.sqlite(tmp_path / "old.db")
    try:
        assert _upgrade_from_0011(db) == [("old", 0, 7)]
    finally:
        db.dispose()


def test_the_migration_adds_backups_off_to_existing_plans_on_postgresql() -> None:
    with postgres_server() as url:
        db = Database(url)
        try:
            assert _upgrade_from_0011(db) == [("old", 0, 7)]
        finally:
            db.dispose()
