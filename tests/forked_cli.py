"""`sitecloud` CLI runs for the tests, each forked from a process that has imported the CLI already.

A run is a process of its own: the CLI's ``main()`` with the given arguments, environment and working
directory, stdin from /dev/null, stdout and stderr captured and its exit code returned, as a run of
``python -m roles.management.cli`` gives them. Only the interpreter's start and the CLI's imports,
about 0.1 s and most of a call, are paid once per session instead of once per call. The entry point
itself is still run as a command where that is what a test is about (test_cli.py, the README's
walk-through, the ``_sitecloud`` helpers of the end-to-end tests).
"""

from __future__ import annotations

import atexit
import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

__all__ = ["run_cli"]

_ROOT = Path(__file__).resolve().parent.parent

# The server: import the CLI, then fork one child per connection. A child reads its request (one JSON
# line), answers its pid, runs main() with fds 1 and 2 on memory files and answers
# "<exit code> <stdout bytes> <stderr bytes>\n" and the bytes. The server ends with the test session.
_SERVER = r"""
import json, os, signal, socket, sys, traceback
import roles.management.cli as cli

parent = os.getppid()
server = socket.socket(socket.AF_UNIX)
# Bound beside its name and renamed once it listens: a run that finds the path can connect.
server.bind(sys.argv[1] + ".new")
server.listen(64)
os.rename(sys.argv[1] + ".new", sys.argv[1])
server.settimeout(1.0)

def reap():
    while True:
        try:
            pid, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return

def run(conn):
    request = json.loads(conn.makefile("rb").readline())
    conn.sendall(f"{os.getpid()}\n".encode())
    null = os.open(os.devnull, os.O_RDONLY)
    os.dup2(null, 0)
    outs = [os.memfd_create(name) for name in ("stdout", "stderr")]
    os.dup2(outs[0], 1)
    os.dup2(outs[1], 2)
    os.environ.clear()
    os.environ.update(request["env"])
    os.chdir(request["cwd"])
    sys.argv = [cli.__file__, *request["argv"]]
    try:
        code = cli.main(request["argv"])
    except SystemExit as exc:
        if exc.code is None or isinstance(exc.code, int):
            code = exc.code or 0
        else:
            print(exc.code, file=sys.stderr)
            code = 1
    except BaseException:
        traceback.print_exc()
        code = 1
    sys.stdout.flush()
    sys.stderr.flush()
    captured = []
    for fd in outs:
        os.lseek(fd, 0, os.SEEK_SET)
        chunks = []
        while chunk := os.read(fd, 1 << 20):
            chunks.append(chunk)
        captured.append(b"".join(chunks))
    conn.sendall(f"{code} {len(captured[0])} {len(captured[1])}\n".encode() + b"".join(captured))
    return code

# Only the end of the session ends the server: not a Ctrl-C meant for the test process group.
signal.signal(signal.SIGINT, signal.SIG_IGN)
while os.getppid() == parent:
    reap()
    try:
        conn, _ = server.accept()
    except OSError:  # the timeout, or a client gone before its accept
        continue
    if os.fork():
        conn.close()
        continue
    signal.signal(signal.SIGINT, signal.default_int_handler)
    server.close()
    code = 1
    try:
        code = run(conn)
    finally:
        os._exit(code)
"""


class _Server:
    def __init__(self) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="sitecloud-cli-"))
        self.path = self.dir / "cli.sock"
        self.proc = subprocess.Popen(
            [sys.executable, "-c", _SERVER, str(self.path)],
            cwd=_ROOT,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 30
        while not self.path.exists():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the forked-CLI server did not start (exit {self.proc.returncode})")
            time.sleep(0.01)
        atexit.register(self.stop)

    def stop(self) -> None:
        atexit.unregister(self.stop)
        self.proc.kill()
        self.proc.wait()
        self.path.unlink(missing_ok=True)
        with contextlib.suppress(OSError):
            self.dir.rmdir()


_running: list[_Server] = []


def _server() -> _Server:
    """The session's server, started again if it is gone (its exit code says why, on stderr)."""
    if _running and _running[0].proc.poll() is not None:
        gone = _running.pop()
        sys.stderr.write(f"forked CLI server ended with {gone.proc.returncode}; starting another\n")
        gone.stop()
    if not _running:
        _running.append(_Server())
    return _running[0]


def _connect(sock: socket.socket) -> bool:
    """Connect to the session's server, started again once if it refuses (twice in CI, a server whose
    process was alive refused every call of a module: why is not known yet); False if it still does."""
    for _attempt in range(2):
        server = _server()
        try:
            sock.connect(str(server.path))
            return True
        except (ConnectionRefusedError, FileNotFoundError) as exc:
            alive = "alive" if server.proc.poll() is None else f"ended with {server.proc.returncode}"
            sys.stderr.write(f"forked CLI server (pid {server.proc.pid}, {alive}) refused a run: {exc}\n")
            _running.remove(server)
            server.stop()
    return False


def _read_exactly(sock: socket.socket, n: int, buf: bytearray) -> bytes:
    while len(buf) < n:
        chunk = sock.recv(65536)
        if not chunk:
            raise ConnectionError("the forked CLI run ended without an answer")
        buf += chunk
    out = bytes(buf[:n])
    del buf[:n]
    return out


def _read_line(sock: socket.socket, buf: bytearray) -> str:
    while b"\n" not in buf:
        chunk = sock.recv(65536)
        if not chunk:
            raise ConnectionError("the forked CLI run ended without an answer")
        buf += chunk
    line, _, rest = bytes(buf).partition(b"\n")
    buf[:] = rest
    return line.decode()


def run_cli(
    argv: Sequence[str], *, env: Mapping[str, str], timeout: float
) -> subprocess.CompletedProcess[bytes]:
    """``python -m roles.management.cli *argv`` with ``env``, as a forked process; its stdout, stderr
    and exit code. Killed, with :class:`subprocess.TimeoutExpired`, after ``timeout`` seconds."""
    command = [sys.executable, "-m", "roles.management.cli", *argv]
    request = {"argv": list(argv), "env": dict(env), "cwd": os.getcwd()}
    deadline = time.monotonic() + timeout
    with socket.socket(socket.AF_UNIX) as sock:
        sock.settimeout(timeout)
        if not _connect(sock):
            # (A slower run, but the same one: the test goes on.)
            return subprocess.run(
                command, env=dict(env), stdin=subprocess.DEVNULL, capture_output=True, timeout=timeout
            )
        sock.sendall(json.dumps(request).encode() + b"\n")
        buf = bytearray()
        pid = int(_read_line(sock, buf))
        try:
            sock.settimeout(max(0.01, deadline - time.monotonic()))
            code, out_len, err_len = (int(n) for n in _read_line(sock, buf).split())
            stdout = _read_exactly(sock, out_len, buf)
            stderr = _read_exactly(sock, err_len, buf)
        except TimeoutError:
            os.kill(pid, signal.SIGKILL)
            raise subprocess.TimeoutExpired(command, timeout) from None
    return subprocess.CompletedProcess(command, code, stdout, stderr)
