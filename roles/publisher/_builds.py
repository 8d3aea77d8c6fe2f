"""A deploy's build, as whoever deployed sees it: the site's workers install its requirements.txt or
package.json when the new version reaches them, and write pip's or npm's output to the site's log.

A :class:`BuildFollow` opens each worker's log stream (``GET /v1/sites/{site}/logs?follow=1``, mTLS)
before the deploy's commit, so no line is missed, and passes on the ``build`` and ``worker`` lines until
every worker says (``GET /v1/sites/{site}/app``) it has the new version and is not building, or a time
limit passes; a worker whose build of that version failed says why (``build_error``), and the deploy
then fails with it. A worker that cannot be reached is left out (after a few seconds, in case it is
restarting): the content is stored by then. When no worker said it serves the version (each one
stopped, or out of reach), the outcome says so: a deploy must not claim to be served when visitors
get 502.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import aiohttp

from roles.publisher._sites import SiteInfo
from shared.contracts.apps import AppDescription
from shared.errors import NotFound, SitecloudError
from shared.internal import InternalClient
from shared.logs import ContextLogger

__all__ = ["BuildFollow", "BuildFollower", "BuildOutcome", "Emit"]

# (source, text): "deploy" for the publisher's own lines, "build" or "worker" for the worker's.
Emit = Callable[[str, str], Awaitable[None]]

_SOURCES = frozenset({"build", "worker"})
# A site log line: "<UTC time> [<source>] <text>".
_LINE = re.compile(r"^\S+ \[(\w+)\] (.*)$")
# How often each worker is asked whether it serves the new version.
_POLL = 0.25
# After the last worker is done, lines it wrote just before are still on their way: wait this long
# without a new line (at most _SETTLE_MAX in all) before ending.
_SETTLE = 0.3
_SETTLE_MAX = 3.0


@dataclass(frozen=True)
class BuildOutcome:
    # Every worker serves the version with its build over (False: the time ran out first).
    done: bool
    # Worker address → why its build of the version failed.
    failed: dict[str, str] = field(default_factory=dict)
    # Done, and not one worker said it serves the version: none is running, or none can be reached.
    unserved: bool = False


class BuildFollow:
    """One deploy's view of its site's workers; open it before the commit, close it after."""

    def __init__(
        self, client: InternalClient, site: SiteInfo, log: ContextLogger, *, unreached_grace: float
    ) -> None:
        self._client = client
        self._site = site
        self._log = log
        # A worker that cannot be asked is asked again for this long before the deploy goes on without it.
        self._unreached_grace = unreached_grace
        self._lines: asyncio.Queue[tuple[str, str]] = asyncio.Queue()
        # Whether a build was seen (a line, or a worker building): only then may lines be in flight.
        self._built = False
        self._failed: dict[str, str] = {}
        # With several workers each builds: their lines are told apart by the worker's address.
        self._streams = [asyncio.create_task(self._stream(url)) for url in site.workers]

    def _label(self, url: str) -> str:
        return f"[{url.removeprefix('https://')}] " if len(self._site.workers) > 1 else ""

    async def _stream(self, url: str) -> None:
        label = self._label(url)
        try:
            async with self._client.session.get(
                f"{url}/v1/sites/{self._site.name}/logs",
                params={"follow": "1", "lines": "0"},
                timeout=aiohttp.ClientTimeout(total=None, sock_connect=5),
            ) as resp:
                if resp.status != 200:
                    self._log.info("%s does not show the site's log (HTTP %s)", url, resp.status)
                    return
                async for raw in resp.content:
                    found = _LINE.match(raw.decode("utf-8", "replace").rstrip("\r\n"))
                    if found and found[1] in _SOURCES:
                        self._lines.put_nowait((found[1], label + found[2]))
        except (aiohttp.ClientError, TimeoutError) as exc:
            self._log.info("cannot follow the site's log on %s: %s", url, exc or type(exc).__name__)

    async def _served(self, url: str, version: int) -> bool | None:
        """Whether the worker serves ``version`` (or a later one) with its build done; None when the
        worker cannot be asked."""
        try:
            app = AppDescription.parse(
                await self._client.get_json(f"{url}/v1/sites/{self._site.name}/app"), what="unexpected answer"
            )
        except NotFound:
            return False  # the site has not reached this worker yet
        except SitecloudError as exc:
            self._log.info("cannot ask %s about the site's build: %s", url, exc)
            return None
        if app.building:
            self._built = True
            return False
        if app.version is None or app.version < version:
            return False
        if app.version == version and app.build_error is not None:
            self._built = True
            self._failed[url] = app.build_error
        return True

    async def until_served(self, version: int, emit: Emit, *, timeout: float) -> BuildOutcome:
        """Pass on the build's lines until every worker serves ``version`` built, or says its build
        failed; not done when the time ran out first."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        waiting = set(self._site.workers)
        serving = 0
        unreached_since: dict[str, float] = {}
        poll_at = loop.time()
        while waiting:
            now = loop.time()
            if now >= deadline:
                return BuildOutcome(False, dict(self._failed))
            if now >= poll_at:
                for url in sorted(waiting):
                    served = await self._served(url, version)
                    if served is None:
                        # A worker restarting is back within moments: it is asked again for a while,
                        # unless another one serves the version already.
                        first = unreached_since.setdefault(url, now)
                        if serving or loop.time() - first >= self._unreached_grace:
                            waiting.discard(url)
                    elif served:
                        waiting.discard(url)
                        serving += 1
                poll_at = loop.time() + _POLL
                continue
            with contextlib.suppress(TimeoutError):
                source, text = await asyncio.wait_for(self._lines.get(), min(poll_at, deadline) - now)
                self._built = True
                await emit(source, text)
        if not self._built and self._lines.empty():
            return BuildOutcome(True, unserved=not serving)
        settle_until = loop.time() + _SETTLE_MAX
        while (left := min(_SETTLE, settle_until - loop.time())) > 0:
            try:
                source, text = await asyncio.wait_for(self._lines.get(), left)
            except TimeoutError:
                break
            await emit(source, text)
        return BuildOutcome(True, dict(self._failed), unserved=not serving)

    async def close(self) -> None:
        for task in self._streams:
            task.cancel()
        await asyncio.gather(*self._streams, return_exceptions=True)


class BuildFollower:
    """Opens :class:`BuildFollow` s over one mTLS client of the publisher's."""

    def __init__(self, client: InternalClient, log: ContextLogger, *, unreached_grace: float) -> None:
        self._client = client
        self._log = log
        self._unreached_grace = unreached_grace

    def open(self, site: SiteInfo) -> BuildFollow:
        return BuildFollow(
            self._client, site, self._log.bind(site=site.name), unreached_grace=self._unreached_grace
        )

    async def close(self) -> None:
        await self._client.close()
