"""The platform's own pages (unknown site, errors), served by front end and worker alike.

They never show another tenant's content, and they say what to do next.
"""

from __future__ import annotations

from functools import lru_cache
from html import escape
from http import HTTPStatus

__all__ = ["REASONS", "error_page", "error_response"]

# Every status's phrase (an app may answer any, 101 included), in RFC 9110's words where they changed.
REASONS: dict[int, str] = {
    **{status.value: status.phrase for status in HTTPStatus},
    413: "Content Too Large",
    416: "Range Not Satisfiable",
}

_TEMPLATE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><meta name="viewport" content="width=device-width, initial-scale=1">
<title>{status} {reason}</title>
<style>body{{font:16px/1.5 system-ui,sans-serif;max-width:36rem;margin:12vh auto;padding:0 1rem;color:#1f2933}}
h1{{font-size:1.5rem;margin:0 0 .5rem}}p{{color:#52606d}}small{{color:#9aa5b1}}</style></head>
<body><h1>{title}</h1><p>{detail}</p><small>{status} {reason} &middot; sitecloud</small></body></html>
"""


@lru_cache(maxsize=64)
def error_page(status: int, title: str, detail: str) -> bytes:
    reason = REASONS.get(status, "Error")
    return _TEMPLATE.format(status=status, reason=reason, title=escape(title), detail=escape(detail)).encode()


@lru_cache(maxsize=64)
def error_response(status: int, title: str, detail: str, *, keep_alive: bool = True) -> bytes:
    """A whole HTTP/1.1 response carrying :func:`error_page`."""
    body = error_page(status, title, detail)
    head = (
        f"HTTP/1.1 {status} {REASONS.get(status, 'Error')}\r\n"
        "Content-Type: text/html; charset=utf-8\r\n"
        f"Content-Length: {len(body)}\r\n"
        "Cache-Control: no-store\r\n"
        f"Connection: {'keep-alive' if keep_alive else 'close'}\r\n\r\n"
    )
    return head.encode() + body
