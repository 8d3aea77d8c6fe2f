"""A request of the REST API as its handlers see it: the service, the caller, and the query and body
that the route's models checked before the handler ran.

The route tables (:mod:`roles.management.api`, :mod:`roles.management._fabric_api`) and the portals
build on this module; it knows none of them.
"""

from __future__ import annotations

import math
from collections.abc import AsyncIterator
from typing import Any, TypeVar

from aiohttp import web
from pydantic import BaseModel

from roles.management import _models as m
from roles.management._input import check_authorization, parse_json_object
from roles.management._openapi import Operation
from roles.management._paging import Page
from roles.management.service import ManagementService, Principal
from shared.errors import InvalidInput, RateLimited

__all__ = [
    "CHUNK",
    "NDJSON",
    "SERVICE",
    "body_of",
    "checked",
    "client_address",
    "page_of",
    "principal",
    "query_of",
    "relay_lines",
    "service_of",
]

SERVICE = web.AppKey("service", ManagementService)
_WHO = web.RequestKey("who", Principal)
_QUERY = web.RequestKey("query", BaseModel)
_BODY = web.RequestKey("body", BaseModel)
M = TypeVar("M", bound=BaseModel)

# How much of a request or answer body is read or written at a time.
CHUNK = 256 * 1024


def service_of(request: web.Request) -> ManagementService:
    return request.app[SERVICE]


async def principal(request: web.Request) -> Principal:
    """The caller (authenticated once per request, before its body is looked at)."""
    if _WHO in request:
        return request[_WHO]
    header = request.headers.get("Authorization")
    check_authorization(header)
    who = request[_WHO] = await service_of(request).authenticate(header)
    return who


def _hold_to_rate(request: web.Request, tenant_id: int, tenant: str | None) -> None:
    """A tenant past its API rate gets 429, with when to try again."""
    write = request.method not in ("GET", "HEAD")
    wait = service_of(request).api_limits.take(tenant_id, write=write)
    if wait:
        seconds = max(1, math.ceil(wait))
        raise RateLimited(
            f"too many API {'changes' if write else 'requests'} from tenant {tenant or tenant_id}",
            hint=f"try again in {seconds} seconds (an admin sets the rates: api_reads_per_second, "
            "api_writes_per_second)",
            retry_after=seconds,
        )


def client_address(request: web.Request) -> str:
    return request.remote or "unknown"


def body_of(request: web.Request, model: type[M]) -> M:
    """The request body, validated with its route's model."""
    body = request[_BODY]
    if not isinstance(body, model):
        raise TypeError(f"{request.path}: the route's body model is not {model.__name__}")
    return body


def query_of(request: web.Request, model: type[M]) -> M:
    """The query parameters, validated with its route's model."""
    query = request[_QUERY]
    if not isinstance(query, model):
        raise TypeError(f"{request.path}: the route's query model is not {model.__name__}")
    return query


def page_of(request: web.Request, model: type[m.ListQuery]) -> tuple[Any, Page]:
    query = query_of(request, model)
    return query, Page(limit=query.limit, cursor=query.cursor)


class _NoQuery(m.Query):
    """A call that takes no query parameters."""


async def _read_up_to(request: web.Request, limit: int) -> bytes:
    body = bytearray()
    async for chunk in request.content.iter_chunked(CHUNK):
        body += chunk
        if len(body) > limit:
            raise web.HTTPRequestEntityTooLarge(max_size=limit, actual_size=len(body))
    return bytes(body)


def checked(op: Operation) -> Any:
    """``op``'s handler behind its checks: the caller first (401 before anything about the request),
    then the query parameters and the JSON body against the route's models (400 saying what is wrong
    and what is allowed)."""

    async def handle(request: web.Request) -> web.StreamResponse:
        if not op.public:
            who = await principal(request)
            if who.tenant_id is not None:
                _hold_to_rate(request, who.tenant_id, who.tenant)
        twice = sorted(k for k in set(request.query) if len(request.query.getall(k)) > 1)
        if twice:
            raise InvalidInput(f"query parameter(s) given more than once: {', '.join(twice)}")
        request[_QUERY] = m.validated(op.query or _NoQuery, dict(request.query))
        if op.body is not None:
            raw = await (request.read() if op.body_limit is None else _read_up_to(request, op.body_limit))
            data = parse_json_object(raw) if raw or op.body_required else {}
            request[_BODY] = m.validated(op.body, data)
        return await op.handler(request)

    return handle


NDJSON = "application/x-ndjson"


async def relay_lines(
    request: web.Request, lines: AsyncIterator[bytes], content_type: str = NDJSON
) -> web.StreamResponse:
    """Pass lines on as they come; an error before the first line (no such site, say) is answered as
    an error."""
    first = await anext(lines, b"")
    out = web.StreamResponse(headers={"Content-Type": content_type, "Cache-Control": "no-store"})
    await out.prepare(request)
    await out.write(first)
    async for line in lines:
        await out.write(line)
    await out.write_eof()
    return out
