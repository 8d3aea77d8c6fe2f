"""Scheduled backups: each site on a plan with backups on has its current content written as a zip.

A backup is ``<home>/backups/<site>/<UTC stamp>-v<version>.zip``, written beside its name and renamed
in place once whole (never half a zip under a backup's name). When the next one is due follows from the
newest file's stamp, so a restarted management neither skips nor repeats one. A site whose content has
not changed since its newest backup gets no new copy of the same version (the older, different versions
stay kept instead); it is looked at again one interval later. Only the last ``keep`` of a site are kept. The loop runs in the service's event loop and streams each zip from the fileserver;
file writes run in threads, so the API is never held up.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import os
import re
import shutil
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from shared.errors import InvalidInput, NotFound, SitecloudError
from shared.logs import ContextLogger
from shared.names import validate_site_name

__all__ = [
    "BACKUP_EVERY_MAX",
    "BACKUP_KEEP_MAX",
    "BACKUP_NAME_PATTERN",
    "BackupFile",
    "Due",
    "ScheduledBackups",
    "check_backup_every",
    "human_every",
    "parse_every",
]

BACKUP_EVERY_MAX = 366 * 86400
# Each backup is a whole copy of the site: a few dozen is plenty.
BACKUP_KEEP_MAX = 100
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}
_STAMP = "%Y%m%dT%H%M%SZ"
# The one shape of a backup's file name; anything else in a site's folder is not a backup.
BACKUP_NAME_PATTERN = r"^\d{8}T\d{6}Z-v\d{1,9}\.zip$"
_NAME = re.compile(r"(?P<stamp>\d{8}T\d{6}Z)-v(?P<version>\d{1,9})\.zip")
# Between looks at what is due; the shortest allowed interval bounds it from above.
_TICK_MAX = 30.0
_EPOCH = dt.datetime.fromtimestamp(0, dt.UTC)


def human_every(seconds: int) -> str:
    """``86400`` → ``1d``; ``5400`` → ``90m``; 0 → ``off``."""
    if seconds == 0:
        return "off"
    for unit in ("w", "d", "h", "m"):
        if seconds % _UNITS[unit] == 0:
            return f"{seconds // _UNITS[unit]}{unit}"
    return f"{seconds}s"


def parse_every(text: str) -> int:
    """``1d``, ``6h``, ``30m``, ``45s``, ``2w``, a bare number of seconds, or ``off`` → seconds."""
    value = text.strip().lower()
    if value in ("off", "0"):
        return 0
    match = re.fullmatch(r"(\d{1,9})([smhdw]?)", value)
    if match is None:
        raise InvalidInput(
            f"{text!r} is not an interval", hint="give e.g. 1d, 6h, 30m, 2w, a number of seconds, or off"
        )
    return int(match[1]) * _UNITS[match[2] or "s"]


def check_backup_every(value: Any, minimum: int) -> int:
    """A plan's ``backup_every_seconds``: 0 (off), or from the cloud's minimum to a year."""
    if (
        not isinstance(value, int)
        or isinstance(value, bool)
        or not (value == 0 or minimum <= value <= BACKUP_EVERY_MAX)
    ):
        raise InvalidInput(
            f"'backup_every_seconds' must be 0 (off) or from {minimum} ({human_every(minimum)}) "
            f"to {BACKUP_EVERY_MAX} ({human_every(BACKUP_EVERY_MAX)}), not {value!r}"
        )
    return value


@dataclass(frozen=True)
class BackupFile:
    name: str
    site: str
    version: int
    created: dt.datetime
    size: int
    path: Path

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "version": self.version,
            "created_at": self.created.isoformat(),
            "bytes": self.size,
        }


@dataclass(frozen=True)
class Due:
    """A site whose plan has backups on."""

    site: str
    every_seconds: int
    keep: int


def _parse(path: Path) -> tuple[dt.datetime, int] | None:
    match = _NAME.fullmatch(path.name)
    if match is None:
        return None
    created = dt.datetime.strptime(match["stamp"], _STAMP).replace(tzinfo=dt.UTC)
    return created, int(match["version"])


class ScheduledBackups:
    """The backups folder of one management, and the loop that fills it."""

    def __init__(
        self,
        root: Path,
        *,
        min_every: int,
        schedule: Callable[[], Awaitable[tuple[list[Due], set[str]]]],
        newest_version: Callable[[str], Awaitable[int | None]],
        zip_of: Callable[[str, int], AsyncIterator[bytes]],
        log: ContextLogger,
    ) -> None:
        self.root = root
        self._schedule = schedule
        self._newest_version = newest_version
        self._zip_of = zip_of
        self._log = log
        self._tick = min(_TICK_MAX, max(0.2, min_every / 4))
        # Sites found unchanged when due, and when: the next look is one interval after that.
        self._unchanged_at: dict[str, dt.datetime] = {}

    def _folder(self, site: str) -> Path:
        # The site name is the one trust boundary between a request and a path here.
        return self.root / validate_site_name(site)

    def of_site(self, site: str) -> list[BackupFile]:
        """A site's backups, oldest first."""
        folder = self._folder(site)
        found: list[BackupFile] = []
        try:
            entries = list(folder.iterdir())
        except FileNotFoundError:
            return []
        for path in entries:
            parsed = _parse(path)
            if parsed is None:
                continue
            try:
                size = path.stat().st_size
            except FileNotFoundError:
                continue  # pruned meanwhile
            found.append(BackupFile(path.name, site, parsed[1], parsed[0], size, path))
        # Stamped names sort by time; the API pages by name too.
        return sorted(found, key=lambda b: b.name)

    def find(self, site: str, name: str) -> BackupFile:
        """One backup by its file name (as listed); anything else is refused before a path is made."""
        if _NAME.fullmatch(name) is None:
            raise InvalidInput(
                f"{name!r} is not a backup name", hint="backup names look like 20261203T120000Z-v3.zip"
            )
        for backup in self.of_site(site):
            if backup.name == name:
                return backup
        raise NotFound(f"site {site} has no backup {name}", hint=f"see `sitecloud site backups {site}`")

    async def run(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            try:
                await self.run_once()
            except asyncio.CancelledError:
                raise
            except Exception:  # a failed round is logged; the next one tries again
                self._log.exception("scheduled backups: a round failed")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), self._tick)

    async def run_once(self) -> None:
        sites, existing = await self._schedule()
        await asyncio.to_thread(self.sweep, existing)
        now = dt.datetime.now(dt.UTC)
        for due in sites:
            backups = await asyncio.to_thread(self.of_site, due.site)
            newest = backups[-1] if backups else None
            last = max([b.created for b in backups[-1:]] + [self._unchanged_at.get(due.site, _EPOCH)])
            if last + dt.timedelta(seconds=due.every_seconds) > now:
                continue
            try:
                await self._take(due, now, newest)
            except (SitecloudError, OSError) as exc:
                # One site's failure (fileserver away, disk full) leaves the others' backups be.
                self._log.bind(site=due.site).warning("scheduled backup not taken: %s", exc)

    def sweep(self, existing: set[str]) -> None:
        """Backups go with their site (however it was deleted: a new site of that name is someone
        else's); leftover temporaries of an interrupted write go too."""
        try:
            folders = list(self.root.iterdir())
        except FileNotFoundError:
            return
        for site in set(self._unchanged_at) - existing:
            del self._unchanged_at[site]
        for folder in folders:
            if folder.name not in existing:
                shutil.rmtree(folder, ignore_errors=True)
                self._log.info("backups of deleted site %s removed", folder.name)
                continue
            for part in folder.glob(".*.part"):
                part.unlink(missing_ok=True)

    async def _take(self, due: Due, now: dt.datetime, newest: BackupFile | None) -> None:
        version = await self._newest_version(due.site)
        if version is None:
            return  # nothing published yet
        if newest is not None and newest.version == version:
            self._unchanged_at[due.site] = now
            self._log.bind(site=due.site).debug(
                "scheduled backup not needed: version %s is already in %s", version, newest.name
            )
            return
        self._unchanged_at.pop(due.site, None)
        folder = self._folder(due.site)
        name = f"{now.strftime(_STAMP)}-v{version}.zip"
        target = folder / name
        partial = folder / f".{name}.part"
        await asyncio.to_thread(folder.mkdir, parents=True, exist_ok=True)
        f = await asyncio.to_thread(partial.open, "wb")
        size = 0
        try:
            async for chunk in self._zip_of(due.site, version):
                await asyncio.to_thread(f.write, chunk)
                size += len(chunk)
            await asyncio.to_thread(_finish, f, partial, target)
        except BaseException:
            f.close()
            partial.unlink(missing_ok=True)
            raise
        self._log.bind(site=due.site).info(
            "scheduled backup %s written: version %s, %s bytes", name, version, size
        )
        pruned = await asyncio.to_thread(self._prune, due.site, due.keep)
        if pruned:
            self._log.bind(site=due.site).info("scheduled backups pruned: %s", ", ".join(pruned))

    def _prune(self, site: str, keep: int) -> list[str]:
        backups = self.of_site(site)
        gone = backups[: max(0, len(backups) - keep)]
        for backup in gone:
            backup.path.unlink(missing_ok=True)
        return [b.name for b in gone]


def _finish(f: Any, partial: Path, target: Path) -> None:
    f.flush()
    os.fsync(f.fileno())
    f.close()
    partial.replace(target)
    # The rename itself durable: the folder's entry.
    fd = os.open(target.parent, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
