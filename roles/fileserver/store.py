"""The content store: every served site's versions, quota checks, and the change feed.

Sites are known by name from the pushed snapshot and stored by their immutable uid, so a site deleted
and created again under the same name starts empty. Each site has one lock: commits, blob installs and
garbage collection of a site happen one at a time; blocking filesystem work runs in threads.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from roles.fileserver._disk import SiteDir, Upload, move_to_trash, purge_trash, restore_from_trash
from roles.fileserver._manifest import Tree, apply_ops, check_sha256, empty_manifest, human_size
from roles.fileserver.config import FileserverConfig
from roles.fileserver.feed import ChangeFeed
from shared.errors import InvalidInput, NotFound, QuotaExceeded
from shared.logs import get_logger
from shared.paths import site_relpath

__all__ = ["ContentStore"]

_UID = re.compile(r"^[0-9A-Za-z_-]{1,64}$")
_FLUSH_BYTES = 1024 * 1024
_QUOTA_HINT = "delete files, or move the site to a plan with more storage"


@dataclass
class _Site:
    name: str
    uid: str
    quota_bytes: int
    disk: SiteDir
    version: int = 0
    total_bytes: int = 0
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)


def _parse_snapshot(snapshot: dict[str, Any]) -> dict[str, tuple[str, int]]:
    sites = snapshot.get("sites")
    if not isinstance(sites, dict):
        raise InvalidInput("fileserver snapshot needs 'sites': {name: {uid, quota_bytes}}")
    out: dict[str, tuple[str, int]] = {}
    uids: set[str] = set()
    for name, spec in sites.items():
        uid = spec.get("uid") if isinstance(spec, dict) else None
        quota = spec.get("quota_bytes") if isinstance(spec, dict) else None
        if not isinstance(uid, str) or not _UID.match(uid):
            raise InvalidInput(f"site {name!r}: 'uid' must be 1-64 letters, digits, '-' or '_'")
        if not isinstance(quota, int) or isinstance(quota, bool) or quota < 0:
            raise InvalidInput(f"site {name!r}: 'quota_bytes' must be an integer >= 0")
        if uid in uids:
            raise InvalidInput(f"site {name!r}: uid {uid} is used by another site too")
        uids.add(uid)
        out[name] = (uid, quota)
    return out


def _load_site(site: _Site, trash: Path) -> bool:
    """Read a site's newest version from disk; returns True when its content came back from the trash."""
    restored = restore_from_trash(site.disk.root, trash)
    versions = site.disk.version_numbers()
    if versions:
        site.version = versions[-1]
        site.total_bytes = int(site.disk.read_manifest(site.version)["total_bytes"])
    return restored


def _quota_message(site: _Site, total: int) -> str:
    return f"site {site.name} would use {human_size(total)} of its {human_size(site.quota_bytes)} quota"


class ContentStore:
    def __init__(self, config: FileserverConfig) -> None:
        self.config = config
        self._content = config.home / "content"
        self._trash = config.home / "trash"
        self.feed = ChangeFeed(config.state_dir / "feed.json")
        self._sites: dict[str, _Site] = {}
        self._apply_lock = asyncio.Lock()
        self._applied = False
        self._log = get_logger(config.role, host=config.host)
        # Running totals for metrics: versions made, blobs stored (and their bytes).
        self.commits = 0
        self.blobs_received = 0
        self.blob_bytes_received = 0

    async def open(self) -> None:
        await asyncio.to_thread(self.feed.open)

    async def close(self) -> None:
        await self.feed.close()

    # --- snapshot -------------------------------------------------------------------------------

    async def apply_snapshot(self, snapshot: dict[str, Any]) -> None:
        """Serve exactly the snapshot's sites; content of sites that left it goes to the trash."""
        wanted = _parse_snapshot(snapshot)
        async with self._apply_lock:
            old = self._sites
            # Keyed by uid: the same content keeps its lock and state even if its name changed.
            known = {s.uid: s for s in old.values()}
            new: dict[str, _Site] = {}
            fresh: list[_Site] = []
            announce: list[_Site] = []
            for name, (uid, quota) in wanted.items():
                site = known.get(uid)
                if site is None:
                    site = _Site(name, uid, quota, SiteDir(self._content / uid))
                    fresh.append(site)
                    announce.append(site)
                elif site.name != name:
                    site.name = name
                    announce.append(site)
                site.quota_bytes = quota
                new[name] = site
            for site in fresh:
                if await asyncio.to_thread(_load_site, site, self._trash):
                    self._log.bind(site=site.name).info("restored content of uid %s from the trash", site.uid)
            self._sites = new
            kept = {s.uid for s in new.values()}
            for site in old.values():
                if site.uid not in kept:
                    async with site.lock:
                        await self._trash_uid(site.uid, site.name)
            # Content left by sites this process never knew (a snapshot applied before a crash).
            for uid in await asyncio.to_thread(self._uids_on_disk):
                if uid not in kept:
                    await self._trash_uid(uid, None)
            if self._applied:
                # A site that is new (or new under an old name) has a version workers should learn.
                for site in announce:
                    await self.feed.publish(site.name, site.version)
            self._applied = True
        await self.purge_trash()

    def _uids_on_disk(self) -> list[str]:
        if not self._content.is_dir():
            return []
        return [p.name for p in self._content.iterdir() if p.is_dir()]

    async def _trash_uid(self, uid: str, name: str | None) -> None:
        root = self._content / uid
        if await asyncio.to_thread(root.exists):
            target = await asyncio.to_thread(move_to_trash, root, self._trash)
            self._log.bind(site=name).info(
                "site uid %s is no longer served: content moved to %s", uid, target
            )

    async def purge_trash(self) -> None:
        gone = await asyncio.to_thread(purge_trash, self._trash, older_than=self.config.trash_days * 86400)
        for name in gone:
            self._log.info("purged %s from the trash", name)

    # --- reads ----------------------------------------------------------------------------------

    def site(self, name: str) -> _Site:
        site = self._sites.get(name)
        if site is None:
            raise NotFound(f"site {name} is not served by this fileserver")
        return site

    def health(self) -> dict[str, Any]:
        return {
            "sites": len(self._sites),
            "total_bytes": sum(s.total_bytes for s in self._sites.values()),
            "seq": self.feed.seq,
        }

    def info(self, name: str) -> dict[str, Any]:
        site = self.site(name)
        return {
            "site": site.name,
            "version": site.version,
            "total_bytes": site.total_bytes,
            "quota_bytes": site.quota_bytes,
        }

    def versions(self) -> dict[str, Any]:
        return {"seq": self.feed.seq, "sites": {n: s.version for n, s in sorted(self._sites.items())}}

    async def manifest_bytes(self, name: str, version: int | None) -> bytes:
        """A version's manifest as stored (the newest when ``version`` is None)."""
        site = self.site(name)
        wanted = site.version if version is None else version
        if wanted == 0 and site.version == 0:
            return json.dumps(empty_manifest(site.name)).encode()
        if wanted < 1 or wanted > site.version:
            raise NotFound(f"site {site.name} has no version {wanted} (newest is {site.version})")
        try:
            return await asyncio.to_thread(site.disk.read_manifest_bytes, wanted)
        except NotFound:
            raise NotFound(
                f"version {wanted} of site {site.name} is no longer kept",
                hint=f"the last {self.config.keep_versions} versions are kept",
            ) from None

    async def blob_path(self, name: str, sha: str) -> Path:
        site = self.site(name)
        path = site.disk.blob(check_sha256(sha))
        if not await asyncio.to_thread(path.is_file):
            raise NotFound(f"site {site.name} has no blob {sha}")
        return path

    async def file_path(self, name: str, path: str) -> Path:
        """The blob holding a file of the newest version."""
        site = self.site(name)
        rel = site_relpath(path, allow_root=False)
        version = site.version
        if version == 0:
            raise NotFound(f"site {site.name} has no file {rel!r}")
        manifest = await asyncio.to_thread(site.disk.read_manifest, version)
        entry = manifest["files"].get(rel)
        if entry is None:
            if rel in manifest["dirs"]:
                raise InvalidInput(f"{rel!r} in site {site.name} is a directory")
            raise NotFound(f"site {site.name} has no file {rel!r}")
        return site.disk.blob(str(entry["sha256"]))

    # --- writes ---------------------------------------------------------------------------------

    async def upload_blob(
        self, name: str, chunks: AsyncIterator[bytes], length: int | None
    ) -> dict[str, Any]:
        """Store a streamed blob; refused as soon as it alone passes the site's quota."""
        site = self.site(name)

        def too_big(size: int) -> QuotaExceeded:
            return QuotaExceeded(
                f"a file of {'at least ' if length is None else ''}{human_size(size)} does not fit in "
                f"site {site.name}'s {human_size(site.quota_bytes)} quota",
                hint=_QUOTA_HINT,
            )

        if length is not None and length > site.quota_bytes:
            raise too_big(length)
        upload: Upload = await asyncio.to_thread(site.disk.start_upload)
        try:
            buffer = bytearray()
            received = 0
            async for chunk in chunks:
                received += len(chunk)
                if received > site.quota_bytes:
                    raise too_big(received)
                buffer += chunk
                if len(buffer) >= _FLUSH_BYTES:
                    await asyncio.to_thread(upload.write, bytes(buffer))
                    buffer.clear()
            await asyncio.to_thread(upload.write, bytes(buffer))
            sha = await asyncio.to_thread(upload.finish)
            async with site.lock:
                await asyncio.to_thread(site.disk.install, upload, sha)
        except BaseException:
            await asyncio.to_thread(upload.discard)
            raise
        self.blobs_received += 1
        self.blob_bytes_received += upload.size
        return {"sha256": sha, "size": upload.size}

    async def commit(self, name: str, ops: object, *, replace: bool) -> dict[str, Any]:
        """Apply ops all or nothing as a new version; an idempotent commit makes no new version."""
        site = self.site(name)
        async with site.lock:
            if self._sites.get(name) is not site:
                raise NotFound(f"site {name} is not served by this fileserver")
            manifest = await asyncio.to_thread(self._commit, site, ops, replace)
            if manifest is None:
                return {"version": site.version, "total_bytes": site.total_bytes}
            site.version, site.total_bytes = manifest["version"], manifest["total_bytes"]
            self.commits += 1
            await self.feed.publish(site.name, site.version)
        self._log.bind(site=site.name).info(
            "version %s: %s files, %s", site.version, len(manifest["files"]), human_size(site.total_bytes)
        )
        return {"version": site.version, "total_bytes": site.total_bytes}

    def _commit(self, site: _Site, ops: object, replace: bool) -> dict[str, Any] | None:
        current = site.disk.read_manifest(site.version) if site.version else empty_manifest(site.name)
        tree = Tree() if replace else Tree.from_manifest(current)
        apply_ops(tree, ops, blob_size=site.disk.blob_size, now=time.time())
        if tree.same_as(current):
            return None
        total = tree.total_bytes
        # A commit that shrinks the site is let through even when a smaller plan left it over quota.
        if total > site.quota_bytes and total > int(current["total_bytes"]):
            raise QuotaExceeded(_quota_message(site, total), hint=_QUOTA_HINT)
        manifest = tree.manifest(site.name, site.version + 1)
        site.disk.write_manifest(manifest)
        site.disk.prune(self.config.keep_versions)
        return manifest

    # --- upkeep ---------------------------------------------------------------------------------

    async def collect_garbage(self) -> None:
        for site in list(self._sites.values()):
            async with site.lock:
                removed = await asyncio.to_thread(site.disk.collect_garbage, grace=self.config.upload_grace)
            if removed:
                self._log.bind(site=site.name).info("collected %s unused blobs and uploads", removed)
        await self.purge_trash()

    async def maintain(self, stop: asyncio.Event) -> None:
        """Collect garbage now and every ``gc_interval`` seconds until ``stop``."""
        while not stop.is_set():
            try:
                await self.collect_garbage()
            except Exception:
                self._log.exception("garbage collection failed; trying again later")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), self.config.gc_interval)
