"""The requests the worker sends, and the responses written back: one per connection, or several
in turn on a connection the worker keeps (``Connection: keep-alive``).

Imports are kept to what a cold start needs: every module here is loaded before the first answer.
"""

from __future__ import annotations

TYPE_CHECKING = False
if TYPE_CHECKING:
    import asyncio
    import socket

__all__ = ["HttpRequest", "framing", "read_request", "recv_request", "response_head", "wants_keep_alive"]

MAX_HEAD = 80 * 1024


class HttpRequest:
    # A plain class: dataclasses would cost the cold start an import and a code generation.
    __slots__ = ("body", "headers", "method", "path", "query", "raw_path")

    def __init__(
        self,
        method: str,
        raw_path: bytes,
        path: str,
        query: bytes,
        headers: list[tuple[bytes, bytes]],
        body: bytes,
    ) -> None:
        self.method = method
        self.raw_path = raw_path
        self.path = path
        self.query = query
        # Lower-case names, as sent; repeated headers stay separate.
        self.headers = headers
        self.body = body

    def header(self, name: bytes) -> bytes | None:
        for key, value in self.headers:
            if key == name:
                return value
        return None


def parse_head(head: bytes) -> tuple[HttpRequest, int]:
    """The request a head (without its blank line) describes, body still empty, and the body's length."""
    lines = head.split(b"\r\n")
    method, target, _version = lines[0].split(b" ", 2)
    headers: list[tuple[bytes, bytes]] = []
    length = 0
    for line in lines[1:]:
        name, _, value = line.partition(b":")
        name, value = name.strip().lower(), value.strip()
        headers.append((name, value))
        if name == b"content-length":
            length = int(value)
            if length < 0:
                raise ValueError("negative Content-Length")
    raw_path, _, query = target.partition(b"?")
    if b"%" in raw_path:
        from urllib.parse import unquote_to_bytes  # only for paths that need it

        path = unquote_to_bytes(raw_path).decode("latin-1")
    else:
        path = raw_path.decode("latin-1")
    return HttpRequest(method.decode("ascii"), raw_path, path, query, headers, b""), length


async def read_request(reader: asyncio.StreamReader) -> HttpRequest | None:
    """The request on this connection; None when the peer closed without one."""
    import asyncio

    try:
        head = await reader.readuntil(b"\r\n\r\n")
    except asyncio.IncompleteReadError:
        return None
    except asyncio.LimitOverrunError:
        raise ValueError("request head too large") from None
    req, length = parse_head(head[:-4])
    if length:
        req.body = await reader.readexactly(length)
    return req


def recv_request(conn: socket.socket, buf: bytearray) -> HttpRequest | None:
    """The next request on a blocking connection; None when the peer closed without a whole head.
    ``buf`` holds what was read past the last request, and keeps what is read past this one."""
    data = buf
    end = data.find(b"\r\n\r\n")
    while end < 0:
        if len(data) > MAX_HEAD:
            raise ValueError("request head too large")
        chunk = conn.recv(65536)
        if not chunk:
            return None
        start = max(0, len(data) - 3)
        data += chunk
        end = data.find(b"\r\n\r\n", start)
    req, length = parse_head(bytes(data[:end]))
    del data[: end + 4]
    while len(data) < length:
        chunk = conn.recv(max(65536, min(length - len(data), 1 << 20)))
        if not chunk:
            raise ConnectionError("the request body ended early")
        data += chunk
    req.body = bytes(data[:length])
    del data[:length]
    return req


def wants_keep_alive(req: HttpRequest) -> bool:
    """Whether the worker asked to keep this connection for more requests. Only on its word: a
    client that says nothing (HTTP/1.1's default) reads until the connection closes, as before."""
    value = req.header(b"connection")
    return value is not None and b"keep-alive" in value.lower()


def response_head(
    status: int, reason: str, headers: list[tuple[bytes, bytes]], *, keep_alive: bool = False
) -> bytes:
    """A response head. Closing: the body that follows ends with the connection unless it has a
    length. ``keep_alive``: the caller frames the body (its length, or chunked, said in ``headers``)."""
    if not reason:
        from http import HTTPStatus  # ASGI gives no reason phrase; WSGI always does

        try:
            reason = HTTPStatus(status).phrase
        except ValueError:
            reason = "Unknown"
    out = [f"HTTP/1.1 {status} {reason}".encode("latin-1")]
    out += [name + b": " + value for name, value in headers if name.lower() != b"connection"]
    out.append(b"Connection: keep-alive" if keep_alive else b"Connection: close")
    return b"\r\n".join(out) + b"\r\n\r\n"


def framing(status: int, method: str, headers: list[tuple[bytes, bytes]]) -> str:
    """How a kept-alive response's body is framed: "length" (the app said it, or there is no body)
    or "chunked" (RFC 9112 section 7.1, added by us)."""
    if method == "HEAD" or status in (204, 304) or status < 200:
        return "length"
    for name, _ in headers:
        key = name.lower()
        if key == b"content-length":
            return "length"
        if key == b"transfer-encoding":
            return "app"  # the app framed it itself: only closing the connection ends it safely
    return "chunked"
