"""A hostile tenant's WSGI app (published as ``app.py``): each path is one attack, and the JSON answer
says what the attack got, so the test reads the outcome through the app's own HTTP answer.

Every loop is bounded in count and time, and every process it starts ends by itself. It prints
nothing but ``/spam``'s lines: whatever else the site's log says about an attack, the platform wrote it.
"""

import contextlib
import errno
import json
import os
import select
import socket
import sys
import time
from collections.abc import Callable, Iterable
from typing import Any
from urllib.parse import parse_qs

Query = dict[str, str]
Answer = dict[str, Any]

HOME = os.environ.get("HOME", "/nonexistent")
MB = 1024 * 1024


def _errname(exc: OSError) -> str:
    return errno.errorcode.get(exc.errno or 0, type(exc).__name__)


def _save(path: str, data: Answer) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(data, f)
    os.replace(tmp, path)


def _in_grandchild(work: Callable[[], None]) -> None:
    """Run ``work`` in a grandchild (same session and process group) and return at once."""
    pid = os.fork()
    if pid == 0:
        try:
            if os.fork() == 0:
                try:
                    work()
                finally:
                    os._exit(0)
        finally:
            os._exit(0)
    os.waitpid(pid, 0)


def _ftp_capture(conn: socket.socket) -> bytes:
    """Play an FTP server long enough to take a client's USER and PASS."""
    conn.sendall(b"220 ready\r\n")
    got = b""
    for reply in (b"331 password please\r\n", b"230 welcome\r\n"):
        line = conn.recv(512)
        got += line
        conn.sendall(reply)
    return got


def squat(query: Query) -> Answer:
    """Keep trying to bind the given loopback ports; take whatever connects and record it."""
    ports = [int(p) for p in query["ports"].split(",")][:16]
    ftp_ports = {int(p) for p in query.get("ftp", "0").split(",")}
    option = socket.SO_REUSEPORT if query.get("mode") == "reuseport" else socket.SO_REUSEADDR
    secs = min(float(query.get("secs", "20")), 60.0)
    out = os.path.join(HOME, "squat-{}.json".format(query["tag"]))
    stop = os.path.join(HOME, "squat-{}.stop".format(query["tag"]))

    def work() -> None:
        record: Answer = {"bound": [], "accepted": [], "done": False}
        held: dict[int, socket.socket] = {}
        deadline = time.monotonic() + secs
        _save(out, record)
        while time.monotonic() < deadline and not os.path.exists(stop):
            for port in ports:
                if port in held:
                    continue
                s = socket.socket()
                try:
                    s.setsockopt(socket.SOL_SOCKET, option, 1)
                    s.bind(("127.0.0.1", port))
                    s.listen(16)
                except OSError:
                    s.close()
                    continue
                s.setblocking(False)
                held[port] = s
                record["bound"].append(port)
                _save(out, record)
            ready = select.select(list(held.values()), [], [], 0.002)[0] if held else []
            if not held:
                time.sleep(0.002)
            for s in ready:
                try:
                    conn, _ = s.accept()
                except OSError:
                    continue
                port = s.getsockname()[1]
                conn.settimeout(1.0)
                data = b""
                with contextlib.suppress(OSError):
                    data = _ftp_capture(conn) if port in ftp_ports else conn.recv(1024)
                conn.close()
                record["accepted"].append({"port": port, "data": data[:300].decode("latin-1")})
                _save(out, record)
        for s in held.values():
            s.close()
        record["done"] = True
        _save(out, record)

    _in_grandchild(work)
    return {"started": query["tag"]}


def stop_squat(query: Query) -> Answer:
    with open(os.path.join(HOME, "squat-{}.stop".format(os.path.basename(query["tag"]))), "w"):
        pass
    return {"stopping": query["tag"]}


def read_home(query: Query) -> Answer:
    path = os.path.join(HOME, os.path.basename(query["name"]))
    try:
        with open(path) as f:
            return {"found": True, "data": json.load(f)}
    except (OSError, ValueError) as exc:
        return {"found": False, "error": str(exc)}


def write(query: Query) -> Answer:
    """Write ``mb`` MB to ``path`` (``$HOME``/``$TMPDIR`` expanded); with ``keep=0`` remove it after."""
    path = query["path"].replace("$HOME", HOME).replace("$TMPDIR", os.environ.get("TMPDIR", "/tmp"))
    mb = min(int(query.get("mb", "1")), 1024)
    written = 0
    error: str | None = None
    chunk = b"\xa5" * MB
    try:
        with open(path, "wb") as f:
            for _ in range(mb):
                f.write(chunk)
                written += MB
            f.flush()
            os.fsync(f.fileno())
    except OSError as exc:
        error = _errname(exc)
    if query.get("keep", "1") == "0":
        with contextlib.suppress(OSError):
            os.unlink(path)
    return {"path": path, "written": written, "error": error}


def remove(query: Query) -> Answer:
    try:
        os.unlink(query["path"])
    except OSError as exc:
        return {"removed": False, "error": _errname(exc)}
    # ext4 reuses a deleted file's blocks only after its next journal commit (up to 5 s): the next
    # attack should meet the quota, not that window.
    os.sync()
    return {"removed": True}


def whoami(query: Query) -> Answer:
    return {"home": HOME, "tmpdir": os.environ.get("TMPDIR"), "uid": os.getuid(), "pid": os.getpid()}


def stat(query: Query) -> Answer:
    try:
        return {"exists": True, "size": os.stat(query["path"]).st_size}
    except OSError as exc:
        return {"exists": False, "error": _errname(exc)}


def escape(query: Query) -> Answer:
    """fork, setsid, fork: an orphan outside the app's session that holds memory and sleeps."""
    tag = query["tag"]
    secs = min(float(query.get("secs", "60")), 120.0)
    pid = os.fork()
    if pid == 0:
        try:
            os.setsid()
            if os.fork() == 0:
                code = f"import time; x = bytearray(64 << 20); time.sleep({secs!r})  # hostile-escape-{tag}"
                os.execv(sys.executable, [sys.executable, "-c", code])
        finally:
            os._exit(0)
    os.waitpid(pid, 0)
    time.sleep(0.3)
    return {"escaped": tag}


def bomb(query: Query) -> Answer:
    """Fork until the kernel says no (bounded); the children sleep a while and leave."""
    limit = min(int(query.get("n", "1000")), 2000)
    secs = min(float(query.get("secs", "15")), 30.0)
    started = time.monotonic()
    forked = 0
    error: str | None = None
    while forked < limit and time.monotonic() - started < 8:
        try:
            pid = os.fork()
        except OSError as exc:
            error = _errname(exc)
            break
        if pid == 0:
            time.sleep(secs)
            os._exit(0)
        forked += 1
    return {"forked": forked, "error": error, "seconds": round(time.monotonic() - started, 2)}


def spam(query: Query) -> Answer:
    """Print as fast as the pipe takes it for ``secs`` seconds: how much got out, and how fast."""
    secs = min(float(query.get("secs", "3")), 10.0)
    line = b"spam " * 200 + b"\n"
    started = time.monotonic()
    wrote = 0
    while time.monotonic() - started < secs:
        wrote += os.write(2, line)
    return {"wrote": wrote, "seconds": round(time.monotonic() - started, 2)}


def _listening(proc_file: str) -> set[int]:
    ports = set()
    try:
        with open(proc_file) as f:
            next(f)
            for line in f:
                fields = line.split()
                local, state = fields[1], fields[3]
                address, port = local.split(":")
                loopback_or_any = address in ("0100007F", "00000000") or address.endswith("0100007F")
                if state == "0A" and (loopback_or_any or set(address) == {"0"}):
                    ports.add(int(port, 16))
    except OSError:
        pass
    return ports


def scan(query: Query) -> Answer:
    """Find listening loopback ports in /proc/net/tcp, add the given ones, and connect to each."""
    found = sorted(_listening("/proc/net/tcp") | _listening("/proc/net/tcp6"))
    given = [int(p) for p in query.get("ports", "").split(",") if p]
    targets = list(dict.fromkeys(given + found))[:120]
    deadline = time.monotonic() + 15
    result: dict[str, str] = {}
    for port in targets:
        if time.monotonic() > deadline:
            result[str(port)] = "not tried (time)"
            continue
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                result[str(port)] = "open"
        except OSError as exc:
            result[str(port)] = _errname(exc) if isinstance(exc.errno, int) else "timeout"
    return {"found": found, "result": result}


def read_paths(query: Query) -> Answer:
    """Try to read (or list) each path; report what came back."""
    out: Answer = {}
    for path in query["paths"].split("|")[:50]:
        try:
            if os.path.isdir(path):
                out[path] = {"listed": sorted(os.listdir(path))[:50]}
            else:
                with open(path, "rb") as f:
                    out[path] = {"read": f.read(4096).decode("latin-1")}
        except OSError as exc:
            out[path] = {"error": _errname(exc)}
    return out


ATTACKS: dict[str, Callable[[Query], Answer]] = {
    "/squat": squat,
    "/stop-squat": stop_squat,
    "/read-home": read_home,
    "/write": write,
    "/stat": stat,
    "/rm": remove,
    "/whoami": whoami,
    "/escape": escape,
    "/bomb": bomb,
    "/scan": scan,
    "/read": read_paths,
    "/spam": spam,
}


def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
    path = environ.get("PATH_INFO", "/")
    query = {k: v[0] for k, v in parse_qs(environ.get("QUERY_STRING", "")).items()}
    attack = ATTACKS.get(path)
    if attack is None:
        body = b"attacker here"
    else:
        try:
            body = json.dumps(attack(query)).encode()
        except Exception as exc:  # an attack that broke answers with why
            body = json.dumps({"exception": repr(exc)}).encode()
    start_response("200 OK", [("Content-Type", "application/json"), ("Content-Length", str(len(body)))])
    return [body]
