"""The one request per connection the worker sends, and the response written back."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from http import HTTPStatus
from urllib.parse import unquote_to_bytes

__all__ = ["HttpRequest", "read_request", "response_head"]

MAX_HEAD = 80 * 1024


@dataclass(slots=True)
class HttpRequest:
    method: str
    raw_path: bytes
    path: str
    query: bytes
    # Lower-case names, as sent; repeated headers stay separate.
    headers: list[tuple[bytes, bytes]]
    body: bytes

    def header(self, name: bytes) -> bytes | None:
        for key, value in self.headers:
            if key == name:
                return value
        return None


async def read_request(reader: asyncio.StreamReader) -> HttpRequest | None:
    """The request on this connection; None when the peer closed without one."""
    try:
        head = await reader.readuntil(b"\r\n\r\n")
    except asyncio.IncompleteReadError:
        return None
    except asyncio.LimitOverrunError:
        raise ValueError("request head too large") from None
    lines = head[:-4].split(b"\r\n")
    method, target, _version = lines[0].split(b" ", 2)
    headers: list[tuple[bytes, bytes]] = []
    length = 0
    for line in lines[1:]:
        name, _, value = line.partition(b":")
        name, value = name.strip().lower(), value.strip()
        headers.append((name, value))
        if name == b"content-length":
            length = int(value)
    body = await reader.readexactly(length) if length else b""
    raw_path, _, query = target.partition(b"?")
    path = unquote_to_bytes(raw_path).decode("latin-1")
    return HttpRequest(method.decode("ascii"), raw_path, path, query, headers, body)


def response_head(status: int, reason: str, headers: list[tuple[bytes, bytes]]) -> bytes:
    """A response head; the body that follows ends when the connection closes unless it has a length."""
    if not reason:
        try:
            reason = HTTPStatus(status).phrase
        except ValueError:
            reason = "Unknown"
    out = [f"HTTP/1.1 {status} {reason}".encode("latin-1")]
    out += [name + b": " + value for name, value in headers if name.lower() != b"connection"]
    out.append(b"Connection: close")
    return b"\r\n".join(out) + b"\r\n\r\n"
