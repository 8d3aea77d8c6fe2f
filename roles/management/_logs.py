"""A site's logs, read from the workers that hold it (`sitecloud site logs NAME [--follow]`).

Each worker serves its part of the site's log on its control port (app output and access lines, see
docs/architecture.md); a site on several workers gets their lines merged as they come, each line
prefixed with the worker's host for an admin, with a number for a tenant (as ``site show`` names
them): the platform's hosts and addresses are no tenant's business.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncGenerator, AsyncIterator

import aiohttp

from shared.errors import NotFound, Unavailable, error_from_json
from shared.internal import InternalClient, unreached_reason

__all__ = ["ended_by", "stream_site_logs"]

# Follow streams stay open; only a worker that goes silent longer than its keep-alive is given up on.
_FOLLOW_READ_TIMEOUT = 60.0


async def _lines_from(
    client: InternalClient, url: str, follow: bool, lines: int, *, label: str, by_host: bool
) -> AsyncIterator[bytes]:
    timeout = aiohttp.ClientTimeout(total=None if follow else 30, sock_read=_FOLLOW_READ_TIMEOUT)
    params = {"lines": str(lines), **({"follow": "1"} if follow else {})}
    try:
        async with client.session.get(url, params=params, timeout=timeout) as resp:
            if resp.status >= 400:
                raise error_from_json(resp.status, await resp.json(content_type=None))
            async for line in resp.content:
                yield line
    except (aiohttp.ClientConnectionError, TimeoutError) as exc:
        if by_host:
            raise Unavailable(
                f"the site's log cannot be read from worker {label} ({unreached_reason(exc)})",
                hint="see `sitecloud role list`",
            ) from exc
        raise Unavailable(
            f"the site's log cannot be read now: {label} is unavailable", hint="try again in a moment"
        ) from exc


async def stream_site_logs(
    client: InternalClient,
    site: str,
    workers: list[tuple[str, str]],
    *,
    follow: bool,
    lines: int,
    by_host: bool,
) -> AsyncGenerator[bytes, None]:
    """``by_host``: lines and errors name the workers' hosts (an admin's view)."""
    if not workers:
        raise NotFound(f"site {site} is on no worker yet", hint="try again in a few seconds")
    several = len(workers) > 1
    sources = [
        (host if by_host else f"server {number}" if several else "its server", f"{url}/v1/sites/{site}/logs")
        for number, (host, url) in enumerate(workers, 1)
    ]
    if not several:
        label, url = sources[0]
        async for line in _lines_from(client, url, follow, lines, label=label, by_host=by_host):
            yield line
        return
    queue: asyncio.Queue[bytes | None] = asyncio.Queue(maxsize=1000)

    async def pump(label: str, url: str) -> None:
        prefix = f"[{label}] ".encode()
        try:
            async for line in _lines_from(client, url, follow, lines, label=label, by_host=by_host):
                await queue.put(prefix + line)
        except Unavailable as err:
            await queue.put(prefix + f"(log unavailable: {err.message})\n".encode())
        finally:
            await queue.put(None)

    tasks = [asyncio.create_task(pump(label, url)) for label, url in sources]
    try:
        open_sources = len(tasks)
        while open_sources:
            item = await queue.get()
            if item is None:
                open_sources -= 1
            else:
                yield item
    finally:
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task


async def ended_by(lines: AsyncGenerator[bytes, None], stop: asyncio.Event) -> AsyncIterator[bytes]:
    """``lines`` until ``stop`` is set, then the end: a follow never ends by itself, so a stopping
    management ends it rather than hold its drain for it (the CLI opens it again)."""
    stopped = asyncio.ensure_future(stop.wait())
    step: asyncio.Future[bytes] | None = None
    try:
        while True:
            step = asyncio.ensure_future(anext(lines))
            await asyncio.wait((step, stopped), return_when=asyncio.FIRST_COMPLETED)
            if not step.done():
                return
            try:
                line = step.result()
            except StopAsyncIteration:
                return
            yield line
    finally:
        stopped.cancel()
        if step is not None and not step.done():
            step.cancel()
            with contextlib.suppress(asyncio.CancelledError, StopAsyncIteration):
                await step
        await lines.aclose()
