"""HTTP/1.1 pieces the proxy shares between its client and upstream sides: header classes, pages."""

from __future__ import annotations

from typing import NamedTuple

from shared.pages import error_response
from shared.states import SiteState

__all__ = [
    "BODY_CHUNKED",
    "BODY_CLOSE",
    "BODY_LENGTH",
    "BODY_NONE",
    "H_CONNECTION",
    "H_CONTENT_LENGTH",
    "H_COOKIE",
    "H_DROP",
    "H_EXPECT",
    "H_HOST",
    "H_SET_COOKIE",
    "H_TRANSFER_ENCODING",
    "H_UPGRADE",
    "H_VERSION",
    "H_XFF",
    "PAGES",
    "REQUEST_HEADERS",
    "RESPONSE_HEADERS",
    "Page",
    "extra_connection_tokens",
    "offline_page",
    "quota_page",
    "redirect_page",
    "strip_headers",
    "text_page",
]

# What the proxy does with a header, by its lower-cased name; a name not listed is forwarded as is.
H_HOST = 1
H_CONTENT_LENGTH = 2
H_TRANSFER_ENCODING = 3
H_CONNECTION = 4
H_DROP = 5
H_XFF = 6
H_EXPECT = 7
H_COOKIE = 8  # forwarded, and read when the site uses an affinity cookie
H_UPGRADE = 9  # hop-by-hop; sent on only when a WebSocket is tunnelled
H_VERSION = 10  # the content version an answer came from: read, never sent on
H_SET_COOKIE = 11  # an app's cookie: kept to its own site (roles/frontend/_cookies.py)

# Hop-by-hop headers (RFC 9110 7.6.1) belong to one connection and are never forwarded.
_HOP_BY_HOP = {
    b"keep-alive": H_DROP,
    b"proxy-connection": H_DROP,
    b"te": H_DROP,
    b"trailer": H_DROP,
    b"upgrade": H_UPGRADE,
    b"connection": H_CONNECTION,
    b"transfer-encoding": H_TRANSFER_ENCODING,
    b"content-length": H_CONTENT_LENGTH,
}

REQUEST_HEADERS: dict[bytes, int] = {
    **_HOP_BY_HOP,
    b"host": H_HOST,
    # Only the front end may say which site a request is for, and how it arrived.
    b"x-sitecloud-site": H_DROP,
    b"x-forwarded-proto": H_DROP,
    b"x-forwarded-host": H_DROP,
    b"x-forwarded-for": H_XFF,
    # The front end answers 100-continue itself (as nginx does).
    b"expect": H_EXPECT,
    b"cookie": H_COOKIE,
    # The lane's own (roles/frontend/_lane.py): never a visitor's to send, nor an app's to answer.
    b"x-sitecloud-lane": H_DROP,
    b"x-sitecloud-lane-refused": H_DROP,
    b"x-sitecloud-cached": H_DROP,
    # The front end names each request (the worker logs it, the visitor gets it back): never a visitor's.
    b"x-request-id": H_DROP,
    # What frameworks take from a proxy they trust (and an app behind us must trust us, for the
    # scheme) beside X-Forwarded-For/-Proto/-Host: a visitor's own would be believed as ours. RFC 7239's
    # Forwarded (Spring, Symfony), X-Forwarded-Port (Rails, Laravel: its links and redirects to
    # port 1), -Prefix (Werkzeug's ProxyFix, Spring: every link under /evil), -Ssl and -Scheme (the
    # scheme), X-Real-IP (the client's address), X-Original-URL and X-Rewrite-URL (the path IIS
    # rewrote: access rules checked on one path, another served), X-Original-Host and X-Host.
    **dict.fromkeys(
        (
            b"forwarded",
            b"x-forwarded-port",
            b"x-forwarded-prefix",
            b"x-forwarded-ssl",
            b"x-forwarded-scheme",
            b"x-forwarded-server",
            b"x-forwarded-uri",
            b"x-real-ip",
            b"x-original-url",
            b"x-rewrite-url",
            b"x-original-host",
            b"x-host",
            b"front-end-https",
        ),
        H_DROP,
    ),
}

RESPONSE_HEADERS: dict[bytes, int] = {
    **_HOP_BY_HOP,
    b"upgrade": H_DROP,
    b"x-sitecloud-lane": H_DROP,
    b"x-sitecloud-lane-refused": H_DROP,
    # The front end's cache (roles/frontend/_cache.py) reads these; the visitor never gets them.
    b"x-sitecloud-version": H_VERSION,
    b"x-sitecloud-fresh": H_DROP,
    b"x-request-id": H_DROP,
    b"set-cookie": H_SET_COOKIE,
}

# How a response body is delimited upstream.
BODY_NONE = 0
BODY_LENGTH = 1
BODY_CHUNKED = 2
BODY_CLOSE = 3

_CONNECTION_OPTIONS = frozenset({b"close", b"keep-alive", b"upgrade", b"te"})
_NO_TOKENS: frozenset[bytes] = frozenset()


def extra_connection_tokens(value: bytes) -> frozenset[bytes]:
    """Header names a Connection header lists beyond the usual options: they are hop-by-hop too."""
    lowered = value.lower()
    if lowered in _CONNECTION_OPTIONS:
        return _NO_TOKENS  # the usual case, on every response: no set work
    tokens = {t.strip() for t in lowered.split(b",")}
    return frozenset(tokens - _CONNECTION_OPTIONS - {b""})


def strip_headers(block: bytearray, names: frozenset[bytes]) -> bytearray:
    """``block`` (``Name: value\\r\\n`` lines) without the lines whose lower-cased name is in ``names``."""
    out = bytearray()
    for line in bytes(block).split(b"\r\n"):
        if line and line.split(b":", 1)[0].strip().lower() not in names:
            out += line + b"\r\n"
    return out


class Page(NamedTuple):
    """A platform page as a whole response, in its keep-alive and closing forms."""

    status: int
    keep: bytes
    close: bytes


def text_page(status: int, reason: bytes, text: bytes) -> Page:
    """A plain-text answer of the front end's own (health, ACME challenges)."""
    head = (
        b"HTTP/1.1 %d %b\r\nContent-Type: text/plain; charset=utf-8\r\nContent-Length: %d\r\n"
        b"Cache-Control: no-store\r\n" % (status, reason, len(text))
    )
    return Page(
        status,
        head + b"Connection: keep-alive\r\n\r\n" + text,
        head + b"Connection: close\r\n\r\n" + text,
    )


def _page(status: int, title: str, detail: str) -> Page:
    return Page(
        status,
        error_response(status, title, detail, keep_alive=True),
        error_response(status, title, detail, keep_alive=False),
    )


PAGES: dict[int, Page] = {
    p.status: p
    for p in (
        _page(400, "Bad request", "The request could not be understood."),
        _page(404, "No site here", "There is no site at this address. Check the address you typed."),
        _page(405, "Method not allowed", "This server does not accept that request method."),
        _page(408, "Request timeout", "The request took too long to arrive."),
        _page(413, "Request too large", "The request's body is larger than this site accepts."),
        _page(414, "Address too long", "The requested address is too long."),
        _page(431, "Request headers too large", "The request's headers are too large."),
        _page(501, "Not implemented", "This server does not support the request's transfer coding."),
        _page(502, "Site unavailable", "The site's server could not be reached. Try again in a moment."),
        _page(503, "Site unavailable", "The site is not running anywhere right now. Try again later."),
        _page(504, "Site too slow", "The site's server took too long to answer. Try again in a moment."),
    )
}


def quota_page(what: str, limit: float, unit: str, until: str) -> Page:
    """403 for a site stopped by its plan's daily quota (as Azure's "site stopped: quota exceeded")."""
    label = "bandwidth" if what == "bandwidth" else "CPU time"
    detail = (
        f"This site used its plan's {label} for today ({limit:g} {unit} a day) and is stopped. "
        f"It serves again at {until.replace('T', ' ').removesuffix('Z')} UTC, or sooner if its owner "
        "moves it to a larger plan."
    )
    return _page(403, "Site stopped: quota exceeded", detail)


# A site that exists but serves nothing now: 403, as Azure's "Error 403 - This web app is stopped" and
# our quota page. Not a 5xx: nothing failed, the platform does what it was told, and retrying will
# not help (5xx would also count as the platform's errors and make monitors and crawlers retry).
# The page says the state and nothing more: not who stopped it, nor why a subscription is suspended.
_OFFLINE = {
    SiteState.STOPPED: _page(
        403,
        "This site is stopped",
        "The site at this address is stopped. It serves again once it is started.",
    ),
    SiteState.SUSPENDED: _page(
        403, "This site is suspended", "The site at this address is suspended and cannot be visited now."
    ),
}


def offline_page(state: SiteState) -> Page:
    """What the visitors of a site that exists but does not serve get: stopped or suspended."""
    return _OFFLINE.get(state, _OFFLINE[SiteState.STOPPED])


def redirect_page(status: int, location: bytes) -> Page:
    """A redirect (HTTP → HTTPS), in its keep-alive and closing forms."""
    reason = b"Moved Permanently" if status == 301 else b"Permanent Redirect"
    head = b"HTTP/1.1 %d %b\r\nLocation: %b\r\nContent-Length: 0\r\nCache-Control: no-store\r\n" % (
        status,
        reason,
        location,
    )
    return Page(status, head + b"Connection: keep-alive\r\n\r\n", head + b"Connection: close\r\n\r\n")
