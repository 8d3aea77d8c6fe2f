"""App requests from the worker's serving processes (``processes > 1``), through its main process.

The main process alone starts, watches and stops apps (:class:`AppManager`). A serving process
that gets a request for a dynamic site asks the main process over a local control channel (a unix
socket in the apps' run directory, 0700, the worker's own) for the site's running instance, which
it wakes if need be; it then talks to that instance's socket itself, keeping connections to it as the
main process does. The main process counts the request as under way until the serving process says
it ended, so idle stops and retirements work as they do for its own requests; a serving process
that goes away ends what it had under way.

One JSON object a line each way. Asked: ``sites`` (the dynamic sites and what the proxy needs of
each), ``acquire`` (an instance, with an ``id`` the answer carries). Told, without an answer:
``end``, ``log`` (lines for the site's log) and ``access``.

Access lines (static answers, app answers and the front ends' held hits a serving process's feeds
report) go to the main process, which owns every site's log, in batches: a serving process holds them
for up to ``ACCESS_EVERY`` seconds and sends one ``access`` message (``lines``: ``[site, second,
line]`` each) a batch, never a write a request. While the main process is away (restarting its
channel) or slow to read, lines are held up to ``ACCESS_HELD_BYTES``; beyond that they are dropped,
counted in the next batch's ``dropped`` and in the worker's health (``access_lines_dropped``).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import time
from pathlib import Path
from typing import Any

from roles.worker._access import AccessRecord
from roles.worker.apps._instance import AppInstance
from roles.worker.apps._manager import AppManager, AppSite
from roles.worker.apps._netns import AppPort, NetnsDialer
from roles.worker.apps._pool import UpstreamPool
from roles.worker.apps._sitelog import SiteLog
from roles.worker.apps._spec import AppSpec
from shared.errors import SitecloudError, Unavailable
from shared.logs import get_logger

__all__ = ["AppChannel", "RemoteApps", "RemoteInstance", "RemoteLog", "channel_path"]

_LIMIT = 1024 * 1024
REMOTE_IDLE = 16
# Seconds a serving process holds access lines before sending them as one message.
ACCESS_EVERY = 0.1
# Access lines a serving process holds (about this many bytes) while they cannot go; more are dropped.
ACCESS_HELD_BYTES = 4 * 1024 * 1024
# About what an access line takes besides its target, for that bound.
_RECORD_BYTES = 160
# One access message's bytes at most (well under the channel's line limit).
_BATCH_BYTES = 256 * 1024
# Bytes already waiting to go to the main process past which it counts as slow: lines wait here.
_SEND_BOUND = 1024 * 1024


def _volume(raw: object) -> str | None:
    return None if raw is None else str(raw)


def channel_path(manager_run_dir: Path) -> Path:
    return manager_run_dir / "serving.sock"


class AppChannel:
    """The main process's end: answers its serving processes for the apps it manages."""

    def __init__(self, manager: AppManager, processes: int = 1) -> None:
        self._manager = manager
        # How many serving processes share each app's connections (see ``max_open`` in _acquire).
        self._processes = max(1, processes)
        self._server: asyncio.AbstractServer | None = None
        self._tokens = itertools.count(1)
        self._conns: set[asyncio.Task[None]] = set()
        self._writers: set[asyncio.StreamWriter] = set()
        self._log = manager.log
        # Access lines the serving processes said they dropped, since start.
        self.access_dropped = 0

    @property
    def path(self) -> Path:
        return channel_path(self._manager.run_dir)

    async def start(self) -> None:
        self._manager.ensure_run_dir()
        self.path.unlink(missing_ok=True)
        self._server = await asyncio.start_unix_server(self._serve, path=str(self.path), limit=_LIMIT)
        self.path.chmod(0o600)

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
        # Closed rather than cancelled: each connection then ends as when its serving process goes.
        for writer in list(self._writers):
            writer.close()
        if self._conns:
            await asyncio.wait(self._conns, timeout=2)
        for task in list(self._conns):
            task.cancel()
        self.path.unlink(missing_ok=True)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._conns.add(task)
        self._writers.add(writer)
        # Requests under way for this serving process: ended by it, or here if it goes away.
        held: dict[int, tuple[AppSite, AppInstance]] = {}
        answering: set[asyncio.Task[None]] = set()
        try:
            while line := await reader.readline():
                try:
                    msg = json.loads(line)
                    op = msg["op"]
                except (ValueError, KeyError, TypeError):
                    self._log.warning("serving process sent something unreadable on the app channel")
                    return
                if op == "acquire":
                    t = asyncio.get_running_loop().create_task(self._acquire(msg, held, writer))
                    answering.add(t)
                    t.add_done_callback(answering.discard)
                elif op == "end":
                    found = held.pop(int(msg["token"]), None)
                    if found is not None:
                        self._manager.end(*found, answered=bool(msg.get("answered")))
                elif op == "access":
                    try:
                        self._access(msg)
                    except (ValueError, TypeError):
                        self._log.warning("serving process sent unreadable access lines; skipped them")
                elif op == "log":
                    app = self._manager.dynamic(str(msg.get("site", "")))
                    if app is not None:
                        self._manager.site_log(app).write(
                            str(msg.get("source", "worker")), str(msg.get("text", ""))
                        )
                elif op == "sites":
                    self._send(writer, {"id": msg.get("id"), "sites": self._sites()})
        except (ConnectionError, asyncio.IncompleteReadError, asyncio.LimitOverrunError):
            pass
        finally:
            for t in answering:
                t.cancel()
            for app, inst in held.values():
                self._manager.end(app, inst, answered=False)
            held.clear()
            writer.close()
            self._writers.discard(writer)
            self._conns.discard(task)

    def _access(self, msg: dict[str, Any]) -> None:
        """A serving process's batch of access lines, each into its site's log (static or app)."""
        logs: dict[str, SiteLog | None] = {}
        for site, second, line in msg.get("lines", ()):
            if site not in logs:
                logs[site] = self._manager.access_log(str(site))
            log = logs[site]
            if log is not None:
                log.access(str(line), at=int(second))
        dropped = int(msg.get("dropped") or 0)
        if dropped > 0:
            self.access_dropped += dropped
            self._log.warning(
                "a serving process dropped %s access line(s): this process did not take them in time", dropped
            )

    def _sites(self) -> dict[str, Any]:
        return {
            name: {
                "uid": app.content_id,
                "runtime": app.runtime,
                "root": app.root,
                "entry": app.entry,
                "version": app.version,
                "env": [list(pair) for pair in app.spec.env],
                "instance": app.instance.serial if app.instance is not None else None,
                "volume": app.volume,
                "web": app.web,
                "owner": app.owner,
            }
            for name, app in self._manager.sites().items()
        }

    async def _acquire(
        self, msg: dict[str, Any], held: dict[int, tuple[AppSite, AppInstance]], writer: asyncio.StreamWriter
    ) -> None:
        ident = msg.get("id")
        app = self._manager.dynamic(str(msg.get("site", "")))
        if app is None:
            self._send(writer, {"id": ident, "error": "the site has no app on this worker"})
            return
        try:
            inst = await self._manager.acquire(app)
        except SitecloudError as exc:
            retry = exc.retry_after if isinstance(exc, Unavailable) else None
            self._send(writer, {"id": ident, "error": exc.message, "retry_after": retry})
            return
        self._manager.begin(app, inst)
        token = next(self._tokens)
        held[token] = (app, inst)
        kind, address = inst.address
        # An app whose workers each hold one connection while it is open (php-cgi's children) is
        # shared out: a serving process that kept every child's connection idle would leave the
        # others' requests waiting for a child (2 children, 2 processes: a PHP hello site answered
        # 2.6k req/s so, 4.0k shared out, 6.6k with one process).
        limit = inst.pool.max_open
        share = None if limit is None else max(1, limit // self._processes)
        self._send(
            writer,
            {
                "id": ident,
                "token": token,
                "instance": inst.serial,
                "address": [kind, address],
                "served": inst.served,
                "volume": app.volume,
                "max_open": share,
            },
        )

    @staticmethod
    def _send(writer: asyncio.StreamWriter, msg: dict[str, Any]) -> None:
        if not writer.is_closing():
            writer.write(json.dumps(msg).encode() + b"\n")


class RemoteInstance:
    """What a serving process knows of an app instance: where it listens, and its kept connections."""

    def __init__(
        self,
        serial: str,
        address: tuple[str, str],
        netns: AppPort | None = None,
        *,
        max_open: int | None = None,
    ) -> None:
        self.serial = serial
        self.address = address
        # The sandboxed app's port, entered by this process's own dialer.
        self.netns = netns
        self.served = False
        # Not told by the main process: a serving process's app answers are not kept by front ends.
        self.version_line = b""
        # Fewer than the main process keeps: several serving processes each keep theirs, and every
        # kept connection is an open file of the app's.
        self.pool = UpstreamPool(REMOTE_IDLE, max_open=max_open)
        # The main process's count of this request (sent back with ``end``).
        self.token = 0

    def close(self) -> None:
        self.pool.close()
        if self.netns is not None:
            self.netns.close()


class RemoteLog:
    """A site log as a serving process writes it: each line to the main process."""

    def __init__(self, apps: RemoteApps, site: str) -> None:
        self._apps = apps
        self._site = site

    def write(self, source: str, text: str) -> None:
        self._apps.tell({"op": "log", "site": self._site, "source": source, "text": text})

    def access(self, text: str | AccessRecord) -> None:
        self._apps.access(self._site, text)


class RemoteApps:
    """A serving process's end: the app manager's request-path methods, answered by the main process."""

    def __init__(self, path: Path, *, held_bytes: int = ACCESS_HELD_BYTES) -> None:
        self._path = path
        self._held_max = held_bytes
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None
        self._ids = itertools.count(1)
        self._waiting: dict[int, asyncio.Future[dict[str, Any]]] = {}
        self._reading: asyncio.Task[None] | None = None
        self._sites: dict[str, AppSite] = {}
        # Instances by the main process's serial, so their kept connections outlive one request.
        self._instances: dict[str, RemoteInstance] = {}
        # Made on the first sandboxed app's port this process connects to.
        self._dialer: NetnsDialer | None = None
        self._lock = asyncio.Lock()
        self._log = get_logger("worker")
        # Access lines waiting for their batch: (site, second, line), and about their bytes.
        self._held: list[tuple[str, int, str | AccessRecord]] = []
        self._held_bytes = 0
        self._sending: asyncio.TimerHandle | None = None
        self._connecting: asyncio.Task[None] | None = None
        # Lines dropped and not yet told to the main process.
        self._dropped = 0

    # -- what the proxy asks

    @property
    def active(self) -> bool:
        return bool(self._sites)

    def dynamic(self, site: str) -> AppSite | None:
        return self._sites.get(site)

    def running(self, app: AppSite) -> RemoteInstance | None:
        return None  # the main process has the apps: each request asks it

    async def acquire(self, app: AppSite) -> RemoteInstance:
        answer = await self._ask({"op": "acquire", "site": app.name})
        if "error" in answer:
            retry = answer.get("retry_after")
            raise Unavailable(str(answer["error"]), retry_after=retry if isinstance(retry, int) else None)
        serial = str(answer["instance"])
        kind, address = answer["address"]
        inst = self._instances.get(serial)
        if inst is None:
            netns = None
            if kind == "netns":
                if self._dialer is None:
                    self._dialer = NetnsDialer()
                try:
                    netns = AppPort.join(self._dialer, str(address))
                except OSError as exc:
                    raise Unavailable(f"cannot reach the site's app: {exc}") from None
            limit = answer.get("max_open")
            inst = self._instances[serial] = RemoteInstance(
                serial, (str(kind), str(address)), netns, max_open=int(limit) if limit else None
            )
        inst.served = bool(answer["served"])
        app.volume = _volume(answer.get("volume"))
        inst.token = int(answer["token"])
        return inst

    def begin(self, app: AppSite, inst: RemoteInstance) -> None:
        """Counted by the main process when it answered ``acquire``."""

    def end(self, app: AppSite, inst: RemoteInstance, *, answered: bool) -> None:
        self.tell({"op": "end", "token": inst.token, "answered": answered})

    def site_log(self, app: AppSite) -> RemoteLog:
        return self.log_of(app.name)

    def log_of(self, site: str) -> RemoteLog:
        """Any site's log as this process writes to it (static sites' access lines too)."""
        return RemoteLog(self, site)

    # -- access lines, batched

    def access(self, site: str, text: str | AccessRecord) -> None:
        """Held for the next batch: no write on the request's path."""
        size = _RECORD_BYTES + len(text.target if isinstance(text, AccessRecord) else text)
        if self._held_bytes + size > self._held_max:
            if not self._dropped:
                self._log.warning("dropping access lines: the main process is not taking them")
            self._dropped += 1
        else:
            self._held.append((site, int(time.time()), text))
            self._held_bytes += size
        if self._sending is None:
            self._sending = asyncio.get_running_loop().call_later(ACCESS_EVERY, self._send_access)

    def _send_access(self, *, last: bool = False) -> None:
        if self._sending is not None:
            self._sending.cancel()
            self._sending = None
        if not self._held and not self._dropped:
            return
        writer = self._writer
        if writer is None or writer.is_closing():
            # The main process is away (its channel restarting): connect again, lines wait.
            if not last and (self._connecting is None or self._connecting.done()):
                self._connecting = asyncio.get_running_loop().create_task(self._reconnect())
        elif last or writer.transport.get_write_buffer_size() <= _SEND_BOUND:
            held, self._held, self._held_bytes = self._held, [], 0
            batch: list[tuple[str, int, str]] = []
            size = 0
            for site, second, text in held:
                line = text.line() if isinstance(text, AccessRecord) else text
                batch.append((site, second, line))
                size += len(line) + len(site) + 16
                if size > _BATCH_BYTES:
                    self.tell({"op": "access", "lines": batch})
                    batch, size = [], 0
            self.tell({"op": "access", "lines": batch, "dropped": self._dropped})
            self._dropped = 0
            return
        if not last:
            self._sending = asyncio.get_running_loop().call_later(ACCESS_EVERY, self._send_access)
        elif self._held:
            self._log.warning("%s access line(s) not sent: the main process is away", len(self._held))

    async def _reconnect(self) -> None:
        try:
            await self._connect()
        except OSError:
            return  # tried again with the next batch
        self._send_access()

    # -- the table of dynamic sites

    async def reload(self) -> None:
        """The dynamic sites as the main process has them now (after each handover)."""
        answer = await self._ask({"op": "sites"})
        fresh: dict[str, AppSite] = {}
        for name, raw in answer.get("sites", {}).items():
            app = AppSite(name, str(raw["uid"]))
            app.runtime = raw["runtime"]
            app.root, app.entry, app.version = str(raw["root"]), str(raw["entry"]), int(raw["version"])
            app.spec = AppSpec(env=tuple((str(k), str(v)) for k, v in raw["env"]))
            app.volume = _volume(raw.get("volume"))
            app.web = str(raw.get("web", ""))
            app.owner = str(raw.get("owner") or app.owner)
            fresh[name] = app
        self._sites = fresh
        # Kept connections to instances that are no longer current go (those busy close as they end).
        live = {str(raw["instance"]) for raw in answer.get("sites", {}).values() if raw.get("instance")}
        self.forget(live)

    def forget(self, live: set[str]) -> None:
        for serial in self._instances.keys() - live:
            self._instances.pop(serial).close()

    # -- the channel

    async def close(self) -> None:
        self._send_access(last=True)
        if self._writer is not None and not self._writer.is_closing():
            with contextlib.suppress(OSError, TimeoutError):
                await asyncio.wait_for(self._writer.drain(), 2)
        if self._connecting is not None:
            self._connecting.cancel()
        if self._reading is not None:
            self._reading.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._reading
        if self._writer is not None:
            self._writer.close()
        for inst in self._instances.values():
            inst.close()
        if self._dialer is not None:
            self._dialer.close()
            self._dialer = None

    def tell(self, msg: dict[str, Any]) -> None:
        writer = self._writer
        if writer is not None and not writer.is_closing():
            writer.write(json.dumps(msg).encode() + b"\n")

    async def _connect(self) -> None:
        async with self._lock:
            if self._writer is not None and not self._writer.is_closing():
                return
            self._reader, self._writer = await asyncio.open_unix_connection(str(self._path), limit=_LIMIT)
            self._reading = asyncio.get_running_loop().create_task(self._read(self._reader))

    async def _ask(self, msg: dict[str, Any]) -> dict[str, Any]:
        try:
            await self._connect()
        except OSError as exc:
            raise Unavailable(f"the worker's main process does not answer for apps ({exc})") from exc
        ident = next(self._ids)
        future: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self._waiting[ident] = future
        self.tell({**msg, "id": ident})
        try:
            return await future
        finally:
            self._waiting.pop(ident, None)

    async def _read(self, reader: asyncio.StreamReader) -> None:
        try:
            while line := await reader.readline():
                answer = json.loads(line)
                future = self._waiting.get(int(answer.get("id") or 0))
                if future is not None and not future.done():
                    future.set_result(answer)
        except (ConnectionError, ValueError, asyncio.LimitOverrunError):
            pass
        finally:
            # The main process went (a restart): what waited fails, the next ask connects again.
            for future in self._waiting.values():
                if not future.done():
                    future.set_exception(Unavailable("the worker's main process went away"))
            if self._writer is not None:
                self._writer.close()
