"""Our per-site app server on its own: a real interpreter with a listening socket as fd 0, as the
worker starts it (no sandbox needed), talked to over that socket."""

from __future__ import annotations

import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from roles.worker._appserver import APPSERVER_PATH
from roles.worker.apps._launch import SiteDirs, plan_launch
from roles.worker.apps._spec import AppLimits

APP = b"""
import time

def app(environ, start_response):
    if environ["PATH_INFO"] == "/slow":
        time.sleep(0.5)
    body = environ["wsgi.input"].read()
    start_response("200 OK", [("Content-Type", "text/plain")])
    return [environ["PATH_INFO"].encode("latin-1"), b" ", environ["QUERY_STRING"].encode(), b" ", body]
"""

ASGI_APP = b"""
async def app(scope, receive, send):
    message = await receive()
    await send({"type": "http.response.start", "status": 201, "headers": [(b"x-kind", b"asgi")]})
    await send({"type": "http.response.body", "body": scope["path"].encode() + b" " + message["body"]})
"""


@pytest.fixture
def server(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[tuple[subprocess.Popen[bytes], Path]]:
    source, module = request.param
    (tmp_path / "site").mkdir()
    (tmp_path / "site" / f"{module}.py").write_bytes(source)
    dirs = SiteDirs.under(tmp_path, 1)
    plan = plan_launch(
        site="one", runtime="python", entry=module, root=str(tmp_path / "site"), dirs=dirs, settings=(),
        limits=AppLimits(), python=sys.executable, packages=None, appserver=APPSERVER_PATH,
    )  # fmt: skip
    path = tmp_path / "app.sock"
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(path))
    listener.listen(64)
    proc = subprocess.Popen(
        plan.argv, stdin=listener.fileno(), cwd=plan.cwd, env=plan.env, stderr=subprocess.PIPE
    )
    listener.close()
    try:
        yield proc, path
    finally:
        proc.kill()
        proc.wait()
        assert proc.stderr is not None
        proc.stderr.close()


def ask(path: Path, request: bytes) -> bytes:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as conn:
        conn.settimeout(10)
        conn.connect(str(path))
        conn.sendall(request)
        answer = b""
        while chunk := conn.recv(65536):
            answer += chunk
        return answer


@pytest.mark.parametrize("server", [(APP, "app")], indirect=True)
def test_wsgi_answers_paths_bodies_and_many_at_once(server: tuple[subprocess.Popen[bytes], Path]) -> None:
    _, path = server
    answer = ask(path, b"POST /a%20b?x=1 HTTP/1.1\r\nHost: s\r\nContent-Length: 5\r\n\r\nhello")
    assert answer.startswith(b"HTTP/1.1 200 OK\r\n") and b"Connection: close" in answer
    assert answer.endswith(b"\r\n\r\n/a b x=1 hello")
    # More connections than threads: the rest wait in the backlog, every one is answered.
    answers: list[bytes] = []
    threads = [
        threading.Thread(target=lambda n=n: answers.append(ask(path, f"GET /slow?{n} HTTP/1.1\r\n\r\n".encode())))
        for n in range(12)
    ]  # fmt: skip
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(a.rsplit(b"\r\n\r\n", 1)[1] for a in answers) == sorted(b"/slow %d " % n for n in range(12))
    assert ask(path, b"GET / HTTP/1.1\r\nContent-Length: nope\r\n\r\n") == b""


@pytest.mark.parametrize("server", [(APP, "app")], indirect=True)
def test_wsgi_finishes_the_request_under_way_on_sigterm(server: tuple[subprocess.Popen[bytes], Path]) -> None:
    proc, path = server
    assert ask(path, b"GET /up HTTP/1.1\r\n\r\n").endswith(b"/up  ")
    answers: list[bytes] = []
    slow = threading.Thread(target=lambda: answers.append(ask(path, b"GET /slow HTTP/1.1\r\n\r\n")))
    slow.start()
    time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    slow.join()
    assert answers[0].endswith(b"/slow  ")
    assert proc.wait(10) == 0


@pytest.mark.parametrize("server", [(ASGI_APP, "asgi")], indirect=True)
def test_asgi_answers_with_its_status_and_body(server: tuple[subprocess.Popen[bytes], Path]) -> None:
    proc, path = server
    answer = ask(path, b"POST /p HTTP/1.1\r\nContent-Length: 2\r\n\r\nhi")
    assert answer.startswith(b"HTTP/1.1 201 Created\r\n") and b"x-kind: asgi" in answer
    assert answer.endswith(b"/p hi")
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(10) == 0
