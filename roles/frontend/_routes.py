"""Host → site → workers: the routing table built from a pushed snapshot (checked as it came:
:class:`~shared.contracts.snapshots.FrontendSnapshot`), and worker choice.

The table is one dict from host name (bytes, lower case, no port) to :class:`Site`: ``<site>.<domain>``
and every custom hostname of the site point at the same object, so a lookup is one hash probe whatever
the number of sites. A site that exists but serves nothing now (stopped, or of a suspended
subscription) is in the table too, with no workers: its visitors get the page that says so.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from roles.frontend._http import Page, offline_page, quota_page
from roles.frontend._upstream import Upstream
from shared.acme import CHALLENGE_PATH
from shared.contracts.snapshots import (
    CustomHostname,
    FrontendSite,
    FrontendSnapshot,
    OfflineSite,
    QuotaStopEntry,
    Refused,
)
from shared.errors import InvalidInput
from shared.names import validate_hostname, validate_site_name
from shared.words import counted

__all__ = [
    "AFFINITY_COOKIE",
    "HSTS_HEADER",
    "CustomCert",
    "Routes",
    "Site",
    "build_routes",
    "failure_figures",
    "parse_worker_address",
]

# Added to the load of a worker that refused a connection lately, so it is tried last.
_DOWN_PENALTY = 1 << 20

# Like Azure's ARRAffinity: names the worker a visitor stays on, for sites that opt in.
AFFINITY_COOKIE = b"SitecloudAffinity"
# One year, as browsers' preload lists ask; not includeSubDomains: a site owns one name, not those under it.
HSTS_HEADER = b"Strict-Transport-Security: max-age=31536000\r\n"


class Site:
    """One site's workers and options; picks the worker with the fewest requests in flight among its
    active ones (the first ``active`` of ``upstreams``), turning to the others, in order, only when
    none of those can take it."""

    __slots__ = (
        "_next",
        "active",
        "active_upstreams",
        "address",
        "affinity",
        "by_token",
        "header",
        "hsts",
        "https_only",
        "lane_off_until",
        "max_body",
        "name",
        "off_lane",
        "standby",
        "stopped",
        "upstreams",
        "usage",
    )

    def __init__(
        self,
        name: str,
        upstreams: tuple[Upstream, ...],
        *,
        usage: list[int],
        affinity: bool = False,
        https_only: bool = False,
        hsts: bool = False,
        max_body: int = 0,
        stopped: Page | None = None,
        address: str = "",
        active: int = 0,
    ) -> None:
        self.name = name
        # 1..len(upstreams): how many take requests; the rest stand by (0, or more than there are: all).
        self.active = active if 0 < active < len(upstreams) else len(upstreams)
        self.active_upstreams, self.standby = upstreams[: self.active], upstreams[self.active :]
        # The name its host names are under: another slot's after a swap, else ``name``.
        self.address = address or name
        self.upstreams = upstreams
        # The trusted header the worker serves by, built once per snapshot rather than per request.
        self.header = b"X-Sitecloud-Site: " + name.encode() + b"\r\n"
        self.affinity = affinity
        self.by_token = {up.token: up for up in upstreams} if affinity else {}
        self.https_only = https_only
        # Added to the site's HTTPS answers (RFC 6797; never on plain HTTP, where browsers ignore it).
        self.hsts = HSTS_HEADER if hsts else b""
        self.max_body = max_body  # 0: no limit
        # Until when (loop time) this site's GETs skip the lane: a worker said its app answers them.
        self.lane_off_until = 0.0
        # Targets a worker refused on its lane (big files): they go on connections of their own.
        self.off_lane: set[bytes] = set()
        # [requests, bytes in, bytes out] since the last usage report; shared across snapshots.
        self.usage = usage
        # The quota page while the site is over a daily quota of its plan: every request gets it.
        self.stopped = stopped
        self._next = 0

    def pick(self, tried: list[Upstream] | None, now: float) -> Upstream | None:
        """A worker not in ``tried``; one that refused a connection lately only when all others did."""
        ups = self.upstreams
        n = len(ups)
        if n == 1:
            only = ups[0]
            return None if tried and only in tried else only
        standby = self.standby
        if standby:
            # One that stands by only when no active one is up and untried, the first of them in turn.
            best = self._least(self.active_upstreams, tried, now)
            if best is None or best.down_until > now:
                for up in standby:
                    if (not tried or up not in tried) and up.down_until <= now:
                        return up
            return best or self._least(standby, tried, now)
        return self._least(ups, tried, now)

    def _least(self, ups: tuple[Upstream, ...], tried: list[Upstream] | None, now: float) -> Upstream | None:
        n = len(ups)
        if n == 0:
            return None
        start = self._next % n
        self._next = start + 1 if start + 1 < n else 0
        best: Upstream | None = None
        best_load = 0
        for i in range(n):
            j = start + i
            up = ups[j if j < n else j - n]
            if tried and up in tried:
                continue
            load = up.outstanding if up.down_until <= now else up.outstanding + _DOWN_PENALTY
            if best is None or load < best_load:
                best, best_load = up, load
        return best

    def pinned(self, cookie: bytes) -> Upstream | None:
        """The worker an affinity cookie in a ``Cookie`` header names, if it is still one of ours."""
        at = cookie.find(AFFINITY_COOKIE + b"=")
        while at > 0 and cookie[at - 1 : at] not in (b" ", b";"):
            at = cookie.find(AFFINITY_COOKIE + b"=", at + 1)
        if at < 0:
            return None
        start = at + len(AFFINITY_COOKIE) + 1
        end = cookie.find(b";", start)
        return self.by_token.get(cookie[start : end if end >= 0 else len(cookie)].strip())


@dataclass(frozen=True, slots=True)
class CustomCert:
    """A custom hostname's own certificate chain and key (PEM), as the snapshot gives them."""

    cert_pem: str
    key_pem: str


@dataclass(slots=True)
class Routes:
    domain: str = ""
    hosts: dict[bytes, Site] = field(default_factory=dict)
    # Custom hostnames with a certificate of their own, for the SNI callback.
    certs: dict[str, CustomCert] = field(default_factory=dict)
    skipped: list[str] = field(default_factory=list)
    # Site entries that could not be used, with why: their visitors get the platform's 503 page.
    failed: dict[str, str] = field(default_factory=dict)
    # Sites that exist but serve nothing now (stopped, suspended): their names get the page saying so.
    offline: set[str] = field(default_factory=set)
    sites: int = 0
    # ACME HTTP-01 answers: (host, request target) -> the key authorization.
    challenges: dict[tuple[bytes, bytes], bytes] = field(default_factory=dict)
    # The platform's wildcard from ACME for <site>.<domain>; None: the cloud CA's one (on disk) is served.
    wildcard: CustomCert | None = None


def failure_figures(failed: dict[str, str]) -> dict[str, Any]:
    """Health figures that say degraded, with why, while a site entry could not be used."""
    if not failed:
        return {}
    first = next(iter(failed.values()))
    return {"status": "degraded", "reason": f"{counted(len(failed), 'site')} cannot be routed: {first}"[:500]}


def parse_worker_address(address: Any) -> tuple[str, int, bool]:
    """``"<host>:<port>"`` from a snapshot, checked: (host, port, tls).

    ``"http://<loopback ip>:<port>"`` is the opt-in plain hop to a worker on the same machine (its
    ``loopback_plain_listen``); anything but a loopback address is refused for it.
    """
    if not isinstance(address, str) or ":" not in address:
        raise InvalidInput(f"worker address {address!r} is not '<host>:<port>'")
    tls = not address.startswith("http://")
    host, _, port = address.removeprefix("http://").rpartition(":")
    if not port.isdigit() or not 0 < int(port) < 65536:
        raise InvalidInput(f"worker address {address!r} has no valid port")
    host = host.strip("[]")
    if not tls:
        try:
            loopback = ipaddress.ip_address(host).is_loopback
        except ValueError:
            loopback = False
        if not loopback:
            raise InvalidInput(f"worker address {address!r}: plain HTTP only to a loopback address")
        return host, int(port), False
    # An IPv6 literal is taken as it is; anything else must be a valid host name.
    return (host if ":" in host else validate_hostname(host)), int(port), True


def _quota_page(stop: QuotaStopEntry | None) -> Page | None:
    return None if stop is None else quota_page(stop.what, stop.limit, stop.unit, stop.until)


def build_routes(
    snapshot: FrontendSnapshot,
    upstream: Callable[[str, int, bool], Upstream],
    usage: Callable[[str], list[int]],
    *,
    default_max_body: int = 0,
) -> Routes:
    """The routing table for a snapshot, and what was skipped.

    ``upstream`` returns the pool for a worker address, so pools (and their warm connections) carry
    over from one snapshot to the next; ``usage`` the counters of a site, which carry over likewise.
    A bad site entry (found as the snapshot was parsed, or a worker address here) fails that site
    alone: it is answered with the platform's 503 page, and reported, so that one entry cannot keep
    every other site from its update. A custom hostname claimed twice goes to neither.
    """
    domain = snapshot.domain
    routes = Routes(domain)
    if isinstance(snapshot.acme_challenges, Refused):
        routes.skipped.append(f"ACME challenges: {snapshot.acme_challenges.reason}")
    else:
        for challenge in snapshot.acme_challenges:
            target = (CHALLENGE_PATH + challenge.token).encode()
            routes.challenges[(challenge.host.encode(), target)] = challenge.key_authorization.encode()
    if isinstance(snapshot.wildcard, Refused):
        routes.skipped.append(
            f"the platform's wildcard certificate: {snapshot.wildcard.reason}; the cloud CA's one is served"
        )
    elif snapshot.wildcard is not None:
        routes.wildcard = CustomCert(snapshot.wildcard.cert_pem, snapshot.wildcard.key_pem)
    hosts = routes.hosts
    suffix = "." + domain
    addresses: dict[str, tuple[str, int, bool]] = {}  # most sites share a few workers: parse each once
    claimed: dict[bytes, str] = {}
    for name, spec in snapshot.sites.items():
        try:
            if isinstance(spec, Refused):
                raise InvalidInput(spec.reason)
            ups: list[Upstream] = []
            for w in dict.fromkeys(spec.workers):
                address = addresses.get(w)
                if address is None:
                    address = addresses[w] = parse_worker_address(w)
                ups.append(upstream(*address))
            # After a slot swap the workers serve this address under the other slot's name.
            serve_as = spec.serve_as or name
            site = Site(
                serve_as,
                tuple(ups),
                usage=usage(serve_as),
                affinity=spec.affinity,
                https_only=spec.https_only,
                hsts=spec.hsts,
                max_body=default_max_body if spec.max_body_bytes is None else spec.max_body_bytes,
                stopped=_quota_page(spec.quota_stop),
                address=name,
                active=spec.active,
            )
        except InvalidInput as err:
            reason = str(err) if isinstance(spec, Refused) else f"site {name!r}: {err}"
            routes.skipped.append(reason)
            if isinstance(spec, FrontendSite) or _valid_site_name(name):
                routes.failed[name] = reason
                hosts[(name + suffix).encode()] = Site(name, (), usage=usage(name))
            continue
        hosts[(name + suffix).encode()] = site
        routes.sites += 1
        for host, cert in _hostnames(spec.hostnames):
            key = host.encode()
            if key in claimed or host.endswith(suffix):
                routes.skipped.append(f"hostname {host!r} of site {name!r}: also claimed elsewhere")
                if claimed.get(key) not in (None, name):
                    hosts.pop(key, None)
                    routes.certs.pop(host, None)
                continue
            claimed[key] = name
            hosts[key] = site
            if cert is not None:
                routes.certs[host] = cert
    for name, entry in snapshot.offline.items():
        _add_offline(routes, name, entry, suffix)
    return routes


def _add_offline(routes: Routes, name: str, entry: OfflineSite | Refused, suffix: str) -> None:
    """A site that serves nothing now: its names get the page that says so. A name a serving site
    holds stays that site's; an entry that cannot be used is left out (its names stay unknown)."""
    if isinstance(entry, Refused):
        routes.skipped.append(f"offline {entry.reason}")
        return
    # No workers, no usage counted: every request gets the page.
    site = Site(name, (), usage=[0, 0, 0], stopped=offline_page(entry.state))
    routes.offline.add(name)
    hosts = routes.hosts
    own = name + suffix
    for host, cert in [(own, None), *_hostnames(entry.hostnames)]:
        key = host.encode()
        if key in hosts or (host != own and host.endswith(suffix)):
            continue
        hosts[key] = site
        if cert is not None:
            routes.certs[host] = cert


def _hostnames(entries: list[str | CustomHostname]) -> list[tuple[str, CustomCert | None]]:
    """A site entry's custom hostnames, each with its own certificate if it has one."""
    return [
        (entry, None) if isinstance(entry, str) else (entry.name, _custom_cert(entry.cert, entry.key))
        for entry in entries
    ]


def _custom_cert(cert: str | None, key: str | None) -> CustomCert | None:
    return CustomCert(cert, key) if cert is not None and key is not None else None


def _valid_site_name(name: str) -> bool:
    try:
        validate_site_name(name)
    except InvalidInput:
        return False
    return True
