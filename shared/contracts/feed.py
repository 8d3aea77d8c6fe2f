"""The version feed between a worker and a front end (docs/architecture.md, "The version feed").

One JSON object per line each way on a long-lived mTLS connection to the worker's data port (ALPN
``sitecloud-feed/1``). The worker says which content version each of its sites serves, and says a
new one *before* serving it; the front end acknowledges each notice, pings to keep its lease, and
reports the answers it gave from its cache without asking (for the sites' access logs).
"""

from __future__ import annotations

from pydantic import Field

from shared.contracts._base import Contract

__all__ = ["FeedNotice", "FeedReport", "HeldHit"]

# A site's content version as a front end's cache names it ("<content id>.<number>"); "" when the
# site has none it may be served from (not held, nothing published, failed, or changed in place).
VersionTag = str

# One answer a front end gave from its cache: site, target, status, bytes sent, seconds, and the
# request id, client address, user agent and referer for the access line (empty when absent).
HeldHit = tuple[str, str, int, int, float, str, str, str, str]


class FeedNotice(Contract):
    """Worker to front end. ``whole``: ``versions`` is every site held (the first notice on a feed);
    otherwise only the sites that changed. ``pong`` answers the front end's ping of that number."""

    seq: int = Field(default=0, ge=0)
    whole: bool = False
    versions: dict[str, VersionTag] = Field(default_factory=dict)
    pong: int | None = None


class FeedReport(Contract):
    """Front end to worker: the notices taken up to ``ack``, a ping, and answers given from the cache."""

    ack: int | None = None
    ping: int | None = None
    hits: list[HeldHit] = Field(default_factory=list)
