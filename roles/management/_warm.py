"""Warming a site before it takes traffic: its first requests answered through every front end.

A swap must not hand visitors an app that is still starting (or broken): the site is asked for ``/``
at its own address through each front end, as a visitor would, until it answers 2xx or 3xx.
"""

from __future__ import annotations

import asyncio
import ssl
import time
from pathlib import Path

from shared.errors import Unavailable

__all__ = ["warm_site"]

# Requests after the first good answer, so that every worker of the site has had one (the front ends
# balance by requests in flight, so concurrent ones spread).
_SPREAD = 4
_RETRY_EVERY = 0.25


async def _get(address: tuple[str, int], host: str, ctx: ssl.SSLContext, timeout: float) -> int:
    """The status of ``GET /`` for ``host`` through the front end at ``address``."""
    reader, writer = await asyncio.wait_for(
        asyncio.open_connection(*address, ssl=ctx, server_hostname=host), timeout
    )
    try:
        writer.write(
            f"GET / HTTP/1.1\r\nHost: {host}\r\nUser-Agent: sitecloud-warmup\r\nConnection: close\r\n\r\n".encode()
        )
        line = await asyncio.wait_for(reader.readline(), timeout)
        parts = line.split(b" ", 2)
        if len(parts) < 2 or not parts[1].isdigit():
            raise ConnectionError(f"not an HTTP answer: {line[:60]!r}")
        return int(parts[1])
    finally:
        writer.close()


async def _warm_one(address: tuple[str, int], host: str, ctx: ssl.SSLContext, deadline: float) -> str:
    """ "" once the site answered well through this front end, else what it last answered."""
    last = "no answer"
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            return last
        try:
            status = await _get(address, host, ctx, min(left, 10.0))
        except (OSError, TimeoutError, ConnectionError, ssl.SSLError) as exc:
            last = f"{type(exc).__name__}: {exc}"
        else:
            if 200 <= status < 400:
                await asyncio.gather(
                    *(_get(address, host, ctx, 10.0) for _ in range(_SPREAD)), return_exceptions=True
                )
                return ""
            last = f"HTTP {status}"
        await asyncio.sleep(_RETRY_EVERY)


async def warm_site(frontends: list[tuple[str, int]], host: str, ca_file: Path, *, timeout: float) -> None:
    """Raise :class:`Unavailable` unless ``host`` answers 2xx/3xx through every front end in ``timeout``."""
    if not frontends:
        raise Unavailable("no front end is running to warm the site through")
    ctx = ssl.create_default_context()
    # The cloud CA signs the platform's names unless an ACME wildcard replaced its certificate.
    ctx.load_verify_locations(ca_file)
    deadline = time.monotonic() + timeout
    results = await asyncio.gather(*(_warm_one(a, host, ctx, deadline) for a in frontends))
    failed = [f"{a[0]}:{a[1]}: {why}" for a, why in zip(frontends, results, strict=True) if why]
    if failed:
        raise Unavailable(
            f"{host} did not answer 2xx/3xx within {timeout:g}s ({'; '.join(failed)[:400]})",
            hint="publish a working site to the slot (it must answer '/') and try the swap again",
        )
