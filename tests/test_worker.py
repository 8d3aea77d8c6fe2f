"""The worker: pulls published content from a real fileserver and serves it to front ends over mTLS."""

from __future__ import annotations

import hashlib
import http.client
import itertools
import os
import signal
import socket
import ssl
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from bench.harness.clients import fetch_from_worker as fetch
from roles.fileserver.config import FileserverConfig
from roles.worker._packs import pack_table
from roles.worker.config import WorkerConfig
from tests.support import CloudPKI, RoleProcess, call, wait_until

BIG = bytes(range(256)) * 2048  # 512 KiB: streamed in chunks, not read whole


@dataclass
class Cloud:
    """A fileserver and a worker, with the controller's snapshots and the publisher's writes."""

    pki: CloudPKI
    fileserver: RoleProcess
    worker: RoleProcess
    worker_config: WorkerConfig
    sites: dict[str, str] = field(default_factory=dict)
    uids: itertools.count[int] = field(default_factory=itertools.count)
    version: itertools.count[int] = field(default_factory=lambda: itertools.count(1))

    @property
    def fs_url(self) -> str:
        return self.fileserver.control_url

    @property
    def content(self) -> Path:
        """Where the worker keeps blobs and sites: its home, or (home under a closed directory, as
        pytest's temp is for root) a directory apps can reach; see roles/worker/_layout.py."""
        return Path(self.worker.health()["apps_dir"])

    def push(self) -> None:
        version = next(self.version)
        self.fileserver.push_config(
            {
                "version": version,
                "sites": {s: {"uid": uid, "quota_bytes": 10 * 1024 * 1024} for s, uid in self.sites.items()},
            }
        )
        self.worker.push_config(
            {
                "version": version,
                "fileserver": self.fs_url,
                "sites": {s: {"uid": uid} for s, uid in self.sites.items()},
            }
        )

    def add_site(self, site: str) -> None:
        self.sites[site] = hashlib.sha256(f"{site}-{next(self.uids)}".encode()).hexdigest()[:16]
        self.push()

    def publish(
        self, site: str, files: dict[str, bytes], *, dirs: tuple[str, ...] = (), replace: bool = False
    ) -> int:
        ctx = self.pki.client_ssl("publisher")
        ops: list[dict[str, Any]] = [{"op": "mkdir", "path": d} for d in dirs]
        for path, data in files.items():
            status, body = call(f"{self.fs_url}/v1/sites/{site}/blobs", ctx, method="POST", data=data)
            assert status == 200, body
            ops.append({"op": "put", "path": path, "sha256": body["sha256"]})
        status, body = call(
            f"{self.fs_url}/v1/sites/{site}/commit", ctx, method="POST", body={"ops": ops, "replace": replace}
        )
        assert status == 200, body
        return int(body["version"])

    def get(self, site: str, path: str, **kwargs: Any) -> tuple[int, dict[str, str], bytes]:
        return fetch(self.pki, self.worker_config, site, path, **kwargs)


def start_pair(pki: CloudPKI, root: Path, **worker: Any) -> Cloud:
    fs_config = pki.role_config(FileserverConfig, "fileserver", root / "fileserver")
    w_config = pki.role_config(
        WorkerConfig, "worker", root / "worker", version_grace=0.3, request_timeout=1.0, **worker
    )
    fileserver = RoleProcess(fs_config, pki).start(wait=False)
    worker = RoleProcess(w_config, pki).start(wait=False)
    fileserver.wait_healthy()
    worker.wait_healthy()
    return Cloud(pki, fileserver, worker, w_config)


@pytest.fixture(scope="module")
def cloud(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cloud]:
    root = tmp_path_factory.mktemp("cloud")
    pairs = start_pair(CloudPKI(root / "pki"), root)
    try:
        yield pairs
    finally:
        pairs.worker.stop()
        pairs.fileserver.stop()


def wait_for_body(cloud: Cloud, site: str, path: str, body: bytes) -> None:
    def served() -> bool:
        status, _, got = cloud.get(site, path)
        return status == 200 and got == body

    wait_until(served, timeout=10, what=f"{site}{path} to serve the published bytes")


def test_serves_published_files_with_types_defaults_and_validators(cloud: Cloud) -> None:
    cloud.add_site("blog")
    # 503 "updating" for the moment until the worker has asked the fileserver what there is.
    status, _, body = wait_until(
        lambda: (got := cloud.get("blog", "/"))[0] != 503 and got, timeout=10, what="blog's first answer"
    )
    assert status == 200 and b"ready" in body, "a site with nothing published gets the placeholder page"
    cloud.publish(
        "blog",
        {
            "index.html": b"<h1>hello</h1>",
            "css/site.css": b"body{}",
            "docs/index.htm": b"docs home",
            "img/logo.png": b"\x89PNG\r\n\x1a\n",
            "data.bin": b"\x00\x01",
            "big.bin": BIG,
        },
        dirs=("empty",),
    )
    wait_for_body(cloud, "blog", "/", b"<h1>hello</h1>")

    status, headers, body = cloud.get("blog", "/index.html?utm=1")
    assert (status, body) == (200, b"<h1>hello</h1>")
    assert headers["content-type"] == "text/html; charset=utf-8"
    assert headers["content-length"] == "14"
    assert cloud.get("blog", "/css/site.css")[1]["content-type"] == "text/css; charset=utf-8"
    assert cloud.get("blog", "/img/logo.png")[1]["content-type"] == "image/png"
    assert cloud.get("blog", "/data.bin")[1]["content-type"] == "application/octet-stream"

    # A directory: its default document, and a redirect to the slash form first.
    status, headers, _ = cloud.get("blog", "/docs?x=1")
    assert status == 301 and headers["location"] == "/docs/?x=1"
    assert cloud.get("blog", "/docs/")[::2] == (200, b"docs home")
    assert cloud.get("blog", "/empty/")[0] == 404
    status, headers, body = cloud.get("blog", "/missing.html")
    assert status == 404 and b"sitecloud" in body and headers["content-type"].startswith("text/html")
    assert cloud.get("blog", "/index.html/")[0] == 404
    assert cloud.get("nosuchsite", "/")[0] == 404

    # HEAD: the same head, no body.
    status, headers, body = cloud.get("blog", "/", method="HEAD")
    assert (status, body, headers["content-length"]) == (200, b"", "14")
    status, headers, _ = cloud.get("blog", "/", method="POST")
    assert status == 405 and headers["allow"] == "GET, HEAD"

    # Validators.
    _, headers, _ = cloud.get("blog", "/")
    etag, modified = headers["etag"], headers["last-modified"]
    assert etag.startswith('"')
    status, _, body = cloud.get("blog", "/", headers={"If-None-Match": f'W/"x", {etag}'})
    assert (status, body) == (304, b"")
    assert cloud.get("blog", "/", headers={"If-None-Match": '"other"'})[0] == 200
    assert cloud.get("blog", "/", headers={"If-Modified-Since": modified})[0] == 304

    # Ranges, on a small file and on a streamed one.
    status, headers, body = cloud.get("blog", "/index.html", headers={"Range": "bytes=4-8"})
    assert (status, body, headers["content-range"]) == (206, b"hello", "bytes 4-8/14")
    status, headers, body = cloud.get("blog", "/big.bin", headers={"Range": "bytes=-10"})
    assert (status, body) == (206, BIG[-10:])
    status, headers, body = cloud.get("blog", "/big.bin", headers={"Range": "bytes=300000-300099"})
    assert (status, body, headers["content-range"]) == (
        206,
        BIG[300000:300100],
        f"bytes 300000-300099/{len(BIG)}",
    )
    status, headers, _ = cloud.get("blog", "/index.html", headers={"Range": "bytes=100-"})
    assert status == 416 and headers["content-range"] == "bytes */14"
    assert cloud.get("blog", "/index.html", headers={"Range": "bytes=0-1,4-5"})[::2] == (
        200,
        b"<h1>hello</h1>",
    )
    status, _, body = cloud.get("blog", "/big.bin")
    assert status == 200 and hashlib.sha256(body).digest() == hashlib.sha256(BIG).digest()

    health = cloud.worker.health()
    assert health["sites"] == 1 and health["sites_synced"] == 1
    assert health["bytes_cached"] >= len(BIG)


def _raw(cloud: Cloud, payload: bytes) -> bytes:
    """Send bytes as they are over a frontend connection; read until the worker closes."""
    ctx = cloud.pki.client_ssl("frontend")
    with (
        socket.create_connection(("localhost", cloud.worker_config.data_port), timeout=10) as sock,
        ctx.wrap_socket(sock, server_hostname="localhost") as tls,
    ):
        tls.sendall(payload)
        chunks = []
        while chunk := tls.recv(65536):
            chunks.append(chunk)
        return b"".join(chunks)


def test_a_visitor_right_after_the_first_publish_waits_for_it_rather_than_get_a_503(cloud: Cloud) -> None:
    cloud.add_site("fresh")
    wait_until(lambda: cloud.get("fresh", "/")[0] == 200, timeout=10, what="fresh's placeholder")
    # A first version the worker takes a while to fetch, asked for all the while it comes.
    big = os.urandom(8 * 1024 * 1024)
    seen: list[tuple[int, bytes]] = []
    stop = threading.Event()

    def visit() -> None:
        while not stop.is_set():
            status, _, body = cloud.get("fresh", "/big.bin")
            seen.append((status, body[:40]))
            if status == 200 and body == big:
                return

    # Several at once: they wait together (one timer looks for all of them) and all get the file.
    visitors = [threading.Thread(target=visit) for _ in range(8)]
    for visitor in visitors:
        visitor.start()
    try:
        cloud.publish("fresh", {"big.bin": big, "index.html": b"first"})
        for visitor in visitors:
            visitor.join(20)
    finally:
        stop.set()
        for visitor in visitors:
            visitor.join()
    statuses = [status for status, _ in seen]
    assert 503 not in statuses, seen
    assert sum(1 for status, body in seen if status == 200 and body == big[:40]) == 8, seen
    # Before the worker heard of the publish, the "nothing published yet" page; then the content.
    assert all(body.startswith(b"<!doctype") or body == big[:40] for _, body in seen), seen


def test_pipelined_requests_are_answered_in_order_and_bad_ones_close(cloud: Cloud) -> None:
    cloud.add_site("pipe")
    cloud.publish("pipe", {"a.txt": b"first", "b.txt": b"second"})
    wait_for_body(cloud, "pipe", "/a.txt", b"first")
    req = "GET /{} HTTP/1.1\r\nHost: w\r\nX-Sitecloud-Site: pipe\r\n{}\r\n"
    answer = _raw(
        cloud,
        (
            req.format("a.txt", "")
            + req.format("b.txt", "Content-Length: 5\r\n") + "ignored"[:5]
            + req.format("a.txt", "Connection: close\r\n")
        ).encode(),
    )  # fmt: skip
    assert answer.count(b"HTTP/1.1 200 OK") == 3
    assert answer.index(b"first") < answer.index(b"second") < answer.rindex(b"first")
    assert b"content-type: text/plain; charset=utf-8" in answer.lower()

    answer = _raw(cloud, req.format("a.txt", "").encode() + b"NOT HTTP AT ALL\r\n\r\n")
    assert answer.startswith(b"HTTP/1.1 200 OK") and b"HTTP/1.1 400 Bad Request" in answer
    assert answer.rstrip().endswith(b"</html>")

    # A request that never finishes arriving (slowloris) is cut off after request_timeout.
    started = time.monotonic()
    assert _raw(cloud, b"GET /a.txt HTTP/1.1\r\nX-Sitecloud-Site: pi") == b""
    assert time.monotonic() - started < 5
    assert cloud.get("pipe", "/b.txt")[::2] == (200, b"second")


def test_traversal_never_leaves_the_site(cloud: Cloud) -> None:
    cloud.add_site("safe")
    cloud.add_site("other")
    cloud.publish("safe", {"index.html": b"safe home", "a/b.txt": b"inner"})
    cloud.publish("other", {"x": b"OTHER TENANT"})
    home = cloud.worker_config.home
    (home / "x").write_bytes(b"WORKER SECRET")
    wait_for_body(cloud, "safe", "/", b"safe home")
    wait_for_body(cloud, "other", "/x", b"OTHER TENANT")
    tries = [
        "/../x",
        "/%2e%2e/x",
        "/a/..%2f..%2fx",
        "/a/%2e%2e/%2e%2e/%2e%2e/x",
        "/..%2f..%2f..%2fother/current/x",
        "/%2e%2e%2f%2e%2e%2fx",
        "/a%5c..%5c..%5cx",
        "/%00x",
        "/%ff",
        "//etc/passwd",
    ]
    for path in tries:
        status, _, body = cloud.get("safe", path)
        assert status in (400, 404), path
        assert b"SECRET" not in body and b"OTHER" not in body and b"root:" not in body, path
    # Raw targets that http.client would not send as they are.
    for target in (b"/a/../../x", b"/../../../etc/passwd", b"/a/b.txt/../../../x"):
        answer = _raw(
            cloud, b"GET " + target + b" HTTP/1.1\r\nX-Sitecloud-Site: safe\r\nConnection: close\r\n\r\n"
        )
        assert answer.split(b"\r\n", 1)[0] in (b"HTTP/1.1 400 Bad Request", b"HTTP/1.1 404 Not Found"), target
        assert b"SECRET" not in answer and b"root:" not in answer
    # Absolute-form targets name a path the same way.
    answer = _raw(
        cloud, b"GET http://x/a/b.txt HTTP/1.1\r\nX-Sitecloud-Site: safe\r\nConnection: close\r\n\r\n"
    )
    assert answer.startswith(b"HTTP/1.1 200 OK") and answer.endswith(b"inner")


def test_only_frontend_certificates_get_in(cloud: Cloud) -> None:
    config = cloud.worker_config
    for role in ("controller", "worker"):
        with pytest.raises((ConnectionError, ssl.SSLError, http.client.HTTPException, OSError)):
            fetch(cloud.pki, config, "blog", "/", role=role)
    with pytest.raises((ConnectionError, ssl.SSLError, OSError)):
        conn = http.client.HTTPSConnection(
            "localhost", config.data_port, context=cloud.pki.client_ssl(None), timeout=5
        )
        try:
            conn.request("GET", "/", headers={"X-Sitecloud-Site": "blog"})
            conn.getresponse()
        finally:
            conn.close()
    assert cloud.worker.health()["role"] == "worker", "refused peers do not hurt the process"


def _versions_on_disk(cloud: Cloud, site: str) -> list[str]:
    site_dir = cloud.content / "sites" / site
    if not site_dir.exists():
        return []
    return sorted(n for n in os.listdir(site_dir) if n.startswith("v") and (site_dir / n).is_dir())


def _blob_kept(cloud: Cloud, sha: str) -> bool:
    """Whether the worker still keeps a blob: as a file of its own, or in a pack."""
    if (cloud.content / "blobs" / sha[:2] / sha).exists():
        return True
    packs = (cloud.content / "packs").glob("*.pack")
    return any(sha == held for pack in packs for held, _, _ in pack_table(str(pack)))


def test_new_versions_flip_and_replaced_files_go(cloud: Cloud) -> None:
    cloud.add_site("news")
    cloud.publish("news", {"index.html": b"one", "old.html": b"old page", "keep.txt": b"kept"})
    wait_for_body(cloud, "news", "/", b"one")
    assert cloud.get("news", "/")[0] == 200  # warms the hot cache, which a flip must drop
    cloud.publish("news", {"index.html": b"two"})
    wait_for_body(cloud, "news", "/", b"two")
    assert cloud.get("news", "/keep.txt")[::2] == (200, b"kept")

    # A web deploy replaces the whole site: files it does not carry are gone.
    version = cloud.publish("news", {"index.html": b"three", "new.html": b"fresh"}, replace=True)
    wait_for_body(cloud, "news", "/", b"three")
    assert cloud.get("news", "/new.html")[::2] == (200, b"fresh")
    assert cloud.get("news", "/old.html")[0] == 404
    assert cloud.get("news", "/keep.txt")[0] == 404
    # After the grace, only the current version stays on disk, and blobs nothing uses are deleted.
    wait_until(
        lambda: _versions_on_disk(cloud, "news") == [f"v{version}"], timeout=10, what="old versions pruned"
    )
    assert not (cloud.content / "sites" / "news" / f"v{version - 1}.files").exists()
    gone = [hashlib.sha256(b).hexdigest() for b in (b"old page", b"kept", b"one", b"two")]
    wait_until(
        lambda: not any(_blob_kept(cloud, sha) for sha in gone),
        timeout=10,
        what="unused blobs deleted",
    )
    assert _blob_kept(cloud, hashlib.sha256(b"fresh").hexdigest())


def test_file_by_file_changes_are_applied_in_place(cloud: Cloud) -> None:
    """Uploads as FTP makes them (one file per version) reach the worker as the changed paths alone:
    the served directory stays the same one, no new version is built."""
    cloud.add_site("ftpsite")
    first = cloud.publish("ftpsite", {"index.html": b"home", "a/old.html": b"old", "b/x.css": b"x"})
    wait_for_body(cloud, "ftpsite", "/", b"home")
    built = _versions_on_disk(cloud, "ftpsite")
    assert built == [f"v{first}"]
    ctx = cloud.pki.client_ssl("publisher")

    def put(path: str, data: bytes) -> None:
        status, body = call(f"{cloud.fs_url}/v1/sites/ftpsite/files/{path}", ctx, method="PUT", data=data)
        assert status == 200, body

    put("index.html", b"home, edited")
    put("new/deep/page.html", b"deep")
    ops = [{"op": "delete", "path": "b/x.css"}, {"op": "rmdir", "path": "b"}]
    status, body = call(
        f"{cloud.fs_url}/v1/sites/ftpsite/commit", ctx, method="POST", body={"ops": ops, "source": "ftp"}
    )
    assert status == 200, body
    wait_for_body(cloud, "ftpsite", "/new/deep/page.html", b"deep")
    wait_for_body(cloud, "ftpsite", "/", b"home, edited")
    assert cloud.get("ftpsite", "/a/old.html")[::2] == (200, b"old")
    wait_until(lambda: cloud.get("ftpsite", "/b/x.css")[0] == 404, timeout=10, what="deleted file gone")
    # Still the directory first built: the changes went into it, each with a rename.
    assert _versions_on_disk(cloud, "ftpsite") == built

    # A deploy flips the whole site at once: a new version directory.
    version = cloud.publish("ftpsite", {"index.html": b"deployed"}, replace=True)
    wait_for_body(cloud, "ftpsite", "/", b"deployed")
    assert cloud.get("ftpsite", "/a/old.html")[0] == 404
    wait_until(lambda: _versions_on_disk(cloud, "ftpsite") == [f"v{version}"], timeout=10, what="old pruned")


def test_a_site_leaving_the_snapshot_stops_being_served(cloud: Cloud) -> None:
    cloud.add_site("gone")
    cloud.publish("gone", {"index.html": b"here"})
    wait_for_body(cloud, "gone", "/", b"here")
    del cloud.sites["gone"]
    cloud.push()
    assert cloud.get("gone", "/")[0] == 404
    site_dir = cloud.content / "sites" / "gone"
    wait_until(lambda: not site_dir.exists(), timeout=10, what="the site's cache dropped")

    # The same name comes back as a new site (new uid): it starts empty.
    cloud.add_site("gone")
    status, _, body = cloud.get("gone", "/")
    assert status == 200 and b"ready" in body


def test_a_new_incarnation_told_to_the_worker_first_never_keeps_the_old_ones_content(cloud: Cloud) -> None:
    # `backup restore --force` (or a delete and create in one pass) gives a name a new uid; the worker
    # may hear of it before the fileserver does, which then still answers for the old uid. Its
    # version 1 must not be taken for the new site's version 1.
    cloud.add_site("reborn")
    cloud.publish("reborn", {"index.html": b"old incarnation"})
    wait_for_body(cloud, "reborn", "/", b"old incarnation")
    cloud.sites["reborn"] = "feedfacefeedface"
    cloud.worker.push_config(
        {
            "version": next(cloud.version),
            "fileserver": cloud.fs_url,
            "sites": {s: {"uid": uid} for s, uid in cloud.sites.items()},
        }
    )
    time.sleep(1.0)  # the worker's sync of the new uid runs against the fileserver's old one
    cloud.push()
    assert cloud.publish("reborn", {"index.html": b"new incarnation"}) == 1
    wait_for_body(cloud, "reborn", "/", b"new incarnation")


def test_restarted_worker_serves_last_content_with_the_fileserver_down(pki: CloudPKI, tmp_path: Path) -> None:
    pair = start_pair(pki, tmp_path)
    try:
        pair.add_site("shop")
        huge = os.urandom(6 * 1024 * 1024)
        pair.publish("shop", {"index.html": b"on sale", "p/item.html": b"item", "huge.bin": huge})
        wait_for_body(pair, "shop", "/", b"on sale")
        pair.fileserver.stop()

        # SIGTERM while a response is on its way: it finishes, then the worker exits cleanly and soon,
        # even with an idle keep-alive connection left open by a client that never closes it.
        assert pair.worker.proc is not None
        ctx = pki.client_ssl("frontend")
        idle = http.client.HTTPSConnection("localhost", pair.worker_config.data_port, context=ctx, timeout=10)
        idle.request("GET", "/", headers={"X-Sitecloud-Site": "shop"})
        assert idle.getresponse().read() == b"on sale"
        started = time.monotonic()
        with (
            socket.create_connection(("localhost", pair.worker_config.data_port), timeout=10) as sock,
            ctx.wrap_socket(sock, server_hostname="localhost") as tls,
        ):
            tls.sendall(b"GET /huge.bin HTTP/1.1\r\nX-Sitecloud-Site: shop\r\n\r\n")
            received = tls.recv(65536)
            pair.worker.proc.send_signal(signal.SIGTERM)
            while chunk := tls.recv(1024 * 1024):
                received += chunk
        head, _, body = received.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200 OK") and body == huge
        assert pair.worker.proc.wait(10) == 0
        assert time.monotonic() - started < 5
        idle.close()

        pair.worker.start()
        # At once, from disk: no fileserver, no controller push.
        assert pair.get("shop", "/")[::2] == (200, b"on sale")
        assert pair.get("shop", "/p/item.html")[::2] == (200, b"item")
        health = pair.worker.health()
        assert health["sites"] == 1 and health["config_version"] == 1
        assert health["fileserver_reachable"] is False
        # A site it holds nothing of, while it cannot ask the fileserver what the site has: never
        # the "nothing published yet" page (the site may well have content), a 503 to retry soon.
        pair.sites["cart"] = "c0ffee0c0ffee0c0"
        pair.worker.push_config(
            {
                "version": next(pair.version),
                "fileserver": pair.fs_url,
                "sites": {s: {"uid": u} for s, u in pair.sites.items()},
            }
        )
        status, headers, body = pair.get("cart", "/")
        assert status == 503 and headers["retry-after"] == "2" and b"on its way" in body
        assert pair.get("shop", "/")[::2] == (200, b"on sale")
        # The fileserver comes back: the worker picks up new versions again, and an empty site is
        # known to be empty.
        pair.fileserver.start()
        pair.push()
        pair.publish("shop", {"index.html": b"new stock"})
        wait_for_body(pair, "shop", "/", b"new stock")
        status, _, body = pair.get("cart", "/")
        assert status == 200 and b"Nothing has been published yet" in body
        pair.publish("cart", {"index.html": b"basket"})
        wait_for_body(pair, "cart", "/", b"basket")
    finally:
        pair.worker.stop()
        pair.fileserver.stop()


def test_small_files_are_served_from_packs_exactly_and_after_a_restart(pki: CloudPKI, tmp_path: Path) -> None:
    """A static site's small files are kept many to a pack (no file each); serving processes answer
    them byte for byte with validators and ranges, file-by-file changes included, and a restarted
    worker finds its packs again. A site with code keeps every file in its directory (apps see files)."""
    pair = start_pair(pki, tmp_path, processes=2)
    try:
        pair.add_site("packed")
        page = os.urandom(1000)
        files = {
            "index.html": b"<h1>home</h1>",
            "docs/index.html": b"docs",
            "a/page.bin": page,
            "big.bin": BIG,
        }
        first = pair.publish("packed", files)
        wait_for_body(pair, "packed", "/a/page.bin", page)
        version_dir = pair.content / "sites" / "packed" / f"v{first}"
        # The small files are in the version's index, not its directory; the large one is a file there.
        assert sorted(p.name for p in version_dir.rglob("*") if p.is_file()) == ["big.bin"]
        assert (version_dir.parent / f"v{first}.files").is_file()
        packed = {
            sha for pack in (pair.content / "packs").glob("*.pack") for sha, _, _ in pack_table(str(pack))
        }
        assert hashlib.sha256(page).hexdigest() in packed

        def check(path: str, body: bytes) -> str:
            status, headers, got = pair.get("packed", path)
            assert (status, got) == (200, body)
            assert headers["accept-ranges"] == "bytes" and headers["content-length"] == str(len(body))
            etag, modified = headers["etag"], headers["last-modified"]
            status, headers, got = pair.get("packed", path, headers={"Range": "bytes=10-19"})
            assert (status, got, headers["content-range"]) == (206, body[10:20], f"bytes 10-19/{len(body)}")
            status, _, got = pair.get("packed", path, headers={"Range": "bytes=-7"})
            assert (status, got) == (206, body[-7:])
            status, headers, _ = pair.get("packed", path, headers={"Range": f"bytes={len(body)}-"})
            assert status == 416 and headers["content-range"] == f"bytes */{len(body)}"
            assert pair.get("packed", path, headers={"If-None-Match": etag})[0] == 304
            assert pair.get("packed", path, headers={"If-Modified-Since": modified})[0] == 304
            status, _, got = pair.get("packed", path, headers={"Range": "bytes=0-1", "If-Range": '"other"'})
            assert (status, got) == (200, body)
            return etag

        # Each request on a connection of its own: the two serving processes share the port.
        etags = {check("/a/page.bin", page) for _ in range(4)}
        assert len(etags) == 1
        assert pair.get("packed", "/docs/")[::2] == (200, b"docs")
        status, headers, _ = pair.get("packed", "/docs")
        assert status == 301 and headers["location"] == "/docs/"
        assert pair.get("packed", "/a/page.bin/")[0] == 404
        assert pair.get("packed", "/big.bin", headers={"Range": "bytes=1000-1009"})[2] == BIG[1000:1010]

        # File by file, as FTP makes them: listed beside the index, in the same directory.
        ctx = pki.client_ssl("publisher")
        edited = os.urandom(700)
        status, body = call(f"{pair.fs_url}/v1/sites/packed/files/a/page.bin", ctx, method="PUT", data=edited)
        assert status == 200, body
        status, body = call(
            f"{pair.fs_url}/v1/sites/packed/commit",
            ctx,
            method="POST",
            body={"ops": [{"op": "delete", "path": "docs/index.html"}], "source": "ftp"},
        )
        assert status == 200, body
        wait_until(lambda: pair.get("packed", "/docs/")[0] == 404, timeout=10, what="deleted page gone")
        wait_for_body(pair, "packed", "/a/page.bin", edited)
        edited_etag = check("/a/page.bin", edited)
        assert edited_etag not in etags
        assert (version_dir.parent / f"v{first}.changes").is_file()
        assert _versions_on_disk(pair, "packed") == [f"v{first}"]

        # A restart (the fileserver down too): the worker finds its packs and indexes again.
        pair.fileserver.stop()
        assert pair.worker.stop() == 0
        pair.worker.start()
        assert {check("/a/page.bin", edited) for _ in range(4)} == {edited_etag}
        assert pair.get("packed", "/")[::2] == (200, b"<h1>home</h1>")
        assert pair.get("packed", "/docs/")[0] == 404
        assert pair.get("packed", "/big.bin")[::2] == (200, BIG)
        pair.fileserver.start()

        # Settings that name an app runtime: the same version is built again with all its files.
        served_dir = version_dir.parent / "current"
        pair.worker.push_config(
            {
                "version": next(pair.version),
                "fileserver": pair.fs_url,
                "sites": {"packed": {"uid": pair.sites["packed"], "runtime": "php"}},
            }
        )
        wait_until(
            lambda: (served_dir / "a" / "page.bin").is_file(), timeout=15, what="the version's files made"
        )
        assert (served_dir / "a" / "page.bin").read_bytes() == edited
        assert (served_dir / "index.html").read_bytes() == b"<h1>home</h1>"
        assert not (served_dir / "docs" / "index.html").exists()
        assert not (served_dir.parent / f"{os.readlink(served_dir)}.files").exists()
        del pair.sites["packed"]

        # A site with code: every file in its version directory, for its app (none starts here).
        pair.add_site("coded")
        coded = pair.publish("coded", {"app.py": b"app = None\n", "static/site.css": b"body{}"})
        wait_for_body(pair, "coded", "/static/site.css", b"body{}")
        coded_dir = pair.content / "sites" / "coded" / f"v{coded}"
        assert (coded_dir / "static" / "site.css").read_bytes() == b"body{}"
        assert (coded_dir / "app.py").is_file()
        assert not (coded_dir.parent / f"v{coded}.files").exists()
    finally:
        pair.worker.stop()
        pair.fileserver.stop()
