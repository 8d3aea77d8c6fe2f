"""The trust boundary for what a caller sends the management API and portals: header values, JSON
bodies, form fields and path parts, each refused with a 4xx that says what is wrong and what is allowed.

Text reaches us decoded leniently (aiohttp keeps undecodable header bytes as lone surrogates, and
JSON may spell one as ``"\\ud800"``); such text can never be stored as UTF-8, nor a NUL in
PostgreSQL, so both are refused here rather than failing deep in the service or the database.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError

from shared.errors import BadRequest, InvalidInput, Unauthorized

__all__ = [
    "MAX_JSON_DEPTH",
    "ProtocolErrorLog",
    "check_authorization",
    "check_text",
    "checked_text",
    "parse_json_object",
]

# Our bodies are two levels deep; this leaves room and stops a body built to exhaust the parser.
MAX_JSON_DEPTH = 32
# Our tokens are ~50 ASCII characters; a header far longer than any is not one.
_MAX_AUTHORIZATION = 1024


def check_authorization(header: str | None) -> None:
    """An ``Authorization`` header is printable ASCII (every token we issue is), or it is refused
    as any wrong token would be: 401, not a failure to hash it."""
    if header is None:
        return
    if len(header) > _MAX_AUTHORIZATION or not header.isascii() or not header.isprintable():
        raise Unauthorized(
            "the Authorization header must be 'Bearer <token>' with a token of printable ASCII",
            hint="pass --token or set SITECLOUD_TOKEN",
        )


def check_text(value: str, what: str) -> str:
    """``value`` if it can be stored as UTF-8 text: no lone surrogates, no NUL."""
    if value.isascii():
        if "\x00" in value:
            raise InvalidInput(f"{what} contains a NUL character, which text may not hold")
        return value
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise InvalidInput(
            f"{what} is not valid Unicode text (a lone surrogate, or bytes that are not UTF-8)",
            hint="send text as UTF-8",
        ) from None
    if "\x00" in value:
        raise InvalidInput(f"{what} contains a NUL character, which text may not hold")
    return value


def _no_constant(name: str) -> Any:
    raise InvalidInput(f"the request body holds {name}, which is not a JSON number")


def parse_json_object(raw: bytes) -> dict[str, Any]:
    """A JSON object body, checked: nesting, valid UTF-8 text, finite numbers. (Its size is bounded
    where it is read: the app's ``client_max_size`` answers 413 beyond it.)"""
    try:
        body = json.loads(raw.decode("utf-8"), parse_constant=_no_constant)
    except UnicodeDecodeError as exc:
        raise BadRequest("the request body is not UTF-8", hint="send JSON encoded as UTF-8") from exc
    except RecursionError:
        raise BadRequest(f"the request body is nested deeper than {MAX_JSON_DEPTH} levels") from None
    except ValueError as exc:
        # json.JSONDecodeError, and an integer too long to convert (Python's digit limit).
        raise BadRequest(f"the request body is not valid JSON: {exc}") from exc
    if not isinstance(body, dict):
        raise InvalidInput(f"the request body must be a JSON object, not {_json_type(body)}")
    _check_tree(body)
    return body


def _json_type(value: Any) -> str:
    if isinstance(value, list):
        return "an array"
    if isinstance(value, str):
        return "a string"
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    return "a number"


def _check_tree(body: dict[str, Any]) -> None:
    # Iterative: the check itself must not recurse as deep as the body does.
    pending: list[tuple[Any, int, str]] = [(body, 1, "the body")]
    while pending:
        value, depth, where = pending.pop()
        if isinstance(value, dict):
            if depth > MAX_JSON_DEPTH:
                raise BadRequest(f"the request body is nested deeper than {MAX_JSON_DEPTH} levels")
            for key, item in value.items():
                check_text(key, f"a field name in {where}")
                pending.append((item, depth + 1, f"field {key!r}" if depth == 1 else where))
        elif isinstance(value, list):
            if depth > MAX_JSON_DEPTH:
                raise BadRequest(f"the request body is nested deeper than {MAX_JSON_DEPTH} levels")
            pending.extend((item, depth + 1, where) for item in value)
        elif isinstance(value, str):
            check_text(value, where)
        elif isinstance(value, float) and not math.isfinite(value):
            raise InvalidInput(f"{where} holds a number too large to represent")


class ProtocolErrorLog(logging.LoggerAdapter[logging.Logger]):
    """The logger aiohttp's request handler gets: a request it could not parse is the client's
    fault, so one warning line rather than a traceback; anything else is logged as aiohttp would."""

    def __init__(self) -> None:
        super().__init__(logging.getLogger("aiohttp.server"), {})

    def exception(self, msg: object, *args: object, exc_info: Any = True, **kwargs: Any) -> None:
        if isinstance(exc_info, HttpProcessingError) and 400 <= exc_info.code < 500:
            detail = (exc_info.message or "").strip().splitlines()
            self.warning(
                "refused a request that could not be parsed (%s %s) from %s",
                exc_info.code,
                detail[0].rstrip(":") if detail else type(exc_info).__name__,
                args[0] if args else "?",
            )
            return
        super().exception(msg, *args, exc_info=exc_info, **kwargs)


@web.middleware
async def checked_text(
    request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
) -> web.StreamResponse:
    """Every name in the request's path and every query parameter is storable text, for every
    route (API and portals): a ``%00`` decodes to a NUL no database column takes. (Bytes that are not
    UTF-8 stay percent-encoded when the URL is decoded, so they arrive as plain text.)"""
    for key, value in request.match_info.items():
        check_text(value, f"the {key} in the address")
    for key, value in request.query.items():
        check_text(key, "a query parameter's name")
        check_text(value, f"the query parameter {key!r}")
    return await handler(request)
