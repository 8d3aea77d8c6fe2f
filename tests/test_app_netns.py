"""The worker's sockets into an app's own network namespace (``roles/worker/apps/_netns.py``), against
a real namespace made with ``unshare -n`` holding a few listeners."""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator

import pytest

from roles.worker.apps._netns import (
    AppPort,
    NetnsDialer,
    diag_listeners,
    diag_some_listeners,
    table_listeners,
)

pytestmark = pytest.mark.skipif(
    os.geteuid() != 0 or shutil.which("unshare") is None or shutil.which("ip") is None,
    reason="a network namespace of its own needs root, unshare and ip",
)

# Listeners on the wildcard and loopback, v4 and v6, one on another address, and a socket that only
# bound; the 127.0.0.1 one says hello to whoever connects. Prints its ports, then waits for stdin.
HOLDER = """
import socket, sys, threading
held = []
for family, address in (
    (socket.AF_INET, "0.0.0.0"), (socket.AF_INET, "127.0.0.1"), (socket.AF_INET6, "::"),
    (socket.AF_INET6, "::1"), (socket.AF_INET, "10.9.9.9"),
):
    held.append(socket.socket(family))
    held[-1].bind((address, 0))
    held[-1].listen()
bound = socket.socket()
bound.bind(("127.0.0.1", 0))

def hello():
    while True:
        conn, _ = held[1].accept()
        conn.sendall(b"hello from inside")
        conn.close()

threading.Thread(target=hello, daemon=True).start()
print(" ".join(str(s.getsockname()[1]) for s in held), flush=True)
sys.stdin.read()
"""


@pytest.fixture
def holder() -> Iterator[tuple[int, list[int]]]:
    shell = 'ip link set lo up && ip addr add 10.9.9.9/32 dev lo && exec "$0" -I -S -c "$1"'
    proc = subprocess.Popen(
        ["unshare", "-n", "sh", "-c", shell, sys.executable, HOLDER],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None and proc.stdin is not None
    try:
        ports = [int(p) for p in proc.stdout.readline().split()]
        assert len(ports) == 5, "the namespace's listeners did not come up"
        yield proc.pid, ports
    finally:
        proc.stdin.close()
        proc.wait(timeout=10)
        proc.stdout.close()


async def test_sockets_made_in_the_namespace_reach_its_loopback_and_list_its_listeners(
    holder: tuple[int, list[int]],
) -> None:
    pid, ports = holder
    dialer = NetnsDialer()
    port = AppPort.of_pid(dialer, pid, ports[1])
    try:
        await port.prepare()
        found = port.listeners()
        # The wildcard and loopback listeners, v4 and v6; not the one on another address, nor the
        # socket that only bound. The socket tables of the namespace say the same.
        assert sorted(found) == sorted(
            [
                (socket.AF_INET, "127.0.0.1", ports[0]),
                (socket.AF_INET, "127.0.0.1", ports[1]),
                (socket.AF_INET6, "::1", ports[2]),
                (socket.AF_INET6, "::1", ports[3]),
            ]
        )
        assert sorted(found) == sorted(table_listeners(f"/proc/{pid}/net"))
        assert await port.wait_listening(5, alive=lambda: True, say=lambda line: None)
        # Several at once: more than were made ahead.
        socks = await asyncio.gather(*(port.connected() for _ in range(10)))
        loop = asyncio.get_running_loop()
        for sock in socks:
            assert await loop.sock_recv(sock, 64) == b"hello from inside"
            sock.close()
        # A serving process finds the same namespace by pid and inode.
        twin = AppPort.join(dialer, port.where)
        try:
            sock = await twin.connected()
            assert await loop.sock_recv(sock, 64) == b"hello from inside"
            sock.close()
        finally:
            twin.close()
    finally:
        port.close()
        dialer.close()


async def test_a_port_elsewhere_is_found_and_a_namespace_gone_is_not_joined(
    holder: tuple[int, list[int]],
) -> None:
    pid, _ = holder
    dialer = NetnsDialer()
    # $PORT unused; nothing listens on one port alone, so none is taken in its place.
    port = AppPort.of_pid(dialer, pid, 1)
    said: list[str] = []
    try:
        assert not await port.wait_listening(0.3, alive=lambda: True, say=said.append)
        assert said == []
        # The inode names the namespace: another one under the same pid is not joined.
        fake = port.where.split(":")
        fake[1] = str(int(fake[1]) + 1)
        with pytest.raises(OSError, match="has gone"):
            AppPort.join(dialer, ":".join(fake))
        # Should the inode be another namespace's by then (they are reused), its cookie is not.
        fake = port.where.split(":")
        assert int(fake[2]) != 0  # (learnt from the sockets made there)
        fake[2] = str(int(fake[2]) + 1)
        impostor = AppPort.join(dialer, ":".join(fake))
        try:
            with pytest.raises(OSError, match="has gone"):
                await impostor.connected()
        finally:
            impostor.close()
        with pytest.raises(OSError):
            AppPort.join(dialer, "nonsense")
    finally:
        port.close()
        dialer.close()


def test_the_listening_table_is_read_over_netlink_where_the_socket_is_made() -> None:
    # Here, in the test's own namespace: a listener of ours is in it.
    with socket.socket() as server, socket.socket(socket.AF_NETLINK, socket.SOCK_DGRAM, 4) as nl:
        server.bind(("127.0.0.1", 0))
        server.listen()
        nl.setblocking(False)
        assert (socket.AF_INET, "127.0.0.1", server.getsockname()[1]) in diag_listeners(nl)


def test_the_kernel_lists_one_port_and_a_listing_stops_at_the_ports_asked_for() -> None:
    with contextlib.ExitStack() as stack:
        nl = stack.enter_context(socket.socket(socket.AF_NETLINK, socket.SOCK_DGRAM, 4))
        nl.setblocking(False)
        servers = [stack.enter_context(socket.socket()) for _ in range(3)]
        for server in servers:
            server.bind(("127.0.0.1", 0))
            server.listen()
        ports = [server.getsockname()[1] for server in servers]
        assert diag_listeners(nl, ports[1]) == [(socket.AF_INET, "127.0.0.1", ports[1])]
        assert {t[2] for t in diag_listeners(nl)} >= set(ports)
    # (Other listeners of this host's namespace may come first: 2 ports are listed, and no more.)
    with socket.socket(socket.AF_NETLINK, socket.SOCK_DGRAM, 4) as nl:
        nl.setblocking(False)
        some, whole = diag_some_listeners(nl, 2)
        assert len({t[2] for t in some}) == 2 and not whole


# Many listeners, none on $PORT (1): what an app may hold within its limits, to make the worker's
# polls for $PORT dump them all, on its loop, for the whole start.
CROWD = """
import socket, sys
held = []
for _ in range(int(sys.argv[1])):
    held.append(socket.socket())
    held[-1].bind(("127.0.0.1", 0))
    held[-1].listen(1)
print("ready", flush=True)
sys.stdin.read()
"""


async def test_polling_for_port_costs_the_worker_little_however_many_listeners_the_app_holds() -> None:
    proc = subprocess.Popen(
        [
            "unshare",
            "-n",
            "sh",
            "-c",
            'ip link set lo up && exec "$0" -I -S -c "$1" 4000',
            sys.executable,
            CROWD,
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None and proc.stdin is not None
    dialer = NetnsDialer()
    try:
        assert proc.stdout.readline().strip() == "ready"
        port = AppPort.of_pid(dialer, proc.pid, 1)
        try:
            await port.prepare()
            spent = time.process_time()
            assert not await port.wait_listening(1.0, alive=lambda: True, say=lambda line: None)
            spent = time.process_time() - spent
        finally:
            port.close()
        # Every poll a dump of the 4,000, parsed here: 0.3 s of 1 s; now $PORT's alone, and the
        # others at most every OTHER_PORT_POLL, read no further than a second port.
        assert spent < 0.15, spent
    finally:
        dialer.close()
        proc.stdin.close()
        proc.wait(timeout=10)
        proc.stdout.close()


async def test_closed_while_sockets_are_being_made_it_leaves_nothing_open(
    holder: tuple[int, list[int]],
) -> None:
    pid, ports = holder
    dialer = NetnsDialer()
    port = AppPort.of_pid(dialer, pid, ports[1])
    try:
        making = port.prepare()
        await asyncio.sleep(0)  # (the batch is in the dialer's thread now)
        port.close()  # as the app exits: the batch under way still has the namespace's file
        assert port._netns >= 0
        await making
        assert port._netns == -1
        with pytest.raises(OSError, match="has gone"):
            await port.connected()
    finally:
        port.close()
        dialer.close()
    # (The autouse fixture fails the test on any descriptor left open: sockets or the nsfs file.)
