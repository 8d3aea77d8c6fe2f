"""An app's answers kept by the front end when the app says so (roles/frontend/_cache.py app_lifetime).

A real fileserver, worker (running the site's WSGI app) and front end. The app answers every request
with a body of its own making (a fresh random token), so an answer that did not reach the app is
seen as a repeat. Kept: a 200 to a plain GET that says ``Cache-Control: public, max-age=N``, for at
most N seconds, until the site's next publish; never one that sets a cookie, varies by anything but
Accept-Encoding, or answers a request with credentials.
"""

from __future__ import annotations

import http.client
import socket
import threading
import time
from collections.abc import Iterator

import pytest

from roles.frontend.config import FrontendConfig
from tests.support import RoleProcess, wait_until
from tests.test_worker_apps import AppCloud, running_cloud

pytestmark = pytest.mark.timeout(180)

DOMAIN = "sites.test"

APP = b"""
import time
import uuid

VERSION = %s

def app(environ, start_response):
    path = environ["PATH_INFO"]
    headers = [("Content-Type", "text/plain")]
    if path == "/public":
        headers.append(("Cache-Control", "public, max-age=60"))
    elif path == "/short":
        headers.append(("Cache-Control", "public, max-age=1"))
    elif path == "/cookie":
        headers += [("Cache-Control", "public, max-age=60"), ("Set-Cookie", "s=1")]
    elif path == "/vary":
        headers += [("Cache-Control", "public, max-age=60"), ("Vary", "Cookie")]
    elif path == "/encoding":
        headers += [("Cache-Control", "public, max-age=60"), ("Vary", "Accept-Encoding")]
    elif path == "/private":
        headers.append(("Cache-Control", "private, max-age=60"))
    elif path == "/slow":
        time.sleep(3)
        headers.append(("Cache-Control", "public, max-age=60"))
    elif path == "/link":
        # Its own address, as many apps build a redirect's or a reset mail's.
        headers.append(("Cache-Control", "public, max-age=60"))
        path += " https://" + environ["HTTP_HOST"] + "/login"
    body = ("%%s %%s %%s" %% (VERSION, path, uuid.uuid4().hex)).encode()
    headers.append(("Content-Length", str(len(body))))
    start_response("200 OK", headers)
    return [body]
"""


class Front:
    def __init__(self, cloud: AppCloud, frontend: RoleProcess) -> None:
        self.cloud = cloud
        self.frontend = frontend

    def get(self, path: str, *, host: str = f"pyapp.{DOMAIN}", **headers: str) -> tuple[int, bytes]:
        ctx = self.cloud.pki.client_ssl(None)
        port = int(self.frontend.config.https_port)  # type: ignore[attr-defined]
        conn = http.client.HTTPSConnection("127.0.0.1", port, context=ctx, timeout=20)
        conn.sock = ctx.wrap_socket(
            socket.create_connection(("127.0.0.1", port), timeout=20), server_hostname=f"pyapp.{DOMAIN}"
        )
        try:
            conn.request("GET", path, headers={"Host": host, **headers})
            resp = conn.getresponse()
            return resp.status, resp.read()
        finally:
            conn.close()

    def figures(self) -> dict[str, int]:
        return {k: int(v) for k, v in self.frontend.health().items() if k.startswith("cache_")}


@pytest.fixture(scope="module")
def front() -> Iterator[Front]:
    with running_cloud(app_start_timeout=10.0, package_index_url="none") as cloud:
        cloud.add_site("pyapp", runtime="python", entry="app:app")
        cloud.publish("pyapp", {"app.py": APP % b"'v1'"})
        wait_until(
            lambda: (got := cloud.get("pyapp", "/x"))[0] == 200 and got[2].startswith(b"v1 /x"),
            timeout=30,
            what="the app to answer on the worker",
        )
        pki = cloud.pki
        fe_config = pki.role_config(
            FrontendConfig, "frontend", cloud.config.home.parent / "frontend", usage_interval=0.0
        )
        pki.ca.issue_wildcard(DOMAIN).write(fe_config.wildcard_key_file, fe_config.wildcard_cert_file)
        frontend = RoleProcess(fe_config, pki).start()
        try:
            frontend.push_config(
                {
                    "version": 1,
                    "domain": DOMAIN,
                    "sites": {"pyapp": {"workers": [f"localhost:{cloud.config.data_port}"]}},
                }
            )
            got = Front(cloud, frontend)
            # The worker's version feed opens once the front end has an answer worth keeping.
            wait_until(
                lambda: got.get("/public")[0] == 200 and got.figures().get("cache_feeds_live", 0) >= 1,
                timeout=15,
                what="a live feed",
            )
            yield got
        finally:
            frontend.stop()


def test_an_answer_the_app_says_is_public_is_not_asked_of_it_again_within_max_age(front: Front) -> None:
    # Waited for, not assumed of the first answer: one the worker refused on its lane (the site's app
    # answers its GETs) and that then went on a connection of its own is not kept, and whether that
    # happens here or during the fixture depends on when the front end's lane came up.
    def kept() -> bytes | None:
        status, body = front.get("/public")
        return body if status == 200 and front.get("/public") == (200, body) else None

    first = wait_until(kept, timeout=15, what="an answer to be kept")
    assert first.startswith(b"v1 /public ")
    held = front.figures()["cache_held_hits"]
    for _ in range(5):
        assert front.get("/public") == (200, first)
    assert front.figures()["cache_held_hits"] == held + 5
    # A query is another target; credentials and conditionals always reach the app.
    assert front.get("/public?page=2")[1] != first
    assert front.get("/public", Authorization="Bearer x")[1] != first
    assert front.get("/public", **{"If-None-Match": '"x"'})[1] != first
    assert front.get("/public") == (200, first)


def test_an_answer_is_kept_for_the_host_it_was_given_to(front: Front) -> None:
    # The key was the target alone: a visitor's "Host: pyapp.sites.test:1" (or another of the
    # site's names) had its answer, links to port 1 and all, given to every visitor of the site.
    poisoned = wait_until(
        lambda: (lambda a, b: a if a == b else None)(
            front.get("/link", host=f"pyapp.{DOMAIN}:1")[1], front.get("/link", host=f"pyapp.{DOMAIN}:1")[1]
        ),
        what="the answer to the odd Host to be kept",
    )
    assert f"https://pyapp.{DOMAIN}:1/login".encode() in poisoned
    status, body = front.get("/link")
    assert status == 200 and f"https://pyapp.{DOMAIN}/login ".encode() in body, body
    # Kept for its own Host in turn.
    assert front.get("/link")[1] == body


def test_not_beyond_max_age(front: Front) -> None:
    _, first = front.get("/short")
    assert front.get("/short")[1] == first
    time.sleep(1.2)
    assert front.get("/short")[1] != first


def test_never_one_that_sets_a_cookie_varies_by_more_or_is_private(front: Front) -> None:
    for path in ("/cookie", "/vary", "/private", "/plain"):
        first = front.get(path)[1]
        assert front.get(path)[1] != first, path


def test_an_answer_varying_by_accept_encoding_is_only_given_for_that_encoding(front: Front) -> None:
    gzip = front.get("/encoding", **{"Accept-Encoding": "gzip"})[1]
    assert front.get("/encoding", **{"Accept-Encoding": "gzip"})[1] == gzip
    # Asked with another Accept-Encoding: the app answers (that answer is the one kept from then on).
    other = front.get("/encoding", **{"Accept-Encoding": "br"})[1]
    assert other != gzip
    assert front.get("/encoding", **{"Accept-Encoding": "br"})[1] == other
    assert front.get("/encoding")[1] not in (gzip, other)


def test_a_publish_drops_a_kept_answer(front: Front) -> None:
    _, first = front.get("/public")
    assert front.get("/public")[1] == first
    # A publish of anything in the site (here a static file): the app's kept answers go.
    front.cloud.publish("pyapp", {"robots.txt": b"User-agent: *\n"})
    body = wait_until(
        lambda: (got := front.get("/public")[1]) != first and got,
        timeout=20,
        what="the kept answer to go after the publish",
    )
    assert body.startswith(b"v1 /public ")
    # The new version's app code answers as soon as it is served.
    front.cloud.publish("pyapp", {"app.py": APP % b"'v2'"})
    body = wait_until(
        lambda: (got := front.get("/public")[1]).startswith(b"v2") and got,
        timeout=30,
        what="the new app's answer",
    )
    for _ in range(3):
        assert front.get("/public")[1] == body


def test_an_old_apps_answer_that_ends_after_a_publish_is_not_kept_as_the_new_versions(front: Front) -> None:
    """The old app answers a slow request after the new version was announced: that answer is the old
    version's, and the new version's visitors must never be given it."""

    def serves(version: bytes) -> bool:
        return front.get("/x")[1].startswith(version)

    wait_until(lambda: serves(b"v2"), timeout=30, what="the app of the last test")
    slow: list[bytes] = []
    asker = threading.Thread(target=lambda: slow.append(front.get("/slow")[1]))
    asker.start()
    time.sleep(1.0)  # the request is with the v2 app now
    front.cloud.publish("pyapp", {"app.py": APP % b"'v3'"})
    asker.join(timeout=30)
    assert slow and slow[0].startswith(b"v2 /slow "), slow
    wait_until(lambda: serves(b"v3"), timeout=30, what="the new app's answer")
    # Asked now, /slow is the new app's: the old answer was not kept under the new version.
    assert front.get("/slow")[1].startswith(b"v3 /slow ")
