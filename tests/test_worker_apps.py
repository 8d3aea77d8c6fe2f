"""Dynamic sites on a real worker: python (WSGI, ASGI), php and command apps, woken by the first
request, stopped when idle, each under its own uid and limits, with settings and logs.

Content is published through a real fileserver (as the publisher); the worker gets snapshots with
the runtime fields and is asked over mTLS as a front end, like in tests/test_worker.py.
"""

from __future__ import annotations

import concurrent.futures
import hashlib
import http.client
import itertools
import json
import os
import shutil
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from roles.fileserver.config import FileserverConfig
from roles.worker.apps._isolation import UID_BASE, Identities
from roles.worker.config import WorkerConfig
from tests.support import CloudPKI, RoleProcess, call, lane_exchange, wait_until
from tests.test_worker import fetch

ROOT = os.geteuid() == 0
PHP = shutil.which("php-cgi") is not None
# As root with bubblewrap the worker runs every app in a sandbox (roles/worker/apps/_sandbox.py).
SANDBOX = ROOT and shutil.which("bwrap") is not None and shutil.which("setpriv") is not None

WSGI_APP = b"""
import os, sys
print("wsgi app imported", flush=True)

def app(environ, start_response):
    path = environ["PATH_INFO"]
    if path == "/read":
        try:
            with open(environ["QUERY_STRING"], "rb") as f:
                out = b"read " + f.read(64)
        except OSError as exc:
            out = ("denied " + type(exc).__name__).encode()
    elif path == "/eat":
        hog = [bytearray(32 * 1024 * 1024) for _ in range(64)]
        out = b"ate %d" % len(hog)
    elif path == "/crash":
        os._exit(3)
    elif path == "/whoami":
        out = ("%d %s %s" % (os.getuid(), os.environ.get("HOME"), os.environ.get("TMPDIR"))).encode()
    else:
        body = environ["wsgi.input"].read()
        out = ("wsgi %s %s %s greeting=%s cookie=%s body=%s" % (
            environ["REQUEST_METHOD"], path, environ["QUERY_STRING"], os.environ.get("GREETING", "-"),
            environ.get("HTTP_COOKIE", "-"), body.decode())).encode()
        print("handled " + path, flush=True)
    start_response("200 OK", [("Content-Type", "text/plain")])
    return [out]
"""

ASGI_APP = b"""
import os

async def app(scope, receive, send):
    assert scope["type"] == "http"
    msg = await receive()
    body = ("asgi %s %s greeting=%s body=%s" % (
        scope["method"], scope["path"], os.environ.get("GREETING", "-"), msg["body"].decode())).encode()
    await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"text/plain")]})
    await send({"type": "http.response.body", "body": body[:5], "more_body": True})
    await send({"type": "http.response.body", "body": body[5:]})
"""


@dataclass
class AppCloud:
    pki: CloudPKI
    fileserver: RoleProcess
    worker: RoleProcess
    config: WorkerConfig
    sites: dict[str, str] = field(default_factory=dict)
    settings: dict[str, dict[str, Any]] = field(default_factory=dict)
    uids: itertools.count[int] = field(default_factory=itertools.count)
    version: itertools.count[int] = field(default_factory=lambda: itertools.count(1))

    def push(self) -> None:
        version = next(self.version)
        self.fileserver.push_config(
            {
                "version": version,
                "sites": {s: {"uid": u, "quota_bytes": 1 << 24} for s, u in self.sites.items()},
            }
        )
        self.worker.push_config(
            {
                "version": version,
                "fileserver": self.fileserver.control_url,
                "sites": {s: {"uid": u, **self.settings.get(s, {})} for s, u in self.sites.items()},
            }
        )

    def add_site(self, site: str, **settings: Any) -> None:
        self.sites[site] = hashlib.sha256(f"{site}-{next(self.uids)}".encode()).hexdigest()[:16]
        self.settings[site] = settings
        self.push()

    def set(self, site: str, **settings: Any) -> None:
        self.settings[site] = {**self.settings[site], **settings}
        self.push()

    def publish(self, site: str, files: dict[str, bytes]) -> int:
        ctx = self.pki.client_ssl("publisher")
        ops: list[dict[str, Any]] = []
        for path, data in files.items():
            status, body = call(
                f"{self.fileserver.control_url}/v1/sites/{site}/blobs", ctx, method="POST", data=data
            )
            assert status == 200, body
            ops.append({"op": "put", "path": path, "sha256": body["sha256"]})
        status, body = call(
            f"{self.fileserver.control_url}/v1/sites/{site}/commit", ctx, method="POST", body={"ops": ops}
        )
        assert status == 200, body
        return int(body["version"])

    def get(self, site: str, path: str, **kwargs: Any) -> tuple[int, dict[str, str], bytes]:
        return fetch(self.pki, self.config, site, path, **kwargs)

    def app(self, site: str) -> dict[str, Any]:
        status, body = call(
            f"{self.worker.control_url}/v1/sites/{site}/app", self.pki.client_ssl("management")
        )
        assert status == 200, body
        return dict(body)

    def log(self, site: str) -> str:
        status, body = call(
            f"{self.worker.control_url}/v1/sites/{site}/logs?lines=1000", self.pki.client_ssl("management")
        )
        assert status == 200, body
        return body.decode() if isinstance(body, bytes) else str(body or "")

    def publish_and_wait(self, site: str, files: dict[str, bytes], path: str, expect: bytes) -> bytes:
        self.publish(site, files)

        def answered() -> bytes | None:
            status, _, body = self.get(site, path)
            return body if status == 200 and expect in body else None

        return bytes(wait_until(answered, timeout=15, what=f"{site}{path} to answer {expect!r}"))

    def pids(self, site: str) -> list[int]:
        """Processes whose working directory is inside the site's content (its app's; not the
        sandbox's own reaper, root's bwrap)."""
        prefix = os.path.realpath(Path(self.worker.health()["apps_dir"]) / "sites" / site) + "/"
        found = []
        for entry in os.listdir("/proc"):
            if entry.isdigit():
                try:
                    if os.readlink(f"/proc/{entry}/cwd").startswith(prefix):
                        with open(f"/proc/{entry}/comm") as f:
                            if f.read().strip() != "bwrap":
                                found.append(int(entry))
                except OSError:
                    continue
        return found


@contextmanager
def running_cloud(*, root_mode: int = 0o711, **worker_fields: Any) -> Iterator[AppCloud]:
    # Not under pytest's tmp (0700 /tmp/pytest-of-root): site uids must be able to reach their files
    # (unless a test wants the worker's home closed to them: then the worker keeps apps elsewhere).
    root = Path(tempfile.mkdtemp(prefix="sc-apps-"))
    os.chmod(root, root_mode)
    pki = CloudPKI(root / "pki")
    fs_config = pki.role_config(FileserverConfig, "fileserver", root / "fileserver")
    w_config = pki.role_config(WorkerConfig, "worker", root / "worker", version_grace=0.3, **worker_fields)
    fileserver = RoleProcess(fs_config, pki).start(wait=False)
    worker = RoleProcess(w_config, pki).start(wait=False)
    try:
        fileserver.wait_healthy()
        worker.wait_healthy()
        yield AppCloud(pki, fileserver, worker, w_config)
    finally:
        worker.stop()
        fileserver.stop()
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="module")
def cloud() -> Iterator[AppCloud]:
    # Installs off: these tests publish requirements.txt without reaching a package index.
    with running_cloud(app_start_timeout=10.0, max_active_apps=20, package_index_url="none") as c:
        yield c


def test_wsgi_site_wakes_on_first_request_and_serves_static_files_itself(cloud: AppCloud) -> None:
    cloud.add_site("wsgi", env={"GREETING": "hello"})
    cloud.publish("wsgi", {"static/style.css": b"body{}", "config.json": b'{"key": "secret"}'})
    wait_until(lambda: cloud.get("wsgi", "/static/style.css")[0] == 200, what="static content")
    cloud.publish("wsgi", {"app.py": WSGI_APP})
    wait_until(lambda: cloud.app("wsgi")["runtime"] == "python", what="python detected from app.py")
    # The files of its static folder are served without waking the app, as Flask serves /static/.
    status, headers, body = cloud.get("wsgi", "/static/style.css")
    assert (status, body) == (200, b"body{}") and "text/css" in headers["content-type"]
    assert cloud.pids("wsgi") == [] and cloud.app("wsgi")["state"] == "idle"
    # Any other path is the app's, as on every other Python host: a file beside the code is not
    # served raw (a config.json, a settings.ini), and no file shadows a route of the app.
    status, _, body = cloud.get("wsgi", "/config.json")
    assert (status, body) == (200, b"wsgi GET /config.json  greeting=hello cookie=- body=")

    status, headers, body = cloud.get("wsgi", "/hello?x=1", headers={"Cookie": "a=b"})
    assert status == 200, body
    assert body == b"wsgi GET /hello x=1 greeting=hello cookie=a=b body="
    assert headers["content-type"] == "text/plain"
    pids = cloud.pids("wsgi")
    assert len(pids) == 1 and cloud.app("wsgi")["pid"] == pids[0]
    # App source is never served as a file: the app gets the path instead.
    status, _, body = cloud.get("wsgi", "/app.py")
    assert b"def app" not in body and body.startswith(b"wsgi GET /app.py")
    # Request bodies reach the app.
    conn = http.client.HTTPSConnection(
        "localhost", cloud.config.data_port, context=cloud.pki.client_ssl("frontend"), timeout=10
    )
    try:
        for n in range(3):  # keep-alive across app answers
            conn.request("POST", "/form", body=f"n={n}", headers={"X-Sitecloud-Site": "wsgi"})
            resp = conn.getresponse()
            assert (resp.status, resp.read()) == (
                200,
                f"wsgi POST /form  greeting=hello cookie=- body=n={n}".encode(),
            )
    finally:
        conn.close()


def test_a_request_that_waited_for_the_first_publish_goes_to_the_app_it_brought(cloud: AppCloud) -> None:
    cloud.add_site("waited", env={"GREETING": "first"})
    wait_until(lambda: cloud.get("waited", "/")[0] == 200, what="the placeholder page")
    seen: list[tuple[int, bytes]] = []
    stop = threading.Event()

    def visit() -> None:
        while not stop.is_set():
            status, _, body = cloud.get("waited", "/app.py", headers={"Cookie": "k=v"})
            seen.append((status, body))
            if b"wsgi GET" in body:
                return

    visitor = threading.Thread(target=visit)
    visitor.start()
    try:
        # A big file makes the worker's fetch take a while: the visitor's request waits through it.
        cloud.publish("waited", {"app.py": WSGI_APP, "big.bin": os.urandom(8 * 1024 * 1024)})
        visitor.join(30)
    finally:
        stop.set()
        visitor.join()
    assert seen[-1] == (200, b"wsgi GET /app.py  greeting=first cookie=k=v body="), seen[-1]
    assert all(status == 200 and b"def app" not in body for status, body in seen), seen


def test_a_lane_sends_app_requests_back_and_serves_static_files(cloud: AppCloud) -> None:
    """On a lane (a front end's pipelined GETs) nothing may wait for an app: its requests are refused
    for the whole site, while the site's static files are answered there."""
    cloud.add_site("laned")
    cloud.publish_and_wait(
        "laned", {"app.py": WSGI_APP, "static/style.css": b"body{}"}, "/hello", b"wsgi GET"
    )

    def get(path: str, tag: int) -> bytes:
        return f"GET {path} HTTP/1.1\r\nHost: x\r\nX-Sitecloud-Site: laned\r\nX-Sitecloud-Lane: {tag}\r\n\r\n".encode()

    app, static = lane_exchange(
        cloud.pki, cloud.config.data_port, [get("/hello", 1), get("/static/style.css", 2)]
    )
    assert (app.status, app.header("X-Sitecloud-Lane"), app.header("X-Sitecloud-Lane-Refused")) == (
        421,
        "1",
        "site",
    )
    assert (static.status, static.header("X-Sitecloud-Lane"), static.body) == (200, "2", b"body{}")


def test_asgi_site_answers_with_settings(cloud: AppCloud) -> None:
    cloud.add_site("asgi", env={"GREETING": "bonjour"})
    body = cloud.publish_and_wait("asgi", {"asgi.py": ASGI_APP}, "/x", b"asgi")
    assert body == b"asgi GET /x greeting=bonjour body="
    status, _, body = cloud.get("asgi", "/y", method="HEAD")
    assert status == 200 and body == b""


@pytest.mark.skipif(not PHP, reason="php-cgi is not installed (apt-get install php-cgi)")
def test_php_site_answers_through_fastcgi(cloud: AppCloud) -> None:
    cloud.add_site("php", env={"GREETING": "hallo"})
    index = b'<?php header("X-Test: 1"); echo "php ", $_SERVER["REQUEST_METHOD"], " ", $_SERVER["PATH_INFO"] ?? "", " greeting=", $_SERVER["GREETING"] ?? "-";'
    other = b'<?php http_response_code(201); echo "other ", $_GET["q"] ?? "", " ", file_get_contents("php://input");'
    # Flushed before its end: the worker has not the whole answer when the head goes, so chunked.
    streamed = b'<?php echo "a"; while (ob_get_level()) ob_end_flush(); flush(); usleep(100000); echo "b";'
    files = {"index.php": index, "other.php": other, "streamed.php": streamed, "a.css": b"x"}
    body = cloud.publish_and_wait("php", files, "/", b"php")
    assert body == b"php GET  greeting=hallo"
    status, headers, body = cloud.get("php", "/pretty/url")
    assert (status, body) == (200, b"php GET /pretty/url greeting=hallo") and headers["x-test"] == "1"
    # An answer read whole before its head went out carries its length (PHP gives none).
    assert headers.get("content-length") == str(len(body)) and "transfer-encoding" not in headers
    status, headers, body = cloud.get("php", "/streamed.php")
    assert (status, body) == (200, b"ab") and headers.get("transfer-encoding") == "chunked", headers
    conn = http.client.HTTPSConnection(
        "localhost", cloud.config.data_port, context=cloud.pki.client_ssl("frontend"), timeout=10
    )
    try:
        conn.request("POST", "/other.php?q=7", body="posted", headers={"X-Sitecloud-Site": "php"})
        resp = conn.getresponse()
        assert (resp.status, resp.read()) == (201, b"other 7 posted")
    finally:
        conn.close()
    assert cloud.get("php", "/a.css")[2] == b"x"


def test_php_keeps_connections_to_its_children_and_queues_requests_beyond_them(cloud: AppCloud) -> None:
    """Kept FastCGI connections hold a php-cgi child each: with more requests at once than children
    (a small site has 2), the rest wait for a connection to come back, and every one is answered,
    a HEAD in between too."""
    cloud.add_site("phpmany")
    slow = b'<?php usleep(20000); echo "n=", $_GET["n"] ?? "", " pid=", getmypid();'
    cloud.publish_and_wait("phpmany", {"index.php": slow}, "/?n=first", b"n=first")
    results: list[tuple[int, bytes]] = []

    def visitor(k: int) -> None:
        for i in range(15):
            status, _, body = cloud.get("phpmany", f"/?n={k}.{i}")
            results.append((status, body.split(b" pid=")[0]))

    threads = [threading.Thread(target=visitor, args=(k,)) for k in range(8)]
    for t in threads:
        t.start()
    assert cloud.get("phpmany", "/", method="HEAD")[0] == 200
    for t in threads:
        t.join(60)
    assert sorted(results) == sorted((200, b"n=%d.%d" % (k, i)) for k in range(8) for i in range(15))


@pytest.mark.skipif(not PHP, reason="php-cgi is not installed (apt-get install php-cgi)")
def test_php_requests_sent_behind_a_child_that_dies_go_again(cloud: AppCloud) -> None:
    """Requests beyond the children are sent at once behind the ones the children are on; when a
    child dies (killed here, or at its request limit) those it never read go again on a new
    connection: only the request it died on fails."""
    cloud.add_site("phpdie")
    script = b'<?php if (isset($_GET["die"])) posix_kill(getmypid(), 9); usleep(5000); echo "n=", $_GET["n"] ?? "";'
    cloud.publish_and_wait("phpdie", {"index.php": script}, "/?n=first", b"n=first")
    results: list[tuple[int, bytes]] = []
    died: list[int] = []

    def visitor(k: int) -> None:
        for i in range(12):
            status, _, body = cloud.get("phpdie", f"/?n={k}.{i}")
            results.append((status, body))

    def killer() -> None:
        for _ in range(4):
            died.append(cloud.get("phpdie", "/?die=1")[0])
            time.sleep(0.05)

    threads = [threading.Thread(target=visitor, args=(k,)) for k in range(6)]
    threads.append(threading.Thread(target=killer))
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    failed = [r for r in results if r[0] != 200]
    assert sorted(results) == sorted((200, b"n=%d.%d" % (k, i)) for k in range(6) for i in range(12)), (
        failed,
        cloud.log("phpdie")[-3000:],
    )
    assert died == [502] * 4
    assert cloud.get("phpdie", "/?n=after")[2] == b"n=after"


@pytest.mark.skipif(not PHP, reason="php-cgi is not installed (apt-get install php-cgi)")
def test_php_requests_are_not_sent_behind_a_slow_one(cloud: AppCloud) -> None:
    """While one child is on a slow request, the quick ones go to the other child (sent behind
    its current request, or waiting in the worker), never behind the slow one."""
    cloud.add_site("phpslow")
    script = b'<?php if (isset($_GET["slow"])) sleep(3); echo "n=", $_GET["n"] ?? "";'
    cloud.publish_and_wait("phpslow", {"index.php": script}, "/?n=first", b"n=first")
    slow = threading.Thread(target=lambda: cloud.get("phpslow", "/?slow=1&n=slow"))
    slow.start()
    time.sleep(0.3)
    started = time.monotonic()
    times: list[float] = []

    def visitor(k: int) -> None:
        for i in range(10):
            t0 = time.monotonic()
            assert cloud.get("phpslow", f"/?n={k}.{i}")[2] == b"n=%d.%d" % (k, i)
            times.append(time.monotonic() - t0)

    threads = [threading.Thread(target=visitor, args=(k,)) for k in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    slow.join(60)
    assert len(times) == 30 and max(times) < 2.0, (max(times), time.monotonic() - started)


def test_procfile_site_runs_its_command_on_port(cloud: AppCloud) -> None:
    cloud.add_site("cmd")
    files = {"Procfile": b"web: python3 -m http.server $PORT --bind 127.0.0.1\n", "sub/data.txt": b"d"}
    body = cloud.publish_and_wait("cmd", files, "/sub/", b"Directory listing")
    assert b"data.txt" in body
    assert cloud.app("cmd")["runtime"] == "command"
    # The worker serves no file of a Procfile site (its source may be server.js, config.ru, ...):
    # every request, for the Procfile and for a plain file alike, goes to the app.
    cloud.get("cmd", "/Procfile")
    assert any("[access]" in ln and '"GET /Procfile HTTP/1.1"' in ln for ln in cloud.log("cmd").splitlines())
    assert cloud.get("cmd", "/sub/data.txt")[2] == b"d"
    assert any(
        "[access]" in ln and '"GET /sub/data.txt HTTP/1.1" 200' in ln for ln in cloud.log("cmd").splitlines()
    )


def test_idle_app_stops_and_wakes_again(cloud: AppCloud) -> None:
    cloud.add_site("sleepy", idle_timeout=1)
    cloud.publish_and_wait("sleepy", {"app.py": WSGI_APP}, "/", b"wsgi")
    assert len(cloud.pids("sleepy")) == 1
    wait_until(lambda: cloud.pids("sleepy") == [], timeout=5, what="the idle app to stop")
    assert cloud.app("sleepy")["state"] == "idle"
    assert "stopped (idle)" in cloud.log("sleepy")
    t0 = time.monotonic()
    status, _, body = cloud.get("sleepy", "/again")
    assert status == 200 and b"/again" in body
    assert time.monotonic() - t0 < 5
    assert cloud.app("sleepy")["starts"] == 2


def test_concurrent_first_requests_start_one_process(cloud: AppCloud) -> None:
    cloud.add_site("crowd", idle_timeout=30)
    cloud.publish_and_wait(
        "crowd", {"app.py": WSGI_APP, "static/index.html": b"static home"}, "/static/index.html", b"static"
    )
    # Publishing did not start anything.
    assert cloud.pids("crowd") == [] and cloud.app("crowd")["starts"] == 0
    results: list[int] = []
    barrier = threading.Barrier(12)

    def hit(n: int) -> None:
        barrier.wait()
        results.append(cloud.get("crowd", f"/c{n}")[0])

    threads = [threading.Thread(target=hit, args=(n,)) for n in range(12)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results == [200] * 12
    assert cloud.app("crowd")["starts"] == 1 and len(cloud.pids("crowd")) == 1


def test_new_version_and_new_settings_restart_the_app(cloud: AppCloud) -> None:
    cloud.add_site("moving", env={"GREETING": "one"})
    cloud.publish_and_wait("moving", {"app.py": WSGI_APP}, "/", b"greeting=one")
    first = cloud.app("moving")["pid"]
    cloud.set("moving", env={"GREETING": "two"})
    wait_until(lambda: b"greeting=two" in cloud.get("moving", "/")[2], what="the new setting")
    second = cloud.app("moving")["pid"]
    assert second != first
    wait_until(lambda: not os.path.exists(f"/proc/{first}"), timeout=8, what="the old process to go")
    cloud.publish_and_wait("moving", {"app.py": WSGI_APP.replace(b"wsgi %s", b"v2 %s")}, "/", b"v2 GET")
    assert cloud.app("moving")["pid"] not in (first, second)


def test_crash_is_logged_and_restarted_on_the_next_request(cloud: AppCloud) -> None:
    cloud.add_site("crashy")
    cloud.publish_and_wait("crashy", {"app.py": WSGI_APP}, "/", b"wsgi")
    status, _, _ = cloud.get("crashy", "/crash")
    assert status == 502
    wait_until(lambda: "exited with status 3" in cloud.log("crashy"), what="the crash in the log")
    wait_until(lambda: cloud.get("crashy", "/back")[0] == 200, timeout=10, what="a restart")
    assert cloud.app("crashy")["crashes"] == 1
    assert cloud.app("crashy")["last_crash"] == "exited with status 3; its last output: handled /"


ONE_ANSWER_APP = b"""
import os, socket
srv = socket.socket()
srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
srv.bind(("127.0.0.1", int(os.environ["PORT"])))
srv.listen(4)
conn, _ = srv.accept()
conn.recv(65536)
conn.sendall(b"HTTP/1.1 200 OK\\r\\nContent-Length: 4\\r\\n\\r\\nonce")
conn.close()
"""


def test_an_app_that_exits_after_each_answer_is_restarted_after_a_growing_wait(cloud: AppCloud) -> None:
    # Each visit would cost the worker a new sandbox (its CPU, not the app's): the exits of an app
    # that never stays up count on, and its restarts back off as a crashing app's do.
    cloud.add_site("oneshot")
    cloud.publish_and_wait(
        "oneshot", {"Procfile": b"web: python3 app.py\n", "app.py": ONE_ANSWER_APP}, "/", b"once"
    )
    statuses = [cloud.get("oneshot", "/")[0] for _ in range(12)]
    assert 503 in statuses, statuses
    assert cloud.app("oneshot")["starts"] < 12, cloud.app("oneshot")
    assert "it starts again on the next request after" in cloud.log("oneshot")


def test_an_app_that_cannot_start_says_why_in_its_status(cloud: AppCloud) -> None:
    cloud.add_site("noapp", entry="nomodule:app")
    cloud.publish("noapp", {"app.py": WSGI_APP})
    wait_until(lambda: cloud.get("noapp", "/")[0] == 502, what="the failed start")
    status = wait_until(lambda: (a := cloud.app("noapp"))["crashes"] and a, what="the crash counted")
    assert status["last_crash"].startswith("exited with status 1; its last output: "), status
    assert "No module named 'nomodule'" in status["last_crash"], status


@pytest.mark.skipif(shutil.which("node") is None, reason="needs Debian's nodejs")
def test_a_node_app_that_cannot_start_says_its_error_not_nodes_version(cloud: AppCloud) -> None:
    # Node ends its report of an uncaught exception with "Node.js v20.x.y", after the error line and
    # its stack: that last line told the owner nothing.
    cloud.add_site("nodemissing")
    server = b'require("left-pad-nowhere");\nrequire("http").createServer().listen(process.env.PORT);\n'
    cloud.publish(
        "nodemissing", {"package.json": b'{"name": "nodemissing", "main": "server.js"}', "server.js": server}
    )
    wait_until(lambda: cloud.get("nodemissing", "/")[0] in (502, 503), what="the failed start")
    status = wait_until(lambda: (a := cloud.app("nodemissing"))["crashes"] and a, what="the crash counted")
    assert status["last_crash"] == (
        "exited with status 1; its last output: Error: Cannot find module 'left-pad-nowhere'"
    ), status


def test_a_crash_of_an_earlier_version_is_history_once_a_new_one_runs(cloud: AppCloud) -> None:
    """A broken app.py crashed; the fixed one published next serves: the site's app is not said to be
    crashing any more (site show and the portal read these fields), but the old crashes are kept apart."""
    cloud.add_site("mended")
    cloud.publish("mended", {"app.py": b"import nosuchmodule\n"})
    wait_until(lambda: cloud.get("mended", "/")[0] == 502, what="the failed start")
    wait_until(lambda: cloud.app("mended")["crashes"], what="the crash counted")
    cloud.publish_and_wait("mended", {"app.py": WSGI_APP}, "/", b"wsgi")
    app = cloud.app("mended")
    assert app["state"] == "running", app
    assert app["crashes"] == 0 and app.get("last_crash") is None, app
    assert app["earlier_crashes"] >= 1, app
    # A crash of the version it runs now counts as now again.
    assert cloud.get("mended", "/crash")[0] == 502
    wait_until(lambda: cloud.app("mended")["crashes"] == 1, what="the new crash counted")
    assert cloud.app("mended")["last_crash"].startswith("exited with status 3"), cloud.app("mended")


def test_memory_limit_stops_the_app_with_a_clear_line(cloud: AppCloud) -> None:
    cloud.add_site("hog", limits={"memory_mb": 64})
    cloud.publish_and_wait("hog", {"app.py": WSGI_APP}, "/", b"wsgi")
    status, _, _ = cloud.get("hog", "/eat")
    assert status in (502, 503)
    wait_until(
        lambda: "stopped: exceeded its 64 MB memory limit" in cloud.log("hog"),
        what="the memory line in the log",
    )
    assert cloud.pids("hog") == []


def test_requirements_with_installs_off_are_skipped_with_a_log_line(cloud: AppCloud) -> None:
    cloud.add_site("deps")
    cloud.publish_and_wait("deps", {"app.py": WSGI_APP, "requirements.txt": b"flask\n"}, "/", b"wsgi")
    assert "installs are off on this worker" in cloud.log("deps")
    assert cloud.get("deps", "/requirements.txt")[2].startswith(b"wsgi")


def test_logs_stream_to_management(cloud: AppCloud) -> None:
    cloud.add_site("chatty")
    cloud.publish_and_wait("chatty", {"app.py": WSGI_APP}, "/first", b"wsgi")
    conn = http.client.HTTPSConnection(
        "localhost", cloud.config.control_port, context=cloud.pki.client_ssl("management"), timeout=10
    )
    try:
        conn.request("GET", "/v1/sites/chatty/logs?follow=1&lines=50")
        resp = conn.getresponse()
        assert resp.status == 200
        seen = b""
        while b"handled /first" not in seen:
            seen += resp.read1(65536)
        cloud.get("chatty", "/second")
        while b'"GET /second HTTP/1.1" 200' not in seen:
            seen += resp.read1(65536)
        assert b"[app] handled /second" in seen and b"wsgi app imported" in seen
    finally:
        conn.close()
    # A front end may not read logs.
    status, _ = call(f"{cloud.worker.control_url}/v1/sites/chatty/logs", cloud.pki.client_ssl("frontend"))
    assert status == 403
    health = cloud.worker.health()
    assert health["apps_dynamic"] >= 1 and health["app_cpu_seconds"].get("chatty", 0) >= 0


@pytest.mark.skipif(not ROOT, reason="per-site uids need the worker to run as root")
def test_a_site_cannot_read_another_sites_files_or_the_worker_keys(cloud: AppCloud) -> None:
    cloud.add_site("alice")
    cloud.add_site("bob")
    cloud.publish_and_wait("alice", {"app.py": WSGI_APP, "secret.txt": b"alice secret"}, "/", b"wsgi")
    cloud.publish_and_wait("bob", {"app.py": WSGI_APP}, "/", b"wsgi")
    home = cloud.config.home
    own = f"{home}/sites/alice/current/secret.txt"
    assert cloud.get("alice", f"/read?{own}")[2] == b"read alice secret"
    assert cloud.get("bob", f"/read?{own}")[2].startswith(b"denied")
    assert cloud.get("bob", f"/read?{home}/tls/role.key")[2].startswith(b"denied")
    assert cloud.get("bob", f"/read?{home}/role.json")[2].startswith(b"denied")
    uid_a, home_a, tmp_a = cloud.get("alice", "/whoami")[2].decode().split()
    uid_b, _, _ = cloud.get("bob", "/whoami")[2].decode().split()
    assert int(uid_a) != 0 and int(uid_b) != 0 and uid_a != uid_b
    assert cloud.get("bob", f"/read?{tmp_a}/x")[2].startswith(b"denied")
    assert os.stat(home_a).st_uid == int(uid_a) and os.stat(home_a).st_mode & 0o777 == 0o700


def test_a_site_with_bad_app_settings_fails_alone(cloud: AppCloud) -> None:
    cloud.add_site("bad", runtime="cobol")
    health = cloud.worker.health()
    assert health["status"] == "degraded" and "runtime" in health["failed_sites"]["bad"], health
    status, _, body = cloud.get("bad", "/")
    assert status == 503 and b"cannot be served" in body
    cloud.set("bad", runtime="static")
    assert "failed_sites" not in cloud.worker.health()


def test_always_on_site_runs_without_a_request(cloud: AppCloud) -> None:
    cloud.add_site("awake", always_on=True)
    cloud.publish("awake", {"app.py": WSGI_APP})
    wait_until(lambda: len(cloud.pids("awake")) == 1, timeout=10, what="the always-on app to start")
    assert cloud.app("awake")["state"] == "running"


def test_slow_start_gets_503_and_the_cap_evicts_the_least_recently_used(tmp_path: Path) -> None:
    with running_cloud(app_start_timeout=1.0, max_active_apps=2) as small:
        small.add_site("slow")
        small.publish("slow", {"app.py": b"import time\ntime.sleep(30)\n" + WSGI_APP})
        wait_until(lambda: small.app("slow")["runtime"] == "python", what="the slow site")
        t0 = time.monotonic()
        status, headers, body = small.get("slow", "/")
        assert status == 503 and headers.get("retry-after") == "1" and b"did not answer in time" in body
        assert time.monotonic() - t0 < 3
        for name in ("one", "two", "three"):
            small.add_site(name)
            small.publish_and_wait(name, {"app.py": WSGI_APP}, "/", b"wsgi")
            time.sleep(0.05)
        # At most two run: "slow" went first, then "one" (least recently used) for "three".
        wait_until(lambda: small.pids("one") == [], timeout=8, what="the least recently used to go")
        assert len(small.pids("two")) == 1 and len(small.pids("three")) == 1
        assert "needed room for another app" in small.log("one")


def test_a_burst_of_cold_starts_does_not_leave_the_worker_over_its_cap() -> None:
    # Each start found room before any of the others was counted: 6 sites woken at once on a cap of
    # 2 left 6 processes for their idle timeout (a tenant with many sites held a worker over its cap).
    with running_cloud(max_active_apps=2) as small:
        names = [f"burst{n}" for n in range(6)]
        for name in names:
            small.add_site(name)
            small.publish(name, {"app.py": WSGI_APP})
        for name in names:
            wait_until(lambda name=name: small.app(name)["runtime"] == "python", what=f"{name} detected")
        small.get(names[0], "/")  # (the test's client identity made once, before the threads)
        with concurrent.futures.ThreadPoolExecutor(len(names)) as pool:
            statuses = list(pool.map(lambda name: small.get(name, "/")[0], names[1:]))
        assert statuses == [200] * (len(names) - 1)
        wait_until(
            lambda: sum(len(small.pids(name)) for name in names) <= 2,
            timeout=8,
            what="the worker back down to its cap of 2",
        )


@pytest.mark.skipif(not ROOT, reason="per-site uids need the worker to run as root")
def test_a_home_under_a_closed_directory_still_runs_apps_as_their_own_uid() -> None:
    # Like root's default home under 0700 /root: the worker keeps what apps reach under /var/lib.
    base = Path("/var/lib/sitecloud")
    made_base = not base.exists()
    apps_dir: Path | None = None
    try:
        with running_cloud(root_mode=0o700) as closed:
            apps_dir = Path(closed.worker.health()["apps_dir"])
            assert apps_dir.parent == base and apps_dir.name.startswith("apps-")
            assert apps_dir.stat().st_uid == 0 and apps_dir.stat().st_mode & 0o777 == 0o711
            closed.add_site("shut")
            closed.publish_and_wait("shut", {"app.py": WSGI_APP, "secret.txt": b"mine"}, "/", b"wsgi")
            uid, home, _ = closed.get("shut", "/whoami")[2].decode().split()
            assert int(uid) != 0 and home.startswith(f"{apps_dir}/apps/")
            own = f"{apps_dir}/sites/shut/current/secret.txt"
            assert closed.get("shut", f"/read?{own}")[2] == b"read mine"
            home_dir = closed.config.home
            assert closed.get("shut", f"/read?{home_dir}/tls/role.key")[2].startswith(b"denied")
            assert os.stat(home_dir).st_mode & 0o777 == 0o700 and not (home_dir / "sites").exists()
    finally:
        if apps_dir is not None:
            shutil.rmtree(apps_dir, ignore_errors=True)
        if made_base:
            shutil.rmtree(base, ignore_errors=True)


@pytest.mark.skipif(not ROOT, reason="per-site uids need the worker to run as root")
def test_apps_left_by_a_worker_that_died_hard_are_stopped_when_it_comes_back() -> None:
    with running_cloud(app_start_timeout=10.0) as c:
        c.add_site("orphan")
        c.publish_and_wait("orphan", {"app.py": WSGI_APP}, "/x", b"wsgi GET /x")
        (old,) = c.pids("orphan")
        uid = int(c.get("orphan", "/whoami")[2].split()[0])
        volume = Path(c.worker.health()["apps_dir"]) / "apps" / str(uid - UID_BASE) / "volume"
        c.worker.kill()  # SIGKILL
        if SANDBOX:
            # A sandboxed app dies with the worker that started it (bwrap --die-with-parent); the
            # next worker unmounts the disk quota volume it left.
            assert os.path.ismount(volume)
            wait_until(lambda: not os.path.exists(f"/proc/{old}"), timeout=5, what="the app to die with it")
            c.worker.start()
            assert not os.path.ismount(volume)
            assert "left mounted by an earlier worker" in c.worker.log()
        else:
            # Unsandboxed, in its own session, it outlives the worker, which stops it when back.
            assert os.path.exists(f"/proc/{old}")
            c.worker.start()
            wait_until(
                lambda: not os.path.exists(f"/proc/{old}"), timeout=10, what="the orphaned app to be stopped"
            )
            assert "left running by an earlier worker" in c.worker.log()
        # And the site wakes again under the new worker.
        assert c.get("orphan", "/y")[2].startswith(b"wsgi GET /y")


def test_site_numbers_are_one_per_site_across_the_workers_of_a_machine(tmp_path: Path) -> None:
    registry = tmp_path / "machine" / "app-ids.json"
    web1 = Identities(tmp_path / "w1.json", isolate=True, registry=registry)
    web2 = Identities(tmp_path / "w2.json", isolate=True, registry=registry)
    a1, b2, a2 = web1.get("site-a"), web2.get("site-b"), web2.get("site-a")
    assert a1 == a2, "one site keeps one uid on every worker of the machine"
    assert a1.unix_uid != b2.unix_uid, "two sites never share a uid"
    # Not isolating: numbers stay the worker's own (only directory names).
    local = Identities(tmp_path / "w3.json", isolate=False, registry=registry)
    assert local.get("site-c").unix_uid is None


ROUTED_APP = b"""
import json, os

ROUTES = {}

def route(path):
    def add(view):
        ROUTES[path] = view
        return view
    return add

@route("/")
def index(environ):
    return "200 OK", "index"

@route("/api")
def api(environ):
    return "200 OK", json.dumps({"q": environ["QUERY_STRING"], "pid": os.getpid()})

@route("/save")
def save(environ):
    os.makedirs("media", exist_ok=True)
    with open("media/saved.txt", "w") as f:
        f.write("saved by the app")
    return "200 OK", "saved"

def app(environ, start_response):
    view = ROUTES.get(environ["PATH_INFO"])
    status, text = view(environ) if view else ("404 Not Found", "no route")
    body = text.encode()
    start_response(status, [("Content-Type", "text/plain"), ("Content-Length", str(len(body)))])
    return [body]
"""


def test_a_worker_with_serving_processes_hands_app_requests_to_apps(tmp_path: Path) -> None:
    """``processes: 2``: the serving processes answer a dynamic site's requests through its app (the
    main process wakes it) and a static site's from disk; many requests through the front end, on
    kept and new connections at once, all answered; a new version reaches them too."""
    from roles.frontend.config import FrontendConfig

    domain = "sites.test"
    with running_cloud(app_start_timeout=10.0, processes=2) as cloud:
        fe_config = cloud.pki.role_config(FrontendConfig, "frontend", tmp_path / "frontend")
        cloud.pki.ca.issue_wildcard(domain).write(fe_config.wildcard_key_file, fe_config.wildcard_cert_file)
        frontend = RoleProcess(fe_config, cloud.pki).start()
        try:
            cloud.add_site("dyn")
            cloud.add_site("plain")
            cloud.publish("dyn", {"app.py": ROUTED_APP, "static/logo.txt": b"a static file of an app site"})
            cloud.publish("plain", {"index.html": b"<h1>static</h1>"})
            workers = [f"localhost:{cloud.config.data_port}"]
            frontend.push_config(
                {"version": 1, "domain": domain, "sites": {s: {"workers": workers} for s in ("dyn", "plain")}}
            )

            def get(conn: http.client.HTTPConnection, site: str, path: str) -> tuple[int, bytes]:
                conn.request("GET", path, headers={"Host": f"{site}.{domain}"})
                resp = conn.getresponse()
                return resp.status, resp.read()

            def new_conn() -> http.client.HTTPConnection:
                return http.client.HTTPConnection("127.0.0.1", fe_config.http_port, timeout=15)

            def once(site: str, path: str) -> tuple[int, bytes]:
                conn = new_conn()
                try:
                    return get(conn, site, path)
                finally:
                    conn.close()

            wait_until(lambda: once("dyn", "/") == (200, b"index"), timeout=20, what="the app")
            failures: list[str] = []
            pids: set[int] = set()

            def visitor(n: int) -> None:
                kept = new_conn()
                for i in range(40):
                    conn = kept if i % 4 else new_conn()
                    checks = [
                        (get(conn, "dyn", f"/api?n={n}.{i}"), None),
                        (get(conn, "plain", "/"), (200, b"<h1>static</h1>")),
                        (get(conn, "dyn", "/static/logo.txt"), (200, b"a static file of an app site")),
                    ]
                    for got, want in checks:
                        if want is None:
                            status, body = got
                            answer = json.loads(body) if status == 200 else {}
                            if answer.get("q") != f"n={n}.{i}":
                                failures.append(f"api {n}.{i}: {got!r}")
                            else:
                                pids.add(answer["pid"])
                        elif got != want:
                            failures.append(f"{n}.{i}: {got!r}")
                    if conn is not kept:
                        conn.close()
                kept.close()

            threads = [threading.Thread(target=visitor, args=(n,)) for n in range(6)]
            for t in threads:
                t.start()
            for t in threads:
                t.join(120)
            assert failures == [], failures[:5]
            assert len(pids) == 1  # one app process for the site, woken once, whichever process asked
            health = cloud.worker.health()
            assert health["processes"] == 2 and len(health["serving_pids"]) == 2
            # The main process counted the serving processes' requests (its access lines are theirs,
            # sent in batches: the last one a moment later).
            wait_until(
                lambda: cloud.log("dyn").count('"GET /api?n=') >= 6 * 40 - 10, timeout=5, what="access lines"
            )
            # A file the app wrote is served by the serving processes too (where the worker can
            # give apps a writable folder: as root, with quota volumes).
            if cloud.app("dyn").get("sandboxed"):
                assert once("dyn", "/save") == (200, b"saved")
                assert [once("dyn", "/media/saved.txt") for _ in range(4)] == [(200, b"saved by the app")] * 4
            # A new version flips the app for the serving processes too.
            cloud.publish("dyn", {"app.py": ROUTED_APP.replace(b'"index"', b'"index v2"')})
            wait_until(lambda: once("dyn", "/") == (200, b"index v2"), timeout=20, what="v2")

            if PHP:
                # php-cgi's children each hold one connection while it is open: the serving
                # processes share them out (one each here), so neither keeps the other waiting.
                cloud.add_site("phpdyn")
                cloud.publish("phpdyn", {"index.php": b"<?php echo 'php ' . $_GET['n'];"})
                frontend.push_config(
                    {
                        "version": 2,
                        "domain": domain,
                        "sites": {s: {"workers": workers} for s in ("dyn", "plain", "phpdyn")},
                    }
                )
                wait_until(lambda: once("phpdyn", "/?n=0") == (200, b"php 0"), timeout=20, what="php")

                def php_visitor(n: int) -> None:
                    kept = new_conn()
                    for i in range(30):
                        got = get(kept, "phpdyn", f"/?n={n}.{i}")
                        if got != (200, f"php {n}.{i}".encode()):
                            failures.append(f"php {n}.{i}: {got!r}")
                    kept.close()

                threads = [threading.Thread(target=php_visitor, args=(n,)) for n in range(6)]
                for t in threads:
                    t.start()
                for t in threads:
                    t.join(120)
                assert failures == [], failures[:5]
        finally:
            frontend.stop()


@pytest.mark.skipif(
    os.geteuid() != 0, reason="an app's own network namespace needs the worker's sandbox (root)"
)
def test_serving_processes_reach_a_procfile_app_inside_its_network_namespace() -> None:
    """``processes: 2``, a sandboxed Procfile app on $PORT in its own namespace: each serving process
    connects there itself (no relay in the sandbox), on new and kept connections at once."""
    with running_cloud(app_start_timeout=10.0, processes=2) as cloud:
        cloud.add_site("cmd")
        cloud.publish_and_wait(
            "cmd",
            {"Procfile": b"web: python3 -m http.server $PORT --bind 127.0.0.1\n", "hi.txt": b"hi there"},
            "/hi.txt",
            b"hi there",
        )
        assert cloud.app("cmd").get("sandboxed")
        failures: list[str] = []

        def visitor() -> None:
            kept = http.client.HTTPSConnection(
                "localhost", cloud.config.data_port, context=cloud.pki.client_ssl("frontend"), timeout=15
            )
            for i in range(30):
                conn = kept
                if i % 3 == 0:
                    conn = http.client.HTTPSConnection(
                        "localhost",
                        cloud.config.data_port,
                        context=cloud.pki.client_ssl("frontend"),
                        timeout=15,
                    )
                conn.request("GET", "/hi.txt", headers={"X-Sitecloud-Site": "cmd"})
                resp = conn.getresponse()
                got = (resp.status, resp.read())
                if got != (200, b"hi there"):
                    failures.append(repr(got))
                if conn is not kept:
                    conn.close()
            kept.close()

        threads = [threading.Thread(target=visitor) for _ in range(6)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert failures == [], failures[:5]
        assert len(cloud.worker.health()["serving_pids"]) == 2
