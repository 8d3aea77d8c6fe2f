"""`sitecloud up --db postgresql://…`: the runtime DB on a real PostgreSQL server."""

from __future__ import annotations

import ftplib
import io
from pathlib import Path

import pytest

from tests.cloud import LocalCloud
from tests.postgres import postgres_server
from tests.support import wait_until

pytestmark = pytest.mark.timeout(180)


def test_a_cloud_on_postgresql_creates_and_serves_a_site(tmp_path: Path) -> None:
    with postgres_server() as url:
        cloud = LocalCloud(tmp_path / "home", db_url=url)
        cloud.start()
        try:
            cloud.cli("plan", "create", "pg", "--max-sites", "1", "--storage-mb", "1")
            cloud.cli("tenant", "create", "fabrikam")
            sub = cloud.cli("subscription", "create", "--tenant", "fabrikam", "--plan", "pg")
            site = cloud.cli("site", "create", "pgsite", "--subscription", str(sub["id"]))
            over = cloud.cli("site", "create", "pgsite2", "--subscription", str(sub["id"]), check=False)
            assert over["error"]["code"] == "limit_reached"
            ftp = ftplib.FTP()
            ftp.connect(site["ftp"]["host"], site["ftp"]["port"], timeout=10)
            ftp.login(site["ftp"]["user"], site["ftp"]["password"])
            ftp.storbinary("STOR index.html", io.BytesIO(b"on postgres"))
            ftp.quit()
            cloud.wait_for_content("pgsite", "/", b"on postgres")
            roles = wait_until(
                lambda: all(r["state"] == "Ready" for r in cloud.cli("role", "list")["roles"]),
                timeout=10,
                what="roles Ready",
            )
            assert roles
            assert cloud.stop() == 0
        finally:
            cloud.kill_everything()
