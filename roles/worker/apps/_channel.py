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
``end``, ``log`` and ``access`` (lines for the site's log).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
from pathlib import Path
from typing import Any

from roles.worker._access import AccessRecord
from roles.worker.apps._instance import AppInstance
from roles.worker.apps._manager import AppManager, AppSite
from roles.worker.apps._pool import UpstreamPool
from roles.worker.apps._spec import AppSpec
from shared.errors import SitecloudError, Unavailable
from shared.logs import get_logger

__all__ = ["AppChannel", "RemoteApps", "RemoteInstance", "channel_path"]

_LIMIT = 1024 * 1024
REMOTE_IDLE = 16


def channel_path(manager_run_dir: Path) -> Path:
    return manager_run_dir / "serving.sock"


class AppChannel:
    """The main process's end: answers its serving processes for the apps it manages."""

    def __init__(self, manager: AppManager) -> None:
        self._manager = manager
        self._server: asyncio.AbstractServer | None = None
        self._tokens = itertools.count(1)
        self._conns: set[asyncio.Task[None]] = set()
        self._log = manager.log

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
        for task in list(self._conns):
            task.cancel()
        if self._conns:
            await asyncio.wait(self._conns, timeout=2)
        self.path.unlink(missing_ok=True)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._conns.add(task)
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
                elif op in ("log", "access"):
                    app = self._manager.dynamic(str(msg.get("site", "")))
                    if app is not None:
                        log = self._manager.site_log(app)
                        if op == "access":
                            log.access(str(msg.get("text", "")))
                        else:
                            log.write(str(msg.get("source", "worker")), str(msg.get("text", "")))
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
            self._conns.discard(task)

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
            self._send(writer, {"id": ident, "error": exc.message})
            return
        self._manager.begin(app, inst)
        token = next(self._tokens)
        held[token] = (app, inst)
        kind, address = inst.address
        self._send(
            writer,
            {
                "id": ident,
                "token": token,
                "instance": inst.serial,
                "address": [kind, address],
                "served": inst.served,
            },
        )

    @staticmethod
    def _send(writer: asyncio.StreamWriter, msg: dict[str, Any]) -> None:
        if not writer.is_closing():
            writer.write(json.dumps(msg).encode() + b"\n")


class RemoteInstance:
    """What a serving process knows of an app instance: where it listens, and its kept connections."""

    def __init__(self, serial: str, address: tuple[str, str]) -> None:
        self.serial = serial
        self.address = address
        self.served = False
        # Fewer than the main process keeps: several serving processes each keep theirs, and every
        # kept connection is an open file of the app's.
        self.pool = UpstreamPool(REMOTE_IDLE)
        # The main process's count of this request (sent back with ``end``).
        self.token = 0


class RemoteLog:
    """A site log as a serving process writes it: each line to the main process."""

    def __init__(self, apps: RemoteApps, site: str) -> None:
        self._apps = apps
        self._site = site

    def write(self, source: str, text: str) -> None:
        self._apps.tell({"op": "log", "site": self._site, "source": source, "text": text})

    def access(self, text: str | AccessRecord) -> None:
        line = text.line() if isinstance(text, AccessRecord) else text
        self._apps.tell({"op": "access", "site": self._site, "text": line})


class RemoteApps:
    """A serving process's end: the app manager's request-path methods, answered by the main process."""

    def __init__(self, path: Path) -> None:
        self._path = path
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None
        self._ids = itertools.count(1)
        self._waiting: dict[int, asyncio.Future[dict[str, Any]]] = {}
        self._reading: asyncio.Task[None] | None = None
        self._sites: dict[str, AppSite] = {}
        # Instances by the main process's serial, so their kept connections outlive one request.
        self._instances: dict[str, RemoteInstance] = {}
        self._lock = asyncio.Lock()
        self._log = get_logger("worker")

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
            raise Unavailable(str(answer["error"]))
        serial = str(answer["instance"])
        kind, address = answer["address"]
        inst = self._instances.get(serial)
        if inst is None:
            inst = self._instances[serial] = RemoteInstance(serial, (str(kind), str(address)))
        inst.served = bool(answer["served"])
        inst.token = int(answer["token"])
        return inst

    def begin(self, app: AppSite, inst: RemoteInstance) -> None:
        """Counted by the main process when it answered ``acquire``."""

    def end(self, app: AppSite, inst: RemoteInstance, *, answered: bool) -> None:
        self.tell({"op": "end", "token": inst.token, "answered": answered})

    def site_log(self, app: AppSite) -> RemoteLog:
        return RemoteLog(self, app.name)

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
            fresh[name] = app
        self._sites = fresh
        # Kept connections to instances that are no longer current go (those busy close as they end).
        live = {str(raw["instance"]) for raw in answer.get("sites", {}).values() if raw.get("instance")}
        self.forget(live)

    def forget(self, live: set[str]) -> None:
        for serial in self._instances.keys() - live:
            self._instances.pop(serial).pool.close()

    # -- the channel

    async def close(self) -> None:
        if self._reading is not None:
            self._reading.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._reading
        if self._writer is not None:
            self._writer.close()
        for inst in self._instances.values():
            inst.pool.close()

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
