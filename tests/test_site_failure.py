"""One bad site never holds back the others, end to end on a real cloud (`sitecloud up`).

A setting that got past management (written straight into the runtime DB here, as a value a looser
check once let through would be) reaches the worker in its snapshot. The worker applies the rest of
the snapshot, answers that one site with the platform's 503 page, and says Degraded with the reason;
other sites, old and new, go on as usual; fixing the setting brings it all back to Ready.
"""

from __future__ import annotations

import ftplib
import hashlib
import io
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select

from roles.worker._layout import APPS_BASE
from shared.db import Database, Site, bump_generation
from tests.cloud import LocalCloud
from tests.support import wait_until
from tests.test_worker_apps import running_cloud

pytestmark = pytest.mark.timeout(240)


@pytest.fixture(scope="module")
def cloud() -> Iterator[LocalCloud]:
    # Not under /tmp: the worker keeps content in /var/lib/sitecloud/apps-<hash> (its role home is
    # 0700), and other test sessions on this machine sweep the ones made for homes under /tmp.
    root = Path(tempfile.mkdtemp(prefix="sitecloud-failure-", dir="/var/tmp"))
    os.chmod(root, 0o711)
    cloud = LocalCloud(root / "home")
    try:
        cloud.start()
        yield cloud
    finally:
        cloud.kill_everything()
        worker_home = os.path.realpath(root / "home" / "roles" / "worker")
        shutil.rmtree(APPS_BASE / f"apps-{hashlib.sha256(worker_home.encode()).hexdigest()[:12]}", True)
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="module")
def subscription(cloud: LocalCloud) -> str:
    cloud.cli("plan", "create", "small", "--max-sites", "20", "--storage-mb", "5")
    cloud.cli("tenant", "create", "contoso")
    return str(cloud.cli("subscription", "create", "--tenant", "contoso", "--plan", "small")["id"])


def _publish(site: dict[str, Any], files: dict[str, bytes]) -> None:
    ftp = ftplib.FTP()
    ftp.connect(site["ftp"]["host"], site["ftp"]["port"], timeout=10)
    ftp.login(site["ftp"]["user"], site["ftp"]["password"])
    for name, data in files.items():
        ftp.storbinary(f"STOR {name}", io.BytesIO(data))
    ftp.quit()


def _store_settings_past_management(cloud: LocalCloud, site: str, settings: dict[str, str]) -> None:
    db = Database.sqlite(cloud.home / "sitecloud.db")
    try:
        with db.session() as s:
            row = s.scalars(select(Site).where(Site.name == site)).one()
            row.app_settings = {**(row.app_settings or {}), **settings}
            bump_generation(s)
    finally:
        db.dispose()


def _worker(cloud: LocalCloud) -> dict[str, Any]:
    roles = cloud.cli("role", "list")["roles"]
    return dict(next(r for r in roles if r["role"] == "worker"))


@pytest.mark.parametrize(
    ("tag", "settings", "why"),
    [
        ("a", {"idle_timeout": "\u00b2"}, "idle_timeout must be a whole number of seconds"),
        ("b", {"SECRET": "lone \ud800 surrogate"}, "not valid UTF-8"),
        ("c", {f"V{i}": "x" * 4000 for i in range(20)}, "at most 65536 bytes"),
    ],
)
def test_a_bad_site_fails_alone_and_comes_back_when_fixed(
    cloud: LocalCloud, subscription: str, tag: str, settings: dict[str, str], why: str
) -> None:
    good = cloud.cli("site", "create", f"good-{tag}", "--subscription", subscription)
    bad = cloud.cli("site", "create", f"bad-{tag}", "--subscription", subscription)
    _publish(good, {"index.html": b"good site"})
    _publish(bad, {"index.html": b"bad site"})
    cloud.wait_for_content(f"good-{tag}", "/", b"good site")
    cloud.wait_for_content(f"bad-{tag}", "/", b"bad site")

    _store_settings_past_management(cloud, f"bad-{tag}", settings)

    def failed() -> bytes | None:
        status, _, body = cloud.get(f"bad-{tag}", "/")
        return body if status == 503 else None

    page = wait_until(failed, timeout=15, what="the bad site to answer 503")
    assert b"sitecloud" in page and b"bad site" not in page and b"good site" not in page
    assert cloud.get(f"good-{tag}", "/")[::2] == (200, b"good site")

    worker = wait_until(
        lambda: (w := _worker(cloud))["state"] == "Degraded" and w, timeout=15, what="the worker Degraded"
    )
    assert f"bad-{tag}" in worker["reason"] and why in worker["reason"], worker
    shown = cloud.cli("site", "show", f"bad-{tag}")
    assert [p["reason"] for p in shown["problems"]] and why in shown["problems"][0]["reason"], shown
    assert cloud.cli("site", "show", f"good-{tag}")["problems"] == []

    # Other tenants' work goes on at once: a new site, new content, a setting change.
    fresh = cloud.cli("site", "create", f"fresh-{tag}", "--subscription", subscription)
    _publish(fresh, {"index.html": b"fresh v1"})
    cloud.wait_for_content(f"fresh-{tag}", "/", b"fresh v1")
    _publish(fresh, {"index.html": b"fresh v2"})
    cloud.wait_for_content(f"fresh-{tag}", "/", b"fresh v2")
    cloud.cli("site", "set", f"good-{tag}", "GREETING=hello")
    worker = wait_until(
        lambda: (w := _worker(cloud))["config_version"] == w["desired_version"] and w,
        timeout=10,
        what="the worker to take the latest snapshot",
    )
    assert worker["state"] == "Degraded"

    # The owner fixes it (through management, as it should have been): all back to Ready.
    cloud.cli("site", "unset", f"bad-{tag}", *settings)
    cloud.wait_for_content(f"bad-{tag}", "/", b"bad site")
    wait_until(lambda: _worker(cloud)["state"] == "Ready", timeout=15, what="the worker Ready again")
    assert cloud.cli("site", "show", f"bad-{tag}")["problems"] == []


def _role(cloud: LocalCloud, kind: str) -> dict[str, Any]:
    return dict(next(r for r in cloud.cli("role", "list")["roles"] if r["role"] == kind))


def test_a_role_that_refuses_its_snapshot_is_degraded_with_the_reason(
    cloud: LocalCloud, subscription: str
) -> None:
    """The file server still takes a snapshot whole or not at all: a site id it cannot use makes it
    refuse the snapshot, and the role is then Degraded with why, never Ready, until that is fixed."""
    cloud.cli("site", "create", "odd", "--subscription", subscription)
    db = Database.sqlite(cloud.home / "sitecloud.db")
    try:
        with db.session() as s:
            row = s.scalars(select(Site).where(Site.name == "odd")).one()
            good_uid, row.uid = row.uid, "not a uid!"
            bump_generation(s)
        fileserver = wait_until(
            lambda: (r := _role(cloud, "fileserver"))["state"] == "Degraded" and r,
            timeout=15,
            what="the file server Degraded",
        )
        assert "refused config version" in fileserver["reason"] and "'odd'" in fileserver["reason"], (
            fileserver
        )
        assert fileserver["config_version"] < fileserver["desired_version"]
        with db.session() as s:
            s.scalars(select(Site).where(Site.name == "odd")).one().uid = good_uid
            bump_generation(s)
        fileserver = wait_until(
            lambda: (r := _role(cloud, "fileserver"))["state"] == "Ready" and r,
            timeout=15,
            what="the file server Ready again",
        )
        assert fileserver["reason"] in ("", None)
    finally:
        db.dispose()


def test_serving_processes_answer_a_failed_site_with_the_503_page() -> None:
    """With serving processes (``processes: 2``) the failure travels with the hand-over to each of them."""
    with running_cloud(processes=2) as worker:
        worker.add_site("fine")
        worker.add_site("broken", idle_timeout="\u00b2")
        worker.publish("fine", {"index.html": b"fine"})
        worker.publish("broken", {"index.html": b"broken"})
        wait_until(lambda: worker.get("fine", "/")[::2] == (200, b"fine"), what="the fine site")
        for _ in range(6):  # new connections: each may land on either serving process
            status, _, body = worker.get("broken", "/")
            assert status == 503 and b"cannot be served" in body, (status, body)
        health = worker.worker.health()
        assert health["status"] == "degraded" and "idle_timeout" in health["failed_sites"]["broken"]
        worker.set("broken", idle_timeout=60)
        wait_until(lambda: worker.get("broken", "/")[::2] == (200, b"broken"), what="the fixed site")
        assert "failed_sites" not in worker.worker.health()
