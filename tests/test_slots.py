"""Deployment slots on a `sitecloud up` cloud: a staging slot with its own content and credentials, and a
swap under a visitor load that sees no failed request and never a wrong page."""

from __future__ import annotations

import base64
import ftplib
import http.client
import io
import ssl
import threading
import time
import zipfile
from collections.abc import Iterator
from typing import Any
from urllib.parse import urlsplit

import pytest

from tests.cloud import LocalCloud, SiteConnection, running_cloud
from tests.support import wait_until

pytestmark = pytest.mark.timeout(300)

V1 = b"<h1>v1 production</h1>"
V2 = b"<h1>v2 staging</h1>"


@pytest.fixture(scope="module")
def cloud(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalCloud]:
    yield from running_cloud(tmp_path_factory)


@pytest.fixture(scope="module")
def app(cloud: LocalCloud) -> dict[str, Any]:
    cloud.cli("plan", "create", "slotted", "--max-sites", "2", "--storage-mb", "5")
    tenant = cloud.cli("tenant", "create", "fabrikam")
    sub = cloud.cli("subscription", "create", "--tenant", "fabrikam", "--plan", "slotted")
    token = tenant["token"]
    site = cloud.cli("site", "create", "app", "--subscription", str(sub["id"]), token=token)
    staging = cloud.cli("site", "slot", "create", "app", "staging", token=token)
    return {"token": token, "site": site, "staging": staging}


def _publish(site: dict[str, Any], body: bytes) -> None:
    ftp = ftplib.FTP()
    ftp.connect(site["ftp"]["host"], site["ftp"]["port"], timeout=10)
    ftp.login(site["ftp"]["user"], site["ftp"]["password"])
    try:
        ftp.storbinary("STOR index.html", io.BytesIO(body))
    finally:
        ftp.quit()


def test_a_slot_is_a_site_of_its_own_counted_against_the_plan(cloud: LocalCloud, app: dict[str, Any]) -> None:
    staging = app["staging"]
    assert staging["name"] == "app-staging" and staging["slot"] == "staging"
    assert staging["url"] == f"https://app-staging.sites.localhost:{cloud.ports['https_port']}/"
    assert staging["ftp"]["user"] == "app-staging" and staging["ftp"]["password"]
    assert staging["ftp"]["password"] != app["site"]["ftp"]["password"]
    # The plan allows two sites: the slot is the second one.
    refused = cloud.cli("site", "slot", "create", "app", "test", token=app["token"], check=False)
    assert refused["error"]["code"] == "limit_reached" and "slots count" in refused["error"]["message"]
    bad = cloud.cli("site", "slot", "create", "app", "Not_OK", token=app["token"], check=False)
    assert bad["error"]["code"] == "invalid_input" and "lower-case" in bad["error"]["hint"], bad


def test_each_slot_serves_what_its_own_credentials_published(cloud: LocalCloud, app: dict[str, Any]) -> None:
    _publish(app["site"], V1)
    _publish(app["staging"], V2)
    cloud.wait_for_content("app", "/", V1)
    cloud.wait_for_content("app-staging", "/", V2)


def test_swap_under_load_fails_no_request_and_keeps_sticky_settings(
    cloud: LocalCloud, app: dict[str, Any]
) -> None:
    token = app["token"]
    cloud.cli("site", "set", "app", "DB=production-db", "THEME=blue", token=token)
    cloud.cli("site", "set", "app-staging", "DB=staging-db", "THEME=green", token=token)
    for name in ("app", "app-staging"):
        assert cloud.cli("site", "sticky", name, "DB", token=token)["sticky"] == ["DB"]
        # Without names it shows them: a look must not clear them.
        assert cloud.cli("site", "sticky", name, token=token)["sticky"] == ["DB"]

    port, ca = cloud.ports["https_port"], cloud.ca_file
    stop = threading.Event()
    # Per visitor: two visitors' answers interleave in any order under load (one asked before the
    # swap may be answered after the other's first answer from after it), but each one's own
    # requests follow each other.
    seen: dict[tuple[str, bool], list[bytes]] = {
        (site, keep_alive): [] for site in ("app", "app-staging") for keep_alive in (True, False)
    }
    failures: list[str] = []

    def visit(site: str, keep_alive: bool) -> None:
        host = f"{site}.{cloud.domain}"
        conn: SiteConnection | None = None
        while not stop.is_set():
            try:
                if conn is None:
                    conn = SiteConnection(port, host, ca)
                conn.request("GET", "/", headers={"Host": host})
                resp = conn.getresponse()
                body = resp.read()
                if resp.status != 200:
                    failures.append(f"{site}: HTTP {resp.status} {body[:80]!r}")
                seen[(site, keep_alive)].append(body)
            except OSError as exc:
                failures.append(f"{site}: {type(exc).__name__}: {exc}")
                conn = None
                continue
            if not keep_alive or resp.will_close:
                conn.close()
                conn = None
        if conn is not None:
            conn.close()

    threads = [
        threading.Thread(target=visit, args=(site, keep_alive), daemon=True)
        for site in ("app", "app-staging")
        for keep_alive in (True, False)
    ]
    for t in threads:
        t.start()
    try:
        time.sleep(0.5)
        answer = cloud.cli("site", "swap", "app", "staging", token=token, timeout=120)
        # Once the CLI answers every front end runs the new routes.
        assert cloud.get("app")[2] == V2 and cloud.get("app-staging")[2] == V1
        time.sleep(0.5)
    finally:
        stop.set()
        for t in threads:
            t.join(timeout=15)
    assert answer == {
        "site": "app",
        "slot": "staging",
        "production_served_by": "app-staging",
        "slot_served_by": "app",
    }
    assert not failures, failures[:10]
    for site, before, after in (("app", V1, V2), ("app-staging", V2, V1)):
        for keep_alive in (True, False):
            bodies = seen[(site, keep_alive)]
            assert len(bodies) > 10 and set(bodies) == {before, after}, (site, len(bodies), set(bodies))
            # One flip, never back: v1 then v2 for production (and the other way round for staging).
            flip = bodies.index(after)
            assert bodies[:flip] == [before] * flip and bodies[flip:] == [after] * (len(bodies) - flip)

    slots = {s["slot"]: s for s in cloud.cli("site", "slot", "list", "app", token=token)["slots"]}
    assert slots["production"]["served_by"] == "app-staging"
    assert slots["staging"]["served_by"] == "app"
    # Sticky settings stayed with their address; the others moved with the content.
    assert slots["production"]["sticky_settings"] == {"DB": "production-db"}
    assert slots["staging"]["sticky_settings"] == {"DB": "staging-db"}
    serving_production = cloud.cli("site", "settings", "app-staging", token=token)["settings"]
    assert serving_production == {"DB": "production-db", "THEME": "green"}

    # A swapped slot cannot be deleted from under production; after a swap back it can.
    refused = cloud.cli("site", "slot", "delete", "app", "staging", "--yes", token=token, check=False)
    assert refused["error"]["code"] == "in_use" and "swap back" in refused["error"]["hint"]
    cloud.cli("site", "swap", "app", "staging", token=token, timeout=120)
    assert cloud.get("app")[2] == V1 and cloud.get("app-staging")[2] == V2
    assert cloud.cli("site", "settings", "app", token=token)["settings"]["DB"] == "production-db"
    text = cloud.cli_text("site", "slot", "list", "app", "--token", token)
    assert "app-staging" in text and "DB=production-db" in text


def _zipdeploy(cloud: LocalCloud, site: dict[str, Any], address: str, files: dict[str, bytes]) -> int:
    """Kudu's zip deploy with the site's publishing credentials, naming the site by ``?site=``."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for name, data in files.items():
            zf.writestr(name, data)
    url = urlsplit(site["deploy"]["url"])
    conn = http.client.HTTPSConnection(
        url.hostname or "",
        url.port,
        context=ssl.create_default_context(cafile=str(cloud.ca_file)),
        timeout=60,
    )
    token = base64.b64encode(f"{site['ftp']['user']}:{site['ftp']['password']}".encode()).decode()
    try:
        conn.request(
            "POST",
            f"/api/zipdeploy?site={address}",
            body=buf.getvalue(),
            headers={"Authorization": f"Basic {token}", "Content-Type": "application/zip"},
        )
        resp = conn.getresponse()
        resp.read()
        return resp.status
    finally:
        conn.close()


def test_a_slots_publishing_credentials_follow_its_address_through_a_swap(
    cloud: LocalCloud, app: dict[str, Any]
) -> None:
    token = app["token"]
    cloud.cli("site", "swap", "app", "staging", token=token, timeout=120)
    try:
        # The slot's address is answered by what was production; the slot's credentials write there.
        assert cloud.get("app-staging")[2] == V1
        _publish(app["staging"], b"<h1>v3 through the staging credentials</h1>")
        cloud.wait_for_content("app-staging", "/", b"<h1>v3 through the staging credentials</h1>")
        assert cloud.get("app")[2] == V2
        assert (
            _zipdeploy(cloud, app["staging"], "app-staging", {"index.html": b"v4 zipped to staging"}) == 200
        )
        cloud.wait_for_content("app-staging", "/", b"v4 zipped to staging")
        # And production's to production's address; neither reaches the other's.
        _publish(app["site"], b"<h1>v5 production</h1>")
        cloud.wait_for_content("app", "/", b"<h1>v5 production</h1>")
        assert _zipdeploy(cloud, app["staging"], "app", {"index.html": b"not mine"}) == 401
        assert cloud.get("app-staging")[2] == b"v4 zipped to staging"
    finally:
        cloud.cli("site", "swap", "app", "staging", token=token, timeout=120)
    # Swapped back: each address has its own content and credentials again.
    assert cloud.get("app")[2] == b"v4 zipped to staging"
    _publish(app["site"], V1)
    _publish(app["staging"], V2)
    cloud.wait_for_content("app", "/", V1)
    cloud.wait_for_content("app-staging", "/", V2)


def test_a_swap_to_a_slot_that_does_not_answer_is_refused(cloud: LocalCloud, app: dict[str, Any]) -> None:
    token = app["token"]
    ftp = ftplib.FTP()
    staging = app["staging"]
    ftp.connect(staging["ftp"]["host"], staging["ftp"]["port"], timeout=10)
    ftp.login(staging["ftp"]["user"], staging["ftp"]["password"])
    try:
        ftp.delete("index.html")
    finally:
        ftp.quit()
    wait_until(lambda: cloud.get("app-staging")[0] == 404, timeout=15, what="the slot to lose its page")
    refused = cloud.cli("site", "swap", "app", "staging", "--warm-timeout", "2", token=token, check=False)
    assert (
        refused["error"]["code"] == "unavailable" and "did not answer 2xx/3xx" in refused["error"]["message"]
    )
    assert "HTTP 404" in refused["error"]["message"]
    assert cloud.get("app")[2] == V1
    # Still unswapped: the slot can go.
    assert cloud.cli("site", "slot", "delete", "app", "staging", "--yes", token=token)["deleted"] is True
    slots = cloud.cli("site", "slot", "list", "app", token=token)["slots"]
    assert [s["slot"] for s in slots] == ["production"]


def test_a_swap_to_a_slot_with_nothing_published_is_refused(cloud: LocalCloud, app: dict[str, Any]) -> None:
    # Its address answers the platform's "nothing published yet" page with a 200: warm, it is not, and
    # production would have served that page.
    token = app["token"]
    cloud.cli("site", "slot", "create", "app", "empty", token=token)
    try:
        refused = cloud.cli("site", "swap", "app", "empty", "--warm-timeout", "5", token=token, check=False)
        # A conflict with the slot's state (exit 5), not a fault to retry (exit 6).
        assert refused["error"]["code"] == "nothing_published", refused
        assert refused["error"]["message"] == "slot empty of app (app-empty) has nothing published", refused
        assert cloud.get("app")[2] == V1
        slots = cloud.cli("site", "slot", "list", "app", token=token)["slots"]
        assert {s["slot"]: s["served_by"] for s in slots} == {"production": "app", "empty": "app-empty"}
    finally:
        cloud.cli("site", "slot", "delete", "app", "empty", "--yes", token=token)


def test_deleting_a_production_site_takes_its_slots_along(cloud: LocalCloud, app: dict[str, Any]) -> None:
    token = app["token"]
    cloud.cli("site", "slot", "create", "app", "next", token=token)
    assert cloud.cli("site", "show", "app-next", token=token)["name"] == "app-next"
    cloud.cli("site", "delete", "app", "--yes", token=token)
    listed = cloud.cli("site", "list", token=token)
    assert [s["name"] for s in listed["sites"]] == []
