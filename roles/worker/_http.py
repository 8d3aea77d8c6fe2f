"""A lean HTTP/1.1 server connection: an asyncio Protocol fed through httptools.

It parses requests (pipelined ones are queued and answered in order), drains and ignores request
bodies, enforces timeouts and write flow control, and hands each request to an async handler that
writes the response through :meth:`HttpConnection.write` / :meth:`HttpConnection.drain`.
"""

from __future__ import annotations

import asyncio
import collections
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from email.utils import formatdate
from typing import cast

import httptools

from shared.logs import ContextLogger
from shared.pages import REASONS, error_response

__all__ = ["HttpConnection", "Limits", "Request", "http_date", "response_head"]

MAX_URL = 8 * 1024
MAX_HEADERS_BYTES = 64 * 1024
MAX_HEADERS = 100
MAX_BODY = 1024 * 1024
# Pipelined requests queued beyond this pause reading until the queue shrinks.
MAX_QUEUED = 16


@dataclass(slots=True)
class Request:
    method: str
    target: bytes
    # Lower-case names; a repeated header's values are joined with ", " (RFC 9110 section 5.3).
    headers: dict[str, str]
    keep_alive: bool


@dataclass(frozen=True, slots=True)
class Limits:
    keepalive_timeout: float = 30.0
    request_timeout: float = 15.0
    send_timeout: float = 60.0


@dataclass(frozen=True, slots=True)
class _Refusal:
    """A request that could not be parsed: answered in turn, then the connection closes."""

    status: int
    detail: str


_last_date: tuple[int, str] = (0, "")


def http_date(ts: float | None = None) -> str:
    """An IMF-fixdate; the current one is cached per second (every response carries one)."""
    global _last_date
    if ts is not None:
        return formatdate(ts, usegmt=True)
    now = int(time.time())
    if _last_date[0] != now:
        _last_date = (now, formatdate(now, usegmt=True))
    return _last_date[1]


def response_head(status: int, headers: list[tuple[str, str]], *, keep_alive: bool) -> bytes:
    lines = [f"HTTP/1.1 {status} {REASONS.get(status, 'Unknown')}", f"Date: {http_date()}"]
    lines += [f"{name}: {value}" for name, value in headers]
    lines.append("Connection: keep-alive" if keep_alive else "Connection: close")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


Handler = Callable[[Request, "HttpConnection", bool], Awaitable[bool]]


class HttpConnection(asyncio.Protocol):
    """One client connection. ``handler(request, conn, keep_alive)`` answers and returns keep-alive."""

    def __init__(
        self,
        handler: Handler,
        *,
        limits: Limits,
        log: ContextLogger,
        admit: Callable[[HttpConnection, asyncio.Transport], bool],
        on_close: Callable[[HttpConnection], None],
    ) -> None:
        self._handler = handler
        self._limits = limits
        self._log = log
        self._admit = admit
        self._on_close = on_close
        self._loop = asyncio.get_running_loop()
        self._transport: asyncio.Transport | None = None
        self._parser = httptools.HttpRequestParser(self)
        self._queue: collections.deque[Request | _Refusal] = collections.deque()
        self._task: asyncio.Task[None] | None = None
        self._can_write = asyncio.Event()
        self._can_write.set()
        self._timer: asyncio.TimerHandle | None = None
        self._reading_paused = False
        self._parsing = True
        self._closed = False
        self._draining = False
        self._started_response = False
        # The request being parsed.
        self._url = bytearray()
        self._headers: dict[str, str] = {}
        self._header_bytes = 0
        self._header_name = bytearray()
        self._header_value = bytearray()
        self._body_bytes = 0

    # -- connection lifecycle

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports do not subclass asyncio.Transport; they have its methods.
        transport = cast(asyncio.Transport, transport)
        self._transport = transport
        if not self._admit(self, transport):
            self._closed = True
            transport.close()
            return
        self._arm(self._limits.keepalive_timeout)

    def connection_lost(self, exc: Exception | None) -> None:
        self._closed = True
        self._disarm()
        self._can_write.set()
        if self._task is not None:
            self._task.cancel()
        self._on_close(self)

    @property
    def idle(self) -> bool:
        return self._task is None and not self._queue

    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def settled(self) -> bool:
        """Nothing left to answer or to send: cutting the connection now loses nothing."""
        if self._closed or self._transport is None:
            return True
        return self.idle and self._transport.get_write_buffer_size() == 0

    def drain_and_close(self) -> None:
        """Server stop: finish the response in flight (if any), then close."""
        self._draining = True
        self._parsing = False
        if self.idle:
            self._close()

    def abort(self) -> None:
        if self._transport is not None:
            self._transport.abort()

    def _close(self) -> None:
        self._parsing = False
        if self._transport is not None and not self._transport.is_closing():
            self._transport.close()

    def _arm(self, seconds: float) -> None:
        self._disarm()
        self._timer = self._loop.call_later(seconds, self._timed_out)

    def _disarm(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _timed_out(self) -> None:
        self._timer = None
        if self._transport is not None:
            self._transport.abort()

    # -- writing

    def pause_writing(self) -> None:
        self._can_write.clear()

    def resume_writing(self) -> None:
        self._can_write.set()

    def write(self, data: bytes) -> None:
        self._started_response = True
        if self._transport is not None and not self._closed:
            self._transport.write(data)

    async def drain(self) -> None:
        """Wait while the peer's buffer is full; a peer that stops reading is dropped."""
        if self._can_write.is_set():
            return
        try:
            await asyncio.wait_for(self._can_write.wait(), self._limits.send_timeout)
        except TimeoutError:
            self.abort()
            raise ConnectionResetError("peer stopped reading") from None
        if self._closed:
            raise ConnectionResetError("peer went away")

    # -- reading

    def data_received(self, data: bytes) -> None:
        if not self._parsing:
            return
        if self.idle:
            self._disarm()
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            # No upgrades here: answer what was asked, then close.
            self._stop_parsing()
        except httptools.HttpParserCallbackError:
            self._stop_parsing()
        except httptools.HttpParserError:
            self._refuse(400, "The request could not be parsed.")

    def eof_received(self) -> bool | None:
        # Over TLS a half-close cannot be kept open (asyncio closes the transport): stop here.
        self._parsing = False
        return None

    def _stop_parsing(self) -> None:
        self._parsing = False
        if self.idle:
            self._close()

    def _refuse(self, status: int, detail: str) -> None:
        self._parsing = False
        self._enqueue(_Refusal(status, detail))

    def on_message_begin(self) -> None:
        self._url.clear()
        self._headers = {}
        self._header_bytes = 0
        self._header_name.clear()
        self._header_value.clear()
        self._body_bytes = 0
        self._arm(self._limits.request_timeout)

    def on_url(self, url: bytes) -> None:
        self._url += url
        if len(self._url) > MAX_URL:
            self._refuse(414, "The request's address is too long.")
            raise httptools.HttpParserCallbackError("url too long")

    def on_header(self, name: bytes, value: bytes) -> None:
        self._header_bytes += len(name) + len(value)
        if self._header_bytes > MAX_HEADERS_BYTES or len(self._headers) >= MAX_HEADERS:
            self._refuse(431, "The request's header fields are too large.")
            raise httptools.HttpParserCallbackError("headers too large")
        key = name.decode("latin-1").lower()
        text = value.decode("latin-1")
        old = self._headers.get(key)
        self._headers[key] = text if old is None else f"{old}, {text}"

    def on_body(self, body: bytes) -> None:
        # Static sites take no bodies: count and drop them.
        self._body_bytes += len(body)
        if self._body_bytes > MAX_BODY:
            self._refuse(413, "Request bodies are not accepted here.")
            raise httptools.HttpParserCallbackError("body too large")

    def on_message_complete(self) -> None:
        self._disarm()
        parser = self._parser
        self._enqueue(
            Request(
                method=parser.get_method().decode("ascii", "replace"),
                target=bytes(self._url),
                headers=self._headers,
                keep_alive=bool(parser.should_keep_alive()),
            )
        )

    # -- answering, in order

    def _enqueue(self, item: Request | _Refusal) -> None:
        self._queue.append(item)
        if len(self._queue) > MAX_QUEUED and not self._reading_paused and self._transport is not None:
            self._reading_paused = True
            self._transport.pause_reading()
        if self._task is None:
            self._task = self._loop.create_task(self._answer_all())

    async def _answer_all(self) -> None:
        keep = True
        try:
            while self._queue and keep and not self._closed:
                item = self._queue.popleft()
                if self._reading_paused and len(self._queue) <= MAX_QUEUED // 2 and self._transport:
                    self._reading_paused = False
                    self._transport.resume_reading()
                if isinstance(item, _Refusal):
                    self.write(error_response(item.status, "Bad request", item.detail, keep_alive=False))
                    keep = False
                    break
                keep = await self._answer(item)
        except asyncio.CancelledError:
            return
        finally:
            self._task = None
        if self._closed:
            return
        if not keep or self._draining:
            self._close()
        elif self._queue:
            self._task = self._loop.create_task(self._answer_all())
        elif not self._parsing:
            self._close()
        elif self._timer is None:
            self._arm(self._limits.keepalive_timeout)

    async def _answer(self, request: Request) -> bool:
        self._started_response = False
        # Once parsing has stopped, the last queued answer is the last one on this connection.
        keep_alive = request.keep_alive and not self._draining and (self._parsing or bool(self._queue))
        try:
            return await self._handler(request, self, keep_alive) and keep_alive
        except (ConnectionError, asyncio.CancelledError):
            raise
        except Exception:
            self._log.exception("failed to answer %s %r", request.method, request.target[:200])
            if self._started_response:
                self.abort()
            else:
                self.write(
                    error_response(
                        500,
                        "Something went wrong",
                        "The worker could not answer this request.",
                        keep_alive=False,
                    )
                )
            return False
