"""One request on a client connection, from its headers to the end of its response: the state the
client connection (roles/frontend/_client.py) and dispatch (roles/frontend/_dispatch.py) share."""

from __future__ import annotations

from roles.frontend._cache import CacheEntry
from roles.frontend._http import Page
from roles.frontend._routes import Site
from roles.frontend._upstream import Lane, Upstream, UpstreamConnection

__all__ = ["Request"]


class Request:
    """One request on a client connection, from its headers to the end of its response."""

    __slots__ = (
        "answer_version",
        "body_done",
        "body_parts",
        "body_seen",
        "buffered",
        "cache_key",
        "cached",
        "cached_version",
        "chunked",
        "chunked_response",
        "close_after",
        "conn",
        "encoding",
        "expect_continue",
        "fill",
        "fill_version",
        "fresh",
        "head",
        "head_request",
        "held",
        "held_form",
        "http11",
        "keep_alive",
        "kept",
        "kept_for",
        "lane",
        "lane_ok",
        "local",
        "pinned",
        "replayable",
        "response_started",
        "rid",
        "set_cookie",
        "site",
        "started",
        "t0",
        "target",
        "tried",
        "tunnel",
        "upgrade",
        "upstream",
    )

    def __init__(self) -> None:
        self.site: Site | None = None
        self.head = b""
        self.local: Page | None = None  # a platform page answers instead of a worker
        self.keep_alive = True
        self.http11 = True
        self.head_request = False
        self.chunked = False
        self.replayable = False  # idempotent and bodiless: may be sent again after a stale connection
        self.expect_continue = False
        self.body_done = False
        self.body_parts: list[bytes] | None = None
        self.buffered = 0
        self.started = False
        self.response_started = False
        self.chunked_response = False
        self.close_after = False
        self.conn: UpstreamConnection | None = None
        # A GET on a lane (roles/frontend/_lane.py) instead of a connection of its own. Its answer
        # is whole and small, so a slow client never holds up the lane: it is not paused for one.
        self.lane: Lane | None = None
        self.lane_ok = False
        self.target = b""  # kept for lane requests: a refused one is remembered by it
        # What its answer is kept under: scheme, Host as sent and target (RFC 9111 2), as the app
        # may build its answer from any of them.
        self.cache_key = b""
        self.upstream: Upstream | None = None
        self.tried: list[Upstream] | None = None
        self.fresh = False
        self.body_seen = 0
        self.tunnel = False
        self.upgrade = b""
        self.pinned: Upstream | None = None  # the worker an affinity cookie names
        self.set_cookie = b""
        self.t0 = 0.0  # loop time of its first byte: the latency metric runs from here
        # "X-Request-Id: <id>\r\n": sent to the worker (which logs it) and back to the visitor.
        self.rid = b""
        # The front end's cache (roles/frontend/_cache.py): the answer held for this request, its
        # version, and whether the worker's answer may be kept (a plain GET on the lane).
        self.cached: CacheEntry | None = None
        self.cached_version = b""
        self.fill = False
        # An answer held here that is sent without asking a worker (its version feeds say current).
        self.held: CacheEntry | None = None
        # The form of it sent (its head and body: the file as it is, or its gzip form).
        self.held_form: tuple[bytes, bytes] = (b"", b"")
        # An app's answer being kept (its head, then its body's pieces), and the site's version then.
        self.kept: list[bytes] | None = None
        self.kept_for = 0.0
        self.fill_version = b""
        self.answer_version = b""
        self.encoding = b""  # its Accept-Encoding, for an app's answer that varies by it
