"""Our per-site app server on its own: a real interpreter with a listening socket as fd 0, as the
worker starts it (no sandbox needed), talked to over that socket."""

from __future__ import annotations

import os
import select
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
    if environ["PATH_INFO"] == "/gen":
        return (part for part in [b"gen", b"erated"])
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


def read_answer(conn: socket.socket, buf: bytearray) -> tuple[bytes, bytes]:
    """One response (head, body) from a kept connection: by its length, or chunked."""
    while b"\r\n\r\n" not in buf:
        chunk = conn.recv(65536)
        assert chunk, "closed before a whole head"
        buf += chunk
    end = buf.index(b"\r\n\r\n")
    head, rest = bytes(buf[:end]), buf[end + 4 :]
    fields = {
        k.strip().lower(): v.strip() for k, _, v in (x.partition(b":") for x in head.split(b"\r\n")[1:])
    }
    body = bytearray()
    if b"content-length" in fields:
        length = int(fields[b"content-length"])
        while len(rest) < length:
            rest += conn.recv(65536)
        body, rest = rest[:length], rest[length:]
    else:
        assert fields.get(b"transfer-encoding") == b"chunked", head
        while True:
            while b"\r\n" not in rest:
                rest += conn.recv(65536)
            size_line, _, rest = rest.partition(b"\r\n")
            size = int(size_line, 16)
            while len(rest) < size + 2:
                rest += conn.recv(65536)
            body += rest[:size]
            rest = rest[size + 2 :]
            if size == 0:
                break
    buf[:] = rest
    return head, bytes(body)


@pytest.mark.parametrize("server", [(APP, "app"), (ASGI_APP, "asgi")], indirect=True)
def test_a_kept_connection_carries_many_requests_in_turn(
    server: tuple[subprocess.Popen[bytes], Path],
) -> None:
    """Asked for keep-alive (as the worker asks), the server frames each answer (chunked when the
    app gave no length) and keeps the connection; pipelined requests are answered in order."""
    proc, path = server
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as conn:
        conn.settimeout(10)
        conn.connect(str(path))
        buf = bytearray()
        for n in range(50):
            body = b"b%d" % n
            conn.sendall(
                b"POST /k%d HTTP/1.1\r\nConnection: keep-alive\r\nContent-Length: %d\r\n\r\n%s"
                % (n, len(body), body)
            )
            head, answer = read_answer(conn, buf)
            assert b"Connection: keep-alive" in head and answer.endswith(
                b"/k%d " % n + (b" " if b"x-kind" not in head else b"") + body
            )
        conn.sendall(
            b"GET /p1 HTTP/1.1\r\nConnection: keep-alive\r\n\r\nGET /p2 HTTP/1.1\r\nConnection: keep-alive\r\n\r\n"
        )
        assert read_answer(conn, buf)[1].startswith(b"/p1")
        assert read_answer(conn, buf)[1].startswith(b"/p2")
        # A request that says nothing about keep-alive ends its connection, as before.
        conn.sendall(b"GET /last HTTP/1.1\r\n\r\n")
        tail = b""
        while chunk := conn.recv(65536):
            tail += chunk
        assert b"Connection: close" in tail and b"/last" in tail
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(10) == 0


@pytest.mark.parametrize("server", [(APP, "app")], indirect=True)
def test_wsgi_list_answer_goes_with_its_length_in_one_write_a_generator_chunked(
    server: tuple[subprocess.Popen[bytes], Path],
) -> None:
    """On a kept connection, an answer the app gave as a list gets its Content-Length, head and body
    in one segment (as gunicorn sends it); one it streams from a generator is chunked."""
    _, path = server
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as conn:
        conn.settimeout(10)
        conn.connect(str(path))
        conn.sendall(b"GET /list?q HTTP/1.1\r\nConnection: keep-alive\r\n\r\n")
        time.sleep(0.2)  # anything sent in a second write is here by now too
        first = conn.recv(65536)
        head, _, body = first.partition(b"\r\n\r\n")
        assert b"\r\nContent-Length: 8\r\n" in head and b"chunked" not in head.lower(), first
        assert body == b"/list q ", first
        buf = bytearray()
        conn.sendall(b"GET /gen HTTP/1.1\r\nConnection: keep-alive\r\n\r\n")
        head, answer = read_answer(conn, buf)
        assert b"Transfer-Encoding: chunked" in head and answer == b"generated"


def test_out_of_file_descriptors_the_server_lets_an_idle_kept_connection_go(tmp_path: Path) -> None:
    """More kept connections than the app's open-file limit allows: the server closes an idle one
    to take the new connection, rather than dying or leaving it in the backlog."""
    import resource

    (tmp_path / "site").mkdir()
    (tmp_path / "site" / "app.py").write_bytes(APP)
    plan = plan_launch(
        site="one", runtime="python", entry="app", root=str(tmp_path / "site"), dirs=SiteDirs.under(tmp_path, 1),
        settings=(), limits=AppLimits(), python=sys.executable, packages=None, appserver=APPSERVER_PATH,
    )  # fmt: skip
    path = tmp_path / "app.sock"
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(path))
    listener.listen(64)

    def low_nofile() -> None:
        resource.setrlimit(resource.RLIMIT_NOFILE, (40, 40))

    proc = subprocess.Popen(
        plan.argv, stdin=listener.fileno(), cwd=plan.cwd, env=plan.env, stderr=subprocess.DEVNULL,
        preexec_fn=low_nofile,  # a test's child: no threads to deadlock in it
    )  # fmt: skip
    listener.close()
    kept: list[socket.socket] = []
    try:
        for n in range(60):
            conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            conn.settimeout(10)
            conn.connect(str(path))
            kept.append(conn)
            conn.sendall(b"GET /k%d HTTP/1.1\r\nConnection: keep-alive\r\n\r\n" % n)
            head, body = read_answer(conn, bytearray())
            assert head.startswith(b"HTTP/1.1 200") and body.startswith(b"/k%d " % n)
        assert proc.poll() is None
    finally:
        for conn in kept:
            conn.close()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(10) == 0


@pytest.mark.parametrize(
    ("server", "where"),
    [
        ((b"import os\n\ndef oops(:\n    pass\n", "app"), "app.py, line 3"),
        ((b"def make():\n    return missing_name\n\napp = make()\n", "app"), "app.py, line 2"),
    ],
    indirect=["server"],
)
def test_an_app_that_cannot_load_names_its_file_and_line_on_its_last_line(
    server: tuple[subprocess.Popen[bytes], Path], where: str
) -> None:
    # The last line is all a deploy and the site's page show of a failed start: it must point at the
    # site's own code, and not at a traceback they do not show.
    proc, _ = server
    assert proc.wait(timeout=10) == 1
    assert proc.stderr is not None
    last = proc.stderr.read().decode().strip().splitlines()[-1]
    assert where in last, last
    assert "above" not in last, last


SERVES_ITSELF_ON_IMPORT = b"""
import socket

app = None
own = socket.socket()
own.bind(("127.0.0.1", 0))
own.listen()
print("* Running on its own port", flush=True)
own.accept()  # app.run() at a module's top level: the import never returns
"""


@pytest.mark.parametrize("server", [(SERVES_ITSELF_ON_IMPORT, "main")], indirect=True)
def test_a_module_that_serves_as_it_is_imported_is_told_what_to_change(
    server: tuple[subprocess.Popen[bytes], Path],
) -> None:
    # Its log says why no request is answered, and what to do, while it still hangs.
    proc, _ = server
    assert proc.stderr is not None
    said = b""
    deadline = time.monotonic() + 15
    while b"has not finished loading" not in said and time.monotonic() < deadline:
        ready, _, _ = select.select([proc.stderr], [], [], 1.0)
        if ready:
            said += os.read(proc.stderr.fileno(), 65536)
    text = said.decode()
    assert "main.py has not finished loading after 5 s" in text, text
    assert 'if __name__ == "__main__":' in text, text
    assert proc.poll() is None  # told, not killed: a slow import may yet end


def test_an_app_factory_is_served_as_flask_and_gunicorn_name_it(tmp_path: Path) -> None:
    """Flask's tutorial app has only ``create_app()`` in a package: ``flaskr:create_app()`` (the
    deployment docs' gunicorn line) calls it, as does an entry that names only the package."""
    package = tmp_path / "flaskr"
    package.mkdir()
    (package / "__init__.py").write_text(
        "def create_app(test_config=None):\n"
        "    def app(environ, start_response):\n"
        "        start_response('200 OK', [])\n"
        "        return [b'factory']\n"
        "    return app\n"
    )
    probe = (
        "import sys; sys.path[:0] = [sys.argv[1], sys.argv[2]]\n"
        "from sitecloud_appserver.__main__ import load\n"
        "for entry in ('flaskr:create_app()', 'flaskr'):\n"
        "    print(b''.join(load(entry)({}, lambda *a: None)).decode())\n"
        "load('flaskr:make_app()')\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", probe, APPSERVER_PATH, str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert done.stdout.split() == ["factory", "factory"], done.stderr
    assert "module flaskr has no make_app() to serve" in done.stderr
