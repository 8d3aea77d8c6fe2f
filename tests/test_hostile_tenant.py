"""A hostile tenant against the cloud as users run it (`sitecloud up`): every attack must fail, and
another tenant's sites must keep answering with their exact content (and its FTP keep working).

One cloud for the module. Two tenants: a victim with a static site and a dynamic Python site, an
attacker with a Python site (``tests/data/hostile/attacker_app.py``: one path per attack, the outcome
in its JSON answer) and a PHP site (``attacker.php``). Each attack is a test of its own; each loop in
here and in the attacker's app is bounded in count and time, and every process an attack starts is
gone when the module ends.
"""

from __future__ import annotations

import base64
import collections
import concurrent.futures
import contextlib
import ftplib
import http.client
import io
import json
import os
import secrets
import shutil
import signal
import socket
import ssl
import subprocess
import tempfile
import threading
import time
import urllib.parse
import zipfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from roles.worker._layout import apps_root_home
from roles.worker.apps._instance import LOG_BURST_BYTES, LOG_BYTES_PER_SECOND
from roles.worker.apps._isolation import reap_orphans
from tests.cloud import LocalCloud, SiteConnection
from tests.support import wait_until

pytestmark = [
    pytest.mark.timeout(300),
    pytest.mark.skipif(
        os.geteuid() != 0, reason="sites run as uids of their own only when the worker is root"
    ),
]

DATA = Path(__file__).parent / "data" / "hostile"
MB = 1024 * 1024
# The attacker's plan: a small worker (256 MB of memory per app) and 20 MB of storage.
ATTACK_STORAGE_MB = 20
ATTACK_MEMORY_MB = 256
# The error codes of shared/errors.py that are a 400.
BAD_REQUEST_CODES = ("invalid_input", "bad_request")
# The attacker's own addresses for the abuse tests (idle connections, password guessing); the victim
# connects from 127.0.0.1.
ATTACKER_ADDRESS = "127.0.0.2"
GUESSER_ADDRESS = "127.0.0.3"

VICTIM_APP = b"""
import os

def app(environ, start_response):
    body = ("victim app says %s at %s" % (os.environ.get("GREETING", "?"), environ["PATH_INFO"])).encode()
    start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", str(len(body)))])
    return [body]
"""


@dataclass
class Site:
    name: str
    ftp_host: str
    ftp_port: int
    user: str
    password: str

    @classmethod
    def of(cls, created: dict[str, Any]) -> Site:
        ftp = created["ftp"]
        return cls(created["name"], ftp["host"], int(ftp["port"]), ftp["user"], ftp["password"])


@dataclass
class World:
    tag: str
    victim_token: str
    attacker_token: str
    victim_subscription: str
    victim_static: Site
    victim_py: Site
    victim_src: Site
    attacker_py: Site
    attacker_php: Site | None
    static_body: bytes
    greeting: str = "hello"

    def victim_app_body(self, path: str) -> bytes:
        return f"victim app says {self.greeting} at {path}".encode()


# --- helpers


def _ftp(site: Site, *, source: str = "127.0.0.1", timeout: float = 10) -> ftplib.FTP:
    ftp = ftplib.FTP(timeout=timeout, source_address=(source, 0))
    try:
        ftp.connect(site.ftp_host, site.ftp_port)
        ftp.login(site.user, site.password)
    except BaseException:
        ftp.close()
        raise
    return ftp


def _publish(site: Site, files: dict[str, bytes]) -> None:
    ftp = _ftp(site)
    try:
        for name, data in files.items():
            ftp.storbinary(f"STOR {name}", io.BytesIO(data))
    finally:
        ftp.quit()


class _Connection(SiteConnection):
    """A site connection that closes its socket when the TLS handshake fails (a squatter's port)."""

    def connect(self) -> None:
        sock = socket.create_connection((self.host, self.port), self.timeout)
        try:
            self.sock = self._site_context.wrap_socket(sock, server_hostname=self._server_name)
        except BaseException:
            sock.close()
            raise


def _get(
    cloud: LocalCloud, site: str, path: str, *, timeout: float = 10
) -> tuple[int, dict[str, str], bytes]:
    conn = _Connection(cloud.ports["https_port"], f"{site}.{cloud.domain}", cloud.ca_file)
    conn.timeout = timeout
    try:
        conn.request("GET", path, headers={"Host": f"{site}.{cloud.domain}"})
        resp = conn.getresponse()
        return resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read()
    finally:
        conn.close()


def _attack(cloud: LocalCloud, route: str, *, timeout: float = 30, **query: Any) -> tuple[int, Any]:
    """One attack by the attacker's Python app; its JSON answer (or the status when there is none)."""
    url = route + ("?" + urllib.parse.urlencode(query) if query else "")
    status, _, body = _get(cloud, "attacker-py", url, timeout=timeout)
    try:
        return status, json.loads(body)
    except ValueError:
        return status, body.decode(errors="replace")


def _api(
    cloud: LocalCloud,
    method: str,
    path: str,
    *,
    body: bytes | None = None,
    headers: dict[str, str | bytes] | None = None,
    token: str | None = None,
) -> tuple[int, bytes]:
    context = ssl.create_default_context(cafile=str(cloud.ca_file))
    conn = http.client.HTTPSConnection("127.0.0.1", cloud.ports["api_port"], context=context, timeout=15)
    try:
        conn.putrequest(method, path)
        all_headers: dict[str, str | bytes] = {"Content-Type": "application/json"}
        if token is not None:
            all_headers["Authorization"] = f"Bearer {token}"
        all_headers.update(headers or {})
        for key, value in all_headers.items():
            conn.putheader(key, value)
        conn.putheader("Content-Length", str(len(body or b"")))
        conn.endheaders(body)
        resp = conn.getresponse()
        return resp.status, resp.read()
    finally:
        conn.close()


def _deploy(
    cloud: LocalCloud, site: Site, user: str, password: str, archive: bytes, *, source: str = "127.0.0.1"
) -> tuple[int, bytes]:
    context = ssl.create_default_context(cafile=str(cloud.ca_file))
    conn = http.client.HTTPSConnection(
        "127.0.0.1", cloud.ports["deploy_port"], context=context, timeout=15, source_address=(source, 0)
    )
    auth = base64.b64encode(f"{user}:{password}".encode()).decode()
    try:
        conn.request(
            "POST",
            f"/api/deploy/{site.name}",
            body=archive,
            headers={"Authorization": f"Basic {auth}", "Content-Type": "application/zip"},
        )
        resp = conn.getresponse()
        return resp.status, resp.read()
    finally:
        conn.close()


def _zip(files: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for name, data in files.items():
            zf.writestr(name, data)
    return buf.getvalue()


def _log_lines(cloud: LocalCloud, site: str) -> list[str]:
    got = cloud.cli("site", "logs", site, "--lines", "500", check=False)
    return [str(line) for line in got.get("lines", [])] if isinstance(got, dict) else []


def _wait_logged(
    cloud: LocalCloud, site: str, words: tuple[str, ...], what: str, *, before: list[str]
) -> None:
    """A new line of the site's log says why within a few seconds (one of ``words``, any case)."""

    def new_text() -> str:
        # Counted, not a set: the same line (to the second) can come again, e.g. a second full disk.
        seen = collections.Counter(before)
        new = []
        for line in _log_lines(cloud, site):
            if seen[line] > 0:
                seen[line] -= 1
            else:
                new.append(line)
        return "\n".join(new)

    try:
        wait_until(lambda: any(w in new_text().lower() for w in words), timeout=10, interval=0.5, what=what)
    except AssertionError:
        raise AssertionError(
            f"{what}; the site's new log lines:\n{new_text()[-3000:]}\n{_worker_log(cloud)[-6000:]}"
        ) from None


def _worker_log(cloud: LocalCloud) -> str:
    path = cloud.home / "logs" / "worker.log"
    return path.read_text(errors="replace") if path.exists() else f"(no {path})"


def _restart_site(cloud: LocalCloud, site: str) -> None:
    cloud.cli("site", "stop", site)
    cloud.cli("site", "start", site)


def _procs_with(marker: bytes) -> list[int]:
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and entry.name != str(os.getpid()):
            with contextlib.suppress(OSError):
                if marker in (entry / "cmdline").read_bytes():
                    pids.append(int(entry.name))
    return pids


def _procs_of_uid(uid: int) -> list[int]:
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError):
                if entry.stat().st_uid == uid:
                    pids.append(int(entry.name))
    return pids


def _host_listening() -> set[int]:
    """Loopback and wildcard TCP listeners of the host's own network namespace."""
    ports = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with contextlib.suppress(OSError), open(table) as f:
            next(f)
            for line in f:
                fields = line.split()
                address, port = fields[1].split(":")
                if fields[3] == "0A" and (address.endswith("0100007F") or set(address) == {"0"}):
                    ports.add(int(port, 16))
    return ports


def assert_victim_ok(cloud: LocalCloud, world: World, *, within: float = 0) -> None:
    """The victim's sites answer with their exact content, and its FTP login works."""

    def check() -> bool:
        status, _, body = _get(cloud, "victim-static", "/")
        assert (status, body) == (200, world.static_body), (status, body[:200])
        path = f"/v{secrets.token_hex(2)}"
        status, _, body = _get(cloud, "victim-py", path)
        assert (status, body) == (200, world.victim_app_body(path)), (status, body[:200])
        ftp = _ftp(world.victim_static)
        try:
            assert "index.html" in ftp.nlst()
        finally:
            ftp.quit()
        return True

    if within:
        wait_until(check, timeout=within, interval=0.2, what="the victim's sites to answer as before")
    else:
        check()


# --- the cloud and the two tenants


@pytest.fixture(scope="module")
def hostile_home() -> Iterator[Path]:
    """A traversable cloud home outside /tmp.

    Other pytest sessions on this machine remove the /var/lib/sitecloud/apps-* directories of homes
    under /tmp that their session saw appear (tests/conftest.py); this module's worker must keep its
    own while it runs, so it removes that directory itself.
    """
    root = Path(tempfile.mkdtemp(prefix="sitecloud-hostile-", dir="/var/tmp"))
    os.chmod(root, 0o711)
    home = root / "home"
    yield home
    worker_home = os.path.realpath(home / "roles" / "worker")
    for made in Path("/var/lib/sitecloud").glob("apps-*"):
        if apps_root_home(made) == worker_home:
            # Apps whose HOME is there, should any be left (LocalCloud reaps the home's only).
            reap_orphans(made / "apps")
            shutil.rmtree(made, ignore_errors=True)
    shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="module")
def cloud(hostile_home: Path) -> Iterator[LocalCloud]:
    cloud = LocalCloud(hostile_home)
    try:
        # Inside the try: a cloud that fails to come up still has roles to stop.
        cloud.start()
        yield cloud
    finally:
        cloud.kill_everything()


@pytest.fixture(scope="module")
def world(cloud: LocalCloud) -> Iterator[World]:
    tag = secrets.token_hex(4)
    cloud.cli("plan", "create", "victim-plan", "--max-sites", "5", "--storage-mb", "50")
    cloud.cli(
        "plan", "create", "attack-plan", "--max-sites", "5", "--storage-mb", str(ATTACK_STORAGE_MB),
        "--worker-size", "small",
    )  # fmt: skip
    tokens = {}
    subs = {}
    for tenant, plan in (("victim", "victim-plan"), ("attacker", "attack-plan")):
        tokens[tenant] = cloud.cli("tenant", "create", tenant)["token"]
        subs[tenant] = str(cloud.cli("subscription", "create", "--tenant", tenant, "--plan", plan)["id"])

    def create(name: str, tenant: str) -> Site:
        return Site.of(cloud.cli("site", "create", name, "--subscription", subs[tenant]))

    victim_static = create("victim-static", "victim")
    victim_py = create("victim-py", "victim")
    victim_src = create("victim-src", "victim")
    attacker_py = create("attacker-py", "attacker")
    php = shutil.which("php-cgi") is not None
    attacker_php = create("attacker-php", "attacker") if php else None
    world = World(
        tag=tag,
        victim_token=tokens["victim"],
        attacker_token=tokens["attacker"],
        victim_subscription=subs["victim"],
        victim_static=victim_static,
        victim_py=victim_py,
        victim_src=victim_src,
        attacker_py=attacker_py,
        attacker_php=attacker_php,
        static_body=f"<h1>the victim's own page {tag}</h1>".encode(),
    )
    cloud.cli("site", "set", "victim-py", "GREETING=hello", "runtime=python", "entry=app:app")
    cloud.cli("site", "set", "attacker-py", "runtime=python", "entry=app:app")
    _publish(victim_static, {"index.html": world.static_body})
    _publish(victim_py, {"app.py": VICTIM_APP})
    _publish(attacker_py, {"app.py": (DATA / "attacker_app.py").read_bytes()})
    if attacker_php is not None:
        _publish(attacker_php, {"index.php": (DATA / "attacker.php").read_bytes()})
    cloud.wait_for_content("victim-static", "/", world.static_body, timeout=30)
    cloud.wait_for_content("victim-py", "/start", world.victim_app_body("/start"), timeout=30)
    cloud.wait_for_content("attacker-py", "/", b"attacker here", timeout=30)
    try:
        yield world
    finally:
        _clean_up_attacks(tag)


def _clean_up_attacks(tag: str) -> None:
    """Whatever an attack that worked left behind on the host: processes and files."""
    for pid in _procs_with(b"hostile-escape-"):
        with contextlib.suppress(OSError):
            os.kill(pid, signal.SIGKILL)
    for directory in (Path("/dev/shm"), Path("/tmp")):
        for leftover in directory.glob(f"hostile-*{tag}*"):
            with contextlib.suppress(OSError):
                leftover.unlink()


@pytest.fixture(autouse=True)
def attacker_up(cloud: LocalCloud, world: World) -> None:
    """Each attack starts with the attacker's app answering (an earlier one may have had it killed)."""
    cloud.wait_for_content("attacker-py", "/", b"attacker here", timeout=30)


# --- 1. squat the roles' ports across their restart


def _timed_restart(cloud: LocalCloud, role: str) -> str:
    started = time.monotonic()
    try:
        got = json.dumps(cloud.cli("role", "restart", role, "localhost", check=False, timeout=45))[:200]
    except subprocess.TimeoutExpired:
        got = "timed out"
    return f"{got} after {time.monotonic() - started:.1f}s"


class VictimProbe:
    """Visits the victim's static site (and logs in to its FTP) in a loop while roles restart."""

    def __init__(self, cloud: LocalCloud, world: World) -> None:
        self.cloud, self.world = cloud, world
        self.wrong: list[str] = []  # answered, but not with the victim's page: someone else answered
        self.refused: list[str] = []  # the port was free: anyone could have taken it
        self.other: list[str] = []  # dropped connections and the like, tolerated during a restart
        self.ok = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="victim-probe")

    def __enter__(self) -> VictimProbe:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=30)

    def _once(self, what: str, call: Callable[[], Any]) -> None:
        try:
            result = call()
        except ConnectionRefusedError as err:
            self.refused.append(f"{what}: {err}")
        except (OSError, EOFError, ftplib.Error, http.client.HTTPException) as err:
            self.other.append(f"{what}: {type(err).__name__} {err}"[:200])
        else:
            if result is True:
                self.ok += 1
            else:
                self.wrong.append(f"{what}: {result!r}"[:300])

    def _run(self) -> None:
        deadline = time.monotonic() + 120
        round_ = 0
        while not self._stop.is_set() and time.monotonic() < deadline:
            self._once("https", self._page)
            if round_ % 3 == 0:
                self._once("ftp", self._ftp_login)
            round_ += 1
            self._stop.wait(0.1)

    def _page(self) -> bool | tuple[int, bytes]:
        status, _, body = _get(self.cloud, "victim-static", "/", timeout=5)
        return (status, body) == (200, self.world.static_body) or (status, body[:100])

    def _ftp_login(self) -> bool | str:
        ftp = _ftp(self.world.victim_static, timeout=5)
        try:
            names = ftp.nlst()
            return "index.html" in names or f"listing {names}"
        finally:
            ftp.close()


@pytest.mark.parametrize("mode", ["reuseaddr", "reuseport"])
def test_squatting_the_roles_ports_across_a_restart_catches_nothing(
    cloud: LocalCloud, world: World, mode: str
) -> None:
    tag = f"{mode}-{world.tag}"
    ftp_port, deploy_port = cloud.ports["ftp_port"], cloud.ports["deploy_port"]
    ports = [cloud.ports["http_port"], cloud.ports["https_port"], ftp_port, deploy_port]
    status, started = _attack(
        cloud, "/squat", ports=",".join(map(str, ports)), ftp=ftp_port, mode=mode, secs=15, tag=tag
    )
    assert status == 200 and started == {"started": tag}, (status, started)

    def record() -> dict[str, Any]:
        _, answer = _attack(cloud, "/read-home", name=f"squat-{tag}.json")
        assert answer["found"], answer
        return dict(answer["data"])

    wait_until(record, timeout=10, what="the squatter to start")
    restarts: dict[str, str] = {}
    try:
        with VictimProbe(cloud, world) as probe:
            # Both at once, so that one squatter's lifetime covers both restarts.
            with concurrent.futures.ThreadPoolExecutor(max_workers=2) as pool:
                timed = pool.map(_timed_restart, [cloud, cloud], ["frontend", "publisher"])
                restarts = dict(zip(["frontend", "publisher"], timed, strict=True))
            # The roles held their listeners: the victim is served and logs in right away.
            after_restarts = ""
            try:
                assert_victim_ok(cloud, world, within=10)
            except AssertionError as err:
                after_restarts = str(err)
    finally:
        with contextlib.suppress(AssertionError, OSError, http.client.HTTPException):
            _attack(cloud, "/stop-squat", tag=tag, timeout=5)
        # The squatter ends within its 15 s at most; wait for that (and for the front end) to read it.
        got = wait_until(
            lambda: (r := record())["done"] and r, timeout=40, interval=0.5, what="the squatter's record"
        )
    seen = f"restarts {restarts}; victim probes: {probe.ok} ok, refused {probe.refused[:3]}, other {probe.other[:3]}"
    caught: dict[int, int] = {}
    for hit in got["accepted"]:
        caught[hit["port"]] = caught.get(hit["port"], 0) + 1
    ftp_caught = [hit["data"] for hit in got["accepted"] if hit["port"] == ftp_port][:1]
    assert not caught, (
        f"the squatter bound {got['bound']} and caught connections {caught} (ports {cloud.ports}), "
        f"FTP: {ftp_caught!r}; {seen}"
    )
    assert not probe.wrong, f"the victim got another answer during the restarts: {probe.wrong[:5]}; {seen}"
    assert not probe.refused, f"the roles' ports were free during the restarts; {seen}"
    assert not after_restarts, f"the victim is not served after the restarts: {after_restarts}; {seen}"
    assert probe.ok > 0, seen
    assert_victim_ok(cloud, world)


# --- 2. memory: /dev/shm and /tmp


@pytest.mark.parametrize("directory", ["/dev/shm", "/tmp"])
def test_writing_past_the_memory_limit_into_tmpfs_fails_and_leaves_nothing(
    cloud: LocalCloud, world: World, directory: str
) -> None:
    name = f"hostile-mem-{world.tag}"
    path = f"{directory}/{name}"
    before = _log_lines(cloud, "attacker-py")
    try:
        status, answer = _attack(cloud, "/write", path=path, mb=400, timeout=60)
        if status == 200:
            assert answer["error"] in {"ENOSPC", "ENOMEM", "EDQUOT", "EFBIG"}, (
                f"the app wrote {answer['written'] // MB} MB into {directory} past its "
                f"{ATTACK_MEMORY_MB} MB limit: {answer}"
            )
            assert answer["written"] <= (ATTACK_MEMORY_MB + 16) * MB, answer
        else:
            assert status in (502, 503, 504), (status, answer)
            _wait_logged(cloud, "attacker-py", ("memory",), "a memory kill in the site's log", before=before)
        assert not Path(directory, name).exists(), f"host {directory} holds the app's file"
        _restart_site(cloud, "attacker-py")
        status, answer = wait_until(
            lambda: (got := _attack(cloud, "/stat", path=path))[0] == 200 and got,
            timeout=20,
            what="the attacker's app to answer again",
        )
        assert not answer["exists"], f"{path} outlived the app: {answer}"
        assert not Path(directory, name).exists(), f"host {directory} holds the app's file"
    finally:
        with contextlib.suppress(OSError):
            Path(directory, name).unlink()
    assert_victim_ok(cloud, world)


# --- 3. escape by double fork and setsid


def test_a_double_forked_setsid_orphan_does_not_survive_the_site_stop(
    cloud: LocalCloud, world: World
) -> None:
    marker = f"hostile-escape-{world.tag}".encode()
    status, answer = _attack(cloud, "/escape", tag=world.tag, secs=90)
    assert status == 200, (status, answer)
    pids = wait_until(lambda: _procs_with(marker), timeout=5, what="the orphan to run")
    uid = Path(f"/proc/{pids[0]}").stat().st_uid
    assert uid != 0, "the orphan runs as root"
    try:
        cloud.cli("site", "stop", "attacker-py")
        # The worker's grace between SIGTERM and SIGKILL is 5 s.
        with contextlib.suppress(AssertionError):
            wait_until(lambda: not _procs_with(marker), timeout=10, interval=0.2, what="the orphan to end")
        survivors = _procs_with(marker)
        assert not survivors, f"processes {survivors} of the stopped site survive (uid {uid})"
        # Killed processes take a moment to be reaped (one was seen in /proc 0 ms before it was gone).
        with contextlib.suppress(AssertionError):
            wait_until(
                lambda: not _procs_of_uid(uid), timeout=3, interval=0.1, what="the uid's processes to go"
            )
        assert not _procs_of_uid(uid), f"uid {uid} still runs {_procs_of_uid(uid)} after the site stopped"
    finally:
        cloud.cli("site", "start", "attacker-py")
        for pid in _procs_with(marker):
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)
    cloud.wait_for_content("attacker-py", "/", b"attacker here", timeout=20)
    assert_victim_ok(cloud, world)


# --- 4. disk

DISK_WORDS = ("quota", "disk", "space", "storage", "full")


@pytest.mark.parametrize("where", ["$HOME", "$TMPDIR"])
def test_filling_home_or_tmpdir_past_the_plan_storage_is_refused_and_logged(
    cloud: LocalCloud, world: World, where: str
) -> None:
    mb = max(3 * ATTACK_STORAGE_MB, ATTACK_MEMORY_MB + 144)
    before = _log_lines(cloud, "attacker-py")
    status, answer = _attack(cloud, "/write", path=f"{where}/hostile-fill-{world.tag}", mb=mb, timeout=60)
    try:
        if status == 200:
            assert answer["error"] in {"ENOSPC", "EDQUOT", "ENOMEM"}, (
                f"the app wrote {answer['written'] // MB} MB into {where} with "
                f"{ATTACK_STORAGE_MB} MB of storage: {answer}"
            )
            # The full disk stays full until the line is there: the worker notices it on its rounds.
            _wait_logged(
                cloud,
                "attacker-py",
                DISK_WORDS,
                f"a full-disk line in the site's log ({answer})",
                before=before,
            )
        else:
            assert status in (502, 503, 504), (status, answer)
            words = ("memory", *DISK_WORDS)
            _wait_logged(cloud, "attacker-py", words, "why the app died in its log", before=before)
    finally:
        if status == 200:
            with contextlib.suppress(OSError, http.client.HTTPException):
                _attack(cloud, "/rm", path=answer["path"])
    # Until the worker has seen the disk with room again, a second fill is the same full-disk episode.
    wait_until(
        lambda: [a.get("disk_full") for a in cloud.cli("site", "show", "attacker-py")["apps"]] == [False],
        timeout=15,
        interval=0.5,
        what="the worker to see the disk with room again",
    )
    cloud.wait_for_content("attacker-py", "/", b"attacker here", timeout=20)
    assert_victim_ok(cloud, world)


# --- 5. loopback scan


def _role_ports(cloud: LocalCloud) -> set[int]:
    ports = set(cloud.ports.values())
    for config in (cloud.home / "roles").glob("*/role.json"):
        raw = json.loads(config.read_text())
        ports |= {v for k, v in raw.items() if k.endswith("_port") and isinstance(v, int) and v}
    endpoints = json.loads((cloud.home / "endpoints.json").read_text())
    ports.add(urllib.parse.urlsplit(endpoints["controller"]).port or 0)
    return ports - {0}


def _command_port(site: str) -> int | None:
    """The port a site's Procfile command listens on (its PORT), as the host sees its process."""
    for entry in Path("/proc").iterdir():
        with contextlib.suppress(OSError, ValueError):
            environ = (entry / "environ").read_bytes().split(b"\0")
            if entry.name.isdigit() and f"SITECLOUD_SITE={site}".encode() in environ:
                return next(int(v[5:]) for v in environ if v.startswith(b"PORT="))
    return None


def test_the_app_reaches_no_role_port_and_no_loopback_listener(cloud: LocalCloud, world: World) -> None:
    # The victim also runs a command of its own on a port (a Procfile app).
    created = cloud.cli("site", "create", "victim-cmd", "--subscription", world.victim_subscription)
    _publish(Site.of(created), {"Procfile": b"web: python3 -m http.server $PORT --bind 127.0.0.1\n"})
    wait_until(
        lambda: b"Directory listing" in _get(cloud, "victim-cmd", "/")[2],
        timeout=30,
        what="the victim's command to answer",
    )
    victim_port = _command_port("victim-cmd")
    roles = _role_ports(cloud)
    first = ([victim_port] if victim_port else []) + sorted(roles)
    others = sorted(_host_listening() - set(first))[:60]
    status, answer = _attack(cloud, "/scan", ports=",".join(map(str, first + others)), timeout=40)
    assert status == 200, (status, answer)
    reached = sorted(int(p) for p, how in answer["result"].items() if how == "open")
    assert not reached, (
        f"the app connected to {len(reached)} loopback ports, among them the victim's command "
        f"({victim_port in reached}, port {victim_port}) and {len(set(reached) & roles)} of this cloud's "
        f"role ports; its /proc/net/tcp listed {len(answer['found'])} listeners"
    )
    assert_victim_ok(cloud, world)


# --- 6. other sites' files, role homes and keys


def _private_paths(cloud: LocalCloud, world: World) -> list[str]:
    home = cloud.home
    paths = [str(home), str(home / "ca"), str(home / "ca" / "ca.key"), str(home / "admin-token")]
    paths += [str(home / "sitecloud.db"), str(home / "roles" / "worker" / "state")]
    paths += [str(p) for p in sorted((home / "roles").glob("*/tls/*.key"))]
    # Wherever the victim's page lies on this host (the file server's store, the worker's copy).
    worker_home = os.path.realpath(home / "roles" / "worker")
    roots = [home]
    for apps_root in Path("/var/lib/sitecloud").glob("apps-*"):
        if apps_root_home(apps_root) == worker_home:
            roots.append(apps_root)
    for path in (p for root in roots for p in root.rglob("*")):
        with contextlib.suppress(OSError):
            size_fits = path.is_file() and path.stat().st_size == len(world.static_body)
            if size_fits and path.read_bytes() == world.static_body:
                paths += [str(path), str(path.parent)]
    # The victim's app: its process, its environment and its home.
    attacker_home = _attack(cloud, "/whoami")[1]["home"]
    _get(cloud, "victim-py", "/wake")
    for entry in Path("/proc").iterdir():
        with contextlib.suppress(OSError):
            if entry.name.isdigit() and b"SITECLOUD_SITE=victim-py" in (entry / "environ").read_bytes():
                environ = dict(
                    v.split(b"=", 1) for v in (entry / "environ").read_bytes().split(b"\0") if b"=" in v
                )
                # Host pids only: a small one may be the attacker's own in a PID namespace.
                if int(entry.name) > 1000:
                    paths += [f"/proc/{entry.name}/environ", f"/proc/{entry.name}/root/"]
                # Its home, unless a sandbox gives every app its own at one inner path (which would
                # name the attacker's own there).
                if environ[b"HOME"].decode() != attacker_home:
                    paths.append(environ[b"HOME"].decode())
                break
    return list(dict.fromkeys(paths))


def test_other_sites_files_role_keys_and_the_runtime_db_are_unreadable(
    cloud: LocalCloud, world: World
) -> None:
    paths = _private_paths(cloud, world)
    assert any("ca.key" in p for p in paths) and len(paths) > 8, paths
    victim_text = world.static_body.decode()
    status, answer = _attack(cloud, "/read", paths="|".join(paths))
    assert status == 200, (status, answer)
    leaked = {p: got for p, got in answer.items() if "error" not in got}
    assert not leaked, f"the Python app read or listed: {json.dumps(leaked)[:2000]}"
    assert victim_text not in json.dumps(answer)
    if world.attacker_php is not None:
        query = urllib.parse.urlencode({"paths": "|".join(paths)})
        status, _, body = _get(cloud, "attacker-php", f"/index.php?{query}")
        assert status == 200, (status, body[:300])
        answer = json.loads(body)
        leaked = {p: got for p, got in answer.items() if "error" not in got}
        assert not leaked, f"the PHP app read or listed: {json.dumps(leaked)[:2000]}"
    assert_victim_ok(cloud, world)


# --- 7. fork bomb


def test_a_fork_bomb_hits_the_pids_limit_and_the_victim_keeps_answering(
    cloud: LocalCloud, world: World
) -> None:
    baseline = 0.0
    for _ in range(3):
        started = time.monotonic()
        assert_victim_ok(cloud, world)
        baseline = max(baseline, time.monotonic() - started)
    try:
        with concurrent.futures.ThreadPoolExecutor(max_workers=1) as pool:
            bomb = pool.submit(_attack, cloud, "/bomb", n=1500, secs=15, timeout=40)
            time.sleep(1.5)  # the bomb is going off
            slowest = 0.0
            for _ in range(5):
                started = time.monotonic()
                assert_victim_ok(cloud, world)
                slowest = max(slowest, time.monotonic() - started)
            status, answer = bomb.result()
        print(f"fork bomb: {answer}; the victim's slowest check {slowest:.2f}s (before: {baseline:.2f}s)")
        assert slowest < max(2.0, 3 * baseline), f"the victim took {slowest:.2f}s during the fork bomb"
        if status == 200:
            assert answer["error"] == "EAGAIN" and answer["forked"] < 1500, (
                f"the fork bomb was not stopped by a pids limit: {answer}"
            )
        else:
            assert status in (502, 503, 504), (status, answer)
    finally:
        _restart_site(cloud, "attacker-py")
    cloud.wait_for_content("attacker-py", "/", b"attacker here", timeout=20)
    assert_victim_ok(cloud, world)


def _cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def test_printing_flat_out_is_read_at_the_log_rate_and_costs_the_worker_little(
    cloud: LocalCloud, world: World
) -> None:
    # Reading an app's output is the worker's CPU, shared by every site: before, an app printing in
    # a loop got ~100 MB out in 3 s and held a core of the worker.
    worker = cloud.role_pids()["worker"]
    before_lines = _log_lines(cloud, "attacker-py")
    cpu = _cpu_seconds(worker)
    status, answer = _attack(cloud, "/spam", secs=3, timeout=30)
    used = _cpu_seconds(worker) - cpu
    assert status == 200, (status, answer)
    print(f"log spam: {answer}; worker CPU {used:.2f} s")
    # The burst, the rate over the seconds, the pipe's buffer: what a reader at that rate lets out.
    allowed = LOG_BURST_BYTES + LOG_BYTES_PER_SECOND * answer["seconds"] + 2 * MB
    assert answer["wrote"] <= allowed, f"the app got {answer['wrote'] // MB} MB of output read in 3 s"
    # Said once, before the spam that follows it.
    got = cloud.cli("site", "logs", "attacker-py", "--lines", "10000")["lines"]
    assert any("[worker]" in line and "KB/s" in line for line in got[len(before_lines) :]), got[-5:]
    assert_victim_ok(cloud, world)


# --- 8. settings that would wedge the worker


def _worker_states(cloud: LocalCloud) -> list[str]:
    roles = cloud.cli("role", "list")["roles"]
    return [f"{r['state']} {r.get('reason', '')}".strip() for r in roles if r["role"] == "worker"]


def test_settings_the_worker_cannot_use_are_refused_and_never_hold_back_another_site(
    cloud: LocalCloud, world: World
) -> None:
    big = [f"HOSTILE{i}={'x' * 4000}" for i in range(20)]
    bad_sets = {"20 values of 4,000 chars": big, "400-digit idle_timeout": ["idle_timeout=" + "9" * 400]}
    bad_sets["superscript idle_timeout"] = ["idle_timeout=\u00b2"]
    keys = [kv.split("=", 1)[0] for values in bad_sets.values() for kv in values] + ["HOSTILE_SURROGATE"]
    states: list[str] = []
    problems: list[str] = []
    try:
        for what, values in bad_sets.items():
            got = cloud.cli("site", "set", "attacker-py", *values, token=world.attacker_token, check=False)
            if not (isinstance(got, dict) and got.get("error", {}).get("code") in BAD_REQUEST_CODES):
                accepted = isinstance(got, dict) and "settings" in got
                problems.append(f"{what}: {'accepted' if accepted else str(got)[:160]}")
        status, body = _api(
            cloud,
            "PATCH",
            "/api/v1/sites/attacker-py/settings",
            body=b'{"HOSTILE_SURROGATE": "\\ud800"}',
            token=world.attacker_token,
        )
        if status != 400:
            problems.append(f"a lone surrogate: {status} {body[:60]!r}")
        world.greeting = f"after-{world.tag}"
        cloud.cli("site", "set", "victim-py", f"GREETING={world.greeting}", token=world.victim_token)
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            states += _worker_states(cloud)
            with contextlib.suppress(AssertionError, OSError, http.client.HTTPException):
                assert_victim_ok(cloud, world)
                break
            time.sleep(0.5)
        else:
            problems.append(f"the victim's `site set` never reached its app in 20s (worker: {states[-1:]})")
        states += _worker_states(cloud)
        if any(s.startswith("Degraded") for s in states):
            problems.append(f"the worker went Degraded: {sorted(set(states))}")
    finally:
        # Undo what was accepted, so the rest of the module meets a working cloud.
        undo = json.dumps(dict.fromkeys(keys)).encode()
        _api(cloud, "PATCH", "/api/v1/sites/attacker-py/settings", body=undo, token=world.attacker_token)
    assert not problems, "settings the worker cannot use:\n" + "\n".join(problems)
    assert_victim_ok(cloud, world, within=20)


# --- 9. source files


SOURCE_FILES = {
    ".env": "DB_PASSWORD=SECRET-env",
    ".git/config": "[remote]\n url = https://SECRET-git@example.com/x.git",
    ".htpasswd": "admin:SECRET-htpasswd",
    "settings.py": "SECRET_KEY = 'SECRET-settings'",
    "manage.py": "# SECRET-manage\nimport sys",
    "proj/__init__.py": "",
    "proj/settings.py": "SECRET_KEY = 'SECRET-proj-settings'",
    "proj/wsgi.py": "# SECRET-wsgi\napplication = None",
    "blog/wp-config.php": "<?php define('DB_PASSWORD', 'SECRET-wp-config');",
    "requirements.txt": "django  # SECRET-requirements",
}


def _variants(path: str) -> list[str]:
    """The raw path and the spellings a server might map to the same file."""
    head, _, name = path.rpartition("/")
    prefix = f"/{head}/" if head else "/"
    stem, dot, ext = name.rpartition(".")
    out = [f"/{path}", f"/{path.upper()}", f"{prefix}{name.swapcase()}", f"//{path}", f"/./{path}"]
    out += [f"/{urllib.parse.quote(path, safe='')}", f"{prefix}{''.join(f'%{ord(c):02x}' for c in name)}"]
    if dot and stem:
        out += [f"{prefix}{stem}%2e{ext}", f"{prefix}{stem}.{ext.upper()}", f"{prefix}{stem}.{ext}%00"]
    if name.startswith("."):
        out += [f"{prefix}%2e{name[1:]}", f"{prefix}%2E{name[1:]}"]
    out += [f"/{path}/", f"/{path}?x=1", f"/{path}%20", f"/{path}.", f"/{path}::$DATA"]
    if head:
        out += [f"/{head}%2f{name}", f"/{head}/../{path}"]
    return out


def test_source_and_dot_files_are_never_served_raw(cloud: LocalCloud, world: World, tmp_path: Path) -> None:
    lftp = shutil.which("lftp")
    if lftp is None:
        pytest.skip("needs Debian lftp (.ci/run installs it)")
    local = tmp_path / "site"
    marker = world.tag
    for rel, text in SOURCE_FILES.items():
        (local / rel).parent.mkdir(parents=True, exist_ok=True)
        (local / rel).write_text(text.replace("SECRET-", f"SECRET-{marker}-"))
    page = f"<p>source test {marker}</p>".encode()
    # A Django layout: the site is a Python app, which serves files from its static folder only.
    (local / "static").mkdir()
    (local / "static" / "index.html").write_bytes(page)
    site = world.victim_src
    script = (
        "set ftp:ssl-allow no; set net:max-retries 2; set net:timeout 10; "
        f"mirror -R --no-perms {local} /; bye"
    )
    urls = [(rel, v) for rel in SOURCE_FILES if SOURCE_FILES[rel] for v in _variants(rel)]
    # Per file: each spelling that got its content, and how it was answered.
    leaks: dict[str, dict[str, str]] = {}

    def probe() -> None:
        for rel, url in urls:
            try:
                status, headers, body = _get(cloud, "victim-src", url)
            except (OSError, http.client.HTTPException):
                continue
            if f"SECRET-{marker}".encode() in body:
                leaks.setdefault(rel, {})[url] = f"{status} {headers.get('content-type')}"

    # Dot files go first in a mirror; probe while it uploads, then after the site is live.
    mirror = subprocess.Popen(
        [lftp, "-u", f"{site.user},{site.password}", "-p", str(site.ftp_port), "-e", script, site.ftp_host],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    try:
        deadline = time.monotonic() + 60
        while mirror.poll() is None and time.monotonic() < deadline:
            probe()
    finally:
        if mirror.poll() is None:
            mirror.kill()
        output = mirror.communicate()[0]
    assert mirror.returncode == 0, f"lftp mirror failed: {output.decode(errors='replace')[-1000:]}"
    cloud.wait_for_content("victim-src", "/static/index.html", page, timeout=20)
    for _ in range(2):
        probe()
    assert not leaks, "served raw (file: how many spellings got it, e.g.):\n" + "\n".join(
        f"{rel}: {len(got)}, e.g. {dict(list(got.items())[:3])}" for rel, got in leaks.items()
    )
    assert_victim_ok(cloud, world)


# --- 10. abuse of the publishing doors


def _attempt_ftp(site: Site, password: str) -> str:
    """One login from the guesser's address: the reply code to the login (``connect:...`` when the
    connection was refused before it), or what went wrong."""
    ftp = ftplib.FTP(timeout=15, source_address=(GUESSER_ADDRESS, 0))
    try:
        try:
            ftp.connect(site.ftp_host, site.ftp_port)
        except (ftplib.Error, OSError, EOFError) as err:
            return f"connect:{str(err)[:3] if isinstance(err, ftplib.Error) else type(err).__name__}"
        ftp.login(site.user, password)
        return "230"
    except (ftplib.error_perm, ftplib.error_temp, ftplib.error_reply) as err:
        # A throttled login is a 530 as a wrong password is, saying when to try again.
        return "throttled" if "Too many failed logins" in str(err) else str(err)[:3]
    except (OSError, EOFError) as err:
        return type(err).__name__
    finally:
        ftp.close()


def test_idle_ftp_connections_and_password_guessing_are_throttled_and_never_lock_out_the_victim(
    cloud: LocalCloud, world: World
) -> None:
    problems: list[str] = []
    idle: list[socket.socket] = []
    try:
        for _ in range(60):
            sock = socket.socket()
            sock.settimeout(5)
            sock.bind((ATTACKER_ADDRESS, 0))
            try:
                sock.connect((world.victim_static.ftp_host, world.victim_static.ftp_port))
            except OSError:
                sock.close()
                continue
            idle.append(sock)
        started = time.monotonic()
        try:
            assert_victim_ok(cloud, world)
        except (AssertionError, OSError, ftplib.Error) as err:
            problems.append(f"with {len(idle)} idle FTP connections from {ATTACKER_ADDRESS}: {err}")
        if time.monotonic() - started > 5:
            problems.append(f"the victim took {time.monotonic() - started:.1f}s with idle connections around")
    finally:
        for sock in idle:
            sock.close()

    codes: list[str] = []
    with concurrent.futures.ThreadPoolExecutor(max_workers=10) as pool:
        for _ in range(2):
            codes += pool.map(lambda _: _attempt_ftp(world.victim_static, "wrong-password"), range(10))
    if "230" in codes or "throttled" not in codes:
        problems.append(f"20 wrong FTP passwords from one address, never throttled: {' '.join(codes)}")
    try:
        assert_victim_ok(cloud, world)
    except (AssertionError, OSError, ftplib.Error) as err:
        problems.append(f"the victim after the FTP password guessing: {err}")

    archive = _zip({"index.html": world.static_body})
    statuses = []
    deadline = time.monotonic() + 30
    for _ in range(20):
        if time.monotonic() > deadline:
            break
        status, _ = _deploy(
            cloud, world.victim_static, world.victim_static.user, "wrong", archive, source=GUESSER_ADDRESS
        )
        statuses.append(status)
    if 200 in statuses or 429 not in statuses:
        problems.append(f"20 wrong web deploy passwords, never a 429: {statuses}")
    site = world.victim_static
    status, body = _deploy(cloud, site, site.user, site.password, archive)
    if status != 200:
        problems.append(f"the victim's own deploy got {status}: {body[:200]!r}")
    assert not problems, "publishing abuse:\n" + "\n".join(problems)
    assert_victim_ok(cloud, world, within=10)


# --- 11. bad input


def _log_sizes(cloud: LocalCloud) -> dict[Path, int]:
    return {p: p.stat().st_size for p in (cloud.home / "logs").glob("*.log")}


def test_bad_input_gets_a_4xx_never_a_500_and_the_site_still_syncs(cloud: LocalCloud, world: World) -> None:
    before = _log_sizes(cloud)
    answers: dict[str, int] = {}
    for what, value in (
        ("Bearer \\xff\\xfe", b"Bearer \xff\xfe"),
        ("Bearer é (latin-1)", b"Bearer \xe9"),
        ("Bearer é (UTF-8)", "Bearer é".encode()),
    ):
        answers[what] = _api(cloud, "GET", "/api/v1/sites", headers={"Authorization": value})[0]
    answers["user name \\ud800"] = _api(
        cloud, "POST", "/api/v1/auth/token", body=b'{"username": "\\ud800", "password": "x"}'
    )[0]
    deep = b"[" * 5000 + b"]" * 5000
    answers["5,000-deep JSON"] = _api(
        cloud, "PATCH", "/api/v1/sites/attacker-py/settings", body=deep, token=world.attacker_token
    )[0]
    deep_object = b'{"a":' * 5000 + b"1" + b"}" * 5000
    answers["5,000-deep JSON object"] = _api(
        cloud, "POST", "/api/v1/sites", body=deep_object, token=world.attacker_token
    )[0]
    context = ssl.create_default_context(cafile=str(cloud.ca_file))
    conn = http.client.HTTPSConnection("127.0.0.1", cloud.ports["deploy_port"], context=context, timeout=15)
    try:
        conn.putrequest("POST", f"/api/deploy/{world.attacker_py.name}")
        conn.putheader("Authorization", b"Basic \xff\xfe")
        conn.putheader("Content-Length", "0")
        conn.endheaders()
        answers["web deploy Basic \\xff\\xfe"] = conn.getresponse().status
    finally:
        conn.close()
    problems = [f"{what}: {status}" for what, status in answers.items() if not 400 <= status < 500]

    long_name = "n" * 300
    site = world.attacker_py
    ftp = _ftp(site)
    try:
        try:
            reply = ftp.storbinary(f"STOR {long_name}", io.BytesIO(b"x"))
        except ftplib.error_perm as err:
            reply = str(err)
        if not reply.startswith("553"):
            problems.append(f"a 300-byte file name: {reply!r}")
        after = f"synced after bad input {world.tag}".encode()
        with contextlib.suppress(ftplib.error_perm):
            ftp.mkd("static")  # a Python site serves files from its static folder
        ftp.storbinary(f"STOR static/after-{world.tag}.txt", io.BytesIO(after))
        try:
            cloud.wait_for_content("attacker-py", f"/static/after-{world.tag}.txt", after, timeout=20)
        except AssertionError as err:
            problems.append(f"the site no longer syncs: {str(err)[:200]}")
    finally:
        if not reply.startswith("553"):
            with contextlib.suppress(ftplib.Error):
                ftp.delete(long_name)  # so that the site syncs again
        ftp.quit()

    for path in _log_sizes(cloud):
        with path.open("rb") as f:
            f.seek(before.get(path, 0))
            grown = f.read().decode(errors="replace")
        if "Traceback" in grown:
            at = grown.index("Traceback")
            problems.append(f"{path.name} logged a traceback: {grown[at : at + 600]}")
    assert not problems, "bad input:\n" + "\n".join(problems)
    assert_victim_ok(cloud, world)


def test_a_tenants_api_flood_is_held_to_its_rate_and_others_are_answered(
    cloud: LocalCloud, world: World
) -> None:
    # (Last in the module: it spends the attacker's API allowance.) One tenant's flood of calls costs
    # management and the runtime DB for every tenant: past a burst it gets 429 with when to come back.
    context = ssl.create_default_context(cafile=str(cloud.ca_file))
    conn = http.client.HTTPSConnection("127.0.0.1", cloud.ports["api_port"], context=context, timeout=15)
    statuses: list[int] = []
    refused: tuple[str | None, bytes] | None = None
    try:
        for _ in range(400):
            conn.request("GET", "/api/v1/sites", headers={"Authorization": f"Bearer {world.attacker_token}"})
            resp = conn.getresponse()
            body = resp.read()
            statuses.append(resp.status)
            if resp.status == 429:
                refused = (resp.getheader("Retry-After"), body)
                break
    finally:
        conn.close()
    assert set(statuses[:-1]) == {200} and statuses[-1] == 429, statuses
    assert len(statuses) > 150, len(statuses)  # the burst: people and scripts never meet the limit
    assert refused is not None and refused[0] is not None and int(refused[0]) >= 1
    error = json.loads(refused[1])["error"]
    assert error["code"] == "rate_limited" and "try again in" in error["hint"], error
    # Another tenant is answered at once.
    status, _ = _api(cloud, "GET", "/api/v1/sites", token=world.victim_token)
    assert status == 200
