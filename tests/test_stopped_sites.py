"""A stopped site, and the sites of a suspended subscription, keep their content for as long as they
exist, end to end through `sitecloud up`: the fileserver's trash is emptied while they are off, and
they come back with the same bytes and every version. A stopped site is still published to; a
suspended one refuses its publishers, saying why. A backup of either holds their files."""

from __future__ import annotations

import ftplib
import io
import os
import shutil
import subprocess
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest

from tests.cloud import LocalCloud, basic_tenant, running_cloud, site_ftp
from tests.support import app_base, wait_until

pytestmark = pytest.mark.timeout(300)

LOGO = bytes(range(256)) * 64


@pytest.fixture(scope="module")
def cloud(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalCloud]:
    # Gone sites' app homes go 15 s after a snapshot: sooner here, where a test waits for it.
    yield from running_cloud(tmp_path_factory, settings={"worker": {"app_home_removal_delay": 2}})


@pytest.fixture(scope="module")
def tenant(cloud: LocalCloud) -> dict[str, Any]:
    return basic_tenant(cloud)


def _unzipped(path: Path) -> dict[str, bytes]:
    with zipfile.ZipFile(path) as zf:
        return {i.filename: zf.read(i) for i in zf.infolist() if not i.is_dir()}


def _published(cloud: LocalCloud, tenant: dict[str, Any], name: str, tmp_path: Path) -> dict[str, Any]:
    """A site with three versions: a deploy, then two FTP uploads; what it serves, and its versions."""
    token = tenant["token"]
    site = cloud.cli("site", "create", name, "--subscription", str(tenant["subscription"]), token=token)
    tree = tmp_path / name
    (tree / "img").mkdir(parents=True)
    (tree / "index.html").write_bytes(f"<h1>{name}</h1>".encode())
    (tree / "img" / "logo.bin").write_bytes(LOGO)
    cloud.cli("deploy", name, str(tree), token=token)
    ftp = site_ftp(site)
    try:
        ftp.storbinary("STOR notes.txt", io.BytesIO(b"first"))
        ftp.storbinary("STOR notes.txt", io.BytesIO(b"second"))
    finally:
        ftp.quit()
    files = {"index.html": f"<h1>{name}</h1>".encode(), "img/logo.bin": LOGO, "notes.txt": b"second"}
    cloud.wait_for_content(name, "/notes.txt", b"second")
    versions = cloud.cli("site", "versions", name, token=token)["versions"]
    assert len(versions) == 3, versions
    return {**site, "files": files, "versions": versions}


def _offline(cloud: LocalCloud, name: str) -> None:
    wait_until(lambda: cloud.get(name, "/")[0] != 200, timeout=15, what=f"{name} to go offline")


def _empty_the_trash(cloud: LocalCloud) -> None:
    """What the fileserver does to trashed content once its lifetime (7 days) is over."""
    trash = cloud.home / "roles" / "fileserver" / "trash"
    assert trash.parent.is_dir(), f"no fileserver home at {trash.parent}"
    if trash.is_dir():
        for entry in trash.iterdir():
            shutil.rmtree(entry)


def _serves_it_all(cloud: LocalCloud, tenant: dict[str, Any], site: dict[str, Any]) -> None:
    name = site["name"]
    for path, body in site["files"].items():
        cloud.wait_for_content(name, f"/{path}", body)
    versions = cloud.cli("site", "versions", name, token=tenant["token"])["versions"]
    assert versions[: len(site["versions"])] == site["versions"], versions


def test_a_stopped_site_comes_back_whole_after_the_trash_is_emptied(
    cloud: LocalCloud, tenant: dict[str, Any], tmp_path: Path
) -> None:
    token = tenant["token"]
    tenant["kept"] = site = _published(cloud, tenant, "kept", tmp_path)
    assert cloud.cli("site", "stop", "kept", token=token)["state"] == "stopped"
    _offline(cloud, "kept")
    _empty_the_trash(cloud)
    assert cloud.cli("site", "start", "kept", token=token)["state"] == "running"
    _serves_it_all(cloud, tenant, site)


def test_a_suspended_subscription_s_site_comes_back_whole_after_the_trash_is_emptied(
    cloud: LocalCloud, tenant: dict[str, Any], tmp_path: Path
) -> None:
    sub = str(tenant["subscription"])
    tenant["frozen"] = site = _published(cloud, tenant, "frozen", tmp_path)
    assert cloud.cli("subscription", "suspend", sub)["state"] == "suspended"
    try:
        _offline(cloud, "frozen")
        _empty_the_trash(cloud)
    finally:
        assert cloud.cli("subscription", "resume", sub)["state"] == "active"
    _serves_it_all(cloud, tenant, site)


def test_a_stopped_site_is_read_backed_up_and_published_to(
    cloud: LocalCloud, tenant: dict[str, Any], tmp_path: Path
) -> None:
    token, site = tenant["token"], tenant["kept"]
    cloud.cli("site", "stop", "kept", token=token)
    _offline(cloud, "kept")
    # Its versions are there to list, download and back up while it is stopped.
    assert cloud.cli("site", "versions", "kept", token=token)["versions"] == site["versions"]
    first = site["versions"][0]["version"]
    cloud.cli("site", "download", "kept", str(first), "-o", str(tmp_path / "v1.zip"), token=token)
    assert _unzipped(tmp_path / "v1.zip") == {"index.html": b"<h1>kept</h1>", "img/logo.bin": LOGO}
    made = cloud.cli("backup", "create", "--to", str(tmp_path / "backup"), "--site", "kept")
    assert made["sites"] == {"kept": site["versions"][-1]["version"]}, made
    assert _unzipped(tmp_path / "backup" / "sites" / "kept.zip") == site["files"]

    # It is still published to (as on Azure): what is published serves once it is started.
    ftp = site_ftp(site)
    try:
        ftp.storbinary("STOR later.txt", io.BytesIO(b"published while stopped"))
    finally:
        ftp.quit()
    tree = tmp_path / "redeploy"
    tree.mkdir()
    for path, body in site["files"].items():
        (tree / path).parent.mkdir(parents=True, exist_ok=True)
        (tree / path).write_bytes(body)
    (tree / "later.txt").write_bytes(b"deployed while stopped")
    printed = cloud.cli_text("deploy", "kept", str(tree), "--token", token)
    assert "site kept is stopped: it builds and serves this version once it is started" in printed, printed
    assert printed.rstrip().endswith(", kept until the site is started (it is built then)"), printed
    assert cloud.get("kept", "/later.txt")[0] != 200

    assert cloud.cli("site", "start", "kept", token=token)["state"] == "running"
    _serves_it_all(cloud, tenant, site)
    cloud.wait_for_content("kept", "/later.txt", b"deployed while stopped")
    assert len(cloud.cli("site", "versions", "kept", token=token)["versions"]) == 5


def test_a_suspended_subscription_s_site_refuses_its_publishers_saying_why_and_is_read(
    cloud: LocalCloud, tenant: dict[str, Any], tmp_path: Path
) -> None:
    token, sub, site = tenant["token"], str(tenant["subscription"]), tenant["frozen"]
    assert cloud.cli("subscription", "suspend", sub)["state"] == "suspended"
    try:
        _offline(cloud, "frozen")
        # Its publishing user learns why it may not publish; its tenant too.
        with pytest.raises(ftplib.error_perm) as caught:
            site_ftp(site)
        assert str(caught.value).startswith("530 The subscription of site frozen is suspended"), caught.value
        (tmp_path / "tree").mkdir()
        (tmp_path / "tree" / "index.html").write_bytes(b"not while suspended")
        refused = cloud.cli("deploy", "frozen", str(tmp_path / "tree"), token=token, check=False)
        assert refused["error"]["code"] == "forbidden", refused
        assert "subscription of site frozen is suspended" in refused["error"]["message"], refused
        rolled = cloud.cli("site", "rollback", "frozen", token=token, check=False)
        assert rolled["error"]["code"] == "forbidden", rolled
        # git shows why too (before: only "The requested URL returned error: 403").
        base = urlsplit(site["deploy"]["url"])
        remote = f"https://{site['ftp']['user']}:{site['ftp']['password']}@{base.netloc}/frozen.git"
        listed = subprocess.run(
            ["git", "ls-remote", remote],
            capture_output=True,
            text=True,
            env={**os.environ, "GIT_SSL_CAINFO": str(cloud.ca_file), "GIT_TERMINAL_PROMPT": "0"},
            timeout=30,
        )
        assert listed.returncode != 0, listed
        assert "remote: sitecloud: the subscription of site frozen is suspended" in listed.stderr, (
            listed.stderr
        )
        # A slot is a new site: refused as `site create` is (before, it was made, suspended).
        slot = cloud.cli("site", "slot", "create", "frozen", "stage", token=token, check=False)
        assert slot["error"]["code"] == "forbidden" and "suspended" in slot["error"]["message"], slot

        # Its content can still be read: versions, and a backup with its files.
        assert cloud.cli("site", "versions", "frozen", token=token)["versions"] == site["versions"]
        cloud.cli("backup", "create", "--to", str(tmp_path / "backup"), "--site", "frozen")
        assert _unzipped(tmp_path / "backup" / "sites" / "frozen.zip") == site["files"]
    finally:
        assert cloud.cli("subscription", "resume", sub)["state"] == "active"
    _serves_it_all(cloud, tenant, site)
    assert cloud.cli("site", "versions", "frozen", token=token)["versions"] == site["versions"]
    site_ftp(site).quit()


def test_a_backup_of_a_stopped_and_a_suspended_site_restores_their_content(
    cloud: LocalCloud, tenant: dict[str, Any], tmp_path: Path, tmp_path_factory: pytest.TempPathFactory
) -> None:
    token = tenant["token"]
    # A second subscription to suspend, beside the stopped site of the first.
    other = cloud.cli("subscription", "create", "--tenant", "contoso", "--plan", "basic")["id"]
    asleep = cloud.cli("site", "create", "asleep", "--subscription", str(other), token=token)
    ftp = site_ftp(asleep)
    try:
        ftp.storbinary("STOR index.html", io.BytesIO(b"<h1>asleep</h1>"))
    finally:
        ftp.quit()
    cloud.wait_for_content("asleep", "/", b"<h1>asleep</h1>")
    cloud.cli("site", "stop", "kept", token=token)
    cloud.cli("subscription", "suspend", str(other))
    _offline(cloud, "asleep")
    _empty_the_trash(cloud)
    kept = {name: _unzipped_version(cloud, name, tmp_path) for name in ("kept", "asleep")}
    assert kept["asleep"] == {"index.html": b"<h1>asleep</h1>"}
    made = cloud.cli("backup", "create", "--to", str(tmp_path / "backup"))
    assert all(made["sites"][name] > 0 for name in kept), made

    fresh = LocalCloud(tmp_path_factory.mktemp("fresh") / "home")
    fresh.start()
    try:
        restored = fresh.cli("backup", "restore", str(tmp_path / "backup"))
        assert {"kept", "asleep"} <= set(restored["sites"]), restored
        states = {s["name"]: s["state"] for s in fresh.cli("site", "list")["sites"]}
        assert states["kept"] == "stopped", states
        for name, files in kept.items():
            assert _unzipped_version(fresh, name, tmp_path / "fresh") == files
        fresh.cli("site", "start", "kept")
        fresh.wait_for_content("kept", "/later.txt", b"deployed while stopped")
    finally:
        fresh.kill_everything()
        cloud.cli("subscription", "resume", str(other))
        cloud.cli("site", "start", "kept", token=token)


def _unzipped_version(cloud: LocalCloud, name: str, where: Path) -> dict[str, bytes]:
    """The site's newest version, as a zip download (the admin's)."""
    where.mkdir(parents=True, exist_ok=True)
    target = where / f"{name}.zip"
    cloud.cli("site", "download", name, "-o", str(target))
    return _unzipped(target)


COUNTER_APP = b"""
import os

def app(environ, start_response):
    path = os.path.join(os.environ["HOME"], "visits")
    visits = int(open(path).read()) + 1 if os.path.exists(path) else 1
    with open(path, "w") as f:
        f.write(str(visits))
    body = ("visit %d" % visits).encode()
    start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", str(len(body)))])
    return [body]
"""


def test_a_deleted_sites_app_home_goes_from_the_worker_and_a_stopped_sites_stays(
    cloud: LocalCloud, tmp_path: Path
) -> None:
    # Before, an app's home (its files, its quota volume, packages and logs) stayed on the worker
    # for good after its site was deleted.
    cloud.cli("plan", "create", "apps", "--max-sites", "2", "--storage-mb", "20")
    cloud.cli("tenant", "create", "counters")
    sub = cloud.cli("subscription", "create", "--tenant", "counters", "--plan", "apps")
    bases = {}
    for name in ("keeper", "goner"):
        cloud.cli("site", "create", name, "--subscription", str(sub["id"]))
        (tmp_path / name).mkdir()
        (tmp_path / name / "app.py").write_bytes(COUNTER_APP)
        cloud.cli("deploy", name, str(tmp_path / name))
        # The deploy asked the app for / once, to see it start: that was visit 1.
        cloud.wait_for_content(name, "/", b"visit 2", timeout=60)
        bases[name] = app_base(name)
    assert bases["keeper"] != bases["goner"]

    cloud.cli("site", "stop", "keeper")
    cloud.cli("site", "delete", "goner", "--yes")
    wait_until(lambda: not bases["goner"].exists(), timeout=60, what="the deleted site's app home to go")
    assert bases["keeper"].is_dir()
    # The stopped site's home is whole: its app counts on from where it was.
    cloud.cli("site", "start", "keeper")

    def answered() -> bytes | None:
        status, _, body = cloud.get("keeper", "/")
        return body if status == 200 else None

    # (The start asked it for / once too, as the deploy did: that was visit 3.)
    assert wait_until(answered, timeout=60, what="the started site to answer") == b"visit 4"
