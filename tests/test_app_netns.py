"""The worker's sockets into an app's own network namespace (``roles/worker/apps/_netns.py``), against
a real namespace made with ``unshare -n`` holding a few listeners."""

from __future__ import annotations

import asyncio
import os
import shutil
import socket
import subprocess
import sys
from collections.abc import Iterator

import pytest

from roles.worker.apps._netns import AppPort, NetnsDialer, diag_listeners, table_listeners

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
