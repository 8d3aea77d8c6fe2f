"""The foundation end to end, as a user runs it: `sitecloud up`, the CLI, FTP, web deploy, HTTPS."""

from __future__ import annotations

import base64
import contextlib
import ftplib
import http.client
import io
import json
import os
import signal
import socket
import sqlite3
import ssl
import subprocess
import sys
import threading
import time
import urllib.request
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from roles.controller.up import _home_state, _HomeState, _next_step, _summary
from shared.db.session import Database
from tests.cloud import LocalCloud, running_cloud, site_ftp
from tests.support import wait_until

pytestmark = pytest.mark.timeout(300)

# Shorter than the product's waits that tests below sit through: a hung role restarted after 15 s of
# silence and killed 10 s after its SIGTERM, roles shown Unknown 10 s after the controller's last look.
SETTINGS = {
    "controller": {"revive_after": 4, "role_stop_timeout": 3},
    "management": {"role_stale_after": 5},
}


@pytest.fixture(scope="module")
def cloud(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalCloud]:
    yield from running_cloud(tmp_path_factory, settings=SETTINGS)


@pytest.fixture(scope="module")
def sites(cloud: LocalCloud) -> dict[str, Any]:
    cloud.cli("plan", "create", "basic", "--max-sites", "2", "--storage-mb", "5")
    tenant = cloud.cli("tenant", "create", "contoso")
    sub = cloud.cli("subscription", "create", "--tenant", "contoso", "--plan", "basic")
    blog = cloud.cli("site", "create", "blog", "--subscription", str(sub["id"]), token=tenant["token"])
    shop = cloud.cli("site", "create", "shop", "--subscription", str(sub["id"]))
    return {"tenant": tenant, "subscription": sub, "blog": blog, "shop": shop}


def _zip(files: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for name, data in files.items():
            zf.writestr(name, data)
    return buf.getvalue()


def test_site_create_answers_urls_and_publishing_credentials(
    cloud: LocalCloud, sites: dict[str, Any]
) -> None:
    blog = sites["blog"]
    assert blog["name"] == "blog"
    assert blog["url"] == f"https://blog.sites.localhost:{cloud.ports['https_port']}/"
    assert blog["ftp"]["port"] == cloud.ports["ftp_port"] and blog["ftp"]["password"]
    assert blog["deploy"]["url"].endswith("/api/deploy/blog") and blog["deploy"]["password"]
    listed = cloud.cli("site", "list", token=sites["tenant"]["token"])
    names = sorted(s["name"] for s in (listed["sites"] if isinstance(listed, dict) else listed))
    assert names == ["blog", "shop"]


def test_ftp_upload_is_served_over_https_on_the_wildcard_subdomain(
    cloud: LocalCloud, sites: dict[str, Any]
) -> None:
    ftp = site_ftp(sites["blog"])
    try:
        ftp.storbinary("STOR index.html", io.BytesIO(b"<h1>hello from blog</h1>"))
        ftp.mkd("docs")
        ftp.storbinary("STOR docs/page.html", io.BytesIO(b"<p>a sub page</p>"))
    finally:
        ftp.quit()
    # Each upload is its own version; waiting for the last one covers both.
    cloud.wait_for_content("blog", "/docs/page.html", b"<p>a sub page</p>")
    status, headers, body = cloud.get("blog", "/")
    assert (status, body) == (200, b"<h1>hello from blog</h1>")
    assert headers["content-type"].startswith("text/html")
    status, _, _ = cloud.get("blog", "/docs/missing.html")
    assert status == 404


def test_web_deploy_replaces_the_whole_site(cloud: LocalCloud, sites: dict[str, Any], tmp_path: Path) -> None:
    # Through the CLI (management forwards to the publisher) from a directory ...
    tree = tmp_path / "v2"
    (tree / "assets").mkdir(parents=True)
    (tree / "index.html").write_bytes(b"<h1>v2</h1>")
    (tree / "assets" / "app.css").write_bytes(b"body{}")
    result = cloud.cli("deploy", "blog", str(tree))
    assert result["files"] == 2
    cloud.wait_for_content("blog", "/", b"<h1>v2</h1>")
    assert cloud.get("blog", "/docs/page.html")[0] == 404
    assert cloud.get("blog", "/assets/app.css")[2] == b"body{}"

    # ... and straight to the publisher's web deploy endpoint with basic auth, as curl would.
    blog = sites["blog"]
    auth = base64.b64encode(f"{blog['deploy']['user']}:{blog['deploy']['password']}".encode()).decode()
    req = urllib.request.Request(
        blog["deploy"]["url"],
        data=_zip({"index.html": b"<h1>v3</h1>"}),
        method="POST",
        headers={"Authorization": f"Basic {auth}", "Content-Type": "application/zip"},
    )
    ctx = ssl.create_default_context(cafile=str(cloud.ca_file))
    with urllib.request.urlopen(req, context=ctx, timeout=30) as resp:
        assert json.loads(resp.read())["files"] == 1
    cloud.wait_for_content("blog", "/", b"<h1>v3</h1>")
    assert cloud.get("blog", "/assets/app.css")[0] == 404


def test_versions_and_rollback_through_the_cli(cloud: LocalCloud, sites: dict[str, Any]) -> None:
    # After the FTP uploads and the two deploys above: the newest is v3 by web deploy.
    token = sites["tenant"]["token"]
    listed = cloud.cli("site", "versions", "blog", token=token)["versions"]
    sources = [v["source"] for v in listed]
    assert sources[-2:] == ["deploy", "deploy"] and "ftp" in sources, listed
    assert listed[-1]["files"] == 1
    newest, before = listed[-1]["version"], listed[-2]["version"]

    # Back to the one before (the directory deploy): the whole site flips on the front end.
    answer = cloud.cli("site", "rollback", "blog", token=token)
    assert answer["rolled_back_to"] == before and answer["version"] == newest + 1
    cloud.wait_for_content("blog", "/assets/app.css", b"body{}")
    assert cloud.get("blog", "/")[2] == b"<h1>v2</h1>"
    # And forward again to a named version.
    answer = cloud.cli("site", "rollback", "blog", str(newest), token=token)
    cloud.wait_for_content("blog", "/", b"<h1>v3</h1>")
    assert cloud.get("blog", "/assets/app.css")[0] == 404
    versions = cloud.cli("site", "versions", "blog")
    assert versions["versions"][-1]["source"] == "rollback"
    # The one the site serves now is marked, in JSON and in the table.
    assert versions["current"] == answer["version"], versions
    marked = [line for line in cloud.cli_text("site", "versions", "blog").splitlines() if "(current)" in line]
    assert len(marked) == 1 and marked[0].startswith(f"{answer['version']} (current) "), marked

    missing = cloud.cli("site", "rollback", "blog", "999999", check=False, token=token)
    assert "no earlier version 999999" in missing["error"]["message"], missing


def test_a_zip_slip_deploy_is_refused_and_changes_nothing(cloud: LocalCloud, sites: dict[str, Any]) -> None:
    blog = sites["blog"]
    auth = base64.b64encode(f"{blog['deploy']['user']}:{blog['deploy']['password']}".encode()).decode()
    req = urllib.request.Request(
        blog["deploy"]["url"],
        data=_zip({"../../etc/evil": b"x", "index.html": b"evil"}),
        method="POST",
        headers={"Authorization": f"Basic {auth}"},
    )
    ctx = ssl.create_default_context(cafile=str(cloud.ca_file))
    with pytest.raises(urllib.error.HTTPError) as err:
        urllib.request.urlopen(req, context=ctx, timeout=30)
    assert err.value.code == 400
    assert "error" in json.loads(err.value.read())
    assert cloud.get("blog", "/")[2] == b"<h1>v3</h1>"


def test_one_sites_ftp_credentials_cannot_reach_another(cloud: LocalCloud, sites: dict[str, Any]) -> None:
    blog = site_ftp(sites["blog"])
    blog.storbinary("STOR secret-blog.txt", io.BytesIO(b"blog only"))
    blog.quit()
    shop = site_ftp(sites["shop"])
    try:
        shop.storbinary("STOR index.html", io.BytesIO(b"shop"))
        for path in ("../blog", "/../blog", "/blog", "../..", "/"):
            try:
                listing = shop.nlst(path)
            except ftplib.error_perm:
                continue
            assert not any("secret-blog" in name for name in listing), (path, listing)
        for path in ("../blog/secret-blog.txt", "/../blog/secret-blog.txt"):
            with pytest.raises(ftplib.error_perm):
                shop.retrbinary(f"RETR {path}", lambda _: None)
        with pytest.raises(ftplib.error_perm):
            shop.storbinary("STOR ../blog/index.html", io.BytesIO(b"pwned"))
    finally:
        shop.quit()
    bad = ftplib.FTP()
    bad.connect(sites["blog"]["ftp"]["host"], sites["blog"]["ftp"]["port"], timeout=10)
    with pytest.raises(ftplib.error_perm, match="530"):
        bad.login("blog", sites["shop"]["ftp"]["password"])
    bad.close()
    cloud.wait_for_content("shop", "/", b"shop")
    assert cloud.get("blog", "/")[2] == b"<h1>v3</h1>"


def test_an_unknown_host_gets_the_platform_404_page(cloud: LocalCloud, sites: dict[str, Any]) -> None:
    status, _, body = cloud.get("nosuchsite", "/")
    assert status == 404
    assert b"sitecloud" in body and b"v3" not in body and b"shop" not in body


def test_an_https_only_site_redirects_plain_http(cloud: LocalCloud, sites: dict[str, Any]) -> None:
    cloud.cli("site", "set", "shop", "https_only=true")
    conn = http.client.HTTPConnection("127.0.0.1", cloud.ports["http_port"], timeout=10)
    try:
        conn.request("GET", "/page?x=1", headers={"Host": "shop.sites.localhost"})
        resp = conn.getresponse()
        resp.read()
    finally:
        conn.close()
    assert resp.status == 301
    assert resp.getheader("Location") == f"https://shop.sites.localhost:{cloud.ports['https_port']}/page?x=1"
    cloud.cli("site", "unset", "shop", "https_only")


def test_bad_input_is_refused_with_clear_errors(cloud: LocalCloud, sites: dict[str, Any]) -> None:
    sub = str(sites["subscription"]["id"])
    bad_name = cloud.cli("site", "create", "Bad_Name", "--subscription", sub, check=False)
    assert bad_name["error"]["code"] == "invalid_input"
    dup = cloud.cli("site", "create", "blog", "--subscription", sub, check=False)
    assert dup["error"]["code"] == "already_exists"
    over = cloud.cli("site", "create", "third", "--subscription", sub, check=False)
    assert over["error"]["code"] == "limit_reached"
    unknown = cloud.cli("site", "create", "fourth", "--subscription", "9999", check=False)
    assert unknown["error"]["code"] == "not_found"
    names = [s["name"] for s in cloud.cli("site", "list")["sites"]]
    assert sorted(names) == ["blog", "shop"]


def test_a_plan_update_says_which_subscriptions_it_leaves_over_their_limits(
    cloud: LocalCloud, sites: dict[str, Any]
) -> None:
    sub = sites["subscription"]["id"]
    try:
        plan = cloud.cli("plan", "update", "basic", "--max-sites", "1")
        assert plan["over_limit"] == [f"subscription {sub}: 2 sites (allowed 1)"], plan
        text = cloud.cli_text("plan", "update", "basic", "--max-sites", "1")
        assert "warning: 1 subscription now holds more than this plan allows:" in text, text
    finally:
        assert cloud.cli("plan", "update", "basic", "--max-sites", "2")["over_limit"] == []


def test_a_subscription_moves_to_a_bigger_plan_and_back_only_when_it_fits(cloud: LocalCloud) -> None:
    # Before, there was no way to move a subscription: an admin could only edit the plan every
    # subscriber shares, or delete the subscription with its sites.
    cloud.cli("plan", "create", "tiny", "--max-sites", "1", "--storage-mb", "1")
    cloud.cli("plan", "create", "roomy", "--max-sites", "2", "--storage-mb", "20", "--public")
    tenant = cloud.cli("tenant", "create", "mover")
    sub = cloud.cli("subscription", "create", "--tenant", "mover", "--plan", "tiny")
    site = cloud.cli("site", "create", "mover-site", "--subscription", str(sub["id"]))
    big = b"x" * (1536 * 1024)
    ftp = site_ftp(site)
    try:
        with pytest.raises(ftplib.error_perm, match="552"):
            ftp.storbinary("STOR big.bin", io.BytesIO(big))
    finally:
        ftp.close()

    # The tenant itself, to a public plan; the answer comes once the roles have the new quota.
    moved = cloud.cli("subscription", "update", str(sub["id"]), "--plan", "roomy", token=tenant["token"])
    assert moved["plan"] == "roomy" and moved["quotas"]["storage_mb"] == 20
    ftp = site_ftp(site)
    try:
        ftp.storbinary("STOR big.bin", io.BytesIO(big))
    finally:
        ftp.quit()

    # Back to the small plan: refused, saying what does not fit (or, while the fileserver cannot
    # say what the site stores yet, that it cannot be checked); nothing changes.
    def refused() -> dict[str, Any] | None:
        result = cloud.cli("subscription", "update", str(sub["id"]), "--plan", "tiny", check=False)
        assert "error" in result, result
        return result if result["error"]["code"] != "unavailable" else None

    error = wait_until(refused, timeout=15, what="the fileserver's size of the upload")["error"]
    assert error["code"] == "limit_reached", error
    assert "1.5 MB of content (it allows 1 MB)" in error["message"], error
    assert cloud.cli("subscription", "show", str(sub["id"]))["plan"] == "roomy"
    # A tenant may not pick a plan that is not public.
    denied = cloud.cli(
        "subscription", "update", str(sub["id"]), "--plan", "tiny", token=tenant["token"], check=False
    )
    assert denied["error"]["code"] == "not_found", denied


def test_up_suggests_the_next_step_the_home_needs(
    cloud: LocalCloud, sites: dict[str, Any], tmp_path: Path
) -> None:
    """`up` said "Next: sitecloud plan create" on a home that had plans and sites already."""
    fresh = Database.sqlite(tmp_path / "fresh.db")
    try:
        fresh.migrate()
        assert _next_step(_home_state(fresh)).startswith("sitecloud plan create basic ")
    finally:
        fresh.dispose()
    db = Database(f"sqlite:///{cloud.home / 'sitecloud.db'}")
    try:
        then = _next_step(_home_state(db))
    finally:
        db.dispose()
    assert then == "sitecloud site list"
    summary = _summary(json.loads((cloud.home / "endpoints.json").read_text()), then=then)
    assert "Next: sitecloud site list " in summary and "plan create" not in summary, summary
    # In between, the walk-through's next step.
    assert _next_step(_HomeState(plans=1)) == "sitecloud tenant create NAME"
    assert _next_step(_HomeState(plans=1, tenants=1)).startswith("sitecloud subscription create ")
    assert _next_step(_HomeState(plans=1, tenants=1, subscriptions=1)).startswith("sitecloud site create ")


def test_role_list_shows_every_role_ready(cloud: LocalCloud, sites: dict[str, Any]) -> None:
    def all_ready() -> list[dict[str, Any]] | None:
        roles = cloud.cli("role", "list")["roles"]
        return roles if all(r["state"] == "Ready" for r in roles) else None

    roles = wait_until(all_ready, timeout=10, what="every role Ready")
    assert sorted(r["role"] for r in roles) == ["fileserver", "frontend", "management", "publisher", "worker"]
    assert all(r["config_version"] >= 1 for r in roles)


def test_a_role_process_that_dies_is_restarted(cloud: LocalCloud, sites: dict[str, Any]) -> None:
    before = cloud.role_pids()["worker"]
    os.kill(before, signal.SIGKILL)
    after = wait_until(
        lambda: (pid := cloud.role_pids().get("worker")) != before and pid,
        timeout=15,
        what="the supervisor to restart the worker",
    )
    assert os.path.exists(f"/proc/{after}")
    # Back from its last-known-good config and cached content, without a new push.
    cloud.wait_for_content("blog", "/", b"<h1>v3</h1>")


def test_a_role_process_that_hangs_is_restarted(cloud: LocalCloud, sites: dict[str, Any]) -> None:
    # Alive but answering nothing: its supervisor sees no exit, so only the health checks can tell.
    # Before, it stayed Unhealthy (visitors got 502s) until an admin ran `role repair`.
    before = cloud.role_pids()["worker"]
    os.kill(before, signal.SIGSTOP)
    try:

        def unhealthy() -> str | None:
            worker = next(r for r in cloud.cli("role", "list")["roles"] if r["role"] == "worker")
            return str(worker.get("reason") or "") if worker["state"] == "Unhealthy" else None

        reason = wait_until(unhealthy, timeout=15, what="the hung worker to show Unhealthy")
        assert reason.startswith("health check failed: ") and reason != "health check failed: ", reason
        after = wait_until(
            lambda: (pid := cloud.role_pids().get("worker")) != before and pid,
            timeout=60,
            what="the controller to restart the hung worker",
        )
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(before, signal.SIGCONT)
    assert os.path.exists(f"/proc/{after}")
    cloud.wait_for_content("blog", "/", b"<h1>v3</h1>", timeout=30)
    assert "has not answered for" in cloud.log()
    wait_until(
        lambda: (
            next(r for r in cloud.cli("role", "list")["roles"] if r["role"] == "worker")["state"] == "Ready"
        ),
        timeout=30,
        what="the restarted worker to be Ready",
    )


def test_a_second_up_on_a_running_home_is_refused_before_it_starts_anything(
    cloud: LocalCloud, sites: dict[str, Any]
) -> None:
    assert cloud.proc is not None
    pids = cloud.role_pids()
    message = f"a cloud is already running on this home ({cloud.home}, pid {cloud.proc.pid}); stop it first"
    result = cloud.up_refused(json_output=False)
    assert result.returncode == 5 and "Traceback" not in result.stderr, result.stderr
    assert f"error: {message}\n" in result.stderr
    assert f"hint: Ctrl-C where that `sitecloud up` runs, or `kill {cloud.proc.pid}`" in result.stderr
    result = cloud.up_refused(json_output=True)
    assert result.returncode == 5 and "Traceback" not in result.stderr, result.stderr
    assert json.loads(result.stdout)["error"] == {
        "code": "in_use",
        "message": message,
        "hint": f"Ctrl-C where that `sitecloud up` runs, or `kill {cloud.proc.pid}`",
    }
    # The running cloud did not notice.
    assert cloud.role_pids() == pids and cloud.proc.poll() is None
    assert {r["state"] for r in cloud.cli("role", "list")["roles"]} == {"Ready"}


def _sitecloud(cloud: LocalCloud, *args: str) -> tuple[int, Any]:
    """`sitecloud --json ...` with no terminal: its exit code and its JSON answer."""
    proc = subprocess.run(
        [sys.executable, "-m", "roles.management.cli", "--home", str(cloud.home), *args, "--json"],
        capture_output=True,
        text=True,
        stdin=subprocess.DEVNULL,
        timeout=120,
    )
    assert "Traceback" not in proc.stderr, proc.stderr
    return proc.returncode, json.loads(proc.stdout)


def test_the_last_management_role_cannot_be_stopped_and_the_last_worker_asks_first(
    cloud: LocalCloud, sites: dict[str, Any]
) -> None:
    for action in (["stop"], ["remove", "--yes"]):
        code, answer = _sitecloud(cloud, "role", *action, "management", "localhost")
        assert code == 5 and answer["error"]["code"] == "in_use", answer
        assert "the last running management role" in answer["error"]["message"]
        assert "`sitecloud role restart management localhost`" in answer["error"]["hint"]
    roles = {r["role"]: r for r in cloud.cli("role", "list")["roles"]}
    assert roles["management"]["desired_state"] == "running"

    # The last worker: every site would go down, so not without --yes.
    pid = cloud.role_pids()["worker"]
    code, answer = _sitecloud(cloud, "role", "stop", "worker", "localhost")
    assert code == 4 and answer["error"]["code"] == "confirmation_required", answer
    assert "last running worker" in answer["error"]["message"] and "--yes" in answer["error"]["hint"]
    assert cloud.role_pids()["worker"] == pid
    assert {r["role"]: r for r in cloud.cli("role", "list")["roles"]}["worker"]["desired_state"] == "running"

    code, answer = _sitecloud(cloud, "role", "stop", "worker", "localhost", "--yes")
    assert code == 0 and answer["state"] == "Stopped" and answer["seconds"] > 0, answer
    # The answer comes once the role list says so too.
    assert _listed(cloud)["worker"]["state"] == "Stopped"
    # --yes is taken by every role action, so a script may pass it to each.
    code, answer = _sitecloud(cloud, "role", "start", "worker", "localhost", "--yes")
    assert code == 0 and answer["state"] == "Ready" and answer["seconds"] > 0, answer
    assert _listed(cloud)["worker"]["state"] == "Ready"
    cloud.wait_for_content("blog", "/", b"<h1>v3</h1>", timeout=30)


def _listed(cloud: LocalCloud) -> dict[str, dict[str, Any]]:
    return {r["role"]: r for r in cloud.cli("role", "list")["roles"]}


def test_restarting_management_waits_until_it_serves_again(cloud: LocalCloud, sites: dict[str, Any]) -> None:
    # A `site logs --follow` open meanwhile reconnects (before, it ended at once with exit 0).
    follow = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "roles.management.cli",
            "--home",
            str(cloud.home),
            "site",
            "logs",
            "blog",
            "-f",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    printed: list[str] = []
    assert follow.stdout is not None
    reader = threading.Thread(target=lambda: printed.extend(follow.stdout or ()), daemon=True)
    reader.start()
    try:
        time.sleep(1.0)
        before = cloud.role_pids()["management"]
        logged = len(cloud.log())
        code, answer = _sitecloud(cloud, "role", "restart", "management", "localhost")
        assert code == 0 and answer["state"] == "Ready", answer
        assert answer["seconds"] >= 1.0, answer
        assert cloud.role_pids()["management"] != before
        assert _listed(cloud)["management"]["state"] == "Ready"
        marker = f"/after-restart-{os.getpid()}"
        wait_until(
            lambda: cloud.get("blog", marker)[0] and any(marker in line for line in printed),
            timeout=30,
            what="the follow to show a request made after the restart",
        )
        assert follow.poll() is None
        # The open follow ended with the old management rather than hold its stop until it was killed.
        assert "did not stop within" not in cloud.log()[logged:], cloud.log()[logged:]
    finally:
        follow.terminate()
        _, err = follow.communicate(timeout=10)
        reader.join(timeout=5)
        follow.stdout.close()
    assert "reconnecting" in err, err


def test_a_role_added_on_a_host_never_reached_can_be_removed_and_its_host_deleted(cloud: LocalCloud) -> None:
    # A typo in `role add`: the role stays, Failed, to say why; nothing was installed there, so it and
    # its host go without SSH (before, remove answered "not in the ssh fabric: add it first").
    failed = cloud.cli("role", "add", "management", "nosuchhost.invalid", check=False)
    assert failed["error"]["code"] == "unavailable", failed
    hosts = {h["name"]: h["state"] for h in cloud.cli("host", "list")["hosts"]}
    assert hosts["nosuchhost.invalid"] == "failed", hosts  # not "ready": it was never reached
    removed = cloud.cli("role", "remove", "management", "nosuchhost.invalid", "--yes")
    assert removed["state"] == "Removed", removed
    cloud.cli("host", "delete", "nosuchhost.invalid", "--yes")
    assert "nosuchhost.invalid" not in {r["host"] for r in cloud.cli("role", "list")["roles"]}
    assert "nosuchhost.invalid" not in {h["name"] for h in cloud.cli("host", "list")["hosts"]}


def test_up_with_a_public_port_taken_names_it_and_starts_nothing(tmp_path: Path) -> None:
    other = LocalCloud(tmp_path / "home")
    with socket.create_server(("127.0.0.1", other.ports["https_port"])):
        result = other.up_refused(json_output=False)
        port = other.ports["https_port"]
        assert result.returncode == 5 and "Traceback" not in result.stderr, result.stderr
        assert (
            f"error: port {port} (--https-port) is in use by another process; choose another with --https-port\n"
            in result.stderr
        )
        result = other.up_refused(json_output=True)
        assert result.returncode == 5, result.stderr
        assert json.loads(result.stdout)["error"]["code"] == "in_use"
    assert not list((other.home / "roles").glob("*/role.pid"))
    assert not list((other.home / "logs").glob("*.log"))


def test_up_with_an_internal_port_taken_names_it_and_starts_nothing(tmp_path: Path) -> None:
    other = LocalCloud(tmp_path / "home")
    with socket.create_server(("127.0.0.1", 0)) as held:
        port = held.getsockname()[1]
        other.home.mkdir(parents=True)
        (other.home / "cloud.json").write_text(json.dumps({"internal_ports": {"worker": port}}))
        result = other.up_refused(json_output=True)
    assert result.returncode == 5 and "Traceback" not in result.stderr, result.stderr
    error = json.loads(result.stdout)["error"]
    assert error["message"] == (
        f"port {port} (the worker's control port, chosen by the first `up` on this home) is in use by "
        "another process"
    )
    assert '"worker" from "internal_ports"' in error["hint"]
    assert not list((other.home / "roles").glob("*/role.pid"))


def test_up_with_one_port_given_twice_is_refused(tmp_path: Path) -> None:
    other = LocalCloud(tmp_path / "home")
    other.ports["api_port"] = other.ports["https_port"]
    result = other.up_refused(json_output=True)
    assert result.returncode == 2, result.stderr
    assert json.loads(result.stdout)["error"]["message"] == (
        f"--https-port and --api-port are both {other.ports['api_port']}; each needs a port of its own"
    )


def test_the_data_plane_outlives_the_controller_and_a_restart(
    cloud: LocalCloud, sites: dict[str, Any], tmp_path: Path
) -> None:
    pids = cloud.role_pids()
    cloud.cli("plan", "create", "late-plan", "--max-sites", "2", "--storage-mb", "1")
    late_sub = cloud.cli("subscription", "create", "--tenant", "contoso", "--plan", "late-plan")
    # A site the controller stopped, to be started while it is down.
    cloud.cli("site", "create", "paused", "--subscription", str(late_sub["id"]))
    assert "pending" not in cloud.cli("site", "show", "paused")
    cloud.cli("site", "stop", "paused")
    cloud.kill_controller()
    # Controller gone: sites still serve, FTP still publishes.
    assert cloud.get("blog", "/")[2] == b"<h1>v3</h1>"
    ftp = site_ftp(sites["shop"])
    ftp.storbinary("STOR index.html", io.BytesIO(b"shop v2"))
    ftp.quit()
    cloud.wait_for_content("shop", "/", b"shop v2")

    # Nobody checks the roles now: `role list` says so rather than a Ready from before.
    def unknown() -> list[dict[str, Any]] | None:
        roles = cloud.cli("role", "list")["roles"]
        return roles if all(r["state"] == "Unknown" for r in roles) else None

    roles = wait_until(unknown, timeout=20, what="the roles to show Unknown without a controller")
    assert "is the controller running?" in roles[0]["reason"], roles[0]
    # A site made now reaches the publisher only with the controller: a deploy says to retry
    # (before: "site late is not served by this publisher", a not-found).
    # Its creation says so (before: "state running", as if it were live).
    created = cloud.cli("site", "create", "late", "--subscription", str(late_sub["id"]))
    assert created["pending"].startswith("not live yet: site late is created"), created
    assert "as soon as the controller runs again" in created["pending"], created
    # So do `site show` and `site list`, as long as it is so (before: "running", nothing more), and
    # for a site started now too.
    assert cloud.cli("site", "start", "paused")["pending"].startswith("not live yet"), "paused"
    for name in ("late", "paused"):
        shown = cloud.cli("site", "show", name)
        assert shown["state"] == "running" and shown["apps"] == [], shown
        assert shown["pending"] == (
            f"not live yet: site {name} is stored as running, but the cloud's controller has not "
            "applied that; nothing serves it until the controller runs again"
        )
        text = cloud.cli_text("site", "show", name)
        assert "  state         running (pending)\n" in text and f"NOTE: {shown['pending']}\n" in text, text
    listed = {site["name"]: site for site in cloud.cli("site", "list")["sites"]}
    assert listed["late"]["pending"] and listed["paused"]["pending"] and "pending" not in listed["blog"]
    rows = {line.split()[0]: line for line in cloud.cli_text("site", "list").splitlines() if line}
    assert "running (pending)" in rows["late"] and "running (pending)" in rows["paused"], rows
    assert "running" in rows["blog"] and "pending" not in rows["blog"], rows
    assert rows["NOTE:"].startswith("NOTE: a pending site is not live yet"), rows
    (tmp_path / "late").mkdir()
    (tmp_path / "late" / "index.html").write_bytes(b"late")
    error = cloud.cli("deploy", "late", str(tmp_path / "late"), check=False)["error"]
    assert error["code"] == "unavailable", error
    assert "does not know site late yet" in error["message"] and "controller" in error["hint"], error

    # A new `up` on the same home adopts the running roles rather than restarting them.
    cloud.start()
    assert cloud.role_pids() == pids
    wait_until(
        lambda: all(r["state"] == "Ready" for r in cloud.cli("role", "list")["roles"]),
        timeout=15,
        what="every role Ready again",
    )
    # Live now: show and list say running, nothing more.
    for name in ("late", "paused"):
        wait_until(
            lambda name=name: "pending" not in cloud.cli("site", "show", name),
            timeout=15,
            what=f"{name} to be live",
        )
    assert not [site for site in cloud.cli("site", "list")["sites"] if "pending" in site]
    cloud.cli("deploy", "late", str(tmp_path / "late"))
    cloud.wait_for_content("late", "/", b"late")
    assert cloud.get("blog", "/")[2] == b"<h1>v3</h1>"

    # A clean stop stops every role process, each on its own (the deploy's log follow on the worker
    # held its stop until it was killed).
    logged = len(cloud.log())
    assert cloud.stop() == 0
    assert "did not stop within" not in cloud.log()[logged:], cloud.log()[logged:]
    for pid in pids.values():
        wait_until(lambda pid=pid: not os.path.exists(f"/proc/{pid}"), timeout=10, what=f"pid {pid} to exit")

    # And a cold start serves the same sites from the same home.
    cloud.start()
    assert cloud.get("blog", "/")[2] == b"<h1>v3</h1>"
    cloud.wait_for_content("shop", "/", b"shop v2")
    assert cloud.stop() == 0


def test_up_brings_back_a_management_role_left_stopped(cloud: LocalCloud) -> None:
    """A home where management was stopped (older versions allowed it) is not left without a door."""
    assert cloud.proc is not None and cloud.proc.poll() is not None  # stopped by the test before
    db = sqlite3.connect(cloud.home / "sitecloud.db")
    with db:
        db.execute("UPDATE roles SET desired_state = 'stopped' WHERE kind = 'management'")
    db.close()
    started = time.monotonic()
    cloud.start()
    try:
        assert time.monotonic() - started < 40
        management = _listed(cloud)["management"]
        assert (management["state"], management["desired_state"]) == ("Ready", "running"), management
    finally:
        assert cloud.stop() == 0


@pytest.mark.parametrize(
    ("change", "code", "said"),
    [
        # The kernel took 99999 as 34463, and `up` printed 99999 as the sites' port.
        ({"http_port": 99999}, 2, "argument --http-port: give a port from 1 to 65535"),
        (
            {"db_url": "mysql://u:p@127.0.0.1/db"},
            2,
            "error: the runtime DB cannot be mysql: PostgreSQL or SQLite",
        ),
        ({"db_url": "not a url"}, 2, "error: the runtime DB's address is not a database URL"),
        (
            {"db_url": "postgresql://owner:s3cret@127.0.0.1:1/sitecloud"},
            6,
            "error: cannot use the runtime DB postgresql://owner:***@127.0.0.1:1/sitecloud: connection failed",
        ),
        ({"home": "/proc/sitecloud-home"}, 2, "error: cannot make the cloud home /proc/sitecloud-home: "),
    ],
    ids=["port", "db-kind", "db-url", "db-unreachable", "home"],
)
def test_up_with_a_bad_option_says_what_is_wrong_without_a_traceback(
    tmp_path: Path, change: dict[str, Any], code: int, said: str
) -> None:
    other = LocalCloud(Path(change.get("home", tmp_path / "home")), db_url=change.get("db_url", ""))
    other.ports.update({k: v for k, v in change.items() if k.endswith("_port")})
    result = other.up_refused(json_output=False)
    assert result.returncode == code and "Traceback" not in result.stderr, result.stderr
    assert said in result.stderr, result.stderr
    assert "s3cret" not in result.stderr + result.stdout
