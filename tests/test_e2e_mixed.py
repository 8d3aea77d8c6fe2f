"""The topology an admin builds first: `sitecloud up` on one box, then `role add` on other hosts.

The cloud is started with `up --advertise 10.213.0.1` (this machine's address on the netns hosts'
bridge). A worker is added on web7 and a front end on fe7; a site published by FTP to this machine's
publisher is served by web7 (with content from this machine's file server) through fe7, also after
this machine's own worker is stopped; when web7's link is cut, fe7 routes around it without ever
serving a wrong page. Without --advertise the same `role add` is refused before
anything is installed (tests/test_controller_desired.py holds that rule without processes).

Needs root, iproute2 and OpenSSH's sshd, as tests/test_e2e_fabric.py does.
"""

from __future__ import annotations

import ftplib
import io
import os
import shutil
import signal
import socket
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from roles.controller.fabric.netns import SUBNET
from tests.cloud import LocalCloud
from tests.netns import https_get_via, netns_cloud
from tests.support import wait_until

pytestmark = [
    pytest.mark.root,
    pytest.mark.timeout(300),
    pytest.mark.skipif(
        os.geteuid() != 0, reason="the netns fabric needs root (namespaces, bridge, /etc/hosts)"
    ),
    pytest.mark.skipif(shutil.which("ip") is None, reason="needs iproute2's ip"),
    pytest.mark.skipif(not Path("/usr/sbin/sshd").exists(), reason="needs OpenSSH's sshd (openssh-server)"),
]

HOSTS = {"web7": "worker", "fe7": "frontend"}
# A worker reserved for one subscription, added by its own test.
RESERVED_HOST = "web8"
GATEWAY = str(next(SUBNET.hosts()))
SITE = "mixed"
BODY = b"<h1>served by a worker on another host</h1>"


@pytest.fixture(scope="module")
def cloud(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalCloud]:
    home = tmp_path_factory.mktemp("mixed") / "home"
    # The wheelhouse is whatever `up` built ahead (or the first add builds), as for a user.
    yield from netns_cloud(home, [*HOSTS, RESERVED_HOST], ("--advertise", GATEWAY, "--usage-interval", "1"))


def _roles(cloud: LocalCloud) -> dict[tuple[str, str], dict[str, Any]]:
    return {(r["role"], r["host"]): r for r in cloud.cli("role", "list")["roles"]}


def test_roles_added_on_other_hosts_reach_the_roles_up_started(cloud: LocalCloud) -> None:
    for name in HOSTS:
        assert cloud.cli("host", "create", name, "--fabric", "netns")["state"] == "ready"
    for host, role in HOSTS.items():
        added = cloud.cli("role", "add", role, host, timeout=180)
        assert added["state"] == "Ready", added
        print(f"\nrole add {role} {host} -> Ready in {added['seconds']} s: {added['steps']}")

    cloud.cli("plan", "create", "basic", "--max-sites", "5", "--storage-mb", "10")
    cloud.cli("tenant", "create", "fabrikam")
    sub = cloud.cli("subscription", "create", "--tenant", "fabrikam", "--plan", "basic")
    site = cloud.cli("site", "create", SITE, "--subscription", str(sub["id"]))

    def login() -> ftplib.FTP:
        ftp = ftplib.FTP()
        ftp.connect("127.0.0.1", cloud.ports["ftp_port"], timeout=10)
        try:
            ftp.login(site["ftp"]["user"], site["ftp"]["password"])
        except ftplib.error_perm:
            ftp.close()
            raise
        return ftp

    ftp = wait_until(login, timeout=15, interval=0.2, what="FTP login")
    ftp.storbinary("STOR index.html", io.BytesIO(BODY))
    ftp.quit()
    wait_until(
        lambda: https_get_via(cloud, "fe7", SITE) == (200, BODY), timeout=20, what=f"{SITE} through fe7"
    )

    # With this machine's worker stopped, web7 alone serves the site, from this machine's file server.
    cloud.cli("role", "stop", "worker", "localhost")
    wait_until(
        lambda: _roles(cloud)[("worker", "localhost")]["state"] == "Stopped",
        timeout=20,
        what="worker stopped",
    )
    for _ in range(5):
        assert https_get_via(cloud, "fe7", SITE) == (200, BODY)
    roles = _roles(cloud)
    assert roles[("worker", "web7")]["state"] == roles[("frontend", "fe7")]["state"] == "Ready", roles
    cloud.cli("role", "start", "worker", "localhost")
    wait_until(
        lambda: _roles(cloud)[("worker", "localhost")]["state"] == "Ready", timeout=30, what="worker back"
    )


def test_what_a_front_end_on_another_host_counts_reaches_the_controller(cloud: LocalCloud) -> None:
    # With --advertise the controller listens on every address, the bridge's too: the roles put on
    # netns hosts were given no controller to report to, so their usage (and quotas) went nowhere.
    assert "cannot listen on the netns gateway" not in cloud.log()

    def requests() -> int:
        return int(cloud.cli("site", "usage", SITE)["totals"]["requests"])

    before = requests()
    for _ in range(5):  # through fe7 only: this machine's front end sees none of them
        assert https_get_via(cloud, "fe7", SITE) == (200, BODY)
    wait_until(lambda: requests() >= before + 5, timeout=20, what="fe7's requests in the site's usage")


def test_a_cut_off_worker_on_another_host_is_routed_around_and_no_wrong_page_is_served(
    cloud: LocalCloud,
) -> None:
    veth = f"scv{socket.gethostbyname('web7').rsplit('.', 1)[1]}"
    answers: list[tuple[int, bytes]] = []
    subprocess.run(["ip", "link", "set", veth, "down"], check=True)
    try:

        def unhealthy() -> bool:
            answers.append(https_get_via(cloud, "fe7", SITE))
            return bool(_roles(cloud)[("worker", "web7")]["state"] in ("Unhealthy", "Degraded"))

        wait_until(unhealthy, timeout=15, interval=0.2, what="web7 Unhealthy")
        for _ in range(10):
            answers.append(https_get_via(cloud, "fe7", SITE))
    finally:
        subprocess.run(["ip", "link", "set", veth, "up"], check=True)
    # Served by this machine's worker, or a plain error while the cut was not yet known: never a
    # placeholder or another site's page.
    assert all(a == (200, BODY) or a[0] >= 500 for a in answers), answers
    assert answers[-10:] == [(200, BODY)] * 10, answers
    wait_until(lambda: _roles(cloud)[("worker", "web7")]["state"] == "Ready", timeout=30, what="web7 back")


def test_a_worker_added_on_a_host_that_never_answers_gets_no_sites(cloud: LocalCloud) -> None:
    # Before, it counted as "starting" forever: every new site was placed on it beside a real worker
    # (site show: "state unknown"), and the front ends were handed it to route to.
    failed = cloud.cli("role", "add", "worker", "nosuchhost.invalid", check=False)
    assert failed["error"]["code"] == "unavailable" and "nosuchhost.invalid" in failed["error"]["message"]
    try:
        cloud.cli("plan", "create", "afterfail", "--max-sites", "1", "--storage-mb", "10")
        cloud.cli("tenant", "create", "afterfail")
        sub = cloud.cli("subscription", "create", "--tenant", "afterfail", "--plan", "afterfail")["id"]
        cloud.cli("site", "create", "afterfail", "--subscription", str(sub))

        # (Placed there in the moment before its first health check, it is moved off at the next.)
        def placed() -> set[str]:
            return {str(a.get("worker")) for a in cloud.cli("site", "show", "afterfail")["apps"]}

        wait_until(
            lambda: placed() and "nosuchhost.invalid" not in placed(),
            timeout=10,
            what="the site on live workers only",
        )
        roles = cloud.cli("role", "list")["roles"]
        assert [r["state"] for r in roles if r["host"] == "nosuchhost.invalid"] == ["Failed"], roles
    finally:
        cloud.cli("role", "remove", "worker", "nosuchhost.invalid", "--yes", check=False)


def test_a_worker_that_keeps_dying_on_its_host_is_failed_with_its_exit_not_a_host_down(
    cloud: LocalCloud,
) -> None:
    # Its host agent restarts it and it dies again (broken code, say): role list said "Unhealthy (host
    # down)", "no answer within 2 s", while the host answered SSH and its agent knew the exit.
    root = cloud.home / "fabric" / "netns" / "web7" / "root"
    (main,) = root.glob("venvs/*/lib/python3*/site-packages/roles/worker/__main__.py")
    code = main.read_bytes()
    main.write_text('raise SystemExit("boom: this worker cannot start")\n')
    try:
        os.kill(int((root / "roles" / "worker" / "role.pid").read_text()), signal.SIGKILL)

        def failed() -> dict[str, Any] | None:
            role = _roles(cloud)[("worker", "web7")]
            return role if role["state"] == "Failed" else None

        role = wait_until(failed, timeout=40, interval=0.5, what="web7's worker Failed")
        assert "keeps failing on web7" in role["reason"] and "exited with code 1" in role["reason"], role
        assert role["host_state"] == "ready", role
        assert https_get_via(cloud, "fe7", SITE) == (200, BODY)  # this machine's worker serves it
    finally:
        main.write_bytes(code)
    cloud.cli("role", "restart", "worker", "web7", timeout=60)
    wait_until(lambda: _roles(cloud)[("worker", "web7")]["state"] == "Ready", timeout=30, what="web7 back")


def test_a_reserved_plan_s_site_moves_to_the_worker_reserved_for_it(
    cloud: LocalCloud, tmp_path: Path
) -> None:
    # A plan's compute mode was stored and not applied: its sites ran on the shared workers, as every
    # other tenant's, with nothing said.
    cloud.cli("plan", "create", "dedicated", "--max-sites", "1", "--storage-mb", "10",
              "--compute-mode", "reserved", "--worker-size", "large")  # fmt: skip
    cloud.cli("tenant", "create", "woodgrove")
    sub = cloud.cli("subscription", "create", "--tenant", "woodgrove", "--plan", "dedicated")["id"]
    cloud.cli("site", "create", "dedicated", "--subscription", str(sub))
    (tmp_path / "index.html").write_bytes(BODY)
    cloud.cli("deploy", "dedicated", str(tmp_path), timeout=60)

    def shown() -> dict[str, Any]:
        return dict(cloud.cli("site", "show", "dedicated"))

    def on() -> set[str]:
        return {str(a.get("worker")) for a in shown()["apps"]}

    # No large worker is reserved for it yet: it runs on the shared workers, and says so.
    site = wait_until(lambda: (s := shown())["problems"] and s, timeout=20, what="the placement problem")
    assert site["problems"][0]["kind"] == "placement", site["problems"]
    assert f"--size large --reserved-for {sub}" in site["problems"][0]["reason"]
    assert RESERVED_HOST not in on()
    assert https_get_via(cloud, "fe7", "dedicated") == (200, BODY)

    assert cloud.cli("host", "create", RESERVED_HOST, "--fabric", "netns")["state"] == "ready"
    try:
        added = cloud.cli("role", "add", "worker", RESERVED_HOST, "--size", "large", "--reserved-for",
                          str(sub), timeout=180)  # fmt: skip
        assert added["state"] == "Ready", added
        listed = [line for line in cloud.cli_text("role", "list").splitlines() if RESERVED_HOST in line]
        assert listed and listed[0].startswith(f"worker (large, reserved for {sub})"), listed
        wait_until(lambda: on() == {RESERVED_HOST}, timeout=30, what="the site on its reserved worker alone")
        assert shown()["problems"] == []
        wait_until(
            lambda: https_get_via(cloud, "fe7", "dedicated") == (200, BODY),
            timeout=20,
            what="served from web8",
        )
        # No other tenant's site is put on it.
        mixed = {str(a.get("worker")) for a in cloud.cli("site", "show", SITE)["apps"]}
        assert RESERVED_HOST not in mixed, mixed
    finally:
        cloud.cli("role", "remove", "worker", RESERVED_HOST, "--yes", check=False, timeout=60)


def test_a_role_on_a_host_gone_for_good_is_removed_with_forget(cloud: LocalCloud) -> None:
    # (Last in the module: web7's worker goes.) A host that never comes back cannot be reached to
    # remove its role: the admin is told how to let it go, and --forget does.
    veth = f"scv{socket.gethostbyname('web7').rsplit('.', 1)[1]}"
    subprocess.run(["ip", "link", "set", veth, "down"], check=True)
    try:
        refused = cloud.cli("role", "remove", "worker", "web7", "--yes", check=False, timeout=120)
        assert refused["error"]["code"] == "unavailable", refused
        assert "role remove worker web7 --forget" in refused["error"]["hint"], refused
        assert ("worker", "web7") in _roles(cloud)
        gone = cloud.cli("role", "remove", "worker", "web7", "--forget", "--yes", timeout=120)
        assert gone["state"] == "Removed", gone
        assert gone["reason"].startswith("forgotten without reaching web7"), gone
        assert ("worker", "web7") not in _roles(cloud)
        assert https_get_via(cloud, "fe7", SITE) == (200, BODY)  # this machine's worker serves it
    finally:
        subprocess.run(["ip", "link", "set", veth, "up"], check=True)
