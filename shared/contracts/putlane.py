"""The put lane: small files from the publisher to the fileserver in binary frames.

A connection to the fileserver's control port that offered ALPN :data:`PUT_LANE_ALPN` and had it
selected carries only this: one request, then its answer, then the next request. A request is
:class:`PutFrame`: the site, its content id, the path, the version the uploader's view is at, and the
file's bytes, all in one write. The answer is the HTTP status the content API would give and the same
JSON (:class:`~shared.contracts.content.FileStored`, or an error of :mod:`shared.errors`).

Why not HTTP: for a file of a few KB, parsing and building an HTTP request and its answer on both ends
cost more than storing it (an FTP mirror is one such put per file, each waited for before the 226).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

__all__ = ["ANSWER_HEAD", "PUT_HEAD", "PUT_LANE_ALPN", "PUT_LANE_MAX_BODY", "PutFrame", "encode_answer"]

PUT_LANE_ALPN = "sitecloud-put/1"
# Larger files go as a streamed HTTP PUT (the fileserver takes a lane's body whole in memory).
PUT_LANE_MAX_BODY = 1024 * 1024
# Lengths of site, content id and path; the version the uploader is at (-1: none); the body's length.
PUT_HEAD = struct.Struct(">HHHqI")
# The HTTP status of the answer and its JSON's length.
ANSWER_HEAD = struct.Struct(">HI")


@dataclass(frozen=True, slots=True)
class PutFrame:
    site: str
    content_id: str
    path: str
    since: int | None
    body: bytes

    def encode(self) -> bytes:
        site, uid, path = self.site.encode(), self.content_id.encode(), self.path.encode()
        since = -1 if self.since is None else self.since
        head = PUT_HEAD.pack(len(site), len(uid), len(path), since, len(self.body))
        return b"".join((head, site, uid, path, self.body))

    @staticmethod
    def size_of(head: bytes | bytearray | memoryview) -> int:
        """The whole frame's length, from its first :data:`PUT_HEAD` bytes."""
        site, uid, path, _, body = PUT_HEAD.unpack_from(head)
        return int(PUT_HEAD.size + site + uid + path + body)

    @staticmethod
    def body_size_of(head: bytes | bytearray | memoryview) -> int:
        """The file's length, from the frame's first :data:`PUT_HEAD` bytes."""
        return int(PUT_HEAD.unpack_from(head)[4])

    @classmethod
    def parse(cls, frame: bytes | memoryview) -> PutFrame:
        """One whole frame (as long as :meth:`size_of` says); ValueError when its names are not UTF-8.

        The path is checked by the fileserver's own trust boundary, as an HTTP PUT's is."""
        site_len, uid_len, path_len, since, _ = PUT_HEAD.unpack_from(frame)
        at = PUT_HEAD.size
        view = memoryview(frame)
        site = bytes(view[at : at + site_len]).decode()
        at += site_len
        uid = bytes(view[at : at + uid_len]).decode()
        at += uid_len
        path = bytes(view[at : at + path_len]).decode()
        at += path_len
        return cls(site, uid, path, None if since < 0 else since, bytes(view[at:]))


def encode_answer(status: int, body: bytes) -> bytes:
    return ANSWER_HEAD.pack(status, len(body)) + body
