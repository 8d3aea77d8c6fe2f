"""The sample sites in docs/samples, as their owners would publish them: each folder mirrored by FTP
to a site of a `sitecloud up` cloud with its defaults, then its pages fetched through the front end;
and each one again by Kudu's zip deploy and by git push."""

from __future__ import annotations

import base64
import ftplib
import io
import json
import os
import shutil
import ssl
import subprocess
import urllib.request
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest

from tests.cloud import LocalCloud
from tests.forked_cli import run_cli
from tests.support import WebSocket, npm_registry_unreachable, pip_index_unreachable, wait_until

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
        cloud.cli("plan", "create", "samples", "--max-sites", "60", "--storage-mb", "100")
        cloud.cli("tenant", "create", "samplers")
        yield cloud
    finally:
        cloud.kill_everything()


def _new_site(cloud: LocalCloud, name: str) -> dict[str, Any]:
    """A new site in the samplers' subscription (made by the first test that needs it)."""
    subs = cloud.cli("subscription", "list")["subscriptions"]
    sub = next((s for s in subs if s["tenant"] == "samplers"), None)
    if sub is None:
        sub = cloud.cli("subscription", "create", "--tenant", "samplers", "--plan", "samples")
    return dict(cloud.cli("site", "create", name, "--subscription", str(sub["id"])))


def _publish_sample(cloud: LocalCloud, name: str, folder: str | Path) -> None:
    """A new site with the sample's whole folder (or any folder) mirrored to it by FTP, as lftp
    `mirror -R` does."""
    site = _new_site(cloud, name)
    ftp = ftplib.FTP()
    ftp.connect(site["ftp"]["host"], site["ftp"]["port"], timeout=10)
    ftp.login(site["ftp"]["user"], site["ftp"]["password"])
    try:
        root = SAMPLES / folder if isinstance(folder, str) else folder
        for path in sorted(root.rglob("*")):
            rel = path.relative_to(root).as_posix()
            if path.is_dir():
                ftp.mkd(rel)
            else:
                with path.open("rb") as f:
                    ftp.storbinary(f"STOR {rel}", f)
    finally:
        ftp.quit()


def _folder(root: Path, files: dict[str, str]) -> Path:
    """A site's files as its owner has them on disk, to publish."""
    for rel, text in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(text)
    return root


def _wait_for(cloud: LocalCloud, site: str, path: str, needle: bytes, timeout: float) -> None:
    """Until the page answers 200 with ``needle`` in it (the first request may install and start)."""
    last: list[Any] = []

    def served() -> bool:
        last[:] = cloud.get(site, path)[::2]
        return bool(last[0] == 200 and needle in last[1])

    try:
        wait_until(served, timeout=timeout, interval=0.1, what=f"{site}{path}")
    except AssertionError:
        logs = cloud.cli("site", "logs", site, "--lines", "40", check=False)
        raise AssertionError(f"{site}{path} answers {last}; its log: {logs}") from None


def _websocket(cloud: LocalCloud, site: str, path: str) -> WebSocket:
    """A WebSocket to the site through the front end's HTTPS port, by SNI as a browser opens it."""
    tls = ssl.create_default_context(cafile=str(cloud.ca_file))
    return WebSocket.connect(cloud.ports["https_port"], f"{site}.{cloud.domain}", path, tls=tls)


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
    # pip's output reached the site's log line by line as it ran, before the worker's closing line.
    lines = cloud.cli("site", "logs", "flask-sample", "--lines", "1000")["lines"]
    build = [n for n, line in enumerate(lines) if "[build] " in line]
    done = [n for n, line in enumerate(lines) if "requirements installed" in line]
    assert any("Successfully installed" in lines[n] for n in build) and len(build) > 1, lines
    assert done and build[-1] < done[0], lines


def test_the_procfile_sample_runs_gunicorn_from_its_requirements(cloud: LocalCloud) -> None:
    _needs_index()
    _publish_sample(cloud, "procfile-sample", "procfile")
    _wait_for(cloud, "procfile-sample", "/?name=Ada", b"<h1>Hello, Ada, from gunicorn</h1>", timeout=120)
    # Its two gunicorn workers answer (the Procfile's own options hold).
    pids = {_json(cloud, "procfile-sample", "/api/worker")["pid"] for _ in range(40)}
    assert len(pids) == 2, pids
    assert cloud.cli("site", "show", "procfile-sample")["apps"][0]["runtime"] == "command"
    for source in ("/app.py", "/Procfile", "/requirements.txt"):
        assert cloud.get("procfile-sample", source)[0] == 404, source


def test_a_procfile_runs_python_and_nodes_packages_as_on_heroku(cloud: LocalCloud, tmp_path: Path) -> None:
    """``web: python app.py`` on a host whose Python is ``python3`` only, and a Procfile Node app
    whose package.json lists its dependencies."""
    plain = tmp_path / "plain"
    plain.mkdir()
    (plain / "Procfile").write_text("web: python app.py\n")
    (plain / "app.py").write_text(
        "import http.server, os, sys\n"
        "class Hello(http.server.BaseHTTPRequestHandler):\n"
        "    def do_GET(self):\n"
        "        self.send_response(200)\n"
        "        self.end_headers()\n"
        "        self.wfile.write(b'python %d' % sys.version_info[0])\n"
        "http.server.HTTPServer(('', int(os.environ['PORT'])), Hello).serve_forever()\n"
    )
    _publish_sample(cloud, "procfile-python", plain)
    _wait_for(cloud, "procfile-python", "/", b"python 3", timeout=60)
    if why := npm_registry_unreachable():
        pytest.skip(why)
    node = tmp_path / "node"
    node.mkdir()
    (node / "Procfile").write_text("web: node index.js\n")
    (node / "package.json").write_text('{"name": "n", "dependencies": {"express": "^4.19.2"}}\n')
    (node / "index.js").write_text(
        "const app = require('express')();\n"
        "app.get('/', (req, res) => res.send('express from a Procfile'));\n"
        "app.listen(process.env.PORT);\n"
    )
    _publish_sample(cloud, "procfile-node", node)
    _wait_for(cloud, "procfile-node", "/", b"express from a Procfile", timeout=180)


def test_the_django_sample(cloud: LocalCloud, tmp_path: Path) -> None:
    _needs_index()
    _publish_sample(cloud, "django-sample", "django")
    _wait_for(cloud, "django-sample", "/", b"<h1>Hello from Django</h1>", timeout=120)
    # Its table is there: the Procfile's release command migrated before the app started.
    lines = cloud.cli("site", "logs", "django-sample", "--lines", "1000")["lines"]
    assert any("Applying visits.0001_initial... OK" in line for line in lines), lines
    assert any("the release command ended well" in line for line in lines), lines
    first = _json(cloud, "django-sample", "/visits/")["visits"]
    assert _json(cloud, "django-sample", "/visits/")["visits"] == first + 1
    # The database is beside the code, as startproject keeps it: it outlives a restart of the app.
    cloud.cli("site", "stop", "django-sample")
    cloud.cli("site", "start", "django-sample")
    _wait_for(cloud, "django-sample", "/", b"<h1>Hello from Django</h1>", timeout=60)
    assert _json(cloud, "django-sample", "/visits/")["visits"] == first + 2
    assert cloud.get("django-sample", "/static/site.css")[::2] == (200, b"body { margin: 2em; }\n")
    for source in ("/manage.py", "/mysite/settings.py", "/requirements.txt", "/db.sqlite3"):
        assert cloud.get("django-sample", source)[0] == 404, source

    # The admin, styled: its CSS was collected into static/ by the release command and is served
    # from there. New settings are a new release: it makes the admin user they name.
    status, headers, body = cloud.get("django-sample", "/static/admin/css/base.css")
    assert (status, headers["content-type"]) == (200, "text/css; charset=utf-8") and b"body" in body
    cloud.cli("site", "set", "django-sample", "DJANGO_ADMIN_USER=ada", "DJANGO_ADMIN_PASSWORD=lovelace-1815")
    wait_until(
        lambda: (
            any(
                "made the admin user ada" in line
                for line in cloud.cli("site", "logs", "django-sample", "--lines", "300")["lines"]
            )
            or cloud.get("django-sample", "/admin/login/")[0] != 200
        ),
        timeout=60,
        interval=0.5,
        what="the release command to make the admin user",
    )
    # As a browser signs in: its Host and Origin name the port, which Django's CSRF check compares.
    host = f"django-sample.{cloud.domain}:{cloud.ports['https_port']}"
    status, headers, body = cloud.get("django-sample", "/admin/login/", headers={"Host": host})
    assert status == 200 and b"csrfmiddlewaretoken" in body, (status, body[:300])
    csrf = headers["set-cookie"].split("csrftoken=", 1)[1].split(";", 1)[0]
    token = body.split(b'name="csrfmiddlewaretoken" value="', 1)[1].split(b'"', 1)[0].decode()
    origin = f"https://{host}"
    form = f"csrfmiddlewaretoken={token}&username=ada&password=lovelace-1815&next=/admin/"
    status, headers, body = cloud.get(
        "django-sample",
        "/admin/login/?next=/admin/",
        method="POST",
        body=form.encode(),
        headers={
            "Host": host,
            "Cookie": f"csrftoken={csrf}",
            "Content-Type": "application/x-www-form-urlencoded",
            "Origin": origin,
            "Referer": f"{origin}/admin/login/",
        },
    )
    assert (status, headers.get("location")) == (302, "/admin/"), (status, body[body.find(b"<h1") :][:600])
    session = headers["set-cookie"].split("sessionid=", 1)[1].split(";", 1)[0]
    status, _, body = cloud.get(
        "django-sample", "/admin/", headers={"Host": host, "Cookie": f"sessionid={session}"}
    )
    assert status == 200 and b"Site administration" in body, (status, body[:300])

    # The owner runs a command in the site's sandbox, as `heroku run` or Kudu's console does: it sees
    # what the app sees (its packages, settings and database) and ends as the command did.
    printed = cloud.cli_text(
        "site", "run", "django-sample", "--", "python", "manage.py", "showmigrations", "visits"
    )
    assert printed.splitlines() == ["visits", " [X] 0001_initial"], printed
    made = run_cli(
        ["--home", str(cloud.home), "--json", "site", "run", "django-sample", "--timeout", "30", "--",
         "sh", "-c", "echo $DJANGO_ADMIN_USER; ls db.sqlite3; exit 3"],
        env=os.environ,
        timeout=90,
    )  # fmt: skip
    answer = json.loads(made.stdout)
    assert made.returncode == 3 and answer["exit_code"] == 3, (made, answer)
    assert answer["output"] == "ada\ndb.sqlite3\n" and not answer["timed_out"], answer
    slow = run_cli(
        ["--home", str(cloud.home), "site", "run", "django-sample", "--timeout", "1", "--", "sleep", "30"],
        env=os.environ,
        timeout=90,
    )
    assert slow.returncode == 124 and b"stopped after 1 s" in slow.stderr, slow

    # Django's collectstatic runs without a line in the Procfile, as Heroku and App Service run it.
    tree = tmp_path / "django"
    shutil.copytree(SAMPLES / "django", tree)
    (tree / "Procfile").write_text("release: python manage.py migrate --noinput\n")
    (tree / "static" / "site.css").write_text("body { margin: 3em; }\n")
    deployed = cloud.cli("deploy", "django-sample", str(tree), timeout=300)

    def collected() -> list[str]:
        lines = cloud.cli("site", "logs", "django-sample", "--lines", "300")["lines"]
        mark = f"running the collectstatic command of version {deployed['version']}"
        after = [line for n, line in enumerate(lines) if any(mark in ln for ln in lines[: n + 1])]
        return [line for line in after if "the collectstatic command ended well" in line]

    wait_until(collected, timeout=60, what="collectstatic to run for the new version")
    assert cloud.get("django-sample", "/static/site.css")[::2] == (200, b"body { margin: 3em; }\n")


def test_the_fastapi_sample(cloud: LocalCloud) -> None:
    _needs_index()
    _publish_sample(cloud, "fastapi-sample", "fastapi")
    _wait_for(cloud, "fastapi-sample", "/", b'{"hello":"from FastAPI"}', timeout=120)
    assert _json(cloud, "fastapi-sample", "/items/7?q=x") == {"item_id": 7, "q": "x"}
    status, _, body = cloud.get("fastapi-sample", "/items/seven")
    assert status == 422 and b"item_id" in body
    with _websocket(cloud, "fastapi-sample", "/ws") as ws:
        assert ws.head.startswith(b"HTTP/1.1 101 "), ws.head
        for text in ("one", "two"):
            ws.send(text)
            assert ws.recv() == f"FastAPI heard: {text}"
        assert ws.close() == 1000


def test_a_plain_asgi_app_echoes_websocket_messages_through_the_front_end(cloud: LocalCloud) -> None:
    _publish_sample(cloud, "asgi-sample", "asgi")
    _wait_for(cloud, "asgi-sample", "/", b"<h1>Hello from plain ASGI</h1>", timeout=60)
    with _websocket(cloud, "asgi-sample", "/ws") as ws:
        head = ws.head.lower()
        assert (
            ws.head.startswith(b"HTTP/1.1 101 Switching Protocols\r\n") and b"upgrade: websocket" in head
        ), ws.head
        # Messages both ways, one at a time and several in flight, text, binary and a large one.
        ws.send("hello")
        assert ws.recv() == "1: hello"
        for i in range(2, 12):
            ws.send(f"message {i}")
        assert [ws.recv() for _ in range(10)] == [f"{i}: message {i}" for i in range(2, 12)]
        ws.send(b"\x00\x01binary")
        assert ws.recv() == b"yranib\x01\x00"
        big = "x" * 200_000
        ws.send(big)
        assert ws.recv() == f"13: {big}"
        assert ws.close() == 1000
    # The page still answers, and a second socket is a new conversation.
    with _websocket(cloud, "asgi-sample", "/ws") as ws:
        ws.send("again")
        assert ws.recv() == "1: again"
        assert ws.close() == 1000
    # An upgrade the app refuses gets an HTTP answer, not a tunnel.
    with _websocket(cloud, "asgi-sample", "/elsewhere") as ws:
        assert ws.head.startswith(b"HTTP/1.1 403 "), ws.head


def test_the_express_sample(cloud: LocalCloud) -> None:
    if why := npm_registry_unreachable():
        pytest.skip(why)
    _publish_sample(cloud, "express-sample", "express")
    # The first start waits for npm ci: a few seconds with a warm registry.
    _wait_for(cloud, "express-sample", "/?name=Ada", b"<h1>Hello, Ada, from Express</h1>", timeout=180)
    assert _json(cloud, "express-sample", "/api/echo/hi") == {"upper": "HI", "word": "hi"}
    status, _, body = cloud.get("express-sample", "/style.css")
    assert (status, body) == (200, (SAMPLES / "express" / "public" / "style.css").read_bytes())
    # The app answers every path itself: its source is never a file to download.
    for source in ("/server.js", "/package.json"):
        assert cloud.get("express-sample", source)[0] == 404, source
    apps = cloud.cli("site", "show", "express-sample")["apps"]
    assert [a["runtime"] for a in apps] == ["node"], apps
    with _websocket(cloud, "express-sample", "/ws") as ws:
        assert ws.head.startswith(b"HTTP/1.1 101 "), ws.head
        for text in ("one", "two", "three"):
            ws.send(text)
            assert ws.recv() == f"echo: {text}"
        ws.send(b"\x00raw")
        assert ws.recv() == b"\x00raw"
        assert ws.close() == 1000


def test_a_django_project_collecting_into_staticfiles_is_told_what_the_platform_serves(
    cloud: LocalCloud, tmp_path: Path
) -> None:
    # STATIC_ROOT = BASE_DIR / "staticfiles", as Django's and Heroku's deployment guides have it:
    # collectstatic ends well, nothing serves that folder, and the admin came unstyled without a word.
    _needs_index()
    folder = tmp_path / "staticfiles-project"
    shutil.copytree(SAMPLES / "django", folder)
    settings = folder / "mysite" / "settings.py"
    text = settings.read_text()
    assert 'STATIC_ROOT = BASE_DIR / "static"' in text
    settings.write_text(
        text.replace('STATIC_ROOT = BASE_DIR / "static"', 'STATIC_ROOT = BASE_DIR / "staticfiles"')
    )
    (folder / "Procfile").write_text("release: python manage.py migrate --noinput\n")
    _publish_sample(cloud, "django-staticfiles", folder)
    _wait_for(cloud, "django-staticfiles", "/", b"<h1>Hello from Django</h1>", timeout=120)
    lines = cloud.cli("site", "logs", "django-staticfiles", "--lines", "1000")["lines"]
    said = "collectstatic put the static files in staticfiles/, which the platform does not serve"
    assert any(said in line and "STATIC_ROOT = BASE_DIR / 'static'" in line for line in lines), lines
    assert cloud.get("django-staticfiles", "/static/admin/css/base.css")[0] == 404


def test_a_node_app_published_with_its_own_node_modules_runs_on_the_installed_packages(
    cloud: LocalCloud, tmp_path: Path
) -> None:
    # A project folder as it is after `npm install` on the developer's machine (a Mac's native
    # builds, another version): Node looks in the app's folder first, so these shadowed the
    # packages the worker installed from package.json, and the app died on them.
    if why := npm_registry_unreachable():
        pytest.skip(why)
    folder = tmp_path / "express-with-modules"
    shutil.copytree(SAMPLES / "express", folder)
    broken = folder / "node_modules" / "express"
    broken.mkdir(parents=True)
    (broken / "package.json").write_text('{"name": "express", "version": "4.0.0", "main": "index.js"}')
    (broken / "index.js").write_text('throw new Error("express built for darwin-arm64");\n')
    _publish_sample(cloud, "express-own-modules", folder)
    _wait_for(cloud, "express-own-modules", "/?name=Ada", b"<h1>Hello, Ada, from Express</h1>", timeout=180)
    log = cloud.cli("site", "logs", "express-own-modules")["lines"]
    assert any("has a node_modules/ folder of its own" in line for line in log), log


def test_a_typescript_app_pushed_by_git_is_built_by_its_build_script_before_it_starts(
    cloud: LocalCloud, tmp_path: Path
) -> None:
    if why := npm_registry_unreachable():
        pytest.skip(why)
    site = _new_site(cloud, "typescript-sample")
    # As on Heroku: npm ci with the devDependencies (the compiler), then `npm run build` in the
    # app's sandbox, whose output the push shows as it runs; then the compiled app starts.
    printed = _git_push(cloud, site, "typescript", tmp_path / "push")
    assert "> tsc" in printed, printed
    _wait_for(cloud, "typescript-sample", "/", b"<h1>Hello from TypeScript</h1>", timeout=180)
    assert _json(cloud, "typescript-sample", "/api/greeting?name=Ada") == {"name": "Ada", "compiled": True}
    # A type error fails the deploy with the compiler's own words; the version before keeps serving.
    broken = tmp_path / "broken"
    shutil.copytree(SAMPLES / "typescript", broken)
    with (broken / "src" / "server.ts").open("a") as source:
        source.write('const port: number = "not a number";\n')
    refused = cloud.cli("deploy", "typescript-sample", str(broken), check=False, timeout=180)
    message = refused["error"]["message"]
    assert refused["error"]["code"] == "build_failed", refused
    assert "build command exited with status" in message and "TS2322" in message, message
    # The version put back is built again (tsc wrote the broken build's output before it failed).
    _wait_for(cloud, "typescript-sample", "/", b"<h1>Hello from TypeScript</h1>", timeout=120)
    assert _json(cloud, "typescript-sample", "/api/greeting?name=Bo") == {"name": "Bo", "compiled": True}


def test_a_static_site_published_as_its_unbuilt_sources_is_told_so_by_its_deploy(
    cloud: LocalCloud, tmp_path: Path
) -> None:
    _new_site(cloud, "vite-sources")
    tree = _folder(
        tmp_path / "vite-sources",
        {
            "package.json": '{"scripts": {"dev": "vite", "build": "vite build"}}',
            "index.html": '<div id="root"></div><script type="module" src="/src/main.tsx"></script>',
            "src/main.tsx": "export {};\n",
        },
    )
    printed = cloud.cli_text("deploy", "vite-sources", str(tree), timeout=120)
    assert "its package.json has a build script" in printed, printed
    assert "sitecloud deploy vite-sources dist/" in printed, printed
    assert cloud.get("vite-sources", "/")[0] == 200


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
    # An image uploaded through the app is served from where the app saved it.
    # A phone's photo is a few MB: more than PHP's own 2 MB upload limit.
    photo = b"\x89PNG\r\n\x1a\n" + os.urandom(5_000_000)
    boundary = "sample-boundary"
    form = (
        (
            f'--{boundary}\r\nContent-Disposition: form-data; name="photo"; filename="cat.png"\r\n'
            "Content-Type: image/png\r\n\r\n"
        ).encode()
        + photo
        + f"\r\n--{boundary}--\r\n".encode()
    )
    status, _, body = cloud.get(
        "php-sample",
        "/upload",
        method="POST",
        body=form,
        headers={"Content-Type": f"multipart/form-data; boundary={boundary}"},
    )
    assert (status, body) == (200, b"/uploads/cat.png"), body
    status, headers, body = cloud.get("php-sample", "/uploads/cat.png")
    assert (status, headers["content-type"], body == photo) == (200, "image/png", True)
    # A guestbook in SQLite through PDO, in the site's own folder; its database is never served.
    modules = subprocess.run(["php-cgi", "-m"], capture_output=True, text=True, timeout=30).stdout.split()
    if not {"pdo_sqlite", "mbstring"} <= set(modules):
        pytest.skip("the guestbook needs Debian php-sqlite3 and php-mbstring (.ci/run installs them)")
    for name in ("Ada", "Grace"):
        status, _, body = cloud.get(
            "php-sample",
            "/guestbook",
            method="POST",
            body=f"name={name}".encode(),
            headers={"Content-Type": "application/x-www-form-urlencoded"},
        )
        assert (status, body) == (200, f"signed by {name.upper()}".encode()), body
    assert cloud.get("php-sample", "/guestbook")[::2] == (200, b"<ul><li>Ada</li><li>Grace</li></ul>")
    assert cloud.get("php-sample", "/data/guestbook.sqlite")[0] == 404


@pytest.mark.skipif(shutil.which("php-cgi") is None, reason="needs Debian php-cgi (.ci/run installs it)")
def test_a_framework_layout_is_served_from_its_public_folder_and_nothing_beside_it(
    cloud: LocalCloud, tmp_path: Path
) -> None:
    """Laravel's, Symfony's, Slim's layout published as it is: visitors see public/ (its front
    controller, its assets), never the .env, logs, vendor/ or source beside it."""
    tree = _folder(
        tmp_path / "framework",
        {
            "public/index.php": "<?php require __DIR__ . '/../src/app.php';\n",
            "public/css/site.css": "body { color: teal; }\n",
            "src/app.php": (
                "<?php $path = parse_url($_SERVER['REQUEST_URI'], PHP_URL_PATH);\n"
                "echo 'framework: ' . $path . ' in ' . basename($_SERVER['DOCUMENT_ROOT']);\n"
            ),
            ".env": "APP_KEY=base64:the-secret-key\n",
            "artisan": "#!/usr/bin/env php\n<?php // the-secret-console\n",
            "storage/app/notes.txt": "the-secret-notes\n",
            "vendor/autoload.php": "<?php // the-secret-vendor\n",
            "composer.json": '{"name": "the-secret/app"}\n',
        },
    )
    _publish_sample(cloud, "framework", tree)
    _wait_for(cloud, "framework", "/", b"framework: / in public", timeout=60)
    assert cloud.get("framework", "/posts/7")[::2] == (200, b"framework: /posts/7 in public")
    assert cloud.get("framework", "/css/site.css")[::2] == (200, b"body { color: teal; }\n")
    for outside in ("/.env", "/artisan", "/storage/app/notes.txt", "/vendor/autoload.php", "/composer.json"):
        status, _, body = cloud.get("framework", outside)
        assert b"the-secret" not in body, (outside, status, body)
    # A static site generator's output published with its sources (Hugo's public/) is its site too.
    static = _folder(
        tmp_path / "generated",
        {
            "public/index.html": "<h1>generated</h1>",
            "public/posts/index.html": "<h1>posts</h1>",
            "config.toml": "title = 'the-secret-config'\n",
        },
    )
    _publish_sample(cloud, "generated", static)
    # (FTP makes each file a version: the last one's page is there once the whole site is.)
    _wait_for(cloud, "generated", "/posts/", b"<h1>posts</h1>", timeout=30)
    assert cloud.get("generated", "/")[::2] == (200, b"<h1>generated</h1>")
    status, headers, _ = cloud.get("generated", "/posts")
    assert (status, headers["location"]) == (301, "/posts/")
    assert b"the-secret" not in cloud.get("generated", "/config.toml")[2]


def test_a_static_sites_own_404_page_and_a_single_page_apps_routes(cloud: LocalCloud, tmp_path: Path) -> None:
    """A generator's 404.html for missing pages; a single-page app's index.html for its routes, by
    Azure Static Web Apps' staticwebapp.config.json or surge.sh's 200.html."""
    blog = _folder(
        tmp_path / "blog", {"index.html": "<h1>blog</h1>", "404.html": "<h1>lost? our own page</h1>"}
    )
    _publish_sample(cloud, "own404", blog)
    _wait_for(cloud, "own404", "/", b"<h1>blog</h1>", timeout=30)
    # A static site has no app sandbox to run a command in.
    static = run_cli(
        ["--home", str(cloud.home), "site", "run", "own404", "--", "ls"], env=os.environ, timeout=60
    )
    assert static.returncode == 5 and b"runs no app here" in static.stderr, static
    for missing in ("/no/such/post/", "/gone.png", "/.env"):
        status, headers, body = cloud.get("own404", missing)
        assert (status, body, headers["content-type"]) == (
            404,
            b"<h1>lost? our own page</h1>",
            "text/html; charset=utf-8",
        )

    config = {
        "navigationFallback": {"rewrite": "/index.html", "exclude": ["/images/*.{png,jpg}", "/css/*"]},
        "responseOverrides": {"404": {"rewrite": "/404.html"}},
    }
    spa = _folder(
        tmp_path / "spa",
        {
            "index.html": "<div id=app></div>",
            "404.html": "not here",
            "css/app.css": "#app{}",
            "staticwebapp.config.json": json.dumps(config),
        },
    )
    _publish_sample(cloud, "spa", spa)
    _wait_for(
        cloud, "spa", "/dashboard/settings", b"<div id=app></div>", timeout=30
    )  # the config is the last file
    for route in ("/dashboard/settings", "/users/7", "/dashboard/settings"):
        assert cloud.get("spa", route)[::2] == (200, b"<div id=app></div>"), route
    for excluded in ("/images/logo.png", "/css/missing.css"):
        assert cloud.get("spa", excluded)[::2] == (404, b"not here"), excluded

    surge = _folder(
        tmp_path / "surge", {"index.html": "<main>home</main>", "200.html": "<main>app shell</main>"}
    )
    _publish_sample(cloud, "surge", surge)
    _wait_for(cloud, "surge", "/", b"<main>home</main>", timeout=30)
    assert cloud.get("surge", "/inbox/42")[::2] == (200, b"<main>app shell</main>")
    # A missing file (it has an extension) is not a route: the platform's 404.
    status, _, body = cloud.get("surge", "/missing.js")
    assert status == 404 and b"app shell" not in body


# Each sample's home page: where it is and what it says, and what its first start needs.
HOMES = {
    "flask": ("/?name=Ada", b"<h1>Hello, Ada, from Flask</h1>", "pip"),
    "django": ("/", b"<h1>Hello from Django</h1>", "pip"),
    "fastapi": ("/", b'{"hello":"from FastAPI"}', "pip"),
    "express": ("/?name=Ada", b"<h1>Hello, Ada, from Express</h1>", "npm"),
    "php": ("/", b"<h1>Hello from PHP</h1>", "php"),
    "procfile": ("/?name=Ada", b"<h1>Hello, Ada, from gunicorn</h1>", "pip"),
}


def _skip_without(need: str) -> None:
    why = {
        "pip": pip_index_unreachable,
        "npm": npm_registry_unreachable,
        "php": lambda: "" if shutil.which("php-cgi") else "needs Debian php-cgi (.ci/run installs it)",
    }[need]()
    if why:
        pytest.skip(why)
    if shutil.which("git") is None:
        pytest.skip("needs git (.ci/run installs it)")


def _sample_zip(folder: str) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        root = SAMPLES / folder
        for path in sorted(root.rglob("*")):
            if path.is_file():
                zf.write(path, path.relative_to(root).as_posix())
    return buf.getvalue()


def _zipdeploy(cloud: LocalCloud, site: dict[str, Any], folder: str) -> None:
    """POST the folder's zip to Kudu's /api/zipdeploy with the site's publishing credentials."""
    base = urlsplit(site["deploy"]["url"])
    auth = base64.b64encode(f"{site['ftp']['user']}:{site['ftp']['password']}".encode()).decode()
    req = urllib.request.Request(
        f"https://{base.netloc}/api/zipdeploy",
        data=_sample_zip(folder),
        method="POST",
        headers={"Authorization": f"Basic {auth}", "Content-Type": "application/zip"},
    )
    ctx = ssl.create_default_context(cafile=str(cloud.ca_file))
    with urllib.request.urlopen(req, context=ctx, timeout=300) as resp:
        record = json.loads(resp.read())
        assert resp.status == 200 and record["complete"] and record["status"] == 4, record


def _kudu_command(cloud: LocalCloud, site: dict[str, Any], command: str) -> Any:
    """POST Kudu's /api/command with the site's publishing credentials; its JSON answer."""
    base = urlsplit(site["deploy"]["url"])
    auth = base64.b64encode(f"{site['ftp']['user']}:{site['ftp']['password']}".encode()).decode()
    req = urllib.request.Request(
        f"https://{base.netloc}/api/command",
        data=json.dumps({"command": command, "dir": "site\\wwwroot"}).encode(),
        method="POST",
        headers={"Authorization": f"Basic {auth}", "Content-Type": "application/json"},
    )
    ctx = ssl.create_default_context(cafile=str(cloud.ca_file))
    with urllib.request.urlopen(req, context=ctx, timeout=120) as resp:
        return json.loads(resp.read())


def _git_env(cloud: LocalCloud, work: Path) -> dict[str, str]:
    """A site owner's git: its own HOME and name, trusting the cloud's CA."""
    return {
        **os.environ,
        "HOME": str(work),
        "GIT_AUTHOR_NAME": "Site Owner",
        "GIT_AUTHOR_EMAIL": "owner@example.net",
        "GIT_COMMITTER_NAME": "Site Owner",
        "GIT_COMMITTER_EMAIL": "owner@example.net",
        "GIT_SSL_CAINFO": str(cloud.ca_file),
    }


def _git_remote(site: dict[str, Any]) -> str:
    base = urlsplit(site["deploy"]["url"])
    return f"https://{site['ftp']['user']}:{site['ftp']['password']}@{base.netloc}/{site['name']}.git"


def _git_push(cloud: LocalCloud, site: dict[str, Any], folder: str, work: Path) -> str:
    """The folder as a fresh repository, pushed to the site's git URL; what the push printed."""
    repo = work / "repo"
    shutil.copytree(SAMPLES / folder, repo)
    env, remote = _git_env(cloud, work), _git_remote(site)
    for args in (
        ("init", "-q", "-b", "main"),
        ("add", "-A"),
        ("commit", "-q", "-m", "the sample"),
        ("push", remote, "main"),
    ):
        done = subprocess.run(["git", *args], cwd=repo, env=env, capture_output=True, text=True, timeout=180)
        assert done.returncode == 0, (args, done.stdout, done.stderr)
    return done.stderr


@pytest.mark.parametrize("folder", sorted(HOMES))
def test_each_sample_serves_after_a_zip_deploy_and_a_git_push(
    cloud: LocalCloud, folder: str, tmp_path: Path
) -> None:
    path, needle, need = HOMES[folder]
    _skip_without(need)
    zipped, pushed = _new_site(cloud, f"{folder}-zip"), _new_site(cloud, f"{folder}-git")
    _zipdeploy(cloud, zipped, folder)
    _git_push(cloud, pushed, folder, tmp_path)
    # Their packages were installed for the FTP copy already (same requirements: the same build).
    for site in (zipped["name"], pushed["name"]):
        _wait_for(cloud, site, path, needle, timeout=180)


def test_a_git_push_shows_the_build_as_it_runs_and_ends_with_the_sites_url(
    cloud: LocalCloud, tmp_path: Path
) -> None:
    _skip_without("pip")
    site = _new_site(cloud, "flask-pushed")
    printed = _git_push(cloud, site, "flask", tmp_path).splitlines()
    remote = [line.removeprefix("remote: ").strip() for line in printed if line.startswith("remote: ")]
    deployed = next(n for n, line in enumerate(remote) if line.startswith("sitecloud: deployed as version"))
    pip = [n for n, line in enumerate(remote) if line.startswith(("Collecting ", "Successfully installed"))]
    # pip's own lines, after the deploy and before the site's URL, which is the push's last word.
    assert pip and deployed < pip[0] and any("Successfully installed" in remote[n] for n in pip), printed
    assert (
        remote[-1] == f"sitecloud: live at https://flask-pushed.{cloud.domain}:{cloud.ports['https_port']}/"
    )
    assert remote.index("requirements installed") > pip[-1], printed
    # pip ran where the worker keeps the site's packages; none of the worker's paths reach the pusher.
    assert not any("/apps" in line or str(cloud.home) in line for line in remote), printed
    # The push ended once the build was done: the site answers at once.
    status, _, body = cloud.get("flask-pushed", "/?name=Ada")
    assert status == 200 and b"Hello, Ada, from Flask" in body


def test_sitecloud_deploy_shows_the_build_and_answers_once_the_site_serves_it(
    cloud: LocalCloud, tmp_path: Path
) -> None:
    _skip_without("pip")
    _new_site(cloud, "flask-cli")
    printed = cloud.cli_text("deploy", "flask-cli", str(SAMPLES / "flask"), timeout=300).splitlines()
    assert printed[0].startswith("deployed as version"), printed
    assert any("Successfully installed" in line for line in printed), printed
    assert printed[-1].endswith(", served"), printed
    status, _, body = cloud.get("flask-cli", "/?name=Ada")  # no waiting: it said served
    assert status == 200 and b"Hello, Ada, from Flask" in body, (status, body[:300])

    # --json prints the result alone; --no-wait answers at the commit. Each changes a file.
    tree = tmp_path / "flask"
    shutil.copytree(SAMPLES / "flask", tree)
    (tree / "static" / "note.txt").write_text("one")
    again = cloud.cli("deploy", "flask-cli", str(tree), timeout=300)
    assert set(again) >= {"site", "version", "files", "bytes"}, again
    assert again["served"] is True, again
    (tree / "static" / "note.txt").write_text("two")
    quick = cloud.cli("deploy", "flask-cli", str(tree), "--no-wait")
    assert quick["version"] > again["version"], (again, quick)
    # A stopped site is published to: the deploy lands, and serves once the site is started.
    cloud.cli("site", "stop", "flask-cli")
    (tree / "static" / "note.txt").write_text("three")
    printed = cloud.cli_text("deploy", "flask-cli", str(tree), timeout=300).splitlines()
    assert any(
        line.startswith("site flask-cli is stopped: it builds and serves this version once it is started")
        for line in printed
    ), printed
    cloud.cli("site", "start", "flask-cli")
    cloud.wait_for_content("flask-cli", "/static/note.txt", b"three", timeout=60)
    # A bad zip is refused before anything streams, with what is wrong.
    bad = tmp_path / "not-a.zip"
    bad.write_bytes(b"PK\x03\x04 not really a zip")
    refused = cloud.cli("deploy", "flask-cli", str(bad), check=False)
    assert refused["error"]["code"] in ("bad_request", "invalid_input"), refused


def test_a_synchronous_zip_deploy_answers_once_the_app_is_built_and_served(cloud: LocalCloud) -> None:
    """As Kudu's: no 200 before the site serves what was deployed, its build lines in the log."""
    _skip_without("pip")
    site = _new_site(cloud, "flask-sync")
    _zipdeploy(cloud, site, "flask")
    # No waiting here: the answer came after the workers served the new version.
    status, _, body = cloud.get("flask-sync", "/?name=Ada")
    assert status == 200 and b"Hello, Ada, from Flask" in body, (status, body[:300])
    base = urlsplit(site["deploy"]["url"])
    auth = base64.b64encode(f"{site['ftp']['user']}:{site['ftp']['password']}".encode()).decode()
    req = urllib.request.Request(
        f"https://{base.netloc}/api/deployments/latest/log?site=flask-sync",
        headers={"Authorization": f"Basic {auth}"},
    )
    ctx = ssl.create_default_context(cafile=str(cloud.ca_file))
    with urllib.request.urlopen(req, context=ctx, timeout=60) as resp:
        messages = [entry["message"] for entry in json.loads(resp.read())]
    assert "requirements installed" in messages, messages


def test_an_async_zip_deploy_completes_with_its_build_and_logs_it(cloud: LocalCloud) -> None:
    _skip_without("pip")
    site = _new_site(cloud, "flask-async")
    base = urlsplit(site["deploy"]["url"])
    auth = base64.b64encode(f"{site['ftp']['user']}:{site['ftp']['password']}".encode()).decode()
    ctx = ssl.create_default_context(cafile=str(cloud.ca_file))

    def call(url: str, data: bytes | None = None) -> tuple[int, Any]:
        req = urllib.request.Request(url, data=data, headers={"Authorization": f"Basic {auth}"})
        with urllib.request.urlopen(req, context=ctx, timeout=60) as resp:
            return resp.status, json.loads(resp.read())

    status, started = call(f"https://{base.netloc}/api/zipdeploy?isAsync=true", _sample_zip("flask"))
    assert status == 202 and started["complete"] is False, started

    def finished() -> dict[str, Any] | None:
        record: dict[str, Any] = call(started["url"])[1]
        return record if record["complete"] else None

    record = wait_until(finished, timeout=240, interval=0.1, what="the async deploy and its build")
    assert record["status"] == 4, record
    _, log = call(record["log_url"])
    messages = [entry["message"] for entry in log]
    assert messages[0].startswith("deployed as version"), messages
    assert any(m.startswith("Successfully installed") for m in messages), messages
    assert "requirements installed" in messages, messages
    status, _, body = cloud.get("flask-async", "/?name=Ada")
    assert status == 200 and b"Hello, Ada, from Flask" in body


GOOD_APP = b"""
def app(environ, start_response):
    start_response("200 OK", [("Content-Type", "text/plain")])
    return [b"the good version"]
"""
# Valid Python, but it cannot be loaded: the worker's app server exits naming the error.
BROKEN_APP = b"import module_that_is_not_there\n" + GOOD_APP


def test_a_failed_release_command_fails_the_deploy_with_its_output_and_keeps_the_version_before(
    cloud: LocalCloud, tmp_path: Path
) -> None:
    site = _new_site(cloud, "releaser")
    tree = tmp_path / "releaser"
    tree.mkdir()
    (tree / "app.py").write_bytes(GOOD_APP)
    (tree / "Procfile").write_text("release: python -c \"print('schema ok')\"\n")
    printed = cloud.cli_text("deploy", "releaser", str(tree), timeout=120).splitlines()
    assert printed[-1].endswith(", served"), printed
    assert cloud.get("releaser", "/")[::2] == (200, b"the good version")
    lines = cloud.cli("site", "logs", "releaser", "--lines", "200")["lines"]
    assert any(line.endswith("[release] schema ok") for line in lines), lines
    # Kudu's command API, with the site's publishing credentials, runs there as `site run` does.
    assert _kudu_command(cloud, site, "ls; exit 4") == {
        "Output": "Procfile\napp.py\n",
        "Error": "",
        "ExitCode": 4,
    }

    # A release that fails (a migration that cannot apply): refused with its own words, as a failed
    # build is, and the version before it stays.
    (tree / "Procfile").write_text(
        "release: python -c \"import sys; print('migration 0002 failed: no such column'); sys.exit(3)\"\n"
    )
    (tree / "app.py").write_bytes(GOOD_APP.replace(b"the good version", b"the next version"))
    refused = cloud.cli("deploy", "releaser", str(tree), check=False, timeout=120)
    message = refused["error"]["message"]
    assert refused["error"]["code"] == "build_failed", refused
    assert "release command exited with status 3" in message, message
    assert "migration 0002 failed: no such column" in message, message
    assert cloud.get("releaser", "/")[::2] == (200, b"the good version")


def test_a_deploy_whose_app_does_not_start_says_why_and_the_site_keeps_serving_the_one_before(
    cloud: LocalCloud, tmp_path: Path
) -> None:
    site = _new_site(cloud, "crashy")
    tree = tmp_path / "crashy"
    tree.mkdir()
    (tree / "app.py").write_bytes(GOOD_APP)
    printed = cloud.cli_text("deploy", "crashy", str(tree), timeout=120).splitlines()
    assert "its app answered GET / with 200" in printed and printed[-1].endswith(", served"), printed
    assert cloud.get("crashy", "/")[::2] == (200, b"the good version")

    # `sitecloud deploy`: refused with the app's own error, the version before it put back.
    (tree / "app.py").write_bytes(BROKEN_APP)
    refused = cloud.cli("deploy", "crashy", str(tree), check=False, timeout=120)
    message = refused["error"]["message"]
    assert refused["error"]["code"] == "build_failed", refused
    assert "its app does not start" in message and "No module named 'module_that_is_not_there'" in message
    assert "back at version" in message and "sitecloud site logs crashy" in refused["error"]["hint"]
    assert cloud.get("crashy", "/")[::2] == (200, b"the good version")

    # git push: rejected with the same words, the branch back where it was, the site as it was.
    repo = tmp_path / "repo"
    repo.mkdir()
    (repo / "app.py").write_bytes(BROKEN_APP)
    env, remote = _git_env(cloud, tmp_path), _git_remote(site)
    for args in (("init", "-q", "-b", "main"), ("add", "-A"), ("commit", "-q", "-m", "broken")):
        subprocess.run(["git", *args], cwd=repo, env=env, check=True, capture_output=True, timeout=60)
    pushed = subprocess.run(
        ["git", "push", remote, "main"], cwd=repo, env=env, capture_output=True, text=True, timeout=120
    )
    assert pushed.returncode != 0, pushed.stderr
    assert "its app does not start" in pushed.stderr and "[remote rejected] main -> main" in pushed.stderr
    assert cloud.get("crashy", "/")[::2] == (200, b"the good version")

    # FTP does not follow the build: the broken version cannot load, so the running app answers on
    # and the site log says so. A start shows it, as a deploy would.
    ftp = ftplib.FTP()
    ftp.connect(site["ftp"]["host"], site["ftp"]["port"], timeout=10)
    ftp.login(site["ftp"]["user"], site["ftp"]["password"])
    ftp.storbinary("STOR app.py", io.BytesIO(BROKEN_APP))
    ftp.quit()
    wait_until(
        lambda: any(
            "did not start: version" in line and "answers on" in line
            for line in cloud.cli("site", "logs", "crashy", "-n", "2000")["lines"]
        ),
        timeout=30,
        what="the running app kept",
    )
    assert cloud.get("crashy", "/")[::2] == (200, b"the good version")
    cloud.cli("site", "stop", "crashy")
    started = cloud.cli("site", "start", "crashy", check=False, timeout=120)
    assert started["error"]["code"] == "build_failed", started
    assert "is started, but its app does not start" in started["error"]["message"], started
