"""Host → site → workers: the routing table built from a pushed snapshot, and worker choice.

The table is one dict from host name (bytes, lower case, no port) to :class:`Site`: ``<site>.<domain>``
and every custom hostname of the site point at the same object, so a lookup is one hash probe whatever
the number of sites.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from roles.frontend._http import Page, quota_page
from roles.frontend._upstream import Upstream
from shared.acme import CHALLENGE_PATH, parse_challenges
from shared.dns01 import PlatformCertificate
from shared.errors import InvalidInput
from shared.names import validate_hostname, validate_site_name

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
    """One site's workers and options; picks the worker with the fewest requests in flight."""

    __slots__ = (
        "_next",
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
    ) -> None:
        self.name = name
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
        start = self._next
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
    return {"status": "degraded", "reason": f"{len(failed)} site(s) cannot be routed: {first}"[:500]}


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


def _valid_site_name(name: str) -> bool:
    try:
        validate_site_name(name)
    except InvalidInput:
        return False
    return True


def _flag(spec: dict[str, Any], key: str) -> bool:
    value = spec.get(key, False)
    if not isinstance(value, bool):
        raise InvalidInput(f"'{key}' must be true or false")
    return value


def _hostnames(spec: dict[str, Any]) -> list[tuple[str, CustomCert | None]]:
    """``"hostnames": ["shop.example.com", {"name": ..., "cert": "<PEM>", "key": "<PEM>"}]``."""
    raw = spec.get("hostnames", [])
    if not isinstance(raw, list):
        raise InvalidInput("'hostnames' must be a list")
    out: list[tuple[str, CustomCert | None]] = []
    for entry in raw:
        if isinstance(entry, str):
            out.append((validate_hostname(entry), None))
            continue
        if not isinstance(entry, dict):
            raise InvalidInput("a hostname is a name or {name, cert, key}")
        name = validate_hostname(entry.get("name", ""))
        cert, key = entry.get("cert"), entry.get("key")
        if cert is None and key is None:
            out.append((name, None))
        elif isinstance(cert, str) and isinstance(key, str) and "BEGIN" in cert and "BEGIN" in key:
            out.append((name, CustomCert(cert, key)))
        else:
            raise InvalidInput(f"hostname {name!r}: 'cert' and 'key' must both be PEM text")
    return out


def _quota_stop(spec: dict[str, Any]) -> Page | None:
    """``"quota_stop": {"what": "bandwidth"|"cpu", "limit": N, "unit": "MB", "until": "<ISO time>"}``."""
    stop = spec.get("quota_stop")
    if stop is None:
        return None
    if not isinstance(stop, dict):
        raise InvalidInput("'quota_stop' must be an object")
    what, limit, unit, until = (stop.get(k) for k in ("what", "limit", "unit", "until"))
    if what not in ("bandwidth", "cpu") or isinstance(limit, bool) or not isinstance(limit, int | float):
        raise InvalidInput("'quota_stop' needs 'what' (bandwidth or cpu) and a numeric 'limit'")
    if not isinstance(unit, str) or not isinstance(until, str) or len(unit) > 16 or len(until) > 40:
        raise InvalidInput("'quota_stop' needs 'unit' and 'until' as short text")
    return quota_page(what, float(limit), unit, until)


def build_routes(
    snapshot: dict[str, Any],
    upstream: Callable[[str, int, bool], Upstream],
    usage: Callable[[str], list[int]],
    *,
    default_max_body: int = 0,
) -> Routes:
    """The routing table for a snapshot, and what was skipped.

    ``upstream`` returns the pool for a worker address, so pools (and their warm connections) carry
    over from one snapshot to the next; ``usage`` the counters of a site, which carry over likewise.
    A bad domain refuses the snapshot; a bad site entry fails that site alone (it is answered with the
    platform's 503 page, and reported) so that one entry cannot keep every other site from its update.
    A custom hostname claimed twice goes to neither.
    """
    domain = validate_hostname(snapshot.get("domain", ""))
    sites = snapshot.get("sites", {})
    if not isinstance(sites, dict):
        raise InvalidInput("'sites' must be an object")
    routes = Routes(domain)
    try:
        for challenge in parse_challenges(snapshot.get("acme_challenges")):
            target = (CHALLENGE_PATH + challenge.token).encode()
            routes.challenges[(challenge.host.encode(), target)] = challenge.key_authorization.encode()
    except InvalidInput as err:
        routes.skipped.append(f"ACME challenges: {err}")
    try:
        wildcard = PlatformCertificate.parse(snapshot.get("wildcard"))
        if wildcard is not None:
            routes.wildcard = CustomCert(wildcard.cert_pem, wildcard.key_pem)
    except InvalidInput as err:
        routes.skipped.append(f"the platform's wildcard certificate: {err}; the cloud CA's one is served")
    hosts = routes.hosts
    suffix = "." + domain
    addresses: dict[Any, tuple[str, int, bool]] = {}  # most sites share a few workers: parse each once
    claimed: dict[bytes, str] = {}
    for name, spec in sites.items():
        try:
            validate_site_name(name)
            if not isinstance(spec, dict):
                raise InvalidInput("a site entry must be an object")
            workers = spec.get("workers", [])
            if not isinstance(workers, list):
                raise InvalidInput("'workers' must be a list of '<host>:<port>'")
            ups: list[Upstream] = []
            for w in dict.fromkeys(workers):
                address = addresses.get(w)
                if address is None:
                    address = addresses[w] = parse_worker_address(w)
                ups.append(upstream(*address))
            max_body = spec.get("max_body_bytes", default_max_body)
            if not isinstance(max_body, int) or isinstance(max_body, bool) or max_body < 0:
                raise InvalidInput("'max_body_bytes' must be a whole number >= 0")
            # After a slot swap the workers serve this address under the other slot's name.
            serve_as: str = validate_site_name(spec.get("serve_as") or name)
            site = Site(
                serve_as,
                tuple(ups),
                usage=usage(serve_as),
                affinity=_flag(spec, "affinity"),
                https_only=_flag(spec, "https_only"),
                hsts=_flag(spec, "hsts"),
                max_body=max_body,
                stopped=_quota_stop(spec),
                address=name,
            )
            custom = _hostnames(spec)
        except (InvalidInput, TypeError) as err:
            routes.skipped.append(f"site {name!r}: {err}")
            if isinstance(name, str) and _valid_site_name(name):
                routes.failed[name] = f"site {name!r}: {err}"
                hosts[(name + suffix).encode()] = Site(name, (), usage=usage(name))
            continue
        hosts[(name + suffix).encode()] = site
        routes.sites += 1
        for host, cert in custom:
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
    return routes
