"""The proxy's shared state: the routing table, worker pools, open connections, and the timeout sweep.

Timeouts are deadlines (plain floats) on each connection, checked by one periodic sweep, so that the
request path never creates or cancels a timer.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import os
import time
from collections.abc import Coroutine
from typing import Any, Protocol

from roles.frontend._admission import AddressLimit
from roles.frontend._cache import CacheEntry, ResponseCache, gzip_form
from roles.frontend._feed import FeedClient, run_feed
from roles.frontend._handshakes import HandshakeGate
from roles.frontend._http import Page, text_page
from roles.frontend._lane import NO_LANE_FOR, LaneConnection
from roles.frontend._routes import CustomCert, Site, build_routes, failure_figures
from roles.frontend._upstream import Lane, Pooled, Upstream, UpstreamConnection
from roles.frontend.config import FrontendConfig
from shared.contracts.snapshots import FrontendSnapshot
from shared.logs import ContextLogger
from shared.metrics import HttpCounts
from shared.pki import role_of_peer
from shared.tls import FEED_ALPN, LANE_ALPN, client_context

__all__ = ["Client", "Proxy", "UpstreamRefused"]

# Client connections cut or closed at most per sweep, and how soon the next sweep comes when some wait.
_CUTS_PER_SWEEP = 32
_SWEEP_AGAIN = 0.01

# How long a worker that refused a connection is tried last.
_DOWN_FOR = 2.0
# Snapshots with more sites than this are turned into a routing table in a thread.
_BIG_SNAPSHOT = 2000


_HEALTHZ_OK = text_page(200, b"OK", b"ok\n")
_HEALTHZ_NO_ROUTES = text_page(503, b"Service Unavailable", b"no routes: no config snapshot applied yet\n")
_HEALTHZ_DRAINING = text_page(503, b"Service Unavailable", b"draining: this front end is stopping\n")


class Client(Protocol):
    """A visitor's connection (roles/frontend/_client.py), as the sweep and the drain see it."""

    def check(self, now: float) -> bool: ...
    def close_if_idle(self) -> None: ...
    def abort(self) -> None: ...
    @property
    def stalled_since(self) -> float: ...


class UpstreamRefused(OSError):
    """The peer at a worker address is not a worker."""


class Proxy:
    def __init__(self, config: FrontendConfig, log: ContextLogger) -> None:
        self.config = config
        self.log = log
        self.loop = asyncio.get_running_loop()
        self.domain = ""
        # Swapped whole on each snapshot: a lookup never sees half of one.
        self.routes: dict[bytes, Site] = {}
        self.sites = 0
        self.failed_sites: dict[str, str] = {}
        # Custom hostnames' own certificates (the SNI callback reads this), and usage per site.
        self.certs: dict[str, CustomCert] = {}
        # The platform's ACME wildcard for <site>.<domain>, when the snapshot has one.
        self.wildcard: CustomCert | None = None
        # ACME HTTP-01 answers the controller asked every front end to serve: (host, target) -> answer.
        self.challenges: dict[tuple[bytes, bytes], bytes] = {}
        self.usage: dict[str, list[int]] = {}
        # Answers by status class and latency, counted on the request path (see shared.metrics).
        self.counts = HttpCounts()
        # Open visitor connections per client address, and the most each may hold.
        self.admission = AddressLimit(config.max_connections_per_ip, self.counts, log)
        # The share of this process's time new TLS handshakes may take when they come in a wave.
        self.handshakes = HandshakeGate(self.loop, config.handshake_share)
        self.applied = False
        self.public_https_port = config.public_https or config.https_port
        self.upstreams: dict[str, Upstream] = {}
        self.clients: set[Client] = set()
        self.upstream_conns: set[Pooled] = set()
        self.draining = False
        self._drained = asyncio.Event()
        self.header_timeout = config.header_timeout
        self.idle_timeout = config.idle_timeout
        self.body_timeout = config.body_timeout
        self.max_stalled_readers = config.max_stalled_readers
        self.stalled_grace = config.stalled_grace
        self.stalled_cut = 0
        self.max_header_bytes = config.max_header_bytes
        self.max_headers = config.max_headers
        self.connect_timeout = config.connect_timeout
        self.response_timeout = config.response_timeout
        self.upstream_idle_timeout = config.upstream_idle_timeout
        self.upstream_max_idle = config.upstream_max_idle
        self._ssl = client_context(config)
        self.lanes_per_worker = config.lanes_per_worker
        self._lane_ssl = client_context(config)
        self._lane_ssl.set_alpn_protocols([LANE_ALPN])
        self.feed_ssl = client_context(config)
        self.feed_ssl.set_alpn_protocols([FEED_ALPN])
        self._tasks: set[asyncio.Task[None]] = set()
        self._applying = asyncio.Lock()
        shortest = min(
            config.header_timeout, config.idle_timeout, config.body_timeout, config.response_timeout
        )
        # Often enough that connections timing out together (a slowloris wave) are cut a few at a time.
        self._tick = max(0.02, min(0.25, shortest / 5))
        self._sweeper: asyncio.TimerHandle | None = None
        self.cache = (
            ResponseCache(config.cache_bytes, config.cache_max_entry) if config.cache_bytes > 0 else None
        )
        # Request ids: this process's random prefix and a count, unique across processes and restarts.
        self._rid_prefix = b"X-Request-Id: " + os.urandom(6).hex().encode() + b"-"
        self._rid_next = 0

    def request_id(self) -> bytes:
        """The next request's ``X-Request-Id`` header line."""
        self._rid_next += 1
        return b"%b%x\r\n" % (self._rid_prefix, self._rid_next)

    # -- config ---------------------------------------------------------------------------------------

    async def apply(self, snapshot: FrontendSnapshot) -> None:
        async with self._applying:  # one at a time, in the order they came (a build may be in a thread)
            await self._apply(snapshot)

    async def _apply(self, snapshot: FrontendSnapshot) -> None:
        started = time.perf_counter()
        used: dict[str, Upstream] = {}

        def upstream(host: str, port: int, tls: bool) -> Upstream:
            address = f"{host}:{port}" if tls else f"http://{host}:{port}"
            up = used.get(address) or self.upstreams.get(address) or Upstream(host, port, tls)
            used[address] = up
            return up

        new_usage: dict[str, list[int]] = {}

        def usage(site: str) -> list[int]:
            counters = self.usage.get(site) or new_usage.get(site)
            if counters is None:
                counters = new_usage[site] = [0, 0, 0]
            return counters

        if len(snapshot.sites) + len(snapshot.offline) > _BIG_SNAPSHOT:
            # A big table is built off the loop (which only reads our state meanwhile), so requests
            # go on being answered while it is made; the swap below is one step on the loop.
            routes = await asyncio.to_thread(
                build_routes, snapshot, upstream, usage, default_max_body=self.config.max_body_bytes
            )
        else:
            routes = build_routes(snapshot, upstream, usage, default_max_body=self.config.max_body_bytes)
        self.usage.update(new_usage)
        for problem in routes.skipped[:20]:
            self.log.warning("snapshot version %s: left out %s", snapshot.version, problem)
        if len(routes.skipped) > 20:
            self.log.warning("... and %s more problems", len(routes.skipped) - 20)
        self.domain, self.routes, self.certs, self.sites = (
            routes.domain,
            routes.hosts,
            routes.certs,
            routes.sites,
        )
        self.failed_sites = routes.failed
        self.challenges = routes.challenges
        self.wildcard = routes.wildcard
        self.applied = True
        if self.cache is not None:
            # A site gone from the routes takes its answers along (a site made again under its
            # name has a new content id, which its entries' versions would not match anyway), and so
            # does one that went offline: it serves nothing until it is started.
            self.cache.drop_sites({site.name for site in routes.hosts.values()} - routes.offline)
        for address, old in self.upstreams.items():
            if address not in used:
                old.retired = True
                old.close_idle()
                if old.feed is not None:
                    old.feed.close()
        self.upstreams = used
        for conn in [c for c in self.upstream_conns if c.upstream.retired]:
            conn.withdraw()
        # The table lives until the next snapshot: keep the cyclic collector from walking it over and
        # over (with 100k sites a full collection would stall requests for a long moment).
        gc.freeze()
        self.log.info(
            "routing %s sites (%s hostnames) from version %s, built in %.3f s",
            routes.sites,
            len(routes.hosts),
            snapshot.version,
            time.perf_counter() - started,
        )

    # -- upstream connections -------------------------------------------------------------------------

    async def open(self, upstream: Upstream) -> UpstreamConnection:
        """A new mTLS connection to a worker; the peer must hold a worker certificate.

        A failure marks the worker down for a moment (balancing tries it last) and is logged once,
        not once per request.
        """
        try:
            conn = await self._open(upstream)
        except (OSError, TimeoutError) as exc:
            if upstream.down_until == 0.0:
                self.log.warning(
                    "cannot connect to worker %s: %s", upstream.address, exc or type(exc).__name__
                )
            upstream.down_until = self.loop.time() + _DOWN_FOR
            raise
        if upstream.down_until:
            self.log.info("worker %s is reachable again", upstream.address)
            upstream.down_until = 0.0
        return conn

    async def _open(self, upstream: Upstream) -> UpstreamConnection:
        if not upstream.tls:  # the opt-in plain hop to loopback: nothing to verify
            _, plain = await asyncio.wait_for(
                self.loop.create_connection(
                    lambda: UpstreamConnection(self, upstream), upstream.host, upstream.port
                ),
                self.connect_timeout,
            )
            return plain
        _, conn = await asyncio.wait_for(
            self.loop.create_connection(
                lambda: UpstreamConnection(self, upstream),
                upstream.host,
                upstream.port,
                ssl=self._ssl,
                server_hostname=upstream.host,
                ssl_handshake_timeout=self.connect_timeout,
            ),
            self.connect_timeout,
        )
        transport = conn.transport
        if transport is None or role_of_peer(transport.get_extra_info("peercert")) != "worker":
            conn.abort()
            raise UpstreamRefused(f"{upstream.address} did not present a worker certificate")
        return conn

    def lane(self, upstream: Upstream, now: float) -> Lane | None:
        """The least loaded open lane to ``upstream``, opening more (in the background) up to
        ``lanes_per_worker``; None while there is none yet."""
        best: Lane | None = None
        for lane in upstream.lanes:
            if lane.usable() and (best is None or lane.load < best.load):
                best = lane
        if (
            len(upstream.lanes) + upstream.lanes_opening < self.lanes_per_worker
            and upstream.tls
            and upstream.no_lane_until <= now
            and upstream.down_until <= now
            and not upstream.retired
            and not self.draining
        ):
            upstream.lanes_opening += 1
            self.spawn(self._open_lane(upstream))
        return best

    async def _open_lane(self, upstream: Upstream) -> None:
        try:
            _, lane = await asyncio.wait_for(
                self.loop.create_connection(
                    lambda: LaneConnection(self, upstream),
                    upstream.host,
                    upstream.port,
                    ssl=self._lane_ssl,
                    server_hostname=upstream.host,
                    ssl_handshake_timeout=self.connect_timeout,
                ),
                self.connect_timeout,
            )
        except (OSError, TimeoutError) as exc:
            # Requests go on ordinary connections meanwhile; those report a worker that is down.
            self.log.debug("no lane to %s: %s", upstream.address, exc or type(exc).__name__)
            upstream.no_lane_until = self.loop.time() + _DOWN_FOR
            return
        finally:
            upstream.lanes_opening -= 1
        transport = lane.transport
        ssl_object = transport.get_extra_info("ssl_object") if transport is not None else None
        if transport is None or role_of_peer(transport.get_extra_info("peercert")) != "worker":
            lane.abort()
            self.log.warning("%s did not present a worker certificate", upstream.address)
            upstream.no_lane_until = self.loop.time() + NO_LANE_FOR
        elif ssl_object is None or ssl_object.selected_alpn_protocol() != LANE_ALPN:
            lane.close()
            upstream.no_lane_until = self.loop.time() + NO_LANE_FOR
        elif upstream.retired or self.draining or upstream.no_lane_until > self.loop.time():
            lane.close()
        else:
            upstream.lanes.append(lane)

    def compress(self, site: str, target: bytes, entry: CacheEntry) -> None:
        """Make the gzip form of a kept file's answer in a thread (zlib lets the loop go on); until it
        is there, the file goes as it is."""
        cache = self.cache
        if cache is None or entry.compressing:
            return
        entry.compressing = True

        def made(done: asyncio.Future[tuple[bytes, bytes]]) -> None:
            if done.cancelled() or done.exception() is not None:
                entry.compressing = entry.compressible = False
                return
            head, body = done.result()
            cache.add_gzip(site, target, entry, head, body)

        self.loop.run_in_executor(None, gzip_form, entry.head, entry.body).add_done_callback(made)

    def ensure_feed(self, upstream: Upstream | None) -> None:
        """Open ``upstream``'s version feed, once it has given an answer worth keeping."""
        if upstream is None or upstream.feed is not None or not upstream.tls or upstream.retired:
            return
        if self.cache is None or self.draining:
            return
        upstream.feed = feed = FeedClient(self, upstream)
        self.spawn(run_feed(self, upstream, feed))

    def held_fresh(self, site: Site, entry: CacheEntry) -> bool:
        """Whether ``entry`` may be sent without asking: every worker that takes the site's requests
        has a live feed that says the entry's version is the one it serves (and an app's answer is
        not expired). One standing by is asked when it takes over, as its feed opens then."""
        ups = site.active_upstreams
        if not ups or site.affinity:
            return False  # (an affinity site's visitors get their worker's cookie on each answer)
        now = self.loop.time()
        if entry.expires and entry.expires <= now:
            return False
        name = site.name
        version = entry.version
        for up in ups:
            feed = up.feed
            if feed is None or feed.lease_until <= now or feed.versions.get(name) != version:
                return False
        return True

    def feed_version(self, site: Site) -> bytes | None:
        """The version every live feed of the site's workers names (None: unknown or not agreed)."""
        now = self.loop.time()
        found: bytes | None = None
        for up in site.upstreams:
            feed = up.feed
            if feed is None or feed.lease_until <= now:
                return None
            version = feed.versions.get(site.name)
            if not version or (found is not None and version != found):
                return None
            found = version
        return found

    def current(self, site: Site) -> Site | None:
        """The same site in the routes now (a request keeps the routes it arrived with)."""
        return self.routes.get(f"{site.address}.{self.domain}".encode())

    def spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        task = self.loop.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # -- timeouts -------------------------------------------------------------------------------------

    def start(self) -> None:
        self._sweeper = self.loop.call_later(self._tick, self._sweep)

    def _sweep(self) -> None:
        now = self.loop.time()
        # Connections that time out together (a slowloris wave) are cut a few dozen per loop turn,
        # each a TLS answer and a close, so the visitors' requests get turns between them.
        cut = 0
        for client in list(self.clients):
            if client.check(now):
                cut += 1
                if cut >= _CUTS_PER_SWEEP:
                    break
        if self.max_stalled_readers:
            self._cut_stalled_readers(now)
        for conn in list(self.upstream_conns):
            conn.check(now)
        for up in self.upstreams.values():
            if up.feed is not None:
                up.feed.check(now)
        delay = self._tick if cut < _CUTS_PER_SWEEP else _SWEEP_AGAIN
        self._sweeper = self.loop.call_later(delay, self._sweep)

    def _cut_stalled_readers(self, now: float) -> None:
        """Past ``max_stalled_readers`` visitors that stopped reading an answer, the ones stalled
        longest (at least ``stalled_grace``) are cut: each holds about a megabyte here."""
        stalled = [(since, c) for c in self.clients if (since := c.stalled_since)]
        excess = len(stalled) - self.max_stalled_readers
        if excess <= 0:
            return
        stalled.sort(key=lambda pair: pair[0])
        cut = 0
        for since, client in stalled[:excess]:
            if now - since < self.stalled_grace:
                break
            client.abort()
            cut += 1
        if cut:
            self.stalled_cut += cut
            self.log.warning("cut %d visitor connections that stopped reading their answers", cut)

    # -- figures and lifecycle ------------------------------------------------------------------------

    def health(self) -> dict[str, Any]:
        return {
            **failure_figures(self.failed_sites),
            "domain": self.domain,
            "sites": self.sites,
            "hostnames": len(self.routes),
            # Which certificate <site>.<domain> is served with: the platform's from ACME, or the cloud CA's.
            "wildcard": "acme" if self.wildcard is not None else "cloud-ca",
            "client_connections": len(self.clients),
            "connections_refused": self.counts.refused_connections,
            "stalled_readers_cut": self.stalled_cut,
            # New TLS handshakes that waited for their share of this process's time, and wait now.
            "tls_handshakes_waited": self.handshakes.held,
            "tls_handshakes_waiting": self.handshakes.queued,
            "upstream_connections": len(self.upstream_conns),
            "upstream_idle": sum(len(up.idle) for up in self.upstreams.values()),
            "upstream_lanes": sum(len(up.lanes) for up in self.upstreams.values()),
            **(
                {
                    "cache_entries": len(self.cache),
                    "cache_bytes": self.cache.size,
                    "cache_hits": self.cache.hits,
                    "cache_fills": self.cache.fills,
                    # Hits sent without asking a worker (a live version feed said they are current).
                    "cache_held_hits": self.cache.held_hits,
                    "cache_feeds_live": sum(
                        1
                        for up in self.upstreams.values()
                        if up.feed is not None and up.feed.lease_until > self.loop.time()
                    ),
                }
                if self.cache is not None
                else {}
            ),
        }

    def healthz(self) -> Page:
        """For an L4 balancer's checks: 200 only while this front end has routes to serve from."""
        if self.draining:
            return _HEALTHZ_DRAINING
        return _HEALTHZ_OK if self.applied else _HEALTHZ_NO_ROUTES

    def client_gone(self, client: Client) -> None:
        self.clients.discard(client)
        if self.draining and not self.clients:
            self._drained.set()

    async def drain(self, timeout: float) -> None:
        """Finish requests in flight (each connection closes after its response), then close the rest."""
        self.draining = True
        for client in list(self.clients):
            client.close_if_idle()
        if self.clients:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._drained.wait(), timeout)
        for client in list(self.clients):
            client.abort()
        for up in self.upstreams.values():
            up.close_idle()
            if up.feed is not None:
                up.feed.close()
        for conn in list(self.upstream_conns):
            conn.abort()
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._sweeper is not None:
            self._sweeper.cancel()
        await asyncio.sleep(0)  # let the transports' connection_lost callbacks run
