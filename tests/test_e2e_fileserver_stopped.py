"""The file server stopped by the admin (`sitecloud role stop fileserver localhost`) on a one-box cloud.

The publisher takes the snapshot with no file server and says it is Degraded, why; FTP answers
commands that need storage with a 451 "storage is unavailable, try again later" and keeps the session;
`sitecloud deploy` is answered unavailable (exit 6); the worker keeps serving what it has. Started
again, publishing works again.
"""

from __future__ import annotations

import ftplib
import io
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.cloud import LocalCloud, basic_tenant, running_cloud, site_ftp
from tests.support import wait_until

pytestmark = pytest.mark.timeout(300)

BODY = b"<h1>kept while the file server is stopped</h1>"


@pytest.fixture(scope="module")
def cloud(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalCloud]:
    yield from running_cloud(tmp_path_factory)


def _role(cloud: LocalCloud, kind: str) -> dict[str, Any]:
    return next(r for r in cloud.cli("role", "list")["roles"] if r["role"] == kind)


def _deploy(cloud: LocalCloud, site: str, folder: Path) -> subprocess.CompletedProcess[str]:
    argv = [sys.executable, "-m", "roles.management.cli", "--home", str(cloud.home), "deploy", site]
    return subprocess.run([*argv, str(folder)], capture_output=True, text=True, timeout=90)


def test_publishing_with_the_file_server_stopped_says_storage_is_unavailable(
    cloud: LocalCloud, tmp_path: Path
) -> None:
    tenant = basic_tenant(cloud)
    site = cloud.cli("site", "create", "kept", "--subscription", str(tenant["subscription"]))
    ftp = wait_until(lambda: site_ftp(site), timeout=15, what="FTP login")
    ftp.storbinary("STOR index.html", io.BytesIO(BODY))
    ftp.quit()
    cloud.wait_for_content("kept", "/", BODY)

    cloud.cli("role", "stop", "fileserver", "localhost")
    publisher = wait_until(
        lambda: (r := _role(cloud, "publisher"))["state"] == "Degraded" and r,
        timeout=15,
        what="the publisher to say it is degraded",
    )
    assert publisher["reason"].startswith("no fileserver is running"), publisher
    assert "pattern" not in publisher["reason"], publisher

    # Logins need no storage; what does is answered 451, and the session goes on.
    ftp = site_ftp(site)
    with pytest.raises(ftplib.error_temp, match=r"^451 storage is unavailable, try again later"):
        ftp.storbinary("STOR new.html", io.BytesIO(b"new"))
    with pytest.raises(ftplib.error_temp, match=r"^451 storage is unavailable"):
        ftp.nlst()
    assert ftp.voidcmd("NOOP").startswith("200")

    folder = tmp_path / "site"
    folder.mkdir()
    (folder / "index.html").write_bytes(b"<h1>not now</h1>")
    done = _deploy(cloud, "kept", folder)
    assert done.returncode == 6, (done.stdout, done.stderr)
    assert "storage is unavailable, try again later" in done.stderr, done.stderr
    assert "internal error" not in done.stderr and "Traceback" not in done.stderr, done.stderr

    # The tenant's reads of its content say it is unavailable, but not where the fileserver listens
    # (before: "cannot reach https://localhost:<control port>/v1/sites/kept/versions: ...").
    for command in (("site", "versions", "kept"), ("site", "rollback", "kept")):
        argv = [sys.executable, "-m", "roles.management.cli", "--home", str(cloud.home), *command]
        env = {**os.environ, "SITECLOUD_TOKEN": tenant["token"]}
        read = subprocess.run(argv, capture_output=True, text=True, timeout=60, env=env)
        assert read.returncode == 6, (command, read.stdout, read.stderr)
        assert read.stderr.startswith("error: the fileserver is unavailable now ("), read.stderr
        assert "https://" not in read.stderr and "localhost" not in read.stderr, read.stderr

    # The worker keeps serving the version it has.
    status, _, body = cloud.get("kept", "/")
    assert (status, body) == (200, BODY)
    publisher_log = (cloud.home / "logs" / "publisher.log").read_text(errors="replace")
    assert "AttributeError" not in publisher_log and "Traceback" not in publisher_log

    worker = _role(cloud, "worker")
    assert "refused" not in (worker["reason"] or ""), worker

    cloud.cli("role", "start", "fileserver", "localhost")
    wait_until(lambda: _role(cloud, "publisher")["state"] == "Ready", timeout=20, what="the publisher Ready")
    # The session that was told to try again later does, and it works.
    try:
        ftp.storbinary("STOR new.html", io.BytesIO(b"new"))
        assert "new.html" in ftp.nlst()
        ftp.quit()
    finally:
        ftp.close()
    cloud.wait_for_content("kept", "/new.html", b"new")
    done = _deploy(cloud, "kept", folder)
    assert done.returncode == 0, (done.stdout, done.stderr)
    cloud.wait_for_content("kept", "/", b"<h1>not now</h1>")
