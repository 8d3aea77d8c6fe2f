"""The worker's data server: front ends (and only front ends) ask it for site content.

Plain HTTP/1.1 over mutual TLS. The front end names the site in ``X-Sitecloud-Site``; the path is
decoded once, checked by :func:`shared.paths.site_relpath`, and looked up in the site's current
version directory.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from urllib.parse import unquote_to_bytes

import httptools

from roles.worker._cache import SiteVersion
from roles.worker._http import HttpConnection, Limits, Request, response_head
from roles.worker._static import FileHit, HotCache, HotKey, Redirect, resolve, send_file
from roles.worker.config import WorkerConfig
from shared.errors import InvalidInput
from shared.logs import get_logger
from shared.pages import error_page
from shared.paths import site_relpath
from shared.pki import role_of_peer
from shared.tls import server_context

__all__ = ["DataServer", "Lookup"]

# (held, version): held with no version means nothing has been published to the site yet.
Lookup = Callable[[str], tuple[bool, SiteVersion | None]]

_ALLOWED = "GET, HEAD"


class DataServer:
    def __init__(self, config: WorkerConfig, lookup: Lookup, hot: HotCache) -> None:
        self._config = config
        self._lookup = lookup
        self._hot = hot
        self._log = get_logger("worker", host=config.host)
        self._limits = Limits(
            keepalive_timeout=config.keepalive_timeout,
            request_timeout=config.request_timeout,
            send_timeout=config.send_timeout,
        )
        self._server: asyncio.Server | None = None
        self._connections: set[HttpConnection] = set()
        self._stopping = False

    @property
    def connections(self) -> int:
        return len(self._connections)

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(
            self._connection,
            self._config.bind,
            self._config.data_port,
            ssl=server_context(self._config),
            ssl_handshake_timeout=10,
            ssl_shutdown_timeout=5,
            backlog=1024,
        )

    async def stop(self) -> None:
        """Stop accepting, let responses in flight finish within the drain bound, then cut the rest."""
        if self._server is None:
            return
        self._stopping = True
        self._server.close()
        busy = [c for c in self._connections if not c.idle]
        for conn in list(self._connections):
            conn.drain_and_close()
        # A busy connection is done only once it has closed: a TLS transport's buffer size leaves out
        # the encrypted bytes already handed to TCP, so aborting when it reads 0 can cut a response's
        # tail. Idle connections have nothing in flight and are cut below without waiting.
        deadline = asyncio.get_running_loop().time() + self._config.drain_timeout
        while not all(c.closed for c in busy):
            if asyncio.get_running_loop().time() > deadline:
                self._log.warning("%s connections still busy after the drain bound", self.connections)
                break
            await asyncio.sleep(0.05)
        for conn in list(self._connections):
            conn.abort()
        await asyncio.sleep(0)
        self._server = None

    def _connection(self) -> HttpConnection:
        return HttpConnection(
            self._handle, limits=self._limits, log=self._log, admit=self._admit, on_close=self._closed
        )

    def _closed(self, conn: HttpConnection) -> None:
        self._connections.discard(conn)

    def _admit(self, conn: HttpConnection, transport: asyncio.Transport) -> bool:
        """Only front ends get in. Called once the TLS handshake is done (a failed one never gets here)."""
        role = role_of_peer(transport.get_extra_info("peercert"))
        if role == "frontend" and not self._stopping:
            self._connections.add(conn)
            return True
        self._log.warning(
            "refused a %s peer on the data port from %s", role, transport.get_extra_info("peername")
        )
        return False

    async def _handle(self, request: Request, conn: HttpConnection, keep_alive: bool) -> bool:
        head = request.method == "HEAD"
        if request.method not in ("GET", "HEAD"):
            _page(
                conn, 405, "Method not allowed", "A static site answers GET and HEAD only.", head, keep_alive,
                [("Allow", _ALLOWED)],
            )  # fmt: skip
            return keep_alive
        site = request.headers.get("x-sitecloud-site", "").strip()
        held, version = self._lookup(site)
        if not held:
            _page(conn, 404, "No site here", "There is no site at this address.", head, keep_alive)
            return keep_alive
        if version is None:
            _page(
                conn, 200, "This site is ready",
                "Nothing has been published yet. Upload your files over FTP or web deploy "
                "and they will be served here.",
                head, keep_alive,
            )  # fmt: skip
            return keep_alive
        try:
            url = httptools.parse_url(request.target)
            path = unquote_to_bytes(url.path or b"/").decode("utf-8")
            rel = site_relpath(path)
        except (httptools.HttpParserInvalidURLError, UnicodeDecodeError, InvalidInput):
            _page(conn, 400, "Bad address", "This address is not valid.", head, False)
            return False
        slash = path.endswith("/")
        key = (site, version.number, rel, slash)
        cached = self._hot.get(key)
        if cached is not None:
            await send_file(
                conn, cached[0], request.headers, head=head, keep_alive=keep_alive, body=cached[1]
            )
            return keep_alive
        found = resolve(version.root, rel, slash=slash)
        if found is None:
            _page(conn, 404, "Not found", "Nothing is published at this address.", head, keep_alive)
        elif isinstance(found, Redirect):
            location = found.location + (f"?{url.query.decode('latin-1')}" if url.query else "")
            _page(
                conn,
                301,
                "Moved",
                "This page lives one slash further.",
                head,
                keep_alive,
                [("Location", location)],
            )
        else:
            await self._send(conn, key, found, request, head, keep_alive)
        return keep_alive

    async def _send(
        self,
        conn: HttpConnection,
        key: HotKey,
        hit: FileHit,
        request: Request,
        head: bool,
        keep_alive: bool,
    ) -> None:
        data = await send_file(conn, hit, request.headers, head=head, keep_alive=keep_alive)
        if data is not None:
            self._hot.put(key, hit, data)


def _page(
    conn: HttpConnection,
    status: int,
    title: str,
    detail: str,
    head: bool,
    keep_alive: bool,
    extra: list[tuple[str, str]] | None = None,
) -> None:
    body = error_page(status, title, detail)
    headers = [
        ("Content-Type", "text/html; charset=utf-8"),
        ("Content-Length", str(len(body))),
        ("Cache-Control", "no-store"),
        *(extra or []),
    ]
    conn.write(response_head(status, headers, keep_alive=keep_alive) + (b"" if head else body))
