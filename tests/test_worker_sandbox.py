"""Hostile apps on a real worker, as root: every app runs in its sandbox (bwrap namespaces, its own
uid through setpriv, size-capped tmpfs, a disk quota volume). Each test makes an app try one escape,
asserts it fails, and asserts that another site on the same worker still answers correctly.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import errno
import fcntl
import os
import platform
import shutil
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from roles.worker._appserver import APPSERVER_PATH
from roles.worker.apps._instance import AppInstance
from roles.worker.apps._isolation import UID_BASE, SiteIdentity
from roles.worker.apps._launch import SiteDirs, plan_launch
from roles.worker.apps._manager import AppManager
from roles.worker.apps._pts import PTYS_PER_APP, ptys_per_app
from roles.worker.apps._sandbox import EGRESS_UDP_FLOWS, Sandbox, SandboxMounts, egress_nofile, egress_rules
from roles.worker.apps._sitelog import SiteLog
from roles.worker.apps._spec import AppLimits
from roles.worker.apps._volume import BlankImages, HomeVolume
from roles.worker.config import WorkerConfig
from shared.logs import get_logger
from tests.support import call, wait_until
from tests.test_worker_apps import AppCloud, running_cloud

ROOT = os.geteuid() == 0
pytestmark = [
    pytest.mark.skipif(not ROOT, reason="the app sandbox needs the worker to run as root"),
    pytest.mark.skipif(
        shutil.which("bwrap") is None or shutil.which("setpriv") is None,
        reason="the app sandbox needs bubblewrap and util-linux setpriv (apt-get install bubblewrap)",
    ),
]

ATTACK_APP = b"""
import os, signal, socket, sys, time

def _connect(target):
    host, _, port = target.rpartition(":")
    try:
        s = socket.create_connection((host, int(port)), timeout=2)
    except OSError as exc:
        return "refused " + type(exc).__name__
    s.settimeout(2)
    try:
        data = s.recv(64)
    except OSError:
        data = b""
    s.close()
    return "connected " + data.decode(errors="replace")

HELD = []

def _fill(path, mb):
    wrote = 0
    chunk = b"x" * (1024 * 1024)
    try:
        with open(path, "wb") as f:
            for _ in range(mb):
                f.write(chunk)
                f.flush()
                wrote += 1
        return "wrote %d" % wrote
    except OSError as exc:
        return "stopped at %d %s" % (wrote, type(exc).__name__)

def app(environ, start_response):
    path, q = environ["PATH_INFO"], environ["QUERY_STRING"]
    if path == "/connect":
        out = _connect(q)
    elif path == "/hold":
        s = socket.socket()
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", int(q)))
            s.listen(8)
            HELD.append(s)
            out = "holding " + _connect("127.0.0.1:" + q)
        except OSError as exc:
            out = "cannot bind " + type(exc).__name__
    elif path == "/read":
        try:
            with open(q, "rb") as f:
                out = "read " + f.read(64).decode(errors="replace")
        except OSError as exc:
            out = "denied " + type(exc).__name__
    elif path == "/exists":
        out = str(os.path.exists(q))
    elif path == "/resolve":
        try:
            out = "resolved " + socket.getaddrinfo(q, 443, socket.AF_INET)[0][4][0]
        except OSError as exc:
            out = "unresolved " + type(exc).__name__
    elif path == "/cat":
        with open(q) as f:
            out = f.read()
    elif path == "/fill":
        where, _, mb = q.partition(":")
        out = _fill(os.path.join(os.environ.get(where, where), "fill-%d" % os.getpid()), int(mb))
    elif path == "/escape":
        if os.fork() == 0:
            os.setsid()
            if os.fork() == 0:
                signal.signal(signal.SIGTERM, signal.SIG_IGN)
                os.chdir("/")
                os.closerange(0, 1024)
                time.sleep(600)
            os._exit(0)
        os.wait()
        out = "escaped"
    elif path == "/forkbomb":
        n, err = 0, "none"
        while n < 5000:
            try:
                pid = os.fork()
            except OSError as exc:
                err = type(exc).__name__
                break
            if pid == 0:
                os.closerange(0, 1024)
                time.sleep(20)
                os._exit(0)
            n += 1
        out = "forked %d then %s" % (n, err)
    elif path == "/whoami":
        out = "%d" % os.getuid()
    elif path == "/userns":
        # A user namespace of its own, by unshare(2) in a child and by util-linux unshare.
        import ctypes, subprocess, threading
        pid = os.fork()
        if pid == 0:
            libc = ctypes.CDLL(None, use_errno=True)
            os._exit(0 if libc.unshare(0x10000000) == 0 else ctypes.get_errno())
        got = ["unshare(2) %d" % os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])]
        cmd = subprocess.run(["unshare", "-U", "-r", "id", "-u"], capture_output=True, text=True)
        got.append("unshare -U %d %s" % (cmd.returncode, cmd.stdout.strip()))
        # Threads still start (glibc tries clone3 first).
        t = threading.Thread(target=got.append, args=("thread",))
        t.start()
        t.join()
        out = ", ".join(got)
    elif path == "/kernel":
        # Host-wide pools and exploit ground: how many AIO contexts it gets (kept while it lives),
        # then each call's errno (0: it worked).
        import ctypes
        libc = ctypes.CDLL(None, use_errno=True)
        nr = {
            "x86_64": (206, 425, 250, 298, 323, 321),
            "aarch64": (0, 425, 219, 241, 282, 280),
        }[os.uname().machine]
        def errno_of(number, *args):
            return 0 if libc.syscall(number, *args) >= 0 else ctypes.get_errno()
        contexts = 0
        while contexts < 4096:
            ctx = ctypes.c_ulong(0)
            if libc.syscall(nr[0], 1024, ctypes.byref(ctx)) < 0:
                break
            HELD.append(ctx)
            contexts += 1
        got = ["aio %d %d" % (contexts, ctypes.get_errno())]
        got.append("io_uring %d" % errno_of(nr[1], 8, ctypes.create_string_buffer(120)))
        got.append("keyctl %d" % errno_of(nr[2], 0, -3, 0))  # KEYCTL_GET_KEYRING_ID, session
        attr = ctypes.create_string_buffer(128)  # a software CPU clock of its own, user space only
        attr[0:16] = (1).to_bytes(4, "little") + (128).to_bytes(4, "little") + bytes(8)
        attr[40:48] = ((1 << 5) | (1 << 6)).to_bytes(8, "little")
        got.append("perf_event_open %d" % errno_of(nr[3], attr, 0, -1, -1, 0))
        got.append("userfaultfd %d" % errno_of(nr[4], 1))  # UFFD_USER_MODE_ONLY
        got.append("bpf %d" % errno_of(nr[5], 0, ctypes.create_string_buffer(72), 72))
        out = ", ".join(got)
    elif path == "/ptys":
        # Pseudo-terminals opened and kept, up to the number asked; then whether one still works.
        import pty
        err = "none"
        while len(HELD) < int(q):
            try:
                HELD.append(os.open("/dev/ptmx", os.O_RDWR | os.O_NOCTTY))
            except OSError as exc:
                err = type(exc).__name__
                break
        got = len(HELD)
        for fd in HELD[1:]:
            os.close(fd)
        del HELD[1:]
        try:
            main, term = pty.openpty()
            os.write(main, b"hi\\n")
            works = os.read(term, 16) == b"hi\\n"
        except OSError as exc:
            works = type(exc).__name__
        out = "opened %d then %s, a new one works: %s" % (got, err, works)
    elif path == "/told":
        out = "told " + " ".join(sorted(k for k in environ if k.startswith("HTTP_X_SITECLOUD")))
    elif path == "/udpflows":
        # One datagram from each of many ports (TEST-NET-2 never answers), each socket closed at once.
        sent = 0
        for port in range(20000, 20000 + int(q)):
            s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            try:
                s.bind(("0.0.0.0", port))
                s.sendto(b"x", ("198.51.100.1", 9))
                sent += 1
            except OSError:
                pass
            s.close()
        out = "sent %d" % sent
    else:
        out = "attacker " + path
    start_response("200 OK", [("Content-Type", "text/plain")])
    return [out.encode()]
"""

BYSTANDER_APP = b"""
def app(environ, start_response):
    start_response("200 OK", [("Content-Type", "text/plain")])
    return [b"bystander " + environ["PATH_INFO"].encode()]
"""


@pytest.fixture(scope="module")
def cloud() -> Iterator[AppCloud]:
    # No grace for quota volumes: a test sees them go when the app does.
    with running_cloud(app_start_timeout=10.0, max_active_apps=20, app_volume_grace=0.0) as c:
        c.add_site("bystander")
        c.publish_and_wait("bystander", {"app.py": BYSTANDER_APP, "secret.txt": b"theirs"}, "/", b"bystander")
        assert c.app("bystander")["sandboxed"] is True
        yield c


def bystander_answers(cloud: AppCloud) -> None:
    """The other site on this worker is unaffected: it answers, and right."""
    status, _, body = cloud.get("bystander", "/still-there")
    assert (status, body) == (200, b"bystander /still-there")


def attacker(cloud: AppCloud, site: str, **settings: object) -> None:
    cloud.add_site(site, **settings)
    cloud.publish_and_wait(site, {"app.py": ATTACK_APP}, "/hi", b"attacker /hi")


def uid_processes(uid: int) -> list[int]:
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/status") as f:
                    for line in f:
                        if line.startswith("Uid:") and int(line.split()[1]) == uid:
                            found.append(int(entry))
            except (OSError, ValueError):
                continue
    return found


def remove_site(cloud: AppCloud, site: str) -> None:
    del cloud.sites[site]
    cloud.push()


class HostListener:
    """A host process's loopback listener that answers a secret to whoever connects."""

    def __init__(self, port: int = 0) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", port))
        self.sock.listen(8)
        self.port = self.sock.getsockname()[1]
        self.hits = 0
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.hits += 1
            conn.sendall(b"host secret")
            conn.close()

    def close(self) -> None:
        # shutdown wakes the blocked accept(); close alone does not.
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)
        self._thread.join(5)
        self.sock.close()


def test_a_worker_with_the_whole_wall_is_ready_and_says_what_holds_its_apps(cloud: AppCloud) -> None:
    health = cloud.worker.health()
    assert health.get("status") != "degraded", health
    assert (health["app_sandbox"], health["app_limits"]) == ("bwrap", "cgroup")


def test_the_host_loopback_role_ports_and_other_apps_are_out_of_reach(cloud: AppCloud) -> None:
    # Egress is on by default where slirp4netns and nft are: the host stays out of reach either way.
    egress = shutil.which("slirp4netns") is not None and shutil.which("nft") is not None
    assert f"outbound internet {'through slirp4netns' if egress else 'off'}" in cloud.worker.log()
    attacker(cloud, "netprobe")
    cloud.add_site("cmdvictim")
    cloud.publish_and_wait(
        "cmdvictim", {"Procfile": b"web: python3 -m http.server $PORT --bind 127.0.0.1\n"}, "/", b"Directory"
    )
    host = HostListener()
    try:
        for port in (host.port, cloud.config.data_port, cloud.config.control_port, 8000):
            body = cloud.get("netprobe", f"/connect?127.0.0.1:{port}")[2]
            assert body.startswith(b"refused"), (port, body)
        assert host.hits == 0
        # The host's own addresses beyond loopback: no route at all.
        for addr in {a[4][0] for a in socket.getaddrinfo(socket.gethostname(), None, socket.AF_INET)}:
            body = cloud.get("netprobe", f"/connect?{addr}:{cloud.config.data_port}")[2]
            assert body.startswith(b"refused"), (addr, body)
        # /proc/net/tcp shows the app's own namespace: none of the host's listeners.
        tcp = cloud.get("netprobe", "/cat?/proc/net/tcp")[2].decode()
        assert f":{host.port:04X} " not in tcp and f":{cloud.config.data_port:04X} " not in tcp
    finally:
        host.close()
    # The command app still answers through the worker (which connects inside its namespace).
    assert b"Directory" in cloud.get("cmdvictim", "/")[2]
    bystander_answers(cloud)


def test_a_port_an_app_binds_is_its_own_not_the_hosts(cloud: AppCloud) -> None:
    attacker(cloud, "squatter")
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    # The app binds the port first, as if to catch a role's restart; it only gets its own loopback.
    assert cloud.get("squatter", f"/hold?{port}")[2] == b"holding connected "
    host = HostListener(port)  # the host can still take it
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=2) as s:
            assert s.recv(64) == b"host secret"
        body = cloud.get("squatter", f"/connect?127.0.0.1:{port}")[2]
        assert b"host secret" not in body
    finally:
        host.close()
    bystander_answers(cloud)


def test_other_sites_content_and_the_worker_home_are_not_there(cloud: AppCloud) -> None:
    attacker(cloud, "reader")
    apps_dir = Path(cloud.worker.health()["apps_dir"])
    home = cloud.config.home
    for path in (
        apps_dir / "sites" / "bystander" / "current" / "secret.txt",
        home / "tls" / "role.key",
        home / "role.json",
        Path("/proc/1/environ"),
    ):
        body = cloud.get("reader", f"/read?{path}")[2]
        assert body.startswith(b"denied"), (path, body)
    for path in (
        apps_dir / "sites" / "bystander",
        apps_dir / "blobs",
        apps_dir / "packs",
        home / "tls",
        apps_dir / "run",
    ):
        assert cloud.get("reader", f"/exists?{path}")[2] == b"False", path
    # Its own content is there. The site's directory is read-only; the version it runs it may write,
    # onto its own volume, and the published file stays as it was.
    own = apps_dir / "sites" / "reader" / "current" / "app.py"
    assert cloud.get("reader", f"/read?{own}")[2].startswith(b"read \nimport os")
    assert cloud.get("reader", f"/fill?{own.parent.parent}:1")[2].startswith(b"stopped at 0")
    assert cloud.get("reader", f"/fill?{own.parent}:1")[2] == b"wrote 1"
    assert not any(p.name.startswith("fill") for p in own.resolve().parent.iterdir())
    bystander_answers(cloud)


def test_the_app_runs_with_its_rlimits_no_capabilities_and_no_new_privileges(cloud: AppCloud) -> None:
    attacker(cloud, "bounded", limits={"nofile": 200, "nproc": 40, "memory_mb": 128})
    limits = {
        line[:26].strip(): line[26:].split()[:2]
        for line in cloud.get("bounded", "/cat?/proc/self/limits")[2].decode().splitlines()[1:]
    }
    assert limits["Max open files"] == ["200", "200"]
    assert limits["Max processes"] == ["40", "40"]
    assert limits["Max core file size"] == ["0", "0"]
    in_cgroup = cloud.worker.health()["app_limits"] == "cgroup"
    # The app's cgroup namespace is rooted at the worker's group: it sees its own group below it
    # when it has one, and the root when it runs on rlimits alone.
    groups = [
        line.rpartition(":")[2] for line in cloud.get("bounded", "/cat?/proc/self/cgroup")[2].decode().split()
    ]
    assert any(g != "/" for g in groups) == in_cgroup, groups
    if in_cgroup:
        # The cgroup holds memory and CPU; the rlimit backstops would only break runtimes.
        assert limits["Max address space"] == limits["Max cpu time"] == ["unlimited", "unlimited"]
    else:
        assert limits["Max address space"] == [str(512 * 2**20)] * 2
        cpu = limits["Max cpu time"]
        assert int(cpu[1]) == int(cpu[0]) + 5
    status = dict(
        line.split(":\t", 1)
        for line in cloud.get("bounded", "/cat?/proc/self/status")[2].decode().splitlines()
    )
    assert int(status["Uid"].split()[0]) >= UID_BASE
    assert status["NoNewPrivs"].strip() == "1"
    assert int(status["CapEff"], 16) == 0 and int(status["CapBnd"], 16) == 0


def test_the_app_cannot_make_a_user_namespace(cloud: AppCloud) -> None:
    # Root in a user namespace of its own would open the kernel's namespaced-root code to the app
    # (nftables, mounts): the usual first step of a kernel exploit.
    attacker(cloud, "userns")
    body = cloud.get("userns", "/userns")[2].decode()
    assert body == f"unshare(2) {errno.EPERM}, unshare -U 1 , thread", body
    assert "no user namespaces, AIO, io_uring" in cloud.worker.log()
    bystander_answers(cloud)


def test_the_platforms_own_request_headers_never_reach_an_app(cloud: AppCloud) -> None:
    # X-Sitecloud-Cached (the version of a file a front end holds) reached every app, and PHP got
    # X-Sitecloud-Site besides: the platform's fields are the worker's; an app has SITECLOUD_SITE.
    attacker(cloud, "told")
    cloud.add_site("toldphp")
    php = b"<?php echo 'told ' . implode(' ', preg_grep('/^HTTP_X_SITECLOUD/', array_keys($_SERVER)));"
    cloud.publish_and_wait("toldphp", {"index.php": php}, "/", b"told")
    platform_fields = {"X-Sitecloud-Cached": "7.3", "X-Sitecloud-Lane-Refused": "x", "X-Sitecloud-Other": "y"}
    for site, path in (("told", "/told"), ("toldphp", "/")):
        status, _, body = cloud.get(site, path, headers=platform_fields)
        assert (status, body) == (200, b"told "), (site, body)
    bystander_answers(cloud)


def test_the_hosts_key_users_are_not_listed_to_an_app(cloud: AppCloud) -> None:
    # /proc/key-users is the whole host's even in a new procfs: every uid holding kernel keys, other
    # sites' included, with their counts.
    assert Path("/proc/key-users").read_text()  # root holds keys on the host
    attacker(cloud, "keyusers")
    status, _, body = cloud.get("keyusers", "/cat?/proc/key-users")
    assert (status, body) == (200, b""), body
    bystander_answers(cloud)


def test_the_apps_pseudo_terminals_are_capped_and_leave_the_hosts_pool_to_others(cloud: AppCloud) -> None:
    # Every devpts instance but the host's first draws from one pool (kernel.pty.max less its
    # reserve, 3,072): an app that kept opening /dev/ptmx held every other sandbox's terminals.
    attacker(cloud, "ptys")
    before = int(Path("/proc/sys/kernel/pty/nr").read_text())
    body = cloud.get("ptys", "/ptys?200")[2].decode()
    assert body == f"opened {PTYS_PER_APP} then OSError, a new one works: True", body
    # It still holds one: of the host's pool it took no more than its cap (others come and go).
    assert int(Path("/proc/sys/kernel/pty/nr").read_text()) - before <= PTYS_PER_APP
    bystander_answers(cloud)


def test_a_large_workers_apps_together_leave_part_of_the_hosts_pty_pool() -> None:
    # 16 each was more than the pool (3,072 by default) for 200 apps or more: the cap is each app's
    # share of it.
    sysctl = Path("/proc/sys/kernel/pty")
    pool = int((sysctl / "max").read_text()) - int((sysctl / "reserve").read_text())
    active = 400
    share = pool // active
    if not 1 <= share < PTYS_PER_APP:
        pytest.skip(f"this host's pty pool ({pool}) is no tighter for {active} apps than the cap")
    with running_cloud(app_start_timeout=10.0, max_active_apps=active) as c:
        attacker(c, "ptyshare")
        body = c.get("ptyshare", "/ptys?200")[2].decode()
        assert body == f"opened {share} then OSError, a new one works: True", body
        assert c.worker.health().get("status") != "degraded"


def test_the_pty_cap_is_a_share_of_the_pool_never_none() -> None:
    assert ptys_per_app(3072, 50) == PTYS_PER_APP
    assert ptys_per_app(3072, 200) == 15  # 16 each would be 3,200
    assert ptys_per_app(3072, 10_000) == 1  # a web terminal still opens
    assert ptys_per_app(3072, 0) == PTYS_PER_APP


def test_a_worker_whose_capped_devpts_cannot_be_mounted_says_degraded(tmp_path: Path) -> None:
    # Its apps then get bwrap's own devpts, uncapped: together they can hold the host's whole pool.
    # That was a line in the worker's log only.
    root = tmp_path / "apps"
    root.mkdir()
    manager = AppManager(
        WorkerConfig(host="localhost", home=tmp_path / "worker"), lambda site: (True, None), root
    )
    manager._sandbox = Sandbox("/usr/bin/bwrap", "/usr/bin/setpriv", (), None)
    assert not [g for g in manager.isolation_gaps() if "pseudo-terminals" in g]
    (root / "run").mkdir()
    (root / "run" / "pts-7.1").write_text("")  # no devpts can be mounted on a file
    assert manager._capped_pts("7.1") == ""
    (gap,) = [g for g in manager.isolation_gaps() if "pseudo-terminals" in g]
    assert gap.startswith("apps' pseudo-terminals are not capped (mounting a devpts instance failed:"), gap


def _io_setup() -> int:
    """0 if this process gets a Linux AIO context (then freed), else the errno."""
    libc = ctypes.CDLL(None, use_errno=True)
    ctx = ctypes.c_ulong(0)
    nr_setup, nr_destroy = {"x86_64": (206, 207), "aarch64": (0, 1)}[platform.machine()]
    if libc.syscall(nr_setup, 128, ctypes.byref(ctx)) < 0:
        return ctypes.get_errno()
    libc.syscall(nr_destroy, ctx)
    return 0


@pytest.mark.skipif(
    platform.machine() not in ("x86_64", "aarch64"), reason="system call numbers of x86-64 and arm64"
)
def test_the_app_cannot_hold_the_hosts_aio_pool_nor_reach_io_uring_keyrings_or_perf(cloud: AppCloud) -> None:
    # fs.aio-max-nr is one pool for the whole host: an app that took it all (64 contexts of 1024
    # events) made every other process's io_setup fail with EAGAIN for as long as it lived. io_uring,
    # keyrings, perf events, userfaultfd and bpf are the kernel's attack surface, which Docker's
    # default profile refuses a container too.
    attacker(cloud, "kernel")
    body = cloud.get("kernel", "/kernel")[2].decode()
    nosys, perm = errno.ENOSYS, errno.EPERM
    assert body == (
        f"aio 0 {nosys}, io_uring {nosys}, keyctl {perm}, perf_event_open {perm}, userfaultfd {perm}, bpf {perm}"
    ), body
    # The app lives on, holding whatever it got: the host still has its AIO.
    assert _io_setup() == 0
    bystander_answers(cloud)


@pytest.mark.parametrize("where", ["/dev/shm", "/tmp"])
def test_filling_tmpfs_is_a_memory_kill_and_leaves_nothing(cloud: AppCloud, where: str) -> None:
    site = "shm" if where == "/dev/shm" else "tmpfill"
    attacker(cloud, site, limits={"memory_mb": 256})
    host_before = set(os.listdir(where))
    status, _, body = cloud.get(site, f"/fill?{where}:400")
    # Killed mid-write (a memory cgroup) or refused at the tmpfs cap and then killed (the watch).
    assert status in (200, 502, 503) and not body.startswith(b"wrote 400"), body
    wait_until(
        lambda: "stopped: exceeded its 256 MB memory limit" in cloud.log(site),
        timeout=10,
        what="the memory line in the site's log",
    )
    wait_until(lambda: cloud.pids(site) == [], timeout=10, what="the app to be gone")
    assert cloud.app(site)["memory_kills"] >= 1
    assert not {n for n in set(os.listdir(where)) - host_before if n.startswith("fill-")}
    bystander_answers(cloud)
    # It wakes again, with an empty private tmpfs.
    assert cloud.get(site, "/again")[2] == b"attacker /again"


def test_a_double_forked_setsid_child_ends_with_its_site(cloud: AppCloud) -> None:
    attacker(cloud, "escaper")
    uid = int(cloud.get("escaper", "/whoami")[2])
    assert cloud.get("escaper", "/escape")[2] == b"escaped"
    assert len(uid_processes(uid)) == 2  # the app and the escaped grandchild
    # A restart (new settings): the old sandbox goes whole; only the new app runs.
    cloud.set("escaper", env={"ROUND": "2"})
    wait_until(lambda: cloud.get("escaper", "/r2")[2] == b"attacker /r2", what="the restarted app")
    wait_until(lambda: len(uid_processes(uid)) == 1, timeout=10, what="only the new app to be left")
    assert cloud.get("escaper", "/escape")[2] == b"escaped"
    # The site leaves the worker: nothing of its uid is left.
    remove_site(cloud, "escaper")
    wait_until(lambda: uid_processes(uid) == [], timeout=10, what="every process of the site to end")
    bystander_answers(cloud)


def test_the_disk_quota_holds_and_is_logged(cloud: AppCloud) -> None:
    attacker(cloud, "filler", limits={"disk_mb": 32})
    body = cloud.get("filler", "/fill?HOME:64")[2]
    assert body.startswith(b"stopped at") and b"OSError" in body, body
    assert int(body.split()[2]) < 32
    # TMPDIR is on the same quota.
    assert cloud.get("filler", "/fill?TMPDIR:8")[2].startswith(b"stopped at")
    wait_until(
        lambda: "its disk is full: the 32 MB quota of HOME and TMPDIR is used up" in cloud.log("filler"),
        timeout=10,
        what="the disk line in the site's log",
    )
    figures = cloud.app("filler")
    assert figures["disk_quota_hits"] >= 1 and figures["disk_limit_bytes"] == 32 * 1024 * 1024
    assert figures["disk_used_bytes"] > 16 * 1024 * 1024
    bystander_answers(cloud)
    # A bigger plan: the volume grows at the next start from idle, files kept.
    cloud.set("filler", limits={"disk_mb": 64}, idle_timeout=1)
    uid = int(cloud.get("filler", "/whoami")[2])
    volume = Path(cloud.worker.health()["apps_dir"]) / "apps" / str(uid - UID_BASE) / "volume"
    assert os.path.ismount(volume)
    wait_until(
        lambda: not os.path.ismount(volume), timeout=10, what="the app to idle out, its volume released"
    )
    assert cloud.get("filler", "/up")[2] == b"attacker /up"
    assert cloud.app("filler")["disk_limit_bytes"] > 60 * 1024 * 1024
    assert cloud.get("filler", "/fill?TMPDIR:16")[2] == b"wrote 16"
    assert cloud.app("filler")["disk_used_bytes"] > 40 * 1024 * 1024, (
        cloud.app("filler"),
        cloud.log("filler"),
    )


def test_a_fork_bomb_hits_the_process_limit_and_is_logged(cloud: AppCloud) -> None:
    attacker(cloud, "bomber", limits={"nproc": 32})
    uid = int(cloud.get("bomber", "/whoami")[2])
    t0 = time.monotonic()
    body = cloud.get("bomber", "/forkbomb")[2]
    assert body.startswith(b"forked") and not body.endswith(b"none"), body
    assert int(body.split()[1]) < 32
    wait_until(
        lambda: "reached its limit of 32 processes" in cloud.log("bomber"),
        timeout=10,
        what="the process limit line in the site's log",
    )
    assert cloud.app("bomber")["pids_limit_hits"] >= 1
    bystander_answers(cloud)
    assert time.monotonic() - t0 < 20
    remove_site(cloud, "bomber")
    wait_until(lambda: uid_processes(uid) == [], timeout=10, what="the bomb to be gone with its site")


needs_egress = pytest.mark.skipif(
    shutil.which("slirp4netns") is None or shutil.which("nft") is None,
    reason="egress needs slirp4netns and nftables (apt-get install slirp4netns nftables)",
)


@needs_egress
def test_with_egress_the_host_and_private_networks_stay_out_of_reach() -> None:
    with running_cloud(app_start_timeout=10.0, app_egress="slirp4netns") as c:
        assert "outbound internet through slirp4netns" in c.worker.log()
        c.add_site("bystander")
        c.publish_and_wait("bystander", {"app.py": BYSTANDER_APP}, "/", b"bystander")
        attacker(c, "egress")
        wait_until(
            lambda: "tap0" in c.get("egress", "/cat?/proc/net/dev")[2].decode(), what="the sandbox's egress"
        )
        host = HostListener()
        try:
            own = {a[4][0] for a in socket.getaddrinfo(socket.gethostname(), None, socket.AF_INET)}
            # slirp's gateway is the host's loopback unless disabled; private ranges are other hosts.
            for addr in {"127.0.0.1", "10.0.2.2", "192.168.0.1", "169.254.169.254", *own}:
                for port in (host.port, c.config.data_port, c.config.control_port):
                    body = c.get("egress", f"/connect?{addr}:{port}")[2]
                    assert body.startswith(b"refused"), (addr, port, body)
            assert host.hits == 0
        finally:
            host.close()
        # Names resolve through slirp's forwarder: the host's resolver is a private address the
        # rules refuse (before, every lookup failed, so no app could call an API by name).
        resolv = c.get("egress", "/cat?/etc/resolv.conf")[2].decode()
        assert resolv.split() == ["nameserver", "10.0.2.3"], resolv
        name = "pypi.org"
        try:
            known = socket.getaddrinfo(name, 443, socket.AF_INET)[0][4][0]
        except OSError:
            known = None  # a host without DNS: only the file can be checked
        if known is not None:
            assert c.get("egress", f"/resolve?{name}")[2].decode() == f"resolved {known}"
        bystander_answers(c)


_NEIGHBOUR_SERVER = """
import socket, sys
s = socket.socket()
s.bind(("0.0.0.0", 0))
s.listen(8)
print(s.getsockname()[1], flush=True)
while True:
    c, _ = s.accept()
    c.sendall(b"neighbour secret")
    c.close()
"""


@contextlib.contextmanager
def on_link_neighbour() -> Iterator[tuple[str, int]]:
    """Another machine on a subnet this host is directly connected to (198.51.100.0/24 on a veth,
    its far end in a network namespace of its own), listening on a port: (its address, the port)."""
    holder = subprocess.Popen(["unshare", "--net", "sleep", "300"])
    here, there = f"sc{os.getpid() % 100000}h", f"sc{os.getpid() % 100000}n"
    server: subprocess.Popen[bytes] | None = None
    try:
        ours = os.readlink("/proc/self/ns/net")
        ns = f"/proc/{holder.pid}/ns/net"
        wait_until(lambda: os.readlink(ns) != ours, timeout=5, what="the neighbour's namespace")
        inside = ["nsenter", f"--net={ns}"]
        for argv in (
            ["ip", "link", "add", here, "type", "veth", "peer", "name", there, "netns", str(holder.pid)],
            ["ip", "addr", "add", "198.51.100.1/24", "dev", here],
            ["ip", "link", "set", here, "up"],
            [*inside, "ip", "addr", "add", "198.51.100.2/24", "dev", there],
            [*inside, "ip", "link", "set", there, "up"],
        ):
            subprocess.run(argv, check=True, capture_output=True)
        server = subprocess.Popen([*inside, sys.executable, "-c", _NEIGHBOUR_SERVER], stdout=subprocess.PIPE)
        assert server.stdout is not None
        port = int(server.stdout.readline())
        with socket.create_connection(("198.51.100.2", port), timeout=5) as s:
            assert s.recv(64) == b"neighbour secret"  # the host itself reaches it
        yield "198.51.100.2", port
    finally:
        subprocess.run(["ip", "link", "del", here], capture_output=True)
        for proc in (server, holder):
            if proc is not None:
                proc.kill()
                proc.wait()
                if proc.stdout is not None:
                    proc.stdout.close()


@needs_egress
def test_with_egress_the_hosts_on_link_neighbours_stay_out_of_reach() -> None:
    # A machine on one of the host's connected subnets with a public address (here the worker's own
    # gateway's 192.0.2.0/24 on the test network) is reached without a router: the app got its
    # secret. The subnets are read when the worker starts, so the neighbour comes first.
    with (
        on_link_neighbour() as (address, port),
        running_cloud(app_start_timeout=10.0, app_egress="slirp4netns") as c,
    ):
        attacker(c, "onlink")
        wait_until(
            lambda: "tap0" in c.get("onlink", "/cat?/proc/net/dev")[2].decode(), what="the sandbox's egress"
        )
        body = c.get("onlink", f"/connect?{address}:{port}")[2]
        assert body.startswith(b"refused"), body
        for gateway in _host_gateways():
            body = c.get("onlink", f"/connect?{gateway}:53")[2]
            assert body.startswith(b"refused"), (gateway, body)


def _host_gateways() -> list[str]:
    """The host's IPv4 gateways, neighbours on its connected subnets too."""
    found = []
    for line in Path("/proc/net/route").read_text().splitlines()[1:]:
        fields = line.split()
        if int(fields[2], 16):
            found.append(socket.inet_ntoa(int(fields[2], 16).to_bytes(4, sys.byteorder)))
    return sorted(set(found))


def _udp_sockets(pid: int) -> int:
    """How many host UDP sockets ``pid`` holds (its socket fds listed in the host's udp table)."""
    inodes = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        with contextlib.suppress(OSError):
            link = os.readlink(fd)
            if link.startswith("socket:["):
                inodes.add(link[8:-1])
    table = Path(f"/proc/{pid}/net/udp").read_text().splitlines()[1:]
    return sum(1 for line in table if line.split()[9] in inodes)


@needs_egress
def test_an_apps_egress_counts_against_its_cgroup_and_holds_few_host_ports(cloud: AppCloud) -> None:
    """slirp4netns runs as root in the host's network namespace: it is the app's, in the app's
    cgroup, and an app sending from thousands of UDP ports leaves it holding at most the cap."""
    attacker(cloud, "flows")
    wait_until(lambda: "tap0" in cloud.get("flows", "/cat?/proc/net/dev")[2].decode(), what="egress")
    app_pid = cloud.app("flows")["pid"]
    members = [int(p) for p in (_cgroup_dirs(app_pid)[0] / "cgroup.procs").read_text().split()]
    slirp = next(p for p in members if Path(f"/proc/{p}/comm").read_text().strip() == "slirp4netns")
    # Every controller: its CPU, memory and pid count as the app's.
    assert Path(f"/proc/{slirp}/cgroup").read_text() == Path(f"/proc/{app_pid}/cgroup").read_text()
    nofile = next(
        line for line in Path(f"/proc/{slirp}/limits").read_text().splitlines() if "open files" in line
    )
    assert nofile.split()[3:5] == [str(egress_nofile(AppLimits().nofile))] * 2, nofile
    t0 = time.monotonic()
    body = cloud.get("flows", "/udpflows?3000")[2].decode()
    assert body.startswith("sent ") and 0 < int(body.split()[1]) <= EGRESS_UDP_FLOWS, body
    assert _udp_sockets(slirp) <= EGRESS_UDP_FLOWS
    assert time.monotonic() - t0 < 10
    bystander_answers(cloud)


@needs_egress
def test_egress_waits_for_bwrap_to_set_up_the_sandboxs_loopback() -> None:
    """slirp4netns brings the namespace's lo up, which gives it 127.0.0.1 at once; bwrap adds that
    address itself (exclusively) just after its info fd names pid 1, and fails if it is there
    ("loopback: Failed RTM_NEWADDR"). bwrap is held in that window here: its info write waits on a
    full pipe while its pid 1 already exists, so egress started meanwhile must not touch the network."""
    real = Sandbox.detect(
        get_logger("worker"), python=sys.executable, appserver=APPSERVER_PATH, egress="slirp4netns"
    )
    assert real is not None and real.slirp4netns is not None
    info_r, info_w = os.pipe()
    fcntl.fcntl(info_w, fcntl.F_SETPIPE_SZ, 4096)
    os.write(info_w, b" " * (4096 - 8))  # the JSON bwrap writes no longer fits
    argv = [real.bwrap, "--unshare-net", "--unshare-pid", "--die-with-parent", "--ro-bind", "/", "/"]
    argv += ["--info-fd", str(info_w), "--", "sh", "-c", "sleep 0.3; grep -c lo: /proc/net/dev"]
    bwrap = subprocess.Popen(argv, pass_fds=[info_w], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    os.close(info_w)
    exit_r, exit_w = os.pipe()
    try:
        children = Path(f"/proc/{bwrap.pid}/task/{bwrap.pid}/children")
        wait_until(lambda: children.read_text().strip(), timeout=5, what="bwrap's pid 1")
        init_pid = int(children.read_text().split()[0])
        lo = Path(f"/proc/{init_pid}/net/if_inet6")  # ::1 on lo is there once lo is up

        async def run() -> int:
            egress = asyncio.ensure_future(real.start_egress(init_pid, exit_r, nofile=64))
            try:
                await asyncio.wait({egress}, timeout=0.5)
                await asyncio.sleep(0.3)  # slirp4netns's own setup, had it started
                assert " lo\n" not in lo.read_text(), "the sandbox's lo came up before bwrap set it up"
                with open(info_r, "rb", closefd=False) as f:
                    while not f.read1(4096).rstrip().endswith(b"}"):
                        pass
                await asyncio.wait_for(asyncio.shield(egress), 5)
                return await asyncio.to_thread(bwrap.wait, 10)
            finally:
                os.close(exit_w)  # slirp4netns ends with it
                egress.cancel()
                (slirp,) = await asyncio.gather(egress, return_exceptions=True)
                if isinstance(slirp, asyncio.subprocess.Process):
                    await asyncio.wait_for(slirp.wait(), 5)

        assert bwrap.stdout is not None and bwrap.stderr is not None
        assert asyncio.run(run()) == 0, bwrap.stderr.read()
        assert bwrap.stdout.read() == b"1\n"
    finally:
        bwrap.kill()
        bwrap.wait()
        for fd in (info_r, exit_r):
            os.close(fd)
        for stream in (bwrap.stdout, bwrap.stderr):
            if stream is not None:
                stream.close()


def test_a_sandbox_that_cannot_be_built_fails_with_bwraps_reason_and_leaves_nothing(tmp_path: Path) -> None:
    """Straight on AppInstance. A bwrap that dies before its sandbox exists fails the start (and is
    reaped); one that cannot mount the content exits, its reason in the site's log."""
    dirs = SiteDirs.under(tmp_path, 1)
    for d in (dirs.base, dirs.home, dirs.tmp, dirs.log):
        d.mkdir(parents=True)
    missing = str(tmp_path / "sites" / "gone")
    real = Sandbox.detect(get_logger("worker"), python=sys.executable, appserver=APPSERVER_PATH, egress="off")
    assert real is not None
    plan = plan_launch(
        site="gone", runtime="python", entry="app", root=missing, dirs=dirs, settings=(),
        limits=AppLimits(), python=sys.executable, packages=None,
    )  # fmt: skip
    log = SiteLog(dirs.log / "app.log", 1 << 20)
    exits: list[int] = []

    def instance(sandbox: Sandbox) -> AppInstance:
        return AppInstance(
            plan=plan,
            identity=SiteIdentity(1, UID_BASE + 999_000, UID_BASE + 999_000),
            limits=AppLimits(),
            log=log,
            socket_path=tmp_path / "app.sock",
            cgroup=None,
            on_exit=lambda _inst, code: exits.append(code),
            sandbox=sandbox,
            mounts=SandboxMounts(
                site_dir=missing, cwd=missing, home=(str(dirs.home),) * 2, tmp=(str(dirs.tmp),) * 2
            ),
        )

    async def run() -> str:
        broken = instance(Sandbox("/bin/false", real.setpriv, (), None))
        with pytest.raises(OSError) as err:
            await broken.start()
        assert broken.proc is not None and broken.proc.returncode is not None
        assert not (tmp_path / "app.sock").exists()
        app = instance(real)
        await app.start()
        await asyncio.wait_for(app.wait_closed(), 10)
        return str(err.value)

    message = asyncio.run(run())
    assert message == "its sandbox could not be built: bwrap said nothing"
    assert exits == [1]
    log.close()
    assert "Can't find source path" in (dirs.log / "app.log").read_text()


def test_sandbox_arguments_keep_paths_and_open_their_parents() -> None:
    sandbox = Sandbox("/usr/bin/bwrap", "/usr/bin/setpriv", ("/opt/py",), None)
    mounts = SandboxMounts(
        site_dir="/tmp/w/sites/a",
        cwd="/tmp/w/sites/a/v3",
        home=("/tmp/w/apps/7/volume/home", "/tmp/w/apps/7/home"),
        tmp=("/tmp/w/apps/7/volume/tmp", "/tmp/w/apps/7/tmp"),
        read_only=("/tmp/w/apps/7/packages-x",),
        tmpfs_bytes=1 << 20,
    )
    argv = sandbox.argv(mounts, uid=1100007, gid=1100007, block_fd=5, info_fd=6)
    line = " ".join(argv)
    for flag in ("--unshare-net", "--unshare-pid", "--die-with-parent", "--proc /proc", "--dev /dev"):
        assert flag in line
    # /tmp is the sandbox's own tmpfs, made before anything is bound below it.
    assert line.index("--tmpfs /tmp") < line.index("--ro-bind /tmp/w/sites/a /tmp/w/sites/a")
    assert "--size 1048576 --tmpfs /dev/shm" in line
    # Paths inside are the host's; parents bwrap would make 0700 are made 0755 first, once.
    assert "--bind /tmp/w/apps/7/volume/home /tmp/w/apps/7/home" in line
    assert "--ro-bind /tmp/w/apps/7/packages-x /tmp/w/apps/7/packages-x" in line
    assert line.count("--perms 0755 --dir /tmp/w ") == 1 and "--perms 0755 --dir /tmp/w/apps/7 " in line
    assert "--perms 0755 --dir /opt " in line and "--chdir /tmp/w/sites/a/v3 --block-fd 5 --info-fd 6" in line
    # Then the uid switch, with nothing to regain.
    assert argv[argv.index("--") + 1 :] == [
        "/usr/bin/setpriv", "--reuid=1100007", "--regid=1100007", "--clear-groups", "--no-new-privs",
        "--inh-caps=-all", "--bounding-set=-all", "--",
    ]  # fmt: skip


def test_egress_rules_refuse_the_host_and_private_ranges() -> None:
    rules = egress_rules(["127.0.0.1", "10.1.2.3", "203.0.113.9"], ["192.0.2.0/24", "10.1.0.0/16"])
    blocked = next(line for line in rules.splitlines() if line.strip().endswith("reject") and "daddr" in line)
    for net in ("10.0.0.0/8", "127.0.0.0/8", "169.254.0.0/16", "172.16.0.0/12", "192.168.0.0/16"):
        assert net in blocked
    # The host's public address is listed; those inside a blocked range need not be.
    assert "203.0.113.9" in blocked and "10.1.2.3" not in blocked and "127.0.0.1," not in blocked
    # The host's connected subnets, outside the private ranges, are refused too; nothing overlaps.
    assert "192.0.2.0/24" in blocked and "10.1.0.0/16" not in blocked and "0.0.0.0/0" not in blocked
    assert "meta nfproto ipv6 reject" in rules
    # UDP flows (a host port each through slirp) are capped, kept as long as slirp keeps them.
    assert f"size {EGRESS_UDP_FLOWS}; timeout 240s;" in rules
    assert "update @udp_flows { udp sport } accept\n    meta l4proto udp reject" in rules


@pytest.mark.skipif(shutil.which("nft") is None, reason="needs nftables (apt-get install nftables)")
def test_egress_rules_load_into_a_network_namespace() -> None:
    done = subprocess.run(
        ["unshare", "--net", "nft", "-f", "-"],
        input=egress_rules(["203.0.113.9", "192.0.2.7"], ["192.0.2.0/24", "198.51.100.0/24"]).encode(),
        capture_output=True,
    )
    assert done.returncode == 0, done.stderr


def test_a_worker_with_the_sandbox_off_says_so_and_still_runs_apps_as_their_uid() -> None:
    with running_cloud(app_start_timeout=10.0, app_sandbox=False) as c:
        assert "app sandbox: off in the worker's settings" in c.worker.log()
        attacker(c, "plain")
        assert int(c.get("plain", "/whoami")[2]) >= UID_BASE
        health = c.worker.health()
        assert c.app("plain")["sandboxed"] is False and health["app_sandbox"] == "off"
        # Off by the admin's choice: said in the log and the figures, not a gap that degrades it.
        assert health.get("status") != "degraded", health


def test_a_quota_volume_outlives_an_idle_stop_for_its_grace_and_not_the_worker() -> None:
    with running_cloud(app_start_timeout=10.0, app_volume_grace=60.0) as c:
        attacker(c, "napper", idle_timeout=1)
        uid = int(c.get("napper", "/whoami")[2])
        volume = Path(c.worker.health()["apps_dir"]) / "apps" / str(uid - UID_BASE) / "volume"
        wait_until(
            lambda: c.app("napper")["state"] == "idle" and not uid_processes(uid), what="the idle stop"
        )
        assert os.path.ismount(volume), "kept for a quick wake"
        assert c.get("napper", "/again")[2] == b"attacker /again"
        assert c.app("napper")["starts"] == 2
    assert not os.path.ismount(volume), "a stopped worker leaves no mount behind"


@pytest.mark.skipif(not HomeVolume.available(), reason="quota volumes need mkfs.ext4, mount and loop devices")
def test_a_new_site_takes_a_blank_volume_made_ahead_owned_by_it_alone(tmp_path: Path) -> None:
    async def run() -> tuple[os.stat_result, os.stat_result, int, list[str]]:
        blanks = BlankImages(tmp_path / "blank", keep=1)
        blanks.fill(16)
        await wait_until_async(lambda: any((tmp_path / "blank").glob("16-*.img")))
        base = tmp_path / "7"
        base.mkdir()
        volume = HomeVolume(base, uid=UID_BASE + 7, gid=UID_BASE + 7, blanks=blanks)
        await volume.acquire(16, base / "home", base / "tmp")
        try:
            root, home = os.stat(volume.mountpoint), os.stat(volume.home)
            _, size = volume.usage()
            # Taken by a rename; another is being made for the next new site.
            await wait_until_async(lambda: any((tmp_path / "blank").glob("16-*.img")))
            left = sorted(p.name for p in (tmp_path / "blank").iterdir())
        finally:
            await volume.close()
            await blanks.close()
        return root, home, size, left

    async def wait_until_async(check: Callable[[], bool]) -> None:
        deadline = time.monotonic() + 20
        while not check():
            assert time.monotonic() < deadline, "no blank image was made"
            await asyncio.sleep(0.02)

    root, home, size, left = asyncio.run(run())
    assert (root.st_uid, root.st_gid) == (UID_BASE + 7, UID_BASE + 7)
    assert (home.st_uid, home.st_mode & 0o777) == (UID_BASE + 7, 0o700)
    assert 8 * 1024 * 1024 < size <= 16 * 1024 * 1024
    assert len(left) == 1 and left[0].startswith("16-") and left[0].endswith(".img")
    assert (tmp_path / "7" / "volume.img").stat().st_mode & 0o777 == 0o600


FLIP_APP = b"""
import os
VERSION = %d

def app(environ, start_response):
    start_response("200 OK", [("Content-Type", "text/plain")])
    return [b"flip %%d pid %%d" %% (VERSION, os.getpid())]
"""


def _cgroup_dirs(pid: int) -> list[Path]:
    """The directories of ``pid``'s memory and pids cgroups (v1), or of its one v2 group."""
    found = []
    for line in Path(f"/proc/{pid}/cgroup").read_text().splitlines():
        _, controllers, path = line.split(":", 2)
        for name in controllers.split(",") if controllers else [""]:
            if name in ("memory", "pids") or (
                not controllers and Path("/sys/fs/cgroup/cgroup.procs").exists()
            ):
                base = Path("/sys/fs/cgroup", name) if name else Path("/sys/fs/cgroup")
                found.append(base / path.lstrip("/"))
    return found


def test_quick_version_flips_leave_each_new_instance_in_its_own_cgroup(cloud: AppCloud) -> None:
    """Versions published back to back while requests keep arriving: each flip retires the running
    instance while the next starts. A retiring instance's exit must not take the new one's cgroup."""
    cloud.add_site("flipper")
    cloud.publish_and_wait("flipper", {"app.py": FLIP_APP % 0}, "/", b"flip 0")
    stop = threading.Event()
    statuses: list[int] = []

    def visitor() -> None:
        while not stop.is_set():
            statuses.append(cloud.get("flipper", "/")[0])

    visitors = [threading.Thread(target=visitor) for _ in range(3)]
    for t in visitors:
        t.start()
    try:
        for n in range(1, 9):
            cloud.publish("flipper", {"app.py": FLIP_APP % n})
            time.sleep(0.15)
    finally:
        stop.set()
        for t in visitors:
            t.join(30)
    cloud.publish_and_wait("flipper", {"app.py": FLIP_APP % 9}, "/", b"flip 9")
    assert statuses and all(s in (200, 503) for s in statuses), sorted(set(statuses))
    # The instance now serving stays in its cgroup and keeps serving.
    pid = cloud.app("flipper")["pid"]  # the host's pid (the app sees its namespace's)
    groups = _cgroup_dirs(pid)
    assert groups and all(
        g.name != "/" and str(pid) in (g / "cgroup.procs").read_text().split() for g in groups
    )
    for _ in range(20):
        assert cloud.get("flipper", "/")[2].startswith(b"flip 9")
    assert "could not put the app in its cgroup" not in cloud.log("flipper")
    bystander_answers(cloud)


WRITER_APP = b"""
import os, sqlite3

def app(environ, start_response):
    path, arg = environ["PATH_INFO"], environ.get("QUERY_STRING", "")
    try:
        if path == "/write":
            os.makedirs(os.path.dirname(arg) or ".", exist_ok=True)
            with open(arg, "w") as f:
                f.write("app-" + arg)
            body = "wrote " + arg
        elif path == "/symlink":
            target, name = arg.split(":", 1)
            os.makedirs(os.path.dirname(name) or ".", exist_ok=True)
            os.symlink(target, name)
            body = "linked " + name
        elif path == "/fifo":
            os.mkfifo(arg)
            body = "fifo " + arg
        elif path == "/whoami":
            body = str(os.getuid())
        elif path == "/read":
            with open(arg) as f:
                body = f.read()
        elif path == "/count":
            db = sqlite3.connect("db.sqlite3")  # beside the code, as Django's startproject keeps it
            with db:
                db.execute("CREATE TABLE IF NOT EXISTS hits (n INTEGER)")
                db.execute("INSERT INTO hits VALUES (1)")
            body = str(db.execute("SELECT COUNT(*) FROM hits").fetchone()[0])
            db.close()
        elif path == "/fill":
            os.makedirs("uploads", exist_ok=True)
            with open("uploads/big.bin", "wb") as f:
                for _ in range(int(arg)):
                    f.write(b"x" * 1024 * 1024)
            body = "filled"
        elif path == "/outside":
            with open("../escape.txt", "w") as f:
                f.write("x")
            body = "wrote outside"
        else:
            body = "writer " + path
    except OSError as exc:
        body = type(exc).__name__ + ": " + str(exc)
    start_response("200 OK", [("Content-Type", "text/plain")])
    return [body.encode()]
"""


def test_an_app_writes_its_own_folder_onto_its_volume_and_a_deploy_takes_back_what_it_changed(
    cloud: AppCloud,
) -> None:
    cloud.add_site("writer", limits={"disk_mb": 32})
    cloud.publish_and_wait(
        "writer",
        {"app.py": WRITER_APP, "data.txt": b"published-1", "keep.txt": b"published"},
        "/",
        b"writer /",
    )
    for name in ("data.txt", "keep.txt", "made.txt"):
        assert cloud.get("writer", f"/write?{name}")[2] == f"wrote {name}".encode()
        assert cloud.get("writer", f"/read?{name}")[2] == f"app-{name}".encode()
    assert [cloud.get("writer", "/count")[2] for _ in range(2)] == [b"1", b"2"]
    # The published version itself is never written: the app's copies are on its volume.
    sites = Path(cloud.worker.health()["apps_dir"]) / "sites"
    assert (sites / "writer" / "current" / "data.txt").read_bytes() == b"published-1"
    assert not (sites / "writer" / "current" / "made.txt").exists()
    # The site's folder only: the other versions and the site directory stay read-only.
    assert cloud.get("writer", "/outside")[2].startswith(b"OSError: [Errno 30] Read-only file system")
    # Its disk quota counts what it writes there.
    assert cloud.get("writer", "/fill?40")[2].startswith(b"OSError: [Errno 28]")
    assert cloud.get("writer", "/fill?1")[2] == b"filled"

    # A deploy that changes data.txt takes it back from the app's copy; what it did not change stays.
    cloud.publish("writer", {"data.txt": b"published-2", "other.txt": b"new"})
    wait_until(
        lambda: cloud.get("writer", "/read?data.txt")[2] == b"published-2",
        timeout=20,
        what="version 2's data.txt",
    )
    assert cloud.get("writer", "/read?keep.txt")[2] == b"app-keep.txt"
    assert cloud.get("writer", "/read?made.txt")[2] == b"app-made.txt"
    assert cloud.get("writer", "/count")[2] == b"3"
    assert "replaced 1 file the app had changed" in cloud.log("writer")
    # What the app made under its media folder is served as a file where the version has none; its
    # database never is, nor a file at its top (a Python app's paths are its own but those folders).
    assert cloud.get("writer", "/write?media/made.txt")[2] == b"wrote media/made.txt"
    assert cloud.get("writer", "/media/made.txt")[2] == b"app-media/made.txt"
    assert cloud.get("writer", "/made.txt")[2] == b"writer /made.txt"
    assert cloud.get("writer", "/db.sqlite3")[2] == b"writer /db.sqlite3"
    bystander_answers(cloud)


def test_files_the_app_wrote_are_served_and_nothing_it_plants_there_leads_out(cloud: AppCloud) -> None:
    cloud.add_site("uploader", idle_timeout=1)
    cloud.publish_and_wait(
        "uploader", {"app.py": WRITER_APP, "static/index.html": b"published"}, "/hi", b"writer /hi"
    )
    # As an upload form or a CMS's media library does: a file saved under uploads/, then its link.
    assert cloud.get("uploader", "/write?uploads/photo.jpg")[2] == b"wrote uploads/photo.jpg"
    status, headers, body = cloud.get("uploader", "/uploads/photo.jpg")
    assert (status, body) == (200, b"app-uploads/photo.jpg")
    # The app may change it at any time: no cache keeps it unasked.
    assert (headers["content-type"], headers["cache-control"]) == ("image/jpeg", "no-cache")
    assert "x-sitecloud-version" not in headers
    assert cloud.get("uploader", "/uploads/photo.jpg", headers={"If-None-Match": headers["etag"]})[0] == 304
    status, _, body = cloud.get("uploader", "/uploads/photo.jpg", headers={"Range": "bytes=4-9"})
    assert (status, body) == (206, b"upload")
    assert cloud.get("uploader", "/uploads/photo.jpg", method="HEAD")[:2][0] == 200
    # A big one streams whole.
    assert cloud.get("uploader", "/fill?3")[2] == b"filled"
    status, _, body = cloud.get("uploader", "/uploads/big.bin")
    assert (status, len(body), set(body)) == (200, 3 * 1024 * 1024, {ord("x")})

    # What the app plants there is not followed: each goes to the app, as a path with no file does.
    planted = {
        "/symlink?/etc/passwd:uploads/passwd.txt": "/uploads/passwd.txt",
        "/symlink?/:uploads/root": "/uploads/root/etc/hostname",
        "/symlink?../../../../../../etc/passwd:uploads/up.txt": "/uploads/up.txt",
        "/symlink?../../etc:uploads/etc": "/uploads/etc/passwd",
        "/fifo?uploads/pipe.txt": "/uploads/pipe.txt",
        "/write?.env": "/.env",
        "/count": "/db.sqlite3",
    }
    for make, path in planted.items():
        assert cloud.get("uploader", make)[0] == 200
        assert cloud.get("uploader", path)[2] == f"writer {path}".encode(), path
    # A link of the app's own that stays in its folder is followed (storage:link --relative).
    assert cloud.get("uploader", "/symlink?uploads:media")[0] == 200
    assert cloud.get("uploader", "/media/photo.jpg")[::2] == (200, b"app-uploads/photo.jpg")
    # A published file is what its path serves, whatever the app wrote over it.
    assert cloud.get("uploader", "/write?static/index.html")[2] == b"wrote static/index.html"
    assert cloud.get("uploader", "/static/index.html")[2] == b"published"

    # Once the app has idled out and its volume is gone, the file is still served (looked up as the
    # app wakes).
    uid = int(cloud.get("uploader", "/whoami")[2])
    volume = Path(cloud.worker.health()["apps_dir"]) / "apps" / str(uid - UID_BASE) / "volume"
    wait_until(lambda: not os.path.ismount(volume), timeout=15, what="the app to idle out, its volume gone")
    assert cloud.get("uploader", "/uploads/photo.jpg")[:3:2] == (200, b"app-uploads/photo.jpg")
    bystander_answers(cloud)


def test_an_owners_command_runs_in_the_sandbox_once_at_a_time_and_leaves_nothing_behind(
    cloud: AppCloud,
) -> None:
    attacker(cloud, "commander")
    uid = int(cloud.get("commander", "/whoami")[2])
    url = f"{cloud.worker.control_url}/v1/sites/commander/commands"
    ctx = cloud.pki.client_ssl("management")

    def run(command: str, timeout: float = 20) -> tuple[int, Any]:
        return call(url, ctx, method="POST", body={"command": command, "timeout": timeout})

    # It runs as the site's app does: its uid, its folder, no way out to the host's other files.
    status, answer = run(
        "id -u; cat /proc/1/cmdline | tr '\\0' ' '; ls ../../../../etc/shadow 2>&1 | head -1"
    )
    assert status == 200 and answer["exit_code"] == 0, answer
    assert answer["output"].splitlines()[0] == str(uid), answer
    # One at a time per site: a second one while the first runs is refused, saying why.
    slow: dict[str, Any] = {}
    first = threading.Thread(target=lambda: slow.update(answer=run("sleep 2; echo done")))
    first.start()
    wait_until(lambda: "running a command" in cloud.log("commander").splitlines()[-1], timeout=10)
    status, busy = run("echo second")
    first.join(30)
    assert status == 409 and "already running" in busy["error"]["message"], busy
    assert slow["answer"][1]["output"] == "done\n"
    # A daemon it leaves, and one past its time limit, go with it; output past 1 MiB is cut.
    status, answer = run("setsid sh -c 'sleep 300 &' ; echo left")
    assert (status, answer["exit_code"], answer["output"]) == (200, 0, "left\n")
    status, answer = run("sleep 300 & sleep 300", timeout=1)
    assert (status, answer["exit_code"], answer["timed_out"]) == (200, None, True), answer
    wait_until(
        lambda: not uid_processes(uid) or _only_app(uid), timeout=10, what="the command's processes gone"
    )
    status, answer = run("head -c 3000000 /dev/zero | tr '\\0' x")
    assert answer["truncated"] and len(answer["output"]) == 1024 * 1024, len(answer["output"])
    # Absurd requests are refused with what is allowed, and change nothing.
    for body in (
        {"command": ""},
        {"command": "x" * 5000},
        {"command": "ls", "timeout": 10_000},
        {"cmd": "ls"},
    ):
        status, refused = call(url, ctx, method="POST", body=body)
        assert status == 400 and refused["error"]["code"] == "invalid_input", (body, refused)
    bystander_answers(cloud)


def _only_app(uid: int) -> bool:
    """Whether the uid's processes are its app's alone (its server and the sandbox's own)."""
    for pid in uid_processes(uid):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                if b"sleep" in f.read():
                    return False
        except OSError:
            continue
    return True
