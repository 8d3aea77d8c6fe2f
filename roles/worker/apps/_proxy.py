"""Requests for a dynamic site, diverted from the data server to the site's app.

The data server's connection (``roles/worker/_http.py``) asks :class:`AppProxy` once a request's head
is in. A static site, or a path of a Python or PHP site that maps to a file other than app source,
stays on the static path (``None``); a Procfile site's app answers every path. Anything else becomes an :class:`AppExchange`: it wakes the app at once
(while the body is still arriving), reads the body whole (bounded), sends the request, and frames the
app's answer for the front end (its length, or chunked) in the connection's turn. A body longer than
:data:`STREAM_BODY_AFTER` (by its Content-Length) is not read whole: it goes to the app as it arrives,
on a connection of its own, and the visitor's connection stops reading while the app cannot take more.
A body that gives no length (chunked) and grows past it is kept in an unnamed file in the worker's
home instead of its memory (apps need the length first: php-cgi, our app server), and goes on from
there once whole.

A WebSocket (``Upgrade: websocket``) goes on as an upgrade to apps that can take one (Python's ASGI
apps, through our app server; ``command`` and ``node`` apps, straight to their port): when the app says
101, the exchange becomes a tunnel that passes bytes both ways, unparsed, until either side closes.
A WSGI or PHP app cannot switch protocols: it answers the request as plain HTTP.
"""

from __future__ import annotations

import asyncio
import os
import tempfile
import time
from collections.abc import Callable
from typing import IO, TYPE_CHECKING, BinaryIO, Generic, Protocol, TypeVar
from urllib.parse import unquote_to_bytes

import httptools

from roles.worker._access import LOGGED_HEADERS, AccessRecord
from roles.worker._cache import version_line, version_tag
from roles.worker._http import http_date
from roles.worker._source import is_never_served
from roles.worker._static import FileHit, Redirect, inside_web, resolve, send_file
from roles.worker.apps._fastcgi import (
    STDIN_END,
    FastCgiUpstream,
    encode_params,
    encode_request,
    encode_request_head,
    stdin,
)
from roles.worker.apps._head import is_platform_field
from roles.worker.apps._manager import AppSite
from roles.worker.apps._netns import AppPort
from roles.worker.apps._php import fixed_params, php_script, request_pairs
from roles.worker.apps._pool import UpstreamPool
from roles.worker.apps._tenancy import Spool, spool_victims
from roles.worker.apps._upstream import HttpUpstream, UpstreamBase
from roles.worker.apps._written import open_written
from roles.worker.config import WorkerConfig
from shared.errors import InvalidInput, SitecloudError, Unavailable
from shared.logs import get_logger
from shared.pages import REASONS, error_page
from shared.paths import site_relpath

if TYPE_CHECKING:
    from roles.worker._http import HttpConnection

__all__ = ["AppBackend", "AppExchange", "AppProxy"]

# Not forwarded to the app: hop-by-hop fields (RFC 9110 section 7.6.1) and the framing we redo (the
# body goes on whole, with its length); nor the platform's own (is_platform_field).
_REQUEST_DROP = frozenset(
    {
        b"connection", b"keep-alive", b"proxy-connection", b"te", b"trailer", b"transfer-encoding",
        b"upgrade", b"expect", b"content-length",
    }
)  # fmt: skip
_RESPONSE_DROP = frozenset(
    {b"connection", b"keep-alive", b"proxy-connection", b"transfer-encoding", b"upgrade", b"trailer"}
)
# A 1xx or 204 has no content and must not carry a Content-Length (RFC 9110 section 8.6): a visitor
# could wait for the bytes it names. A 304's stays, as 8.6 allows (the length a 200 would have had;
# a 304 has no content whatever it says, RFC 9112 section 6.3).
_NO_CONTENT_DROP = _RESPONSE_DROP | {b"content-length"}
# A 101 answer keeps its Upgrade field (RFC 9110 section 7.8); its framing fields mean nothing.
_SWITCH_DROP = frozenset(
    {b"connection", b"keep-alive", b"proxy-connection", b"content-length", b"transfer-encoding"}
)
# Runtimes whose app can take an upgrade.
_UPGRADABLE = frozenset({"python", "command", "node"})
# Answer bytes buffered before the connection's turn comes (pipelining) before the app is paused.
MAX_PENDING = 1024 * 1024
# A body longer than this (by its Content-Length) streams to the app instead of being read whole
# first; at most about this much of it is held while the app's connection opens.
STREAM_BODY_AFTER = 1024 * 1024
# A spooled body goes to the app in pieces of this size, as fast as it takes them.
SPOOL_CHUNK = 256 * 1024
# Paths remembered as static or not (a few hundred bytes each); forgotten all at once beyond this.
STATIC_MEMO = 8192


class Target(Protocol):
    """An app instance as the proxy talks to it."""

    served: bool
    pool: UpstreamPool
    # The content version its code was loaded from, as the line a front end may keep an answer by;
    # b"" when unknown (then no answer of it is kept).
    version_line: bytes
    # Its port in its own network namespace, for a sandboxed app that listens on one.
    netns: AppPort | None

    @property
    def address(self) -> tuple[str, str]: ...


class LogSink(Protocol):
    def write(self, source: str, text: str) -> None: ...
    def access(self, text: str | AccessRecord) -> None: ...


T = TypeVar("T", bound=Target)


class AppBackend(Protocol[T]):
    """Who has the apps: the app manager in the worker's main process, or (in a serving process)
    the channel to it (``_channel.py``)."""

    @property
    def active(self) -> bool: ...
    def dynamic(self, site: str) -> AppSite | None: ...
    async def acquire(self, app: AppSite) -> T: ...
    def running(self, app: AppSite) -> T | None:
        """The site's running instance, if it has one that can take a request now."""
        ...

    def begin(self, app: AppSite, inst: T) -> None: ...
    def end(self, app: AppSite, inst: T, *, answered: bool) -> None: ...
    def site_log(self, app: AppSite) -> LogSink: ...


class AppProxy(Generic[T]):
    """The data server's divert hook: ``proxy(method, url, wanted, headers, keep_alive)``."""

    def __init__(self, config: WorkerConfig, manager: AppBackend[T]) -> None:
        self.config = config
        self.manager = manager
        self.log = get_logger("worker", host=config.host)
        # (version root, path, trailing slash) → whether a static file answers it.
        self._static: dict[tuple[str, int, str, bool], bool] = {}
        self._scripts: dict[tuple[str, int, str, str], tuple[str, str, str] | None] = {}
        # A PHP site's fixed CGI variables, encoded: (the spec and root they are of, the bytes).
        self._fixed: dict[str, tuple[object, str, bytes]] = {}
        # Bytes of chunked request bodies in spool files now, all sites' (bounded by app_spool_total),
        # and the exchanges that hold them (shared out per subscription: spool_room).
        self.spooled = 0
        self.spools: set[AppExchange[T]] = set()

    @property
    def active(self) -> bool:
        return self.manager.active

    def takes(self, url: bytes, wanted: dict[bytes, bytes]) -> bool:
        return self._route(b"GET", url, wanted) is not None

    def __call__(
        self,
        method: bytes,
        url: bytes,
        wanted: dict[bytes, bytes],
        headers: list[tuple[bytes, bytes]],
        keep_alive: bool,
        conn: HttpConnection,
    ) -> AppExchange[T] | None:
        route = self._route(method, url, wanted)
        if route is None:
            return None
        app, rel = route
        upgrade = app.runtime in _UPGRADABLE and method == b"GET" and _websocket(headers)
        return AppExchange(self, app, method, url, headers, keep_alive, rel, conn, upgrade=upgrade)

    def _route(self, method: bytes, url: bytes, wanted: dict[bytes, bytes]) -> tuple[AppSite, str] | None:
        """The app and path a request goes to; None when the static server answers it."""
        site = wanted.get(b"x-sitecloud-site")
        if site is None:
            return None
        app = self.manager.dynamic(site.decode("latin-1").strip())
        if app is None:
            return None
        try:
            path = unquote_to_bytes(httptools.parse_url(url).path or b"/").decode("utf-8")
            rel = site_relpath(path)
        except (httptools.HttpParserInvalidURLError, UnicodeDecodeError, InvalidInput):
            return None  # the static path answers 400
        static = method in (b"GET", b"HEAD") and serves_raw(app.runtime, rel)
        if static and self._static_file(app.root, app.version, rel, slash=path.endswith("/"), web=app.web):
            return None
        return app, rel

    def php_script(self, app: AppSite, rel: str) -> tuple[str, str, str] | None:
        """The script that answers ``rel`` (see :func:`php_script`) in the site's web root,
        remembered per version."""
        root, version, entry = _docroot(app), app.version, app.entry
        key = (root, version, rel, entry)
        if key in self._scripts:
            return self._scripts[key]
        if len(self._scripts) >= STATIC_MEMO:
            self._scripts.clear()
        found = self._scripts[key] = php_script(root, rel, entry)
        return found

    def fixed_params(self, app: AppSite) -> bytes:
        """The CGI variables every request of this PHP site sends, encoded once per spec and root."""
        held, docroot = self._fixed.get(app.name), _docroot(app)
        if held is not None and held[0] is app.spec and held[1] == docroot:
            return held[2]
        pairs = encode_params(fixed_params(docroot, app.spec.env))
        if len(self._fixed) >= STATIC_MEMO:
            self._fixed.clear()
        self._fixed[app.name] = (app.spec, docroot, pairs)
        return pairs

    def spool_room(self, exchange: AppExchange[T], size: int) -> bool:
        """Whether ``exchange`` may spool ``size`` more bytes; to make room, the unfinished bodies of a
        subscription over its share of app_spool_total are dropped (see spool_victims)."""
        if self.spooled + size <= self.config.app_spool_total:
            return True  # the usual case, on every piece of a body: no look at the others
        held = [Spool(e, e.owner, e.spooled, e.spool_droppable) for e in self.spools]
        victims = spool_victims(held, exchange.owner, size, self.config.app_spool_total)
        if victims is None:
            return False
        for victim in victims:
            victim.spool_dropped(
                "its subscription holds more than its share of the worker's disk for request bodies "
                "(app_spool_total) and another needs room"
            )
        return True

    def _static_file(self, root: str, version: int, rel: str, *, slash: bool, web: str) -> bool:
        """Whether the static server answers this path; remembered per version number, not per root:
        changes made file by file are applied in place, under the same root, as a new number."""
        key = (root, version, rel, slash)
        found = self._static.get(key)
        if found is None:
            if len(self._static) >= STATIC_MEMO:
                self._static.clear()
            found = self._static[key] = _static_file(root, rel, slash=slash, web=web)
        return found


def _mounted_or_none(volume: str) -> bool:
    """Whether a look at ``volume`` (a site's, "" when this worker has none) was a whole answer."""
    return not volume or os.path.ismount(volume)


def _websocket(headers: list[tuple[bytes, bytes]]) -> bool:
    """Whether the request asks for a WebSocket (RFC 6455 section 4.1: Upgrade and Connection)."""
    upgrade = connection = False
    for key, value in headers:
        name = key.lower()
        if name == b"upgrade":
            upgrade = upgrade or b"websocket" in value.lower()
        elif name == b"connection":
            connection = connection or b"upgrade" in value.lower()
    return upgrade and connection


def _content_length(headers: list[tuple[bytes, bytes]]) -> int | None:
    """A request body's length as its head gives it; None when it gives none, or it comes chunked."""
    length = None
    for key, value in headers:
        name = key.lower()
        if name == b"transfer-encoding":
            return None
        if name == b"content-length":
            value = value.strip()
            if not value.isdigit():
                return None
            length = int(value)
    return length


def _byte_count(n: int) -> str:
    """A size as a limit reads best: "32 MiB", "1500 bytes"."""
    for unit, size in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= size and n % size == 0:
            return f"{n // size} {unit}"
    return f"{n} bytes"


def _docroot(app: AppSite) -> str:
    """The folder of the site's version that visitors see (its web root: DOCUMENT_ROOT for PHP)."""
    return f"{app.root}/{app.web}" if app.web else app.root


# A Python app owns its paths, as Flask, Django and FastAPI apps do on every other host: the worker
# serves raw only the folders such apps serve files from (Flask's static/, Django's usual STATIC_URL
# and MEDIA_URL, the uploads/ folder of Flask's upload recipe) and the well-known files. So no config.json, settings.ini, client_secret.json or
# template beside the code is ever served, and no file shadows one of the app's routes. A PHP site is
# served as Apache serves one: any file but its source and secrets (roles/worker/_source.py). A
# Procfile or Node app answers every path itself: its source is in languages the worker cannot know
# (server.js, config.ru, main.go).
_PYTHON_RAW_FOLDERS = ("static/", "media/", "uploads/", ".well-known/")
_PYTHON_RAW_FILES = frozenset({"favicon.ico", "robots.txt"})


def serves_raw(runtime: str, rel: str) -> bool:
    """Whether the worker serves the version's file (or one the app wrote) at ``rel`` itself, rather
    than the app; ``rel`` as :func:`shared.paths.site_relpath` gives it."""
    if runtime == "php":
        return True
    if runtime == "python":
        return rel.startswith(_PYTHON_RAW_FOLDERS) or rel in _PYTHON_RAW_FILES
    return False


def _static_file(root: str, rel: str, *, slash: bool, web: str) -> bool:
    found = resolve(root, rel, slash=slash, web=web)
    if isinstance(found, FileHit):
        return not is_never_served(found.path[len(root) + 1 :])
    return isinstance(found, Redirect)


class AppExchange(Generic[T]):
    """One request to an app and its answer; the connection calls body/end/answer/resume/abort."""

    def __init__(
        self,
        proxy: AppProxy[T],
        app: AppSite,
        method: bytes,
        target: bytes,
        headers: list[tuple[bytes, bytes]],
        keep_alive: bool,
        rel: str,
        reader: HttpConnection,
        *,
        upgrade: bool = False,
    ) -> None:
        self._proxy = proxy
        self._app = app
        self._method = method
        self._target = target
        self._headers = headers
        self._rel = rel
        self._keep = keep_alive
        self._loop = asyncio.get_running_loop()
        self._body: list[bytes] = []
        self._size = 0
        declared = _content_length(headers)
        self._declared = declared or 0
        # Known from the head: nothing of the body is kept, and the answer is 413.
        self._too_large = declared is not None and declared > proxy.config.app_max_body
        # The visitor's connection, whose reading a streaming body holds back (body_reading).
        self._reader = reader
        # A long body streams: held until the app's connection opens (_piping), then written to it
        # piece by piece, until it ends or the app takes no more of it (_pipe_over: the rest is dropped).
        self._streams = (
            not upgrade and not self._too_large and declared is not None and declared > STREAM_BODY_AFTER
        )
        self._piping = False
        self._pipe_over = False
        self._holding = False
        self._body_ended = False
        self._fastcgi = False
        # A chunked body past STREAM_BODY_AFTER: on disk, then piped from there (_pump_spool) while
        # the app's socket has room (_app_full). None again once sent or dropped.
        self._spool: IO[bytes] | None = None
        self.spooled = 0  # bytes written to it, counted in the proxy's spooled
        self._spool_failed = ""
        self._app_full = False
        # Awaited on the task path only (a warm request is sent from :meth:`end`).
        self._body_done: asyncio.Future[None] | None = None
        self._conn: HttpConnection | None = None
        # A PHP answer's content version (its script's); other runtimes' is their instance's.
        self._php_version = b""
        self._head: bytes | None = None
        self._head_written = False
        self._out: list[bytes] = []
        self._pending = 0
        self._chunked = False
        # A chunked answer's bytes since its last chunk went out: one chunk per write to the front
        # end, however small the app's own chunks (each would cost the front end a parse and a write).
        self._raw: list[bytes] = []
        # The app gave no length: chosen as the head goes out (its length if the whole answer is in
        # hand by then, else chunked).
        self._unframed = False
        self._bodyless = method == b"HEAD"
        self._status = 0
        self._sent = 0
        # What is left of the Content-Length the app's head gave (None: it gave none). The worker's
        # connection to the front end carries other sites' answers next: a byte past it would be
        # read there as the answer to another site's request, so it is never sent, and an answer
        # that ends short of it cuts that connection (FastCGI, unlike HTTP, frames no body).
        self._answer_left: int | None = None
        self._finished = False
        self._broken = False
        self._closed = False
        self._upstream: UpstreamBase | None = None
        # A WebSocket: asked for, then (after the app's 101) a tunnel; the visitor's bytes that came
        # before the tunnel opened wait here.
        self._upgrade = upgrade
        self._tunnel = False
        self._early: list[bytes] = []
        self._batching = False
        self._inst: T | None = None
        # The request sent on a kept connection, should it have to go again on a new one.
        self._retry: Callable[[], UpstreamBase] | None = None
        # A request the app never read may go again this many times (each child it was sent behind
        # may die before reading it), and no more: an app that dies on every request ends it.
        self._resends_left = 3
        # The request as sent to the app (should it go again) and whether it is a HEAD.
        self._request = b""
        self._head_only = False
        self._reconnect: asyncio.Task[None] | None = None
        self._opening: asyncio.Task[None] | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._t0 = time.monotonic()
        self._task: asyncio.Task[None] | None = None
        # A running app and the request's script: the request goes to it from :meth:`end`, in this
        # turn, with no task and no wait (a warm request's usual way).
        self._ready: T | None = None
        self._script: tuple[str, str, str] | None = None
        # A GET of a path the version has no file for may name one the app wrote (_written.py).
        self._written: tuple[BinaryIO, FileHit] | None = None
        self._look_written = False
        if self._too_large:
            return  # refused by the connection at once (refusal): no app wakes for it
        self._look_written = (
            not upgrade
            and method in (b"GET", b"HEAD")
            and serves_raw(app.runtime, rel)
            and rel != ""
            and not target.partition(b"?")[0].endswith(b"/")
        )
        if self._look_written and app.volume:
            self._written = open_written(app.volume, inside_web(app.web, rel))
            if self._written is not None:
                return  # answered from the file once the connection hands over (answer)
        inst = proxy.manager.running(app)
        if app.runtime == "php" and inst is not None:
            self._script = proxy.php_script(app, rel)
            self._php_version = version_line(version_tag(app.content_id, app.version))
            if self._script is None:
                inst = None  # the task path answers 404
        if inst is None:
            self._body_done = self._loop.create_future()
            self._task = self._loop.create_task(self._run())
        else:
            self._ready = self._inst = inst
            proxy.manager.begin(app, inst)
            if self._streams:
                self._ready = None
                self._send_now(inst)

    # -- the connection's side

    @property
    def refusal(self) -> str | None:
        if not self._too_large:
            return None
        limit = _byte_count(self._proxy.config.app_max_body)
        return f"The request's body is larger than this site accepts ({limit})."

    def refused(self) -> None:
        self._status = 413  # for its access line
        self.abort()

    def body(self, data: bytes) -> None:
        if self._too_large or self._pipe_over:
            return
        if self._piping:
            self._pipe(data)
            return
        self._size += len(data)
        if self._size > self._proxy.config.app_max_body:
            self._too_large = True
            self._body = []
            self._close_spool()
            return
        if self._spool is not None:
            self._spool_write([data])
            return
        if self._spool_failed:
            return
        self._body.append(data)
        if self._size > STREAM_BODY_AFTER:
            if self._streams:
                self._hold(True)  # the app's connection is not open yet
            else:
                self._spill()

    def end(self) -> None:
        self._body_ended = True
        done = self._body_done
        if done is not None and not done.done():
            done.set_result(None)
        if self._streams:
            self._hold(False)  # paused as the read that ended it was parsed
            if self._piping and not self._pipe_over:
                self._end_pipe()
            # The app has the whole request only now: its time to answer starts here.
            if self._inst is not None and self._upstream is not None and self._head is None:
                self._arm(self._inst)
            return
        inst, self._ready = self._ready, None
        if inst is not None and not self._closed:
            self._send_now(inst)

    def _send_now(self, inst: T) -> None:
        try:
            self._send(inst, self._script)
        except Exception:
            self._proxy.log.bind(site=self._app.name).exception("app request failed")
            self.upstream_failed("the worker failed to pass the request on")

    def answer(self, conn: HttpConnection, keep_alive: bool) -> None:
        self._conn = conn
        self._keep = self._keep and keep_alive
        if self._written is not None:
            self._send_written()
            return
        self._flush()

    def resume(self) -> None:
        if self._upstream is not None and not self._finished:
            self._upstream.resume()

    @property
    def upgrading(self) -> bool:
        """Whether this request goes to the app as an upgrade (the connection then stops parsing)."""
        return self._upgrade

    def tunnel_in(self, data: bytes) -> None:
        """The visitor's bytes after an upgrade request: to the app once it has said 101."""
        upstream = self._upstream
        if self._tunnel and isinstance(upstream, HttpUpstream):
            upstream.send(data)
        elif not self._closed:
            self._early.append(data)

    def abort(self) -> None:
        """The front end's connection went away: drop the app request too."""
        self._conn = None
        written, self._written = self._written, None
        if written is not None:
            written[0].close()
        if not self._closed:
            self._closed = True
            self._ready = None
            self._stop_pipe()
            if self._task is not None:
                self._task.cancel()
            if self._upstream is not None:
                self._upstream.abandon(self)
            self._release(answered=False)

    # -- the app's side

    async def _run(self) -> None:
        try:
            await self._exchange()
        except Exception:
            self._proxy.log.bind(site=self._app.name).exception("app request failed")
            self.upstream_failed("the worker failed to pass the request on")

    async def _exchange(self) -> None:
        app, manager = self._app, self._proxy.manager
        script = None
        # Whether the app's files still need a look once it runs (its volume mounts as it starts).
        look = self._look_written and not (app.volume is not None and _mounted_or_none(app.volume))
        if app.runtime == "php":
            script = self._proxy.php_script(app, self._rel)
            self._php_version = version_line(version_tag(app.content_id, app.version))
            if script is None and not look:
                self._error(404, "Not found", "Nothing is published at this address.")
                return
        try:
            inst = await manager.acquire(app)
        except SitecloudError as exc:
            retry = exc.retry_after if isinstance(exc, Unavailable) and exc.retry_after else 1
            self._error(503, "This site is not answering", exc.message, retry=retry)
            return
        if look and app.volume:
            self._written = open_written(app.volume, inside_web(app.web, self._rel))
            if self._written is not None:
                # The app was only woken for the look: it counts as used, not as serving this.
                manager.begin(app, inst)
                manager.end(app, inst, answered=False)
                if self._conn is not None:
                    self._send_written()
                return
        self._inst = inst
        manager.begin(app, inst)
        if app.runtime == "php" and script is None:
            self._error(404, "Not found", "Nothing is published at this address.")
            return
        assert self._body_done is not None
        if not self._streams:
            await self._body_done
        self._send(inst, script)

    def _send(self, inst: T, script: tuple[str, str, str] | None) -> None:
        """The request to the app, once its body is whole: on a kept connection, behind another's
        request, or (waiting for one to come back or) on a new connection."""
        app = self._app
        if self._too_large:
            self._keep = False
            limit = _byte_count(self._proxy.config.app_max_body)
            self._error(413, "Too large", f"The request's body is larger than this site accepts ({limit}).")
            return
        if self._spool_failed:
            self._keep = False
            self._error(
                503, "This site is not answering", "The worker could not hold the request's body.", retry=5
            )
            return
        body = b"".join(self._body)
        self._body = []
        spooled = self._spool is not None
        # What the app is told the body's length is: it comes after the head, as it arrives or from disk.
        length = self._declared if self._streams else self._size
        self._size = 0
        streams = self._streams or spooled
        pool = inst.pool
        if script is not None:
            # Kept connections only where the pool bounds them by the app's children (see _pool.py);
            # a streaming body has one of its own (it cannot go again, nor wait behind another).
            keep = pool.max_open is not None and not streams
            pairs = self._proxy.fixed_params(app) + request_pairs(
                method=self._method,
                target=self._target,
                headers=self._headers,
                body_length=length if streams else len(body),
                script=script,
            )
            if streams:
                end = STDIN_END if self._body_ended and not spooled else b""
                request = encode_request_head(pairs) + stdin(body) + end
                self._fastcgi = True
            else:
                request = encode_request(pairs, body, keep=keep)
            head_only = self._bodyless

            def fresh() -> UpstreamBase:
                return FastCgiUpstream(self, request, head_only=head_only, pool=pool if keep else None)

        else:
            # Our app server keeps connections (an app of another make may not frame for it).
            keep = app.runtime == "python" and not self._upgrade and not self._bodyless and not streams
            request = self._request_bytes(body, keep=keep, length=length if streams else len(body))
            head_only, upgrade = self._bodyless, self._upgrade

            def fresh() -> UpstreamBase:
                return HttpUpstream(
                    self, request, head_only=head_only, upgrade=upgrade, pool=pool if keep else None
                )

        if self._closed:
            return
        self._request = request
        self._head_only = head_only
        self._dispatch(inst, fresh, request, head_only, keep=keep)

    def _dispatch(
        self, inst: T, fresh: Callable[[], UpstreamBase], request: bytes, head_only: bool, *, keep: bool
    ) -> None:
        pool = inst.pool
        kept = None
        if keep:
            kept = pool.take()
            if kept is None and not pool.closed and not pool.room():
                ahead = pool.behind()
                if isinstance(ahead, FastCgiUpstream):
                    self._retry = fresh
                    self._upstream = ahead
                    self._arm(inst)
                    ahead.pipeline(self, request, head_only=head_only)
                    return

                def handover(conn: object, behind: bool) -> bool:
                    """A connection back in the pool, one that takes this request behind its own
                    (:meth:`UpstreamPool.busy`), or a place for a new one: in the same turn."""
                    if self._closed:
                        return False
                    if behind:
                        assert isinstance(conn, FastCgiUpstream)
                        self._retry = fresh
                        self._upstream = conn
                        self._arm(inst)
                        conn.pipeline(self, request, head_only=head_only)
                    elif isinstance(conn, (HttpUpstream, FastCgiUpstream)):
                        self._send_kept(inst, conn, fresh, request, head_only)
                    else:
                        upstream = fresh()
                        self._upstream = upstream
                        self._arm(inst)
                        self._opening = self._loop.create_task(self._connect(inst, upstream))
                    return True

                pool.wait(handover)
                return
        if isinstance(kept, (HttpUpstream, FastCgiUpstream)):
            self._send_kept(inst, kept, fresh, request, head_only)
            return
        upstream = fresh()
        self._upstream = upstream
        self._arm(inst)
        self._opening = self._loop.create_task(self._connect(inst, upstream))

    def _send_kept(
        self,
        inst: T,
        kept: HttpUpstream | FastCgiUpstream,
        fresh: Callable[[], UpstreamBase],
        request: bytes,
        head_only: bool,
    ) -> None:
        self._retry = fresh
        self._upstream = kept
        self._arm(inst)
        kept.again(self, request, head_only=head_only)

    async def _again(self, inst: T, again: Callable[[], UpstreamBase]) -> None:
        """The request once more, on a connection the pool makes room for (the stale one is out)."""
        # Not another kept one: a new connection is sure to reach the app (kept ones close here, and
        # make room for it).
        while (kept := await inst.pool.lease()) is not None:
            kept.close()
            if inst.pool.closed:
                break
        if self._closed:
            inst.pool.closed_one()
            return
        upstream = again()
        self._upstream = upstream
        await self._connect(inst, upstream)

    def _arm(self, inst: T) -> None:
        if self._timer is not None:
            self._timer.cancel()
        config = self._proxy.config
        wait = config.app_response_timeout if inst.served else config.app_start_timeout
        self._timer = self._loop.call_later(wait, self._timed_out, not inst.served)

    async def _connect(self, inst: T, upstream: UpstreamBase) -> None:
        kind, address = inst.address
        try:
            if inst.netns is not None:
                sock = await inst.netns.connected()
                await self._loop.create_connection(lambda: upstream, sock=sock)
            elif kind == "unix":
                await self._loop.create_unix_connection(lambda: upstream, address)
            else:
                host, _, port = address.rpartition(":")
                await self._loop.create_connection(lambda: upstream, host, int(port))
        except OSError as exc:
            upstream.uncount()
            self.upstream_failed(f"cannot reach the app: {exc}")
        except asyncio.CancelledError:
            upstream.uncount()
            raise

    def _request_bytes(self, body: bytes, *, keep: bool, length: int) -> bytes:
        """The request for an HTTP app, with ``body`` (all of it, or what came of a streaming one)."""
        lines = [self._method + b" " + self._target + b" HTTP/1.1"]
        for k, v in self._headers:
            name = k.lower()
            if name not in _REQUEST_DROP and not is_platform_field(name):
                lines.append(k + b": " + v)
        if length or self._method not in (b"GET", b"HEAD"):
            lines.append(b"Content-Length: %d" % length)
        if self._upgrade:
            lines.append(b"Connection: Upgrade\r\nUpgrade: websocket")
        else:
            lines.append(b"Connection: keep-alive" if keep else b"Connection: close")
        return b"\r\n".join(lines) + b"\r\n\r\n" + body

    def _timed_out(self, starting: bool) -> None:
        self._timer = None
        if self._head is None and not self._finished and not self._closed:
            if self._upstream is not None:
                self._upstream.abandon(self)
            if starting:
                self._error(
                    503, "This site is not answering", "The site's app did not answer in time.", retry=1
                )
            else:
                self._error(504, "This site is not answering", "The site's app took too long to answer.")

    # -- a streaming body

    def upstream_open(self) -> None:
        """The app's connection is open: what was held of the body goes, and the rest follows."""
        if self._spool is not None and not self._piping and not self._pipe_over:
            self._piping = True
            self._spool.seek(0)
            self._pump_spool()
            return
        if not self._streams or self._piping or self._pipe_over:
            return
        self._piping = True
        # Reading goes on unless the app's socket fills up as what was held goes (upstream_writable).
        self._hold(False)
        held, self._body = self._body, []
        self._size = 0
        for data in held:
            self._pipe(data)
        if self._body_ended:
            self._end_pipe()

    def _pipe(self, data: bytes) -> None:
        if self._upstream is not None:
            self._upstream.send(stdin(data) if self._fastcgi else data)

    def _end_pipe(self) -> None:
        if self._fastcgi and self._upstream is not None:
            self._upstream.send(STDIN_END)

    def _hold(self, on: bool) -> None:
        """Stop (or restart) reading the visitor's body while the app cannot take it."""
        if on != self._holding and not (on and self._body_ended):
            self._holding = on
            self._reader.body_reading(not on)

    def _stop_pipe(self) -> None:
        """The app takes no more of the body (it answered, failed or timed out): the rest is read and
        dropped, and the answer goes in the connection's turn, once the request is whole."""
        self._close_spool()
        if self._streams and not self._pipe_over:
            self._pipe_over = True
            self._body = []
            self._hold(False)

    @property
    def owner(self) -> str:
        """Whose share of the worker's spool this request's body counts against."""
        return self._app.owner

    @property
    def spool_droppable(self) -> bool:
        return self._spool is not None and not self._body_ended

    def spool_dropped(self, why: str) -> None:
        """Another tenant needs the room: the rest of this body is dropped, and the answer is 503."""
        self._spool_lost(why)

    def _spill(self) -> None:
        """The body held so far to an unnamed file; the rest follows it there."""
        held, self._body = self._body, []
        try:
            # Open across callbacks, closed by _close_spool; unnamed, so nothing is left should we die.
            self._spool = tempfile.TemporaryFile(dir=self._proxy.config.home)  # noqa: SIM115
        except OSError as exc:
            self._spool_lost(str(exc))
            return
        self._proxy.spools.add(self)
        self._spool_write(held)

    def _spool_write(self, pieces: list[bytes]) -> None:
        assert self._spool is not None
        proxy = self._proxy
        size = sum(map(len, pieces))
        # Any visitor may send chunked bodies to any app, and this disk holds every site's content.
        if not proxy.spool_room(self, size):
            held = f"{proxy.spooled >> 20} MiB"
            self._spool_lost(
                f"the worker holds {held} of request bodies on disk already (app_spool_total), "
                "and no other subscription's beyond its share to give way"
            )
            return
        try:
            self._spool.writelines(pieces)
        except OSError as exc:
            self._spool_lost(str(exc))
            return
        self.spooled += size
        proxy.spooled += size

    def _spool_lost(self, why: str) -> None:
        """The disk would not take the body (full, say): the rest is dropped, and the answer is 503."""
        self._proxy.log.bind(site=self._app.name).warning("cannot spool a request body: %s", why)
        # The owner reads why their visitors' uploads failed in the site's log.
        self._proxy.manager.site_log(self._app).write("worker", f"a request body was refused (503): {why}")
        self._spool_failed = why
        self._close_spool()

    def _pump_spool(self) -> None:
        """A spooled body to the app, until its socket is full (upstream_writable resumes it)."""
        spool = self._spool
        while spool is not None and not self._app_full and not self._pipe_over:
            try:
                data = spool.read(SPOOL_CHUNK)
            except OSError as exc:
                self._spool_lost(str(exc))
                if self._upstream is not None:
                    self._upstream.abandon(self)
                self.upstream_failed(f"the worker could not read the request's body back ({exc})")
                return
            if not data:
                self._close_spool()
                self._end_pipe()
                return
            self._pipe(data)

    def _close_spool(self) -> None:
        spool, self._spool = self._spool, None
        if spool is not None:
            spool.close()
            self._proxy.spools.discard(self)
            self._proxy.spooled -= self.spooled
            self.spooled = 0

    def upstream_head(self, status: int, headers: list[tuple[bytes, bytes]]) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._status = status
        self._tunnel = status == 101
        self._bodyless = self._bodyless or status in (204, 304) or (status < 200 and not self._tunnel)
        lines = [b"HTTP/1.1 %d %s" % (status, REASONS.get(status, "Unknown").encode())]
        length = dated = False
        if self._tunnel:
            drop = _SWITCH_DROP
        elif status == 204 or status < 200:
            drop = _NO_CONTENT_DROP
        else:
            drop = _RESPONSE_DROP
        for key, value in headers:
            if key in drop or is_platform_field(key):
                # The platform's own fields (the content version a front end keeps an answer
                # under, ...) are the worker's to say, never an app's.
                continue
            if key == b"content-length" and not self._bodyless:
                given = value.strip()
                if not given.isdigit() or (self._answer_left is not None and int(given) != self._answer_left):
                    self.upstream_failed(f"the app's Content-Length {given[:20]!r} is not one length")
                    return
                self._answer_left = int(given)
            length = length or key == b"content-length"
            dated = dated or key == b"date"
            lines.append(key + b": " + value)
        if not dated:
            lines.append(b"Date: " + http_date().encode())
        self._unframed = not length and not self._bodyless and not self._tunnel
        self._head = b"\r\n".join(lines) + b"\r\n"
        if not self._batching:
            self._flush()

    def upstream_data(self, data: bytes) -> None:
        if self._bodyless or not data:
            return
        left = self._answer_left
        if left is not None:
            if len(data) > left:
                if left == 0:
                    return
                self._proxy.manager.site_log(self._app).write(
                    "worker",
                    f"{self._method.decode()} /{self._rel}: the app sent more than its Content-Length; the rest was dropped",
                )
                data = data[:left]
            self._answer_left = left - len(data)
        self._sent += len(data)
        if self._chunked:
            self._raw.append(data)
        else:
            self._out.append(data)
        self._pending += len(data)
        if not self._batching:
            self._flush()

    def upstream_batch(self, open_: bool) -> None:
        """The app's bytes of one read are being handed over (True) or were (False): what they
        bring goes to the front end in one write at the end."""
        self._batching = open_
        if not open_:
            self._flush()

    def upstream_end(self) -> None:
        if self._answer_left and not self._finished and not self._closed:
            # Short of its Content-Length: the front end would wait for the rest, then read the
            # next answer on this connection as part of this one.
            self.upstream_failed("the app's answer ended short of its Content-Length")
            return
        self._stop_pipe()
        if self._chunked:
            self._seal()
            self._out.append(b"0\r\n\r\n")
        self._finished = True
        self._flush()

    def _seal(self) -> None:
        """The chunked bytes held since the last write, as one chunk."""
        if self._raw:
            data = self._raw[0] if len(self._raw) == 1 else b"".join(self._raw)
            self._raw.clear()
            self._out.append(b"%x\r\n%s\r\n" % (len(data), data))

    def upstream_failed(self, why: str) -> None:
        stale, again, inst = self._upstream, self._retry, self._inst
        self._retry = None
        if (
            again is not None and inst is not None and stale is not None and self._resends_left > 0
            and stale.unheard(self) and not self._closed and self._head is None
        ):  # fmt: skip
            # A kept connection the app closed as it was reused (its stop, say): the request never
            # reached it, so it goes again on a new connection, in that one's place.
            self._resends_left -= 1
            if inst.pool.max_open is not None:
                # php-cgi's: its children restart (at their request limit) all the time, and the
                # request goes to the next as any other does (a kept connection is closed only as its
                # child leaves); waiting for a new connection's place would put it behind all.
                self._dispatch(inst, again, self._request, self._head_only, keep=True)
            else:
                self._reconnect = self._loop.create_task(self._again(inst, again))
            return
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._stop_pipe()
        if self._closed or self._finished:
            return
        self._proxy.manager.site_log(self._app).write(
            "worker", f"{self._method.decode()} /{self._rel} failed: {why}"
        )
        if not self._head_written:
            self._error(502, "This site's app failed", "The site's app could not answer this request.")
        else:
            # Once the head has gone out, an error can only cut the connection.
            self._broken = True
            self._finished = True
            self._flush()

    def upstream_stderr(self, text: str) -> None:
        self._proxy.manager.site_log(self._app).write("app", text)

    def upstream_tunnel(self, early: bytes) -> None:
        if early:
            self.upstream_data(early)
        held, self._early = self._early, []
        for data in held:
            self.tunnel_in(data)

    def upstream_writable(self, writable: bool) -> None:
        """A tunnel's app (or a streaming body's) is slow to read: the visitor's connection stops
        reading until it drains."""
        if self._spool is not None and self._piping:
            self._app_full = not writable
            if writable:
                self._pump_spool()
            return
        if self._piping and not self._pipe_over and not self._body_ended:
            self._hold(not writable)
            return
        conn = self._conn
        if self._tunnel and conn is not None and not self._closed:
            conn.tunnel_reading(writable)

    # -- writing the answer, in the connection's turn

    def _send_written(self) -> None:
        """Answer with the file the app wrote (open already: its path is never looked up again)."""
        written, self._written = self._written, None
        conn = self._conn
        if written is None or conn is None or self._closed:
            if written is not None:
                written[0].close()
            return
        file, hit = written
        self._closed = self._finished = True
        self._status = 200
        self._sent = 0 if self._bodyless else hit.size
        # Not a file of the version: no front end keeps it as one.
        conn.version_line = b""
        keep = self._keep
        try:
            send_file(
                conn,
                hit,
                {key.lower(): value for key, value in self._headers},
                head=self._bodyless,
                keep_alive=keep,
                opened=file,
            )
        except OSError as exc:
            self._proxy.log.bind(site=self._app.name).warning("could not send %s: %s", self._rel, exc)
            self._release(answered=False)
            conn.abort()
            return
        self._release(answered=False)
        self._loop.call_soon(conn.diverted_done, keep)

    def _error(self, status: int, title: str, detail: str, *, retry: int = 0) -> None:
        self._stop_pipe()
        body = error_page(status, title, detail)
        lines = [
            b"HTTP/1.1 %d %s" % (status, REASONS.get(status, "Error").encode()),
            b"Date: " + http_date().encode(),
            b"Content-Type: text/html; charset=utf-8",
            b"Content-Length: %d" % len(body),
            b"Cache-Control: no-store",
        ]
        if retry:
            lines.append(b"Retry-After: %d" % retry)
        self._status = status
        self._head = b"\r\n".join(lines) + b"\r\n"
        self._unframed = False
        self._out = [] if self._method == b"HEAD" else [body]
        self._finished = True
        self._flush()

    def _flush(self) -> None:
        conn = self._conn
        if conn is None or self._closed:
            if self._pending > MAX_PENDING and self._upstream is not None:
                self._upstream.pause()
            return
        if self._head is not None and not self._head_written:
            if self._unframed:
                self._frame()
            if self._tunnel:
                connection = b"Connection: Upgrade\r\n\r\n"
            elif self._keep:
                connection = b"Connection: keep-alive\r\n\r\n"
            else:
                connection = b"Connection: close\r\n\r\n"
            self._out.insert(0, self._head + connection)
            self._head_written = True
            # Which version answered: a front end keeps an app's answer only as that version's.
            inst = self._inst
            conn.version_line = self._php_version or (inst.version_line if inst is not None else b"")
        if not self._head_written:
            return
        if self._raw:
            self._seal()
        # One write for what is there: one TLS record to the front end, not one per piece.
        if len(self._out) == 1:
            conn.write(self._out[0])
        elif self._out:
            conn.write(b"".join(self._out))
        self._out.clear()
        self._pending = 0
        if self._broken:
            self._closed = True
            self._release(answered=False)
            conn.abort()
        elif self._finished:
            self._closed = True
            answered = (200 <= self._status < 500 or self._tunnel) and self._inst is not None
            self._release(answered=answered)
            self._loop.call_soon(conn.diverted_done, self._keep and not self._tunnel)
        elif conn.write_paused and self._upstream is not None:
            self._upstream.pause()

    def _frame(self) -> None:
        """The framing of an answer the app gave no length: a small answer read whole in one go
        (most are) goes with its Content-Length, one piece for the front end to pass on; the rest
        chunked (RFC 9112 section 7.1)."""
        self._unframed = False
        if self._finished and not self._broken:
            assert self._head is not None
            self._head += b"Content-Length: %d\r\n" % sum(len(d) for d in self._out)
            return
        self._chunked = True
        self._head = (self._head or b"") + b"Transfer-Encoding: chunked\r\n"
        self._raw, self._out = [d for d in self._out if d], []
        self._seal()
        if self._finished:
            self._out.append(b"0\r\n\r\n")

    def _release(self, *, answered: bool) -> None:
        self._close_spool()
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        app = self._app
        manager = self._proxy.manager
        ms = (time.monotonic() - self._t0) * 1000
        status = self._status or 499
        logged = {}
        for key, value in self._headers:
            key = key.lower()
            if key in LOGGED_HEADERS:
                logged[key] = value
        manager.site_log(app).access(
            AccessRecord(self._method, self._target, status, self._sent, ms / 1000, logged)
        )
        inst, self._inst = self._inst, None
        if inst is not None:
            manager.end(app, inst, answered=answered)
