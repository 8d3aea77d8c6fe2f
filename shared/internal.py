"""The internal API: aiohttp apps and clients over mutual TLS between roles.

Servers admit a peer by the role in its certificate (:func:`require_role`); every error leaves as the
JSON form of :class:`shared.errors.SitecloudError`; clients turn it back into the same exception.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar

import aiohttp
from aiohttp import web

from shared.config import RoleConfig
from shared.contracts import Contract
from shared.disk import is_disk_full, storage_full
from shared.errors import Forbidden, NotFound, SitecloudError, StorageFull, Unavailable, error_from_json
from shared.pki import role_of_peer
from shared.tls import client_context

C = TypeVar("C", bound=Contract)

__all__ = [
    "InternalClient",
    "error_middleware",
    "json_error",
    "peer_role",
    "require_role",
    "unreached_reason",
]

# Answers bigger than this are parsed in a thread (a 20,000-file manifest takes 0.2 s to check).
_PARSE_INLINE = 256 * 1024

_log = logging.getLogger("sitecloud.internal")

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def json_error(err: SitecloudError) -> web.Response:
    wait = getattr(err, "retry_after", None)
    headers = {"Retry-After": str(wait)} if wait else None
    return web.json_response(err.to_json(), status=err.status, headers=headers)


@web.middleware
async def error_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Errors are data: a failing request answers JSON and never takes the process down."""
    try:
        return await handler(request)
    except SitecloudError as err:
        return json_error(err)
    except web.HTTPNotFound:
        return json_error(NotFound(f"no such endpoint: {request.method} {request.path}"))
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        code = (exc.reason or "error").lower().replace(" ", "_")
        message = exc.reason
        # RFC 9110 §15.5.6: a 405 lists the methods the resource does allow.
        headers = {"Allow": exc.headers["Allow"]} if "Allow" in exc.headers else None
        if headers is not None:
            message = f"{request.method} is not allowed on {request.path}; allowed: {headers['Allow']}"
        return web.json_response(
            {"error": {"code": code, "message": message}}, status=exc.status, headers=headers
        )
    except asyncio.CancelledError:
        raise
    except ConnectionResetError:
        # The caller went away mid-request (an FTP upload its client aborted): nothing was done,
        # and there is no one to answer. One line, not aiohttp's traceback at ERROR.
        _log.info(
            "%s %s: the caller closed the connection before the request ended", request.method, request.path
        )
        return web.Response(status=499)
    except Exception as exc:
        if _db_disk_full(exc):
            _log.warning(
                "%s %s: refused, the runtime DB's disk is full: %s", request.method, request.path, exc
            )
            return json_error(
                StorageFull(
                    "the runtime DB's disk is full: nothing was changed",
                    hint="free disk space where the runtime DB keeps its files (with `sitecloud up`'s "
                    "default SQLite DB, the disk of its home), then retry; sites keep being served meanwhile",
                )
            )
        if _db_unreachable(exc):
            # The runtime DB is down, restarting or locked: nothing was done, and a retry may work.
            _log.warning(
                "%s %s: the runtime DB cannot be reached: %s",
                request.method,
                request.path,
                getattr(exc, "orig", exc),
            )
            return json_error(
                Unavailable(
                    "the runtime DB cannot be reached now; the request was not completed",
                    hint="check that the database server (sitecloud up --db) runs and accepts connections, "
                    "then retry; sites keep being served meanwhile",
                )
            )
        if is_disk_full(exc):
            # The host's condition, not the request's: one line for the admin, not a traceback.
            _log.warning("%s %s: refused, the disk is full: %s", request.method, request.path, exc)
            return json_error(storage_full())
        _log.exception("unhandled error in %s %s", request.method, request.path)
        return json_error(SitecloudError("internal error; the request was not completed"))


def _db_disk_full(exc: BaseException) -> bool:
    """Whether ``exc`` is the runtime DB refusing a write for want of disk space: SQLite's SQLITE_FULL,
    PostgreSQL's disk_full (SQLSTATE 53100)."""
    from sqlalchemy.exc import OperationalError

    if not isinstance(exc, OperationalError):
        return False
    return "database or disk is full" in str(exc.orig) or getattr(exc.orig, "sqlstate", None) == "53100"


def _db_unreachable(exc: BaseException) -> bool:
    """Whether ``exc`` is the runtime DB not answering (connection refused or lost, SQLite locked)
    rather than a bug: SQLAlchemy's OperationalError (or a dropped connection)."""
    from sqlalchemy.exc import DBAPIError, OperationalError

    return isinstance(exc, OperationalError) or (isinstance(exc, DBAPIError) and exc.connection_invalidated)


def peer_role(request: web.Request) -> str | None:
    transport = request.transport
    if transport is None:
        return None
    return role_of_peer(transport.get_extra_info("peercert"))


def require_role(request: web.Request, *roles: str) -> str:
    """The calling role, if it is one of ``roles``; otherwise :class:`Forbidden`."""
    role = peer_role(request)
    if role not in roles:
        raise Forbidden(f"role {role or 'unknown'} may not call {request.method} {request.path}")
    return role


def unreached_reason(exc: BaseException) -> str:
    """Why a call did not reach its peer, in a few words and without the peer's address (the
    :class:`InternalClient` error's message names it): "connection refused", "no answer in time"."""
    cause = exc.__cause__ if isinstance(exc, Unavailable) and exc.__cause__ is not None else exc
    if isinstance(cause, TimeoutError):
        return "no answer in time"
    if isinstance(cause, aiohttp.ClientSSLError):
        return "its TLS handshake failed"
    os_error = getattr(cause, "os_error", cause)
    if isinstance(os_error, OSError) and os_error.errno:
        return os.strerror(os_error.errno).lower()
    return "no answer"


class InternalClient:
    """An mTLS HTTP client for calls to other roles, with JSON helpers."""

    def __init__(self, identity: RoleConfig | ssl.SSLContext, *, timeout: float = 30.0) -> None:
        self._ssl = identity if isinstance(identity, ssl.SSLContext) else client_context(identity)
        self._timeout = aiohttp.ClientTimeout(total=timeout, sock_connect=5)
        self._session: aiohttp.ClientSession | None = None

    @property
    def session(self) -> aiohttp.ClientSession:
        if self._session is None:
            connector = aiohttp.TCPConnector(ssl=self._ssl, limit=64)
            self._session = aiohttp.ClientSession(connector=connector, timeout=self._timeout)
        return self._session

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def request_json(self, method: str, url: str, **kwargs: Any) -> Any:
        """Call ``url`` and return its JSON body; an error answer raises the matching SitecloudError."""
        try:
            async with self.session.request(method, url, **kwargs) as resp:
                body = await resp.json(content_type=None) if resp.content_length != 0 else None
                if resp.status >= 400:
                    raise error_from_json(resp.status, body)
                return body
        except (aiohttp.ClientConnectionError, TimeoutError) as exc:
            raise Unavailable(f"cannot reach {url}: {exc or type(exc).__name__}") from exc
        except aiohttp.ContentTypeError as exc:
            raise Unavailable(f"{url} answered something that is not JSON") from exc

    async def lines(self, method: str, url: str, *, quiet_for: float, **kwargs: Any) -> AsyncIterator[bytes]:
        """Call ``url`` and yield its answer's lines as they come (at most ``quiet_for`` seconds apart);
        an error answer raises the matching SitecloudError before any line."""
        timeout = aiohttp.ClientTimeout(total=None, sock_connect=5, sock_read=quiet_for)
        answered = False
        try:
            async with self.session.request(method, url, timeout=timeout, **kwargs) as resp:
                answered = True
                if resp.status >= 400:
                    raise error_from_json(resp.status, await resp.json(content_type=None))
                async for line in resp.content:
                    yield line
        except (aiohttp.ClientConnectionError, aiohttp.ClientPayloadError, TimeoutError) as exc:
            what = "the answer from {} broke off" if answered else "cannot reach {}"
            raise Unavailable(f"{what.format(url)}: {exc or type(exc).__name__}") from exc
        except aiohttp.ContentTypeError as exc:
            raise Unavailable(f"{url} answered something that is not JSON") from exc

    async def get_contract(self, kind: type[C], url: str, *, what: str | None = None, **kwargs: Any) -> C:
        """GET ``url`` and parse its answer as ``kind`` straight from the bytes (no dicts in between:
        for a manifest or a feed page of thousands of entries that is as fast as decoding alone)."""
        try:
            async with self.session.get(url, **kwargs) as resp:
                raw = await resp.read()
        except (aiohttp.ClientConnectionError, aiohttp.ClientPayloadError, TimeoutError) as exc:
            raise Unavailable(f"cannot reach {url}: {exc or type(exc).__name__}") from exc
        if resp.status >= 400:
            try:
                body = json.loads(raw) if raw else None
            except ValueError:
                body = None
            raise error_from_json(resp.status, body)
        if len(raw) > _PARSE_INLINE:
            # A manifest of thousands of files: checked in a thread, the loop goes on serving meanwhile.
            return await asyncio.to_thread(kind.parse_json, raw, what=what)
        return kind.parse_json(raw, what=what)

    async def get_json(self, url: str, **kwargs: Any) -> Any:
        return await self.request_json("GET", url, **kwargs)

    async def post_json(self, url: str, body: Any = None, **kwargs: Any) -> Any:
        return await self.request_json("POST", url, json=body, **kwargs)

    async def put_json(self, url: str, body: Any = None, **kwargs: Any) -> Any:
        return await self.request_json("PUT", url, json=body, **kwargs)
