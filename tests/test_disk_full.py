"""A cloud whose disk fills up: every upload is refused with a reply that says so (FTP 452, HTTP 507
``storage_full``), never a reset or an internal error; nothing half-stored; the fileserver says
Degraded with the reason; and once space is freed, uploads work again and everything stored before
is served.

The cloud's home (the fileserver's content, the publisher's copies, the runtime DB) is on a small
tmpfs of its own, as a home on a small disk would be: mounting one needs root."""

from __future__ import annotations

import ftplib
import io
import os
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from roles.publisher._cache import BlobCache
from roles.worker.service import _disk_gaps
from shared.disk import disk_space
from shared.logs import get_logger
from tests.cloud import LocalCloud, running_cloud, site_ftp
from tests.forked_cli import run_cli
from tests.support import data_plane, lane_exchange, publish_files, wait_until

pytestmark = [
    pytest.mark.timeout(300),
    pytest.mark.skipif(os.geteuid() != 0, reason="a disk of its own (a tmpfs mount) needs root"),
]

_MB = 1024 * 1024


def _mount_tmpfs(where: Path, size_mb: int) -> None:
    where.mkdir(parents=True, exist_ok=True)
    subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size_mb}m,mode=0755", "tmpfs", str(where)], check=True
    )


def _unmount(where: Path) -> None:
    subprocess.run(["umount", "-l", str(where)], check=False)


def _fill(directory: Path, *, leave: int) -> Path:
    """A file that takes the free space but ``leave`` bytes (removed, it frees them again). Some is
    left so that the runtime DB, on the same disk here, can still record the roles' health."""
    filler = directory / "filler"
    filler.write_bytes(b"\0" * max(0, disk_space(directory).free - leave))
    return filler


@pytest.fixture(scope="module")
def disk(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    where = tmp_path_factory.mktemp("small-disk") / "mnt"
    _mount_tmpfs(where, 96)
    try:
        yield where
    finally:
        _unmount(where)


@pytest.fixture(scope="module")
def cloud(tmp_path_factory: pytest.TempPathFactory, disk: Path) -> Iterator[LocalCloud]:
    # A role state older than 3 s shows as Unknown (10 s by default): sooner here, where a test waits.
    settings = {"management": {"role_stale_after": 3}}
    yield from running_cloud(tmp_path_factory, settings=settings, home=disk / "home")


@pytest.fixture(scope="module")
def site(cloud: LocalCloud) -> dict[str, Any]:
    # A plan whose quota is far past the disk: what stops the uploads is the disk, not the quota.
    cloud.cli("plan", "create", "roomy", "--max-sites", "2", "--storage-mb", "4096")
    cloud.cli("tenant", "create", "fabrikam")
    sub = cloud.cli("subscription", "create", "--tenant", "fabrikam", "--plan", "roomy")
    answer: dict[str, Any] = cloud.cli("site", "create", "photos", "--subscription", str(sub["id"]))

    def can_log_in() -> bool:
        try:
            site_ftp(answer).quit()
        except ftplib.error_perm:
            return False
        return True

    wait_until(can_log_in, timeout=30, what="the site's FTP login to reach the publisher")
    return answer


def _fileserver(cloud: LocalCloud) -> dict[str, Any]:
    roles: list[dict[str, Any]] = cloud.cli("role", "list")["roles"]
    return next(r for r in roles if r["role"] == "fileserver")


def test_a_full_disk_refuses_uploads_clearly_and_they_work_again_once_space_is_freed(
    cloud: LocalCloud, site: dict[str, Any], disk: Path
) -> None:
    ftp = site_ftp(site)
    try:
        ftp.storbinary("STOR before.html", io.BytesIO(b"<p>before</p>"))
        cloud.wait_for_content("photos", "/before.html", b"<p>before</p>")

        # Less than the next upload needs, and under the fileserver's "nearly full" mark.
        filler = _fill(disk, leave=2 * _MB)
        try:
            with pytest.raises(ftplib.error_temp) as refused:
                ftp.storbinary("STOR during.bin", io.BytesIO(os.urandom(4 * _MB)))
            reply = str(refused.value)
            # RFC 959's "insufficient storage space", on the control connection: clients show it.
            assert reply.startswith("452 "), reply
            assert "storage is full" in reply and "nothing was stored" in reply, reply
            assert "not your site's quota" in reply, reply
            # The session goes on, and nothing of the refused file is there.
            assert "during.bin" not in ftp.nlst()

            # A web deploy is refused the same way: 507 storage_full, exit 6 (unavailable).
            site_dir = disk.parent / "deploy"
            site_dir.mkdir(exist_ok=True)
            (site_dir / "index.html").write_bytes(b"<p>deployed</p>")
            (site_dir / "big.bin").write_bytes(os.urandom(4 * _MB))
            proc = run_cli(
                ["--home", str(cloud.home), "deploy", "photos", str(site_dir), "--json"],
                env=os.environ,
                timeout=60,
            )
            assert proc.returncode == 6, (proc.stdout, proc.stderr)
            assert b'"storage_full"' in proc.stdout, proc.stdout

            wait_until(
                lambda: _fileserver(cloud)["state"] == "Degraded",
                timeout=20,
                what="the fileserver to say Degraded",
            )
            fileserver = _fileserver(cloud)
            assert "disk is nearly full" in fileserver["reason"], fileserver
            assert fileserver["load"]["disk_free_bytes"] < disk_space(disk).floor, fileserver
        finally:
            filler.unlink()

        ftp.storbinary("STOR after.html", io.BytesIO(b"<p>after</p>"))
    finally:
        ftp.quit()
    cloud.wait_for_content("photos", "/after.html", b"<p>after</p>")
    assert cloud.get("photos", "/before.html")[2] == b"<p>before</p>"
    assert cloud.get("photos", "/during.bin")[0] == 404
    assert cloud.get("photos", "/index.html")[0] == 404  # the refused deploy changed nothing
    wait_until(lambda: _fileserver(cloud)["state"] == "Ready", timeout=20, what="the fileserver to be Ready")
    # A full disk is the host's condition: one line each, no traceback of an "internal error".
    logs = cloud.role_logs()
    assert "unhandled error" not in logs, logs[-3000:]
    assert "storing a file from a put lane failed" not in logs, logs[-3000:]


def test_a_full_disk_under_the_runtime_db_is_named_as_such_and_passes_once_space_is_freed(
    cloud: LocalCloud, site: dict[str, Any], disk: Path
) -> None:
    filler = _fill(disk, leave=0)
    try:
        proc = run_cli(
            [
                "--home",
                str(cloud.home),
                "plan",
                "create",
                "later",
                "--max-sites",
                "1",
                "--storage-mb",
                "5",
                "--json",
            ],
            env=os.environ,
            timeout=60,
        )
        assert proc.returncode == 6, (proc.stdout, proc.stderr)
        assert b'"storage_full"' in proc.stdout and b"runtime DB's disk is full" in proc.stdout, proc.stdout

        # The controller cannot record what it sees: the roles show as Unknown, saying why.
        def unknown_for_the_disk() -> bool:
            role = _fileserver(cloud)
            return role["state"] == "Unknown" and "runtime DB's disk is full" in role["reason"]

        wait_until(unknown_for_the_disk, timeout=30, what="role list to name the runtime DB's full disk")
        # Visitors are served meanwhile.
        assert cloud.get("photos", "/before.html")[2] == b"<p>before</p>"
    finally:
        filler.unlink()
    wait_until(
        lambda: _fileserver(cloud)["state"] == "Ready", timeout=30, what="the roles to be recorded again"
    )
    created = cloud.cli("plan", "create", "later", "--max-sites", "1", "--storage-mb", "5")
    assert created["name"] == "later", created


def test_the_publisher_s_copies_make_way_on_a_nearly_full_disk(tmp_path: Path) -> None:
    where = tmp_path / "disk"
    _mount_tmpfs(where, 40)
    try:
        cache = BlobCache(where / "cache", 1024 * _MB, get_logger("publisher"))
        for n in range(3):
            fill = cache.fill()
            assert fill is not None
            fill.write(bytes([n]) * (8 * _MB))
            fill.keep(f"{n:064x}", 8 * _MB)
        assert cache.total_bytes == 24 * _MB
        # Something else (the fileserver, on one box) takes the disk but 1 MB.
        content = where / "content"
        content.write_bytes(b"\0" * (disk_space(where).free - 1 * _MB))
        assert disk_space(where).nearly_full

        # A new copy starts once the oldest copy is gone and the disk is no longer nearly full.
        fill = cache.fill()
        assert fill is not None
        assert not disk_space(where).nearly_full
        assert cache.open(f"{0:064x}", 8 * _MB) is None
        newest = cache.open(f"{2:064x}", 8 * _MB)
        assert newest is not None
        newest.close()
        fill.drop()

        # When dropping every copy would not be enough, none is made (and the copies are gone).
        cache = BlobCache(where / "cache", 1024 * _MB, get_logger("publisher"))
        for n in range(2):
            fill = cache.fill()
            assert fill is not None
            fill.write(bytes([n]) * (256 * 1024))
            fill.keep(f"{n:064x}", 256 * 1024)
        assert cache.total_bytes == 512 * 1024
        (where / "more").write_bytes(b"\0" * (disk_space(where).free - 512 * 1024))
        assert cache.fill() is None
        assert cache.total_bytes == 0
    finally:
        _unmount(where)


def test_a_worker_says_degraded_while_its_disk_is_nearly_full(tmp_path: Path) -> None:
    where = tmp_path / "disk"
    _mount_tmpfs(where, 16)
    try:
        assert _disk_gaps(where) == []
        filler = _fill(where, leave=256 * 1024)
        (gap,) = _disk_gaps(where)
        assert gap.startswith("its disk is nearly full (0 MB free of 16 MB)"), gap
        filler.unlink()
        assert _disk_gaps(where) == []
    finally:
        _unmount(where)


def test_a_worker_whose_disk_is_full_serves_the_version_before_until_the_new_one_fits(
    tmp_path: Path,
) -> None:
    apps = tmp_path / "apps"
    _mount_tmpfs(apps, 24)
    try:
        with data_plane(tmp_path, "sites.test", worker={"apps_dir": str(apps)}) as (
            pki,
            fileserver,
            worker,
            _,
        ):
            uid = "0f" * 16
            fileserver.push_config({"version": 1, "sites": {"alpha": {"uid": uid, "quota_bytes": 1 << 26}}})
            worker.push_config(
                {"version": 1, "fileserver": fileserver.control_url, "sites": {"alpha": {"uid": uid}}}
            )
            port = int(worker.config.data_port)  # type: ignore[attr-defined]

            def page() -> bytes:
                head = b"GET /page.html HTTP/1.1\r\nHost: x\r\nX-Sitecloud-Site: alpha\r\n\r\n"
                return lane_exchange(pki, port, [head], lane=False)[0].body

            publish_files(pki, fileserver, "alpha", {"page.html": b"<p>one</p>"})
            wait_until(lambda: page() == b"<p>one</p>", timeout=20, what="version 1 on the worker")
            filler = _fill(apps, leave=512 * 1024)
            try:
                publish_files(
                    pki, fileserver, "alpha", {"page.html": b"<p>two</p>", "big.bin": os.urandom(4 * _MB)}
                )
                wait_until(
                    lambda: worker.health()["status"] == "degraded",
                    timeout=20,
                    what="the worker to say Degraded",
                )
                assert "disk is nearly full" in worker.health()["reason"]
                time.sleep(2)  # a few sync attempts, each refused by the disk
                assert page() == b"<p>one</p>"  # whole, the version before: never half of the new one
            finally:
                filler.unlink()
            wait_until(lambda: page() == b"<p>two</p>", timeout=30, what="version 2 once it fits")
            wait_until(
                lambda: worker.health()["status"] == "ready", timeout=20, what="the worker to be Ready"
            )
    finally:
        _unmount(apps)
