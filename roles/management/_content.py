"""A site's content read from the fileserver as a zip (a version download, a backup)."""

from __future__ import annotations

from collections.abc import AsyncIterator

import aiohttp

from shared.errors import Unavailable, error_from_json
from shared.internal import InternalClient

__all__ = ["site_zip"]

_CHUNK = 256 * 1024
# A big site's zip is made as it is sent: allow for it, but not for a fileserver that went silent.
_READ_TIMEOUT = 120.0


async def site_zip(
    client: InternalClient, fileserver: str, site: str, version: int | None
) -> AsyncIterator[bytes]:
    """The zip's bytes; an error answer (no such version) raises before the first chunk."""
    url = f"{fileserver}/v1/sites/{site}/zip"
    params = {} if version is None else {"version": str(version)}
    timeout = aiohttp.ClientTimeout(total=None, sock_connect=5, sock_read=_READ_TIMEOUT)
    try:
        async with client.session.get(url, params=params, timeout=timeout) as resp:
            if resp.status >= 400:
                raise error_from_json(resp.status, await resp.json(content_type=None))
            async for chunk in resp.content.iter_chunked(_CHUNK):
                yield chunk
    except (aiohttp.ClientConnectionError, aiohttp.ClientPayloadError, TimeoutError) as exc:
        raise Unavailable(
            f"cannot read site {site}'s content from {url}: {exc or type(exc).__name__}"
        ) from exc
