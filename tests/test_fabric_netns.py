"""The netns fabric end to end: namespace hosts with their own sshd, reached by name over SSH, a real
role installed on one from the wheelhouse and supervised there, and nothing left behind afterwards.

Needs root, iproute2 and OpenSSH's sshd (CI runs as root with openssh-server installed).
"""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from roles.controller.fabric._etchosts import read_block, update_hosts_file
from roles.controller.fabric._ssh import run_checked
from roles.controller.fabric._wheelhouse import Wheelhouse
from roles.controller.fabric.base import ProgressStep
from roles.controller.fabric.netns import BRIDGE, NetnsFabric
from roles.controller.fabric.ssh import SshFabric
from roles.fileserver.config import FileserverConfig
from shared.errors import Forbidden
from tests.support import CloudPKI, call, wait_until

pytestmark = [
    pytest.mark.root,
    pytest.mark.skipif(
        os.geteuid() != 0, reason="the netns fabric needs root (namespaces, bridge, /etc/hosts)"
    ),
    pytest.mark.skipif(shutil.which("ip") is None, reason="needs iproute2's ip"),
    pytest.mark.skipif(not Path("/usr/sbin/sshd").exists(), reason="needs OpenSSH's sshd (openssh-server)"),
]

HOSTS = ("fabt1", "fabt2", "fabt3", "fabt4")
HOSTS_FILE = Path("/etc/hosts")
# Keyed by code hash inside, so it stays right across runs while the code is unchanged.
WHEELHOUSE_CACHE = Path("/tmp/sitecloud-test-wheelhouse")
PORT = 7443


def _namespaces() -> list[str]:
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=True).stdout
    return [line.split()[0] for line in out.splitlines() if line.strip()]


def _links() -> str:
    return subprocess.run(["ip", "-o", "link"], capture_output=True, text=True, check=True).stdout


def _sweep() -> None:
    """Remove what an earlier crashed run of these tests may have left (their names only)."""
    for name in HOSTS:
        ns = f"sc-{name}"
        if ns in _namespaces():
            pids = subprocess.run(["ip", "netns", "pids", ns], capture_output=True, text=True).stdout.split()
            for pid in pids:
                os.kill(int(pid), signal.SIGKILL)
            subprocess.run(["ip", "netns", "del", ns], check=False)
    if set(HOSTS) & set(read_block(HOSTS_FILE.read_text())):
        update_hosts_file(HOSTS_FILE, remove=set(HOSTS))


def _processes_under(path: Path) -> list[int]:
    found = []
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                if str(path).encode() in (proc / "cmdline").read_bytes():
                    found.append(int(proc.name))
            except OSError:
                continue
    return found


@pytest.fixture(scope="session")
def wheelhouse() -> Wheelhouse:
    house = Wheelhouse(WHEELHOUSE_CACHE)
    started = time.monotonic()
    digest, _ = asyncio.run(house.ensure())
    print(f"\nwheelhouse {digest} ready in {time.monotonic() - started:.1f}s")
    return house


@pytest.fixture
def clean_machine() -> Iterator[None]:
    _sweep()
    yield
    _sweep()


@pytest.fixture
async def fabric(
    tmp_path: Path, pki: CloudPKI, wheelhouse: Wheelhouse, clean_machine: None
) -> AsyncIterator[NetnsFabric]:
    fab = NetnsFabric(tmp_path / "cloud", wheelhouse=wheelhouse, client_ssl=pki.client_ssl("controller"))
    try:
        yield fab
    finally:
        for host in await fab.list_hosts():
            await fab.destroy(host.name)


async def test_hosts_by_name_with_a_role_installed_and_supervised(
    fabric: NetnsFabric, pki: CloudPKI, wheelhouse: Wheelhouse
) -> None:
    one, two = await fabric.provision("fabt1"), await fabric.provision("fabt2")
    assert one.address != two.address and {h.name for h in await fabric.list_hosts()} == {"fabt1", "fabt2"}
    assert {"sc-fabt1", "sc-fabt2"} <= set(_namespaces())
    # The controller resolves them by name, and SSH by name lands in each host's own namespace.
    for host in (one, two):
        assert socket.gethostbyname(host.name) == host.address
        conn = await fabric.access.connect(fabric.ssh_target(host.name))
        try:
            out = await run_checked(conn, "ip -4 -o addr show dev eth0", what="reading the address")
            routes = await run_checked(conn, "ip route", what="reading routes")
        finally:
            conn.close()
            await conn.wait_closed()
        assert f"inet {host.address}/24" in out
        assert "default" not in routes  # no way out: hosts reach only the bridge subnet
    assert oct(fabric.access.key_file.stat().st_mode & 0o777) == "0o600"

    # Install the fileserver on fabt1 over SSH, from the (warm) wheelhouse, and see it healthy.
    launcher = fabric.launcher("fabt1")
    home = Path(str(launcher.role_home("fileserver")))
    assert home.is_relative_to(fabric.host_root("fabt1"))
    config = FileserverConfig(host="fabt1", home=home, bind=one.address, control_port=PORT)
    cert = pki.ca.issue(
        "fileserver@fabt1", role="fileserver", dns_names=["fabt1"], ip_addresses=[one.address]
    )
    steps: list[ProgressStep] = []
    await wheelhouse.ensure()  # other work in the checkout may have changed the code since the session began
    timings = await launcher.install(config, cert, pki.ca.cert_pem, progress=steps.append)
    print("\ninstall to healthy (warm wheelhouse): " + ", ".join(f"{k} {v:.2f}s" for k, v in timings.items()))
    done = [s.step for s in steps if s.phase == "done"]
    assert done == ["wheelhouse", "connect", "upload", "install", "configure", "start", "healthy"]
    # How long it took is a figure for bench/ and docs/benchmarks.md (printed above), not a pass mark.
    assert launcher.describe("fileserver") == ("running", "")

    ctx = pki.client_ssl("controller")
    status, health = call(f"https://fabt1:{PORT}/v1/health", ctx)
    assert status == 200 and health["role"] == "fileserver" and health["host"] == "fabt1"
    assert oct((home / "tls" / "role.key").stat().st_mode & 0o777) == "0o600"

    # The role process dies: the host's supervisor starts it again.
    before = await launcher.status("fileserver")
    assert before["state"] == "running" and before["role_pid"] == health["pid"]
    conn = await fabric.access.connect(fabric.ssh_target("fabt1"))
    try:
        await run_checked(conn, f"kill -9 {before['role_pid']}", what="killing the role")
    finally:
        conn.close()
        await conn.wait_closed()

    def restarted() -> bool:
        status, body = call(f"https://fabt1:{PORT}/v1/health", ctx, timeout=2)
        return status == 200 and body["pid"] != before["role_pid"]

    await asyncio.to_thread(
        wait_until, restarted, timeout=20, what="the fileserver restarted by the hostagent"
    )
    after = await launcher.status("fileserver")
    assert after["restarts"] == 1 and after["role_pid"] not in (None, before["role_pid"])

    # Installing again (repair) is fine, and the venv for this code is reused.
    timings = await launcher.install(config, cert, pki.ca.cert_pem)
    print(f"repair (venv already there): {timings['total']:.2f}s")

    await launcher.stop("fileserver")
    assert (await launcher.status("fileserver"))["state"] == "stopped"
    assert launcher.describe("fileserver") == ("stopped", "")
    with pytest.raises(OSError):
        call(f"https://fabt1:{PORT}/v1/health", ctx, timeout=2)

    cloud_home = fabric.dir.parent.parent
    await fabric.destroy("fabt1")
    await fabric.destroy("fabt2")
    await fabric.destroy("fabt2")  # again: nothing left to do, no error
    assert await fabric.list_hosts() == []
    assert not {"sc-fabt1", "sc-fabt2"} & set(_namespaces())
    for address in (one.address, two.address):
        assert f" scv{address.rsplit('.', 1)[1]}@" not in _links()
    if not [ns for ns in _namespaces() if ns.startswith("sc-")]:
        assert BRIDGE not in _links()
    assert not {"fabt1", "fabt2"} & set(read_block(HOSTS_FILE.read_text()))
    left = _processes_under(cloud_home)
    assert left == [], [(Path(f"/proc/{pid}/cmdline").read_bytes()[:300]) for pid in left]
    assert not fabric.host_dir("fabt1").exists()


async def test_host_keys_are_pinned_and_a_changed_key_is_refused(
    fabric: NetnsFabric, tmp_path: Path, wheelhouse: Wheelhouse
) -> None:
    await fabric.provision("fabt3")
    # Reached as an existing host by another cloud (with a key the host accepts, as `--ssh-key`):
    # the first contact pins the host key it offers.
    ssh = SshFabric(tmp_path / "other", wheelhouse=wheelhouse)
    info = await ssh.add("fabt3", key_file=fabric.access.key_file)
    assert info.address == (await fabric.list_hosts())[0].address
    pinned = ssh.access.pinned("fabt3")
    host_pub = (fabric.host_dir("fabt3") / "ssh" / "ssh_host_ed25519_key.pub").read_text().split()
    assert pinned == f"{host_pub[0]} {host_pub[1]}"
    assert oct(ssh.access.known_hosts_file.stat().st_mode & 0o777) == "0o600"
    await ssh.add("fabt3", key_file=fabric.access.key_file)  # the same key again: fine

    # The host gets a new key (rebuilt, or someone in the middle): both clouds refuse it.
    key = fabric.host_dir("fabt3") / "ssh" / "ssh_host_ed25519_key"
    key.unlink()
    Path(f"{key}.pub").unlink()
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(key)], check=True)
    sshd_pid = int((fabric.host_dir("fabt3") / "ssh" / "sshd.pid").read_text())
    os.kill(sshd_pid, signal.SIGHUP)  # sshd re-executes itself and loads the new key

    def refused() -> Forbidden:
        try:
            asyncio.run(ssh.add("fabt3", key_file=fabric.access.key_file))
        except Forbidden as err:
            return err
        raise AssertionError("the changed host key was accepted")

    err = await asyncio.to_thread(wait_until, refused, timeout=10, what="the new host key being offered")
    assert "host key of fabt3 changed" in err.message and str(ssh.access.known_hosts_file) in (err.hint or "")
    with pytest.raises(Forbidden):
        await fabric.access.connect(fabric.ssh_target("fabt3"))

    # Re-pinning is deliberate: forget the old key, and the next contact pins the new one.
    await ssh.access.forget("fabt3")
    await ssh.add("fabt3", key_file=fabric.access.key_file)
    assert ssh.access.pinned("fabt3") != pinned
    await ssh.destroy("fabt3")
    assert await ssh.list_hosts() == [] and ssh.access.pinned("fabt3") is None


async def test_provision_is_idempotent_and_repairs_a_broken_host(fabric: NetnsFabric) -> None:
    first = await fabric.provision("fabt4")
    assert await fabric.provision("fabt4") == first  # already up: nothing changes
    # The host's sshd dies (a crash, a reboot): provisioning again clears what is left and remakes it.
    sshd_pid = int((fabric.host_dir("fabt4") / "ssh" / "sshd.pid").read_text())
    os.kill(sshd_pid, signal.SIGKILL)
    wait_until(
        lambda: (
            not Path(f"/proc/{sshd_pid}").exists()
            or "Z" in Path(f"/proc/{sshd_pid}/stat").read_text().rsplit(")", 1)[1][:3]
        ),
        what="sshd gone",
    )
    again = await fabric.provision("fabt4")
    assert again.name == "fabt4" and "sc-fabt4" in _namespaces()
    conn = await fabric.access.connect(fabric.ssh_target("fabt4"))
    conn.close()
    await conn.wait_closed()
    assert list(read_block(HOSTS_FILE.read_text())).count("fabt4") == 1
