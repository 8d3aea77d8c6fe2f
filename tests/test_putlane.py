"""The put lane (:mod:`shared.contracts.putlane`): small files from the publisher's client to a real
fileserver process in binary frames, answered as the HTTP put is; refused to any role but the
publisher; and HTTP again where the fileserver offers no lane."""

from __future__ import annotations

import io
import socket
import ssl
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from roles.fileserver.config import FileserverConfig
from roles.publisher._fileserver import FileserverClient, PutLanePool
from shared.contracts.putlane import PUT_HEAD, PUT_LANE_MAX_BODY, PutFrame
from shared.errors import Forbidden, InvalidInput, QuotaExceeded, StorageUnavailable
from shared.tls import server_context
from tests.support import CloudPKI, RoleProcess

SHOP_UID = "5b0b5b0b5b0b5b0b5b0b5b0b5b0b5b0b"
SNAPSHOT = {"version": 1, "sites": {"shop": {"uid": SHOP_UID, "quota_bytes": 64 * 1024}}}


@dataclass(frozen=True)
class _Site:
    name: str
    content_id: str


SHOP = _Site("shop", SHOP_UID)


@pytest.fixture
def fileserver(pki: CloudPKI, tmp_path: Path) -> Iterator[RoleProcess]:
    proc = RoleProcess(pki.role_config(FileserverConfig, "fileserver", tmp_path / "fs"), pki).start()
    try:
        proc.push_config(SNAPSHOT)
        yield proc
    finally:
        proc.stop()


def _client(
    proc: RoleProcess, pki: CloudPKI, role: str = "publisher"
) -> tuple[FileserverClient, PutLanePool]:
    lanes = PutLanePool(pki.client_ssl(role))
    return FileserverClient(proc.control_url, pki.client_ssl(role), lanes=lanes), lanes


def test_a_frame_reads_back_as_written() -> None:
    frame = PutFrame("shop", SHOP_UID, "dir/ä.html", 7, b"\0bytes\r\n")
    raw = frame.encode()
    assert PutFrame.size_of(raw[: PUT_HEAD.size]) == len(raw)
    assert PutFrame.parse(raw) == frame
    assert PutFrame.parse(PutFrame("s", "", "p", None, b"").encode()).since is None


def test_puts_on_the_lane_are_stored_and_answered_as_over_http(
    fileserver: RoleProcess, pki: CloudPKI
) -> None:
    client, lanes = _client(fileserver, pki)
    try:
        first = client.put_file(SHOP, "a.html", io.BytesIO(b"a"))
        assert (first.version, first.size, first.changes) == (1, 1, None)
        # Nobody else wrote: the answer is the put alone.
        assert client.put_file(SHOP, "d/b.html", io.BytesIO(b"bb"), since=1).changes is None
        # Another session (here: a commit over HTTP) made a folder: the next put brings it along.
        client.commit(SHOP, [{"op": "mkdir", "path": "img"}], source="ftp")  # type: ignore[list-item]
        answer = client.put_file(SHOP, "c.html", io.BytesIO(b"ccc"), since=2)
        assert answer.changes is not None and (answer.changes.since, answer.changes.version) == (2, 4)
        assert set(answer.changes.files) == {"c.html"} and set(answer.changes.dirs) == {"img"}
        assert answer.total_bytes == 6
        manifest = client.manifest(SHOP)
        assert set(manifest.files) == {"a.html", "d/b.html", "c.html"}
        assert manifest.files["c.html"].sha256 == answer.sha256
        # Errors come back as the same exceptions, and the lane carries on after them.
        with pytest.raises(QuotaExceeded):
            client.put_file(SHOP, "big.bin", io.BytesIO(bytes(65 * 1024)))
        with pytest.raises(InvalidInput):
            client.put_file(SHOP, "../out.html", io.BytesIO(b"x"))
        with pytest.raises(StorageUnavailable):
            client.put_file(_Site("shop", "not-its-uid"), "x.html", io.BytesIO(b"x"))
        assert client.put_file(SHOP, "e.html", io.BytesIO(b"e")).version == 5
    finally:
        client.close()
        lanes.close()


def test_only_the_publisher_may_open_a_lane(fileserver: RoleProcess, pki: CloudPKI) -> None:
    client, lanes = _client(fileserver, pki, role="worker")
    try:
        with pytest.raises(Forbidden):
            client.put_file(SHOP, "a.html", io.BytesIO(b"a"))
    finally:
        client.close()
        lanes.close()
    reader, lanes = _client(fileserver, pki)
    try:
        assert reader.site_info(SHOP).version == 0
    finally:
        reader.close()
        lanes.close()


def test_a_lane_the_fileserver_dropped_is_opened_again(fileserver: RoleProcess, pki: CloudPKI) -> None:
    client, lanes = _client(fileserver, pki)
    try:
        assert client.put_file(SHOP, "a.html", io.BytesIO(b"a")).version == 1
        # A restart closes the kept lane under the pool: the next put goes on a new one.
        fileserver.stop()
        fileserver.start()
        assert client.put_file(SHOP, "b.html", io.BytesIO(b"b"), since=1).version == 2
    finally:
        client.close()
        lanes.close()


def test_a_fileserver_without_lanes_is_called_over_http(pki: CloudPKI, tmp_path: Path) -> None:
    """A TLS listener that selects no ALPN (a fileserver from before the lane): the pool says so, and
    asks it again only after a while."""
    config = pki.role_config(FileserverConfig, "fileserver", tmp_path / "old")
    listener = socket.create_server(("127.0.0.1", 0))
    tls = server_context(config)
    handshakes = []

    def accept() -> None:
        conn, _ = listener.accept()
        with tls.wrap_socket(conn, server_side=True) as wrapped:
            handshakes.append(wrapped.selected_alpn_protocol())
            wrapped.recv(1)

    thread = threading.Thread(target=accept)
    thread.start()
    lanes = PutLanePool(pki.client_ssl("publisher"))
    try:
        port = listener.getsockname()[1]
        frame = PutFrame("shop", SHOP_UID, "a.html", None, b"a")
        assert lanes.put("localhost", port, frame) is None
        thread.join(5)
        assert handshakes == [None]
        assert lanes.put("localhost", port, frame) is None  # not asked again
    finally:
        lanes.close()
        listener.close()
        thread.join(5)


def test_a_lane_to_nowhere_is_storage_unavailable(pki: CloudPKI) -> None:
    with socket.create_server(("127.0.0.1", 0)) as held:
        port = held.getsockname()[1]
    lanes = PutLanePool(pki.client_ssl("publisher"), timeout=5)
    client = FileserverClient(f"https://127.0.0.1:{port}", ssl.create_default_context(), lanes=lanes)
    try:
        with pytest.raises(StorageUnavailable) as caught:
            client.put_file(SHOP, "a.html", io.BytesIO(b"a"))
        assert "127.0.0.1" not in str(caught.value)
    finally:
        client.close()
        lanes.close()


def test_a_lane_idle_for_a_minute_is_closed_before_the_fileserver_would(
    fileserver: RoleProcess, pki: CloudPKI
) -> None:
    client, lanes = _client(fileserver, pki)
    try:
        assert client.put_file(SHOP, "a.html", io.BytesIO(b"a")).version == 1
        [first] = [lane for idle in lanes._idle.values() for lane in idle]
        first.used -= 61  # as if a minute went by
        assert client.put_file(SHOP, "b.html", io.BytesIO(b"b")).version == 2
        [second] = [lane for idle in lanes._idle.values() for lane in idle]
        assert second is not first and first._sock.fileno() == -1
    finally:
        client.close()
        lanes.close()


def test_a_frame_over_the_limit_is_refused_and_the_lane_closed(
    fileserver: RoleProcess, pki: CloudPKI
) -> None:
    lanes = PutLanePool(pki.client_ssl("publisher"))
    try:
        port = int(fileserver.config.control_port)
        big = PutFrame("shop", SHOP_UID, "big.bin", None, bytes(PUT_LANE_MAX_BODY + 1))
        answered = lanes.put("localhost", port, big)
        assert answered is not None and answered[0] == 400
        assert b"put lane takes files up to" in answered[1]
        small = PutFrame("shop", SHOP_UID, "a.html", None, b"a")
        # The refused lane was closed: the put goes on a new one.
        answered = lanes.put("localhost", port, small)
        assert answered is not None and answered[0] == 200
    finally:
        lanes.close()


def test_sessions_in_threads_share_the_pool_and_every_put_lands(
    fileserver: RoleProcess, pki: CloudPKI
) -> None:
    """Four sessions' threads put at once through one pool: each gets a lane of its own, every file is
    stored once, and the versions they were answered with are all different."""
    lanes = PutLanePool(pki.client_ssl("publisher"))
    answers: list[int] = []
    failures: list[BaseException] = []

    def session(n: int) -> None:
        client = FileserverClient(fileserver.control_url, pki.client_ssl("publisher"), lanes=lanes)
        try:
            for i in range(25):
                answers.append(client.put_file(SHOP, f"s{n}/f{i}.html", io.BytesIO(b"x" * (i + 1))).version)
        except BaseException as exc:  # reported below, in the test's thread
            failures.append(exc)
        finally:
            client.close()

    threads = [threading.Thread(target=session, args=(n,)) for n in range(4)]
    try:
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(60)
        assert not failures, failures
        assert sorted(answers) == list(range(1, 101))
        assert 1 <= sum(len(idle) for idle in lanes._idle.values()) <= 4
        reader = FileserverClient(fileserver.control_url, pki.client_ssl("publisher"))
        try:
            manifest = reader.manifest(SHOP)
        finally:
            reader.close()
        assert len(manifest.files) == 100 and manifest.total_bytes == 4 * sum(range(1, 26))
    finally:
        lanes.close()
