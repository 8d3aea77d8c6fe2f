"""Listening sockets that outlive the role process using them, so no other process can take a port.

A role's supervisor (the local fabric's :mod:`roles.controller.supervisor`, or the hostagent on a
role host) binds the role's listeners once, from its ``role.json``, and hands them to every process
it (re)starts: the descriptors are inherited across ``exec`` and ``SITECLOUD_LISTEN_FDS`` names them
(``http=5,https=6``), as systemd's socket activation does with ``LISTEN_FDS``/``LISTEN_FDNAMES``
(which :func:`listener` also accepts, so a systemd ``.socket`` unit works the same way). While one
process drains and the next starts, the port stays bound and listening: connections wait in the
backlog instead of being refused, and a ``bind()`` by anyone else fails. The held sockets have no
``SO_REUSEPORT``, so nobody can bind beside them either.

A role calls :func:`listener` for each of its ports: the inherited socket when there is one, else it
binds one itself (a role started by hand still works).

A supervisor that starts anew (a controller that crashed, a hostagent restarted for an upgrade) gets
the sockets back from the process holding them over a unix socket, with ``SCM_RIGHTS``
(:meth:`HeldListeners.fetch`); every holder that its supervisor asks to (``SITECLOUD_LISTEN_HANDBACK``)
serves them (:func:`serve_handback`). SCM_RIGHTS rather than ``pidfd_getfd(2)``: it needs no ptrace
rights over the holder (Yama's ``ptrace_scope=1``, the default on Ubuntu, refuses those to a
controller that is not the role's ancestor) and no kernel newer than 3.x. The unix socket is in the
abstract namespace, named after the holder's pid (no path length limit, nothing left on disk); the
holder only answers its own uid or root, and the fetcher checks that the one answering is the pid it
asked, so a process that squats the name gets nothing and gives nothing.
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import os
import socket
import struct
import threading
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

__all__ = [
    "ENV_FDS",
    "ENV_HANDBACK",
    "HeldListeners",
    "ListenerSpec",
    "child_env",
    "inherited",
    "listener",
    "listener_specs",
    "listening_ports",
    "serve_handback",
]

ENV_FDS = "SITECLOUD_LISTEN_FDS"
# Set by a supervisor: "1" asks the process to serve its listeners to a later supervisor.
ENV_HANDBACK = "SITECLOUD_LISTEN_HANDBACK"
_BACKLOG = 1024
_SYSTEMD_FIRST_FD = 3
_CREDS = struct.Struct("3i")


@dataclass(frozen=True)
class ListenerSpec:
    """One listening socket a role needs: a name it asks for it by, and where it listens."""

    name: str
    host: str
    port: int

    def held_by(self, sock: socket.socket) -> bool:
        """Whether ``sock`` already listens where this spec says (port 0: any port)."""
        host, port = sock.getsockname()[:2]
        return _same_host(host, self.host) and (self.port == 0 or port == self.port)


def _same_host(bound: str, wanted: str) -> bool:
    wanted = wanted or "0.0.0.0"
    try:
        return ipaddress.ip_address(bound) == ipaddress.ip_address(wanted)
    except ValueError:
        # A name ("localhost"): it resolved to what is bound when it was bound.
        return True


def listener_specs(raw: Mapping[str, Any]) -> list[ListenerSpec]:
    """The listening sockets of a role, from its ``role.json`` (as a mapping).

    FTP passive ports are not here: each is bound for one transfer and closed after it, so there is
    nothing that lives long enough to hold.
    """
    host = str(raw.get("bind", "127.0.0.1"))
    ports: list[tuple[str, str]] = [("control", "control_port")]
    kind = raw.get("role")
    if kind == "frontend":
        ports += [("http", "http_port"), ("https", "https_port")]
    elif kind == "worker":
        ports += [("data", "data_port")]
    elif kind == "publisher":
        ports += [("ftp", "ftp_port"), ("deploy", "deploy_port")]
    elif kind == "management":
        ports += [("api", "api_port")]
    specs = [ListenerSpec(name, host, int(raw.get(key) or 0)) for name, key in ports]
    if int(raw.get("metrics_port") or 0):  # optional; 0 means none rather than "any port"
        specs.append(
            ListenerSpec("metrics", str(raw.get("metrics_bind", "127.0.0.1")), int(raw["metrics_port"]))
        )
    plain = str(raw.get("loopback_plain_listen") or "") if kind == "worker" else ""
    if plain:
        plain_host, _, plain_port = plain.rpartition(":")
        plain_host = plain_host.strip("[]")
        with contextlib.suppress(ValueError):
            if ipaddress.ip_address(plain_host).is_loopback:
                specs.append(ListenerSpec("plain", plain_host, int(plain_port)))
    return specs


def bind_listener(spec: ListenerSpec, *, backlog: int = _BACKLOG) -> socket.socket:
    """A listening TCP socket for ``spec``: SO_REUSEADDR (a restart must not wait out TIME_WAIT),
    never SO_REUSEPORT (that would let another process bind beside it)."""
    family, kind, proto, _, address = socket.getaddrinfo(
        spec.host or None, spec.port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
    )[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
        sock.listen(backlog)
    except OSError:
        sock.close()
        raise
    return sock


# -- in a role process ----------------------------------------------------------------------------

# What this process was handed, read once from its environment (which is then cleaned, so nothing
# it starts sees descriptor numbers that mean nothing there); and what it listens on, for health.
_state: dict[str, dict[str, socket.socket]] = {}
_ports: dict[str, int] = {}


def inherited() -> dict[str, socket.socket]:
    """The listeners this process was handed, by name (empty when it was started by hand)."""
    if "inherited" in _state:
        return _state["inherited"]
    socks: dict[str, socket.socket] = {}
    named = os.environ.pop(ENV_FDS, "")
    for item in filter(None, named.split(",")):
        name, _, fd = item.partition("=")
        sock = _adopt_fd(int(fd)) if fd.isdigit() else None
        if sock is not None:
            socks[name] = sock
    count, names = os.environ.pop("LISTEN_FDS", ""), os.environ.pop("LISTEN_FDNAMES", "")
    pid = os.environ.pop("LISTEN_PID", "")
    if count.isdigit() and pid in ("", str(os.getpid())):
        labels = names.split(":") if names else []
        for i in range(int(count)):
            name = labels[i] if i < len(labels) else f"fd{i}"
            sock = _adopt_fd(_SYSTEMD_FIRST_FD + i)
            if sock is not None:
                socks.setdefault(name, sock)
    _state["inherited"] = socks
    return socks


def _adopt_fd(fd: int) -> socket.socket | None:
    try:
        # Inheritable only for the exec that brought it here: the apps this role starts must not get it.
        os.set_inheritable(fd, False)
        return socket.socket(fileno=fd)
    except OSError:
        # Not an open socket (a stale variable): the role binds for itself instead.
        return None


def listener(name: str, host: str, port: int, *, backlog: int = _BACKLOG) -> socket.socket:
    """The listening socket for ``name``: a copy of the inherited one when the supervisor handed one
    over, else a new one bound to ``host:port``. The caller owns (and closes) what it gets."""
    held = inherited().get(name)
    if held is not None:
        sock = held.dup()
        sock.listen(backlog)
    else:
        sock = bind_listener(ListenerSpec(name, host, port), backlog=backlog)
    _ports[name] = int(sock.getsockname()[1])
    return sock


def listening_ports() -> dict[str, int]:
    """The port of every listener this process asked for, by name (the real one where config said 0)."""
    return dict(_ports)


def child_env(socks: Mapping[str, socket.socket]) -> tuple[dict[str, str], tuple[int, ...]]:
    """What a process started with ``socks`` needs: the environment naming them, and ``pass_fds``."""
    named = ",".join(f"{name}={sock.fileno()}" for name, sock in socks.items())
    return {ENV_FDS: named}, tuple(sock.fileno() for sock in socks.values())


# -- handing listeners back to a new supervisor ----------------------------------------------------


def _address(pid: int) -> str:
    return f"\0sitecloud-listeners-{pid}"


def serve_handback(socks: Mapping[str, socket.socket], *, force: bool = False) -> bool:
    """Serve ``socks`` to a supervisor that asks (over SCM_RIGHTS), from a daemon thread, when this
    process's supervisor asked for it (``SITECLOUD_LISTEN_HANDBACK=1``) or ``force``. True if serving."""
    wanted = os.environ.pop(ENV_HANDBACK, "") == "1"
    # A forced (supervisor's) mapping may still be empty: it fills at its first start.
    if not force and not (wanted and socks):
        return False
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        server.bind(_address(os.getpid()))
        server.listen(4)
    except OSError:
        server.close()
        return False

    def run() -> None:
        while True:
            try:
                conn, _ = server.accept()
            except OSError:
                continue
            with conn:
                _, uid, _ = _CREDS.unpack(conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _CREDS.size))
                if uid not in (0, os.getuid()):
                    continue
                # Read at each request: a hostagent rebinds a listener whose port changed.
                names = list(socks)
                with contextlib.suppress(OSError, KeyError):
                    fds = [socks[n].fileno() for n in names]
                    if fds:
                        socket.send_fds(conn, [json.dumps(names).encode()], fds)
                    else:
                        conn.sendall(b"[]")

    threading.Thread(target=run, name="listener-handback", daemon=True).start()
    return True


class HeldListeners:
    """A supervisor's listeners for one role: bound once, handed to every process it starts."""

    def __init__(self, socks: dict[str, socket.socket] | None = None) -> None:
        self.socks: dict[str, socket.socket] = dict(socks or {})

    @classmethod
    def fetch(cls, pid: int, *, timeout: float = 3.0) -> HeldListeners:
        """The listeners process ``pid`` holds, handed over by its :func:`serve_handback`.

        Raises OSError when it does not answer within ``timeout`` (it predates this, was started by
        hand, or is still starting) or when someone else answers in its name.
        """
        deadline = time.monotonic() + timeout
        while True:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                sock.settimeout(max(0.1, deadline - time.monotonic()))
                sock.connect(_address(pid))
                peer, _, _ = _CREDS.unpack(
                    sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _CREDS.size)
                )
                if peer != pid:
                    raise OSError(f"pid {peer}, not {pid}, answers for pid {pid}'s listeners")
                payload, fds, _, _ = socket.recv_fds(sock, 64 * 1024, 64)
                break
            except (ConnectionRefusedError, FileNotFoundError):
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)
            finally:
                sock.close()
        socks: dict[str, socket.socket] = {}
        for name, fd in zip(json.loads(payload), fds, strict=False):
            os.set_inheritable(fd, False)
            socks[str(name)] = socket.socket(fileno=fd)
        for fd in fds[len(socks) :]:
            os.close(fd)
        return cls(socks)

    def update(self, specs: Iterable[ListenerSpec]) -> list[str]:
        """Hold exactly ``specs``: keep each socket that still matches its spec, bind new ones, close
        the rest. Returns the names (re)bound. Raises OSError if a port cannot be bound (then nothing
        already held is given up)."""
        specs = list(specs)
        fresh: dict[str, socket.socket] = {}
        try:
            for spec in specs:
                held = self.socks.get(spec.name)
                if held is None or not spec.held_by(held):
                    fresh[spec.name] = bind_listener(spec)
        except OSError:
            for sock in fresh.values():
                sock.close()
            raise
        wanted = {s.name for s in specs}
        for name in [n for n in self.socks if n not in wanted or n in fresh]:
            self.socks.pop(name).close()
        self.socks.update(fresh)
        return sorted(fresh)

    def ports(self) -> dict[str, int]:
        return {name: int(sock.getsockname()[1]) for name, sock in self.socks.items()}

    def child_env(self) -> tuple[dict[str, str], tuple[int, ...]]:
        return child_env(self.socks)

    def close(self) -> None:
        for sock in self.socks.values():
            sock.close()
        self.socks.clear()
