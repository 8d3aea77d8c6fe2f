"""The publisher's view of its pushed snapshot: which sites exist, their quotas and publishing users.

The snapshot is parsed into an immutable :class:`SiteTable` and swapped in with one assignment, so FTP
threads and the web deploy handlers always see one whole version, and a site removed from the snapshot
stops accepting logins at once.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

from shared.credentials import verify_password
from shared.errors import InvalidInput, Unavailable
from shared.names import validate_site_name

__all__ = ["Credentials", "SiteInfo", "SiteTable"]


@dataclass(frozen=True)
class SiteInfo:
    name: str
    uid: str
    quota_bytes: int
    users: Mapping[str, str]  # user -> scrypt hash
    # Control URLs of the workers serving the site: a deploy follows its build in their logs.
    workers: tuple[str, ...] = ()


@dataclass(frozen=True)
class _Snapshot:
    version: int
    fileserver: str
    sites: Mapping[str, SiteInfo]
    # user -> site, for FTP logins where the user name is all the client gives.
    logins: Mapping[str, str]
    # "https://{site}.<domain>/": where a site is served, for messages to its publishers.
    site_url: str | None = None


def _parse(snapshot: Mapping[str, Any]) -> _Snapshot:
    fileserver = snapshot.get("fileserver")
    if not isinstance(fileserver, str) or not fileserver.startswith("https://"):
        raise InvalidInput("publisher snapshot needs 'fileserver': 'https://<host>:<port>'")
    raw_sites = snapshot.get("sites")
    if not isinstance(raw_sites, dict):
        raise InvalidInput("publisher snapshot needs a 'sites' object")
    sites: dict[str, SiteInfo] = {}
    owners: dict[str, list[str]] = {}
    for name, raw in raw_sites.items():
        validate_site_name(name)
        if not isinstance(raw, dict):
            raise InvalidInput(f"site {name!r}: expected an object")
        uid, quota, users = raw.get("uid"), raw.get("quota_bytes"), raw.get("users", {})
        if not isinstance(uid, str) or not uid:
            raise InvalidInput(f"site {name!r}: 'uid' must be a non-empty string")
        if not isinstance(quota, int) or isinstance(quota, bool) or quota < 0:
            raise InvalidInput(f"site {name!r}: 'quota_bytes' must be an integer >= 0")
        if not isinstance(users, dict) or not all(
            isinstance(u, str) and u and isinstance(h, str) for u, h in users.items()
        ):
            raise InvalidInput(f"site {name!r}: 'users' must map user names to password hashes")
        workers = raw.get("workers", [])
        if not isinstance(workers, list) or not all(
            isinstance(w, str) and w.startswith("https://") for w in workers
        ):
            raise InvalidInput(f"site {name!r}: 'workers' must list 'https://<host>:<port>' URLs")
        sites[name] = SiteInfo(
            name, uid, quota, MappingProxyType(dict(users)), tuple(w.rstrip("/") for w in workers)
        )
        for user in users:
            owners.setdefault(user, []).append(name)
    site_url = snapshot.get("site_url")
    if site_url is not None and (not isinstance(site_url, str) or "{site}" not in site_url):
        raise InvalidInput("publisher snapshot: 'site_url' must be a string holding '{site}'")
    # A user name two sites claim would log in to whichever came first; let it log in to neither.
    logins = {user: names[0] for user, names in owners.items() if len(names) == 1}
    return _Snapshot(
        int(snapshot.get("version", 0)),
        fileserver.rstrip("/"),
        MappingProxyType(sites),
        MappingProxyType(logins),
        site_url,
    )


class SiteTable:
    """The current snapshot, readable from any thread."""

    def __init__(self) -> None:
        self._current: _Snapshot | None = None

    def apply(self, snapshot: Mapping[str, Any]) -> None:
        # Parse fully first: a bad push raises and leaves the previous table in place.
        self._current = _parse(snapshot)

    @property
    def configured(self) -> bool:
        return self._current is not None

    def _snapshot(self) -> _Snapshot:
        current = self._current
        if current is None:
            raise Unavailable("the publisher has no configuration yet", hint="try again in a moment")
        return current

    @property
    def fileserver(self) -> str:
        return self._snapshot().fileserver

    def site(self, name: str) -> SiteInfo | None:
        current = self._current
        return current.sites.get(name) if current else None

    def site_url(self, name: str) -> str | None:
        current = self._current
        if current is None or current.site_url is None:
            return None
        return current.site_url.replace("{site}", name)

    def names(self) -> set[str]:
        current = self._current
        return set(current.sites) if current else set()

    def all(self) -> list[SiteInfo]:
        current = self._current
        return list(current.sites.values()) if current else []

    def site_of_user(self, user: str) -> SiteInfo | None:
        current = self._current
        if current is None:
            return None
        name = current.logins.get(user)
        return current.sites.get(name) if name else None

    def __len__(self) -> int:
        current = self._current
        return len(current.sites) if current else 0


class Credentials:
    """Checks publishing passwords; remembers recent successes briefly, as scrypt costs ~50 ms a try.

    The cache key binds the stored hash, so a changed password or a re-created site misses it; the
    password itself is kept only as a keyed digest with a per-process secret.
    """

    def __init__(self, *, ttl: float = 60.0, max_entries: int = 4096) -> None:
        self._ttl = ttl
        self._max = max_entries
        self._secret = secrets.token_bytes(32)
        self._ok: dict[tuple[str, str, bytes], float] = {}
        self._lock = threading.Lock()

    def check(self, site: SiteInfo, user: str, password: str) -> bool:
        stored = site.users.get(user)
        if stored is None:
            return False
        key = (user, stored, hmac.new(self._secret, password.encode(), hashlib.sha256).digest())
        now = time.monotonic()
        with self._lock:
            expires = self._ok.get(key)
            if expires is not None and expires > now:
                return True
        if not verify_password(password, stored):
            return False
        with self._lock:
            if len(self._ok) >= self._max:
                self._ok = {k: t for k, t in self._ok.items() if t > now}
                if len(self._ok) >= self._max:
                    self._ok.clear()
            self._ok[key] = now + self._ttl
        return True
