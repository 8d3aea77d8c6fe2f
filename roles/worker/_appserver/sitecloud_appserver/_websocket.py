"""ASGI WebSocket sessions (the ``websocket`` scope of ASGI 3.0) over RFC 6455, standard library only.

The worker passes a visitor's ``Upgrade: websocket`` request on as it came; this answers the handshake
when the app sends ``websocket.accept``, then frames messages both ways: the client's frames are
masked and may be fragmented, pings are answered with pongs, and the closing handshake (section 7)
is done in whichever direction it starts. Loaded only when an app is sent such a request.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import struct

from ._http import HttpRequest, response_head

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable
    from typing import Any

    Message = dict[str, Any]
    AsgiApp = Callable[[dict[str, Any], Callable[[], Awaitable[Message]], Callable[[Message], Awaitable[None]]], Awaitable[None]]  # fmt: skip

__all__ = ["is_websocket", "serve_websocket"]

GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"  # RFC 6455 section 1.3
MAX_MESSAGE = 16 * 1024 * 1024
CLOSE_WAIT = 5.0
_TEXT, _BINARY, _CLOSE, _PING, _PONG = 1, 2, 8, 9, 10


def is_websocket(req: HttpRequest) -> bool:
    upgrade = (req.header(b"upgrade") or b"").lower()
    return req.method == "GET" and b"websocket" in upgrade and req.header(b"sec-websocket-key") is not None


def frame(opcode: int, payload: bytes) -> bytes:
    """One unmasked, unfragmented frame (a server never masks, section 5.1)."""
    n = len(payload)
    if n < 126:
        return bytes((0x80 | opcode, n)) + payload
    if n < 65536:
        return bytes((0x80 | opcode, 126)) + struct.pack("!H", n) + payload
    return bytes((0x80 | opcode, 127)) + struct.pack("!Q", n) + payload


def _unmask(mask: bytes, data: bytes) -> bytes:
    if not data:
        return data
    # XOR as one big integer: fast enough without numpy, and without a byte loop in Python.
    key = (mask * (len(data) // 4 + 1))[: len(data)]
    return (int.from_bytes(data, "big") ^ int.from_bytes(key, "big")).to_bytes(len(data), "big")


class _Closed(Exception):
    def __init__(self, code: int, reason: str = "") -> None:
        super().__init__(code)
        self.code = code
        self.reason = reason


class _Session:
    def __init__(self, req: HttpRequest, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.req = req
        self.reader = reader
        self.writer = writer
        self.connected = False  # websocket.connect given to the app
        self.accepted = False
        self.sent_close = False
        self.got_close = False
        self.refused = False  # answered with HTTP, no WebSocket

    # -- the client's frames

    async def _frame(self) -> tuple[bool, int, bytes]:
        head = await self.reader.readexactly(2)
        fin, opcode = bool(head[0] & 0x80), head[0] & 0x0F
        if head[0] & 0x70:
            raise _Closed(1002, "reserved bits set")
        if not head[1] & 0x80:
            raise _Closed(1002, "client frames must be masked")
        n = head[1] & 0x7F
        if n == 126:
            n = struct.unpack("!H", await self.reader.readexactly(2))[0]
        elif n == 127:
            n = struct.unpack("!Q", await self.reader.readexactly(8))[0]
        if n > MAX_MESSAGE:
            raise _Closed(1009, "message too big")
        mask = await self.reader.readexactly(4)
        return fin, opcode, _unmask(mask, await self.reader.readexactly(n))

    async def message(self) -> Message:
        """The next data message (fragments joined); control frames are handled on the way."""
        parts: list[bytes] = []
        kind = 0
        size = 0
        while True:
            fin, opcode, payload = await self._frame()
            if opcode == _PING:
                await self._send(_PONG, payload)
                continue
            if opcode == _PONG:
                continue
            if opcode == _CLOSE:
                code = struct.unpack("!H", payload[:2])[0] if len(payload) >= 2 else 1005
                self.got_close = True
                if not self.sent_close:
                    # Section 5.5.1: the close is answered with the code it came with.
                    await self._send(_CLOSE, payload[:2])
                raise _Closed(code, payload[2:].decode("utf-8", "replace"))
            if opcode in (_TEXT, _BINARY):
                if kind:
                    raise _Closed(1002, "a new message inside a fragmented one")
                kind = opcode
            elif opcode != 0 or not kind:
                raise _Closed(1002, f"unexpected opcode {opcode}")
            size += len(payload)
            if size > MAX_MESSAGE:
                raise _Closed(1009, "message too big")
            parts.append(payload)
            if fin:
                data = b"".join(parts)
                if kind == _TEXT:
                    try:
                        return {"type": "websocket.receive", "text": data.decode("utf-8")}
                    except UnicodeDecodeError:
                        raise _Closed(1007, "text that is not UTF-8") from None
                return {"type": "websocket.receive", "bytes": data}

    async def _send(self, opcode: int, payload: bytes) -> None:
        self.writer.write(frame(opcode, payload))
        await self.writer.drain()

    # -- the app's side

    async def receive(self) -> Message:
        if not self.connected:
            self.connected = True
            return {"type": "websocket.connect"}
        if self.got_close or self.refused or (self.sent_close and not self.accepted):
            return {"type": "websocket.disconnect", "code": 1005}
        try:
            return await self.message()
        except _Closed as closed:
            if not self.got_close and not self.sent_close:
                await self.close(closed.code, closed.reason)
            return {"type": "websocket.disconnect", "code": closed.code, "reason": closed.reason}
        except (asyncio.IncompleteReadError, ConnectionError):
            self.got_close = True
            return {"type": "websocket.disconnect", "code": 1006}

    async def send(self, message: Message) -> None:
        kind = message["type"]
        if kind == "websocket.accept":
            if self.accepted or self.refused:
                raise RuntimeError("websocket.accept after the handshake was answered")
            self.accepted = True
            await self._accept(message)
        elif kind == "websocket.send":
            if not self.accepted or self.sent_close:
                raise RuntimeError("websocket.send before websocket.accept or after websocket.close")
            text = message.get("text")
            if text is not None:
                await self._send(_TEXT, str(text).encode("utf-8"))
            else:
                await self._send(_BINARY, bytes(message.get("bytes") or b""))
        elif kind == "websocket.close":
            if not self.accepted:
                await self.refuse()
            else:
                await self.close(int(message.get("code", 1000)), str(message.get("reason") or ""))
        else:
            raise RuntimeError(f"unexpected ASGI message {kind!r} on a WebSocket")

    async def _accept(self, message: Message) -> None:
        key = (self.req.header(b"sec-websocket-key") or b"").strip()
        accept = base64.b64encode(hashlib.sha1(key + GUID).digest())  # noqa: S324 - the protocol's own
        headers = [(b"Upgrade", b"websocket"), (b"Sec-WebSocket-Accept", accept)]
        subprotocol = message.get("subprotocol")
        if subprotocol:
            headers.append((b"Sec-WebSocket-Protocol", str(subprotocol).encode("latin-1")))
        headers += [(bytes(k), bytes(v)) for k, v in message.get("headers", [])]
        head = response_head(101, "Switching Protocols", headers)
        self.writer.write(head.replace(b"\r\nConnection: close\r\n", b"\r\nConnection: Upgrade\r\n"))
        await self.writer.drain()

    async def refuse(self) -> None:
        """A close before the accept: an HTTP 403, as the ASGI spec says."""
        if self.refused:
            return
        self.refused = self.sent_close = True
        body = b"Forbidden\n"
        headers = [(b"Content-Type", b"text/plain"), (b"Content-Length", b"%d" % len(body))]
        self.writer.write(response_head(403, "Forbidden", headers) + body)
        await self.writer.drain()

    async def close(self, code: int = 1000, reason: str = "") -> None:
        if self.sent_close:
            return
        self.sent_close = True
        await self._send(_CLOSE, struct.pack("!H", code) + reason.encode("utf-8")[:123])

    async def finish(self) -> None:
        """After the app: a session it left open is closed, and the client's close awaited (its
        TCP connection is ours to end, section 7.1.1)."""
        if self.refused:
            return
        if not self.accepted:
            await self.refuse()
            return
        await self.close(1000)
        deadline = asyncio.get_running_loop().time() + CLOSE_WAIT
        while not self.got_close:
            left = deadline - asyncio.get_running_loop().time()
            if left <= 0:
                break
            try:
                await asyncio.wait_for(self.message(), left)
            except _Closed:
                break
            except (TimeoutError, asyncio.IncompleteReadError, ConnectionError):
                break


def websocket_scope(scope: dict[str, Any], req: HttpRequest) -> dict[str, Any]:
    scope = dict(scope, type="websocket", scheme="wss" if scope["scheme"] == "https" else "ws")
    scope.pop("method", None)
    protocols = req.header(b"sec-websocket-protocol") or b""
    scope["subprotocols"] = [p.strip() for p in protocols.decode("latin-1").split(",") if p.strip()]
    return scope


async def serve_websocket(
    app: AsgiApp,
    scope: dict[str, Any],
    req: HttpRequest,
    reader: asyncio.StreamReader,
    writer: asyncio.StreamWriter,
) -> None:
    session = _Session(req, reader, writer)
    try:
        await app(websocket_scope(scope, req), session.receive, session.send)
    finally:
        with contextlib.suppress(ConnectionError, OSError):
            await session.finish()
