"""The ``netns`` fabric: lightweight role hosts on this machine, one Linux network namespace each.

A host ``NAME`` is the namespace ``sc-NAME``, wired by a veth pair to the bridge ``scbr0`` with its own
address on a private subnet (10.213.0.0/24, the bridge is .1), an OpenSSH ``sshd`` of its own inside the
namespace, its name in a managed block of ``/etc/hosts``, and its own directory tree for installs:

    <cloud home>/fabric/netns/state.json       hosts and their addresses
    <cloud home>/fabric/netns/<name>/ssh/      sshd_config, host key, authorized_keys, pid, log
    <cloud home>/fabric/netns/<name>/root/     what the controller installs there (over SSH)

The hosts share this machine's filesystem, but the controller treats them as remote: everything goes
over SSH. There is no default route in a namespace, so a host reaches only the bridge subnet: no
internet, as on a real role host. Needs root. Every step is idempotent, and provisioning a name first
clears whatever a crashed run left of it.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import ipaddress
import os
import shutil
import signal
import ssl
import time
from collections.abc import AsyncIterator
from pathlib import Path, PurePosixPath
from typing import IO, Any

from roles.controller.fabric._etchosts import read_block, update_hosts_file
from roles.controller.fabric._ssh import SshAccess, run_checked
from roles.controller.fabric._wheelhouse import Wheelhouse
from roles.controller.fabric.base import FabricProvider, HostInfo, SshTarget
from roles.controller.fabric.remote import RemoteLauncher
from shared.errors import AlreadyExists, Forbidden, InvalidInput, NotFound, SitecloudError, Unavailable
from shared.files import atomic_write_json, read_json
from shared.logs import get_logger
from shared.names import validate_hostname

__all__ = ["BRIDGE", "SUBNET", "NetnsFabric"]

BRIDGE = "scbr0"
SUBNET = ipaddress.ip_network("10.213.0.0/24")
SSHD = Path("/usr/sbin/sshd")
# One lock for every netns fabric on this machine: they share the bridge, the subnet and /etc/hosts.
_SYSTEM_LOCK = Path("/run/sitecloud-netns.lock")
_STOP_TIMEOUT = 10.0


async def _run(*argv: str, check: bool = True) -> str:
    proc = await asyncio.create_subprocess_exec(
        *argv,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await proc.communicate()
    if check and proc.returncode != 0:
        raise SitecloudError(f"{' '.join(argv)} failed (exit {proc.returncode}): {err.decode().strip()}")
    return out.decode()


def _pid_alive(pid: int) -> bool:
    """Whether ``pid`` runs; a zombie (sshd's parent is whatever reaps orphans here) does not."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def _namespace(name: str) -> str:
    return f"sc-{name}"


def _netns_exists(name: str) -> bool:
    return Path(f"/run/netns/{_namespace(name)}").exists()


def _pids_in(ns: str) -> list[int]:
    """The processes in network namespace ``ns``.

    Read from /proc here rather than with `ip netns pids`: that one fails as a whole when a process
    ends while it scans (likely while we are killing them), and an empty answer then would let the
    namespace be deleted under processes that live on.
    """
    try:
        target = os.stat(f"/run/netns/{ns}")
    except FileNotFoundError:
        return []
    found = []
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            st = os.stat(f"/proc/{entry.name}/ns/net")
        except OSError:
            continue  # ended meanwhile, or a kernel thread
        if (st.st_dev, st.st_ino) == (target.st_dev, target.st_ino):
            found.append(int(entry.name))
    return found


def _sshd_of(ssh: Path) -> int | None:
    """The host's sshd, by the pid file in its ``ssh`` folder (None: gone, or the number is another's)."""
    try:
        pid = int((ssh / "sshd.pid").read_text())
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except (OSError, ValueError):
        return None
    return pid if os.fsencode(ssh) in cmdline else None


def _link_exists(link: str) -> bool:
    return Path(f"/sys/class/net/{link}").exists()


def _bridge_unused() -> bool:
    brif = Path(f"/sys/class/net/{BRIDGE}/brif")
    return brif.exists() and not any(brif.iterdir())


def _lock_system() -> IO[str]:
    """Hold the machine-wide netns lock until the returned file is closed."""
    lock = _SYSTEM_LOCK.open("a")
    fcntl.flock(lock, fcntl.LOCK_EX)
    return lock


def _veth(address: str) -> str:
    # Interface names are at most 15 bytes: name the host side by the address's last octet.
    return f"scv{ipaddress.ip_address(address).packed[-1]}"


class NetnsFabric(FabricProvider):
    name = "netns"

    def __init__(
        self,
        cloud_home: Path,
        *,
        wheelhouse: Wheelhouse | None = None,
        client_ssl: ssl.SSLContext | None = None,
        hosts_file: Path = Path("/etc/hosts"),
    ) -> None:
        self.dir = cloud_home / "fabric" / "netns"
        self.state_file = self.dir / "state.json"
        self.hosts_file = hosts_file
        self.access = SshAccess.for_cloud(cloud_home)
        self.wheelhouse = wheelhouse or Wheelhouse(cloud_home / "wheelhouse")
        self._client_ssl = client_ssl
        self._lock = asyncio.Lock()
        self._launchers: dict[str, RemoteLauncher] = {}
        self._log = get_logger("controller", fabric="netns")

    @property
    def gateway(self) -> str:
        """The bridge's address: where the hosts reach this machine (e.g. the controller's API)."""
        return str(SUBNET.network_address + 1)

    def host_dir(self, name: str) -> Path:
        return self.dir / name

    def host_root(self, name: str) -> Path:
        """The host's own directory tree, where installs go."""
        return self.host_dir(name) / "root"

    # -- state ------------------------------------------------------------------------------------

    def _state(self) -> dict[str, dict[str, Any]]:
        if not self.state_file.exists():
            return {}
        hosts: dict[str, dict[str, Any]] = read_json(self.state_file).get("hosts", {})
        return hosts

    def _save(self, hosts: dict[str, dict[str, Any]]) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        os.chmod(self.dir, 0o700)
        atomic_write_json(self.state_file, {"hosts": hosts}, mode=0o600)

    @contextlib.asynccontextmanager
    async def _locked(self) -> AsyncIterator[None]:
        async with self._lock:
            lock = await asyncio.to_thread(_lock_system)
            try:
                yield
            finally:
                lock.close()

    # -- the interface ----------------------------------------------------------------------------

    async def list_hosts(self) -> list[HostInfo]:
        return [HostInfo(name, self.name, h["address"]) for name, h in sorted(self._state().items())]

    async def provision(self, name: str) -> HostInfo:
        name = self._check_name(name)
        if os.geteuid() != 0:
            raise Forbidden("the netns fabric needs root (network namespaces, a bridge, /etc/hosts)")
        if not await asyncio.to_thread(SSHD.exists):
            raise InvalidInput(
                f"the netns fabric needs OpenSSH's {SSHD}", hint="apt-get install openssh-server"
            )
        async with self._locked():
            hosts = self._state()
            if name in hosts:
                if hosts[name].get("state") == "up" and await self._up(name, hosts[name]["address"]):
                    return HostInfo(name, self.name, hosts[name]["address"])
                # Ours, but half made or broken (a crash, a reboot): clear it and make it again.
                await self._teardown(name, hosts.pop(name)["address"])
                self._save(hosts)
            elif self._taken(name):
                raise AlreadyExists(
                    f"{name} is already a netns host on this machine, made by another cloud home",
                    hint="choose another name, or delete it from the cloud that made it",
                )
            address = self._allocate(hosts)
            # Recorded before anything is made, so whatever a crash leaves behind is known to be ours.
            hosts[name] = {"address": address, "state": "provisioning"}
            self._save(hosts)
            try:
                await self._make(name, address)
            except BaseException:
                await self._teardown(name, address)
                hosts.pop(name, None)
                self._save(hosts)
                raise
            hosts[name]["state"] = "up"
            self._save(hosts)
        # Outside the lock: only this host is involved, and sshd may take a moment to listen.
        try:
            await self._reach(name)
        except BaseException:
            await self.destroy(name)
            raise
        self._log.info("host %s is up at %s", name, address)
        return HostInfo(name, self.name, address)

    async def destroy(self, name: str) -> None:
        name = self._check_name(name)
        async with self._locked():
            hosts = self._state()
            if name in hosts:
                # Only hosts this cloud made: another home's host of the same name is not ours to take.
                await self._teardown(name, hosts.pop(name)["address"])
                self._save(hosts)
        self._launchers.pop(name, None)

    def ssh_target(self, host: str) -> SshTarget:
        if host not in self._state():
            raise NotFound(
                f"host {host!r} is not in the netns fabric", hint="sitecloud host create NAME --fabric netns"
            )
        return SshTarget(address=host, root=PurePosixPath(self.host_root(host)), supervisor="hostagent")

    def launcher(self, host: str) -> RemoteLauncher:
        if host not in self._launchers:
            self._launchers[host] = RemoteLauncher(
                host, self.ssh_target(host), self.access, self.wheelhouse, client_ssl=self._client_ssl
            )
        return self._launchers[host]

    # -- making a host ----------------------------------------------------------------------------

    @staticmethod
    def _check_name(name: str) -> str:
        name = validate_hostname(name)
        if len(name) > 63:
            raise InvalidInput(f"netns host name {name!r} is longer than 63 characters")
        return name

    def _block(self) -> dict[str, str]:
        return read_block(self.hosts_file.read_text()) if self.hosts_file.exists() else {}

    def _taken(self, name: str) -> bool:
        return name in self._block() or _netns_exists(name)

    def _allocate(self, hosts: dict[str, dict[str, Any]]) -> str:
        used = {h["address"] for h in hosts.values()} | set(self._block().values())
        for address in list(SUBNET.hosts())[1:]:
            # A veth by that address's name may belong to another cloud's half-made host.
            if str(address) not in used and not _link_exists(_veth(str(address))):
                return str(address)
        raise AlreadyExists(f"no free address left in {SUBNET} for another netns host")

    async def _make(self, name: str, address: str) -> None:
        ns, veth = _namespace(name), _veth(address)
        prefix = SUBNET.prefixlen
        await self._ensure_bridge()
        await _run("ip", "netns", "add", ns)
        await _run("ip", "link", "add", veth, "type", "veth", "peer", "name", f"{veth}p", "netns", ns)
        await _run("ip", "link", "set", veth, "master", BRIDGE, "up")
        await _run("ip", "-n", ns, "link", "set", f"{veth}p", "name", "eth0")
        await _run("ip", "-n", ns, "addr", "add", f"{address}/{prefix}", "dev", "eth0")
        await _run("ip", "-n", ns, "link", "set", "eth0", "up")
        await _run("ip", "-n", ns, "link", "set", "lo", "up")
        await self._start_sshd(name, address)
        await asyncio.to_thread(update_hosts_file, self.hosts_file, add={name: address})

    async def _ensure_bridge(self) -> None:
        if not _link_exists(BRIDGE):
            await _run("ip", "link", "add", BRIDGE, "type", "bridge")
        await _run("ip", "addr", "replace", f"{self.gateway}/{SUBNET.prefixlen}", "dev", BRIDGE)
        await _run("ip", "link", "set", BRIDGE, "up")

    async def _start_sshd(self, name: str, address: str) -> None:
        ssh = self.host_dir(name) / "ssh"
        if any(c.isspace() or c in "\"'#" for c in str(ssh)):
            raise InvalidInput(f"the cloud home path {self.dir} cannot hold spaces or quotes (sshd_config)")
        ssh.mkdir(parents=True, exist_ok=True)
        os.chmod(self.host_dir(name), 0o700)
        self.host_root(name).mkdir(exist_ok=True)
        host_key = ssh / "ssh_host_ed25519_key"
        await _run(
            "ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", f"sitecloud-{name}", "-f", str(host_key)
        )
        (ssh / "authorized_keys").write_text(self.access.ensure_key() + "\n")
        os.chmod(ssh / "authorized_keys", 0o600)
        config = ssh / "sshd_config"
        config.write_text(
            f"""# sitecloud netns host {name}; written by the controller
ListenAddress {address}:22
HostKey {host_key}
PidFile {ssh / "sshd.pid"}
AuthorizedKeysFile {ssh / "authorized_keys"}
# The key file sits in the cloud home, whose parents (e.g. /tmp) sshd's owner checks would refuse.
StrictModes no
PermitRootLogin prohibit-password
PubkeyAuthentication yes
PasswordAuthentication no
KbdInteractiveAuthentication no
UsePAM no
UseDNS no
X11Forwarding no
AllowTcpForwarding no
AllowAgentForwarding no
PrintMotd no
MaxStartups 64:30:128
MaxSessions 32
Subsystem sftp internal-sftp
"""
        )
        os.chmod(config, 0o600)
        os.makedirs("/run/sshd", mode=0o755, exist_ok=True)  # sshd's privilege separation directory
        log = ssh / "sshd.log"
        # sshd detaches itself once it is set up; the namespace is all that ties it to the host.
        # nsenter, not `ip netns exec`: that remounts /sys for the namespace, which hides the cgroup
        # hierarchies a worker holds its apps in (a real host has them).
        await _run(
            "nsenter", f"--net=/run/netns/{_namespace(name)}", str(SSHD), "-f", str(config), "-E", str(log)
        )
        public = (ssh / "ssh_host_ed25519_key.pub").read_text().split()
        # We made this host's key ourselves: pin it now, so not even the first contact is taken on trust.
        await self.access.pin(name, f"{public[0]} {public[1]}")

    async def _reach(self, name: str, timeout: float = 15.0) -> None:
        deadline = time.monotonic() + timeout
        while True:
            try:
                conn = await self.access.connect(self.ssh_target(name))
                try:
                    await run_checked(conn, "true", what="checking the login", timeout=10)
                finally:
                    conn.close()
                    await conn.wait_closed()
                return
            except Unavailable:
                if time.monotonic() >= deadline:
                    raise
                await asyncio.sleep(0.05)

    async def _up(self, name: str, address: str) -> bool:
        """Whether the host's namespace is there and its sshd answers."""
        if not _netns_exists(name):
            return False
        try:
            pid = int((self.host_dir(name) / "ssh" / "sshd.pid").read_text())
        except (OSError, ValueError):
            return False
        if not _pid_alive(pid):
            return False
        try:
            _, writer = await asyncio.wait_for(asyncio.open_connection(address, 22), 2)
        except (OSError, TimeoutError):
            return False
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()
        return True

    # -- taking a host away -----------------------------------------------------------------------

    async def _teardown(self, name: str, address: str) -> None:
        """Remove everything of host ``name`` that exists; fine to call for a host half made or gone."""
        ns = _namespace(name)
        if _netns_exists(name):
            await self._kill_all(ns)
            await _run("ip", "netns", "del", ns, check=False)
        # Also by its pid file: a namespace whose /run/netns entry went stale (another sweep took it)
        # finds none of its processes above, and its sshd would outlive the host.
        await self._kill_sshd(name)
        if _link_exists(_veth(address)):
            await _run("ip", "link", "del", _veth(address), check=False)
        if name in self._block():
            await asyncio.to_thread(update_hosts_file, self.hosts_file, remove={name})
        await self.access.forget(name)
        await asyncio.to_thread(shutil.rmtree, self.host_dir(name), True)
        await self._drop_bridge_if_unused()

    async def _kill_sshd(self, name: str) -> None:
        pid = _sshd_of(self.host_dir(name) / "ssh")
        if pid is None:
            return
        deadline = time.monotonic() + _STOP_TIMEOUT
        sig = signal.SIGTERM
        while _pid_alive(pid):
            if time.monotonic() >= deadline:
                sig = signal.SIGKILL
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)
            await asyncio.sleep(0.05)

    async def _kill_all(self, ns: str) -> None:
        """SIGTERM every process in the namespace (roles drain), SIGKILL what is left after a bound."""
        deadline = time.monotonic() + _STOP_TIMEOUT
        sig = signal.SIGTERM
        while True:
            pids = await asyncio.to_thread(_pids_in, ns)
            if not pids:
                return
            if time.monotonic() >= deadline:
                sig = signal.SIGKILL
            for pid in pids:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, sig)
            await asyncio.sleep(0.1)

    async def _drop_bridge_if_unused(self) -> None:
        if _bridge_unused():
            await _run("ip", "link", "del", BRIDGE, check=False)
