"""Dynamic sites end to end, as a site owner uses them: publish an app by FTP, set its settings with
the CLI, and it answers through the front end, woken on the first request; its logs come back too."""

from __future__ import annotations

import ftplib
import io
import os
import shutil
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.cloud import LocalCloud
from tests.support import app_base, pip_index_unreachable, wait_until

pytestmark = pytest.mark.timeout(240)

WSGI_APP = b"""
import os, sys

def app(environ, start_response):
    print("handled", environ["PATH_INFO"], flush=True)
    body = ("hello %s from %s" % (os.environ.get("GREETING", "?"), environ["PATH_INFO"])).encode()
    start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", str(len(body)))])
    return [body]
"""


@pytest.fixture(scope="module")
def cloud(traversable_home: Path) -> Iterator[LocalCloud]:
    cloud = LocalCloud(traversable_home)
    cloud.start()
    try:
        yield cloud
    finally:
        cloud.kill_everything()


@pytest.fixture(scope="module")
def site(cloud: LocalCloud) -> dict[str, Any]:
    cloud.cli("plan", "create", "apps", "--max-sites", "10", "--storage-mb", "5")
    cloud.cli("tenant", "create", "fabrikam")
    sub = cloud.cli("subscription", "create", "--tenant", "fabrikam", "--plan", "apps")
    return dict(cloud.cli("site", "create", "pyapp", "--subscription", str(sub["id"])))


def test_a_python_site_published_by_ftp_answers_through_the_front_end(
    cloud: LocalCloud, site: dict[str, Any]
) -> None:
    settings = cloud.cli("site", "set", "pyapp", "GREETING=world", "runtime=python", "entry=app:app")
    assert settings["settings"]["GREETING"] == "world"
    ftp = ftplib.FTP()
    ftp.connect(site["ftp"]["host"], site["ftp"]["port"], timeout=10)
    ftp.login(site["ftp"]["user"], site["ftp"]["password"])
    ftp.storbinary("STOR app.py", io.BytesIO(WSGI_APP))
    ftp.mkd("static")
    ftp.storbinary("STOR static/logo.txt", io.BytesIO(b"a static file"))
    ftp.storbinary("STOR config.json", io.BytesIO(b'{"password": "not for visitors"}'))
    ftp.quit()

    cloud.wait_for_content("pyapp", "/hi", b"hello world from /hi", timeout=30)
    # A file of the app's static folder is served by the worker; any other path is the app's, as on
    # every Python host (a config.json beside the code is not a file to visitors), and source never is.
    assert cloud.get("pyapp", "/static/logo.txt")[::2] == (200, b"a static file")
    assert cloud.get("pyapp", "/config.json")[::2] == (200, b"hello world from /config.json")
    _, _, body = cloud.get("pyapp", "/app.py")
    assert b"def app" not in body

    # The app's own output comes back through `site logs`.
    logs = wait_until(
        lambda: (
            (got := cloud.cli("site", "logs", "pyapp"))
            and any("handled /hi" in x for x in got["lines"])
            and got
        ),
        timeout=10,
        what="the app's output in its logs",
    )
    assert logs["site"] == "pyapp"


def test_a_setting_change_reaches_the_app(cloud: LocalCloud, site: dict[str, Any]) -> None:
    cloud.cli("site", "set", "pyapp", "GREETING=again")
    cloud.wait_for_content("pyapp", "/x", b"hello again from /x", timeout=30)


def test_settings_the_platform_owns_are_refused(cloud: LocalCloud, site: dict[str, Any]) -> None:
    bad = cloud.cli("site", "set", "pyapp", "PATH=/tmp", check=False)
    assert bad["error"]["code"] == "invalid_input"
    bad = cloud.cli("site", "set", "pyapp", "runtime=cobol", check=False)
    assert bad["error"]["code"] == "invalid_input"
    # The refused change left the site answering as before.
    assert cloud.get("pyapp", "/y")[2] == b"hello again from /y"


def _publish(site: dict[str, Any], files: dict[str, bytes]) -> None:
    ftp = ftplib.FTP()
    ftp.connect(site["ftp"]["host"], site["ftp"]["port"], timeout=10)
    ftp.login(site["ftp"]["user"], site["ftp"]["password"])
    for name, data in files.items():
        ftp.storbinary(f"STOR {name}", io.BytesIO(data))
    ftp.quit()


def _new_site(cloud: LocalCloud, name: str) -> dict[str, Any]:
    subs = cloud.cli("subscription", "list")["subscriptions"]
    sub = next(s for s in subs if s["tenant"] == "fabrikam")
    return dict(cloud.cli("site", "create", name, "--subscription", str(sub["id"])))


@pytest.mark.skipif(shutil.which("php-cgi") is None, reason="needs Debian php-cgi (.ci/run installs it)")
def test_a_php_site_is_detected_from_its_content_and_answers(cloud: LocalCloud, site: dict[str, Any]) -> None:
    php = _new_site(cloud, "phpsite")
    _publish(php, {"index.php": b"<?php echo 'php says ' . (1 + 2) . ' at ' . $_SERVER['REQUEST_URI'];"})
    cloud.wait_for_content("phpsite", "/", b"php says 3 at /", timeout=30)


def test_a_procfile_site_runs_its_command_on_port(cloud: LocalCloud, site: dict[str, Any]) -> None:
    proc = _new_site(cloud, "procsite")
    _publish(
        proc,
        {
            "Procfile": b"web: python3 -m http.server $PORT --bind 127.0.0.1\n",
            "hello.txt": b"served by the site's own command",
            "server.js": b"const secret = 'never served raw by the worker';\n",
        },
    )
    # Every path goes to the command's server (here one that lists and serves its directory).
    cloud.wait_for_content("procsite", "/hello.txt", b"served by the site's own command", timeout=30)
    status, _, body = cloud.get("procsite", "/")
    assert status == 200 and b"Directory listing" in body


ASGI_APP = b"""
async def app(scope, receive, send):
    body = ("asgi " + scope["method"] + " " + scope["path"]).encode()
    await send({"type": "http.response.start", "status": 200,
                "headers": [(b"content-type", b"text/plain"), (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})
"""


def test_an_asgi_site_answers_through_the_front_end(cloud: LocalCloud, site: dict[str, Any]) -> None:
    asgi = _new_site(cloud, "asgisite")
    _publish(asgi, {"asgi.py": ASGI_APP})
    cloud.wait_for_content("asgisite", "/ping", b"asgi GET /ping", timeout=30)


GREEDY_APP = b"""
def app(environ, start_response):
    if environ["PATH_INFO"] == "/eat":
        hoard = [b"x" * (1 << 20) for _ in range(600)]  # far past the site's memory limit
        del hoard
    start_response("200 OK", [("Content-Type", "text/plain")])
    return [b"still here"]
"""


def test_site_show_tells_the_owner_the_app_ran_out_of_memory(cloud: LocalCloud, site: dict[str, Any]) -> None:
    greedy = _new_site(cloud, "greedy")
    _publish(greedy, {"app.py": GREEDY_APP})
    cloud.wait_for_content("greedy", "/", b"still here", timeout=30)
    status, _, _ = cloud.get("greedy", "/eat")
    assert status >= 500
    shown = wait_until(
        lambda: (got := cloud.cli("site", "show", "greedy")) and got["apps"][0].get("memory_kills") and got,
        timeout=15,
        what="the memory kill in site show",
    )
    app = shown["apps"][0]
    assert app["runtime"] == "python" and app["memory_limit_bytes"] > 0
    text = cloud.cli_text("site", "show", "greedy")
    assert "stopped for memory 1x" in text
    assert "last: stopped: exceeded its" in text and "(sitecloud site logs greedy)" in text, text
    # It starts again on the next request.
    cloud.wait_for_content("greedy", "/", b"still here", timeout=30)


FLASK_APP = b"""
from flask import Flask, request

app = Flask(__name__)


@app.route("/")
def index():
    return "hello from flask"


@app.route("/user/<name>")
def user(name):
    return {"user": name, "q": request.args.get("q", "")}
"""


def test_a_flask_app_with_requirements_txt_answers_with_the_hosts_package_index(cloud: LocalCloud) -> None:
    """The first Python app most people publish: no setting, no index configured by the admin."""
    if why := pip_index_unreachable():
        pytest.skip(why)
    cloud.cli("plan", "create", "flask-plan", "--max-sites", "1", "--storage-mb", "20")
    cloud.cli("tenant", "create", "flaskers")
    sub = cloud.cli("subscription", "create", "--tenant", "flaskers", "--plan", "flask-plan")
    site = cloud.cli("site", "create", "flaskapp", "--subscription", str(sub["id"]))
    ftp = ftplib.FTP()
    ftp.connect(site["ftp"]["host"], site["ftp"]["port"], timeout=10)
    ftp.login(site["ftp"]["user"], site["ftp"]["password"])
    ftp.storbinary("STOR requirements.txt", io.BytesIO(b"flask>=3\n"))
    ftp.storbinary("STOR app.py", io.BytesIO(FLASK_APP))
    ftp.quit()

    cloud.wait_for_content("flaskapp", "/", b"hello from flask", timeout=120)
    status, _, body = cloud.get("flaskapp", "/user/ada?q=1")
    assert (status, body) == (200, b'{"q":"1","user":"ada"}\n')
    assert cloud.get("flaskapp", "/requirements.txt")[0] == 404
    lines = cloud.cli("site", "logs", "flaskapp", "--lines", "200")["lines"]
    assert any("requirements installed" in line for line in lines), lines

    # Each new requirements.txt installs beside the old one; only the newest two stay (they live
    # outside the plan's storage: before, every publish that changed them left one more behind).
    for n, spec in enumerate((b"flask>=3.0\n", b"flask>=3.0.0\n")):
        ftp = ftplib.FTP()
        ftp.connect(site["ftp"]["host"], site["ftp"]["port"], timeout=10)
        ftp.login(site["ftp"]["user"], site["ftp"]["password"])
        ftp.storbinary("STOR requirements.txt", io.BytesIO(spec))
        ftp.storbinary("STOR app.py", io.BytesIO(FLASK_APP.replace(b"hello from flask", b"flask %d" % n)))
        ftp.quit()
        cloud.wait_for_content("flaskapp", "/", b"flask %d" % n, timeout=120)
    base = app_base("flaskapp")

    def package_dirs() -> list[str]:
        return sorted(p.name for p in base.glob("packages-*") if p.is_dir())

    wait_until(lambda: 1 <= len(package_dirs()) <= 2, timeout=15, what="the oldest packages to be removed")


TOKEN_APP = b"""
import os
TOKEN = os.urandom(8).hex()  # made once per process: a restart shows as a new one

def app(environ, start_response):
    start_response("200 OK", [("Content-Type", "text/plain")])
    return [TOKEN.encode()]
"""


def test_restart_gives_the_app_new_processes_and_a_stopped_site_is_refused(
    cloud: LocalCloud, site: dict[str, Any]
) -> None:
    restarted = _new_site(cloud, "restarted")
    _publish(restarted, {"app.py": TOKEN_APP})
    first = wait_until(
        lambda: (got := cloud.get("restarted", "/"))[0] == 200 and len(got[2]) == 16 and got[2],
        timeout=30,
        what="the app's token",
    )
    assert cloud.get("restarted", "/")[2] == first  # one process keeps answering
    answer = cloud.cli("site", "restart", "restarted")
    assert answer["name"] == "restarted" and "pending" not in answer
    # The workers had it when the command ended: the next request starts a new process.
    second = cloud.get("restarted", "/")[2]
    assert len(second) == 16 and second != first
    assert "restarting: its owner asked" in "\n".join(cloud.cli("site", "logs", "restarted")["lines"])
    assert "restarted the app of restarted" in cloud.cli_text("site", "restart", "restarted")
    # A stopped site runs no app: refused, saying what to do; nothing changes.
    cloud.cli("site", "stop", "restarted")
    refused = cloud.cli("site", "restart", "restarted", check=False)
    assert refused["error"]["code"] == "in_use", refused
    assert "is stopped" in refused["error"]["message"] and "site start restarted" in refused["error"]["hint"]
    refused = cloud.cli("site", "restart", "nosuchsite", check=False)
    assert refused["error"]["code"] == "not_found", refused


@pytest.mark.skipif(
    os.geteuid() != 0, reason="an app's own network namespace needs the worker's sandbox (root)"
)
def test_a_command_that_listens_on_a_port_of_its_own_is_found_there(
    cloud: LocalCloud, site: dict[str, Any]
) -> None:
    fixed = _new_site(cloud, "fixedport")
    # As many a tutorial has it: the port written in the code, not $PORT.
    _publish(
        fixed,
        {
            "Procfile": b"web: python3 -m http.server 3000 --bind 127.0.0.1\n",
            "hello.txt": b"found on port 3000",
        },
    )
    cloud.wait_for_content("fixedport", "/hello.txt", b"found on port 3000", timeout=30)
    lines = "\n".join(cloud.cli("site", "logs", "fixedport")["lines"])
    assert "listens on port 3000, not on $PORT" in lines, lines


VERSIONED_SERVER = b"""
import os, sys
from http.server import BaseHTTPRequestHandler, HTTPServer
class Handler(BaseHTTPRequestHandler):
    def do_GET(self):
        body = VERSION
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
    def log_message(self, *args):
        pass
VERSION = b"%s"
HTTPServer(("127.0.0.1", int(os.environ["PORT"])), Handler).serve_forever()
"""


def test_a_new_version_that_takes_long_to_start_is_served_only_once_it_is_up(
    cloud: LocalCloud, site: dict[str, Any], tmp_path: Path
) -> None:
    longstart = _new_site(cloud, "longstart")
    first, second = tmp_path / "v1", tmp_path / "v2"
    for root, version, procfile in (
        (first, b"one", b"web: python3 server.py\n"),
        # Its release command (a migration, say) takes seconds: the old version answers meanwhile.
        (second, b"two", b"release: sleep 4\nweb: python3 server.py\n"),
    ):
        root.mkdir()
        (root / "Procfile").write_bytes(procfile)
        (root / "server.py").write_bytes(VERSIONED_SERVER % version)
    cloud.cli("deploy", "longstart", str(first))
    cloud.wait_for_content("longstart", "/", b"one", timeout=30)

    answers: list[tuple[int, bytes, float]] = []
    done = threading.Event()

    def visitors() -> None:
        while not done.is_set():
            started = time.monotonic()
            status, _, body = cloud.get("longstart", "/")
            answers.append((status, body, time.monotonic() - started))

    loop = threading.Thread(target=visitors)
    loop.start()
    try:
        printed = cloud.cli_text("deploy", "longstart", str(second), timeout=120).splitlines()
    finally:
        done.set()
        loop.join()
    # The deploy's app check waited for the new version's own process, after its release.
    assert "its app answered GET / with 200" in printed, printed
    assert cloud.get("longstart", "/")[::2] == (200, b"two")
    assert all(status == 200 and body in (b"one", b"two") for status, body, _ in answers), {
        (status, body[:80]) for status, body, _ in answers
    }
    # Visitors were answered by the old version during the release, not held until it ended.
    bodies = [body for _, body, _ in answers]
    assert bodies.count(b"one") > 10 and bodies[-1] == b"two"
    assert max(took for _, _, took in answers) < 2.5
    logs = [
        line for line in cloud.cli("site", "logs", "longstart", "-n", "5000")["lines"] if "[worker]" in line
    ]
    assert any("the release command ended well" in line for line in logs), logs

    # A version whose release fails never takes over: the deploy fails saying why, and visitors
    # are answered by the running version all along.
    broken = tmp_path / "v3"
    broken.mkdir()
    (broken / "Procfile").write_bytes(b"release: echo migration failed; exit 3\nweb: python3 server.py\n")
    (broken / "server.py").write_bytes(VERSIONED_SERVER % b"three")
    answers.clear()
    done.clear()
    loop = threading.Thread(target=visitors)
    loop.start()
    try:
        refused = cloud.cli("deploy", "longstart", str(broken), check=False, timeout=120)
    finally:
        done.set()
        loop.join()
    assert refused["error"]["code"] == "build_failed", refused
    assert "migration failed" in refused["error"]["message"], refused
    assert answers and all(status == 200 and body == b"two" for status, body, _ in answers), {
        (status, body[-300:]) for status, body, _ in answers
    }
    assert cloud.get("longstart", "/")[::2] == (200, b"two")

    # By FTP, file by file, each a version of its own: every request is answered, by one or the other.
    answers.clear()
    done.clear()
    loop = threading.Thread(target=visitors)
    loop.start()
    try:
        _publish(
            longstart,
            {
                "server.py": VERSIONED_SERVER % b"four",
                "Procfile": b"release: sleep 2\nweb: python3 server.py\n",
            },
        )
        cloud.wait_for_content("longstart", "/", b"four", timeout=30)
        time.sleep(3)  # past the release of the Procfile's version
    finally:
        done.set()
        loop.join()
    assert all(status == 200 and body in (b"two", b"four") for status, body, _ in answers), {
        (status, body[:80]) for status, body, _ in answers
    }
    assert max(took for _, _, took in answers) < 2.5
    assert cloud.get("longstart", "/")[::2] == (200, b"four")


def test_a_python_version_that_cannot_load_never_takes_over_from_the_running_one(
    cloud: LocalCloud, site: dict[str, Any]
) -> None:
    broken = _new_site(cloud, "brokenload")
    _publish(broken, {"app.py": WSGI_APP})
    cloud.wait_for_content("brokenload", "/x", b"hello ? from /x", timeout=30)
    answers: list[tuple[int, bytes]] = []
    done = threading.Event()

    def visitors() -> None:
        while not done.is_set():
            status, _, body = cloud.get("brokenload", "/x")
            answers.append((status, body))

    loop = threading.Thread(target=visitors)
    loop.start()
    try:
        # A syntax error, uploaded over the running app by FTP: its process exits as it loads.
        _publish(broken, {"app.py": WSGI_APP + b"\ndef oops(:\n"})
        wait_until(
            lambda: any(
                "did not start: version 1 answers on" in line
                for line in cloud.cli("site", "logs", "brokenload", "-n", "2000")["lines"]
            ),
            timeout=30,
            what="the worker to keep the running version",
        )
        time.sleep(1)
    finally:
        done.set()
        loop.join()
    assert answers and all(a == (200, b"hello ? from /x") for a in answers), {
        (s, b[:200]) for s, b in answers
    }
    # Fixed: the new version takes over.
    _publish(broken, {"app.py": WSGI_APP.replace(b"hello", b"fixed")})
    cloud.wait_for_content("brokenload", "/x", b"fixed ? from /x", timeout=30)
