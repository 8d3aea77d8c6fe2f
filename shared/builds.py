"""A version's build, as whoever asked for it sees it: the site's workers install its requirements.txt
or package.json when the version reaches them, and write pip's or npm's output to the site's log. The
publisher follows a deploy's build; management follows the build a stopped site's start sets off (a
version published while it was stopped was not built then).

A :class:`BuildFollow` opens each worker's log stream (``GET /v1/sites/{site}/logs?follow=1``, mTLS)
before the deploy's commit or the start, so no line is missed (a worker that does not hold the site
yet is asked again until it does), and passes on the ``build`` and ``worker`` lines until every worker
says (``GET /v1/sites/{site}/app``) it has the version and is not building, or a time limit passes; a
worker whose build of that version failed says why (``build_error``), and the deploy or start then
fails with it. A worker that cannot be reached is left out (after a few seconds, in case it is
restarting): the content is stored by then. When no worker said it serves the version (each one
stopped, or out of reach), the outcome says so: a deploy must not claim to be served when visitors
get 502.

With several workers, their lines and failures are told apart by number, never by address: whoever
deployed is a tenant, and the workers' addresses are the platform's.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field

import aiohttp

from shared.contracts.apps import AppDescription, AppProbe
from shared.errors import NotFound, SitecloudError
from shared.internal import InternalClient
from shared.logs import ContextLogger

__all__ = ["NOT_SERVED_HINT", "BuildFollow", "BuildFollower", "BuildOutcome", "Emit", "build_failure"]

# (source, text): "deploy" for the publisher's own lines, "build" or "worker" for the worker's.
Emit = Callable[[str, str], Awaitable[None]]

_SOURCES = frozenset({"build", "release", "worker"})
# A site log line: "<UTC time> [<source>] <text>".
_LINE = re.compile(r"^\S+ \[(\w+)\] (.*)$")
# How often each worker is asked whether it serves the new version.
_POLL = 0.25
# After the last worker is done, lines it wrote just before are still on their way: wait this long
# without a new line (at most _SETTLE_MAX in all) before ending.
_SETTLE = 0.3
_SETTLE_MAX = 3.0
# The longest an app's start may take with its build and release commands, as workers bound it.
_START_MAX = 1500.0
# A worker that cannot be asked is asked again for this long before the deploy goes on without it.
UNREACHED_GRACE = 5.0
# A worker that does not hold the site yet (it is on its way there) is asked for its log this often.
_NOT_THERE_YET = 0.1

# What to do about a version stored that no worker serves: only an admin can start a worker.
NOT_SERVED_HINT = (
    "ask an admin to start the site's workers (`sitecloud role list`, then `sitecloud role start worker "
    "<host>`): the site serves this version as soon as one runs"
)


@dataclass(frozen=True)
class BuildOutcome:
    # Every worker serves the version with its build over (False: the time ran out first).
    done: bool
    # Worker ("server 1", numbered as the site's workers were given) → why its build of the version
    # failed.
    failed: dict[str, str] = field(default_factory=dict)
    # Done, and not one worker said it serves the version: none is running, or none can be reached.
    unserved: bool = False


def build_failure(failed: dict[str, str]) -> str:
    """Why a version's build failed, as its owner reads it: the build's own error lines from one
    worker (with several, which one: each builds alone, and they fail alike)."""
    first = sorted(failed)[0]
    where = "" if len(failed) == 1 else f" on {len(failed)} servers ({first}'s lines)"
    return f"its build failed{where}: {failed[first]}"


class BuildFollow:
    """One deploy's (or start's) view of its site's workers; open it before the commit, close it after."""

    def __init__(
        self,
        client: InternalClient,
        site: str,
        workers: Sequence[str],
        log: ContextLogger,
        *,
        unreached_grace: float = UNREACHED_GRACE,
    ) -> None:
        self._client = client
        self._site = site
        self._workers = tuple(workers)
        self._log = log
        # A worker that cannot be asked is asked again for this long before the deploy goes on without it.
        self._unreached_grace = unreached_grace
        self._lines: asyncio.Queue[tuple[str, str]] = asyncio.Queue()
        # Whether a build was seen (a line, or a worker building): only then may lines be in flight.
        self._built = False
        self._failed: dict[str, str] = {}
        # With several workers each builds: their lines are told apart by the worker's address.
        self._streams = [asyncio.create_task(self._stream(url)) for url in self._workers]

    def _name(self, url: str) -> str:
        return f"server {self._workers.index(url) + 1}"

    async def _stream(self, url: str) -> None:
        label = f"[{self._name(url)}] " if len(self._workers) > 1 else ""
        try:
            while True:
                async with self._client.session.get(
                    f"{url}/v1/sites/{self._site}/logs",
                    params={"follow": "1", "lines": "0"},
                    timeout=aiohttp.ClientTimeout(total=None, sock_connect=5),
                ) as resp:
                    if resp.status == 404:
                        # The site is on its way to the worker (a started site): its build's first
                        # lines come as soon as it is there.
                        await asyncio.sleep(_NOT_THERE_YET)
                        continue
                    if resp.status != 200:
                        self._log.info("%s does not show the site's log (HTTP %s)", url, resp.status)
                        return
                    async for raw in resp.content:
                        found = _LINE.match(raw.decode("utf-8", "replace").rstrip("\r\n"))
                        if found and found[1] in _SOURCES:
                            self._lines.put_nowait((found[1], label + found[2]))
                    return
        except (aiohttp.ClientError, TimeoutError) as exc:
            self._log.info("cannot follow the site's log on %s: %s", url, exc or type(exc).__name__)

    async def _served(self, url: str, version: int) -> bool | None:
        """Whether the worker serves ``version`` (or a later one) with its build done; None when the
        worker cannot be asked."""
        try:
            app = AppDescription.parse(
                await self._client.get_json(f"{url}/v1/sites/{self._site}/app"), what="unexpected answer"
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
            self._failed[self._name(url)] = app.build_error
        return True

    async def until_served(self, version: int, emit: Emit, *, timeout: float) -> BuildOutcome:
        """Pass on the build's lines until every worker serves ``version`` built, or says its build
        failed; not done when the time ran out first."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        waiting = set(self._workers)
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

    async def probe(
        self, version: int, *, host: str, timeout: float, emit: Emit | None = None
    ) -> AppProbe | None:
        """Once ``version`` is served: its app started on one of the site's workers and asked for ``/``
        (:class:`AppProbe`); None when no worker could be asked. What the start runs first (a Node
        app's build, a release command) writes lines meanwhile: ``emit`` gets them as they come."""
        if emit is None:
            return await self._probe(version, host=host, timeout=timeout)
        probing = asyncio.ensure_future(self._probe(version, host=host, timeout=timeout))
        try:
            while not probing.done():
                getting = asyncio.ensure_future(self._lines.get())
                await asyncio.wait({probing, getting}, return_when=asyncio.FIRST_COMPLETED)
                if getting.done():
                    await emit(*getting.result())
                else:
                    getting.cancel()
        finally:
            if not probing.done():
                probing.cancel()
        # The last lines written before the answer are still on their way.
        with contextlib.suppress(TimeoutError):
            while True:
                await emit(*await asyncio.wait_for(self._lines.get(), _SETTLE))
        return probing.result()

    async def _probe(self, version: int, *, host: str, timeout: float) -> AppProbe | None:
        for url in self._workers:
            try:
                raw = await self._client.post_json(
                    f"{url}/v1/sites/{self._site}/app/probe",
                    params={"version": str(version), "timeout": f"{timeout:g}", "host": host},
                    # The worker answers once the start is done or past its own bound: a build and a
                    # release command may come first (up to ten minutes each, by its settings).
                    timeout=aiohttp.ClientTimeout(total=timeout + _START_MAX),
                )
                return AppProbe.parse(raw, what="unexpected answer")
            except SitecloudError as exc:
                self._log.info("cannot ask %s to try the site's app: %s", url, exc)
        return None

    async def close(self) -> None:
        for task in self._streams:
            task.cancel()
        await asyncio.gather(*self._streams, return_exceptions=True)


class BuildFollower:
    """Opens :class:`BuildFollow` s over one mTLS client of the publisher's."""

    def __init__(
        self, client: InternalClient, log: ContextLogger, *, unreached_grace: float = UNREACHED_GRACE
    ) -> None:
        self._client = client
        self._log = log
        self._unreached_grace = unreached_grace

    @property
    def client(self) -> InternalClient:
        """The mTLS client it asks the workers with (for other calls to them: a site's command)."""
        return self._client

    def open(self, site: str, workers: Sequence[str]) -> BuildFollow:
        return BuildFollow(
            self._client, site, workers, self._log.bind(site=site), unreached_grace=self._unreached_grace
        )

    async def close(self) -> None:
        await self._client.close()
