"""The README's many-hosts topology, as an admin builds it: `sitecloud up --local-roles management`
here, the data plane on netns host h7pa. Every address management hands a tenant (site create, site
show, the publish profile) is the publisher's host, `sitecloud deploy` goes to where the publisher runs,
and both follow the publisher when it moves to host h7pb.

Needs root, iproute2 and OpenSSH's sshd; everything made is removed afterwards, even on failure.
"""

from __future__ import annotations

import asyncio
import ftplib
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from roles.controller.fabric._wheelhouse import Wheelhouse
from roles.controller.up import _summary
from tests.cloud import TEST_WHEELHOUSE, LocalCloud
from tests.netns import https_get_via, netns_cloud
from tests.support import wait_until

pytestmark = [
    pytest.mark.root,
    pytest.mark.timeout(420),
    pytest.mark.skipif(
        os.geteuid() != 0, reason="the netns fabric needs root (namespaces, bridge, /etc/hosts)"
    ),
    pytest.mark.skipif(shutil.which("ip") is None, reason="needs iproute2's ip"),
    pytest.mark.skipif(not Path("/usr/sbin/sshd").exists(), reason="needs OpenSSH's sshd (openssh-server)"),
]

# Names of their own: other tests make netns hosts on this machine at the same time.
FIRST, SECOND = "h7pa", "h7pb"
SITE = "blog"


@pytest.fixture(scope="module")
def cloud(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalCloud]:
    asyncio.run(Wheelhouse(TEST_WHEELHOUSE).ensure())
    home = tmp_path_factory.mktemp("multihost") / "home"
    yield from netns_cloud(
        home, (FIRST, SECOND), ("--local-roles", "management", "--wheelhouse", str(TEST_WHEELHOUSE))
    )


def _deploy(cloud: LocalCloud, folder: Path) -> subprocess.CompletedProcess[bytes]:
    argv = [sys.executable, "-m", "roles.management.cli", "--home", str(cloud.home), "deploy", SITE]
    return subprocess.run([*argv, str(folder), "--json"], capture_output=True, timeout=90)


def _deployed(cloud: LocalCloud, tmp_path: Path, body: bytes, frontend: str) -> None:
    folder = tmp_path / f"site-{hash(body) & 0xFFFF:x}"
    folder.mkdir()
    (folder / "index.html").write_bytes(body)
    done = _deploy(cloud, folder)
    assert done.returncode == 0, (done.stdout, done.stderr, cloud.role_logs())
    wait_until(
        lambda: https_get_via(cloud, frontend, SITE) == (200, body), timeout=20, what=f"{SITE} via {frontend}"
    )


def _ftp_login(site: dict[str, Any], password: str) -> None:
    ftp = ftplib.FTP()
    try:
        ftp.connect(site["ftp"]["host"], site["ftp"]["port"], timeout=10)
        ftp.login(site["ftp"]["user"], password)
        ftp.quit()
    finally:
        ftp.close()


def _tenant_is_told(cloud: LocalCloud, site: dict[str, Any], host: str) -> None:
    assert site["ftp"]["host"] == host and site["ftp"]["port"] == cloud.ports["ftp_port"], site
    deploy = f"https://{host}:{cloud.ports['deploy_port']}/api/deploy/{SITE}"
    assert site["deploy"]["url"] == deploy, site
    assert site["deploy"]["git"] == f"https://{host}:{cloud.ports['deploy_port']}/{SITE}.git", site


def test_tenants_are_given_the_publisher_s_host_and_deploys_follow_it(
    cloud: LocalCloud, tmp_path: Path
) -> None:
    cloud.cli("host", "create", FIRST, "--fabric", "netns")
    for role in ("fileserver", "publisher", "worker", "frontend"):
        added = cloud.cli("role", "add", role, FIRST, timeout=150)
        assert added["state"] == "Ready", added
    cloud.cli("plan", "create", "basic", "--max-sites", "5", "--storage-mb", "10")
    cloud.cli("tenant", "create", "contoso")
    sub = cloud.cli("subscription", "create", "--tenant", "contoso", "--plan", "basic")

    site = cloud.cli("site", "create", SITE, "--subscription", str(sub["id"]))
    _tenant_is_told(cloud, site, FIRST)
    password = site["ftp"]["password"]
    # What the tenant was given works: FTP at that address (once the publisher has the site).
    wait_until(
        lambda: _ftp_login(site, password) is None, timeout=15, what="FTP login where the tenant was told"
    )
    _deployed(cloud, tmp_path, b"<h1>deployed through management to h7pa</h1>", FIRST)
    _tenant_is_told(cloud, cloud.cli("site", "show", SITE), FIRST)
    profile = cloud.home.parent / "blog.PublishSettings"
    cloud.cli("site", "publish-profile", SITE, "--yes", "-o", str(profile))
    text = profile.read_text()
    assert f'publishUrl="{FIRST}:{cloud.ports["deploy_port"]}"' in text, text
    assert f'publishUrl="ftps://{FIRST}:{cloud.ports["ftp_port"]}/"' in text, text
    assert "127.0.0.1" not in text and "//localhost" not in text, text

    # The publisher moves: one on h7pb, the one on h7pa stopped. Tenants and deploys follow it.
    cloud.cli("host", "create", SECOND, "--fabric", "netns")
    assert cloud.cli("role", "add", "publisher", SECOND, timeout=150)["state"] == "Ready"
    cloud.cli("role", "stop", "publisher", FIRST)
    moved = wait_until(
        lambda: (shown := cloud.cli("site", "show", SITE))["ftp"]["host"] == SECOND and shown,
        timeout=15,
        what=f"site show to give {SECOND}",
    )
    _tenant_is_told(cloud, moved, SECOND)
    _deployed(cloud, tmp_path, b"<h1>deployed through management to h7pb</h1>", FIRST)

    # No publisher running: web deploy says so (unavailable, exit 6), naming no address.
    cloud.cli("role", "stop", "publisher", SECOND)
    folder = tmp_path / "nowhere"
    folder.mkdir()
    (folder / "index.html").write_text("nowhere")

    def refused() -> subprocess.CompletedProcess[bytes] | None:
        done = _deploy(cloud, folder)
        return done if done.returncode != 0 else None

    done = wait_until(
        refused, timeout=15, interval=0.5, what="deploy to be refused with no publisher running"
    )
    assert done.returncode == 6 and b"no publisher is running" in done.stdout + done.stderr, done


def test_up_with_the_data_plane_elsewhere_points_to_the_hosts_not_this_machine() -> None:
    """`up --local-roles management` prints no FTP, web deploy or site address on this machine, where
    nothing listens; the whole cloud on one box prints them all."""
    endpoints = {
        "api": "https://127.0.0.1:8090",
        "sites": {
            "https": "https://<site>.sites.localhost:8443/",
            "http": "http://<site>.sites.localhost:8080/",
        },
        "ftp": {"host": "127.0.0.1", "port": 2121},
        "deploy": "https://127.0.0.1:8172/api/deploy/<site>",
        "admin_token_file": "/h/admin-token",
        "ca_cert": "/h/ca/ca.pem",
        "logs": "/h/logs",
    }
    control_plane = _summary(endpoints, ("management",))
    assert "127.0.0.1:2121" not in control_plane and "127.0.0.1:8172" not in control_plane
    assert ":8443" not in control_plane and "on the publisher's host" in control_plane
    assert "https://127.0.0.1:8090" in control_plane
    one_box = _summary(endpoints)
    assert "ftp://127.0.0.1:2121" in one_box and "https://127.0.0.1:8172/api/deploy/<site>" in one_box
    assert "https://<site>.sites.localhost:8443/" in one_box
