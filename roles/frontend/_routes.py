"""Host → site → workers: the routing table built from a pushed snapshot, and worker choice."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from roles.frontend._upstream import Upstream
from shared.errors import InvalidInput
from shared.names import validate_hostname, validate_site_name

__all__ = ["Site", "build_routes", "parse_worker_address"]

# Added to the load of a worker that refused a connection lately, so it is tried last.
_DOWN_PENALTY = 1 << 20


class Site:
    """One site's workers; picks the one with the fewest requests in flight (ties: round robin)."""

    __slots__ = ("_next", "header", "name", "upstreams")

    def __init__(self, name: str, upstreams: tuple[Upstream, ...]) -> None:
        self.name = name
        self.upstreams = upstreams
        # The trusted header the worker serves by, built once per snapshot rather than per request.
        self.header = b"X-Sitecloud-Site: " + name.encode() + b"\r\n"
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


def parse_worker_address(address: Any) -> tuple[str, int]:
    """``"<host>:<port>"`` from a snapshot, checked."""
    if not isinstance(address, str) or ":" not in address:
        raise InvalidInput(f"worker address {address!r} is not '<host>:<port>'")
    host, _, port = address.rpartition(":")
    if not port.isdigit() or not 0 < int(port) < 65536:
        raise InvalidInput(f"worker address {address!r} has no valid port")
    host = host.strip("[]")
    # An IPv6 literal is taken as it is; anything else must be a valid host name.
    return (host if ":" in host else validate_hostname(host)), int(port)


def build_routes(
    snapshot: dict[str, Any], upstream: Callable[[str, int], Upstream]
) -> tuple[str, dict[bytes, Site], list[str]]:
    """The routing table for a snapshot: ``b"<site>.<domain>"`` → :class:`Site`, and what was skipped.

    ``upstream`` returns the pool for a worker address, so pools (and their warm connections) carry
    over from one snapshot to the next. A bad domain refuses the snapshot; a bad site entry is left
    out (and reported) so that one entry cannot keep every other site from its update.
    """
    domain = validate_hostname(snapshot.get("domain", ""))
    sites = snapshot.get("sites", {})
    if not isinstance(sites, dict):
        raise InvalidInput("'sites' must be an object")
    routes: dict[bytes, Site] = {}
    skipped: list[str] = []
    for name, spec in sites.items():
        try:
            validate_site_name(name)
            workers = spec.get("workers", []) if isinstance(spec, dict) else None
            if not isinstance(workers, list):
                raise InvalidInput("'workers' must be a list of '<host>:<port>'")
            addresses = [parse_worker_address(w) for w in dict.fromkeys(workers)]
        except (InvalidInput, TypeError) as err:
            skipped.append(f"site {name!r}: {err}")
            continue
        routes[f"{name}.{domain}".encode()] = Site(name, tuple(upstream(h, p) for h, p in addresses))
    return domain, routes, skipped
