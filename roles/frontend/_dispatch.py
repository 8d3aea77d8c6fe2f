"""Dispatch and retry: which worker a request goes to, what carries it there, and where it goes again
when that fails. :meth:`Site.pick <roles.frontend._routes.Site.pick>` orders a site's workers; this
module applies it to one request:

- the worker: the one an affinity cookie pins while it is up and untried, else ``Site.pick``'s (and a
  new pin is set for a site with affinity);
- the carrier: a lane (roles/frontend/_lane.py) for a small GET, else an idle pooled connection, else a
  new one;
- a connection that cannot be made: the next worker, whatever the method (nothing reached any worker);
- a pooled connection the worker had closed, or a worker withdrawn from the routes ("stale"): once
  more, by the routes as they are then, if the request is idempotent and bodiless (RFC 9110 9.2.2);
- a GET a lane refuses (421): again on a connection of its own, and its target or the whole site kept
  off the lane for a while.
"""

from __future__ import annotations

from typing import Protocol

from roles.frontend._http import PAGES
from roles.frontend._proxy import Proxy
from roles.frontend._request import Request
from roles.frontend._routes import AFFINITY_COOKIE, Site
from roles.frontend._upstream import Owner, Upstream, UpstreamConnection

__all__ = ["Client", "dispatch", "keep_off_lane", "release", "resend_stale", "skip_lane"]

# How long a site whose app answers its GETs keeps them off the lane before the lane is tried again.
_LANE_OFF_FOR = 30.0
# How many refused targets a site remembers (then it starts over).
_OFF_LANE_MAX = 1024


class Client(Owner, Protocol):
    """The client connection, as dispatch sees it."""

    @property
    def closing(self) -> bool: ...
    def attach(self, req: Request, conn: UpstreamConnection, *, reused: bool) -> None: ...
    def answer_failure(self, req: Request) -> None: ...


def dispatch(client: Client, proxy: Proxy, req: Request, https: bool) -> bool:
    """Send ``req`` to a worker; False when none is left to try (``req.local`` then says why)."""
    site = req.site
    assert site is not None
    now = proxy.loop.time()
    up = req.pinned
    if up is None or up.down_until > now or (req.tried and up in req.tried):
        up = site.pick(req.tried, now)
        if up is None:
            req.local = PAGES[502 if site.upstreams else 503]
            return False
        if site.affinity:
            req.set_cookie = b"".join(
                (
                    b"Set-Cookie: ",
                    AFFINITY_COOKIE,
                    b"=",
                    up.token,
                    b"; Path=/; HttpOnly; SameSite=Lax",
                    b"; Secure\r\n" if https else b"\r\n",
                )
            )
    req.upstream = up
    up.outstanding += 1
    if req.lane_ok and not req.fresh and site.lane_off_until <= now:
        lane = proxy.lane(up, now)
        if lane is not None:
            req.lane = lane
            lane.submit(client, req, req.head)
            return True
    if not req.fresh:
        conn = up.take_idle()
        if conn is not None:
            client.attach(req, conn, reused=True)
            return True
    proxy.spawn(_connect(client, proxy, req, up, https))
    return True


async def _connect(client: Client, proxy: Proxy, req: Request, up: Upstream, https: bool) -> None:
    try:
        conn = await proxy.open(up)
    except (OSError, TimeoutError):
        if req.upstream is not up or client.closing:
            return
        release(req)
        req.tried = [up] if req.tried is None else [*req.tried, up]
        # Nothing reached any worker yet (the body so far is buffered), so any method may move on.
        if not dispatch(client, proxy, req, https):
            client.answer_failure(req)
        return
    if client.closing or req.upstream is not up or req.conn is not None:
        up.put_idle(conn, proxy.upstream_max_idle, proxy.loop.time() + proxy.upstream_idle_timeout)
        return
    client.attach(req, conn, reused=False)


def resend_stale(client: Client, proxy: Proxy, req: Request, https: bool) -> bool:
    """Send ``req`` once more after a stale connection failed it, if that is safe; False if not sent.

    Stale: a pooled connection the worker had already closed, or a worker withdrawn from the routes
    (_upstream.UpstreamConnection.withdraw)."""
    if not req.replayable or req.fresh:
        return False
    req.fresh = True
    old = req.site
    site = proxy.current(old) if old is not None else None
    if site is None:
        return False
    if old is not None and site.header != old.header:
        # A slot swap meanwhile: the address is now the other site's. The head must name the site its
        # answer will be kept under (visitors' own X-Sitecloud-Site headers were dropped, so the line
        # is the front end's).
        req.head = req.head.replace(old.header, site.header, 1)
    req.site = site
    if req.pinned is not None and req.pinned.retired:
        req.pinned = None
    return dispatch(client, proxy, req, https)


def release(req: Request) -> None:
    """``req`` no longer counts against the worker it was sent to."""
    up = req.upstream
    if up is not None:
        up.outstanding -= 1
        req.upstream = None


def skip_lane(site: Site, target: bytes) -> None:
    """``target`` of ``site`` goes on connections of its own from now on (a file too big for a lane)."""
    if len(site.off_lane) >= _OFF_LANE_MAX:
        site.off_lane.clear()
    site.off_lane.add(target)


def keep_off_lane(site: Site, target: bytes, *, site_wide: bool, plain: bool, now: float) -> None:
    """A lane refused a GET: the whole site's GETs stay off lanes for a while (its app answers them),
    or, for a plain GET (no range or conditional), this target does (a file too big to keep). A range
    or conditional request may be refused where a plain one would not, so it teaches nothing."""
    if site_wide:
        site.lane_off_until = now + _LANE_OFF_FOR
    elif plain:
        skip_lane(site, target)
