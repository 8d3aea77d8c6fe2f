"""Listeners nobody can take: a role's ports stay held by its supervisor across restarts.

A "squatter" process loops on ``bind()`` to the role's ports (SO_REUSEADDR, SO_REUSEPORT, on the
role's address and on the wildcard) while the role restarts under the local fabric's supervisor, the
hostagent, and ``sitecloud up``; a client loop meanwhile connects over and over. The squatter must never
get a port, no client may be refused, and the role must serve again; the longest wait a client saw is
the restart gap (printed, ``pytest -s`` shows it).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import ftplib
import io
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from roles.controller.fabric.base import RoleSpec
from roles.controller.supervisor import RoleProcessSupervisor
from roles.frontend.config import FrontendConfig
from roles.publisher.config import PublisherConfig
from shared.config import RoleConfig, write_role_config
from shared.listeners import HeldListeners, ListenerSpec, bind_listener, listener_specs
from tests.cloud import LocalCloud, running_cloud
from tests.support import CloudPKI, call, wait_until

pytestmark = pytest.mark.timeout(300)

_SQUATTER = r"""
import json, os, socket, sys, time
ports = [int(p) for p in sys.argv[1].split(",")]
stop_file = sys.argv[2]
held, won, tries = [], [], 0
while not os.path.exists(stop_file):
    for port in ports:
        for opt in ("SO_REUSEADDR", "SO_REUSEPORT"):
            for host in ("127.0.0.1", "0.0.0.0"):
                s = socket.socket()
                s.setsockopt(socket.SOL_SOCKET, getattr(socket, opt), 1)
                tries += 1
                try:
                    s.bind((host, port))
                    s.listen(8)
                except OSError:
                    s.close()
                    continue
                held.append(s)
                won.append([host, port, opt])
    time.sleep(0.0005)
print(json.dumps({"tries": tries, "won": won}), flush=True)
"""


@dataclass
class Squatted:
    tries: int = 0
    won: list[list[Any]] = field(default_factory=list)


@contextlib.contextmanager
def squatter(ports: list[int], workdir: Path) -> Iterator[Squatted]:
    """A process that tries to bind ``ports`` in a loop until the block ends; what it got is filled in."""
    stop_file = workdir / "squatter.stop"
    stop_file.unlink(missing_ok=True)
    proc = subprocess.Popen(
        [sys.executable, "-c", _SQUATTER, ",".join(map(str, ports)), str(stop_file)],
        stdout=subprocess.PIPE,
        text=True,
    )
    result = Squatted()
    try:
        time.sleep(0.2)  # it is looping before the restart begins
        yield result
    finally:
        stop_file.touch()
        out, _ = proc.communicate(timeout=20)
        got = json.loads(out)
        result.tries, result.won = got["tries"], got["won"]


def http_probe(port: int) -> str:
    """ "" when a front end answers; else what it did."""
    with socket.create_connection(("127.0.0.1", port), timeout=30) as s:
        s.sendall(b"GET / HTTP/1.1\r\nHost: nosuch.sites.localhost\r\nConnection: close\r\n\r\n")
        head = s.recv(16)
        return "" if head.startswith(b"HTTP/1.1 ") else f"answered {head!r}"


def ftp_probe(port: int) -> str:
    """ "" when an FTP server greets; else what it did."""
    ftp = ftplib.FTP()
    try:
        banner = ftp.connect("127.0.0.1", port, timeout=30)
        return "" if banner.startswith("220") else f"greeted {banner!r}"
    finally:
        ftp.close()


class Prober:
    """Connects to a port over and over from a thread: counts refusals and how long each attempt took."""

    def __init__(self, port: int, probe: Callable[[int], str]) -> None:
        self.port, self.probe = port, probe
        self.ok = 0
        self.refused = 0
        # Closed without a word: accepted by the old process just before its drain closed it as idle.
        self.closed = 0
        self.failures: list[str] = []
        self.longest = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="prober")

    def _run(self) -> None:
        while not self._stop.is_set():
            started = time.monotonic()
            try:
                failure = self.probe(self.port)
                if failure == "answered b''":
                    self.closed += 1
                elif failure:
                    self.failures.append(failure)
                else:
                    self.ok += 1
            except ConnectionRefusedError:
                self.refused += 1
            except ConnectionResetError:
                # The same race as an empty answer, with the request unread when the socket closed.
                self.closed += 1
            except (OSError, EOFError) as exc:
                self.failures.append(repr(exc))
            self.longest = max(self.longest, time.monotonic() - started)
            time.sleep(0.005)

    def __enter__(self) -> Prober:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(60)


def _health(pki: CloudPKI, config: RoleConfig) -> dict[str, Any]:
    status, body = call(f"https://localhost:{config.control_port}/v1/health", pki.client_ssl(), timeout=2)
    assert status == 200, body
    return dict(body)


def _new_pid(pki: CloudPKI, config: RoleConfig, old: int) -> int:
    health = wait_until(
        lambda: (h := _health(pki, config))["pid"] != old and h, timeout=30, what="the restarted role"
    )
    return int(health["pid"])


def _report(what: str, prober: Prober, squatted: Squatted) -> None:
    print(
        f"\n{what}: {prober.ok} answers, {prober.refused} refused, {prober.closed} closed unanswered, "
        f"longest wait {prober.longest * 1000:.0f} ms; "
        f"squatter: {squatted.tries} bind attempts, {len(squatted.won)} won"
    )


def _assert_held(prober: Prober, squatted: Squatted) -> None:
    assert squatted.tries > 1000, "the squatter hardly ran"
    assert squatted.won == [], f"the squatter took a port: {squatted.won}"
    assert prober.refused == 0 and prober.failures == [], (prober.refused, prober.failures[:5])
    # A role's drain closes connections it accepted but has read nothing from yet (the front end's
    # close_if_idle): a race of a few microseconds a restart, not a matter of the held listeners.
    assert prober.closed <= 1
    assert prober.ok > 0


# -- the helper on its own --------------------------------------------------------------------------


def test_the_squatter_takes_a_port_nobody_holds(tmp_path: Path) -> None:
    """The squatter is real: a port that is free for a moment is its own within that moment."""
    sock = bind_listener(ListenerSpec("x", "127.0.0.1", 0))
    port = sock.getsockname()[1]
    with squatter([port], tmp_path) as squatted:
        sock.close()
        time.sleep(0.3)
    assert squatted.won, "the squatter did not take a free port"


def test_specs_come_from_role_json() -> None:
    specs = listener_specs(
        {
            "role": "worker",
            "bind": "0.0.0.0",
            "control_port": 1,
            "data_port": 2,
            "loopback_plain_listen": "127.0.0.1:3",
        }
    )
    assert specs == [
        ListenerSpec("control", "0.0.0.0", 1),
        ListenerSpec("data", "0.0.0.0", 2),
        ListenerSpec("plain", "127.0.0.1", 3),
    ]
    # A plain listener off loopback is refused by the worker; nobody holds one for it either.
    assert [s.name for s in listener_specs({"role": "worker", "loopback_plain_listen": "10.0.0.1:3"})] == [
        "control",
        "data",
    ]
    assert [s.name for s in listener_specs({"role": "publisher"})] == ["control", "ftp", "deploy"]


def test_held_sockets_have_no_reuseport_and_port_zero_is_kept() -> None:
    held = HeldListeners()
    try:
        held.update([ListenerSpec("a", "127.0.0.1", 0)])
        port = held.ports()["a"]
        assert held.socks["a"].getsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT) == 0
        # Port 0 means "any": the port the kernel chose stays held, not a new one each time.
        assert held.update([ListenerSpec("a", "127.0.0.1", 0)]) == [] and held.ports()["a"] == port
        # A changed port is bound anew (and the old one let go).
        other = bind_listener(ListenerSpec("tmp", "127.0.0.1", 0))
        new_port = other.getsockname()[1]
        other.close()
        assert held.update([ListenerSpec("a", "127.0.0.1", new_port)]) == ["a"]
        assert held.ports() == {"a": new_port}
    finally:
        held.close()


_SYSTEMD_STYLE = r"""
import os, socket, sys
sock = socket.socket()
sock.bind(("127.0.0.1", 0))
sock.listen(8)
if sock.fileno() != 3:
    os.dup2(sock.fileno(), 3)
os.set_inheritable(3, True)
os.environ.update(LISTEN_FDS="1", LISTEN_FDNAMES="http", SITECLOUD_LISTEN_FDS="control=99")
code = (
    "import os; from shared.listeners import listener, listening_ports\n"
    "listener('http', '127.0.0.1', 1); listener('control', '127.0.0.1', 0)\n"
    "print(listening_ports()['http'], listening_ports()['control'] != 0,"
    " 'LISTEN_FDS' in os.environ, os.get_inheritable(3))"
)
print(sock.getsockname()[1], flush=True)
os.execv(sys.executable, [sys.executable, "-c", code])
"""


def test_a_role_takes_systemd_style_listeners_and_binds_what_it_was_not_given() -> None:
    """LISTEN_FDS/LISTEN_FDNAMES (a systemd .socket unit) work; a stale descriptor number is skipped."""
    out = subprocess.run(
        [sys.executable, "-c", _SYSTEMD_STYLE], capture_output=True, text=True, check=True, timeout=30
    ).stdout.split()
    given, taken, bound_itself, env_left, inheritable = out
    assert taken == given and bound_itself == "True"
    # Nothing the role starts sees the variables or the descriptor.
    assert env_left == "False" and inheritable == "False"


# -- under the local fabric's supervisor ------------------------------------------------------------


def _frontend(pki: CloudPKI, home: Path, **fields: Any) -> FrontendConfig:
    config = pki.role_config(FrontendConfig, "frontend", home, drain_timeout=2.0, **fields)
    pki.ca.issue_wildcard("sites.localhost").write(config.wildcard_key_file, config.wildcard_cert_file)
    return config


def _inheritable_sockets(pid: int) -> list[str]:
    """Socket descriptors of ``pid`` that a process it starts (a site's app) would inherit."""
    leaks = []
    for fd in os.listdir(f"/proc/{pid}/fd"):
        with contextlib.suppress(OSError):
            if os.readlink(f"/proc/{pid}/fd/{fd}").startswith("socket:"):
                flags = Path(f"/proc/{pid}/fdinfo/{fd}").read_text().split("flags:", 1)[1].split()[0]
                if not int(flags, 8) & os.O_CLOEXEC:
                    leaks.append(fd)
    return leaks


@pytest.mark.parametrize("processes", [1, 2])
async def test_frontend_restart_under_the_supervisor_never_frees_its_ports(
    pki: CloudPKI, tmp_path: Path, processes: int
) -> None:
    """With two serving processes they share the held listeners (no SO_REUSEPORT sockets of their own)."""
    config = _frontend(pki, tmp_path / "frontend", processes=processes)
    supervisor = RoleProcessSupervisor(
        RoleSpec("frontend", "localhost", config.home), tmp_path / "frontend.log"
    )
    await supervisor.start()
    try:
        first = await asyncio.to_thread(
            wait_until, lambda: _health(pki, config), timeout=30, what="the front end's health"
        )
        assert supervisor.listeners == {
            "control": config.control_port,
            "http": config.http_port,
            "https": config.https_port,
            "metrics": config.metrics_port,
        }
        # The role reports the real ports (its main process hands the data ones to serving processes).
        assert first["listeners"] == supervisor.listeners
        assert _inheritable_sockets(first["pid"]) == []
        if processes > 1:
            children = await asyncio.to_thread(
                wait_until, lambda: len(p := _health(pki, config)["serving_pids"]) == 2 and p, what="children"
            )
            for pid in children:  # once started, the inherited descriptors are close-on-exec again
                await asyncio.to_thread(
                    wait_until,
                    lambda pid=pid: _inheritable_sockets(pid) == [],
                    what="close-on-exec listeners",
                )
        ports = [config.http_port, config.https_port, config.control_port]
        with squatter(ports, tmp_path) as squatted, Prober(config.http_port, http_probe) as prober:
            for _ in range(2):
                old = (await asyncio.to_thread(_health, pki, config))["pid"]
                await supervisor.restart()
                await asyncio.to_thread(_new_pid, pki, config, old)
        _report(f"front end restart, {processes} process(es) (supervisor)", prober, squatted)
        _assert_held(prober, squatted)
        # And once stopped for good, the ports are free again.
        await supervisor.stop()
        bind_listener(ListenerSpec("http", "127.0.0.1", config.http_port)).close()
    finally:
        await supervisor.stop()


async def test_port_zero_is_chosen_once_by_the_supervisor_and_kept(pki: CloudPKI, tmp_path: Path) -> None:
    """A config that says port 0: the supervisor's bind picks the port, the role reports it, and a
    restart keeps it (a role binding for itself would get a new one each time)."""
    config = pki.role_config(PublisherConfig, "publisher", tmp_path / "publisher")
    write_role_config(dataclasses.replace(config, ftp_port=0, deploy_port=0), config.home / "role.json")
    supervisor = RoleProcessSupervisor(RoleSpec("publisher", "localhost", config.home), tmp_path / "pub.log")
    await supervisor.start()
    try:
        held = supervisor.listeners
        assert held["ftp"] and held["deploy"] and held["control"] == config.control_port
        first = await asyncio.to_thread(
            wait_until, lambda: _health(pki, config), timeout=30, what="the publisher's health"
        )
        assert first["listeners"] == held and first["ftp_port"] == held["ftp"]
        assert await asyncio.to_thread(ftp_probe, held["ftp"]) == ""
        await supervisor.restart()
        await asyncio.to_thread(_new_pid, pki, config, first["pid"])
        assert supervisor.listeners == held
        assert (await asyncio.to_thread(_health, pki, config))["listeners"] == held
    finally:
        await supervisor.stop()


_CRASHING_CONTROLLER = r"""
import asyncio, sys
from pathlib import Path
from roles.controller.fabric.base import RoleSpec
from roles.controller.supervisor import RoleProcessSupervisor

async def main():
    home = Path(sys.argv[1])
    sup = RoleProcessSupervisor(RoleSpec("publisher", "localhost", home), home.parent / "publisher.log")
    await sup.start()
    print("started", flush=True)
    await asyncio.Event().wait()

asyncio.run(main())
"""


async def test_a_new_controller_adopts_the_role_and_takes_its_listeners_back(
    pki: CloudPKI, tmp_path: Path
) -> None:
    """The controller dies (SIGKILL); the next one adopts the running publisher, gets its listeners
    from it over SCM_RIGHTS, and its restart of the publisher still never frees the FTP port."""
    config = pki.role_config(PublisherConfig, "publisher", tmp_path / "publisher")
    crashing = subprocess.Popen(
        [sys.executable, "-c", _CRASHING_CONTROLLER, str(config.home)], stdout=subprocess.PIPE, text=True
    )
    assert crashing.stdout is not None and crashing.stdout.readline().strip() == "started"
    first = await asyncio.to_thread(
        wait_until, lambda: _health(pki, config), timeout=30, what="the publisher's health"
    )
    crashing.kill()
    crashing.wait()
    crashing.stdout.close()

    supervisor = RoleProcessSupervisor(RoleSpec("publisher", "localhost", config.home), tmp_path / "pub.log")
    try:
        await supervisor.start()
        assert supervisor.pid == first["pid"]
        assert supervisor.listeners == {
            "control": config.control_port,
            "ftp": config.ftp_port,
            "deploy": config.deploy_port,
            "metrics": config.metrics_port,
        }
        ports = [config.ftp_port, config.deploy_port, config.control_port]
        with squatter(ports, tmp_path) as squatted, Prober(config.ftp_port, ftp_probe) as prober:
            await supervisor.restart()
            await asyncio.to_thread(_new_pid, pki, config, first["pid"])
        _report("publisher restart after adoption (supervisor)", prober, squatted)
        _assert_held(prober, squatted)
    finally:
        await supervisor.stop()


# -- through the hostagent ---------------------------------------------------------------------------


def _agent(action: str, config: Path) -> dict[str, Any]:
    out = subprocess.run(
        [sys.executable, "-m", "roles.controller.hostagent", action, "--config", str(config)],
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    ).stdout
    return dict(json.loads(out))


@pytest.fixture
def publisher(pki: CloudPKI, tmp_path: Path) -> Iterator[PublisherConfig]:
    config = pki.role_config(PublisherConfig, "publisher", tmp_path / "publisher")
    try:
        yield config
    finally:
        _agent("stop", config.home / "role.json")


def test_publisher_restart_through_the_hostagent_never_frees_its_ports(
    pki: CloudPKI, publisher: PublisherConfig, tmp_path: Path
) -> None:
    role_json = publisher.home / "role.json"
    started = _agent("start", role_json)
    first = wait_until(lambda: _health(pki, publisher), timeout=30, what="the publisher's health")
    status = wait_until(lambda: (s := _agent("status", role_json))["listeners"] and s, what="held listeners")
    assert status["listeners"] == {
        "control": publisher.control_port,
        "ftp": publisher.ftp_port,
        "deploy": publisher.deploy_port,
        "metrics": publisher.metrics_port,
    }
    ports = [publisher.ftp_port, publisher.deploy_port, publisher.control_port]
    with squatter(ports, tmp_path) as squatted, Prober(publisher.ftp_port, ftp_probe) as prober:
        restarted = _agent("restart", role_json)
        second = _new_pid(pki, publisher, first["pid"])
        # The agent is a new one (as after an upgrade), the listeners the same.
        assert restarted["agent_pid"] != started["agent_pid"]

        # An agent that is killed leaves its role running; the next one adopts it and its listeners.
        os.kill(restarted["agent_pid"], signal.SIGKILL)
        wait_until(lambda: _agent("status", role_json)["agent_pid"] is None, what="the agent to be gone")
        adopted = _agent("start", role_json)
        assert wait_until(lambda: _agent("status", role_json)["role_pid"], what="an adopted role") == second
        assert adopted["agent_pid"] != restarted["agent_pid"]
        _agent("restart", role_json)
        _new_pid(pki, publisher, second)
    _report("publisher restarts (hostagent)", prober, squatted)
    _assert_held(prober, squatted)


# -- through `sitecloud up` and `sitecloud role restart` ----------------------------------------------


@pytest.fixture(scope="module")
def cloud(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalCloud]:
    yield from running_cloud(tmp_path_factory)


@pytest.mark.parametrize("role", ["frontend", "publisher"])
def test_role_restart_in_a_local_cloud_never_frees_its_ports(
    cloud: LocalCloud, role: str, tmp_path: Path
) -> None:
    if role == "frontend":
        ports, port, probe = (
            [cloud.ports["http_port"], cloud.ports["https_port"]],
            cloud.ports["http_port"],
            http_probe,
        )
    else:
        ports, port, probe = (
            [cloud.ports["ftp_port"], cloud.ports["deploy_port"]],
            cloud.ports["ftp_port"],
            ftp_probe,
        )
    before = cloud.role_pids()[role]
    with squatter(ports, tmp_path) as squatted, Prober(port, probe) as prober:
        done = cloud.cli("role", "restart", role, "localhost")
        assert done["state"] == "Ready"
        wait_until(lambda: (pid := cloud.role_pids().get(role)) and pid != before, what=f"a new {role}")
    _report(f"sitecloud role restart {role}", prober, squatted)
    _assert_held(prober, squatted)


def test_a_forced_upgrade_never_frees_a_port(cloud: LocalCloud, tmp_path: Path) -> None:
    """`sitecloud upgrade --force` restarts every local role but management, one after another; a
    site published before is served after it. (With one worker a site has no worker while that one
    restarts, so the client loop asks the front end for no site in particular.)"""
    cloud.cli("plan", "create", "listeners", "--max-sites", "2", "--storage-mb", "5")
    cloud.cli("tenant", "create", "held")
    sub = cloud.cli("subscription", "create", "--tenant", "held", "--plan", "listeners")
    site = cloud.cli("site", "create", "held", "--subscription", str(sub["id"]))
    ftp = ftplib.FTP()
    ftp.connect("127.0.0.1", site["ftp"]["port"], timeout=10)
    ftp.login(site["ftp"]["user"], site["ftp"]["password"])
    ftp.storbinary("STOR index.html", io.BytesIO(b"held page"))
    ftp.quit()
    cloud.wait_for_content("held", "/", b"held page", timeout=30)

    names = ("http_port", "https_port", "ftp_port", "deploy_port")
    before = cloud.role_pids()
    with (
        squatter([cloud.ports[n] for n in names], tmp_path) as squatted,
        Prober(cloud.ports["http_port"], http_probe) as prober,
    ):
        done = cloud.cli("upgrade", "--force", timeout=180)
    assert sorted(r["role"] for r in done["upgraded"]) == ["fileserver", "frontend", "publisher", "worker"]
    after = cloud.role_pids()
    assert all(after[r] != before[r] for r in ("fileserver", "frontend", "publisher", "worker"))
    _report("sitecloud upgrade --force (front end's HTTP port)", prober, squatted)
    _assert_held(prober, squatted)
    assert cloud.get("held", "/")[::2] == (200, b"held page")


def test_an_upgrade_rolls_the_local_roles_started_on_older_code(cloud: LocalCloud) -> None:
    # Each local role's process records the checkout's code it was started from: a plain upgrade
    # leaves those on the current code, and restarts one on older code (the checkout pulled since).
    digest = cloud.cli("upgrade", timeout=180)["code"]
    before = cloud.role_pids()
    assert (cloud.home / "roles" / "publisher" / "code.hash").read_text().strip() == digest
    (cloud.home / "roles" / "publisher" / "code.hash").write_text("0123456789abcdef\n")
    done = cloud.cli("upgrade", timeout=180)
    assert [r["role"] for r in done["upgraded"]] == ["publisher"], done
    skipped = {r["role"]: r["reason"] for r in done["skipped"]}
    assert skipped["worker"] == f"already on {digest}", skipped
    after = cloud.role_pids()
    assert after["publisher"] != before["publisher"] and after["worker"] == before["worker"]
    assert (cloud.home / "roles" / "publisher" / "code.hash").read_text().strip() == digest
