"""An app's cookies stay on its own site: a Set-Cookie scoped to the platform's domain (which browsers
would send to every other tenant's site) reaches the visitor host-only; one scoped to the site's own
host names is left as it is (roles/frontend/_cookies.py).

A real fileserver, worker (running the tenant's WSGI app) and front end, asked over plain HTTP with
the Host a browser would send; and the boundary function on its own.
"""

from __future__ import annotations

import http.client
from collections.abc import Iterator

import pytest

from roles.frontend._cookies import site_scoped_cookie
from roles.frontend.config import FrontendConfig
from tests.support import RoleProcess, wait_until
from tests.test_worker_apps import running_cloud

pytestmark = pytest.mark.timeout(180)

DOMAIN = "sites.test"
CUSTOM = "shop.example.org"

# Each cookie the app sets names the Domain it asks for; the visitor's host comes back in the body.
APP = b"""
COOKIES = [
    "plain=1; Path=/",
    "apex=1; Domain=sites.test; Path=/",
    "dotted=1; domain=.SITES.test.; Path=/; HttpOnly",
    "parent=1; Domain=test",
    "twice=1; Domain=evil.sites.test; Domain=.sites.test",
    "own=1; Domain=evil.sites.test; Secure",
    "custom=1; Domain=shop.example.org",
    "Domain=sites.test; Path=/",
]

def app(environ, start_response):
    body = environ.get("HTTP_HOST", "-").encode()
    headers = [("Content-Type", "text/plain"), ("Content-Length", str(len(body)))]
    headers += [("Set-Cookie", c) for c in COOKIES]
    start_response("200 OK", headers)
    return [body]
"""

# What the visitor gets, in order: the platform's domain (or a parent of it) never survives.
EXPECTED = [
    "plain=1; Path=/",
    "apex=1; Path=/",
    "dotted=1; Path=/; HttpOnly",
    "parent=1",
    "twice=1; Domain=evil.sites.test",
    "own=1; Domain=evil.sites.test; Secure",
    "custom=1; Domain=shop.example.org",
    "Domain=sites.test; Path=/",
]


@pytest.fixture(scope="module")
def frontend() -> Iterator[RoleProcess]:
    with running_cloud(app_start_timeout=10.0, package_index_url="none") as cloud:
        cloud.add_site("evil", runtime="python", entry="app:app")
        cloud.publish_and_wait("evil", {"app.py": APP}, "/", b"localhost")
        pki = cloud.pki
        fe_config = pki.role_config(
            FrontendConfig, "frontend", cloud.config.home.parent / "frontend", usage_interval=0.0
        )
        pki.ca.issue_wildcard(DOMAIN).write(fe_config.wildcard_key_file, fe_config.wildcard_cert_file)
        front = RoleProcess(fe_config, pki).start()
        try:
            front.push_config(
                {
                    "version": 1,
                    "domain": DOMAIN,
                    "sites": {
                        "evil": {"workers": [f"localhost:{cloud.config.data_port}"], "hostnames": [CUSTOM]}
                    },
                }
            )
            yield front
        finally:
            front.stop()


def cookies(front: RoleProcess, host: str) -> tuple[int, list[str], bytes]:
    port = int(front.config.http_port)  # type: ignore[attr-defined]
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=20)
    try:
        conn.request("GET", "/", headers={"Host": host})
        resp = conn.getresponse()
        return resp.status, resp.msg.get_all("Set-Cookie") or [], resp.read()
    finally:
        conn.close()


@pytest.mark.parametrize("host", [f"evil.{DOMAIN}", CUSTOM])
def test_a_cookie_for_the_platforms_domain_reaches_the_visitor_host_only(
    frontend: RoleProcess, host: str
) -> None:
    _, got, body = wait_until(
        lambda: (answer := cookies(frontend, host))[0] == 200 and answer,
        timeout=15,
        what=f"the app to answer on {host}",
    )
    assert body == host.encode()
    assert got == EXPECTED


def test_only_a_domain_attribute_that_could_reach_the_platform_is_dropped() -> None:
    domain = b"sites.test"
    for value in (
        b"a=1; Domain=sites.test",
        b"a=1; Domain=.sites.test",
        b"a=1; Domain=..sites.test",
        b"a=1; Domain=sites.test.",
        b"a=1; DOMAIN = Sites.Test ",
        b"a=1; domain=\tsites.test",
        b"a=1; Domain=test",
        b"a=1; Domain=%73ites.test",
        b"a=1; Domain=s\xef\xbd\x89tes.test",  # a fullwidth letter, which IDNA would fold
    ):
        assert site_scoped_cookie(value, domain) == b"a=1", value
    for value in (
        b"a=1",
        b"a=1; Domain=evil.sites.test",
        b"a=1; Domain=.evil.sites.test; Path=/",
        b"a=1; Domain=shop.example.org",
        b"a=1; Domain=example.org",
        b"a=1; Domain=notsites.test",
        b"a=1; Domain=",
        b"Domain=sites.test",
        b"a=Domain=sites.test; Path=/",
    ):
        assert site_scoped_cookie(value, domain) == value, value
    assert site_scoped_cookie(b"a=1; Domain=sites.test; Secure; Domain=x.sites.test", domain) == (
        b"a=1; Secure; Domain=x.sites.test"
    )
    # No domain (a front end before its first snapshot): nothing to keep apps from.
    assert site_scoped_cookie(b"a=1; Domain=sites.test", b"") == b"a=1; Domain=sites.test"
