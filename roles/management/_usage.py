"""Storage used per site, asked of the fileserver (``GET /v1/sites/{site}`` over mTLS), best effort.

Pages must not wait on a slow or absent fileserver: each ask has a short timeout, answers are cached
for a little while, and when the fileserver does not answer, the last size it gave stands (asked again
next time); a size it never gave is ``None`` (the portal says "unknown").
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable

from shared.contracts.content import SiteContentInfo
from shared.errors import InvalidInput, NotFound, SitecloudError
from shared.internal import InternalClient

__all__ = ["StorageReader"]

_TTL = 15.0
_TIMEOUT = 2.0
_PARALLEL = 16


class StorageReader:
    def __init__(self, client: InternalClient, fileservers: Callable[[], Awaitable[list[str]]]) -> None:
        self._client = client
        self._fileservers = fileservers
        self._cache: dict[str, tuple[float, int | None]] = {}
        self._gate = asyncio.Semaphore(_PARALLEL)

    async def _one(self, base: str, site: str) -> int | None:
        async with self._gate:
            try:
                answer = await asyncio.wait_for(self._client.get_json(f"{base}/v1/sites/{site}"), _TIMEOUT)
            except NotFound:
                return 0  # nothing stored for it yet
            except (SitecloudError, TimeoutError):
                return None
        try:
            return SiteContentInfo.parse(answer).total_bytes
        except InvalidInput:
            return None

    def forget(self, site: str) -> None:
        """Ask again next time (after a deploy through us, the next page shows the new size); the
        old one stays as the last known."""
        hit = self._cache.get(site)
        if hit is not None:
            self._cache[site] = (0.0, hit[1])

    async def sizes(self, sites: list[str]) -> dict[str, int | None]:
        now = time.monotonic()
        out: dict[str, int | None] = {}
        wanted = []
        for site in sites:
            hit = self._cache.get(site)
            if hit and hit[0] > now:
                out[site] = hit[1]
            else:
                wanted.append(site)
        if wanted:
            bases = await self._fileservers()
            if not bases:
                return {**out, **dict.fromkeys(wanted)}
            got = await asyncio.gather(*(self._one(bases[0], site) for site in wanted))
            for site, size in zip(wanted, got, strict=True):
                if size is None:
                    # A moment without an answer does not make the stored content unknown.
                    known = self._cache.get(site)
                    out[site] = known[1] if known is not None else None
                    continue
                self._cache[site] = (now + _TTL, size)
                out[site] = size
        return out
