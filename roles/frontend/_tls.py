"""The visitors' side of TLS: an ``ssl.SSLObject`` over a plain transport, in front of the HTTP protocol.

Hand-written rather than uvloop's TLS transport for speed: uvloop reads each batch of records until the
``SSLObject`` raises ``SSLWantReadError``, and that exception, made and caught on every read, was about
a tenth of a held hit's CPU. Here the record headers are followed as the bytes come in, so a read that
ends on a record boundary (nearly every request) is decrypted with no would-block at all.

The bridge is the raw transport's protocol and the HTTP protocol's transport: it decrypts what comes
in, encrypts what goes out, and passes flow control and closing through.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import ssl
from typing import Any

from roles.frontend._admission import AddressLimit
from roles.frontend._handshakes import HandshakeGate
from shared.net import client_key

__all__ = ["TlsBridge"]

# A TLS record's header: type (1), version (2), length (2).
_HEADER = 5
# A plain HTTP request line's start (a TLS connection starts with a handshake record, 0x16).
_PLAIN_HTTP = re.compile(rb"[A-Z]{3,10} ")
_USE_HTTPS_TEXT = b"This port speaks HTTPS: ask for https:// and this address instead.\n"
_USE_HTTPS = (
    b"HTTP/1.1 400 Bad Request\r\nContent-Type: text/plain; charset=utf-8\r\n"
    b"Content-Length: %d\r\nConnection: close\r\n\r\n%s" % (len(_USE_HTTPS_TEXT), _USE_HTTPS_TEXT)
)
# What one read hands over at most: a whole record's plaintext (2^14 bytes, RFC 8446 5.1). No more:
# the ssl module allocates that much for each read and gives the rest back, and 256 KB, above
# glibc's first mmap threshold, was an mmap, an mremap and a munmap per read (12 us) until something
# in the process happened to raise it.
_READ = 1 << 14


class TlsBridge(asyncio.Protocol):
    """``app`` gets ``connection_made`` once the handshake is done (within ``handshake_timeout``, or the
    connection is dropped), then plaintext; it writes plaintext to this bridge as to any transport.

    ``admission`` counts the connection from accept to close; one it refuses is dropped at once, before
    any TLS state is made for it. ``gate`` decides when the handshake's costly first step runs.
    """

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        ctx: ssl.SSLContext,
        app: asyncio.Protocol,
        handshake_timeout: float,
        admission: AddressLimit,
        gate: HandshakeGate,
    ) -> None:
        self._loop = loop
        self._ctx = ctx
        self._app = app
        self._handshake_timeout = handshake_timeout
        self._admission = admission
        self._gate = gate
        self._admitted: str | None = None
        # Whether the server's first flight went out (the costly step, run through the gate), and
        # whether that step waits in the gate's queue now.
        self._answered = False
        self._queued = False
        self._raw: asyncio.Transport | None = None
        # Made in connection_made, once the connection is admitted.
        self._in: ssl.MemoryBIO
        self._out: ssl.MemoryBIO
        self._tls: ssl.SSLObject
        self._ready = False
        self._timer: asyncio.TimerHandle | None = None
        # Following the record layer over what came in: bytes the record in progress still needs
        # (beyond a header that is whole), and the first bytes of a header cut short.
        self._rest = 0
        self._head = b""
        self._closing = False

    # -- the raw transport's protocol ---------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._raw = transport  # type: ignore[assignment]
        self._admitted = self._admission.admit(transport)
        if self._admitted is None:
            self.abort()  # (a reset: no handshake, and no TIME_WAIT left on our side)
            return
        self._in = ssl.MemoryBIO()
        self._out = ssl.MemoryBIO()
        self._tls = self._ctx.wrap_bio(self._in, self._out, server_side=True)
        self._timer = self._loop.call_later(self._handshake_timeout, self._handshake_timed_out)

    def data_received(self, data: bytes) -> None:
        if self._closing:
            return
        if not self._ready and not self._in.pending and _PLAIN_HTTP.match(data):
            # Someone typed http:// with the HTTPS port: say so, as nginx does, rather than hang up.
            assert self._raw is not None
            self._closing = True
            self._raw.write(_USE_HTTPS)
            self._raw.close()
            return
        self._in.write(data)
        n = len(data)
        if not self._rest and not self._head and n > _HEADER and _HEADER + ((data[3] << 8) | data[4]) == n:
            boundary = True  # one whole record, as nearly every request comes
        else:
            boundary = self._frame(data)
        if not self._ready:
            if self._queued:
                return  # (in the buffer for the step that waits)
            if not self._answered:
                self._queued = True
                self._gate.run(self._admitted or self._client(), self._first_step)
                return
            if not self._handshake():
                return
        self._deliver(boundary)

    def _deliver(self, boundary: bool) -> None:
        """Decrypt what came in and hand the plaintext to the app."""
        tls = self._tls
        chunks: list[bytes] = []
        ended = False
        try:
            # On a boundary, whole records only: each read takes one, and none is left to wait for.
            # Otherwise, read until the would-block. An empty read is the visitor's close_notify.
            while not boundary or self._in.pending:
                chunk = tls.read(_READ)
                if not chunk:
                    ended = True
                    break
                chunks.append(chunk)
        except ssl.SSLWantReadError:
            # A record not whole yet, or one that was not application data (a key update).
            pass
        except ssl.SSLZeroReturnError:
            ended = True
        except ssl.SSLError:
            self.abort()
            return
        if self._out.pending:
            self._flush_out()
        if chunks:
            self._app.data_received(chunks[0] if len(chunks) == 1 else b"".join(chunks))
        if ended:
            self._eof()

    def eof_received(self) -> bool | None:
        self._eof()
        return None

    def connection_lost(self, exc: Exception | None) -> None:
        if self._admitted is not None:
            self._admission.release(self._admitted)
            self._admitted = None
        self._closing = True
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._ready:
            self._app.connection_lost(exc)

    def pause_writing(self) -> None:
        if self._ready:
            self._app.pause_writing()

    def resume_writing(self) -> None:
        if self._ready:
            self._app.resume_writing()

    # -- the app's transport ------------------------------------------------------------------------

    def write(self, data: bytes | bytearray | memoryview) -> None:
        if self._closing or self._raw is None:
            return
        self._tls.write(data)
        self._raw.write(self._out.read())

    def writelines(self, pieces: Any) -> None:
        if self._closing or self._raw is None:
            return
        write = self._tls.write
        for piece in pieces:
            write(piece)
        self._raw.write(self._out.read())

    def close(self) -> None:
        if self._closing or self._raw is None:
            return
        self._closing = True
        if self._ready:
            with contextlib.suppress(ssl.SSLError):  # (a would-block: its answer is not awaited)
                self._tls.unwrap()  # a close_notify, so the visitor knows the answer is whole
            if self._out.pending:
                self._raw.write(self._out.read())
        self._raw.close()

    def abort(self) -> None:
        self._closing = True
        if self._raw is not None:
            self._raw.abort()

    def is_closing(self) -> bool:
        return self._closing or self._raw is None or self._raw.is_closing()

    def pause_reading(self) -> None:
        if self._raw is not None and not self._raw.is_closing():
            self._raw.pause_reading()

    def resume_reading(self) -> None:
        if self._raw is not None and not self._raw.is_closing():
            self._raw.resume_reading()

    def get_write_buffer_size(self) -> int:
        return self._raw.get_write_buffer_size() if self._raw is not None else 0

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        if name == "sslcontext":
            return self._tls.context
        if name == "ssl_object":
            return self._tls
        if name == "peercert":
            return self._tls.getpeercert()
        if name == "cipher":
            return self._tls.cipher()
        return self._raw.get_extra_info(name, default) if self._raw is not None else default

    # -- inside -------------------------------------------------------------------------------------

    def _frame(self, data: bytes) -> bool:
        """Follow the record headers over ``data``; whether everything received ends a record."""
        n = len(data)
        i = self._rest
        if self._head:
            take = _HEADER - len(self._head)
            head = self._head + data[:take]
            if len(head) < _HEADER:
                self._head = head
                return False
            self._head = b""
            i = take + ((head[3] << 8) | head[4])
        while i + _HEADER <= n:
            i += _HEADER + ((data[i + 3] << 8) | data[i + 4])
        if i > n:
            self._rest = i - n
            return False
        self._rest = 0
        if i < n:
            self._head = data[i:]
            return False
        return True

    def _client(self) -> str:
        peer = self._raw.get_extra_info("peername") if self._raw is not None else None
        return client_key(str(peer[0])) if peer else ""

    def _first_step(self) -> None:
        """The gate's turn for this connection: answer its ClientHello."""
        self._queued = False
        if self._closing:
            return
        if self._handshake() and self._in.pending:
            self._deliver(False)

    def _handshake(self) -> bool:
        try:
            self._tls.do_handshake()
        except ssl.SSLWantReadError:
            # A ClientHello cut short takes another read before anything is answered.
            self._answered = self._answered or self._out.pending > 0
            self._flush_out()
            return False
        except (ssl.SSLError, OSError):
            self._flush_out()  # the alert, if there is one
            self.abort()
            return False
        self._flush_out()  # the server's last flight (and TLS 1.3 session tickets)
        self._ready = True
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._app.connection_made(self)  # type: ignore[arg-type]
        return not self._closing

    def _handshake_timed_out(self) -> None:
        self._timer = None
        if not self._ready:
            self.abort()

    def _flush_out(self) -> None:
        if self._out.pending and self._raw is not None and not self._raw.is_closing():
            self._raw.write(self._out.read())

    def _eof(self) -> None:
        """The visitor closed its side: the app finds out as from a TLS transport (it closes)."""
        if self._ready and not self._closing:
            self._app.eof_received()
        self.close()
