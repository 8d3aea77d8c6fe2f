"""A worker's version feed, the front end's side (the worker's side: roles/worker/_feed.py).

While the feed from every worker of a site is live, an answer held in the cache whose content version
is the one each of them serves is sent without asking them: the worker announces a new version, and
waits for this front end's acknowledgement (or for its lease to run out) before it serves it. A feed
is live while its lease lasts: ``LEASE`` seconds (less a margin) from sending the ping the worker
answered last. Down, late or unknown, the cache falls back to asking the worker on every request.

The answers given unasked are reported on the feed, for the site's access log on the worker.
"""

from __future__ import annotations

import asyncio
from typing import cast

from pydantic_core import to_json

from roles.frontend._cache import ResponseCache
from roles.frontend._upstream import Hub, Upstream
from shared.contracts.feed import FeedNotice, FeedReport, HeldHit
from shared.errors import InvalidInput
from shared.pki import role_of_peer
from shared.tls import FEED_ALPN

__all__ = ["FeedClient", "run_feed"]

# The worker's lease (roles/worker/_feed.py LEASE), less a margin for this side's timer.
_LEASE = 5.0 - 0.5
_PING_EVERY = 0.5
# Hits reported in one line at most (more go in the next): small lines, so that neither side stalls
# on one (turning 2,000 into a line took a few ms here, and the worker's parse of it more).
_HITS_MAX = 200
_RETRY = 1.0
_MAX_LINE = 16 * 1024 * 1024
# An answer given from the cache, as the request path notes it: site, target, size, request id line,
# client, user agent, referer (see FeedClient.report).
_Hit = tuple[str, bytes, int, bytes, bytes, bytes, bytes]


class FeedClient(asyncio.Protocol):
    """The feed from one worker: the version it serves of each of its sites, and the lease."""

    def __init__(self, proxy: Hub, upstream: Upstream) -> None:
        self._proxy = proxy
        self._upstream = upstream
        self._cache: ResponseCache | None = proxy.cache
        self.transport: asyncio.Transport | None = None
        self.versions: dict[str, bytes] = {}
        # Loop time until which hits may be served on this feed's word (0: not live).
        self.lease_until = 0.0
        self._pings: dict[int, float] = {}
        self._ping = 0
        self._pinged_at = 0.0
        self._buf = bytearray()
        self.hits: list[_Hit] = []
        self.lost = asyncio.Event()

    # -- asked on the request path

    def report(
        self, site: str, target: bytes, size: int, rid: bytes, client: bytes, agent: bytes, referer: bytes
    ) -> None:
        """An answer given from the cache unasked (``rid`` as its header line; the request's User-Agent
        and Referer): turned into an access record with the others, off the request path."""
        hits = self.hits
        hits.append((site, target, size, rid, client, agent, referer))
        if len(hits) == _HITS_MAX:
            # After this turn's answers are written, not before the one being answered now.
            self._proxy.loop.call_soon(self._send_pending)

    # -- the proxy's sweep

    def check(self, now: float) -> None:
        if self.transport is None or self.transport.is_closing():
            return
        if now - self._pinged_at >= _PING_EVERY:
            self._ping += 1
            self._pinged_at = now
            self._pings[self._ping] = now
            self._send_hits(self._ping)
        elif self.hits:
            self._send_hits(None)

    def _send_pending(self) -> None:
        if self.hits:
            self._send_hits(None)

    def _send_hits(self, ping: int | None) -> None:
        hits, self.hits = self.hits, []
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(_report_line(ping, hits))

    def _send(self, report: FeedReport) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(report.model_dump_json().encode() + b"\n")

    def close(self) -> None:
        self.lease_until = 0.0
        if self.transport is not None:
            self.transport.close()

    # -- asyncio.Protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        self._buf.clear()  # (the same object serves each connection to the worker in turn)
        self._pings.clear()

    def connection_lost(self, exc: Exception | None) -> None:
        self.lease_until = 0.0
        self.transport = None
        self.lost.set()

    def data_received(self, data: bytes) -> None:
        buf = self._buf
        buf += data
        start = 0
        try:
            while (end := buf.find(b"\n", start)) >= 0:
                self._notice(FeedNotice.parse_json(bytes(buf[start:end]), what="feed notice"))
                start = end + 1
        except InvalidInput as exc:
            self._proxy.log.warning("bad notice on the feed from %s: %s", self._upstream.address, exc)
            self.lease_until = 0.0
            if self.transport is not None:
                self.transport.abort()
            return
        del buf[:start]
        if len(buf) > _MAX_LINE:
            self.lease_until = 0.0
            if self.transport is not None:
                self.transport.abort()

    def _notice(self, notice: FeedNotice) -> None:
        if notice.pong is not None:
            sent = self._pings.pop(notice.pong, None)
            for old in [n for n in self._pings if n < notice.pong]:
                del self._pings[old]
            if sent is not None:
                self.lease_until = max(self.lease_until, sent + _LEASE)
            return
        cache = self._cache
        news = {site: tag.encode() for site, tag in notice.versions.items()}
        held = self.versions
        changed = {site: tag for site, tag in news.items() if held.get(site) != tag}
        if notice.whole:
            changed.update({site: b"" for site in held.keys() - news.keys()})
            self.versions = news
        else:
            held.update(news)
        if cache is not None:
            for site, tag in changed.items():
                cache.drop_site(site, keep=tag)
        # Taken: from now on nothing of the versions replaced is served from here.
        self._send(FeedReport.model_construct(ack=notice.seq, ping=None, hits=[]))


def _report_line(ping: int | None, hits: list[_Hit]) -> bytes:
    """``FeedReport(ping=ping, hits=hits)`` as its line, the bytes pydantic makes of it. The hits of a
    burst are mostly one page to the same visitors, told apart by their request ids alone: what is
    around the id is made once per report."""
    made: dict[tuple[str, bytes, int, bytes, bytes, bytes], tuple[bytes, bytes]] = {}
    parts: list[bytes] = []
    for site, target, size, rid, client, agent, referer in hits:
        key = (site, target, size, client, agent, referer)
        around = made.get(key)
        if around is None:
            hit = _held_hit(site, target, size, rid, client, agent, referer)
            # pydantic's own JSON (as model_dump_json's) of what comes before the id and after it
            before, after = to_json(hit[:5]), to_json(hit[6:])
            around = made[key] = (before[:-1] + b',"', b'",' + after[1:])
        # (the id is this process's own hex: nothing in it to escape)
        parts.append(around[0] + rid[14:-2] + around[1])
    return b"".join(
        (
            b'{"ack":null,"ping":',
            b"null" if ping is None else b"%d" % ping,
            b',"hits":[',
            b",".join(parts),
            b"]}\n",
        )
    )


def _held_hit(
    site: str, target: bytes, size: int, rid: bytes, client: bytes, agent: bytes, referer: bytes
) -> HeldHit:
    return (
        site,
        target.decode("latin-1"),
        200,
        size,
        0.0,
        rid[14:-2].decode("latin-1"),  # (the value of its "X-Request-Id: ...\r\n" line)
        client.decode("latin-1"),
        agent.strip().decode("latin-1"),
        referer.strip().decode("latin-1"),
    )


async def run_feed(proxy: Hub, upstream: Upstream, feed: FeedClient) -> None:
    """Keep ``feed`` open to ``upstream`` until the worker leaves the routes or the proxy drains."""
    ctx = proxy.feed_ssl
    while not upstream.retired and not proxy.draining:
        feed.lost.clear()
        try:
            transport, _ = await asyncio.wait_for(
                proxy.loop.create_connection(
                    lambda: feed,
                    upstream.host,
                    upstream.port,
                    ssl=ctx,
                    server_hostname=upstream.host,
                    ssl_handshake_timeout=proxy.connect_timeout,
                ),
                proxy.connect_timeout,
            )
        except (OSError, TimeoutError):
            await asyncio.sleep(_RETRY)
            continue
        ssl_object = transport.get_extra_info("ssl_object")
        if (
            role_of_peer(transport.get_extra_info("peercert")) != "worker"
            or ssl_object is None
            or ssl_object.selected_alpn_protocol() != FEED_ALPN
        ):
            transport.abort()  # not a worker, or one without feeds: ask it on every request
            await asyncio.sleep(30 * _RETRY)
            continue
        if upstream.retired or proxy.draining:
            transport.close()
            return
        await feed.lost.wait()
        await asyncio.sleep(_RETRY / 4)
