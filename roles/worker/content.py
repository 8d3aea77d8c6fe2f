"""Content sync: keep each held site's current version in the local cache, pulled from the fileserver.

One feed task long-polls the fileserver's change feed and records the newest version of every site.
Each site that needs work gets its own task (at most one at a time per site), which does everything
for that site in order: drop a cache that belongs to another incarnation, fetch the manifest,
download missing blobs, build the version directory, flip ``current``, and later prune the old one.
A failure is retried with back-off and never touches another site; serving goes on throughout.
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import itertools
import os
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping
from contextlib import suppress
from typing import Any, TypeVar

import aiohttp

from roles.worker._cache import ContentCache, SiteVersion
from roles.worker._source import is_app_source
from roles.worker.config import WorkerConfig
from shared.backoff import Backoff
from shared.contracts.content import BlobFetch, ChangeFeedPage, FileMeta, Manifest, SiteVersions, VersionDiff
from shared.contracts.health import WorkerFigures
from shared.contracts.snapshots import WorkerSite, WorkerSnapshot
from shared.errors import NotFound, SitecloudError, Unavailable, error_from_json
from shared.files import syncfs
from shared.internal import InternalClient
from shared.logs import get_logger

__all__ = ["ContentSync"]

T = TypeVar("T")

LONG_POLL = 25
# Waits between tries of a failing sync or change feed.
_RETRY = Backoff(first=0.2, cap=10.0)
PARALLEL_SITES = 8
PARALLEL_BLOBS = 4
# Up to this many changed paths (made file by file) are applied in place; more build a new version.
INCREMENTAL_MAX = 2000
_COLLECT_DELAY = 30.0
# A change that comes this soon after the last one (or a site's last sync) is part of a burst (an FTP
# mirror makes a version per file): the feed and the sync wait a moment for more and take them all at
# once, as each costs a round trip, and a sync a diff, its blobs, a syncfs and a flip. A change alone
# is taken and synced at once. The wait doubles while the burst lasts, up to _GATHER_MAX: a mirror of
# 2,000 files then costs the worker and the fileserver a sync per few dozen files, not per ten.
_BURST = 0.05
_GATHER = 0.02
_GATHER_MAX = 0.1
# Blobs up to _BATCH_BLOB bytes are fetched in batches of up to _BATCH_BYTES / _BATCH_COUNT.
_BATCH_BLOB = 256 * 1024
_BATCH_BYTES = 4 * 1024 * 1024
_BATCH_COUNT = 1000


async def _in_thread(fn: Callable[..., T], *args: Any) -> T:
    """Run blocking disk work in a thread; if we are cancelled, still wait for it to end, so that two
    pieces of work on one site's directory never overlap."""
    fut = asyncio.ensure_future(asyncio.to_thread(fn, *args))
    try:
        return await asyncio.shield(fut)
    except asyncio.CancelledError:
        await asyncio.wait([fut])
        raise


class ContentSync:
    """Owns which sites this worker holds and the version of each it serves."""

    def __init__(
        self,
        config: WorkerConfig,
        cache: ContentCache,
        *,
        on_flip: Callable[[str | None], None],
        before_flip: Callable[[str, SiteVersion], Awaitable[None]] | None = None,
        running_on: Callable[[str], set[int]] | None = None,
    ) -> None:
        self._config = config
        self._cache = cache
        self._on_flip = on_flip
        # Awaited before a site serves a new version: front ends that keep answers are told first.
        self._before_flip = before_flip
        # The versions a site's app processes still run on: an old one answers until its successor
        # is up, so its version stays on disk past the grace while it does.
        self._running_on = running_on
        self._log = get_logger("worker", host=config.host)
        self._client = InternalClient(config, timeout=60)
        self._fileserver = ""
        self._held: dict[str, str] = {}
        # The runtime each site's settings name (None: detected from its content; see _packable).
        self._runtimes: dict[str, str | None] = {}
        # Sites of the snapshot that cannot be served, with why (their visitors get a 503 page).
        self._failed: dict[str, str] = {}
        self._configured = False
        # What the cache holds, by site: the content id on disk, and the version being served.
        self._disk_content_id: dict[str, str | None] = {}
        self._current: dict[str, SiteVersion] = {}
        # The newest version of each site the fileserver told us about.
        self._target: dict[str, int] = {}
        self._prune_at: dict[str, float] = {}
        self._synced_at: dict[str, float] = {}
        # The gather wait of each site in a burst of changes now.
        self._gathers: dict[str, float] = {}
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self._feed: asyncio.Task[None] | None = None
        self._slots = asyncio.Semaphore(PARALLEL_SITES)
        # Blob collection runs only while no site is downloading or building (see _collect).
        self._busy = 0
        self._quiet = asyncio.Event()
        self._quiet.set()
        self._collecting = asyncio.Event()
        self._collecting.set()
        self._collect_task: asyncio.Task[None] | None = None
        self._collect_pending = False
        self._blob_bytes = 0
        self._reachable = False
        # Whether the file server has told us every site's newest version since we started: until
        # it has, a site with nothing on disk may well have content, and must not look empty.
        self._versions_known = False
        self._stopping = False

    # -- what the server asks

    def versions(self) -> dict[str, SiteVersion | None]:
        """Every held site's served version (None: none to serve)."""
        return {site: self.lookup(site)[1] for site in self._held}

    def lookup(self, site: str) -> tuple[bool, SiteVersion | None]:
        """(held, version): a held site with no version yet has had nothing published, or has failed
        (see :meth:`failure`)."""
        if self._failed and site in self._failed:
            return True, None
        return site in self._held, self._current.get(site)

    def failure(self, site: str) -> str | None:
        """Why a site this worker was given cannot be served (None: it can)."""
        return self._failed.get(site)

    def pending(self, site: str) -> bool:
        """A held site with nothing to serve yet that has (or may have) content: its visitors get a
        503 with a short Retry-After, never the "nothing published yet" page."""
        if site not in self._held or site in self._current:
            return False
        return not self._versions_known or self._target.get(site, 0) > 0

    def arriving(self, site: str) -> bool:
        """A pending site whose content can come now (the file server answers): its visitors wait
        for it a moment rather than get the 503."""
        return self._reachable and self.pending(site)

    @property
    def failed(self) -> dict[str, str]:
        return dict(self._failed)

    def serving_state(self) -> dict[str, Any]:
        """What serving processes need to answer: per site, its version number and directory (None:
        nothing published yet), or ``{"failed": why}``."""
        current = self._current
        state: dict[str, Any] = {
            site: (
                [current[site].number, current[site].root, current[site].content_id]
                if site in current
                else None
            )
            for site in self._held
        }
        state.update(
            (site, {"pending": True, "arriving": self._reachable})
            for site in self._held
            if self.pending(site)
        )
        state.update((site, {"failed": why}) for site, why in self._failed.items())
        return state

    def figures(self) -> WorkerFigures:
        synced = 0
        for site in self._held:
            have = self._current[site].number if site in self._current else 0
            synced += self._target.get(site, have) == have
        return WorkerFigures(
            sites=len(self._held),
            sites_synced=synced,
            bytes_cached=self._blob_bytes,
            fileserver_reachable=self._reachable,
        )

    # -- the pushed snapshot

    async def apply(self, snapshot: WorkerSnapshot, failed: Mapping[str, str]) -> dict[str, str]:
        """Take the snapshot's sites; returns every site that cannot be served, with why.

        ``failed`` are sites whose entries cannot be used (their app settings, say). Such a site is
        answered with the platform's 503 page while every other site takes the snapshot; its content
        is kept in step, ready for when it is fixed, if its entry at least names its content id.
        """
        fileserver = snapshot.fileserver
        held, unheld = snapshot.content_ids()
        failures = {**failed, **unheld}
        if not self._configured:
            self._configured = True
            await self._load_disk()
        self._held = held
        self._failed = failures
        for gone in set(self._synced_at) - set(held):
            del self._synced_at[gone]
            self._gathers.pop(gone, None)
        self._runtimes = {
            name: entry.runtime for name, entry in snapshot.sites.items() if isinstance(entry, WorkerSite)
        }
        for site in set(held) | set(self._disk_content_id):
            if site in self._current and held.get(site) != self._disk_content_id.get(site):
                # Gone, or another incarnation of the name: stop serving it now; its task cleans up.
                del self._current[site]
                self._on_flip(site)
            if self._needs_work(site):
                self._kick(site)
        fileserver = fileserver.rstrip("/")
        if fileserver != self._fileserver:
            self._fileserver = fileserver
            self._restart_feed()
        return failures

    async def _load_disk(self) -> None:
        """A restarted worker serves what it already has, before any other role answers."""

        def scan() -> tuple[dict[str, str | None], dict[str, SiteVersion], int]:
            self._cache.empty_trash()
            content_ids: dict[str, str | None] = {}
            current: dict[str, SiteVersion] = {}
            for site in self._cache.site_names():
                content_ids[site] = self._cache.read_content_id(site)
                # Versions left from before a restart (an unfinished grace, a half build) go now.
                self._cache.prune(site, set())
                version = self._cache.load_current(site)
                if version is not None:
                    current[site] = version
            return content_ids, current, self._cache.collect_blobs()

        self._disk_content_id, current, self._blob_bytes = await _in_thread(scan)
        # Only what matches the snapshot is served; apply() sorts out the rest.
        self._current = current

    # -- tasks

    def start(self) -> None:
        if self._feed is None:
            self._restart_feed()

    async def stop(self) -> None:
        self._stopping = True
        tasks = [t for t in (self._feed, self._collect_task, *self._tasks.values()) if t is not None]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await self._client.close()

    def _restart_feed(self) -> None:
        if self._feed is not None:
            self._feed.cancel()
            self._feed = None
        if self._fileserver and not self._stopping:
            self._feed = asyncio.get_running_loop().create_task(self._follow(self._fileserver))

    def _needs_work(self, site: str) -> bool:
        content_id = self._held.get(site)
        if site in self._disk_content_id and self._disk_content_id[site] != content_id:
            return True
        if content_id is None or not self._fileserver:
            return False
        have = self._current[site].number if site in self._current else 0
        # A fileserver that says "no version" (0) is not trusted to empty a site that has content.
        target = self._target.get(site, 0)
        if target > 0 and site in self._current and not self._packable(site, ()):
            # Settings that start an app on a version served from packs: its files are made.
            return target != have or self._current[site].files.packed
        return target > 0 and target != have

    def _packable(self, site: str, paths: Iterable[str]) -> bool:
        """Whether a version of ``site`` may keep its small files in packs: no app runs on it (an app
        sees its site as files). One runs when the settings name its runtime, or (none named) when
        the content has code, which is what the app manager detects it from."""
        runtime = self._runtimes.get(site)
        if runtime == "static":
            return True
        return runtime is None and not any(map(is_app_source, paths))

    def _kick(self, site: str) -> None:
        if site not in self._tasks and not self._stopping:
            self._tasks[site] = asyncio.get_running_loop().create_task(self._site_loop(site))

    async def _follow(self, fileserver: str) -> None:
        """Track every site's newest version through the fileserver's change feed."""
        seq: int | None = None
        failures = 0
        last_page = 0.0
        gather = _GATHER
        while True:
            try:
                if seq is None:
                    versions = await self._client.get_contract(SiteVersions, f"{fileserver}/v1/versions")
                    seq = versions.seq
                    self._target = dict(versions.sites)
                    if not self._versions_known:
                        self._versions_known = True
                        self._on_flip(None)  # serving processes learn which sites are truly empty
                    failures = self._back_up(fileserver, failures)
                    for site in self._held:
                        if self._needs_work(site):
                            self._kick(site)
                page = await self._client.get_contract(
                    ChangeFeedPage,
                    f"{fileserver}/v1/changes",
                    params={"since": str(seq), "wait": str(LONG_POLL)},
                    timeout=aiohttp.ClientTimeout(total=LONG_POLL + 15, sock_connect=5),
                )
                if page.reset:
                    seq = None
                    continue
                for change in page.changes:
                    site = change["site"]
                    self._target[site] = change["version"]
                    if site in self._held:
                        self._kick(site)
                seq = page.seq
                failures = self._back_up(fileserver, failures)
                now = time.monotonic()
                if page.changes and now - last_page < _BURST:
                    # A burst of changes (an FTP mirror: a version per file): let the next ones
                    # gather on the fileserver and come in one page, not a round trip each.
                    await asyncio.sleep(gather)
                # Longer while pages come with several changes each, short for one at a time.
                gather = min(gather * 2, _GATHER_MAX) if len(page.changes) > 1 else _GATHER
                # (After the wait: the next page then tells whether the burst goes on.)
                last_page = time.monotonic()
            except Exception as exc:
                if failures == 0:
                    self._log.warning("change feed at %s failed: %r; retrying", fileserver, exc)
                failures += 1
                self._reachable = False
                # Re-read every version after an outage: the feed may have restarted or moved on.
                seq = None
                await asyncio.sleep(_RETRY.delay(failures))

    def _back_up(self, fileserver: str, failures: int) -> int:
        if failures:
            self._log.info("change feed at %s is back", fileserver)
        self._reachable = True
        return 0

    async def _site_loop(self, site: str) -> None:
        me = asyncio.current_task()
        failures = 0
        log = self._log.bind(site=site)
        try:
            while not self._stopping:
                content_id = self._held.get(site)
                if site in self._disk_content_id and self._disk_content_id[site] != content_id:
                    self._current.pop(site, None)
                    self._on_flip(site)
                    await _in_thread(self._cache.drop, site)
                    del self._disk_content_id[site]
                    self._schedule_collect()
                    continue
                if content_id is not None and self._needs_work(site):
                    last = self._synced_at.get(site)
                    gather = self._gathers.get(site, _GATHER)
                    if last is not None and time.monotonic() - last < _BURST:
                        await asyncio.sleep(gather)
                    target = self._target[site]
                    # The wait grows while each finds several versions gathered (a mirror), and
                    # stays short for changes made one at a time (an editor's saves).
                    have = self._current[site].number if site in self._current else 0
                    if target - have > 1 and last is not None:
                        self._gathers[site] = min(gather * 2, _GATHER_MAX)
                    else:
                        self._gathers.pop(site, None)
                    try:
                        async with self._slots:
                            await self._sync(site, content_id, target, log)
                        failures = 0
                        self._synced_at[site] = time.monotonic()
                    except (SitecloudError, OSError) as exc:
                        failures += 1
                        log.warning("sync to version %s failed (attempt %s): %s", target, failures, exc)
                        await asyncio.sleep(_RETRY.delay(failures))
                    except Exception:
                        failures += 1
                        log.exception("sync to version %s failed (attempt %s)", target, failures)
                        await asyncio.sleep(_RETRY.delay(failures))
                    continue
                deadline = self._prune_at.get(site)
                if deadline is not None and deadline <= time.monotonic():
                    del self._prune_at[site]
                    keep = self._running_on(site) if self._running_on is not None else set()
                    current = self._current.get(site)
                    keep.discard(current.number if current is not None else 0)
                    if keep:
                        self._keep_versions_a_while(site)
                    await _in_thread(self._cache.prune, site, keep)
                    self._schedule_collect()
                    continue
                return
        finally:
            if self._tasks.get(site) is me:
                del self._tasks[site]

    async def _sync(self, site: str, content_id: str, target: int, log: Any) -> None:
        base = f"{self._fileserver}/v1/sites/{site}"
        current = self._current.get(site)
        incremental = (
            current is not None
            and 0 < current.number < target
            and self._disk_content_id.get(site) == content_id
            and not (current.files.packed and not self._packable(site, ()))
        )
        if (
            incremental
            and current is not None
            and await self._sync_changes(site, content_id, current, target, base, log)
        ):
            return
        what = f"manifest of {site}"
        try:
            manifest = await self._client.get_contract(
                Manifest, f"{base}/manifest", what=what, params={"version": str(target), "uid": content_id}
            )
        except NotFound:
            # That version was pruned while we were away: take the newest.
            manifest = await self._client.get_contract(
                Manifest, f"{base}/manifest", what=what, params={"uid": content_id}
            )
        manifest.for_site(site)
        version, files, dirs = manifest.version, manifest.files, manifest.dirs
        await self._enter_busy()
        # When each step ended, for the log line: a big site's sync is judged by where its time went.
        steps = [time.monotonic()]
        try:
            # In a thread: tens of thousands of stats would hold up the visitors this process serves.
            missing = await _in_thread(self._cache.missing_blobs, files.values())
            await self._download_all(base, missing)
            steps.append(time.monotonic())
            if missing:
                # One syncfs makes every blob just fetched durable before a version links to them.
                await _in_thread(syncfs, self._cache.blobs)
            steps.append(time.monotonic())
            if self._held.get(site) != content_id:
                return
            self._disk_content_id[site] = content_id
            packed = self._packable(site, files)
            built = await _in_thread(
                functools.partial(self._cache.build_version, packed=packed),
                site,
                content_id,
                version,
                files,
                dirs,
            )
            steps.append(time.monotonic())
        finally:
            self._busy -= 1
            if self._busy == 0:
                self._quiet.set()
        if self._held.get(site) != content_id:
            return
        if self._before_flip is not None:
            await self._before_flip(site, built)
            if self._held.get(site) != content_id:
                self._on_flip(site)  # (front ends are told again of what is served)
                return
        previous = self._current.get(site)
        self._current[site] = built
        self._target[site] = max(self._target.get(site, 0), version)
        self._on_flip(site)
        log.info(
            "serving version %s (%s files, %s new blobs; fetched in %.2f s, synced %.2f s, built %.2f s)",
            version,
            len(files),
            len(missing),
            *(later - earlier for earlier, later in itertools.pairwise(steps)),
        )
        if previous is not None and previous.number != version:
            # Requests already under way may still read the old version for a little while.
            self._keep_versions_a_while(site)

    def _keep_versions_a_while(self, site: str) -> None:
        grace = self._config.version_grace
        self._prune_at[site] = time.monotonic() + grace
        asyncio.get_running_loop().call_later(grace + 0.05, self._kick, site)

    async def _sync_changes(
        self, site: str, content_id: str, current: SiteVersion, target: int, base: str, log: Any
    ) -> bool:
        """Apply only what changed since the served version; False when a whole build is needed."""
        try:
            diff = await self._client.get_contract(
                VersionDiff,
                f"{base}/diff",
                what=f"changes of {site}",
                # Past the limit (or across a deploy) the answer holds no paths: this builds anew then.
                params={
                    "since": str(current.number),
                    "version": str(target),
                    "limit": str(INCREMENTAL_MAX),
                    "uid": content_id,
                },
            )
        except NotFound:
            return False
        diff.for_site(site)
        version, whole, changes, dirs = diff.version, diff.whole, diff.files, diff.new_dirs
        if whole or len(changes) + len(dirs) > INCREMENTAL_MAX:
            return False
        if current.files.packed and not self._packable(site, changes):
            # Code arrived: the site may run an app now, which sees its site as files.
            return False
        if current.files.packed and current.files.changed + len(changes) > INCREMENTAL_MAX:
            # The list of changes is written whole each time: past this, a new index is cheaper.
            return False
        await self._enter_busy()
        try:
            missing = self._cache.missing_blobs(changes.values())
            await self._download_all(base, missing)
            if missing:
                await _in_thread(syncfs, self._cache.blobs)
            if self._held.get(site) != content_id or self._current.get(site) is not current:
                return True
            built = await _in_thread(self._cache.apply_changes, site, current, version, changes, dirs)
        finally:
            self._busy -= 1
            if self._busy == 0:
                self._quiet.set()
        if self._before_flip is not None:
            await self._before_flip(site, built)
            if self._held.get(site) != content_id or self._current.get(site) is not current:
                self._on_flip(site)
                return True
        self._current[site] = built
        self._target[site] = max(self._target.get(site, 0), version)
        self._on_flip(site)
        log.info(
            "serving version %s (%s paths changed, %s new blobs)",
            version,
            len(changes) + len(dirs),
            len(missing),
        )
        if any(meta is None for meta in changes.values()) or len(missing) < len(changes):
            # Replaced and deleted files may have left blobs unused; a scan of every blob is not worth
            # making per upload, so one comes a while after a burst of them.
            self._collect_later()
        return True

    async def _enter_busy(self) -> None:
        # Woken waiters of an Event run after a later clear() too: look again each time, or a
        # collection that started in between would scan while this sync writes blobs.
        while not self._collecting.is_set():
            await self._collecting.wait()
        self._busy += 1
        self._quiet.clear()

    def _collect_later(self) -> None:
        if not self._collect_pending and not self._stopping:
            self._collect_pending = True

            def due() -> None:
                self._collect_pending = False
                self._schedule_collect()

            asyncio.get_running_loop().call_later(_COLLECT_DELAY, due)

    async def _download_all(self, base: str, blobs: list[FileMeta]) -> None:
        # Small blobs travel many to a request; big ones are streamed one by one.
        queue: list[FileMeta | list[FileMeta]] = [b for b in blobs if b.size > _BATCH_BLOB]
        batch: list[FileMeta] = []
        batch_bytes = 0
        for meta in blobs:
            if meta.size <= _BATCH_BLOB:
                batch.append(meta)
                batch_bytes += meta.size
                if batch_bytes >= _BATCH_BYTES or len(batch) >= _BATCH_COUNT:
                    queue.append(batch)
                    batch, batch_bytes = [], 0
        if batch:
            queue.append(batch)

        async def worker() -> None:
            while queue:
                item = queue.pop()
                if isinstance(item, list):
                    await self._download_batch(base, item)
                else:
                    await self._download(base, item)

        runners = [asyncio.ensure_future(worker()) for _ in range(min(PARALLEL_BLOBS, len(queue)))]
        try:
            await asyncio.gather(*runners)
        finally:
            for runner in runners:
                runner.cancel()
            await asyncio.gather(*runners, return_exceptions=True)

    async def _download_batch(self, base: str, metas: list[FileMeta]) -> None:
        """Fetch many small blobs in one request; each is checked against its hash before it is kept."""
        url = f"{base}/blob-fetch"
        try:
            wanted = BlobFetch(sha256=[m.sha256 for m in metas]).to_json()
            async with self._client.session.post(url, json=wanted) as resp:
                if resp.status != 200:
                    body: Any = None
                    with suppress(ValueError, aiohttp.ClientError):
                        body = await resp.json(content_type=None)
                    raise error_from_json(resp.status, body)
                payload = await resp.read()
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise Unavailable(f"cannot fetch {url}: {exc or type(exc).__name__}") from exc

        def keep() -> int:
            at, total = 0, 0
            blobs: list[tuple[str, bytes]] = []
            for meta in metas:
                size = int.from_bytes(payload[at : at + 8], "big")
                data = payload[at + 8 : at + 8 + size]
                at += 8 + size
                if len(data) != meta.size or hashlib.sha256(data).hexdigest() != meta.sha256:
                    raise Unavailable(f"blob {meta.sha256} arrived corrupt ({len(data)} bytes)")
                blobs.append((meta.sha256, data))
                total += size
            # One file for the batch: a file per blob costs an inode each, most of a big deploy's sync.
            self._cache.write_pack(blobs)
            return total

        # Not `+= await`: that reads the tally before the await, and a download finishing meanwhile
        # would be lost from it.
        kept = await _in_thread(keep)
        self._blob_bytes += kept

    async def _download(self, base: str, meta: FileMeta) -> None:
        """Stream one blob to a temp file, check its hash and size, then rename it into place."""
        fd, tmp = self._cache.new_blob_file(meta.sha256)
        url = f"{base}/blobs/{meta.sha256}"
        try:
            digest, size = hashlib.sha256(), 0
            with os.fdopen(fd, "wb") as f:
                try:
                    async with self._client.session.get(url) as resp:
                        if resp.status != 200:
                            body: Any = None
                            with suppress(ValueError, aiohttp.ClientError):
                                body = await resp.json(content_type=None)
                            raise error_from_json(resp.status, body)
                        async for chunk in resp.content.iter_chunked(256 * 1024):
                            digest.update(chunk)
                            size += len(chunk)
                            f.write(chunk)
                except (aiohttp.ClientError, TimeoutError) as exc:
                    raise Unavailable(f"cannot fetch {url}: {exc or type(exc).__name__}") from exc
                f.flush()
            if digest.hexdigest() != meta.sha256 or size != meta.size:
                raise Unavailable(f"blob {meta.sha256} arrived corrupt ({size} bytes)")
            self._cache.commit_blob(tmp, meta.sha256, meta.mtime)
            self._blob_bytes += size
        finally:
            with suppress(FileNotFoundError):
                os.unlink(tmp)

    def _schedule_collect(self) -> None:
        if self._collect_task is None and not self._stopping:
            self._collect_task = asyncio.get_running_loop().create_task(self._collect())

    async def _collect(self) -> None:
        """Delete blobs nothing links to. It must not run while a site downloads or builds, or it
        would take a blob just fetched and not yet linked."""
        try:
            while self._busy:
                await self._quiet.wait()
            self._collecting.clear()
            try:
                self._blob_bytes = await _in_thread(self._cache.collect_blobs)
            finally:
                self._collecting.set()
        finally:
            self._collect_task = None
