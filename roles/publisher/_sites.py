"""The publisher's view of its pushed snapshot: which sites exist, their quotas and publishing users.

The snapshot (:class:`~shared.contracts.snapshots.PublisherSnapshot`, checked as it came) becomes an
immutable table swapped in with one assignment, so FTP threads and the web deploy handlers always see
one whole version, and a site removed from the snapshot stops accepting logins at once.

A stopped site is published to like a running one. A suspended subscription's sites are kept apart:
the lookups that let someone publish never return them; :meth:`SiteTable.suspended_site` finds one
only for a login to be refused, once its password is right, with :func:`suspended_error`.
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

from shared.contracts.snapshots import PublisherSite, PublisherSnapshot
from shared.credentials import verify_password
from shared.errors import Forbidden, InvalidInput, Unavailable
from shared.states import SiteState

__all__ = ["Credentials", "SiteInfo", "SiteTable", "suspended_error"]


@dataclass(frozen=True)
class SiteInfo:
    name: str
    # The site's content id (its store at the file server), never a Unix uid.
    content_id: str
    quota_bytes: int
    users: Mapping[str, str]  # user -> scrypt hash
    # The site names (addresses) this content answers: its own, or after a slot swap the other one's.
    addresses: tuple[str, ...] = ()
    # Control URLs of the workers serving the site: a deploy follows its build in their logs.
    workers: tuple[str, ...] = ()
    state: SiteState = SiteState.RUNNING
    # Workers holding the site that this publisher cannot reach: it cannot tell whether they serve it.
    unreached_workers: int = 0
    # Its subscription (0: not said): whose share of the deploy slots its deploys count against.
    subscription: int = 0

    @property
    def owner(self) -> str:
        """Whose share of the publisher a deploy of it counts against: its subscription's, or its own."""
        return f"subscription {self.subscription}" if self.subscription else f"site {self.name}"

    @property
    def address(self) -> str:
        """The name publishers know it by (where it is served)."""
        return self.addresses[0] if self.addresses else self.name


def suspended_error(name: str) -> Forbidden:
    """What a publishing user of a suspended subscription's site is told, at either door."""
    return Forbidden(
        f"the subscription of site {name} is suspended: nothing can be published to it",
        hint="its content is kept; ask your hosting provider to resume the subscription",
    )


@dataclass(frozen=True)
class _Snapshot:
    version: int
    fileserver: str
    sites: Mapping[str, SiteInfo]
    # user -> site, for FTP logins where the user name is all the client gives.
    logins: Mapping[str, str]
    # address -> site: a name a publisher gives (a deploy URL, ``?site=``) is an address.
    by_address: Mapping[str, str]
    # Sites of suspended subscriptions (by name), and their users: logins to be refused, saying why.
    suspended: Mapping[str, SiteInfo]
    suspended_logins: Mapping[str, str]
    # "https://{site}.<domain>/": where a site is served, for messages to its publishers.
    site_url: str | None = None


def _info(name: str, site: PublisherSite, addresses: list[str]) -> SiteInfo:
    return SiteInfo(
        name,
        site.content_id,
        site.quota_bytes,
        MappingProxyType(dict(site.users)),
        tuple(addresses),
        tuple(w.rstrip("/") for w in site.workers),
        site.state,
        site.unreached_workers,
        site.subscription,
    )


def _table(snapshot: PublisherSnapshot) -> _Snapshot:
    sites: dict[str, SiteInfo] = {}
    suspended: dict[str, SiteInfo] = {}
    owners: dict[str, list[str]] = {}
    by_address: dict[str, str] = {}
    entries = [*snapshot.sites.items(), *snapshot.suspended.items()]
    for name, site in entries:
        if name in sites or name in suspended:
            raise InvalidInput(f"site {name!r} is both publishable and suspended")
        if name in snapshot.suspended or site.state is SiteState.SUSPENDED:
            # Never an address: nothing may publish to it by any name.
            suspended[name] = _info(name, site, [name])
        else:
            addresses = site.addresses if site.addresses is not None else [name]
            for address in addresses:
                if by_address.setdefault(address, name) != name:
                    raise InvalidInput(
                        f"address {address!r} is claimed by {by_address[address]!r} and {name!r}"
                    )
            sites[name] = _info(name, site, addresses)
        for user in site.users:
            owners.setdefault(user, []).append(name)
    # A user name two sites claim would log in to whichever came first; let it log in to neither.
    logins = {user: names[0] for user, names in owners.items() if len(names) == 1}
    return _Snapshot(
        snapshot.version,
        snapshot.fileserver.rstrip("/"),
        MappingProxyType(sites),
        MappingProxyType({u: n for u, n in logins.items() if n in sites}),
        MappingProxyType(by_address),
        MappingProxyType(suspended),
        MappingProxyType({u: n for u, n in logins.items() if n in suspended}),
        snapshot.site_url,
    )


class SiteTable:
    """The current snapshot, readable from any thread."""

    def __init__(self) -> None:
        self._current: _Snapshot | None = None

    def apply(self, snapshot: PublisherSnapshot) -> None:
        # Built whole first, then swapped in with one assignment.
        self._current = _table(snapshot)

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

    def site_at(self, address: str) -> SiteInfo | None:
        """The site whose content answers ``address`` (a slot swap trades two sites' addresses)."""
        current = self._current
        if current is None:
            return None
        name = current.by_address.get(address)
        return current.sites.get(name) if name else None

    def site_url(self, name: str) -> str | None:
        current = self._current
        if current is None or current.site_url is None:
            return None
        return current.site_url.replace("{site}", name)

    def names(self) -> set[str]:
        """Every site this publisher keeps anything for (a suspended one too)."""
        return {site.name for site in self.all()}

    def all(self) -> list[SiteInfo]:
        """Every site this publisher keeps anything for (a suspended one too)."""
        current = self._current
        return [*current.sites.values(), *current.suspended.values()] if current else []

    def site_of_user(self, user: str) -> SiteInfo | None:
        current = self._current
        if current is None:
            return None
        name = current.logins.get(user)
        return current.sites.get(name) if name else None

    def suspended_site(self, name: str | None, user: str = "") -> SiteInfo | None:
        """The suspended subscription's site a login is for: ``name``, or without one ``user``'s site.
        Only ever to refuse the login, saying why."""
        current = self._current
        if current is None:
            return None
        if name is None:
            name = current.suspended_logins.get(user)
        return current.suspended.get(name) if name else None

    def __len__(self) -> int:
        return len(self.all())


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
