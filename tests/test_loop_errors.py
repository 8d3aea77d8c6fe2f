"""The roles' loop exception handler: uvloop's TLS teardown after a peer vanished is one line; an
error raised anywhere else keeps its traceback."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import pytest
import uvloop

from shared.loop_errors import handle_loop_error

CLOSED = "unable to perform operation on <TCPTransport closed=True reading=False 0x1>; the handler is closed"


def _raised_in(filename: str, exc: Exception) -> Exception:
    """``exc`` as raised by code of ``filename`` (where uvloop's frames name their .pyx source)."""
    namespace: dict[str, Any] = {}
    exec(compile("def fail(exc):\n    raise exc\n", filename, "exec"), namespace)
    try:
        namespace["fail"](exc)
    except Exception as raised:
        return raised
    raise AssertionError("not raised")


def _ours(exc: Exception) -> Exception:
    try:
        raise exc
    except Exception as raised:
        return raised


def _report(contexts: list[dict[str, Any]]) -> None:
    """Each context through the handler as a role installs it, on uvloop, with a real TCP transport
    (closed, or still open) wherever a context names ``"transport"``."""

    async def run() -> None:
        loop = asyncio.get_running_loop()
        loop.set_exception_handler(handle_loop_error)
        server = await loop.create_server(asyncio.Protocol, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        try:
            for context in contexts:
                if context.get("transport") in ("closed", "open"):
                    transport, _ = await loop.create_connection(asyncio.Protocol, "127.0.0.1", port)
                    if context["transport"] == "closed":
                        transport.abort()
                    context = {**context, "transport": transport}
                    loop.call_exception_handler(context)
                    transport.abort()
                else:
                    loop.call_exception_handler(context)
        finally:
            server.close()
            await server.wait_closed()

    uvloop.run(run())


def test_uvloops_tls_teardown_on_a_closed_transport_is_one_line(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)
    _report(
        [
            {
                "message": "Fatal error on SSL protocol",
                "exception": _raised_in("uvloop/handles/handle.pyx", RuntimeError(CLOSED)),
                "transport": "closed",
            },
            # A handle closed under its cancelled connect: the transport never said it was closing.
            {
                "message": "Fatal error on SSL protocol",
                "exception": _raised_in("uvloop/handles/handle.pyx", RuntimeError(CLOSED)),
                "transport": "open",
            },
            {
                "message": "Error occurred during shutdown",
                "exception": _raised_in(
                    "uvloop/sslproto.pyx", AttributeError("'NoneType' object has no attribute 'close'")
                ),
                "transport": None,
            },
        ]
    )
    lines = [r for r in caplog.records if r.name == "sitecloud.loop"]
    assert [r.levelname for r in lines] == ["INFO"] * 3
    said = [r.getMessage() for r in lines]
    for line in said[:2]:
        assert line.startswith("a TLS connection with 127.0.0.1:") and "the handler is closed" in line
    assert "with a peer that has gone" in said[2] and "has no attribute 'close'" in said[2]
    # Nothing a log check for tracebacks or our own errors would take for one.
    assert not [s for s in said if "Error" in s or "Traceback" in s]
    assert not [r for r in caplog.records if r.exc_info or r.levelno >= logging.WARNING]


def test_any_other_error_keeps_its_traceback(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)
    _report(
        [
            # Raised in a protocol's callback (ours or a library's), through uvloop's SSL layer.
            {
                "message": "Fatal error on SSL protocol",
                "exception": _ours(AttributeError("'NoneType' object has no attribute 'close'")),
                "transport": "closed",
            },
            # In uvloop's SSL layer, but on a transport still open: not a teardown.
            {
                "message": "Fatal error on SSL protocol",
                "exception": _raised_in(
                    "uvloop/sslproto.pyx", AttributeError("'NoneType' object has no attribute 'close'")
                ),
                "transport": "open",
            },
            {"message": "Task exception was never retrieved", "exception": _ours(ValueError("a bug"))},
        ]
    )
    assert not [r for r in caplog.records if r.name == "sitecloud.loop"]
    shown = [r for r in caplog.records if r.name == "asyncio" and r.levelno == logging.ERROR]
    assert len(shown) == 3 and all(r.exc_info for r in shown)
