"""The visitors' TLS bridge (roles/frontend/_tls.py) without sockets: a client's records, however the
reads cut them, reach the HTTP protocol whole and in order."""

from __future__ import annotations

import asyncio
import random
import ssl
from pathlib import Path

from roles.frontend._admission import AddressLimit
from roles.frontend._handshakes import HandshakeGate
from roles.frontend._tls import TlsBridge
from shared.logs import get_logger
from shared.metrics import HttpCounts
from shared.tls import public_server_context
from tests.support import CloudPKI, handshake_through


class _App(asyncio.Protocol):
    def __init__(self) -> None:
        self.got = bytearray()

    def data_received(self, data: bytes) -> None:
        self.got += data


def _pair(tmp_path: Path) -> tuple[TlsBridge, _App, ssl.SSLObject, ssl.MemoryBIO]:
    pki = CloudPKI(tmp_path / "pki")
    cert, key = tmp_path / "site.pem", tmp_path / "site.key"
    pki.ca.issue_wildcard("sites.test").write(key, cert)
    server = public_server_context(cert, key)
    client_ctx = ssl.create_default_context(cafile=str(pki.ca_file))
    loop = asyncio.new_event_loop()
    app = _App()
    admission = AddressLimit(0, HttpCounts(), get_logger("frontend"))
    bridge = TlsBridge(loop, server, app, 10.0, admission, HandshakeGate(loop, 1.0))
    client, to_server = handshake_through(bridge, client_ctx, "a.sites.test")
    loop.close()
    return bridge, app, client, to_server


def test_records_reach_the_app_whole_and_in_order_however_reads_cut_them(tmp_path: Path) -> None:
    bridge, app, client, to_server = _pair(tmp_path)
    rnd = random.Random(3)
    sent = bytearray()
    for size in (60, 16 * 1024, 100_000, 1, 40_000):
        piece = rnd.randbytes(size)
        client.write(piece)  # records of up to 16 KB each
        sent += piece
        wire = to_server.read()
        if size == 100_000:
            bridge.data_received(wire)  # several whole records in one read
            continue
        at = 0
        while at < len(wire):  # cut anywhere: inside a header, inside a record, on a boundary
            step = rnd.choice([1, 3, 5, 700, 16 * 1024 + 22, len(wire)])
            bridge.data_received(wire[at : at + step])
            at += step
    assert bytes(app.got) == bytes(sent)
