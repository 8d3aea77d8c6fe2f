"""A blocking mTLS client for the fileserver's content API, for FTP session threads and deploy workers.

One keep-alive connection per client; a connection the fileserver closed while idle is reopened and the
request sent once more. Error answers come back as the same :class:`shared.errors.SitecloudError`.

Every call names the site's content id beside its name: while the fileserver gives that name to other
content (a site deleted and created again, restored or swapped, and one config behind the other) it
answers "storage unavailable", so nothing is written into, or read from, the wrong site's content.
"""

from __future__ import annotations

import http.client
import io
import json
import os
import socket
import ssl
import threading
import time
from collections.abc import Sequence
from typing import IO, Any, Protocol
from urllib.parse import quote, urlencode, urlsplit

from shared.contracts.answers import parse_answer
from shared.contracts.content import (
    BlobBatchStored,
    BlobStored,
    CommitAnswer,
    CommitOp,
    CommitRequest,
    CommitSource,
    FileStored,
    Manifest,
    RollbackAnswer,
    RollbackRequest,
    SiteContentInfo,
    VersionDiff,
)
from shared.contracts.putlane import ANSWER_HEAD, PUT_LANE_ALPN, PUT_LANE_MAX_BODY, PutFrame
from shared.errors import StorageUnavailable, Unavailable, error_from_json

__all__ = ["FilePut", "FileStream", "FileserverClient", "PutLanePool", "SiteRef"]

_CHUNK = 256 * 1024
# A request body up to this size goes out in the same write as its head.
_ONE_WRITE = 256 * 1024
# A fileserver that does not speak the put lane is asked again after this long (it may be upgraded).
_NO_LANE_FOR = 60.0
# A lane idle this long is closed, before the fileserver's idle timeout (75 s) would close it under a put.
_LANE_IDLE = 60.0


class SiteRef(Protocol):
    """A site as the fileserver knows it (a publisher's ``SiteInfo`` is one)."""

    @property
    def name(self) -> str: ...

    @property
    def content_id(self) -> str: ...


class _Unreachable(Exception):
    """Why the fileserver could not be reached, chained under :class:`StorageUnavailable` for the log
    (the tenant's answer does not name internal addresses)."""


def _remaining(source: IO[bytes]) -> int:
    """The bytes from ``source``'s position to its end (a file, or a spool still in memory)."""
    source.flush()
    here = source.tell()
    size = source.seek(0, os.SEEK_END) - here
    source.seek(here)
    return size


class _Connection(http.client.HTTPSConnection):
    def _send_output(self, message_body: Any = None, encode_chunked: bool = False) -> None:
        if isinstance(message_body, bytes) and len(message_body) <= _ONE_WRITE and not encode_chunked:
            # Head and body in one write (http.client sends two): one TLS record run and one wake-up
            # of the fileserver for a small upload (a big body is not copied for it).
            buffer: list[bytes] = self._buffer  # type: ignore[attr-defined]
            buffer.extend((b"", b""))
            head = b"\r\n".join(buffer)
            del buffer[:]
            self.send(head + message_body)
            return
        super()._send_output(message_body, encode_chunked)  # type: ignore[misc]


class _Lane:
    """One put lane: a kept mTLS connection, one request then its answer at a time."""

    def __init__(self, sock: ssl.SSLSocket) -> None:
        self._sock = sock
        self._buffer = bytearray()
        self.used = time.monotonic()  # when its last answer came

    def exchange(self, frame: bytes) -> tuple[int, bytes]:
        self._sock.sendall(frame)
        status, length = ANSWER_HEAD.unpack(self._read(ANSWER_HEAD.size))
        return status, self._read(length)

    def _read(self, size: int) -> bytes:
        while len(self._buffer) < size:
            data = self._sock.recv(65536)
            if not data:
                raise ConnectionResetError("the fileserver closed the put lane")
            self._buffer += data
        taken = bytes(self._buffer[:size])
        del self._buffer[:size]
        return taken

    def close(self) -> None:
        self._sock.close()


class PutLanePool:
    """Put lanes (:mod:`shared.contracts.putlane`) to the fileserver, kept and shared by the FTP
    sessions' threads: a small file's put costs a frame each way instead of an HTTP exchange, and a
    session needs no handshake of its own for it.

    ``ssl_context`` is the publisher's client identity, its own object: it offers the lane's ALPN. A
    fileserver that does not select it is answered ``None`` (use HTTP) for a while.
    """

    def __init__(self, ssl_context: ssl.SSLContext, *, timeout: float = 60.0) -> None:
        ssl_context.set_alpn_protocols([PUT_LANE_ALPN])
        self._ssl = ssl_context
        self._timeout = timeout
        self._lock = threading.Lock()
        self._idle: dict[tuple[str, int], list[_Lane]] = {}
        self._no_lane_until: dict[tuple[str, int], float] = {}

    def close(self) -> None:
        with self._lock:
            lanes = [lane for idle in self._idle.values() for lane in idle]
            self._idle.clear()
        for lane in lanes:
            lane.close()

    def put(self, host: str, port: int, frame: PutFrame) -> tuple[int, bytes] | None:
        """The status and JSON the fileserver answered ``frame`` with; None when it has no put lane."""
        key = (host, port)
        raw = frame.encode()
        for attempt in range(2):
            taken = self._take(key)
            if taken is None:
                return None
            lane, reused = taken
            try:
                answer = lane.exchange(raw)
            except OSError as exc:
                lane.close()
                # Only a kept lane may have been closed by the fileserver while idle (the put is sent
                # again: storing the same bytes at the same path twice makes no second version).
                if attempt == 0 and reused and not isinstance(exc, TimeoutError):
                    continue
                raise StorageUnavailable() from _Unreachable(
                    f"the put lane to the fileserver at {host}:{port} broke off: {exc}"
                )
            lane.used = time.monotonic()
            with self._lock:
                self._idle.setdefault(key, []).append(lane)
            return answer
        raise AssertionError("unreachable")

    def _take(self, key: tuple[str, int]) -> tuple[_Lane, bool] | None:
        now = time.monotonic()
        with self._lock:
            stale = self._retire(now)
            idle = self._idle.get(key)
            lane = idle.pop() if idle else None
            no_lane = lane is None and self._no_lane_until.get(key, 0.0) > now
        for old in stale:
            old.close()
        if lane is not None:
            return lane, True
        if no_lane:
            return None
        host, port = key
        try:
            sock = socket.create_connection(key, timeout=self._timeout)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            try:
                tls = self._ssl.wrap_socket(sock, server_hostname=host)
            except BaseException:
                sock.close()
                raise
        except OSError as exc:
            raise StorageUnavailable() from _Unreachable(
                f"cannot reach the fileserver at {host}:{port}: {exc}"
            )
        if tls.selected_alpn_protocol() != PUT_LANE_ALPN:
            tls.close()
            with self._lock:
                self._no_lane_until[key] = time.monotonic() + _NO_LANE_FOR
            return None
        return _Lane(tls), False

    def _retire(self, now: float) -> list[_Lane]:
        """Take the lanes idle for ``_LANE_IDLE`` out of the pool (under the lock): retired before the
        fileserver closes them, and none left open to a fileserver the sessions no longer use."""
        stale = [lane for idle in self._idle.values() for lane in idle if lane.used + _LANE_IDLE <= now]
        if stale:
            self._idle = {
                key: [lane for lane in idle if lane.used + _LANE_IDLE > now]
                for key, idle in self._idle.items()
            }
        return stale


class FileserverClient:
    def __init__(
        self,
        base_url: str,
        ssl_context: ssl.SSLContext,
        *,
        timeout: float = 60.0,
        lanes: PutLanePool | None = None,
    ) -> None:
        parts = urlsplit(base_url)
        if base_url and (parts.scheme != "https" or not parts.hostname):
            raise Unavailable(f"fileserver URL {base_url!r} is not https://<host>:<port>")
        self.base_url = base_url
        # "" when no fileserver runs: every request is answered "storage is unavailable".
        self._host = parts.hostname or ""
        self._port = parts.port or 443
        self._ssl = ssl_context
        self._timeout = timeout
        self._conn: http.client.HTTPSConnection | None = None
        self._used = False  # whether _conn has carried a request (so may have gone stale)
        self._lanes = lanes  # small files go there, when the fileserver has put lanes

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    def __enter__(self) -> FileserverClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- transport

    def _connection(self) -> http.client.HTTPSConnection:
        if not self._host:
            raise StorageUnavailable(hint="no fileserver is running")
        if self._conn is None:
            self._conn = _Connection(
                self._host, self._port, context=self._ssl, timeout=self._timeout, blocksize=_CHUNK
            )
            self._used = False
        return self._conn

    def _send(
        self, method: str, path: str, *, body: bytes | IO[bytes] | None = None, headers: dict[str, str]
    ) -> http.client.HTTPResponse:
        stream = body if body is not None and not isinstance(body, bytes) else None
        start = stream.tell() if stream is not None else 0
        for attempt in range(2):
            conn = self._connection()
            reused, self._used = self._used, True
            try:
                if stream is not None:
                    stream.seek(start)
                return self._exchange(conn, method, path, body, headers)
            except (OSError, http.client.HTTPException) as exc:
                self.close()
                # Only a reused connection may have been closed by the peer while idle; a fresh one
                # failing means the fileserver is not there (or broke off).
                if attempt == 0 and reused and not isinstance(exc, TimeoutError):
                    continue
                # The tenant is told to retry; the cause (with the fileserver's address) is for the log.
                raise StorageUnavailable() from _Unreachable(
                    f"cannot reach the fileserver at {self.base_url}: {exc}"
                )
        raise AssertionError("unreachable")

    @staticmethod
    def _exchange(
        conn: http.client.HTTPSConnection,
        method: str,
        path: str,
        body: bytes | IO[bytes] | None,
        headers: dict[str, str],
    ) -> http.client.HTTPResponse:
        try:
            conn.request(method, path, body=body, headers=headers)
        except OSError as exc:
            if conn.sock is None:
                # Never connected (refused, no route): there is no answer to read.
                raise
            # The fileserver answers a refused upload at once and closes: read that answer if it came.
            try:
                return conn.getresponse()
            except (OSError, http.client.HTTPException):
                raise exc from None
        return conn.getresponse()

    def _finish(self, resp: http.client.HTTPResponse) -> bytes:
        try:
            data = resp.read()
        except (OSError, http.client.HTTPException) as exc:
            self.close()
            raise Unavailable(f"the fileserver at {self.base_url} broke off its answer: {exc}") from exc
        if resp.will_close:
            self.close()
        return data

    def _json(self, method: str, path: str, *, body: dict[str, Any] | bytes | None = None) -> object:
        headers = {"Accept": "application/json"}
        data: bytes | None = None
        if body is not None:
            data = body if isinstance(body, bytes) else json.dumps(body).encode()
            headers["Content-Type"] = "application/json"
        resp = self._send(method, path, body=data, headers=headers)
        return self._decode(resp.status, self._finish(resp))

    def _decode(self, status: int, raw: bytes) -> object:
        try:
            value = json.loads(raw) if raw else None
        except ValueError:
            value = None
        if status >= 400:
            raise error_from_json(status, value)
        if value is None and raw:
            raise Unavailable(f"the fileserver answered something that is not JSON (HTTP {status})")
        return value

    @staticmethod
    def _url(site: SiteRef, tail: str = "", **params: str | int) -> str:
        """The URL of ``tail`` under the site, with the site's content id (see the module's doc)."""
        query = urlencode({**params, "uid": site.content_id})
        return f"/v1/sites/{quote(site.name, safe='')}{tail}?{query}"

    # --- the content API

    def site_info(self, site: SiteRef) -> SiteContentInfo:
        return parse_answer(SiteContentInfo, self._json("GET", self._url(site)), peer=self.base_url)

    def manifest(self, site: SiteRef) -> Manifest:
        return parse_answer(
            Manifest, self._json("GET", self._url(site, "/manifest")), peer=self.base_url
        ).for_site(site.name)

    def changes(self, site: SiteRef, since: int) -> VersionDiff:
        """The paths changed from version ``since`` to the newest (see the fileserver's ``diff``)."""
        return parse_answer(
            VersionDiff, self._json("GET", self._url(site, "/diff", since=since)), peer=self.base_url
        ).for_site(site.name)

    def download(self, site: SiteRef, path: str, out: IO[bytes], *, limit: int | None = None) -> int | None:
        """Stream the newest version of ``path`` into ``out``; returns the bytes written, or None
        (and nothing written) when the file is larger than ``limit``."""
        resp = self._send("GET", self._url(site, f"/files/{quote(path, safe='/')}"), headers={})
        if resp.status >= 400:
            self._decode(resp.status, self._finish(resp))
        if limit is not None and (resp.length is None or resp.length > limit):
            self.close()  # its body is not read: the connection cannot carry another request
            return None
        total = 0
        try:
            while chunk := resp.read(_CHUNK):
                out.write(chunk)
                total += len(chunk)
        except (OSError, http.client.HTTPException) as exc:
            self.close()
            raise Unavailable(f"the fileserver broke off sending {path!r}: {exc}") from exc
        if resp.will_close:
            self.close()
        return total

    def stream_blob(self, site: SiteRef, sha256: str, *, path: str) -> FileStream:
        """Blob ``sha256`` of ``site`` (the file at ``path``, for messages) as a stream on a connection of its own (the session's stays free
        for other calls meanwhile); the caller closes it."""
        fresh = FileserverClient(self.base_url, self._ssl, timeout=self._timeout)
        try:
            resp = fresh._send("GET", self._url(site, f"/blobs/{quote(sha256, safe='')}"), headers={})
            if resp.status >= 400:
                fresh._decode(resp.status, fresh._finish(resp))
        except BaseException:
            fresh.close()
            raise
        return FileStream(fresh, resp, path)

    def upload_blob(self, site: SiteRef, source: IO[bytes]) -> BlobStored:
        """Stream ``source`` from its current position to its end as one blob."""
        size = _remaining(source)
        headers = {"Content-Type": "application/octet-stream", "Content-Length": str(size)}
        resp = self._send("POST", self._url(site, "/blobs"), body=source, headers=headers)
        return parse_answer(BlobStored, self._decode(resp.status, self._finish(resp)), peer=self.base_url)

    def upload_blobs(self, site: SiteRef, blobs: list[bytes]) -> list[BlobStored]:
        """Store many small blobs in one request; their names in the same order."""
        body = b"".join(len(b).to_bytes(8, "big") + b for b in blobs)
        headers = {"Content-Type": "application/octet-stream", "Content-Length": str(len(body))}
        resp = self._send("POST", self._url(site, "/blob-batch"), body=body, headers=headers)
        return parse_answer(
            BlobBatchStored, self._decode(resp.status, self._finish(resp)), peer=self.base_url
        ).blobs

    def put_file(
        self, site: SiteRef, path: str, source: IO[bytes], *, since: int | None = None
    ) -> FileStored:
        """Store ``source`` from its current position to its end as the file at ``path``, in one request;
        answered once it is durable, with the other changes from version ``since`` if any came."""
        body: bytes | IO[bytes] = source
        if isinstance(source, io.BytesIO):
            # A spool in memory goes out as bytes: http.client then sends the head and the body in one
            # write (one TLS record run, one wake-up of the fileserver) instead of a write for each.
            with source.getbuffer() as view:
                body = bytes(view[source.tell() :])
            size = len(body)
        else:
            size = _remaining(source)
        if isinstance(body, bytes) and self._lanes is not None and self._host and size <= PUT_LANE_MAX_BODY:
            frame = PutFrame(site.name, site.content_id, path, since, body)
            answered = self._lanes.put(self._host, self._port, frame)
            if answered is not None:
                return parse_answer(FileStored, self._decode(*answered), peer=self.base_url)
        headers = {"Content-Type": "application/octet-stream", "Content-Length": str(size)}
        tail = f"/files/{quote(path, safe='/')}"
        url = self._url(site, tail) if since is None else self._url(site, tail, since=since)
        resp = self._send("PUT", url, body=body, headers=headers)
        return parse_answer(FileStored, self._decode(resp.status, self._finish(resp)), peer=self.base_url)

    def start_put(self, site: SiteRef, path: str) -> FilePut:
        """A ``put_file`` whose bytes are sent while they are still being written (see :class:`FilePut`),
        on a connection of its own."""
        fresh = FileserverClient(self.base_url, self._ssl, timeout=self._timeout)
        return FilePut(fresh, self._url(site, f"/files/{quote(path, safe='/')}"), path)

    def commit(
        self,
        site: SiteRef,
        ops: Sequence[CommitOp],
        *,
        replace: bool = False,
        source: CommitSource = "deploy",
    ) -> CommitAnswer:
        """Apply ``ops`` all or nothing as one new version."""
        body = CommitRequest(ops=list(ops), replace=replace, source=source).model_dump_json(by_alias=True)
        return self.commit_encoded(site, body.encode())

    def rollback(self, site: SiteRef, version: int, *, if_newest: int) -> RollbackAnswer:
        """A new version with ``version``'s content, only while ``if_newest`` is the newest."""
        body = RollbackRequest(version=version, if_newest=if_newest).model_dump_json().encode()
        return parse_answer(
            RollbackAnswer, self._json("POST", self._url(site, "/rollback"), body=body), peer=self.base_url
        )

    def commit_encoded(self, site: SiteRef, body: bytes) -> CommitAnswer:
        """:meth:`commit` of a :class:`CommitRequest` already in JSON (see ``encode_commit``)."""
        return parse_answer(
            CommitAnswer, self._json("POST", self._url(site, "/commit"), body=body), peer=self.base_url
        )


class FileStream:
    """A file's bytes as the fileserver sends them, read as they come."""

    def __init__(self, client: FileserverClient, resp: http.client.HTTPResponse, path: str) -> None:
        self._client = client
        self._resp = resp
        self._path = path

    def read(self, size: int = -1) -> bytes:
        try:
            return self._resp.read(None if size < 0 else size)
        except (OSError, http.client.HTTPException) as exc:
            self.close()
            raise Unavailable(f"the fileserver broke off sending {self._path!r}: {exc}") from exc

    def close(self) -> None:
        self._resp.close()
        self._client.close()


class FilePut:
    """One file's PUT, its body sent chunked as the caller writes it, on a connection of its own.

    A write waits while the fileserver is slower (the socket's buffers are the only queue).
    :meth:`finish` ends the body and returns the fileserver's answer, given once the file is durable;
    :meth:`abort` closes the connection before the body's end, and the fileserver keeps nothing. A
    refusal by the fileserver (its answer before the body's end) is raised by the write that meets it.
    """

    def __init__(self, client: FileserverClient, url: str, path: str) -> None:
        self._client = client
        self._path = path
        self._done = False
        conn = client._connection()
        try:
            conn.putrequest("PUT", url, skip_accept_encoding=True)
            conn.putheader("Content-Type", "application/octet-stream")
            conn.putheader("Transfer-Encoding", "chunked")
            conn.endheaders()
        except (OSError, http.client.HTTPException) as exc:
            client.close()
            raise StorageUnavailable() from _Unreachable(
                f"cannot reach the fileserver at {client.base_url}: {exc}"
            )
        self._conn = conn

    def write(self, data: bytes) -> None:
        if data:
            # One send (one TLS record run) per chunk: the fileserver wakes once for it, not three times.
            self._send(b"".join((b"%x\r\n" % len(data), data, b"\r\n")))

    def finish(self) -> FileStored:
        self._send(b"0\r\n\r\n")
        self._done = True
        try:
            resp = self._conn.getresponse()
        except (OSError, http.client.HTTPException) as exc:
            self._client.close()
            raise Unavailable(f"the fileserver broke off storing {self._path!r}: {exc}") from exc
        try:
            answer = self._client._decode(resp.status, self._client._finish(resp))
            return parse_answer(FileStored, answer, peer=self._client.base_url)
        finally:
            self._client.close()

    def abort(self) -> None:
        """Drop the upload: the body never ends, so the fileserver discards what it got."""
        self._done = True
        self._client.close()

    def _send(self, *parts: bytes) -> None:
        if self._done:
            raise Unavailable(f"the upload of {self._path!r} has ended")
        try:
            for part in parts:
                self._conn.send(part)
        except (OSError, http.client.HTTPException) as exc:
            self._done = True
            # The fileserver may have refused the upload and closed: its answer says why.
            try:
                resp = self._conn.getresponse()
                raw = self._client._finish(resp)
            except (OSError, http.client.HTTPException):
                self._client.close()
                raise Unavailable(f"the fileserver broke off receiving {self._path!r}: {exc}") from exc
            self._client.close()
            self._client._decode(resp.status, raw)
            raise Unavailable(f"the fileserver stopped receiving {self._path!r}: {exc}") from exc
