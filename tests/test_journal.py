"""The fileserver's journal, end to end: a real fileserver and publisher, uploads over FTP (ftplib and
lftp), the fileserver or the publisher killed with SIGKILL in the middle, and what came back after its
restart; then versions and rollback over the content API."""

from __future__ import annotations

import contextlib
import ftplib
import hashlib
import io
import random
import shutil
import subprocess
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from roles.fileserver.config import FileserverConfig
from roles.publisher.config import PublisherConfig
from shared.credentials import hash_password
from shared.net import free_port_range
from tests.support import CloudPKI, RoleProcess, call, wait_until

SITE, PASSWORD = "journal", "journal-secret"
SNAPSHOT_SITE = {"uid": "uid-journal", "quota_bytes": 64 << 20}


@dataclass
class Pair:
    pki: CloudPKI
    fileserver: RoleProcess
    publisher: RoleProcess

    @property
    def ftp_port(self) -> int:
        config = self.publisher.config
        assert isinstance(config, PublisherConfig)
        return config.ftp_port

    def ftp(self) -> ftplib.FTP:
        ftp = ftplib.FTP(timeout=20)
        ftp.connect("127.0.0.1", self.ftp_port)
        ftp.login(SITE, PASSWORD)
        return ftp

    def api(self, method: str, path: str, **kwargs: Any) -> tuple[int, Any]:
        url = f"{self.fileserver.control_url}/v1/sites/{SITE}{path}"
        return call(url, self.pki.client_ssl("publisher"), method=method, **kwargs)

    def manifest(self) -> dict[str, Any]:
        status, body = self.api("GET", "/manifest")
        assert status == 200, body
        return dict(body)

    def push(self) -> None:
        self.fileserver.push_config({"version": 1, "sites": {SITE: SNAPSHOT_SITE}})
        self.publisher.push_config(
            {
                "version": 1,
                "fileserver": self.fileserver.control_url,
                "sites": {SITE: {**SNAPSHOT_SITE, "users": {SITE: hash_password(PASSWORD)}}},
            }
        )


@pytest.fixture(scope="module")
def pair(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Pair]:
    work = tmp_path_factory.mktemp("journal")
    pki = CloudPKI(work / "pki")
    low = free_port_range(20)
    fileserver = RoleProcess(pki.role_config(FileserverConfig, "fileserver", work / "fs"), pki)
    publisher = RoleProcess(
        pki.role_config(PublisherConfig, "publisher", work / "pub", passive_ports=(low, low + 19)), pki
    )
    fileserver.start()
    publisher.start()
    pair = Pair(pki, fileserver, publisher)
    pair.push()
    try:
        yield pair
    finally:
        publisher.stop()
        fileserver.stop()


def _site_files(root: Path, count: int, folders: int) -> dict[str, bytes]:
    """A small site on local disk: ``count`` files of 0.5-8 KB (one of 300 KB) in ``folders`` folders."""
    rnd = random.Random(11)
    files: dict[str, bytes] = {}
    for i in range(count):
        rel = f"d{i % folders:02d}/f{i:04d}.html"
        size = 300 * 1024 if i == count // 2 else rnd.randint(512, 8192)
        files[rel] = rnd.randbytes(size)
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(files[rel])
    return files


def _upload(pair: Pair, names: list[str], files: dict[str, bytes], acked: list[str]) -> None:
    """STOR files one by one; a file counts as acknowledged only once its 226 came."""
    try:
        ftp = pair.ftp()
    except (OSError, ftplib.Error):
        return
    try:
        for rel in names:
            folder = rel.rpartition("/")[0]
            with contextlib.suppress(ftplib.error_perm):
                ftp.mkd(folder)
            reply = ftp.storbinary(f"STOR {rel}", io.BytesIO(files[rel]))
            if reply.startswith("226"):
                acked.append(rel)
    except (OSError, EOFError, ftplib.Error):
        return
    finally:
        ftp.close()


def _check_whole(pair: Pair, files: dict[str, bytes], acked: list[str]) -> dict[str, Any]:
    """Every acknowledged file is there with its bytes; whatever else is there is whole too."""
    manifest = pair.manifest()
    listed = manifest["files"]
    missing = [rel for rel in acked if rel not in listed]
    assert not missing, f"{len(missing)} files got a 226 and are gone after the restart: {missing[:5]}"
    for rel, entry in listed.items():
        assert entry["sha256"] == hashlib.sha256(files[rel]).hexdigest(), f"{rel} is not whole"
        status, body = pair.api("GET", f"/files/{rel}")
        assert status == 200 and body == files[rel], f"{rel}: the stored bytes differ"
    return manifest


def test_kill_9_mid_upload_keeps_every_acknowledged_file_whole(pair: Pair, tmp_path: Path) -> None:
    files = _site_files(tmp_path / "src", 400, 8)
    names = sorted(files)
    acked: list[str] = []
    # Two sessions at once, so their uploads share the journal's fsyncs.
    halves = [names[0::2], names[1::2]]
    threads = [threading.Thread(target=_upload, args=(pair, half, files, acked)) for half in halves]
    for thread in threads:
        thread.start()
    wait_until(lambda: len(acked) >= 120 or None, timeout=60, what="120 uploads acknowledged")
    pair.fileserver.kill()
    for thread in threads:
        thread.join(30)
    assert len(acked) < len(names), "every upload finished before the kill: nothing was tested"

    pair.fileserver.start()
    pair.push()
    manifest = _check_whole(pair, files, acked)
    assert len(manifest["files"]) >= len(acked)

    # The mirror resumes where it stopped, with lftp as a site owner would run it.
    if shutil.which("lftp") is None:
        pytest.skip("lftp is not installed (apt-get install lftp): the resumed mirror is not checked")
    script = f"set ftp:ssl-allow no; set net:max-retries 2; mirror -R --no-perms {tmp_path / 'src'} /; quit"
    done = subprocess.run(
        ["lftp", "-u", f"{SITE},{PASSWORD}", "-p", str(pair.ftp_port), "-e", script, "127.0.0.1"],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    manifest = _check_whole(pair, files, names)
    assert set(manifest["files"]) == set(names)


def _acked_by_lftp(trace: str) -> list[str]:
    """The files an lftp debug trace shows a ``226`` for (paths from the site's root)."""
    acked: list[str] = []
    folder, sent = "/", None
    for line in trace.splitlines():
        if "---> CWD " in line:
            path = line.split("---> CWD ", 1)[1].strip()
            folder = path if path.startswith("/") else f"{folder.rstrip('/')}/{path}"
        elif "---> STOR " in line:
            name = line.split("---> STOR ", 1)[1].strip()
            sent = name.lstrip("/") if name.startswith("/") else f"{folder.strip('/')}/{name}".lstrip("/")
        elif "<--- 226" in line and sent is not None:
            acked.append(sent)
            sent = None
    return acked


def test_kill_9_of_the_publisher_mid_mirror_keeps_every_acknowledged_file_whole(
    pair: Pair, tmp_path: Path
) -> None:
    if shutil.which("lftp") is None:
        pytest.skip("lftp is not installed (apt-get install lftp)")
    src = tmp_path / "site"
    files = _site_files(src, 300, 6)
    names = sorted(files)
    # Another tree than the fileserver test's: start from an empty site.
    status, body = pair.api("POST", "/commit", body={"ops": [], "replace": True})
    assert status == 200, body
    trace_path = tmp_path / "lftp.trace"
    script = (
        "set ftp:ssl-allow no; set net:max-retries 1; set net:reconnect-interval-base 1; "
        f"mirror -R --no-perms {src} /; quit"
    )
    with trace_path.open("w") as trace:
        # -d: the protocol on stderr, to see which STORs were answered 226 before the kill.
        mirror = subprocess.Popen(
            ["lftp", "-d", "-u", f"{SITE},{PASSWORD}", "-p", str(pair.ftp_port), "-e", script, "127.0.0.1"],
            stdout=trace,
            stderr=subprocess.STDOUT,
        )
        try:
            wait_until(
                lambda: len(_acked_by_lftp(trace_path.read_text(errors="replace"))) >= 60 or None,
                timeout=60,
                what="60 files of the mirror acknowledged",
            )
            pair.publisher.kill()
            mirror.wait(60)
        finally:
            if mirror.poll() is None:
                mirror.kill()
                mirror.wait()
    acked = _acked_by_lftp(trace_path.read_text(errors="replace"))
    assert set(acked) <= set(names), acked[:5]
    assert len(acked) < len(names), "the mirror finished before the kill: nothing was tested"

    pair.publisher.start()
    pair.push()
    manifest = _check_whole(pair, files, acked)
    assert len(manifest["files"]) >= len(acked)

    # The same mirror again finishes the job.
    done = subprocess.run(
        ["lftp", "-u", f"{SITE},{PASSWORD}", "-p", str(pair.ftp_port), "-e", script, "127.0.0.1"],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert set(_check_whole(pair, files, names)["files"]) == set(names)


def test_a_clean_restart_replays_nothing_and_keeps_versions(pair: Pair) -> None:
    before = pair.manifest()
    pair.fileserver.stop()
    journal = pair.fileserver.config.home / "content" / SNAPSHOT_SITE["uid"] / "journal"
    # A clean stop folds the journal into a checkpoint.
    assert not journal.exists() or journal.stat().st_size == 0
    pair.fileserver.start()
    pair.push()
    after = pair.manifest()
    assert after["version"] == before["version"] and after["files"] == before["files"]


def test_versions_and_rollback(pair: Pair) -> None:
    with pair.ftp() as ftp:
        ftp.storbinary("STOR index.html", io.BytesIO(b"<h1>one</h1>"))
        one = pair.manifest()["version"]
        ftp.storbinary("STOR index.html", io.BytesIO(b"<h1>two</h1>"))
        ftp.delete("d00/f0000.html")
    newest = pair.manifest()
    assert newest["version"] == one + 2 and "d00/f0000.html" not in newest["files"]

    status, body = pair.api("GET", "/versions")
    assert status == 200, body
    listed = {v["version"]: v for v in body["versions"]}
    assert listed[one]["source"] == "ftp" and listed[one]["files"] == len(newest["files"]) + 1

    status, body = pair.api("POST", "/rollback", body={"version": one})
    assert status == 200, body
    assert body["rolled_back_to"] == one and body["version"] == newest["version"] + 1
    back = pair.manifest()
    assert back["files"]["index.html"]["sha256"] == hashlib.sha256(b"<h1>one</h1>").hexdigest()
    assert "d00/f0000.html" in back["files"]
    status, body = pair.api("GET", "/versions")
    assert body["versions"][-1]["source"] == "rollback"

    # What changed between two versions, as a worker asks for it.
    status, body = pair.api("GET", f"/diff?since={newest['version']}&version={back['version']}")
    assert status == 200, body
    assert set(body["files"]) == {"index.html", "d00/f0000.html"} and body["whole"] is True
    # Asked with a limit, a whole difference comes without its paths (the worker builds anew), and
    # so does one longer than the limit; a shorter one comes as it is.
    status, body = pair.api("GET", f"/diff?since={newest['version']}&version={back['version']}&limit=100")
    assert status == 200 and body["whole"] is True and body["files"] == {} and body["dirs"] == {}, body
    status, body = pair.api("GET", f"/diff?since={one}&version={newest['version']}&limit=1")
    assert status == 200 and body["whole"] is True and body["files"] == {}, body
    status, body = pair.api("GET", f"/diff?since={one}&version={newest['version']}&limit=2")
    assert status == 200 and body["whole"] is False, body
    assert set(body["files"]) == {"index.html", "d00/f0000.html"}

    status, body = pair.api("POST", "/rollback", body={"version": 10_000})
    assert status == 404 and body["error"]["hint"].startswith("kept: "), body
    status, body = pair.api("POST", "/rollback", body={"version": "yesterday"})
    assert status == 400, body

    # A rollback survives a kill -9 too: it is a journal record like any other change.
    pair.fileserver.kill()
    pair.fileserver.start()
    pair.push()
    assert pair.manifest()["files"] == back["files"]
