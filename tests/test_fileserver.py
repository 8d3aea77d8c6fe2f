"""The fileserver as its own process: content API over mTLS, versions, quota, change feed, snapshots."""

from __future__ import annotations

import asyncio
import hashlib
import io
import os
import random
import socket
import struct
import time
import zipfile
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

from roles.fileserver._journal import Journal
from roles.fileserver.config import FileserverConfig
from roles.fileserver.store import ContentStore
from shared.contracts.content import PathOp
from shared.contracts.snapshots import FileserverSnapshot
from shared.errors import AlreadyExists
from tests.support import CloudPKI, RoleProcess, call, random_op, wait_until

BLOG_UID = "b10b10b10b10b10b10b10b10b10b10b1"
SHOP_UID = "5b0b5b0b5b0b5b0b5b0b5b0b5b0b5b0b"
SNAPSHOT = {
    "version": 1,
    "sites": {
        "blog": {"uid": BLOG_UID, "quota_bytes": 10 * 1024},
        "shop": {"uid": SHOP_UID, "quota_bytes": 1024 * 1024},
    },
}


class Fs:
    """Calls a running fileserver the way the publisher and workers do."""

    def __init__(self, proc: RoleProcess, pki: CloudPKI) -> None:
        self.proc = proc
        self.pki = pki

    @property
    def home(self) -> Path:
        return self.proc.config.home

    def call(self, method: str, path: str, *, role: str = "publisher", **kwargs: Any) -> tuple[int, Any]:
        return call(f"{self.proc.control_url}{path}", self.pki.client_ssl(role), method=method, **kwargs)

    def get(self, path: str, *, role: str = "worker", **kwargs: Any) -> Any:
        status, body = self.call("GET", path, role=role, **kwargs)
        assert status == 200, body
        return body

    def upload(self, site: str, data: bytes) -> str:
        status, body = self.call("POST", f"/v1/sites/{site}/blobs", data=data)
        assert status == 200, body
        assert body == {"sha256": hashlib.sha256(data).hexdigest(), "size": len(data)}
        return str(body["sha256"])

    def commit(self, site: str, ops: list[dict[str, Any]], *, replace: bool = False) -> tuple[int, Any]:
        return self.call("POST", f"/v1/sites/{site}/commit", body={"ops": ops, "replace": replace})

    def ok(self, site: str, ops: list[dict[str, Any]], *, replace: bool = False) -> dict[str, Any]:
        status, body = self.commit(site, ops, replace=replace)
        assert status == 200, body
        return dict(body)

    def refused(self, site: str, ops: list[dict[str, Any]], code: str) -> str:
        status, body = self.commit(site, ops)
        assert body["error"]["code"] == code, body
        assert status >= 400
        return str(body["error"]["message"])

    def manifest(self, site: str, version: int | None = None) -> dict[str, Any]:
        query = "" if version is None else f"?version={version}"
        return dict(self.get(f"/v1/sites/{site}/manifest{query}"))

    def tree(self, site: str) -> tuple[set[str], list[str]]:
        m = self.manifest(site)
        return set(m["files"]), m["dirs"]


def _start(pki: CloudPKI, home: Path, **fields: Any) -> Fs:
    config = pki.role_config(FileserverConfig, "fileserver", home, **fields)
    proc = RoleProcess(config, pki).start()
    proc.push_config(SNAPSHOT)
    return Fs(proc, pki)


@pytest.fixture
def fs(pki: CloudPKI, tmp_path: Path) -> Iterator[Fs]:
    server = _start(pki, tmp_path / "fs", keep_versions=3)
    try:
        yield server
    finally:
        server.proc.stop()


def test_upload_commit_and_read_back(fs: Fs) -> None:
    page, css = b"<h1>hello</h1>", b"h1 { color: red }"
    page_sha, css_sha = fs.upload("blog", page), fs.upload("blog", css)
    assert fs.upload("blog", page) == page_sha  # the same bytes again: the same blob

    before = time.time()
    answer = fs.ok(
        "blog",
        [
            {"op": "put", "path": "/index.html", "sha256": page_sha},
            {"op": "put", "path": "css/site.css", "sha256": css_sha},
        ],
    )
    assert answer == {"version": 1, "total_bytes": len(page) + len(css)}

    manifest = fs.manifest("blog")
    assert manifest["site"] == "blog" and manifest["version"] == 1
    assert manifest["total_bytes"] == len(page) + len(css)
    assert manifest["dirs"] == ["css"]
    entry = manifest["files"]["index.html"]
    assert (entry["sha256"], entry["size"]) == (page_sha, len(page))
    assert before - 1 <= entry["mtime"] <= time.time() + 1
    assert fs.manifest("blog", 1) == manifest

    assert fs.get(f"/v1/sites/blog/blobs/{css_sha}") == css
    assert fs.get("/v1/sites/blog/files/css/site.css", role="publisher") == css
    # Blobs are per site: another site cannot read blog's bytes by their hash.
    status, body = fs.call("GET", f"/v1/sites/shop/blobs/{css_sha}", role="worker")
    assert status == 404 and body["error"]["code"] == "not_found"

    for role in ("controller", "management", "worker"):
        assert fs.get("/v1/sites/blog", role=role) == {
            "site": "blog",
            "version": 1,
            "total_bytes": len(page) + len(css),
            "quota_bytes": 10 * 1024,
        }
    # A site nothing was written to yet is version 0 and empty.
    assert fs.manifest("shop") == {"site": "shop", "version": 0, "total_bytes": 0, "files": {}, "dirs": []}
    assert fs.get("/v1/versions")["sites"] == {"blog": 1, "shop": 0}
    health = fs.proc.health()
    assert (health["sites"], health["total_bytes"]) == (2, len(page) + len(css))

    status, body = fs.call("GET", "/v1/sites/nope/manifest", role="worker")
    assert status == 404 and body["error"]["message"] == "site nope is not served by this fileserver"


def test_an_upload_its_caller_aborts_is_one_log_line_and_leaves_nothing(fs: Fs) -> None:
    host, port = fs.proc.control_url.removeprefix("https://").rsplit(":", 1)
    raw = socket.create_connection((host, int(port)))
    with fs.pki.client_ssl("publisher").wrap_socket(raw, server_hostname=host) as tls:
        tls.sendall(
            f"PUT /v1/sites/blog/files/big.bin HTTP/1.1\r\nHost: {host}\r\n"
            "Content-Length: 8000\r\n\r\n".encode()
            + b"x" * 1000
        )
        time.sleep(0.2)
        # A reset, as a publisher whose FTP client went away sends.
        tls.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    wait_until(
        lambda: "the caller closed the connection before the request ended" in fs.proc.log(),
        what="the aborted upload's log line",
    )
    assert "Traceback" not in fs.proc.log()
    assert "big.bin" not in fs.manifest("blog")["files"]
    assert fs.upload("blog", b"still fine")


def test_ops_and_their_errors_leave_nothing_half_done(fs: Fs) -> None:
    a, b = fs.upload("blog", b"a" * 10), fs.upload("blog", b"b" * 20)
    fs.ok(
        "blog",
        [
            {"op": "put", "path": "docs/guide/a.txt", "sha256": a},
            {"op": "mkdir", "path": "empty"},
            {"op": "put", "path": "top.txt", "sha256": b},
        ],
    )
    assert fs.tree("blog") == ({"docs/guide/a.txt", "top.txt"}, ["docs", "docs/guide", "empty"])

    assert "not empty" in fs.refused("blog", [{"op": "rmdir", "path": "docs"}], "in_use")
    fs.refused("blog", [{"op": "delete", "path": "missing.txt"}], "not_found")
    fs.refused("blog", [{"op": "rmdir", "path": "missing"}], "not_found")
    fs.refused("blog", [{"op": "mkdir", "path": "docs"}], "already_exists")
    fs.refused("blog", [{"op": "mkdir", "path": "top.txt"}], "already_exists")
    fs.refused("blog", [{"op": "put", "path": "docs", "sha256": a}], "invalid_input")
    fs.refused("blog", [{"op": "put", "path": "top.txt/x", "sha256": a}], "invalid_input")
    fs.refused("blog", [{"op": "delete", "path": "empty"}], "invalid_input")
    fs.refused("blog", [{"op": "rename", "from": "nothing", "to": "x"}], "not_found")
    fs.refused("blog", [{"op": "rename", "from": "top.txt", "to": "empty"}], "already_exists")
    fs.refused("blog", [{"op": "rename", "from": "docs", "to": "docs/guide/deeper"}], "invalid_input")
    fs.refused("blog", [{"op": "put", "path": "x", "sha256": "0" * 64}], "not_found")
    fs.refused("blog", [{"op": "chmod", "path": "x"}], "invalid_input")
    # All or nothing: the good ops before a failing one are not applied either.
    fs.refused(
        "blog",
        [
            {"op": "delete", "path": "top.txt"},
            {"op": "mkdir", "path": "new"},
            {"op": "rmdir", "path": "docs"},
        ],
        "in_use",
    )
    assert fs.get("/v1/sites/blog")["version"] == 1
    assert fs.tree("blog") == ({"docs/guide/a.txt", "top.txt"}, ["docs", "docs/guide", "empty"])

    # A directory rename moves everything under it; a file rename keeps its content.
    answer = fs.ok(
        "blog",
        [
            {"op": "rename", "from": "docs", "to": "manual/v1"},
            {"op": "rename", "from": "top.txt", "to": "manual/top.txt"},
            {"op": "rmdir", "path": "empty"},
        ],
    )
    assert answer == {"version": 2, "total_bytes": 30}
    assert fs.tree("blog") == (
        {"manual/v1/guide/a.txt", "manual/top.txt"},
        ["manual", "manual/v1", "manual/v1/guide"],
    )
    assert fs.manifest("blog")["files"]["manual/top.txt"]["sha256"] == b

    fs.ok(
        "blog",
        [{"op": "delete", "path": "manual/v1/guide/a.txt"}, {"op": "rmdir", "path": "manual/v1/guide"}],
    )
    assert fs.tree("blog") == ({"manual/top.txt"}, ["manual", "manual/v1"])
    # The previous version is still there for rollback.
    assert "manual/v1/guide/a.txt" in fs.manifest("blog", 2)["files"]


def test_replace_builds_the_site_from_empty(fs: Fs) -> None:
    old, new = fs.upload("shop", b"old"), fs.upload("shop", b"new!")
    fs.ok("shop", [{"op": "put", "path": "old.html", "sha256": old}, {"op": "mkdir", "path": "img"}])
    answer = fs.ok("shop", [{"op": "put", "path": "index.html", "sha256": new}], replace=True)
    assert answer == {"version": 2, "total_bytes": 4}
    assert fs.tree("shop") == ({"index.html"}, [])
    # The same deploy again changes nothing, so it makes no new version.
    manifest = fs.manifest("shop")
    mtime = manifest["files"]["index.html"]["mtime"]
    again = fs.ok("shop", [{"op": "put", "path": "index.html", "sha256": new, "mtime": mtime}], replace=True)
    assert again == {"version": 2, "total_bytes": 4}


def test_quota_is_enforced_on_commit_and_on_upload(fs: Fs) -> None:
    six_kb = fs.upload("blog", b"x" * 6 * 1024)
    fs.ok("blog", [{"op": "put", "path": "one.bin", "sha256": six_kb}])
    message = fs.refused("blog", [{"op": "put", "path": "two.bin", "sha256": six_kb}], "quota_exceeded")
    assert message == "site blog would use 12 KB of its 10 KB quota"
    assert fs.get("/v1/sites/blog") == {
        "site": "blog",
        "version": 1,
        "total_bytes": 6 * 1024,
        "quota_bytes": 10 * 1024,
    }

    # A blob bigger than the whole quota is refused: announced by Content-Length...
    status, body = fs.call("POST", "/v1/sites/blog/blobs", data=b"y" * 11 * 1024)
    assert status == 413 and body["error"]["code"] == "quota_exceeded"
    # ... or streamed without a length, refused once it passes the quota.
    chunks = (b"z" * 4096 for _ in range(8))
    status, body = fs.call("POST", "/v1/sites/blog/blobs", data=chunks)
    assert status == 413 and "does not fit in site blog's 10 KB quota" in body["error"]["message"]
    staging = fs.home / "content" / BLOG_UID / "staging"
    assert list(staging.iterdir()) == []
    blobs = {p.name for p in (fs.home / "content" / BLOG_UID / "blobs").rglob("*") if p.is_file()}
    assert blobs == {six_kb}
    assert fs.get("/v1/sites/blog")["version"] == 1


def test_only_the_publisher_writes(fs: Fs) -> None:
    sha = fs.upload("blog", b"mine")
    for role in ("worker", "frontend", "controller"):
        status, body = fs.call("POST", "/v1/sites/blog/blobs", role=role, data=b"theirs")
        assert status == 403 and body["error"]["code"] == "forbidden"
        status, body = fs.call(
            "POST",
            "/v1/sites/blog/commit",
            role=role,
            body={"ops": [{"op": "put", "path": "a", "sha256": sha}]},
        )
        assert status == 403
    status, _ = fs.call("GET", "/v1/sites/blog/manifest", role="frontend")
    assert status == 403
    assert fs.get("/v1/sites/blog")["version"] == 0


def test_traversal_and_bad_names_are_refused(fs: Fs) -> None:
    sha = fs.upload("blog", b"evil")
    for path in ("../escape", "a/../../escape", "a\\b", "x\x00y", "/"):
        fs.refused("blog", [{"op": "put", "path": path, "sha256": sha}], "invalid_input")
    fs.refused("blog", [{"op": "rename", "from": "a", "to": "../../etc"}], "invalid_input")
    status, _ = fs.call("GET", "/v1/sites/blog/files/%2e%2e/%2e%2e/state/config.json", role="publisher")
    assert status in (400, 404)
    status, body = fs.call("GET", "/v1/sites/blog/blobs/..%2f..%2fstate", role="worker")
    assert status in (400, 404)
    status, body = fs.call("GET", "/v1/sites/blog/manifest?version=..", role="worker")
    assert status == 400 and body["error"]["code"] == "invalid_input"
    assert fs.get("/v1/sites/blog")["version"] == 0


def test_change_feed_long_polls_and_survives_a_restart(fs: Fs) -> None:
    seq = fs.get("/v1/versions")["seq"]
    sha = fs.upload("blog", b"v1")
    with ThreadPoolExecutor(1) as pool:
        started = time.monotonic()
        poll = pool.submit(fs.get, f"/v1/changes?since={seq}&wait=20", timeout=30)
        time.sleep(0.3)
        assert not poll.done()
        fs.ok("blog", [{"op": "put", "path": "index.html", "sha256": sha}])
        answer = poll.result()
        assert time.monotonic() - started < 5
    assert answer == {
        "seq": seq + 1,
        "changes": [{"seq": seq + 1, "site": "blog", "version": 1}],
        "reset": False,
    }
    # Nothing newer: an empty answer after the wait, no reset.
    assert fs.get(f"/v1/changes?since={seq + 1}&wait=0.2") == {"seq": seq + 1, "changes": [], "reset": False}
    assert fs.get(f"/v1/changes?since={seq + 99}")["reset"] is True

    fs.proc.stop()
    fs.proc.start()
    # Content and config are persisted: the fileserver serves at once, before any push.
    assert fs.get("/v1/versions") == {"seq": seq + 1, "sites": {"blog": 1, "shop": 0}}
    assert fs.get("/v1/sites/blog/files/index.html", role="publisher") == b"v1"
    # The cursor a worker held before the restart is still good; one older than the log resets.
    assert fs.get(f"/v1/changes?since={seq + 1}") == {"seq": seq + 1, "changes": [], "reset": False}
    assert fs.get(f"/v1/changes?since={seq}")["reset"] is True
    with ThreadPoolExecutor(1) as pool:
        poll = pool.submit(fs.get, f"/v1/changes?since={seq + 1}&wait=20", timeout=30)
        time.sleep(0.2)
        fs.ok("blog", [{"op": "delete", "path": "index.html"}])
        assert poll.result()["changes"] == [{"seq": seq + 2, "site": "blog", "version": 2}]


def test_a_crash_moves_the_feed_on_so_workers_reread(fs: Fs) -> None:
    seq = fs.get("/v1/versions")["seq"]
    fs.proc.kill()
    fs.proc.start()
    assert fs.get(f"/v1/changes?since={seq}")["reset"] is True
    # Past every seq the crashed incarnation could have handed out.
    assert fs.get("/v1/versions")["seq"] > seq


def test_a_site_that_leaves_the_snapshot_goes_to_the_trash(fs: Fs) -> None:
    sha = fs.upload("shop", b"precious")
    fs.ok("shop", [{"op": "put", "path": "index.html", "sha256": sha}])
    fs.proc.push_config({"version": 2, "sites": {"blog": SNAPSHOT["sites"]["blog"]}})  # type: ignore[index]
    status, body = fs.call("GET", "/v1/sites/shop", role="worker")
    assert status == 404 and body["error"]["message"] == "site shop is not served by this fileserver"
    assert not (fs.home / "content" / SHOP_UID).exists()
    trashed = list((fs.home / "trash").iterdir())
    assert [p.name.split(".")[0] for p in trashed] == [SHOP_UID]
    assert (trashed[0] / "versions" / "1.json").is_file()
    assert fs.get("/v1/versions")["sites"] == {"blog": 0}

    # Back in the snapshot (a stray push undone): the content comes back.
    seq = fs.get("/v1/versions")["seq"]
    fs.proc.push_config({**SNAPSHOT, "version": 3})
    assert fs.get("/v1/sites/shop/files/index.html", role="publisher") == b"precious"
    assert fs.get(f"/v1/changes?since={seq}")["changes"] == [{"seq": seq + 1, "site": "shop", "version": 1}]

    # The same name with a new uid is a new site: it starts empty.
    fs.proc.push_config({"version": 4, "sites": {"shop": {"uid": "0123abcd", "quota_bytes": 1000}}})
    assert fs.get("/v1/sites/shop")["version"] == 0
    assert (fs.home / "content" / "0123abcd").exists() is False  # nothing written yet


def test_old_versions_are_pruned_and_their_blobs_collected(pki: CloudPKI, tmp_path: Path) -> None:
    server = _start(pki, tmp_path / "fs", keep_versions=2, gc_interval=0.2, upload_grace=1.0)
    try:
        shas = []
        for text in (b"first", b"second", b"third"):
            shas.append(server.upload("blog", text))
            server.ok("blog", [{"op": "put", "path": "page.html", "sha256": shas[-1]}])
        status, body = server.call("GET", "/v1/sites/blog/manifest?version=1", role="worker")
        assert status == 404 and "no longer kept" in body["error"]["message"]
        assert server.manifest("blog", 2)["files"]["page.html"]["sha256"] == shas[1]

        def collected() -> bool:
            status, _ = server.call("GET", f"/v1/sites/blog/blobs/{shas[0]}", role="worker")
            return status == 404

        wait_until(collected, timeout=10, what="the first version's blob to be collected")
        assert server.get(f"/v1/sites/blog/blobs/{shas[1]}") == b"second"
        assert server.get(f"/v1/sites/blog/blobs/{shas[2]}") == b"third"
    finally:
        server.proc.stop()


def test_a_plans_retention_keeps_the_last_n_and_the_last_d_days(pki: CloudPKI, tmp_path: Path) -> None:
    server = _start(pki, tmp_path / "fs", keep_versions=20, gc_interval=0.2, upload_grace=1.0)
    try:
        # Two versions, and every one of the last day: all five stay.
        blog = {"uid": BLOG_UID, "quota_bytes": 10 * 1024, "keep_versions": 2, "keep_days": 1}
        server.proc.push_config({"version": 2, "sites": {"blog": blog}})
        shas = []
        for n in range(5):
            shas.append(server.upload("blog", f"page {n}".encode()))
            server.ok("blog", [{"op": "put", "path": "page.html", "sha256": shas[-1]}])
        kept = [v["version"] for v in server.get("/v1/sites/blog/versions")["versions"]]
        assert kept == [1, 2, 3, 4, 5]
        assert server.manifest("blog", 1)["files"]["page.html"]["sha256"] == shas[0]

        # No age rule: the next collection keeps only the last two, and their blobs alone.
        server.proc.push_config({"version": 3, "sites": {"blog": {**blog, "keep_days": 0}}})
        wait_until(
            lambda: [v["version"] for v in server.get("/v1/sites/blog/versions")["versions"]] == [4, 5],
            timeout=10,
            what="versions beyond the last two to be pruned",
        )
        status, body = server.call("GET", "/v1/sites/blog/manifest?version=3", role="worker")
        assert status == 404 and "the last 2 versions and publishes are kept" in body["error"]["hint"], body

        def collected() -> bool:
            status, _ = server.call("GET", f"/v1/sites/blog/blobs/{shas[2]}", role="worker")
            return status == 404

        wait_until(collected, timeout=10, what="the pruned versions' blobs to be collected")
        assert server.get(f"/v1/sites/blog/blobs/{shas[3]}") == b"page 3"

        status, body = server.call(
            "PUT",
            "/v1/config",
            role="controller",
            body={"version": 4, "sites": {"blog": {**blog, "keep_days": -1}}},
        )
        message = body["error"]["message"]
        assert (
            status == 400 and "site 'blog': keep_days" in message and "greater than or equal to 0" in message
        )
    finally:
        server.proc.stop()


def test_older_versions_go_before_the_site_would_hold_more_than_its_quota(
    pki: CloudPKI, tmp_path: Path
) -> None:
    # A site near its quota that deploys again and again held every version's files (twenty times
    # its quota, on the disk every site shares); now its history stays within the quota.
    server = _start(pki, tmp_path / "fs", keep_versions=20, gc_interval=0.2, upload_grace=1.0)
    try:
        blog = {"uid": BLOG_UID, "quota_bytes": 100 * 1024, "keep_versions": 20, "keep_days": 7}
        server.proc.push_config({"version": 2, "sites": {"blog": blog}})
        shas = []
        for _ in range(6):
            shas.append(server.upload("blog", os.urandom(30 * 1024)))
            server.ok("blog", [{"op": "put", "path": "big.bin", "sha256": shas[-1]}])
        # Each version holds 30 KB the next one does not: three of them fit in 100 KB, a fourth would not.
        kept = [v["version"] for v in server.get("/v1/sites/blog/versions")["versions"]]
        assert kept == [4, 5, 6], kept
        # The same bytes again cost nothing: versions that change no content stay.
        again = server.upload("blog", b"small")
        for n in range(5):
            server.ok("blog", [{"op": "put", "path": f"same{n}.txt", "sha256": again}])
        kept = [v["version"] for v in server.get("/v1/sites/blog/versions")["versions"]]
        assert kept == [4, 5, 6, 7, 8, 9, 10, 11], kept

        def collected() -> bool:
            status, _ = server.call("GET", f"/v1/sites/blog/blobs/{shas[2]}", role="worker")
            return status == 404

        wait_until(collected, timeout=10, what="the dropped versions' blobs to be collected")
        assert server.call("GET", f"/v1/sites/blog/blobs/{shas[3]}", role="worker")[0] == 200
    finally:
        server.proc.stop()


def test_every_version_a_plans_days_list_can_be_served_after_a_burst_of_uploads(
    pki: CloudPKI, tmp_path: Path
) -> None:
    # A burst beyond the last 64 versions between two checkpoints: those whose tree is gone are not
    # listed (before, they were, and a rollback to one answered "no longer kept").
    server = _start(pki, tmp_path / "fs", keep_versions=2)
    try:
        blog = {"uid": BLOG_UID, "quota_bytes": 1 << 20, "keep_versions": 2, "keep_days": 7}
        server.proc.push_config({"version": 2, "sites": {"blog": blog}})
        sha = server.upload("blog", b"same bytes")
        for n in range(150):
            server.ok("blog", [{"op": "put", "path": f"p{n}.html", "sha256": sha}])
        listed = [v["version"] for v in server.get("/v1/sites/blog/versions")["versions"]]
        assert listed[-64:] == list(range(87, 151)), listed
        for version in listed:
            files = server.manifest("blog", version)["files"]
            assert len(files) == version, (version, len(files))
        # What is listed survives a restart (written at a checkpoint or at the clean stop).
        server.proc.stop()
        server.proc.start()
        again = [v["version"] for v in server.get("/v1/sites/blog/versions")["versions"]]
        assert again == listed
    finally:
        server.proc.stop()


def test_a_run_of_ftp_uploads_counts_once_against_the_plans_last_n(pki: CloudPKI, tmp_path: Path) -> None:
    # Keep the last 3: one FTP session of 30 files used to push both deploys out of reach.
    server = _start(pki, tmp_path / "fs", keep_versions=3)
    try:
        blog = {"uid": BLOG_UID, "quota_bytes": 1 << 20, "keep_versions": 3, "keep_days": 0}
        server.proc.push_config({"version": 2, "sites": {"blog": blog}})
        first, second = server.upload("blog", b"release 1"), server.upload("blog", b"release 2")
        server.ok("blog", [{"op": "put", "path": "index.html", "sha256": first}], replace=True)
        server.ok("blog", [{"op": "put", "path": "index.html", "sha256": second}], replace=True)

        def ftp_run(start: int, count: int) -> None:
            for n in range(start, start + count):
                sha = server.upload("blog", f"upload {n}".encode())
                op = {"op": "put", "path": f"up/{n}.txt", "sha256": sha}
                status, body = server.call(
                    "POST", "/v1/sites/blog/commit", body={"ops": [op], "source": "ftp"}
                )
                assert status == 200, body

        def listed() -> list[tuple[int, str]]:
            return [(v["version"], v["source"]) for v in server.get("/v1/sites/blog/versions")["versions"]]

        ftp_run(0, 30)  # versions 3..32
        # The last three versions, and the last three publishes: both deploys and the run's end.
        assert listed() == [(1, "deploy"), (2, "deploy"), (30, "ftp"), (31, "ftp"), (32, "ftp")]
        status, body = server.call("POST", "/v1/sites/blog/rollback", role="management", body={"version": 1})
        assert status == 200 and body["rolled_back_to"] == 1, body
        assert server.get("/v1/sites/blog/files/index.html", role="publisher") == b"release 1"
        assert server.manifest("blog")["files"].keys() == {"index.html"}

        # A second session: the last three publishes are now the first session's end, the rollback
        # and this session's newest upload, so both deploys go.
        ftp_run(30, 10)  # versions 34..43
        assert listed() == [(32, "ftp"), (33, "rollback"), (41, "ftp"), (42, "ftp"), (43, "ftp")]
        server.proc.stop()
        server.proc.start()
        assert listed() == [(32, "ftp"), (33, "rollback"), (41, "ftp"), (42, "ftp"), (43, "ftp")]
        assert len(server.manifest("blog", 32)["files"]) == 31
    finally:
        server.proc.stop()


def test_a_batchs_blobs_are_one_pack_read_back_after_a_crash_and_collected_whole(
    pki: CloudPKI, tmp_path: Path
) -> None:
    server = _start(pki, tmp_path / "fs", keep_versions=1, gc_interval=0.2, upload_grace=1.0)
    try:
        parts = [f"<p>page {n}</p>".encode() * (n + 1) for n in range(50)]
        body = b"".join(len(p).to_bytes(8, "big") + p for p in parts)
        status, answer = server.call("POST", "/v1/sites/shop/blob-batch", data=body)
        assert status == 200, answer
        shas = [b["sha256"] for b in answer["blobs"]]
        server.ok("shop", [{"op": "put", "path": f"p/{i}.html", "sha256": s} for i, s in enumerate(shas)])
        site = server.home / "content" / SHOP_UID
        # One file for the batch's bytes and one for where each is, not a file per blob.
        assert sorted(p.suffix for p in (site / "packs").iterdir()) == [".idx", ".pack"]
        assert not (site / "blobs").exists() or not any((site / "blobs").rglob("*"))

        # Acknowledged means durable: a kill -9 right after loses nothing.
        server.proc.kill()
        server.proc.start()
        status, fetched = server.call(
            "POST", "/v1/sites/shop/blob-fetch", role="worker", body={"sha256": shas}
        )
        assert status == 200 and fetched == body
        assert server.get(f"/v1/sites/shop/blobs/{shas[7]}") == parts[7]
        assert server.get("/v1/sites/shop/files/p/3.html", role="publisher") == parts[3]
        status, zipped = server.call("GET", "/v1/sites/shop/zip", role="management")
        assert status == 200
        with zipfile.ZipFile(io.BytesIO(zipped)) as zf:
            assert zf.read("p/49.html") == parts[49]
        # A blob uploaded again on its own is not stored twice.
        assert server.upload("shop", parts[0]) == shas[0]

        # Once no kept version uses any of its blobs, the pack goes whole.
        solo = server.upload("shop", b"alone")
        server.ok("shop", [{"op": "put", "path": "index.html", "sha256": solo}], replace=True)
        wait_until(
            lambda: not any((site / "packs").iterdir()),
            timeout=15,
            what="the pack no version uses to be collected",
        )
        status, _ = server.call("GET", f"/v1/sites/shop/blobs/{shas[1]}", role="worker")
        assert status == 404
        assert server.get("/v1/sites/shop/files/index.html", role="publisher") == b"alone"
    finally:
        server.proc.stop()


def test_a_batch_of_blobs_in_one_request(fs: Fs) -> None:
    parts = [b"alpha", b"", b"gamma" * 100]
    body = b"".join(len(p).to_bytes(8, "big") + p for p in parts)
    status, answer = fs.call("POST", "/v1/sites/shop/blob-batch", data=body)
    assert status == 200, answer
    shas = [b["sha256"] for b in answer["blobs"]]
    assert shas == [hashlib.sha256(p).hexdigest() for p in parts]
    ops = [{"op": "put", "path": f"p{i}", "sha256": sha} for i, sha in enumerate(shas)]
    version = fs.ok("shop", ops)["version"]
    assert fs.manifest("shop", version)["files"]["p2"]["size"] == 500
    assert fs.get("/v1/sites/shop/files/p0", role="publisher") == b"alpha"

    # Workers fetch them back many at once, in the order asked, in the same frames.
    status, fetched = fs.call("POST", "/v1/sites/shop/blob-fetch", role="worker", body={"sha256": shas[::-1]})
    assert status == 200 and fetched == b"".join(len(p).to_bytes(8, "big") + p for p in parts[::-1])
    status, answer = fs.call("POST", "/v1/sites/shop/blob-fetch", role="worker", body={"sha256": ["../x"]})
    assert status == 400, answer

    status, answer = fs.call("POST", "/v1/sites/shop/blob-batch", data=body[:-3])
    assert status == 400 and "ends inside a frame" in answer["error"]["message"], answer
    status, answer = fs.call("POST", "/v1/sites/shop/blob-batch", data=body, role="worker")
    assert status == 403, answer


def test_a_put_answers_the_other_sessions_changes_since_the_uploaders_version(fs: Fs) -> None:
    def put(path: str, data: bytes, since: int | None = None) -> dict[str, Any]:
        query = "" if since is None else f"?since={since}"
        status, body = fs.call("PUT", f"/v1/sites/shop/files/{path}{query}", data=data)
        assert status == 200, body
        return dict(body)

    def ftp_commit(op: dict[str, str]) -> None:  # another FTP session's MKD or DELE
        status, body = fs.call("POST", "/v1/sites/shop/commit", body={"ops": [op], "source": "ftp"})
        assert status == 200, body

    first = put("a.html", b"a")
    assert first["version"] == 1 and first.get("changes") is None
    # Nobody else wrote: the answer is the put alone.
    assert put("b.html", b"bb", since=1).get("changes") is None
    # Another session made a folder; the next put from version 2 brings it along, itself too, so the
    # uploader's view is exact without asking.
    ftp_commit({"op": "mkdir", "path": "img"})
    answer = put("c.html", b"ccc", since=2)
    changes = answer["changes"]
    assert (changes["since"], changes["version"], changes["whole"]) == (2, 4, False)
    assert set(changes["files"]) == {"c.html"} and changes["files"]["c.html"]["size"] == 3
    assert changes["dirs"] == {"img": True}
    assert changes["total_bytes"] == answer["total_bytes"] == 1 + 2 + 3
    # A file another session removed comes as gone.
    ftp_commit({"op": "delete", "path": "b.html"})
    changes = put("d.html", b"d", since=4)["changes"]
    assert changes["files"]["b.html"] is None and set(changes["files"]) == {"b.html", "d.html"}
    # A version retention dropped (the fixture keeps 3) is rebuilt from the newest: its changes come too.
    ftp_commit({"op": "mkdir", "path": "x"})
    ftp_commit({"op": "mkdir", "path": "y"})
    changes = put("e.html", b"e", since=6)["changes"]
    assert (changes["since"], changes["version"], changes["whole"]) == (6, 9, False)
    assert set(changes["files"]) == {"e.html"} and changes["dirs"] == {"x": True, "y": True}
    # A deploy in between flipped the site whole: no paths, the uploader asks for the manifest.
    fs.ok("shop", [{"op": "mkdir", "path": "z"}])
    changes = put("g.html", b"g", since=9)["changes"]
    assert changes["whole"] and changes["files"] == {}
    status, body = fs.call("PUT", "/v1/sites/shop/files/f.html?since=x", data=b"e")
    assert status == 400 and "since" in body["error"]["message"]


def _apply_diff(files: dict[str, Any], dirs: set[str], changes: dict[str, Any]) -> None:
    """Apply a diff to a manifest's files and dirs as a worker applies it to its copy."""
    for path, entry in changes["files"].items():
        if entry is None:
            for gone in [p for p in files if p == path or p.startswith(path + "/")]:
                del files[gone]
            dirs.difference_update({d for d in dirs if d == path or d.startswith(path + "/")})
    dirs.update(changes["dirs"])
    for path, entry in changes["files"].items():
        if entry is not None:
            dirs.difference_update({d for d in dirs if d == path or d.startswith(path + "/")})
            files[path] = entry


def test_a_worker_behind_by_versions_retention_dropped_gets_exactly_the_changed_paths(fs: Fs) -> None:
    # Under a trickle of FTP changes the last 3 versions (the fixture's) go within a second: a worker a
    # few behind was answered "not kept" or "whole" and built the whole site again, each time.
    rng = random.Random(5)
    shas = [fs.upload("shop", f"body {n}".encode()) for n in range(3)]
    deploy = [{"op": "put", "path": f"d{n % 4}/f{n}.html", "sha256": shas[n % 3]} for n in range(40)]
    first = fs.ok("shop", deploy, replace=True)["version"]
    seen = {first: fs.manifest("shop", first)}
    while len(seen) < 80:
        files, dirs = fs.tree("shop")
        ops = [random_op(rng, files, set(dirs), shas) for _ in range(rng.randint(1, 2))]
        status, body = fs.call("POST", "/v1/sites/shop/commit", body={"ops": ops, "source": "ftp"})
        assert status == 200 or body["error"]["code"] in (
            "not_found",
            "already_exists",
            "invalid_input",
            "in_use",
        )
        if status == 200 and body["version"] not in seen:
            seen[body["version"]] = fs.manifest("shop", body["version"])
    newest = max(seen)
    for since in sorted(seen)[:-1]:
        for query in (f"since={since}&limit=2000", f"since={since}"):  # a worker's, the publisher's
            changes = fs.get(f"/v1/sites/shop/diff?{query}")
            assert (changes["version"], changes["whole"]) == (newest, False), (query, changes)
            copy, copy_dirs = dict(seen[since]["files"]), set(seen[since]["dirs"])
            _apply_diff(copy, copy_dirs, changes)
            assert (copy, copy_dirs) == (seen[newest]["files"], set(seen[newest]["dirs"])), query
    # Asked for a version dropped meanwhile: the changes up to the newest instead.
    changes = fs.get(f"/v1/sites/shop/diff?since={first}&version={first + 5}&limit=2000")
    assert (changes["version"], changes["whole"]) == (newest, False)
    # A deploy in between still flips the site whole: no paths for a worker, nothing from before it.
    fs.ok("shop", deploy[:5], replace=True)
    fs.call("POST", "/v1/sites/shop/commit", body={"ops": [{"op": "mkdir", "path": "x"}], "source": "ftp"})
    changes = fs.get(f"/v1/sites/shop/diff?since={newest - 1}&limit=2000")
    assert changes["whole"] and changes["files"] == {} and changes["dirs"] == {}
    status, body = fs.call("GET", f"/v1/sites/shop/diff?since={newest - 1}", role="worker")
    assert status == 404 and "no longer kept" in body["error"]["message"], body


@pytest.mark.parametrize("restart", ["stop", "kill"])
def test_a_worker_behind_by_dropped_versions_gets_exact_changes_after_a_fileserver_restart(
    pki: CloudPKI, tmp_path: Path, restart: str
) -> None:
    # What made the newest versions outlives a restart, clean or not: a worker a few versions behind
    # (retention dropped its version) is answered with the paths that changed, not "build it whole",
    # once more after every restart.
    server = _start(pki, tmp_path / "fs", keep_versions=3)
    try:
        rng = random.Random(11)
        shas = [server.upload("shop", f"body {n}".encode()) for n in range(3)]
        deploy = [{"op": "put", "path": f"d{n % 3}/f{n}.html", "sha256": shas[n % 3]} for n in range(20)]
        first = server.ok("shop", deploy, replace=True)["version"]
        seen = {first: server.manifest("shop", first)}
        while len(seen) < 30:
            if len(seen) == 15:
                time.sleep(5.5)  # a checkpoint folds the first half in: the journal replays the rest
            files, dirs = server.tree("shop")
            ops = [random_op(rng, files, set(dirs), shas) for _ in range(rng.randint(1, 2))]
            status, body = server.call("POST", "/v1/sites/shop/commit", body={"ops": ops, "source": "ftp"})
            if status == 200 and body["version"] not in seen:
                seen[body["version"]] = server.manifest("shop", body["version"])
        newest = max(seen)
        if restart == "stop":
            server.proc.stop()
        else:
            server.proc.kill()
        server.proc.start()
        assert server.get("/v1/sites/shop")["version"] == newest
        for since in sorted(seen)[:-1]:
            changes = server.get(f"/v1/sites/shop/diff?since={since}&limit=2000")
            assert (changes["version"], changes["whole"]) == (newest, False), (since, changes)
            copy, copy_dirs = dict(seen[since]["files"]), set(seen[since]["dirs"])
            _apply_diff(copy, copy_dirs, changes)
            assert (copy, copy_dirs) == (seen[newest]["files"], set(seen[newest]["dirs"])), since
    finally:
        server.proc.stop()


# --- in-process, where an fsync can be held


async def test_a_refused_commit_is_answered_once_what_refused_it_can_be_read(
    pki: CloudPKI, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Two FTP sessions make the same folder. The second is refused ("exists") while the first's
    # record still waits for its fsync, and then asks for the folder: the refusal must not come
    # before the folder can be read, or the session is told it does not exist.
    store = ContentStore(pki.role_config(FileserverConfig, "fileserver", tmp_path / "fs"))
    await store.open()
    await store.apply_snapshot(FileserverSnapshot.parse(SNAPSHOT))
    held = asyncio.Event()
    sync = Journal.sync

    async def held_sync(journal: Journal, upto: int) -> None:
        await held.wait()
        await sync(journal, upto)

    monkeypatch.setattr(Journal, "sync", held_sync)
    mkdir = [PathOp(op="mkdir", path="new")]
    first = asyncio.create_task(store.commit("blog", mkdir, replace=False, source="ftp"))
    while store.site("blog").head_version < 1:
        await asyncio.sleep(0)

    async def refused() -> int:
        """The version readers see when the refusal comes."""
        with pytest.raises(AlreadyExists):
            await store.commit("blog", mkdir, replace=False, source="ftp")
        return store.site("blog").version

    second = asyncio.create_task(refused())
    for _ in range(20):
        await asyncio.sleep(0)
    held.set()
    assert (await first).version == 1
    assert await second == 1
    assert b'"new"' in await store.manifest_bytes("blog", None)
    await store.close()


async def test_a_site_with_no_version_kept_does_not_stop_the_fileserver_starting(
    pki: CloudPKI, tmp_path: Path
) -> None:
    # A site's folder with no version record left in it (a record not written when the fileserver
    # was killed, say): the start's look for which versions are publishes of their own failed on the
    # empty list (a zip() of unequal lengths), and the site could not be loaded at all.
    config = pki.role_config(FileserverConfig, "fileserver", tmp_path / "fs")
    store = ContentStore(config)
    await store.open()
    await store.apply_snapshot(FileserverSnapshot.parse(SNAPSHOT))
    await store.commit("blog", [PathOp(op="mkdir", path="new")], replace=False, source="ftp")
    await store.close()
    records = list((tmp_path / "fs").rglob("versions/*.json"))
    assert records
    for record in records:
        record.unlink()
    again = ContentStore(config)
    await again.open()
    await again.apply_snapshot(FileserverSnapshot.parse(SNAPSHOT))
    assert again.site("blog").version >= 1
    await again.close()
