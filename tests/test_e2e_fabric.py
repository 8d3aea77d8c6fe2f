"""A six-host cloud on one box, built through the CLI as an admin would.

`sitecloud up --local-roles management` runs the controller and management here (a control-plane box);
the data plane lives on netns hosts fe1, fe2, web1, web2, files1 and pub1, added by DNS name. A site is
published by FTP to pub1 and fetched through both front ends over HTTPS (SNI, verified against the
cloud CA); a dead worker process is restarted by its host; web1's host is cut off (its link goes down)
and the site keeps answering through web2, and web1 rejoins; `sitecloud upgrade` rolls every role
while a client loop sees no failed request.

The client loop behaves like a browser given both front ends' addresses (two A records): when a front
end refuses the connection (or resets it before the TLS handshake is done, i.e. before any request was
sent) it uses the other one. Any request that was sent and did not get a 200 with the right body counts
as failed.

Needs root, iproute2 and OpenSSH's sshd. Everything the test makes is removed afterwards, even on
failure: the namespaces with every process in them, veths, the bridge, /etc/hosts entries.
"""

from __future__ import annotations

import asyncio
import ftplib
import http.client
import io
import json
import os
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

from roles.controller.fabric._wheelhouse import Wheelhouse
from shared.pki import CertificateAuthority
from shared.tls import client_context_from_files
from tests.cloud import LocalCloud
from tests.netns import https_get_via, netns_cloud
from tests.support import call, wait_until

pytestmark = [
    pytest.mark.root,
    pytest.mark.timeout(300),
    pytest.mark.skipif(
        os.geteuid() != 0, reason="the netns fabric needs root (namespaces, bridge, /etc/hosts)"
    ),
    pytest.mark.skipif(shutil.which("ip") is None, reason="needs iproute2's ip"),
    pytest.mark.skipif(not Path("/usr/sbin/sshd").exists(), reason="needs OpenSSH's sshd (openssh-server)"),
]

HOSTS = {
    "files1": "fileserver",
    "web1": "worker",
    "web2": "worker",
    "pub1": "publisher",
    "fe1": "frontend",
    "fe2": "frontend",
}
WHEELHOUSE_CACHE = Path("/tmp/sitecloud-test-wheelhouse")
SITE = "blog"
BODY = b"<h1>hello from a six-host cloud</h1>"


@pytest.fixture(scope="module")
def cloud(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalCloud]:
    # Warm once per code version (kept across runs): role add then measures install, not pip.
    asyncio.run(Wheelhouse(WHEELHOUSE_CACHE).ensure())
    home = tmp_path_factory.mktemp("fabric") / "home"
    yield from netns_cloud(
        home, HOSTS, ("--local-roles", "management", "--wheelhouse", str(WHEELHOUSE_CACHE))
    )


@pytest.fixture(scope="module")
def controller_ssl(cloud: LocalCloud) -> ssl.SSLContext:
    """Calls to roles as the controller, as the health loop makes them."""
    ca = CertificateAuthority.load_or_create(cloud.home / "ca")
    key, cert = cloud.home.parent / "probe.key", cloud.home.parent / "probe.pem"
    ca.issue("probe@test", role="controller", dns_names=["localhost"]).write(key, cert)
    return client_context_from_files(cert, key, cloud.ca_file)


def _address(host: str) -> str:
    return socket.gethostbyname(host)


class ClientLoop:
    """Fetches the site over and over through fe1 and fe2 (taking turns), as a client with both
    front ends' addresses would: a front end that refuses the connection is skipped for the other."""

    def __init__(self, cloud: LocalCloud) -> None:
        self.cloud = cloud
        self.ok = 0
        self.failures: list[str] = []
        self.timeline: list[tuple[float, bool, float]] = []  # (when, served, seconds)
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _once(self, first: str) -> str | None:
        order = [first, "fe2" if first == "fe1" else "fe1"]
        for frontend in order:
            try:
                status, body = https_get_via(self.cloud, frontend, SITE, timeout=10)
            except (ConnectionRefusedError, ConnectionResetError, ssl.SSLEOFError) as exc:
                if frontend == order[-1]:
                    return f"both front ends refused: {exc!r}"
                continue  # nothing was sent: the other address
            except OSError as exc:
                return f"{frontend}: {exc!r}"
            return None if (status, body) == (200, BODY) else f"{frontend}: {status} {body[:80]!r}"
        return "unreachable"

    def _one(self, first: str) -> None:
        started = time.monotonic()
        problem = self._once(first)
        with self._lock:
            self.timeline.append((started, problem is None, time.monotonic() - started))
            if problem is None:
                self.ok += 1
            else:
                self.failures.append(problem)

    def _run(self) -> None:
        # A new request every 50 ms whatever the earlier ones do, so a slow one does not hide the rest.
        with ThreadPoolExecutor(max_workers=32) as pool:
            turn = 0
            while not self._stop.wait(0.05):
                pool.submit(self._one, "fe1" if turn % 2 == 0 else "fe2")
                turn += 1

    def __enter__(self) -> ClientLoop:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=30)
        self.timeline.sort()


def _role_add(
    cloud: LocalCloud, role: str, host: str, *extra: str, as_json: bool = True
) -> subprocess.Popen[bytes]:
    argv = [
        sys.executable,
        "-m",
        "roles.management.cli",
        "--home",
        str(cloud.home),
        "role",
        "add",
        role,
        host,
    ]
    return subprocess.Popen(
        [*argv, *extra, *(["--json"] if as_json else [])], stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )


def _roles(cloud: LocalCloud) -> dict[tuple[str, str], dict[str, Any]]:
    return {(r["role"], r["host"]): r for r in cloud.cli("role", "list")["roles"]}


FIGURES: dict[str, Any] = {}


def test_six_hosts_and_their_roles_by_dns_name(cloud: LocalCloud) -> None:
    for name in HOSTS:
        host = cloud.cli("host", "create", name, "--fabric", "netns")
        assert host["state"] == "ready" and _address(name) == host["address"]
    listed = {h["name"]: h for h in cloud.cli("host", "list")["hosts"]}
    assert set(HOSTS) <= set(listed) and listed["localhost"]["roles"] == ["management"]

    # files1 first, for people (progress lines); the others together, as JSON.
    progress = _role_add(cloud, "fileserver", "files1", as_json=False)
    out, err = progress.communicate(timeout=120)
    assert progress.returncode == 0, (out, err)
    text = out.decode()
    for step in ("connect", "upload", "install", "configure", "start", "healthy", "ready"):
        assert f"fileserver on files1: {step} done" in text, text
    assert "fileserver on files1 is Ready (" in text
    procs = {host: _role_add(cloud, role, host) for host, role in HOSTS.items() if host != "files1"}
    added = {}
    for host, proc in procs.items():
        out, err = proc.communicate(timeout=120)
        assert proc.returncode == 0, (host, out, err)
        added[host] = json.loads(out)
    FIGURES["role_add_to_ready"] = {h: a["seconds"] for h, a in added.items()}
    FIGURES["role_add_steps"] = {h: a["steps"] for h, a in added.items()}
    print("\nrole add -> Ready (warm wheelhouse, five in parallel):", FIGURES["role_add_to_ready"])
    print("steps:", json.dumps(FIGURES["role_add_steps"]))
    assert all(a["state"] == "Ready" for a in added.values()), json.dumps(added)

    alone = next(line for line in text.splitlines() if "is Ready (" in line)
    FIGURES["role_add_to_ready"]["files1 (alone)"] = float(alone.rsplit("(", 1)[1].rstrip("s)"))

    def all_ready() -> dict[tuple[str, str], dict[str, Any]] | None:
        roles = _roles(cloud)
        return roles if all(roles[(role, host)]["state"] == "Ready" for host, role in HOSTS.items()) else None

    roles = wait_until(all_ready, timeout=10, what="every role Ready in `role list`")
    for host, role in HOSTS.items():
        r = roles[(role, host)]
        assert r["code_hash"] and r["config_version"] >= 1, r
        assert r["fabric"] == "netns" and r["last_heartbeat"]
    # Keys the controller keeps stay private.
    for key in (cloud.home / "ca" / "ca.key", cloud.home / "controller" / "ssh" / "id_ed25519"):
        assert oct(key.stat().st_mode & 0o777) == "0o600", key
    # A second add of the same role is refused, not done twice.
    again = cloud.cli("role", "add", "worker", "web1", check=False)
    assert again["error"]["code"] == "already_exists"


def test_publish_by_ftp_to_pub1_and_fetch_through_both_front_ends(cloud: LocalCloud) -> None:
    cloud.cli("plan", "create", "basic", "--max-sites", "5", "--storage-mb", "10")
    cloud.cli("tenant", "create", "contoso")
    sub = cloud.cli("subscription", "create", "--tenant", "contoso", "--plan", "basic")
    site = cloud.cli("site", "create", SITE, "--subscription", str(sub["id"]))

    # The publisher knows the site once the controller pushed it there (a moment after `site create`).
    ftp = wait_until(lambda: _pub1_login(cloud, site), timeout=15, interval=0.2, what="FTP login on pub1")
    ftp.storbinary("STOR index.html", io.BytesIO(BODY))
    ftp.quit()
    for frontend in ("fe1", "fe2"):
        wait_until(
            lambda f=frontend: https_get_via(cloud, f, SITE) == (200, BODY),
            timeout=15,
            what=f"{SITE} via {frontend}",
        )
    # Both front ends route to both workers: the site is placed on two.
    roles = _roles(cloud)
    assert roles[("worker", "web1")]["state"] == roles[("worker", "web2")]["state"] == "Ready"


_COUNTER = b"""<?php
session_start();
$_SESSION['n'] = ($_SESSION['n'] ?? 0) + 1;
echo $_SESSION['n'];
"""


def _visit(cloud: LocalCloud, frontend: str, site: str, cookie: str) -> tuple[bytes, str]:
    """GET / of ``site`` through the front end on ``frontend`` with ``cookie``: the body, and the
    cookie to send next (the one it set, else the same)."""
    ctx = ssl.create_default_context(cafile=str(cloud.ca_file))
    name = f"{site}.{cloud.domain}"
    port = cloud.ports["https_port"]
    conn = http.client.HTTPSConnection(name, port, context=ctx, timeout=10)
    raw = socket.create_connection((socket.gethostbyname(frontend), port), timeout=10)
    conn.sock = ctx.wrap_socket(raw, server_hostname=name)
    try:
        conn.request("GET", "/", headers={"Cookie": cookie} if cookie else {})
        resp = conn.getresponse()
        body = resp.read()
        assert resp.status == 200, (resp.status, body[:300])
        set_cookie = resp.getheader("Set-Cookie")
    finally:
        conn.close()
    return body, set_cookie.split(";", 1)[0] if set_cookie else cookie


def test_an_app_of_one_instance_keeps_its_sessions_through_both_front_ends(cloud: LocalCloud) -> None:
    """The site is on both workers, but with one instance one of them takes its requests: PHP's
    sessions (files in the app's own folder) are one app's, not split over two."""
    subscription = cloud.cli("subscription", "list")["subscriptions"][0]["id"]
    site = cloud.cli("site", "create", "counter", "--subscription", str(subscription))
    ftp = wait_until(lambda: _pub1_login(cloud, site), timeout=15, interval=0.2, what="FTP login on pub1")
    ftp.storbinary("STOR index.php", io.BytesIO(_COUNTER))
    ftp.quit()
    first = wait_until(
        lambda: _visit(cloud, "fe1", "counter", ""),
        timeout=30,
        interval=0.3,
        what="the counter's first visit",
    )
    body, cookie = first
    assert body == b"1" and cookie.startswith("PHPSESSID="), first
    seen = [body]
    for n in range(6):
        body, cookie = _visit(cloud, ("fe2", "fe1")[n % 2], "counter", cookie)
        seen.append(body)
    assert seen == [str(n).encode() for n in range(1, 8)], seen


def _pub1_login(cloud: LocalCloud, site: dict[str, Any]) -> ftplib.FTP | None:
    ftp = ftplib.FTP()
    ftp.connect("pub1", cloud.ports["ftp_port"], timeout=10)
    try:
        ftp.login(site["ftp"]["user"], site["ftp"]["password"])
    except ftplib.error_perm:
        ftp.close()
        return None
    return ftp


def test_a_dead_worker_process_is_restarted_on_its_host(
    cloud: LocalCloud, controller_ssl: ssl.SSLContext
) -> None:
    url = "https://web1:7402/v1/health"
    before = call(url, controller_ssl)[1]["pid"]
    os.kill(before, signal.SIGKILL)
    after = wait_until(
        lambda: (pid := call(url, controller_ssl, timeout=2)[1]["pid"]) != before and pid,
        timeout=20,
        what="the hostagent on web1 to restart the worker",
    )
    assert after != before
    for frontend in ("fe1", "fe2"):
        wait_until(
            lambda f=frontend: https_get_via(cloud, f, SITE) == (200, BODY),
            timeout=15,
            what=f"{SITE} via {frontend}",
        )


def _veth(host: str) -> str:
    return f"scv{_address(host).rsplit('.', 1)[1]}"


def test_a_host_that_stops_answering_is_routed_around_and_rejoins(cloud: LocalCloud) -> None:
    with ClientLoop(cloud) as loop:
        time.sleep(1)
        cut = time.monotonic()
        subprocess.run(["ip", "link", "set", _veth("web1"), "down"], check=True)
        try:
            wait_until(
                lambda: _roles(cloud)[("worker", "web1")]["state"] == "Unhealthy",
                timeout=15,
                what="web1 Unhealthy",
            )
            time.sleep(3)  # a stretch of the client loop with web1 out of the routes
        finally:
            subprocess.run(["ip", "link", "set", _veth("web1"), "up"], check=True)
        back = time.monotonic()
        wait_until(
            lambda: _roles(cloud)[("worker", "web1")]["state"] == "Ready", timeout=20, what="web1 to rejoin"
        )
        rejoined = time.monotonic() - back
        time.sleep(1)
    # From the moment web1 is cut off: the last request *started* that failed or was slow (a front end
    # still trying web1 first) marks when web2 alone served the site. A request already sent to web1
    # over a kept-alive connection when its link went down waits for the front end's response timeout:
    # it is counted and reported, not hidden.
    after = [(t - cut, ok, s) for t, ok, s in loop.timeline if t >= cut]
    bad = [(t, ok, s) for t, ok, s in after if not ok or s > 1.0]
    served_elsewhere = max((t for t, _, _ in bad), default=0.0)
    FIGURES["dead_host_served_elsewhere_s"] = round(served_elsewhere, 2)
    FIGURES["dead_host_failed_requests"] = len([b for b in bad if not b[1]])
    FIGURES["host_rejoined_s"] = round(rejoined, 2)
    print(f"\nweb1 cut off: served by web2 alone after {served_elsewhere:.1f}s; rejoined in {rejoined:.1f}s")
    print(
        f"client loop: {loop.ok} ok, {len(loop.failures)} failed: {loop.failures[:5]}; slow or failed: {bad}"
    )
    assert served_elsewhere <= 10.0, (bad, loop.failures)
    assert len(loop.failures) <= 2, loop.failures  # at most what was in flight to web1 at the cut
    hosts = {h["name"]: h for h in cloud.cli("host", "list")["hosts"]}
    assert hosts["web1"]["state"] == "ready"
    for frontend in ("fe1", "fe2"):
        assert https_get_via(cloud, frontend, SITE) == (200, BODY)


def test_a_rolling_upgrade_sees_no_failed_request(cloud: LocalCloud) -> None:
    with ClientLoop(cloud) as loop:
        time.sleep(0.5)
        started = time.monotonic()
        result = cloud.cli("upgrade", "--force", timeout=240)
        took = time.monotonic() - started
        time.sleep(0.5)
    upgraded = {(u["role"], u["host"]) for u in result["upgraded"]}
    assert upgraded == {(role, host) for host, role in HOSTS.items()}, result
    FIGURES["upgrade_s"] = round(took, 1)
    print(
        f"\nupgrade of {len(upgraded)} roles in {took:.1f}s; client loop {loop.ok} ok, failed: {loop.failures[:5]}"
    )
    assert loop.failures == [] and loop.ok > 50
    wait_until(
        lambda: all(_roles(cloud)[(role, host)]["state"] == "Ready" for host, role in HOSTS.items()),
        timeout=10,
        what="every role Ready after the upgrade",
    )
    out = cloud.home.parent / "fabric-figures.json"
    out.write_text(json.dumps(FIGURES, indent=2))
    print(json.dumps(FIGURES, indent=2))
