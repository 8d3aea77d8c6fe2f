"""Access lines for a site's log stream, static and app requests alike.

Like the combined log format, with the front end's request id added::

    203.0.113.7 "GET /index.html HTTP/1.1" 200 5120 "https://ref.example/" "curl/8.5" 0.4ms id=5f1c0a9e2b7d-1a
"""

from __future__ import annotations

from typing import NamedTuple

__all__ = ["LOGGED_HEADERS", "AccessRecord", "access_head", "access_line", "client_of", "request_id_text"]

# The request headers an access line shows (lower-case): the front end's request id, the visitor's
# address, and what a combined log shows.
LOGGED_HEADERS = frozenset({b"x-request-id", b"x-forwarded-for", b"user-agent", b"referer"})


def _text(value: bytes | None, limit: int = 300) -> str:
    if not value:
        return "-"
    # A visitor's bytes never break the line or its quoting.
    return value[:limit].decode("latin-1").replace("\\", "\\\\").replace('"', '\\"').replace("\n", " ")


def client_of(forwarded_for: bytes | None) -> str:
    """The visitor's address: the last hop the front end added to X-Forwarded-For."""
    if not forwarded_for:
        return "-"
    return _text(forwarded_for.rsplit(b",", 1)[-1].strip(), 64)


def access_line(
    *,
    method: bytes,
    target: bytes,
    status: int,
    sent: int,
    seconds: float,
    logged: dict[bytes, bytes] | None,
) -> str:
    got = logged or {}
    return access_head(method, target, status, sent, seconds, got) + request_id_text(got.get(b"x-request-id"))


def access_head(
    method: bytes, target: bytes, status: int, sent: int, seconds: float, logged: dict[bytes, bytes]
) -> str:
    """An access line up to its request id (``logged``'s id is not read): the same for every request
    of a burst of one page, so a batch may make it once (see :func:`access_line`)."""
    got = logged
    return (
        f'{client_of(got.get(b"x-forwarded-for"))} "{_text(method, 16)} {_text(target, 2000)} HTTP/1.1" '
        f'{status or "-"} {sent} "{_text(got.get(b"referer"))}" "{_text(got.get(b"user-agent"))}" '
        f"{seconds * 1000:.1f}ms id="
    )


def request_id_text(rid: bytes | None) -> str:
    """The end of an access line: its request id."""
    return _text(rid, 64)


class AccessRecord(NamedTuple):
    """An access line's fields, kept as they are on the request path and formatted with their batch."""

    method: bytes
    target: bytes
    status: int
    sent: int
    seconds: float
    logged: dict[bytes, bytes] | None

    def line(self) -> str:
        return access_line(
            method=self.method,
            target=self.target,
            status=self.status,
            sent=self.sent,
            seconds=self.seconds,
            logged=self.logged,
        )
