"""The version feed: front ends learn each site's content version from the worker, ahead of it.

A front end keeps small answers and, while its feed from every worker of a site is live, serves them
without asking (roles/frontend/_feed.py). That is only safe if it can never hold an answer the
worker no longer serves, so a new version is announced before it is served: the worker sends the
notice to every front end on a feed and flips once each has acknowledged it, or once that front
end's lease has run out (a front end that stops answering cuts its own hits off by its lease; its
feed is then cut here too). The lease is the front end's: it pings, and serves hits for ``LEASE``
seconds from when it *sent* the ping answered last, so the worker, which got that ping later, knows
it is over ``LEASE`` seconds after the ping came in.

The front end also reports the answers it gave from its cache; they go to the sites' access logs as
if the worker had answered them.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable, Mapping
from typing import Protocol, cast

from roles.worker._access import AccessRecord, access_head, request_id_text
from roles.worker._cache import SiteVersion
from shared.contracts.feed import FeedNotice, FeedReport
from shared.errors import InvalidInput
from shared.logs import ContextLogger

__all__ = ["LEASE", "FeedSink", "VersionFeeds", "tag_of"]

# Seconds a front end serves hits after the ping last answered was sent. The front end pings
# several times per lease, so a live feed never lapses.
LEASE = 5.0
# A report line longer than this is not a report: the feed is cut.
_MAX_LINE = 4 * 1024 * 1024
_GET = b"GET"


class FeedSink(Protocol):
    """Where a reported hit's access line goes (a site's log stream)."""

    def access(self, text: str | AccessRecord) -> None: ...


class _Feed(asyncio.Protocol):
    """One front end's feed: notices out, reports in."""

    def __init__(self, feeds: VersionFeeds) -> None:
        self._feeds = feeds
        self.transport: asyncio.Transport | None = None
        self._buf = bytearray()
        self.acked = 0
        self.pinged_at = 0.0  # loop time the last ping came in (0: none yet, so no lease out)
        self.closed = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        feeds = self._feeds
        feeds.feeds.add(self)
        # Versions being announced count already: a feed that joins meanwhile must not hold the old.
        self.send(FeedNotice(seq=feeds.seq, whole=True, versions={**feeds.versions(), **feeds.announcing}))

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self._feeds.feeds.discard(self)
        self._feeds.wake()

    def send(self, notice: FeedNotice) -> None:
        if self.transport is not None and not self.closed:
            self.transport.write(notice.model_dump_json().encode() + b"\n")

    def lease_end(self) -> float:
        return self.pinged_at + LEASE if self.pinged_at else 0.0

    def cut(self) -> None:
        self.closed = True
        self._feeds.feeds.discard(self)
        if self.transport is not None:
            self.transport.abort()

    def data_received(self, data: bytes) -> None:
        buf = self._buf
        buf += data
        start = 0
        try:
            while (end := buf.find(b"\n", start)) >= 0:
                self._report(FeedReport.parse_json(bytes(buf[start:end]), what="feed report"))
                start = end + 1
        except (InvalidInput, ValueError) as exc:
            self._feeds.log.warning("cut a front end's feed: %s", exc)
            self.cut()
            return
        del buf[:start]
        if len(buf) > _MAX_LINE:
            self._feeds.log.warning("cut a front end's feed: a report line without an end")
            self.cut()

    def _report(self, report: FeedReport) -> None:
        feeds = self._feeds
        if report.ack is not None and report.ack > self.acked:
            self.acked = report.ack
            feeds.wake()
        if report.ping is not None:
            self.pinged_at = asyncio.get_running_loop().time()
            self.send(FeedNotice(seq=feeds.seq, pong=report.ping))
        # The hits of a report are mostly the same page to the same visitors, told apart by their
        # request ids: each site's log is looked up, and each line up to its id made, once a report.
        sinks: dict[str, FeedSink | None] = {}
        heads: dict[tuple[str, int, int, float | str, str, str, str], str] = {}
        for site, target, status, sent, seconds, rid, client, agent, referer in report.hits:
            if site in sinks:
                sink = sinks[site]
            else:
                sink = sinks[site] = feeds.site_log(site)
            if sink is None:
                continue
            # (-0.0 == 0.0 as a key, but each prints its sign)
            key = (target, status, sent, seconds or str(seconds), client, agent, referer)
            head = heads.get(key)
            if head is None:
                logged = {
                    b"x-forwarded-for": client.encode("latin-1"),
                    b"user-agent": agent.encode("latin-1"),
                    b"referer": referer.encode("latin-1"),
                }
                head = heads[key] = access_head(_GET, target.encode("latin-1"), status, sent, seconds, logged)
            sink.access(head + request_id_text(rid.encode("latin-1")))


class VersionFeeds:
    """Every front end's feed from this serving process."""

    def __init__(
        self,
        versions: Callable[[], dict[str, str]],
        site_log: Callable[[str], FeedSink | None],
        log: ContextLogger,
    ) -> None:
        self.versions = versions
        self.site_log = site_log
        self.log = log
        self.feeds: set[_Feed] = set()
        self.seq = 0
        self._changed = asyncio.Event()
        # Versions announced and not yet served (site → tag).
        self.announcing: dict[str, str] = {}

    def accept(self, transport: asyncio.BaseTransport) -> None:
        """Take over a connection whose front end asked for the feed (its TLS handshake done)."""
        feed = _Feed(self)
        transport.set_protocol(feed)
        feed.connection_made(transport)

    def wake(self) -> None:
        self._changed.set()

    def tell(self, changes: Mapping[str, str]) -> int:
        """Send ``changes`` (site → version tag) to every feed now; returns the notice's number."""
        self.seq += 1
        notice = FeedNotice(seq=self.seq, versions=dict(changes))
        for feed in list(self.feeds):
            feed.send(notice)
        return self.seq

    async def announce(self, changes: Mapping[str, str]) -> None:
        """Tell every front end of ``changes`` and return once none can still serve what they
        replace: each has acknowledged, or its lease is over (its feed is then cut)."""
        if not self.feeds:
            return
        self.announcing.update(changes)
        try:
            await self._acknowledged(self.tell(changes))
        finally:
            for site, tag in changes.items():
                if self.announcing.get(site) == tag:
                    del self.announcing[site]

    async def _acknowledged(self, seq: int) -> None:
        loop = asyncio.get_running_loop()
        while True:
            now = loop.time()
            waiting = [f for f in self.feeds if f.acked < seq and not f.closed]
            late = [f for f in waiting if f.lease_end() <= now]
            for feed in late:
                if feed.pinged_at:
                    self.log.warning("a front end did not acknowledge a version in its lease; cut its feed")
                    feed.cut()
            waiting = [f for f in waiting if not f.closed and f.lease_end() > now]
            if not waiting:
                return
            self._changed.clear()
            until = min(f.lease_end() for f in waiting)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._changed.wait(), max(0.0, until - now) + 0.01)

    def close(self) -> None:
        for feed in list(self.feeds):
            feed.cut()


def tag_of(version: SiteVersion | None) -> str:
    """What a feed names ``version`` by ("" for none: nothing of the site may be served unasked)."""
    return version.tag.decode() if version is not None else ""
