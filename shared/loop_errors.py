"""The event loop's exception handler for every role process.

uvloop's TLS layer (``uvloop/sslproto.pyx``) can trip over its own teardown. When a handshake
completes it leaves the records it wrote (a client's Finished, a server's session tickets) for a
read it schedules; if the TCP handle is closed before that read runs (a connect cancelled right
then, as a deploy the fileserver refused cancels its build follows; a peer's reset), the read
flushes them onto the closed handle ("unable to perform operation on <TCPTransport closed=True
...>; the handler is closed"). A step of its shutdown may likewise run after ``connection_lost``
cleared its transport (``'NoneType' object has no attribute ...``). The loop reports either as a
"Fatal error on SSL protocol" with a traceback, though nothing of ours failed and the connection is
gone either way. Those become one line naming the peer where it is still known; anything else keeps
the loop's traceback."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import traceback
from typing import Any

__all__ = ["handle_loop_error"]

_log = logging.getLogger("sitecloud.loop")

# Where the loop's own TLS and transport code lives (uvloop's Cython sources, asyncio's modules).
_LOOP_TLS_FILES = ("sslproto.pyx", "sslproto.py", "handle.pyx", "stream.pyx")


def handle_loop_error(loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
    """For ``loop.set_exception_handler``."""
    exc = context.get("exception")
    transport = context.get("transport")
    if isinstance(exc, Exception) and _torn_down(exc, transport):
        # The message alone: the exception's type would read as a bug of ours to whoever greps.
        _log.info(
            "a TLS connection with %s ended while the event loop tore it down (%s)", _peer(transport), exc
        )
        return
    loop.default_exception_handler(context)


def _torn_down(exc: Exception, transport: object) -> bool:
    """Whether ``exc`` is the loop's TLS layer acting on a transport already closed or gone."""
    frames = traceback.extract_tb(exc.__traceback__)
    if not frames or not frames[-1].filename.endswith(_LOOP_TLS_FILES):
        return False  # raised in a protocol's callback (ours, aiohttp's): a bug to show in full
    if isinstance(exc, RuntimeError):
        # uvloop's own word that the handle is closed. Its transport need not say it is closing:
        # a connect cancelled mid-handshake closes the handle under a read already scheduled.
        return str(exc).endswith("the handler is closed")
    if isinstance(exc, AttributeError) and str(exc).startswith("'NoneType' object has no attribute"):
        # uvloop's transports are not asyncio.BaseTransport subclasses: asked by their methods.
        closing = getattr(transport, "is_closing", None)
        return transport is None or (callable(closing) and bool(closing()))
    return False


def _peer(transport: object) -> str:
    """The transport's peer, where a closed handle still tells it."""
    extra = getattr(transport, "get_extra_info", None)
    peer = None
    if callable(extra):
        # uvloop asks a closed handle's socket, which may be gone (None) or closed.
        with contextlib.suppress(AttributeError, OSError):
            peer = extra("peername")
    if isinstance(peer, tuple) and len(peer) >= 2:
        return f"{peer[0]}:{peer[1]}"
    return "a peer that has gone"
