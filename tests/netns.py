"""Clouds whose role hosts are network namespaces (the netns fabric), for the multi-host end-to-end
tests: start one, sweep what a crashed earlier run left, and reach a site through one host's front end."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import ssl
import subprocess
from collections.abc import Collection, Iterator
from pathlib import Path

from roles.controller.fabric._etchosts import read_block, update_hosts_file
from roles.controller.fabric.netns import NetnsFabric
from tests.cloud import LocalCloud

__all__ = ["HOSTS_FILE", "https_get_via", "netns_cloud", "sweep_hosts"]

HOSTS_FILE = Path("/etc/hosts")


def sweep_hosts(names: Collection[str]) -> None:
    """Remove what a crashed earlier run left of these hosts (its namespaces, processes and
    /etc/hosts lines; only these names, as other tests on the machine make hosts too)."""
    listed = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=True).stdout
    present = {line.split()[0] for line in listed.splitlines() if line.strip()}
    for name in names:
        ns = f"sc-{name}"
        if ns in present:
            pids = subprocess.run(["ip", "netns", "pids", ns], capture_output=True, text=True).stdout
            for pid in pids.split():
                with contextlib.suppress(ProcessLookupError):
                    os.kill(int(pid), signal.SIGKILL)
            subprocess.run(["ip", "netns", "del", ns], check=False)
    if set(names) & set(read_block(HOSTS_FILE.read_text())):
        update_hosts_file(HOSTS_FILE, remove=set(names))


def _kill_leftovers(home: Path) -> None:
    """Kill what still runs from this home: a namespace whose name went away while its processes
    lived on (other tests on this machine make and delete namespaces too) is not swept."""
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            cmdline = (proc / "cmdline").read_bytes()
        except OSError:
            continue
        if str(home).encode() in cmdline:
            with contextlib.suppress(ProcessLookupError):
                os.kill(int(proc.name), signal.SIGKILL)


def netns_cloud(home: Path, hosts: Collection[str], extra_args: tuple[str, ...]) -> Iterator[LocalCloud]:
    """`sitecloud up` on ``home``; at the end every host it made is destroyed and swept."""
    sweep_hosts(hosts)
    cloud = LocalCloud(home, extra_args=extra_args)
    try:
        cloud.start()
        yield cloud
    finally:
        cloud.kill_everything()
        fabric = NetnsFabric(home)

        async def destroy() -> None:
            for host in await fabric.list_hosts():
                await fabric.destroy(host.name)

        asyncio.run(destroy())
        sweep_hosts(hosts)
        _kill_leftovers(home)


def https_get_via(cloud: LocalCloud, host: str, site: str, timeout: float = 5.0) -> tuple[int, bytes]:
    """GET / of ``site`` through the front end on ``host``: SNI and Host are the site's name,
    verified against the cloud CA."""
    ctx = ssl.create_default_context(cafile=str(cloud.ca_file))
    name = f"{site}.{cloud.domain}"
    with (
        socket.create_connection((socket.gethostbyname(host), cloud.ports["https_port"]), timeout) as raw,
        ctx.wrap_socket(raw, server_hostname=name) as tls,
    ):
        tls.sendall(f"GET / HTTP/1.1\r\nHost: {name}\r\nConnection: close\r\n\r\n".encode())
        data = b""
        while chunk := tls.recv(65536):
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    return int(head.split()[1]), body
