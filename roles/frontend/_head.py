"""A visitor's request head, read as data: the pure checks and rewrites the client connection makes.

Nothing here touches a socket or the proxy's state, so each rule is tested on its own
(tests/test_frontend_head.py). The per-header callbacks stay on the connection (httptools calls them
there); they look names up in the tables here.
"""

from __future__ import annotations

import re

import httptools

from roles.frontend._http import Page, redirect_page

__all__ = [
    "AUTHORIZATION",
    "CONDITIONAL",
    "ENCODING",
    "IDEMPOTENT",
    "NOTED",
    "REFERER",
    "USER_AGENT",
    "absolute_form",
    "https_redirect",
    "normalize_host",
    "only_chunked",
    "valid_host",
]

# Request headers the cache looks at: those that make an answer this visitor's own (a part, "not
# modified", or one for its credentials: never kept nor given from the cache), Accept-Encoding
# (which an app's answer that varies by it is kept under), and the two an access line shows (an
# answer given from the cache is logged with them).
CONDITIONAL = 1
AUTHORIZATION = 2
ENCODING = 3
USER_AGENT = 4
REFERER = 5
NOTED = {
    b"user-agent": USER_AGENT,
    b"referer": REFERER,
    b"range": CONDITIONAL,
    b"if-range": CONDITIONAL,
    b"if-none-match": CONDITIONAL,
    b"if-modified-since": CONDITIONAL,
    b"if-match": CONDITIONAL,
    b"authorization": AUTHORIZATION,
    b"accept-encoding": ENCODING,
}

# Methods that may be sent again after a stale connection (when bodiless).
IDEMPOTENT = frozenset({b"GET", b"HEAD", b"OPTIONS"})
_REDIRECT_AS_IS = frozenset({b"GET", b"HEAD"})


# uri-host [":" port] (RFC 3986 3.2.2, 3.2.3): an IP literal or a name, then digits only.
_HOST = re.compile(rb"(?:\[[0-9A-Fa-f:.]+\]|[^\[\]:@/\\\s]*)(?::[0-9]{0,5})?")


def valid_host(value: bytes) -> bool:
    """Whether a Host value (or an absolute-form target's authority) is a host and an optional port.
    The routes key on the name before the last colon, so what follows it would reach the app as
    given: ``blog.example:443@evil.example`` routes to blog, and an app that builds its links (a
    password reset's) from Host sends the visitor to evil.example. RFC 9112 3.2: 400."""
    return _HOST.fullmatch(value) is not None


def normalize_host(value: bytes) -> bytes:
    """A Host value as the routes are keyed: lower case, no port, no trailing dot."""
    host = value.lower()
    colon = host.rfind(b":")
    if colon != -1 and host.find(b"]", colon) == -1:
        host = host[:colon]
    return host[:-1] if host.endswith(b".") else host


def absolute_form(target: bytes) -> tuple[bytes, bytes] | None:
    """An absolute-form request target (RFC 9112 3.2.2: it wins over Host) as (host with its port,
    origin-form target); None when it names no host. ValueError when it is not a URL at all."""
    try:
        url = httptools.parse_url(target)
    except httptools.HttpParserInvalidURLError:
        raise ValueError(f"request target {target!r} is not a URL") from None
    if not url.host:
        return None
    host = url.host + (b":" + str(url.port).encode() if url.port else b"")
    return host, (url.path or b"/") + (b"?" + url.query if url.query else b"")


def only_chunked(te: bytes) -> bool:
    """Whether a Transfer-Encoding value is ``chunked`` alone: the one coding the proxy re-frames."""
    return te.strip().lower() == b"chunked"


def https_redirect(method: bytes, host: bytes, target: bytes, port: int) -> Page:
    """Where an HTTPS-only site sends a visitor who came over HTTP (308 keeps a POST a POST)."""
    location = b"https://" + host + (b"" if port == 443 else b":%d" % port) + target
    return redirect_page(301 if method in _REDIRECT_AS_IS else 308, location)
