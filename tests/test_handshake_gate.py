"""The bound on new TLS handshakes' share of a busy front-end process (roles/frontend/_handshakes.py),
on a real event loop, and a closed visitor connection freed at once rather than by the cyclic
collector (a wave of them was a 50 ms collector pass every request waited)."""

from __future__ import annotations

import asyncio
import gc
import ssl
import time
import weakref
from pathlib import Path
from typing import Any

import pytest

from roles.frontend._client import ClientConnection
from roles.frontend._handshakes import HandshakeGate
from roles.frontend._proxy import Proxy
from roles.frontend._tls import TlsBridge
from roles.frontend.config import FrontendConfig
from shared.logs import get_logger
from shared.tls import public_server_context
from tests.support import CloudPKI, handshake_through


def _spin(seconds: float) -> None:
    end = time.thread_time() + seconds
    while time.thread_time() < end:
        pass


def test_a_wave_of_handshakes_takes_its_share_of_a_busy_loop_one_address_after_another() -> None:
    async def run() -> tuple[int, list[str], float]:
        loop = asyncio.get_running_loop()
        gate = HandshakeGate(loop, 0.1)
        done: list[str] = []
        serving = True

        def visitors() -> None:  # the established connections' work: the loop is busy
            _spin(0.004)
            if serving:
                loop.call_soon(visitors)

        visitors()
        await asyncio.sleep(0.1)  # (the gate samples the loop's busy share every 50 ms)
        for _ in range(60):
            gate.run("203.0.113.9", lambda: (_spin(0.001), done.append("flood")))
        gate.run("198.51.100.7", lambda: (_spin(0.001), done.append("visitor")))
        await asyncio.sleep(0.3)
        while_busy = len(done)
        serving = False
        started = time.monotonic()
        while len(done) < 61 and time.monotonic() - started < 5:
            await asyncio.sleep(0.01)
        return while_busy, done, time.monotonic() - started

    while_busy, done, drained_in = asyncio.run(run())
    # 61 ms of handshakes, a tenth of 0.3 s (30 ms, and the 2 ms burst) for them: some ran, the rest waited.
    assert 3 <= while_busy <= 45, while_busy
    # The other address's one handshake came after 60 of the flood's and went among the first.
    assert done.index("visitor") <= 5, done[:8]
    # With the loop idle again, the rest go at once.
    assert len(done) == 61 and drained_in < 2, (len(done), drained_in)


def test_with_no_bound_a_handshake_runs_at_once() -> None:
    loop = asyncio.new_event_loop()
    try:
        gate = HandshakeGate(loop, 1.0)
        ran: list[int] = []
        for i in range(100):
            gate.run("a", lambda i=i: ran.append(i))
        assert ran == list(range(100)) and gate.held == 0
    finally:
        loop.close()


@pytest.mark.parametrize("share", [0, 0.001, 1.5, True, "0.5"])
def test_an_absurd_share_is_refused_with_what_is_allowed(tmp_path: Path, share: Any) -> None:
    with pytest.raises(ValueError, match=r"handshake_share must be a number from 0\.01 to 1"):
        FrontendConfig(role="frontend", host="h", home=tmp_path, handshake_share=share)


def test_a_closed_visitor_connection_is_freed_without_the_cyclic_collector(tmp_path: Path) -> None:
    pki = CloudPKI(tmp_path / "pki")
    cert, key = tmp_path / "site.pem", tmp_path / "site.key"
    pki.ca.issue_wildcard("sites.test").write(key, cert)
    server = public_server_context(cert, key)
    client_ctx = ssl.create_default_context(cafile=str(pki.ca_file))

    async def run() -> tuple[weakref.ref[Any], weakref.ref[Any], bytes]:
        loop = asyncio.get_running_loop()
        config = pki.make_role_home(FrontendConfig(role="frontend", host="localhost", home=tmp_path / "fe"))
        proxy = Proxy(config, get_logger("frontend"))
        conn = ClientConnection(proxy, b"https")
        bridge = TlsBridge(loop, server, conn, 10.0, proxy.admission, proxy.handshakes)
        client, to_server = handshake_through(bridge, client_ctx, "a.sites.test")
        client.write(b"GET / HTTP/1.1\r\nHost: a.sites.test\r\nX-Slow: 1\r\n")  # a head never ended
        bridge.data_received(to_server.read())
        assert proxy.clients == {conn}
        conn.check(loop.time() + 3600)  # the sweep, past the header deadline: 408 and close
        answer = client.read(4096)
        bridge.connection_lost(None)
        refs = weakref.ref(conn), weakref.ref(bridge)
        del conn, bridge
        return refs[0], refs[1], answer

    gc.disable()
    try:
        conn_ref, bridge_ref, answer = asyncio.run(run())
        assert answer.startswith(b"HTTP/1.1 408 "), answer[:40]
        assert conn_ref() is None and bridge_ref() is None
    finally:
        gc.enable()
