"""A site's source, secrets and dependency lists are never served as files, static site or not.

Fileserver and worker are real processes; content is published as the publisher would (in the
order an lftp mirror uploads: dot files first, before any app file), and the worker is asked as a
front end, on ordinary connections and on a lane, with every spelling of a path we know of.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from roles.worker._source import is_app_source, is_never_served
from roles.worker.apps._spec import detect_runtime
from tests.support import lane_exchange, wait_until
from tests.test_worker_apps import AppCloud, running_cloud

PHP = shutil.which("php-cgi") is not None
SECRET = b"SECRET-7f3a"

# What an lftp mirror of a Python project sends before its app.py arrives.
PROJECT = {
    ".env": b"DATABASE_URL=postgres://u:" + SECRET,
    ".git/config": b"[remote] url=https://user:" + SECRET + b"@example.com",
    ".htpasswd": b"admin:" + SECRET,
    ".user.ini": b"auto_prepend_file=" + SECRET,
    "settings.py": b"SECRET_KEY = '" + SECRET + b"'",
    "UPPER.PY": b"# " + SECRET,
    "lib/helpers.inc": b"<?php // " + SECRET,
    "lib/old.php.bak": b"<?php // " + SECRET,
    "__pycache__/settings.cpython-311.pyc": SECRET,
    "requirements.txt": b"django  # " + SECRET,
    "Pipfile.lock": SECRET,
    "pyproject.toml": SECRET,
    "composer.json": SECRET,
    "composer.lock": SECRET,
    "package.json": SECRET,
    "package-lock.json": SECRET,
    "yarn.lock": SECRET,
    "Procfile": b"worker: python jobs.py  # " + SECRET,
    "Gemfile": SECRET,
    "web.config": SECRET,
    # Data: Django's startproject database, its journal, dumps left in the web root.
    "db.sqlite3": b"SQLite format 3\x00" + SECRET,
    "db.sqlite3-journal": SECRET,
    "data/app.DB": SECRET,
    "backup/dump.sql": b"INSERT INTO users VALUES ('" + SECRET + b"');",
    "db.sqlite3.bak": SECRET,
    "index.html": b"<h1>home</h1>",
    "css/site.css": b"body{}",
    "readme.txt": b"plain text",
    ".well-known/security.txt": b"Contact: mailto:security@example.com",
}
REFUSED = [
    "/.env", "/.ENV", "/%2eenv", "/%2Eenv", "/.env/", "/./.env", "//.env", "/.env.", "/.git/config",
    "/.git/", "/.git", "/%2egit/config", "/.htpasswd", "/.user.ini", "/settings.py", "/SETTINGS.PY",
    "/settings.py.", "/settings%2epy", "/UPPER.PY", "/upper.py", "/lib/helpers.inc", "/lib/old.php.bak",
    "/__pycache__/settings.cpython-311.pyc", "/requirements.txt", "/Pipfile.lock", "/pyproject.toml",
    "/composer.json", "/composer.lock", "/package.json", "/package-lock.json", "/yarn.lock",
    "/Procfile", "/Gemfile", "/web.config", "/.env?x=1", "/settings.py#x", "/db.sqlite3", "/DB.SQLITE3.",
    "/db.sqlite3-journal", "/data/app.DB", "/data/app.db", "/backup/dump.sql", "/db.sqlite3.bak",
]  # fmt: skip
SERVED = {"/": b"<h1>home</h1>", "/css/site.css": b"body{}", "/readme.txt": b"plain text"}


@pytest.fixture(scope="module")
def cloud() -> Iterator[AppCloud]:
    with running_cloud(app_start_timeout=10.0) as c:
        yield c


def _refused(status: int, body: bytes, what: str) -> None:
    assert status == 404, f"{what}: {status} {body[:200]!r}"
    assert SECRET not in body and b"Not found" in body, what


def test_a_static_site_never_serves_source_or_dot_files_in_any_spelling(cloud: AppCloud) -> None:
    cloud.add_site("mirror")
    cloud.publish("mirror", PROJECT)
    wait_until(lambda: cloud.get("mirror", "/css/site.css")[2] == b"body{}", what="the mirror's content")
    assert cloud.app("mirror")["runtime"] == "static"
    for path, body in SERVED.items():
        status, _, got = cloud.get("mirror", path)
        assert (status, got) == (200, body), path
    status, _, got = cloud.get("mirror", "/.well-known/security.txt")
    assert status == 200 and b"Contact" in got, "the one dot folder meant for visitors is served"
    for path in REFUSED:
        for method in ("GET", "HEAD"):
            status, _, got = cloud.get("mirror", path, method=method)
            if method == "HEAD":
                assert status == 404 and got == b"", f"HEAD {path}: {status}"
            else:
                _refused(status, got, f"GET {path}")
        for extra in (
            {"Range": "bytes=0-3"},
            {"If-None-Match": "*"},
            {"If-Modified-Since": "Thu, 01 Jan 1970 00:00:00 GMT"},
        ):
            status, _, got = cloud.get("mirror", path, headers=extra)
            _refused(status, got, f"GET {path} {extra}")
    # A path that climbs (even to a dot file) is refused before anything is looked up.
    for path in ("/a/../.env", "/css/%2e%2e/.env", "/css/%2e%2e%2f.env"):
        status, _, got = cloud.get("mirror", path)
        assert status == 400 and SECRET not in got, path
    # Asked often, a refused path never reaches the hot cache: still refused.
    for _ in range(3):
        _refused(*cloud.get("mirror", "/.env")[::2], "/.env again")


def test_a_lane_refuses_source_like_an_ordinary_connection(cloud: AppCloud) -> None:
    cloud.add_site("lane")
    cloud.publish("lane", PROJECT)
    wait_until(lambda: cloud.get("lane", "/css/site.css")[2] == b"body{}", what="the lane site's content")
    paths = ["/css/site.css", *REFUSED, "/readme.txt"]
    heads = [
        f"GET {p} HTTP/1.1\r\nHost: x\r\nX-Sitecloud-Site: lane\r\nX-Sitecloud-Lane: {n}\r\n\r\n".encode()
        for n, p in enumerate(paths)
    ]
    answers = lane_exchange(cloud.pki, cloud.config.data_port, heads)
    assert len(answers) == len(paths)
    for n, (path, answer) in enumerate(zip(paths, answers, strict=True)):
        assert answer.header("X-Sitecloud-Lane") == str(n), path
        if path in ("/css/site.css", "/readme.txt"):
            assert answer.status == 200, path
        else:
            _refused(answer.status, answer.body, f"lane GET {path}")


def test_source_stays_refused_when_the_app_arrives_and_static_files_still_serve(cloud: AppCloud) -> None:
    cloud.add_site("flip")
    cloud.publish("flip", PROJECT)
    wait_until(lambda: cloud.get("flip", "/readme.txt")[2] == b"plain text", what="the first upload")
    _refused(*cloud.get("flip", "/settings.py")[::2], "before app.py")
    cloud.publish(
        "flip",
        {
            "app.py": b"def app(environ, start_response):\n"
            b"    start_response('200 OK', [('Content-Type', 'text/plain')])\n"
            b"    return [b'app answered ' + environ['PATH_INFO'].encode()]\n",
            "static/site.css": b"body{}",
        },
    )
    wait_until(lambda: b"app answered" in cloud.get("flip", "/nothing-here")[2], timeout=20, what="the app")
    assert cloud.app("flip")["runtime"] == "python"
    # The app gets the paths (it routes them as it likes); the files are never sent raw. Only its
    # static folder is served as files, as Flask and Django serve theirs.
    for path in ("/settings.py", "/.env", "/app.py", "/requirements.txt", "/css/site.css", "/readme.txt"):
        status, _, got = cloud.get("flip", path)
        assert SECRET not in got and b"def app" not in got, path
        assert status == 200 and got.startswith(b"app answered"), path
    assert cloud.get("flip", "/static/site.css")[2] == b"body{}"


def test_a_django_layout_runs_its_project_wsgi_and_never_leaks_settings(cloud: AppCloud) -> None:
    cloud.add_site("dj")
    cloud.publish(
        "dj",
        {
            "manage.py": b"import sys  # " + SECRET,
            "proj/__init__.py": b"",
            "proj/settings.py": b"SECRET_KEY = '" + SECRET + b"'",
            "proj/wsgi.py": b"def application(environ, start_response):\n"
            b"    start_response('200 OK', [('Content-Type', 'text/plain')])\n"
            b"    return [b'django-like ' + environ['PATH_INFO'].encode()]\n",
            "static/site.css": b"body{}",
        },
    )
    wait_until(lambda: b"django-like" in cloud.get("dj", "/")[2], timeout=20, what="the project's wsgi app")
    app = cloud.app("dj")
    assert (app["runtime"], app["entry"]) == ("python", "proj.wsgi:application")
    for path in ("/proj/settings.py", "/manage.py", "/proj/wsgi.py", "/PROJ/SETTINGS.PY"):
        got = cloud.get("dj", path)[2]
        assert SECRET not in got and b"def application" not in got, path
    assert cloud.get("dj", "/static/site.css")[2] == b"body{}"


def test_php_in_a_sub_folder_makes_the_site_php_and_scripts_run_never_download(cloud: AppCloud) -> None:
    cloud.add_site("wp")
    cloud.publish(
        "wp",
        {
            "index.html": b"<h1>front page</h1>",
            "blog/index.php": b"<?php echo 'blog ' . (1 + 1);",
            "blog/wp-config.php": b"<?php $password = '" + SECRET + b"';",
            "blog/wp-config.php.save": b"<?php $password = '" + SECRET + b"';",
            "blog/theme/style.css": b"h1{}",
        },
    )
    wait_until(lambda: cloud.get("wp", "/blog/theme/style.css")[2] == b"h1{}", what="the blog's content")
    assert cloud.app("wp")["runtime"] == "php"
    assert cloud.get("wp", "/")[2] == b"<h1>front page</h1>"
    for path in (
        "/blog/wp-config.php",
        "/BLOG/WP-CONFIG.PHP",
        "/blog/wp-config.php.save",
        "/blog/wp-config.php.",
    ):
        status, headers, got = cloud.get("wp", path)
        assert SECRET not in got, path
        assert headers.get("content-type") != "application/octet-stream", path
    if PHP:
        status, _, got = cloud.get("wp", "/blog/")
        assert (status, got) == (200, b"blog 2")


def test_the_rule_and_detection_on_their_own(tmp_path: Path) -> None:
    for rel in (".env", "a/.git/HEAD", "x.PHP7", "x.phtml", "a/b.phar", "app.py~", "requirements-dev.txt",
                "wp-config.php.orig", ".well-known/.hidden", "a/__pycache__/m.pyc", "app.py .", "yarn.lock"):  # fmt: skip
        assert is_app_source(rel), rel
    for rel in ("", "index.html", ".well-known/acme-challenge/abc", "phpinfo.html", "notes.bak", "a.min.js",
                "readme.txt", "docs/python.html"):  # fmt: skip
        assert not is_app_source(rel), rel
    for rel in (
        "db.sqlite3", "a/B.DB", "db.sqlite3-wal", "x.sqlite-shm", "dump.sql", "old.sql.bak", "a.mdb",
        "wp-content/debug.log", "storage/logs/laravel.LOG", "storage/oauth-private.key", "cert.pfx",
    ):  # fmt: skip
        assert is_never_served(rel) and not is_app_source(rel), rel
    for rel in ("index.html", "sql.html", "db", "docs/db.html", "notes.bak", "a.sqlite3.html", "blog.html"):
        assert not is_never_served(rel), rel

    def layout(name: str, files: list[str]) -> str:
        root = tmp_path / name
        for f in files:
            (root / f).parent.mkdir(parents=True, exist_ok=True)
            (root / f).write_text("x")
        return str(root)

    assert detect_runtime(layout("static", ["index.html", "a/b/c.css", ".git/hooks/x.php"])) == ("static", "")
    assert detect_runtime(layout("deep", ["index.html", "a/b/c/d/e.php"])) == ("php", "index.php")
    assert detect_runtime(layout("django", ["manage.py", "my_proj/wsgi.py", "my_proj/settings.py"])) == (
        "python",
        "my_proj.wsgi:application",
    )
    assert detect_runtime(layout("flask", ["wsgi.py", "pkg/__init__.py"])) == ("python", "wsgi")
