"""The publisher, end to end: a real publisher and a real fileserver process, driven with ftplib, lftp
and an HTTPS client; what landed is read back from the fileserver's manifest."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import ftplib
import hashlib
import http.client
import io
import json
import os
import shutil
import signal
import socket
import ssl
import struct
import subprocess
import time
import zipfile
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
from prometheus_client.parser import text_string_to_metric_families

from roles.fileserver.config import FileserverConfig
from roles.publisher._deploy import UPLOADS_PER_SITE
from roles.publisher._sites import SiteTable
from roles.publisher._slots import FairSlots
from roles.publisher.config import PublisherConfig
from shared.contracts.content import SITE_ENTRIES_MAX
from shared.contracts.snapshots import PublisherSnapshot
from shared.credentials import hash_password
from shared.errors import InvalidInput
from shared.net import free_port_range
from tests.support import CloudPKI, RoleProcess, call, wait_until

QUOTA = 256 * 1024
TINY_QUOTA = 8 * 1024
# Room for the big uploads' tests: past the size where an upload is streamed on, not much more.
BIG_QUOTA = 12 * 1024 * 1024
# The publisher's own copies of big files: room for one of 3 MB, not for two of 2 MB or one of 5 MB.
CACHE_BYTES = 4 * 1024 * 1024

# site -> (password, quota); each test works on sites of its own so their order does not matter.
SITES = {
    "alpha": ("alpha-secret", QUOTA),
    "beta": ("beta-secret", QUOTA),
    "tiny": ("tiny-secret", TINY_QUOTA),
    "abort": ("abort-secret", QUOTA),
    "web": ("web-secret", QUOTA),
    "bad": ("bad-secret", 64 * 1024),
    "mgmt": ("mgmt-secret", QUOTA),
    "mirror": ("mirror-secret", QUOTA),
    "gone": ("gone-secret", QUOTA),
    "large": ("large-secret", 8 * 1024 * 1024),
    "bigup": ("bigup-secret", BIG_QUOTA),
    "shelf": ("shelf-secret", QUOTA),
    "newest": ("newest-secret", 8 * 1024 * 1024),
    "parallel": ("parallel-secret", QUOTA),
    "paused": ("paused-secret", QUOTA),
    "frozen": ("frozen-secret", QUOTA),
    "reset": ("reset-secret", 8 * 1024 * 1024),
    "suspended": ("suspended-secret", QUOTA),
    "sized": ("sized-secret", QUOTA),
    "race": ("race-secret", QUOTA),
    "crowded": ("crowded-secret", QUOTA),
    "hoard": ("hoard-secret", QUOTA),
    "reborn": ("reborn-secret", 4 * 1024 * 1024),
    "hog-a": ("hog-a-secret", QUOTA),
    "hog-b": ("hog-b-secret", QUOTA),
    "queued": ("queued-secret", QUOTA),
}


@dataclass
class Cloud:
    pki: CloudPKI
    fileserver: RoleProcess
    publisher: RoleProcess
    hashes: dict[str, str]
    version: int = 0
    removed: set[str] = field(default_factory=set)
    # site -> "stopped" or "suspended", as the controller sends them (absent: running).
    states: dict[str, str] = field(default_factory=dict)
    # site -> its content id where it is not ``uid-<site>`` (a site deleted and created again).
    uids: dict[str, str] = field(default_factory=dict)
    # site -> its subscription, where the snapshot says one.
    subscriptions: dict[str, int] = field(default_factory=dict)

    @property
    def config(self) -> PublisherConfig:
        config = self.publisher.config
        assert isinstance(config, PublisherConfig)
        return config

    def push(self, *, fileserver: bool = True, publisher: bool = True) -> None:
        """Push the current site list to both roles (or one of them), as the controller would."""
        self.version += 1
        live = {name: spec for name, spec in SITES.items() if name not in self.removed}
        fs_sites = {
            name: {"uid": self.uids.get(name, f"uid-{name}"), "quota_bytes": quota}
            for name, (_, quota) in live.items()
        }
        if fileserver:
            self.fileserver.push_config({"version": self.version, "sites": fs_sites})
        pub_sites: dict[str, Any] = {"sites": {}, "suspended": {}}
        for name in live:
            state = self.states.get(name, "running")
            entry = {**fs_sites[name], "users": {name: self.hashes[name]}, "state": state}
            if name in self.subscriptions:
                entry["subscription"] = self.subscriptions[name]
            pub_sites["suspended" if state == "suspended" else "sites"][name] = entry
        if publisher:
            self.publisher.push_config(
                {"version": self.version, "fileserver": self.fileserver.control_url, **pub_sites}
            )

    def manifest(self, site: str) -> dict[str, Any]:
        status, body = call(
            f"{self.fileserver.control_url}/v1/sites/{site}/manifest", self.pki.client_ssl("publisher")
        )
        assert status == 200, body
        return dict(body)

    def cache_hits(self) -> int:
        """Downloads the publisher sent from its own copies, from its metrics."""
        status, body = call(f"{self.publisher.control_url}/metrics", self.pki.client_ssl("controller"))
        assert status == 200, body
        for family in text_string_to_metric_families(body.decode()):
            for sample in family.samples:
                if sample.name == "sitecloud_publisher_ftp_cache_hits_total":
                    return int(sample.value)
        raise AssertionError("the publisher has no ftp_cache_hits metric")

    def tree(self, site: str) -> tuple[dict[str, int], list[str]]:
        """The newest version's files (path -> size) and directories."""
        manifest = self.manifest(site)
        return {p: e["size"] for p, e in manifest["files"].items()}, sorted(manifest["dirs"])

    def ftp(self, site: str, password: str | None = None) -> ftplib.FTP:
        ftp = ftplib.FTP(timeout=10)
        try:
            ftp.connect("127.0.0.1", self.config.ftp_port)
            ftp.login(site, password if password is not None else SITES[site][0])
        except BaseException:
            ftp.close()
            raise
        return ftp

    def deploy(
        self, site: str, body: bytes, *, password: str | None = None, user: str | None = None
    ) -> tuple[int, Any, dict[str, str]]:
        """POST a zip to the public web deploy door; returns status, JSON body and headers."""
        headers = {"Content-Type": "application/zip"}
        if password != "":
            token = f"{user or site}:{password if password is not None else SITES[site][0]}"
            headers["Authorization"] = "Basic " + base64.b64encode(token.encode()).decode()
        return _https(
            f"https://localhost:{self.config.deploy_port}/api/deploy/{site}",
            self.pki.client_ssl(None),
            body,
            headers,
        )


def _https(
    url: str, ctx: ssl.SSLContext, body: bytes, headers: dict[str, str]
) -> tuple[int, Any, dict[str, str]]:
    parts = urlsplit(url)
    conn = http.client.HTTPSConnection(parts.hostname or "", parts.port, context=ctx, timeout=20)
    try:
        conn.request("POST", parts.path, body=body, headers=headers)
        resp = conn.getresponse()
        raw = resp.read()
        return resp.status, json.loads(raw) if raw else None, dict(resp.getheaders())
    finally:
        conn.close()


def _free_port_range(count: int) -> tuple[int, int]:
    first = free_port_range(count)
    return first, first + count - 1


@pytest.fixture(scope="module")
def cloud(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cloud]:
    root = tmp_path_factory.mktemp("publisher")
    pki = CloudPKI(root / "pki")
    fs_config = pki.role_config(FileserverConfig, "fileserver", root / "fileserver")
    pub_config = pki.role_config(
        PublisherConfig,
        "publisher",
        root / "publisher",
        ftp_auth_failed_delay=0.05,
        passive_ports=_free_port_range(20),
        max_deploy_bytes=512 * 1024,
        ftp_cache_bytes=CACHE_BYTES,
    )
    fileserver = RoleProcess(fs_config, pki).start()
    publisher = RoleProcess(pub_config, pki)
    try:
        publisher.start()
        cloud = Cloud(
            pki, fileserver, publisher, {name: hash_password(pw) for name, (pw, _) in SITES.items()}
        )
        cloud.push()
        yield cloud
    finally:
        publisher.stop()
        fileserver.stop()


def _stor(ftp: ftplib.FTP, path: str, data: bytes) -> str:
    return ftp.storbinary(f"STOR {path}", io.BytesIO(data))


def _stor_refused(ftp: ftplib.FTP, path: str, data: bytes) -> str:
    """STOR that the server may cut off mid-stream: the reply matters, not how the send ended."""
    ftp.voidcmd("TYPE I")
    # The server may stop reading and close the data connection mid-send.
    with ftp.transfercmd(f"STOR {path}") as conn, contextlib.suppress(OSError):
        conn.sendall(data)
    with pytest.raises(ftplib.Error) as caught:
        ftp.voidresp()
    return str(caught.value)


def _retr(ftp: ftplib.FTP, path: str) -> bytes:
    out = io.BytesIO()
    ftp.retrbinary(f"RETR {path}", out.write)
    return out.getvalue()


def _zip(members: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    return buf.getvalue()


# --- FTP


def test_ftp_upload_list_download_rename_delete(cloud: Cloud) -> None:
    with cloud.ftp("alpha") as ftp:
        assert ftp.pwd() == "/"
        low, high = cloud.config.passive_ports or (0, 0)
        assert low <= ftp.makepasv()[1] <= high
        ftp.mkd("css")
        ftp.mkd("css/old")
        assert _stor(ftp, "index.html", b"<h1>alpha</h1>").startswith("226")
        ftp.cwd("css")
        _stor(ftp, "site.css", b"body { color: red }")
        assert ftp.pwd() == "/css"
        ftp.cwd("/")
        assert sorted(ftp.nlst()) == ["css", "index.html"]
        assert sorted(ftp.nlst("css")) == ["old", "site.css"]
        lines: list[str] = []
        ftp.retrlines("LIST", lines.append)
        assert any(line.startswith("d") and line.endswith(" css") for line in lines), lines
        assert any(line.startswith("-") and " 14 " in line and line.endswith(" index.html") for line in lines)
        # ls options before a path, as lftp's `ls -la /css` and many scripts send them, are ignored.
        with_options: list[str] = []
        ftp.retrlines("LIST -la /css", with_options.append)
        assert [line.rsplit(" ", 1)[1] for line in with_options] == ["old", "site.css"], with_options
        assert sorted(ftp.nlst("-a css")) == ["old", "site.css"]
        assert _retr(ftp, "css/site.css") == b"body { color: red }"
        ftp.voidcmd("TYPE I")
        assert ftp.size("index.html") == 14

        assert cloud.tree("alpha") == (
            {"css/site.css": 19, "index.html": 14},
            ["css", "css/old"],
        )

        ftp.rename("index.html", "home.html")
        ftp.rename("css", "styles")
        # A folder that still holds files stays: 550 (RFC 959), saying why.
        with pytest.raises(
            ftplib.error_perm, match=r"^550 cannot remove directory 'styles': it is not empty"
        ):
            ftp.rmd("styles")
        ftp.rmd("styles/old")
        ftp.delete("styles/site.css")
        with pytest.raises(ftplib.error_perm, match=r"^550"):
            ftp.delete("styles/site.css")
        with pytest.raises(ftplib.error_perm, match=r"^550"):
            _retr(ftp, "nothing.html")
        ftp.rmd("styles")
        assert _retr(ftp, "home.html") == b"<h1>alpha</h1>"
    assert cloud.tree("alpha") == ({"home.html": 14}, [])


def test_ftp_append_and_overwrite(cloud: Cloud) -> None:
    with cloud.ftp("alpha") as ftp:
        _stor(ftp, "log.txt", b"one\n")
        ftp.storbinary("APPE log.txt", io.BytesIO(b"two\n"))
        assert _retr(ftp, "log.txt") == b"one\ntwo\n"
        _stor(ftp, "log.txt", b"fresh")
        assert _retr(ftp, "log.txt") == b"fresh"
        ftp.delete("log.txt")
        # STOU picks a new name inside the site (pyftpdlib's own would make a local temp file).
        before = set(ftp.nlst())
        ftp.storbinary("STOU", io.BytesIO(b"unique"))
        (name,) = set(ftp.nlst()) - before
        assert name.startswith("ftpd.") and _retr(ftp, name) == b"unique"
        ftp.delete(name)


def test_ftp_a_big_file_is_sent_as_it_arrives_and_resumes_with_rest(cloud: Cloud) -> None:
    # Past one direct-write block (4 MiB) and not a whole number of disk blocks: both roles write
    # their copies around the page cache, the tail the ordinary way.
    big = os.urandom(6 * 1024 * 1024 + 17)
    with cloud.ftp("large") as ftp:
        _stor(ftp, "big.bin", big)
        assert _retr(ftp, "big.bin") == big
        # A resumed download (REST) gets the rest; the session goes on with other commands after.
        out = io.BytesIO()
        ftp.retrbinary("RETR big.bin", out.write, rest=2_000_001)
        assert out.getvalue() == big[2_000_001:]
        # An offset no file reaches is refused at once, not at the transfer.
        with pytest.raises(ftplib.error_perm, match=r"^501 A restart offset is at most"):
            ftp.sendcmd("REST " + "9" * 30)
        assert ftp.size("big.bin") == len(big)
        ftp.delete("big.bin")
        assert ftp.voidcmd("NOOP").startswith("200")


def test_ftp_a_big_download_is_sent_from_the_publishers_own_copy(cloud: Cloud) -> None:
    one, two = os.urandom(2 * 1024 * 1024 + 1), os.urandom(2 * 1024 * 1024 + 2)
    hits = cloud.cache_hits()
    with cloud.ftp("large") as ftp:
        # The copy made while the file went up to the fileserver.
        _stor(ftp, "one.bin", one)
        assert _retr(ftp, "one.bin") == one
        assert cloud.cache_hits() == hits + 1
        # Another big upload's copy takes its room: one.bin comes from the fileserver again, and is
        # copied on its way to the client.
        _stor(ftp, "two.bin", two)
        assert _retr(ftp, "one.bin") == one
        assert cloud.cache_hits() == hits + 1
        assert _retr(ftp, "one.bin") == one
        assert cloud.cache_hits() == hits + 2
        # The copy sent is the one of the file's bytes now, whoever changed them: here a rollback on
        # the fileserver, behind the session's back.
        _stor(ftp, "one.bin", two)
        assert _retr(ftp, "one.bin") == two
        status, body = call(
            f"{cloud.fileserver.control_url}/v1/sites/large/rollback",
            cloud.pki.client_ssl("management"),
            method="POST",
            body={},
        )
        assert status == 200, body
        assert _retr(ftp, "one.bin") == one
        ftp.delete("one.bin")
        ftp.delete("two.bin")


def test_ftp_a_download_gives_the_newest_bytes_whatever_another_session_did(cloud: Cloud) -> None:
    # A small file is fetched by its path, with no look at the changes first: what another session
    # made, grew past the small-file size or removed since this one looked must still come out right.
    big = os.urandom(1024 * 1024 + 3)
    with cloud.ftp("newest") as mine, cloud.ftp("newest") as theirs:
        _stor(mine, "page.html", b"small")
        assert mine.nlst() == ["page.html"]
        assert _retr(mine, "page.html") == b"small"
        _stor(theirs, "page.html", big)
        _stor(theirs, "new.html", b"made by the other session")
        theirs.mkd("folder")
        assert _retr(mine, "page.html") == big
        assert _retr(mine, "new.html") == b"made by the other session"
        theirs.delete("new.html")
        with pytest.raises(ftplib.error_perm, match=r"^550"):
            _retr(mine, "new.html")
        with pytest.raises(ftplib.error_perm, match=r"^550"):
            _retr(mine, "folder")
        # The session still works after those refusals and the big file's abandoned small fetch.
        assert _retr(mine, "page.html") == big
        theirs.delete("page.html")
        theirs.rmd("folder")


def test_ftp_parallel_sessions_see_each_others_changes_at_once(cloud: Cloud) -> None:
    # A client's parallel transfers (lftp mirror --parallel, FileZilla's two at a time): one session
    # makes a folder, another stores into it right after its own upload, when its view of the site is
    # a moment old; and each upload's answer brings the others' files, with no extra round trip.
    with cloud.ftp("parallel") as main, cloud.ftp("parallel") as transfer:
        _stor(transfer, "first.html", b"1")
        main.mkd("img")
        _stor(transfer, "img/logo.png", b"png")
        transfer.cwd("/img")
        assert transfer.nlst() == ["logo.png"]
        _stor(main, "other.html", b"other")
        transfer.voidcmd("TYPE I")
        assert transfer.size("/other.html") == 5
        _stor(transfer, "/second.html", b"2")
        _stor(main, "third.html", b"3")
        _stor(transfer, "/fourth.html", b"4")
        transfer.cwd("/")
        assert transfer.nlst() == [
            "first.html",
            "fourth.html",
            "img",
            "other.html",
            "second.html",
            "third.html",
        ]
        # Right after its own put (its view is then taken as exact for a moment), SIZE of a file the
        # other session deleted meanwhile: clients resume from SIZE, so it is the fileserver's answer.
        _stor(transfer, "/fifth.html", b"5")  # leaves TYPE I set: SIZE worked only in TYPE I
        main.delete("other.html")
        with pytest.raises(ftplib.error_perm, match=r"^550"):
            transfer.size("/other.html")
    files = cloud.manifest("parallel")["files"]
    assert sorted(files) == [
        "fifth.html",
        "first.html",
        "fourth.html",
        "img/logo.png",
        "second.html",
        "third.html",
    ]


def test_ftp_two_sessions_making_and_entering_the_same_folders_never_fail(cloud: Cloud) -> None:
    # FileZilla's two transfers into new folders: each session enters the folder, or makes each
    # part of the path (the other session may just have: "exists") and then enters it. Entering
    # must work once the folder exists, whichever session made it and however recently.
    jobs = [(f"/a{i // 10}/b{i // 5}", f"f{i}.txt") for i in range(200)]
    failures: list[str] = []
    stored: list[str] = []

    def session(share: list[tuple[str, str]]) -> None:
        with cloud.ftp("race") as ftp:
            for folder, name in share:
                try:
                    try:
                        ftp.cwd(folder)
                    except ftplib.error_perm:
                        path = ""
                        for part in folder.strip("/").split("/"):
                            path += "/" + part
                            with contextlib.suppress(ftplib.error_perm):
                                ftp.mkd(path)
                        ftp.cwd(folder)
                    _stor(ftp, name, b"z" * 100)
                    stored.append(f"{folder}/{name}"[1:])
                except ftplib.Error as err:
                    failures.append(f"{folder}/{name}: {err}")

    with ThreadPoolExecutor(2) as pool:
        list(pool.map(session, (jobs[0::2], jobs[1::2])))
    assert failures == []
    assert sorted(cloud.manifest("race")["files"]) == sorted(stored)
    assert len(stored) == len(jobs)


def test_ftp_a_session_starts_from_the_last_ones_tree_and_sees_what_changed_since(cloud: Cloud) -> None:
    with cloud.ftp("shelf") as first:
        _stor(first, "a.txt", b"a")
        _stor(first, "b.txt", b"b")
    with cloud.ftp("shelf") as second, cloud.ftp("shelf") as third:
        assert second.nlst() == ["a.txt", "b.txt"]
        third.delete("a.txt")
        _stor(third, "c.txt", b"c")
    # Between sessions, a change none of them made: a rollback on the fileserver (undoes c.txt).
    status, body = call(
        f"{cloud.fileserver.control_url}/v1/sites/shelf/rollback",
        cloud.pki.client_ssl("management"),
        method="POST",
        body={},
    )
    assert status == 200, body
    with cloud.ftp("shelf") as fourth:
        assert fourth.nlst() == ["b.txt"]
        assert _retr(fourth, "b.txt") == b"b"
        assert fourth.size("b.txt") == 1
        with pytest.raises(ftplib.error_perm, match=r"^550"):
            _retr(fourth, "c.txt")
        fourth.delete("b.txt")


def test_ftp_size_answers_the_stored_size_in_either_type(cloud: Cloud) -> None:
    # Clients ask SIZE before switching to TYPE I (pyftpdlib refused it under TYPE A); like vsftpd,
    # the answer is the stored size.
    with cloud.ftp("sized") as ftp:
        _stor(ftp, "page.html", b"line one\nline two\n")
        ftp.mkd("folder")
        for kind in ("A", "I", "A"):
            ftp.voidcmd(f"TYPE {kind}")
            assert ftp.sendcmd("SIZE page.html") == "213 18"
            for refused in ("folder", "nothing.html"):
                with pytest.raises(ftplib.error_perm, match=r"^550 "):
                    ftp.sendcmd(f"SIZE {refused}")


def test_ftp_wrong_password_or_unknown_user_is_530(cloud: Cloud) -> None:
    for user, password in (("alpha", "wrong"), ("alpha", SITES["beta"][0]), ("nobody", "x")):
        with pytest.raises(ftplib.error_perm) as caught:
            cloud.ftp(user, password)
        assert str(caught.value).startswith("530 Authentication failed")
    with ftplib.FTP(timeout=10) as ftp:
        ftp.connect("127.0.0.1", cloud.config.ftp_port)
        with pytest.raises(ftplib.error_perm, match=r"^530"):
            ftp.nlst()


def test_ftp_a_site_cannot_reach_another_site(cloud: Cloud) -> None:
    with cloud.ftp("beta") as ftp:
        _stor(ftp, "beta-secret.txt", b"beta only")
    before = cloud.manifest("beta")

    with cloud.ftp("alpha") as ftp:
        ftp.mkd("beta")  # alpha's own directory called "beta"
        for target in ("../beta", "/../beta", "../../beta", "/beta/../../beta"):
            ftp.cwd("/")
            ftp.cwd(target)
            assert ftp.pwd() == "/beta"
            assert ftp.nlst() == []  # alpha's empty "beta", not site beta
        ftp.cwd("/")
        for path in ("../beta/beta-secret.txt", "/../beta/beta-secret.txt", "../../beta-secret.txt"):
            with pytest.raises(ftplib.error_perm, match=r"^550"):
                _retr(ftp, path)
        # Writes that try to climb land inside alpha.
        _stor(ftp, "../../beta/planted.txt", b"x")
        assert ftp.nlst("/beta") == ["planted.txt"]
        with pytest.raises(ftplib.error_perm, match=r"^55"):
            ftp.sendcmd("CWD a\\..\\..")
        ftp.delete("/beta/planted.txt")
        ftp.rmd("beta")
    assert cloud.manifest("beta") == before


def test_ftp_over_quota_upload_is_552_and_changes_nothing(cloud: Cloud) -> None:
    with cloud.ftp("tiny") as ftp:
        _stor(ftp, "keep.txt", b"k" * 1000)
        before = cloud.manifest("tiny")
        reply = _stor_refused(ftp, "big.bin", bytes(3 * TINY_QUOTA))
        assert reply.startswith("552 ") and "quota" in reply, reply
        assert cloud.manifest("tiny") == before
        # Replacing a file counts its old size as free again.
        _stor(ftp, "keep.txt", b"k" * (TINY_QUOTA - 10))
        assert ftp.nlst() == ["keep.txt"]
    assert cloud.tree("tiny")[0] == {"keep.txt": TINY_QUOTA - 10}


def test_ftp_cannot_grow_a_site_past_the_files_and_folders_a_zip_deploy_may_hold(cloud: Cloud) -> None:
    # Empty files and folders cost no quota: without a cap of their own, MKD and STOR of empty files
    # grew a site past what its own zip may hold, and every worker held each as an inode.
    fs = f"{cloud.fileserver.control_url}/v1/sites/crowded"
    ssl_ctx = cloud.pki.client_ssl("publisher")
    status, blob = call(f"{fs}/blobs", ssl_ctx, method="POST", data=b"")
    assert status == 200, blob
    folders = [{"op": "mkdir", "path": f"d{n}"} for n in range(100)]
    files = [
        {"op": "put", "path": f"d{n % 100}/f{n}", "sha256": blob["sha256"]}
        for n in range(SITE_ENTRIES_MAX - len(folders) - 1)
    ]
    status, body = call(
        f"{fs}/commit", ssl_ctx, method="POST", body={"ops": folders + files, "replace": True}
    )
    assert status == 200, body
    full = f"a site may hold at most {SITE_ENTRIES_MAX:,}"
    with cloud.ftp("crowded") as ftp:
        ftp.mkd("last")  # the 100,000th entry
        version = cloud.manifest("crowded")["version"]
        refusals: list[Callable[[], object]] = [
            lambda: ftp.mkd("one-more"),
            lambda: _stor(ftp, "empty.txt", b""),
            lambda: ftp.storbinary("STOU", io.BytesIO(b"")),
            lambda: ftp.storbinary("APPE new.txt", io.BytesIO(b"x")),
            lambda: ftp.rename("d0/f0", "new/f0"),  # a rename that makes a folder on its way
        ]
        for refused in refusals:
            with pytest.raises(ftplib.error_perm) as caught:
                refused()
            reply = str(caught.value)
            assert reply.startswith("552 ") and full in reply and "delete files or folders" in reply, reply
        assert cloud.manifest("crowded")["version"] == version  # nothing changed
        # What does not add an entry still works, and room made is room to use.
        ftp.storbinary("APPE d0/f0", io.BytesIO(b"more"))
        ftp.rename("d0/f100", "d1/moved")
        ftp.delete("d2/f2")
        _stor(ftp, "empty.txt", b"")
        with pytest.raises(ftplib.error_perm, match=full):
            ftp.mkd("one-more")
    # A deploy (a zip, a git push) of one entry too many is refused by the fileserver as well.
    too_many = [*folders, *files, {"op": "mkdir", "path": "a"}, {"op": "mkdir", "path": "b"}]
    status, body = call(f"{fs}/commit", ssl_ctx, method="POST", body={"ops": too_many, "replace": True})
    assert status == 413 and body["error"]["code"] == "too_many_entries" and full in body["error"]["message"]
    assert cloud.manifest("crowded")["version"] == version + 4


def test_ftp_aborted_upload_commits_nothing(cloud: Cloud) -> None:
    with cloud.ftp("abort") as ftp:
        _stor(ftp, "page.html", b"version 1")
        before = cloud.manifest("abort")
        ftp.voidcmd("TYPE I")
        data_conn = ftp.transfercmd("STOR page.html")
        data_conn.sendall(b"half of version 2 " * 1000)
        # Reset instead of a clean close: a clean close would be a complete (shorter) file.
        data_conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        data_conn.close()
        with pytest.raises(ftplib.error_temp, match=r"^426"):
            ftp.voidresp()
        assert cloud.manifest("abort") == before

        # ABOR in the middle of an upload commits nothing either.
        data_conn = ftp.transfercmd("STOR other.html")
        data_conn.sendall(b"partial")
        ftp.putcmd("ABOR")
        reply = ftp.getline()
        if reply.startswith("426"):  # the transfer had started: 426, then 226 for the ABOR
            reply = ftp.getline()
            assert reply.startswith("226"), reply
        else:
            assert reply.startswith("225"), reply
        data_conn.close()
        assert _retr(ftp, "page.html") == b"version 1"
    assert cloud.manifest("abort")["files"].keys() == {"page.html"}


def _staging(cloud: Cloud) -> list[Path]:
    """Uploads in progress on the fileserver's disk (none once an upload has ended either way)."""
    return [p for p in cloud.fileserver.config.home.glob("**/staging/*") if p.is_file()]


def _reset(conn: socket.socket) -> None:
    # A reset, not a clean close: a clean close would be a complete (shorter) file.
    conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    conn.close()


def test_ftp_a_big_upload_arrives_intact_and_durable_before_226(cloud: Cloud) -> None:
    # Past the size where the publisher sends the bytes on while they arrive: sent in odd-sized
    # pieces, the file must come out the same bytes, under the same sha256, with the 226.
    big = os.urandom(5 * 1024 * 1024 + 12345)
    with cloud.ftp("bigup") as ftp:
        ftp.voidcmd("TYPE I")
        with ftp.transfercmd("STOR data/../big.bin") as conn:
            view = memoryview(big)
            for at in range(0, len(big), 77_777):
                conn.sendall(view[at : at + 77_777])
        assert ftp.voidresp().startswith("226")
        # The 226 came after the fileserver had it: the manifest has it at once.
        entry = cloud.manifest("bigup")["files"]["big.bin"]
        assert entry["sha256"] == hashlib.sha256(big).hexdigest() and entry["size"] == len(big)
        assert _retr(ftp, "big.bin") == big
        # Replaced by a big file again, and then by a small one: each whole.
        bigger = os.urandom(6 * 1024 * 1024)
        _stor(ftp, "big.bin", bigger)
        assert cloud.manifest("bigup")["files"]["big.bin"]["sha256"] == hashlib.sha256(bigger).hexdigest()
        _stor(ftp, "big.bin", b"small now")
        assert _retr(ftp, "big.bin") == b"small now"
        ftp.delete("big.bin")
    assert _staging(cloud) == []


def test_ftp_a_big_upload_cut_off_aborted_or_over_quota_leaves_nothing(cloud: Cloud) -> None:
    with cloud.ftp("bigup") as ftp:
        _stor(ftp, "keep.bin", b"kept")
        before = cloud.manifest("bigup")
        ftp.voidcmd("TYPE I")

        # The client goes away after 4 MB: already streaming to the fileserver, which drops it.
        conn = ftp.transfercmd("STOR cut.bin")
        conn.sendall(os.urandom(4 * 1024 * 1024))
        _reset(conn)
        with pytest.raises(ftplib.error_temp, match=r"^426"):
            ftp.voidresp()
        assert cloud.manifest("bigup") == before
        wait_until(lambda: _staging(cloud) == [], what="the cut-off upload's staging file to go")

        # ABOR in the middle of a big upload.
        conn = ftp.transfercmd("STOR aborted.bin")
        conn.sendall(os.urandom(3 * 1024 * 1024))
        ftp.putcmd("ABOR")
        _reset(conn)
        reply = ftp.getline()
        if reply.startswith("426"):  # the transfer had started: 426, then 226 for the ABOR
            reply = ftp.getline()
        assert reply[:3] in ("225", "226"), reply
        assert cloud.manifest("bigup") == before
        wait_until(lambda: _staging(cloud) == [], what="the aborted upload's staging file to go")

        # Over the quota half-way through: 552 on the control connection, nothing kept.
        reply = _stor_refused(ftp, "huge.bin", os.urandom(BIG_QUOTA + 1024 * 1024))
        assert reply.startswith("552 ") and "quota" in reply, reply
        assert cloud.manifest("bigup") == before
        wait_until(lambda: _staging(cloud) == [], what="the refused upload's staging file to go")

        # The session goes on, and a big upload after all that still works.
        again = os.urandom(2 * 1024 * 1024)
        _stor(ftp, "again.bin", again)
        assert _retr(ftp, "again.bin") == again
        assert ftp.nlst() == ["again.bin", "keep.bin"]
        ftp.delete("again.bin")


# --- web deploy


def test_web_deploy_replaces_the_whole_site(cloud: Cloud) -> None:
    with cloud.ftp("web") as ftp:
        ftp.mkd("old")
        _stor(ftp, "old/stale.html", b"stale")
        _stor(ftp, "index.html", b"old home")
    body = _zip({"index.html": b"new home", "css/site.css": b"body{}", "empty/": b""})
    status, answer, _ = cloud.deploy("web", body)
    assert status == 200, answer
    assert answer == {"site": "web", "version": answer["version"], "files": 2, "bytes": 14}
    assert cloud.manifest("web")["version"] == answer["version"]
    assert cloud.tree("web") == ({"css/site.css": 6, "index.html": 8}, ["css", "empty"])
    with cloud.ftp("web") as ftp:
        assert _retr(ftp, "index.html") == b"new home"


@pytest.mark.parametrize(
    ("members", "status", "message"),
    [
        ({"ok.html": b"ok", "../evil.html": b"x"}, 400, "climbs out"),
        ({"/etc/evil.html": b"x"}, 400, "absolute path"),
        ({"symlink": b"/etc/passwd"}, 400, "symbolic link"),
        ({"big.bin": bytes(100 * 1024)}, 413, "quota"),
        (None, 400, "not a zip file"),
    ],
    ids=["zip-slip", "absolute", "symlink", "over-quota", "not-a-zip"],
)
def test_web_deploy_refuses_unsafe_zips_and_changes_nothing(
    cloud: Cloud, members: dict[str, bytes] | None, status: int, message: str
) -> None:
    if members is None:
        body = b"this is not a zip at all"
    elif "symlink" in members:
        buf = io.BytesIO()
        with zipfile.ZipFile(buf, "w") as zf:
            zf.writestr("index.html", b"fine")
            info = zipfile.ZipInfo("symlink")
            info.external_attr = 0o120777 << 16
            zf.writestr(info, members["symlink"])
        body = buf.getvalue()
    else:
        body = _zip(members)
    before = cloud.manifest("bad")
    got, answer, _ = cloud.deploy("bad", body)
    assert got == status, answer
    assert message in answer["error"]["message"]
    assert cloud.manifest("bad") == before


def test_web_deploy_larger_than_the_publisher_takes_is_413(cloud: Cloud) -> None:
    before = cloud.manifest("bad")
    status, answer, _ = cloud.deploy("bad", bytes(cloud.config.max_deploy_bytes + 1))
    assert status == 413 and "larger than" in answer["error"]["message"]
    assert cloud.manifest("bad") == before


def _upload_held_open(cloud: Cloud, site: str) -> ssl.SSLSocket:
    """A zip deploy whose body never ends: its head and a little of what it announced."""
    raw = socket.create_connection(("localhost", cloud.config.deploy_port), timeout=10)
    sock = cloud.pki.client_ssl(None).wrap_socket(raw, server_hostname="localhost")
    token = base64.b64encode(f"{site}:{SITES[site][0]}".encode()).decode()
    head = (
        f"POST /api/deploy/{site} HTTP/1.1\r\nHost: localhost\r\nAuthorization: Basic {token}\r\n"
        "Content-Type: application/zip\r\nContent-Length: 400000\r\n\r\n"
    )
    sock.sendall(head.encode() + b"PK" + bytes(4096))
    return sock


def _answered(sock: ssl.SSLSocket) -> bool:
    """Whether the publisher answered (or closed) an upload held open."""
    sock.settimeout(0.0)
    try:
        sock.recv(1)
        return True
    except (ssl.SSLWantReadError, BlockingIOError):
        return False
    finally:
        sock.settimeout(10)


def test_a_sites_zip_uploads_on_the_publishers_disk_are_capped_and_others_deploy(cloud: Cloud) -> None:
    # Each upload is a file on the publisher's disk until it is deployed: one site's password bought
    # any number of them (each up to max_deploy_bytes), enough to fill the disk every site is on.
    body = _zip({"index.html": b"mine"})
    held: list[ssl.SSLSocket] = []

    def refused() -> tuple[int, Any, dict[str, str]] | None:
        # One the publisher answered (our deploy below reached it first, and it was the one past the
        # cap) is opened again.
        for sock in [s for s in held if _answered(s)]:
            held.remove(sock)
            sock.close()
        while len(held) < UPLOADS_PER_SITE:
            held.append(_upload_held_open(cloud, "hoard"))
        got = cloud.deploy("hoard", body)
        return got if got[0] == 429 else None

    try:
        _, answer, headers = wait_until(refused, what="a deploy past the site's uploads to be refused")
        assert "in progress" in answer["error"]["message"] and int(headers["Retry-After"]) > 0
        # Another site deploys meanwhile.
        assert cloud.deploy("web", _zip({"index.html": b"web's own"}))[0] == 200
    finally:
        for sock in held:
            sock.close()
    # The uploads cut off leave nothing held: the site deploys again.
    wait_until(lambda: cloud.deploy("hoard", body)[0] == 200, what="the site to deploy again")


def _kudu(
    cloud: Cloud, site: str, method: str, path: str, body: bytes = b""
) -> tuple[int, Any, dict[str, str]]:
    token = base64.b64encode(f"{site}:{SITES[site][0]}".encode()).decode()
    conn = http.client.HTTPSConnection(
        "localhost", cloud.config.deploy_port, context=cloud.pki.client_ssl(None), timeout=20
    )
    try:
        conn.request(method, path, body=body or None, headers={"Authorization": f"Basic {token}"})
        resp = conn.getresponse()
        raw = resp.read()
        return resp.status, json.loads(raw) if raw else None, dict(resp.getheaders())
    finally:
        conn.close()


def test_one_subscription_holds_half_the_deploy_slots_and_waiting_deploys_take_turns(cloud: Cloud) -> None:
    # A deploy holds one of the publisher's 4 slots while its zip unpacks and commits (minutes for a
    # big one): one tenant's two sites with two big zips each held them all, and every other
    # tenant's deploy waited for them. The fileserver is paused so that deploys hold their slots.
    cloud.subscriptions.update({"hog-a": 7, "hog-b": 7, "queued": 8})
    cloud.push()
    body = _zip({"index.html": b"deployed"})
    assert cloud.fileserver.proc is not None
    fileserver = cloud.fileserver.proc.pid

    def record(site: str, location: str) -> dict[str, Any]:
        got = _kudu(cloud, site, "GET", urlsplit(location).path + "?site=" + site)
        assert got[0] == 200, got
        return dict(got[1])

    def status(site: str, location: str) -> str:
        return str(record(site, location)["status_text"])

    os.kill(fileserver, signal.SIGSTOP)
    try:
        hog: list[tuple[str, str]] = []
        for site in ("hog-a", "hog-a", "hog-b", "hog-b"):
            code, _, headers = _kudu(cloud, site, "POST", "/api/zipdeploy?isAsync=true", body)
            assert code == 202
            hog.append((site, headers["Location"]))
        wait_until(
            lambda: [status(*h) for h in hog].count("deploying") >= 2, timeout=10, what="the hog's deploys"
        )
        time.sleep(0.5)
        assert sorted(status(*h) for h in hog) == ["deploying", "deploying", "pending", "pending"]
        # Another tenant's deploy takes a free slot at once.
        code, _, headers = _kudu(cloud, "queued", "POST", "/api/zipdeploy?isAsync=true", body)
        assert code == 202
        bystander = headers["Location"]
        wait_until(lambda: status("queued", bystander) == "deploying", timeout=5, what="the other's deploy")
    finally:
        os.kill(fileserver, signal.SIGCONT)
    # Each is committed (then failed as no worker serves these sites: they have none here).
    for site, location in [*hog, ("queued", bystander)]:
        done = wait_until(
            lambda s=site, at=location: (r := record(s, at))["complete"] and r, what=f"{site}'s deploy"
        )
        assert done["version"] is not None, done["message"]
    assert cloud.tree("queued") == ({"index.html": 8}, [])


def test_web_deploy_needs_the_sites_credentials(cloud: Cloud) -> None:
    body = _zip({"index.html": b"intruder"})
    before = cloud.manifest("web")
    for kwargs in ({"password": "wrong"}, {"password": ""}, {"user": "alpha", "password": SITES["alpha"][0]}):
        status, answer, headers = cloud.deploy("web", body, **kwargs)
        assert status == 401, answer
        assert answer["error"]["code"] == "unauthorized"
        assert headers["WWW-Authenticate"].startswith("Basic ")
    status, _, _ = cloud.deploy("nosuchsite", body, password="x", user="nosuchsite")
    assert status == 401
    assert cloud.manifest("web") == before


def test_management_deploys_over_mtls_on_the_control_port(cloud: Cloud) -> None:
    body = _zip({"index.html": b"from management"})
    url = f"{cloud.publisher.control_url}/v1/deploy/mgmt"
    status, answer, _ = _https(url, cloud.pki.client_ssl("frontend"), body, {})
    assert status == 403 and answer["error"]["code"] == "forbidden"
    status, answer, _ = _https(url, cloud.pki.client_ssl("management"), body, {})
    assert status == 200 and answer["files"] == 1 and answer["site"] == "mgmt"
    assert cloud.tree("mgmt") == ({"index.html": 15}, [])
    status, answer, _ = _https(
        f"{cloud.publisher.control_url}/v1/deploy/nosuch", cloud.pki.client_ssl("management"), body, {}
    )
    assert status == 404


# --- stopped and suspended sites


def test_a_stopped_site_is_published_to_as_a_running_one(cloud: Cloud) -> None:
    cloud.states["paused"] = "stopped"
    cloud.push()
    with ftplib.FTP(timeout=10) as ftp:
        ftp.connect("127.0.0.1", cloud.config.ftp_port)
        reply = ftp.login("paused", SITES["paused"][0])
        assert "Logged in to site paused: stopped, it serves what you publish once started." in reply, reply
        _stor(ftp, "index.html", b"published while stopped")
    assert cloud.tree("paused") == ({"index.html": 23}, [])
    status, answer, _ = cloud.deploy("paused", _zip({"a.html": b"a", "b.html": b"bb"}))
    assert status == 200 and answer["files"] == 2, answer
    assert cloud.tree("paused") == ({"a.html": 1, "b.html": 2}, [])


def test_a_suspended_subscription_s_site_refuses_its_publishers_saying_why(cloud: Cloud) -> None:
    with cloud.ftp("frozen") as ftp:
        _stor(ftp, "index.html", b"before")
    open_session = cloud.ftp("frozen")
    try:
        cloud.states["frozen"] = "suspended"
        cloud.push()
        before = cloud.manifest("frozen")
        # The right password is told why; a wrong one learns nothing.
        with pytest.raises(ftplib.error_perm) as caught:
            cloud.ftp("frozen")
        assert str(caught.value).startswith("530 The subscription of site frozen is suspended"), caught.value
        with pytest.raises(ftplib.error_perm, match=r"^530 Authentication failed"):
            cloud.ftp("frozen", "wrong")
        status, answer, _ = cloud.deploy("frozen", _zip({"index.html": b"after"}))
        assert status == 403 and answer["error"]["code"] == "forbidden", answer
        assert "subscription of site frozen is suspended" in answer["error"]["message"], answer
        # A session open when it was suspended is closed at its next command.
        with pytest.raises(ftplib.error_temp, match=r"^421 The subscription of this site was suspended"):
            open_session.nlst()
        assert cloud.manifest("frozen") == before
    finally:
        open_session.close()
    # Management decides who may (an admin restoring a backup): its deploys still land.
    url = f"{cloud.publisher.control_url}/v1/deploy/frozen"
    status, answer, _ = _https(url, cloud.pki.client_ssl("management"), _zip({"index.html": b"x"}), {})
    assert status == 200 and answer["site"] == "frozen", answer
    cloud.states["frozen"] = "running"
    cloud.push()
    with cloud.ftp("frozen") as ftp:
        assert _retr(ftp, "index.html") == b"x"


# --- lftp, snapshots, lifecycle


def test_lftp_mirror_uploads_a_directory(cloud: Cloud, tmp_path: Path) -> None:
    lftp = shutil.which("lftp")
    if lftp is None:
        pytest.skip("lftp is not installed (Debian package 'lftp')")
    local = tmp_path / "site"
    (local / "css").mkdir(parents=True)
    (local / "img" / "icons").mkdir(parents=True)
    (local / "index.html").write_bytes(b"<h1>mirrored</h1>")
    (local / "css" / "site.css").write_bytes(b"body{}" * 100)
    (local / "img" / "icons" / "x.bin").write_bytes(bytes(range(256)) * 40)
    script = (
        "set cmd:fail-exit yes; set net:max-retries 1; set net:timeout 10; set ftp:ssl-allow no; "
        f"open -u mirror,{SITES['mirror'][0]} -p {cloud.config.ftp_port} 127.0.0.1; "
        f"mirror -R --no-perms --verbose {local} /; bye"
    )
    result = subprocess.run([lftp, "-c", script], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
    assert cloud.tree("mirror") == (
        {"css/site.css": 600, "img/icons/x.bin": 10240, "index.html": 17},
        ["css", "img", "img/icons"],
    )
    with cloud.ftp("mirror") as ftp:
        assert _retr(ftp, "img/icons/x.bin") == bytes(range(256)) * 40


def test_a_name_given_new_content_is_never_published_into_the_old_content(cloud: Cloud) -> None:
    # A site deleted and created again under its name (or `backup restore --force`) gets a new uid.
    # While the publisher and the fileserver disagree on the name's uid, nothing they do may land in
    # the other one's content (gone with it, or shown to nobody): the publisher is told to retry.
    with cloud.ftp("reborn") as ftp:
        _stor(ftp, "index.html", b"old content")
    old = cloud.manifest("reborn")

    def refused_everywhere() -> None:
        with cloud.ftp("reborn") as ftp:
            for command in (
                lambda: _stor(ftp, "index.html", b"new content"),
                lambda: _stor(ftp, "big.bin", bytes(2 * 1024 * 1024)),  # streamed on as it arrives
                lambda: ftp.mkd("new"),
                lambda: ftp.nlst(),
                lambda: _retr(ftp, "index.html"),
            ):
                with pytest.raises(ftplib.error_temp, match=r"^451 storage is unavailable, try again"):
                    command()
        status, answer, _ = cloud.deploy("reborn", _zip({"index.html": b"deployed"}))
        assert status == 503 and answer["error"]["code"] == "storage_unavailable", answer
        assert cloud.manifest("reborn") == old

    # The publisher heard of the new site first: the fileserver still has the old one.
    cloud.uids["reborn"] = "uid-reborn-2"
    cloud.push(fileserver=False)
    refused_everywhere()

    # Both have it now: it starts empty, and takes what is published to it.
    cloud.push()
    with cloud.ftp("reborn") as ftp:
        assert ftp.nlst() == []
        _stor(ftp, "index.html", b"new content")
    assert cloud.tree("reborn") == ({"index.html": 11}, [])
    old = cloud.manifest("reborn")

    # The fileserver heard of a newer one first: the publisher's is the old one there.
    cloud.uids["reborn"] = "uid-reborn-3"
    cloud.push(publisher=False)
    old = cloud.manifest("reborn")
    cloud.uids["reborn"] = "uid-reborn-2"
    cloud.push(fileserver=False)
    refused_everywhere()
    cloud.uids["reborn"] = "uid-reborn-3"
    cloud.push()


def test_a_removed_site_stops_logging_in_and_config_survives_restart(cloud: Cloud) -> None:
    cloud.ftp("gone").quit()
    open_session = cloud.ftp("alpha")
    try:
        # The publisher stops within its bound with a session still open, and comes back on its
        # last-known-good config before anyone pushes again.
        assert cloud.publisher.stop() == 0
        cloud.publisher.start()
        assert cloud.publisher.health()["config_version"] == cloud.version
        cloud.ftp("alpha").quit()
    finally:
        open_session.close()

    still_open = cloud.ftp("gone")
    try:
        cloud.removed.add("gone")
        cloud.push()
        with pytest.raises(ftplib.error_perm, match=r"^530"):
            cloud.ftp("gone")
        # A session that was open when its site went away is closed at its next command.
        with pytest.raises(ftplib.error_temp, match=r"^421"):
            still_open.nlst()
    finally:
        still_open.close()
    status, _, _ = cloud.deploy("gone", _zip({"a.html": b"a"}))
    assert status == 401


def _unprompted_replies(ftp: ftplib.FTP) -> list[str]:
    """The lines the server sends on its own until it closes the control connection."""
    lines: list[str] = []
    with contextlib.suppress(EOFError, ConnectionError):
        while True:
            lines.append(ftp.getline())
    return lines


def test_a_password_reset_or_a_suspension_ends_the_sessions_already_logged_in(cloud: Cloud) -> None:
    old, new = SITES["reset"][0], "reset-new-secret"
    with cloud.ftp("reset") as ftp:
        _stor(ftp, "kept.html", b"kept")
    before = cloud.manifest("reset")
    idle, small, big = cloud.ftp("reset"), cloud.ftp("reset"), cloud.ftp("reset")
    suspended = cloud.ftp("suspended")
    with contextlib.ExitStack() as stack:
        for ftp in (idle, small, big, suspended):
            stack.callback(ftp.close)
        for ftp in (small, big):
            ftp.voidcmd("TYPE I")
        small_conn = stack.enter_context(small.transfercmd("STOR small.html"))
        small_conn.sendall(b"written with the old password " * 100)
        # Past the size sent on to the fileserver as it arrives.
        big_conn = stack.enter_context(big.transfercmd("STOR big.bin"))
        big_conn.sendall(os.urandom(3 * 1024 * 1024))
        wait_until(lambda: _staging(cloud), what="the big upload's staging file on the fileserver")

        cloud.hashes["reset"] = hash_password(new)
        cloud.removed.add("suspended")  # as a suspended subscription leaves the snapshot
        cloud.push()

        # The small upload ends cleanly, maybe before its session saw the new snapshot: not stored.
        small_conn.close()
        replies = _unprompted_replies(small)
        assert [r[:3] for r in replies] == ["426", "421"], replies
        assert "password was changed" in replies[1], replies
        # The idle session and the one in the middle of the big upload are told, unasked, and closed.
        assert [r[:3] for r in _unprompted_replies(idle)] == ["421"]
        replies = _unprompted_replies(big)
        assert [r[:3] for r in replies] == ["426", "421"], replies
        big_conn.close()
        replies = _unprompted_replies(suspended)
        assert len(replies) == 1 and replies[0].startswith("421 This site no longer exists"), replies
    assert cloud.manifest("reset") == before
    wait_until(lambda: _staging(cloud) == [], what="the cut-off big upload's staging file to go")

    with pytest.raises(ftplib.error_perm, match=r"^530"):
        cloud.ftp("reset", old)
    # The new password's sessions go on through a push that leaves the login as it is.
    with cloud.ftp("reset", new) as ftp:
        cloud.push()
        time.sleep(1.5)  # a second for the session to look at the snapshot
        assert _stor(ftp, "new.html", b"new").startswith("226")
        assert ftp.nlst() == ["kept.html", "new.html"]


def test_the_snapshot_names_each_sites_workers_by_control_url() -> None:
    table = SiteTable()
    site = {"uid": "u1", "quota_bytes": 1, "workers": ["https://w1:9002/", "https://w2:9002"]}
    table.apply(
        PublisherSnapshot.parse({"version": 1, "fileserver": "https://fs:1", "sites": {"alpha": site}})
    )
    alpha = table.site("alpha")
    assert alpha is not None and alpha.workers == ("https://w1:9002", "https://w2:9002")
    # Without the field (an older controller) a site has none; a wrong one refuses the whole snapshot.
    table.apply(
        PublisherSnapshot.parse(
            {"version": 2, "fileserver": "https://fs:1", "sites": {"beta": {"uid": "u2", "quota_bytes": 1}}}
        )
    )
    beta = table.site("beta")
    assert beta is not None and beta.workers == ()
    with pytest.raises(InvalidInput, match=r"workers\.0: String should match pattern"):
        PublisherSnapshot.parse(
            {"version": 3, "fileserver": "https://fs:1", "sites": {"c": {**site, "workers": ["w1:9"]}}}
        )
    assert table.site("beta") is not None


def test_a_suspended_site_is_never_found_to_publish_to_but_its_things_are_kept() -> None:
    table = SiteTable()
    entry = {"uid": "u1", "quota_bytes": 1, "users": {"a": "h"}}
    table.apply(
        PublisherSnapshot.parse(
            {
                "version": 1,
                "fileserver": "https://fs:1",
                "suspended": {"a": entry},
                # Marked in ``sites`` instead: refused all the same.
                "sites": {"b": {**entry, "uid": "u2", "users": {"b": "h"}, "state": "suspended"}},
            }
        )
    )
    for name in ("a", "b"):
        assert table.site(name) is None and table.site_at(name) is None and table.site_of_user(name) is None
        found = table.suspended_site(name)
        assert found is not None and found == table.suspended_site(None, name)
    # Its git repository and deployment records stay, for when it is resumed.
    assert table.names() == {"a", "b"} and len(table) == 2
    with pytest.raises(InvalidInput, match="both publishable and suspended"):
        table.apply(
            PublisherSnapshot.parse(
                {"version": 2, "fileserver": "https://fs:1", "sites": {"a": entry}, "suspended": {"a": entry}}
            )
        )


def test_waiting_deploys_are_served_in_turn_by_subscription() -> None:
    async def scenario() -> list[str]:
        slots = FairSlots(2, 2)
        order: list[str] = []
        release = asyncio.Event()

        async def deploy(owner: str, name: str) -> None:
            async with slots.hold(owner):
                order.append(name)
                await release.wait()
                release.clear()

        tasks = [asyncio.create_task(deploy("a", f"a{n}")) for n in range(4)]
        await asyncio.sleep(0)
        tasks += [asyncio.create_task(deploy(o, f"{o}0")) for o in ("b", "c")]
        await asyncio.sleep(0)
        assert (slots.running, slots.waiting) == (2, 4)
        while slots.running:
            release.set()
            await asyncio.sleep(0.01)
        await asyncio.gather(*tasks)
        return order

    # The first comer's third deploy waits behind one of each other subscription's.
    assert asyncio.run(scenario()) == ["a0", "a1", "b0", "c0", "a2", "a3"]
