"""The sandbox every app process runs in when the worker runs as root: bubblewrap and setpriv.

``bwrap`` (as root, no user namespace) gives the app namespaces of its own:

- network: its own loopback and nothing else; no host port, role or other site is reachable. The
  worker reaches it only through the unix listener it passes as fd 0;
- mount: a fresh root with the system read-only (``/usr``, ``/etc``, the lib and bin links, the
  Python the app runs under and our app server), the site's content read-only but for the version the
  app runs, which it may write through an overlay onto its volume (``_files.py``), its home and TMPDIR
  writable (a size-capped volume, see ``_volume.py``), private size-capped ``/tmp`` and ``/dev/shm``
  tmpfs (their pages count against the site's memory cgroup), its own ``/proc`` and a minimal ``/dev``;
- PID (plus IPC and UTS): bwrap's own init is pid 1 and reaps orphans; when the app's first process
  exits the kernel kills every process left in the namespace, double-forked and setsid or not.
  ``--die-with-parent`` ends the sandbox with the worker.

Paths stay what they are on the host (content root, HOME, TMPDIR), so the environment and php.ini
need no rewriting. Inside, util-linux ``setpriv`` drops to the site's uid with no groups, no
capabilities and no_new_privs before the app. ``--block-fd`` holds the sandbox before anything of
the app runs, so the worker puts it in its cgroup and sets its rlimits first (no fork escapes them).
Its cgroup namespace is rooted at the worker's own group (bwrap is moved only after its clone), so the
app sees its group's path below the worker's, always the same one.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import itertools
import json
import os
import platform
import shutil
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from roles.worker.apps._seccomp import app_filter
from shared.logs import ContextLogger

__all__ = ["EGRESS_MODES", "EGRESS_UDP_FLOWS", "Sandbox", "SandboxMounts", "egress_nofile", "read_info"]

_TOOLS = "/usr/bin:/bin:/usr/sbin:/sbin"
# Read-only as they are; the /bin, /sbin and /lib* links of a merged /usr are made as links.
_SYSTEM = ("/usr", "/etc", "/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32")
EGRESS_MODES = ("off", "slirp4netns")
# Files of a PID namespace's new procfs that are still the whole host's, shown empty: key-users
# lists every uid holding kernel keys, so other sites' uids and the host's users, with their counts
# (the keyring calls themselves are refused by seccomp).
_HIDDEN_PROC = ("/proc/key-users",)
# slirp4netns's DNS forwarder, as ``--configure`` sets the sandbox's network up.
SLIRP_DNS = "10.0.2.3"
INFO_TIMEOUT = 5.0
# slirp4netns holds a host socket for each connection of its app and for each UDP source port the
# app sends from, the UDP ones on a host ephemeral port each (the host has about 28,000), kept for
# libslirp's SO_EXPIRE after the flow's last packet, or SO_EXPIREFAST after a DNS answer.
UDP_FLOW_SECONDS = 240
DNS_FLOW_SECONDS = 10
# UDP flows one app may hold at once: about 25 name lookups a second (a flow each) beside a few
# long-lived ones (statsd, syslog); a worker's 50 small apps take at most 12,800 host ports.
EGRESS_UDP_FLOWS = 256
# slirp4netns's descriptors beyond the app's own limit (as many connections as the app can hold)
# and its UDP flows: its own dozen, and connections the app closed that slirp still ends.
EGRESS_SPARE_FDS = 32
# Joins the app's cgroup and takes the descriptor cap before exec: nothing of slirp4netns runs, or
# is charged (cgroup v1 leaves charges where they were made), outside them.
_EGRESS_WRAPPER = (
    'ulimit -n "$1" && shift && while [ "$1" != -- ]; do echo $$ >"$1" || exit 1; shift; done '
    '&& shift && exec "$@"'
)


@dataclass(frozen=True, slots=True)
class SandboxMounts:
    """What one app sees besides the system: each path the same inside as on the host."""

    site_dir: str  # the site's content (every version and ``current``), read-only
    cwd: str
    home: tuple[str, str]  # (host source, path inside)
    tmp: tuple[str, str]
    # The version at ``cwd`` as an overlay the app may write (``_files.py``); "": read-only as the rest.
    files: str = ""
    read_only: tuple[str, ...] = ()  # e.g. the site's package directory
    # (host source, path inside) bound read-only over what the cwd shows there: a version's own
    # node_modules/ hidden under the packages installed for it.
    masks: tuple[tuple[str, str], ...] = ()
    tmpfs_bytes: int = 64 * 1024 * 1024  # each of /tmp and /dev/shm
    # A devpts instance with a cap of its own (``_pts.py``) over bwrap's; "": bwrap's, uncapped.
    pts: str = ""


@dataclass(frozen=True, slots=True)
class Sandbox:
    bwrap: str
    setpriv: str
    # Read-only paths every app needs beyond the system: its Python's prefixes, our app server.
    runtime_paths: tuple[str, ...]
    slirp4netns: str | None  # outbound internet through a user-mode NAT; None: no egress at all
    nsenter: str = ""
    nft: str = ""
    # nft rules loaded into each sandbox's network namespace before its egress comes up.
    egress_rules: str = ""
    # With egress: a resolv.conf naming slirp's DNS forwarder, bound over the host's, whose
    # resolver (a private or loopback address) the egress rules refuse.
    resolv_conf: str = ""
    # The seccomp program bwrap loads for the app (``_seccomp.py``); empty: none on this machine.
    seccomp: bytes = b""
    # An empty read-only file bound over the host-wide files of the sandbox's /proc (_HIDDEN_PROC);
    # "": they show.
    empty_file: str = ""

    @classmethod
    def detect(
        cls,
        log: ContextLogger,
        *,
        python: str,
        appserver: str,
        egress: str,
        enabled: bool = True,
        state_dir: Path | None = None,
    ) -> Sandbox | None:
        """The sandbox this worker can build; None (and one log line saying why) when it cannot."""
        if not enabled:
            log.warning("app sandbox: off in the worker's settings; apps share the host's network and /tmp")
            return None
        if os.geteuid() != 0:
            log.warning("app sandbox: the worker is not root; apps run unsandboxed as the worker's user")
            return None
        bwrap = shutil.which("bwrap", path=_TOOLS)
        setpriv = shutil.which("setpriv", path=_TOOLS)
        if bwrap is None or setpriv is None:
            log.warning(
                "app sandbox: %s missing (apt-get install bubblewrap util-linux); apps run with a uid "
                "and rlimits only",
                " and ".join(n for n, p in (("bwrap", bwrap), ("setpriv", setpriv)) if p is None),
            )
            return None
        slirp = nsenter = nft = None
        if egress == "slirp4netns":
            slirp = shutil.which("slirp4netns", path=_TOOLS)
            nsenter = shutil.which("nsenter", path=_TOOLS)
            nft = shutil.which("nft", path=_TOOLS)
            if slirp is None or nsenter is None or nft is None:
                log.warning(
                    "app sandbox: egress is slirp4netns but slirp4netns, nsenter or nft is missing "
                    "(apt-get install slirp4netns nftables); apps get no outbound network"
                )
                slirp = None
        seccomp = app_filter()
        log.info(
            "app sandbox: bwrap network, mount and pid namespaces; outbound internet %s; %s",
            "through slirp4netns (public addresses only)" if slirp else "off (app_egress)",
            "no user namespaces, AIO, io_uring, keyrings, perf events, userfaultfd or bpf (seccomp)"
            if seccomp
            else f"user namespaces and every system call allowed (no seccomp filter for {platform.machine()})",
        )
        return cls(
            bwrap,
            setpriv,
            _runtime_paths(python, appserver),
            slirp,
            nsenter or "",
            nft or "",
            egress_rules(_host_addresses(), _host_subnets()) if slirp else "",
            _write_resolv_conf(state_dir) if slirp and state_dir is not None else "",
            seccomp or b"",
            _write_empty_file(state_dir) if state_dir is not None else "",
        )

    def argv(
        self, mounts: SandboxMounts, *, uid: int, gid: int, block_fd: int, info_fd: int, seccomp_fd: int = -1
    ) -> list[str]:
        """bwrap and setpriv, to go before the app's command; ``seccomp_fd`` holds :attr:`seccomp`."""
        size = str(mounts.tmpfs_bytes)
        argv = [self.bwrap, "--unshare-net", "--unshare-pid", "--unshare-ipc", "--unshare-uts"]
        argv += ["--unshare-cgroup-try", "--die-with-parent", "--new-session", "--hostname", "app"]
        # /tmp first: content or homes may live under the host's /tmp, and binds go on top of it.
        argv += ["--perms", "1777", "--size", size, "--tmpfs", "/tmp"]  # noqa: S108 - the sandbox's own
        for path in _SYSTEM:
            if os.path.islink(path):
                argv += ["--symlink", os.readlink(path), path]
            elif os.path.isdir(path):
                argv += ["--ro-bind", path, path]
        if self.resolv_conf:
            argv += _resolv_conf_bind(self.resolv_conf)
        argv += ["--proc", "/proc"]
        if self.empty_file:
            for path in _HIDDEN_PROC:
                if os.path.exists(path):
                    argv += ["--ro-bind", self.empty_file, path]
        argv += ["--dev", "/dev"]
        if mounts.pts:
            argv += ["--dev-bind", mounts.pts, "/dev/pts"]
        argv += ["--perms", "1777", "--size", size, "--tmpfs", "/dev/shm"]  # noqa: S108 - its own too
        binds = [(p, p, "--ro-bind") for p in self.runtime_paths]
        binds.append((mounts.site_dir, mounts.site_dir, "--ro-bind"))
        if mounts.files:
            binds.append((mounts.files, mounts.cwd, "--bind"))
        binds += [(source, inside, "--ro-bind") for source, inside in mounts.masks]
        binds += [(p, p, "--ro-bind") for p in mounts.read_only]
        binds += [(source, inside, "--bind") for source, inside in (mounts.home, mounts.tmp)]
        made: set[str] = {"/", "/tmp"}  # noqa: S108 - the sandbox's tmpfs, made above
        bound: list[str] = []
        for source, inside, kind in binds:
            # bwrap makes missing parents 0700 (root's): the app could not pass them. Parents
            # inside an earlier bind are that bind's own (and may be read-only).
            for parent in reversed(Path(inside).parents):
                name = str(parent)
                if name not in made and not any(name.startswith(b + "/") or name == b for b in bound):
                    argv += ["--perms", "0755", "--dir", name]
                made.add(name)
            argv += [kind, source, inside]
            bound.append(inside)
        argv += ["--chdir", mounts.cwd, "--block-fd", str(block_fd), "--info-fd", str(info_fd)]
        if seccomp_fd >= 0:
            argv += ["--seccomp", str(seccomp_fd)]
        argv.append("--")
        argv += [
            self.setpriv,
            f"--reuid={uid}",
            f"--regid={gid}",
            "--clear-groups",
            "--no-new-privs",
            "--inh-caps=-all",
            "--bounding-set=-all",
            "--",
        ]
        return argv

    async def start_egress(
        self, child_pid: int, exit_fd: int, *, nofile: int, cgroup_procs: Sequence[str] = ()
    ) -> asyncio.subprocess.Process:
        """Outbound internet for one sandbox: first nft rules in its network namespace (root's: the
        app has no capability to change them) that refuse the host's own addresses, its connected
        subnets and every private, loopback and link-local range, so no role port, no other host of
        the cloud and no neighbour of this host is reachable; then slirp4netns, a NAT in user space,
        with ``--disable-host-loopback``. The caller starts this beside the app: the cold start never
        waits for it. slirp4netns ends when ``exit_fd``'s other end closes (the app's exit, or the
        worker's).

        slirp4netns runs as root in the host's network namespace, so it joins the app's cgroup
        (``cgroup_procs``: its CPU, memory and pid count as the app's) and may hold at most
        ``nofile`` descriptors, which bounds the host sockets, and ports, one app takes."""
        assert self.slirp4netns is not None
        rules = await asyncio.create_subprocess_exec(
            self.nsenter,
            f"--net=/proc/{child_pid}/ns/net",
            self.nft,
            "-f",
            "-",
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.PIPE,
        )
        try:
            _, err = await rules.communicate(self.egress_rules.encode())
        except (BrokenPipeError, ConnectionResetError, RuntimeError) as exc:
            # nft already gone (the app's namespace vanished with an app that ended at once); uvloop
            # says so with a RuntimeError about a closed handle.
            await rules.wait()
            raise OSError(f"nft ended before it took the egress rules ({exc})") from None
        if rules.returncode != 0:
            raise OSError(f"nft refused the egress rules: {err.decode(errors='replace').strip()[:200]}")
        # --configure brings the namespace's lo up, which gives it 127.0.0.1; bwrap adds that address
        # itself, exclusively, after its info fd has named pid 1, and dies if it is there already.
        await _built(child_pid)
        return await asyncio.create_subprocess_exec(
            "/bin/sh",
            "-c",
            _EGRESS_WRAPPER,
            "sh",
            str(nofile),
            *cgroup_procs,
            "--",
            self.slirp4netns,
            "--configure",
            "--mtu=65520",
            "--disable-host-loopback",
            "--enable-sandbox",
            f"--exit-fd={exit_fd}",
            str(child_pid),
            "tap0",
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.DEVNULL,
            pass_fds=(exit_fd,),
        )


async def _built(init_pid: int, timeout: float = INFO_TIMEOUT) -> None:
    """Until bwrap has set up the network of the sandbox whose pid 1 is ``init_pid``: pid 1 forks
    nothing (bwrap's setup helper, the app) before. OSError if the sandbox ends first or takes
    longer than ``timeout``."""
    deadline = time.monotonic() + timeout
    delay = 0.001
    while not _has_children(init_pid):
        if time.monotonic() > deadline:
            raise OSError(f"the sandbox was not built within {timeout:g} s")
        await asyncio.sleep(delay)
        delay = min(delay * 2, 0.05)


def _has_children(pid: int) -> bool:
    """Whether ``pid`` has forked (a read of procfs, which never waits); OSError once it is gone."""
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            return bool(f.read().strip())
    except OSError:
        raise OSError("the sandbox ended before it was built") from None


def egress_nofile(app_nofile: int) -> int:
    """slirp4netns's descriptor limit for an app that may open ``app_nofile`` itself."""
    return app_nofile + EGRESS_UDP_FLOWS + EGRESS_SPARE_FDS


# Never reachable from a sandbox with egress: this host, private networks (other role hosts),
# loopback, link-local (cloud metadata), shared and multicast ranges. slirp's DNS (10.0.2.3) is let
# through for name lookups.
_BLOCKED = (
    "0.0.0.0/8", "10.0.0.0/8", "100.64.0.0/10", "127.0.0.0/8", "169.254.0.0/16", "172.16.0.0/12",
    "192.168.0.0/16", "224.0.0.0/3",
)  # fmt: skip


def egress_rules(host_addresses: Sequence[str], host_subnets: Sequence[str] = ()) -> str:
    """The nft rules of a sandbox with egress: besides the ranges above, this host's own addresses and
    the subnets it is directly connected to (its neighbours there, other machines of the cloud or
    not, are reached without a router, so no firewall of the network's stands between them and an
    app)."""
    nets = [ipaddress.ip_network(n) for n in (*_BLOCKED, *host_addresses, *host_subnets)]
    # One list without overlaps: nft refuses an anonymous set whose intervals overlap.
    blocked = ", ".join(str(n) for n in ipaddress.collapse_addresses(n for n in nets if n.version == 4))
    # udp_flows mirrors slirp's UDP table (keyed by the app's source port, kept as long as slirp
    # keeps each), after the chain that refuses private ranges: a new flow past the cap is refused
    # before slirp opens a host socket for it.
    return (
        "table inet sitecloud {\n"
        "  set udp_flows {\n"
        "    type inet_service; flags dynamic, timeout;\n"
        f"    size {EGRESS_UDP_FLOWS}; timeout {UDP_FLOW_SECONDS}s;\n"
        "  }\n"
        "  chain out {\n"
        "    type filter hook output priority 0; policy accept;\n"
        '    oifname "lo" accept\n'
        f"    ip daddr {SLIRP_DNS} meta l4proto {{ tcp, udp }} th dport 53 accept\n"
        f"    ip daddr {{ {blocked} }} reject\n"
        "    meta nfproto ipv6 reject\n"
        "  }\n"
        "  chain udp_out {\n"
        "    type filter hook output priority 10; policy accept;\n"
        '    oifname "lo" accept\n'
        "    update @udp_flows { udp sport } accept\n"
        "    meta l4proto udp reject\n"
        "  }\n"
        "  chain udp_in {\n"
        "    type filter hook input priority 0; policy accept;\n"
        f"    udp sport 53 udp dport @udp_flows update @udp_flows {{ udp dport timeout {DNS_FLOW_SECONDS}s }} accept\n"
        "    udp dport @udp_flows update @udp_flows { udp dport }\n"
        "  }\n"
        "}\n"
    )


def _write_state_file(state_dir: Path, name: str, text: str, mode: int) -> str:
    """A file of the worker's own that the sandbox binds in (read-only to apps)."""
    path = state_dir / name
    state_dir.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    path.chmod(mode)
    return str(path)


def _write_empty_file(state_dir: Path) -> str:
    return _write_state_file(state_dir, "sandbox-empty", "", 0o444)


def _write_resolv_conf(state_dir: Path) -> str:
    return _write_state_file(state_dir, "sandbox-resolv.conf", f"nameserver {SLIRP_DNS}\n", 0o644)


def _resolv_conf_bind(source: str) -> list[str]:
    """bwrap arguments that put ``source`` where the system's resolver reads /etc/resolv.conf."""
    # Often a link (systemd-resolved's stub, or a file under /run); its target is then not in the
    # sandbox, and the bind goes there, with the folders on the way made.
    target = os.path.realpath("/etc/resolv.conf")
    if target == "/etc/resolv.conf" or target.startswith("/etc/"):
        return ["--ro-bind", source, target] if os.path.exists(target) else []
    argv: list[str] = []
    for parent in reversed(Path(target).parents):
        if str(parent) != "/":
            argv += ["--perms", "0755", "--dir", str(parent)]
    return [*argv, "--ro-bind", source, target]


def _host_addresses() -> list[str]:
    """This host's own IPv4 addresses (the LOCAL /32 entries of the kernel's routing trie)."""
    found: list[str] = []
    try:
        with open("/proc/net/fib_trie") as f:
            lines = f.read().splitlines()
    except OSError:
        return found
    for prev, line in itertools.pairwise(lines):
        if line.strip() == "/32 host LOCAL":
            found.append(prev.split()[-1])
    return sorted(set(found))


# <linux/route.h>
_RTF_UP, _RTF_GATEWAY = 0x1, 0x2
# A connected route wider than this is not taken for a neighbourhood (a default route through a
# point-to-point device has no gateway either): blocking it would block the internet.
_WIDEST_SUBNET = 8


def _host_subnets(table: str = "/proc/net/route") -> list[str]:
    """The IPv4 subnets this host is directly connected to: the main table's routes with no gateway
    (``192.0.2.0/24 dev eth0 scope link``), but loopback's and any as wide as the internet."""
    found: list[str] = []
    try:
        with open(table) as f:
            lines = f.read().splitlines()[1:]
    except OSError:
        return found
    for line in lines:
        fields = line.split()
        if len(fields) < 8 or fields[0] == "lo":
            continue
        try:
            dest, gateway, flags, mask = (int(fields[i], 16) for i in (1, 2, 3, 7))
        except ValueError:
            continue
        if gateway or flags & _RTF_GATEWAY or not flags & _RTF_UP:
            continue
        # The kernel prints each address as the number its bytes (network order) make in memory.
        address = ipaddress.IPv4Address(dest.to_bytes(4, sys.byteorder))
        net = ipaddress.IPv4Network((address, mask.bit_count()), strict=False)
        if net.prefixlen >= _WIDEST_SUBNET:
            found.append(str(net))
    return sorted(set(found))


def _runtime_paths(python: str, appserver: str) -> tuple[str, ...]:
    """The app's Python installation (the prefixes of the venv it may be, and of the Python that
    venv is made from) and our app server: read-only, unless /usr already holds them."""
    paths: list[str] = [appserver]
    if os.path.realpath(python) == os.path.realpath(sys.executable):
        paths += [sys.prefix, sys.base_prefix, sys.exec_prefix, sys.base_exec_prefix]
    else:
        # Another interpreter: its installation is two levels above the binary (<prefix>/bin/python).
        paths += [str(Path(python).parent.parent), str(Path(os.path.realpath(python)).parent.parent)]
    keep: list[str] = []
    for p in dict.fromkeys(os.path.realpath(p) for p in paths):
        if p == "/" or not os.path.isdir(p) or any(p == s or p.startswith(s + "/") for s in ("/usr", "/etc")):
            continue
        keep.append(p)
    return tuple(keep)


async def read_info(fd: int, timeout: float = INFO_TIMEOUT) -> int:
    """The host pid of the sandbox's pid 1, from bwrap's ``--info-fd`` JSON (ValueError: none came)."""
    loop = asyncio.get_running_loop()
    done: asyncio.Future[None] = loop.create_future()
    data = bytearray()

    def readable() -> None:
        try:
            chunk = os.read(fd, 4096)
        except BlockingIOError:
            return
        except OSError:
            chunk = b""
        data.extend(chunk)
        if (not chunk or data.rstrip().endswith(b"}")) and not done.done():
            done.set_result(None)

    os.set_blocking(fd, False)
    loop.add_reader(fd, readable)
    try:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(done, timeout)
    finally:
        loop.remove_reader(fd)
    try:
        pid = json.loads(bytes(data))["child-pid"]
    except (ValueError, KeyError, TypeError):
        raise ValueError("the sandbox did not start (its log says why)") from None
    if not isinstance(pid, int):
        raise ValueError("the sandbox reported no pid")
    return pid
