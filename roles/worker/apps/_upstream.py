"""The worker's side of one request to an app over HTTP/1.1 (our app server, or a ``command`` app).

One connection per request (``Connection: close``): a local socket costs microseconds, and the app
server then never has to frame keep-alive. The response is parsed with httptools and handed to a
:class:`Sink` (the exchange), which frames it for the front end.
"""

from __future__ import annotations

import asyncio
from typing import Protocol, cast

import httptools

__all__ = ["HttpUpstream", "Sink", "UpstreamBase"]


class Sink(Protocol):
    def upstream_head(self, status: int, headers: list[tuple[bytes, bytes]]) -> None: ...
    def upstream_data(self, data: bytes) -> None: ...
    def upstream_end(self) -> None: ...
    def upstream_failed(self, why: str) -> None: ...
    def upstream_stderr(self, text: str) -> None: ...


class UpstreamBase(asyncio.Protocol):
    def __init__(self, sink: Sink, request: bytes) -> None:
        self.sink = sink
        self._request = request
        self.transport: asyncio.Transport | None = None
        self.done = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        self.transport.write(self._request)
        self._request = b""

    def close(self) -> None:
        self.done = True
        if self.transport is not None:
            self.transport.close()

    def pause(self) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.pause_reading()

    def resume(self) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.resume_reading()

    def _finish(self) -> None:
        if not self.done:
            self.done = True
            self.sink.upstream_end()
        if self.transport is not None:
            self.transport.close()

    def _fail(self, why: str) -> None:
        if not self.done:
            self.done = True
            self.sink.upstream_failed(why)
        if self.transport is not None:
            self.transport.abort()


class HttpUpstream(UpstreamBase):
    def __init__(self, sink: Sink, request: bytes, *, head_only: bool) -> None:
        super().__init__(sink, request)
        self._parser = httptools.HttpResponseParser(self)
        self._head_only = head_only
        self._headers: list[tuple[bytes, bytes]] = []
        self._framed = False
        self._have_head = False

    def data_received(self, data: bytes) -> None:
        if self.done:
            return
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserError as exc:
            self._fail(f"the app's response could not be parsed ({exc})")

    def eof_received(self) -> bool | None:
        # A body without a length ends with the connection.
        if self._have_head and not self._framed:
            self._finish()
        return None

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.done:
            if self._have_head and not self._framed:
                self._finish()
            else:
                self._fail("the app closed the connection before it answered" if not self._have_head
                           else "the app's response was cut short")  # fmt: skip

    def on_header(self, name: bytes, value: bytes) -> None:
        key = name.lower()
        if key in (b"content-length", b"transfer-encoding"):
            self._framed = True
        self._headers.append((key, value))

    def on_headers_complete(self) -> None:
        status = self._parser.get_status_code()
        if 100 <= status < 200:
            self._headers = []
            return
        self._have_head = True
        if status in (204, 304):
            self._framed = True
        self.sink.upstream_head(status, self._headers)
        if self._head_only:
            self._finish()

    def on_body(self, body: bytes) -> None:
        if not self.done:
            self.sink.upstream_data(body)

    def on_message_complete(self) -> None:
        if self._have_head:
            self._finish()
