"""The sample sites in docs/samples, as their owners would publish them: each folder mirrored by FTP
to a site of a `sitecloud up` cloud with its defaults, then its pages fetched through the front end."""

from __future__ import annotations

import ftplib
import json
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.cloud import LocalCloud
from tests.support import pip_index_unreachable, wait_until

pytestmark = pytest.mark.timeout(300)

SAMPLES = Path(__file__).resolve().parent.parent / "docs" / "samples"


def _needs_index() -> None:
    if why := pip_index_unreachable():
        pytest.skip(why)


@pytest.fixture(scope="module")
def cloud(traversable_home: Path) -> Iterator[LocalCloud]:
    cloud = LocalCloud(traversable_home)
    cloud.start()
    try:
        cloud.cli("plan", "create", "samples", "--max-sites", "10", "--storage-mb", "100")
        cloud.cli("tenant", "create", "samplers")
        yield cloud
    finally:
        cloud.kill_everything()


def _publish_sample(cloud: LocalCloud, name: str, folder: str) -> None:
    """A new site with the sample's whole folder mirrored to it by FTP, as lftp `mirror -R` does."""
    subs = cloud.cli("subscription", "list")["subscriptions"]
    sub = next((s for s in subs if s["tenant"] == "samplers"), None)
    if sub is None:
        sub = cloud.cli("subscription", "create", "--tenant", "samplers", "--plan", "samples")
    site = cloud.cli("site", "create", name, "--subscription", str(sub["id"]))
    ftp = ftplib.FTP()
    ftp.connect(site["ftp"]["host"], site["ftp"]["port"], timeout=10)
    ftp.login(site["ftp"]["user"], site["ftp"]["password"])
    try:
        root = SAMPLES / folder
        for path in sorted(root.rglob("*")):
            rel = path.relative_to(root).as_posix()
            if path.is_dir():
                ftp.mkd(rel)
            else:
                with path.open("rb") as f:
                    ftp.storbinary(f"STOR {rel}", f)
    finally:
        ftp.quit()


def _wait_for(cloud: LocalCloud, site: str, path: str, needle: bytes, timeout: float) -> None:
    """Until the page answers 200 with ``needle`` in it (the first request may install and start)."""
    last: list[Any] = []

    def served() -> bool:
        last[:] = cloud.get(site, path)[::2]
        return bool(last[0] == 200 and needle in last[1])

    try:
        wait_until(served, timeout=timeout, interval=0.5, what=f"{site}{path}")
    except AssertionError:
        logs = cloud.cli("site", "logs", site, "--lines", "40", check=False)
        raise AssertionError(f"{site}{path} answers {last}; its log: {logs}") from None


def _json(cloud: LocalCloud, site: str, path: str) -> Any:
    status, _, body = cloud.get(site, path)
    assert status == 200, (path, status, body[:300])
    return json.loads(body)


def test_the_flask_sample(cloud: LocalCloud) -> None:
    _needs_index()
    _publish_sample(cloud, "flask-sample", "flask")
    _wait_for(cloud, "flask-sample", "/?name=Ada", b"<h1>Hello, Ada, from Flask</h1>", timeout=120)
    assert _json(cloud, "flask-sample", "/api/echo/hi") == {"upper": "HI", "word": "hi"}
    status, _, body = cloud.get("flask-sample", "/static/style.css")
    assert (status, body) == (200, (SAMPLES / "flask" / "static" / "style.css").read_bytes())
    assert cloud.get("flask-sample", "/app.py")[0] == 404


def test_the_django_sample(cloud: LocalCloud) -> None:
    _needs_index()
    _publish_sample(cloud, "django-sample", "django")
    _wait_for(cloud, "django-sample", "/", b"<h1>Hello from Django</h1>", timeout=120)
    first = _json(cloud, "django-sample", "/visits/")["visits"]
    assert _json(cloud, "django-sample", "/visits/")["visits"] == first + 1
    # The database is in the site's home: it outlives a restart of the app.
    cloud.cli("site", "stop", "django-sample")
    cloud.cli("site", "start", "django-sample")
    _wait_for(cloud, "django-sample", "/", b"<h1>Hello from Django</h1>", timeout=60)
    assert _json(cloud, "django-sample", "/visits/")["visits"] == first + 2
    assert cloud.get("django-sample", "/static/site.css")[::2] == (200, b"body { margin: 2em; }\n")
    for source in ("/manage.py", "/mysite/settings.py", "/requirements.txt"):
        assert cloud.get("django-sample", source)[0] == 404, source


def test_the_fastapi_sample(cloud: LocalCloud) -> None:
    _needs_index()
    _publish_sample(cloud, "fastapi-sample", "fastapi")
    _wait_for(cloud, "fastapi-sample", "/", b'{"hello":"from FastAPI"}', timeout=120)
    assert _json(cloud, "fastapi-sample", "/items/7?q=x") == {"item_id": 7, "q": "x"}
    status, _, body = cloud.get("fastapi-sample", "/items/seven")
    assert status == 422 and b"item_id" in body


@pytest.mark.skipif(shutil.which("php-cgi") is None, reason="needs Debian php-cgi (.ci/run installs it)")
def test_the_php_front_controller_sample(cloud: LocalCloud) -> None:
    _publish_sample(cloud, "php-sample", "php")
    _wait_for(cloud, "php-sample", "/", b"<h1>Hello from PHP</h1>", timeout=60)
    status, headers, body = cloud.get("php-sample", "/blog/2026/hello-world")
    assert (status, body) == (200, b"post hello-world of 2026 (view 1 in this session)"), body
    cookie = headers["set-cookie"].split(";", 1)[0]
    status, _, body = cloud.get("php-sample", "/blog/2026/hello-world/", headers={"Cookie": cookie})
    assert body == b"post hello-world of 2026 (view 2 in this session)"
    assert cloud.get("php-sample", "/no/such/page")[0] == 404
    assert b"<?php" not in cloud.get("php-sample", "/lib/router.php")[2]
