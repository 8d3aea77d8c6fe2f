"""The frontend process: control plane, HTTP and HTTPS listeners, drain on stop.

With ``processes: 1`` (the default) one process does everything. With more, the main process runs the
control plane and hands each applied snapshot to N serving processes (see :mod:`shared.prefork`),
which accept on the listeners they share and report their own usage.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import os
import ssl
from typing import Any

from roles.frontend._client import ClientConnection
from roles.frontend._proxy import Proxy
from roles.frontend._routes import CustomCert, build_routes, failure_figures
from roles.frontend._tls import TlsBridge
from roles.frontend._upstream import Upstream
from roles.frontend._usage import UsageReporter
from roles.frontend.config import FrontendConfig
from shared.contracts.health import FrontendFigures
from shared.contracts.snapshots import FrontendSnapshot
from shared.control import ControlPlane, parse_snapshot
from shared.files import atomic_write_json
from shared.listeners import listener
from shared.logs import ContextLogger, get_logger
from shared.metrics import CountsWriter, HttpCollector, HttpCounts, add_sites, clear_counts, read_counts
from shared.prefork import PreforkedRole, ServingProcesses, reload_on_sighup
from shared.tls import public_server_context

__all__ = ["FRONTEND"]

_BACKLOG = 1024
_MAX_CONTEXTS = 10_000


class _SniContexts:
    """Picks a custom hostname's own certificate by SNI; ``<site>.<domain>`` gets the platform's ACME
    wildcard when the snapshot has one; every other name gets the cloud CA's wildcard.

    Contexts are made on first use (a snapshot may carry very many certificates) and kept, up to a
    bound; a certificate that does not load is logged once and the wildcard is served instead.
    """

    def __init__(self, proxy: Proxy, log: ContextLogger) -> None:
        self._proxy = proxy
        self._log = log
        self._contexts: dict[str, tuple[CustomCert, ssl.SSLContext | None]] = {}

    def callback(self, sslobj: ssl.SSLObject, server_name: str | None, ctx: ssl.SSLContext) -> None:
        if not server_name:
            return None
        name = server_name.lower().rstrip(".")
        cert = self._proxy.certs.get(name)
        if cert is None:
            cert = self._proxy.wildcard
            if cert is None or not _under_wildcard(name, self._proxy.domain):
                return None
            name = "*." + self._proxy.domain
        cached = self._contexts.get(name)
        if cached is None or cached[0] != cert:
            cached = (cert, self._load(name, cert))
            if len(self._contexts) >= _MAX_CONTEXTS:
                self._contexts.pop(next(iter(self._contexts)))
            self._contexts[name] = cached
        if cached[1] is not None:
            sslobj.context = cached[1]
        return None

    def _load(self, name: str, cert: CustomCert) -> ssl.SSLContext | None:
        # The ssl module loads chains only from files: an anonymous in-memory file keeps the key off disk.
        fd = os.memfd_create(f"sitecloud-{name}", os.MFD_CLOEXEC)
        try:
            os.write(fd, (cert.cert_pem.rstrip() + "\n" + cert.key_pem.rstrip() + "\n").encode())
            path = f"/proc/self/fd/{fd}"
            ctx = public_server_context(path, path)  # type: ignore[arg-type]
            ctx.set_alpn_protocols(["http/1.1"])
            return ctx
        except (ssl.SSLError, OSError, ValueError) as exc:
            self._log.error(
                "certificate for %s does not load: %s; serving the cloud CA's wildcard", name, exc
            )
            return None
        finally:
            os.close(fd)


def _under_wildcard(name: str, domain: str) -> bool:
    """Whether ``*.<domain>`` (or ``<domain>`` itself) covers ``name`` (RFC 6125 6.4.3: one label)."""
    if not domain:
        return False
    label, dot, rest = name.partition(".")
    return name == domain or (bool(dot) and rest == domain and bool(label))


def _settle_heap() -> None:
    """Everything made at startup lives as long as the process: move it out of the cyclic collector's
    way, so its full passes stay short (a long one is a stall every request in flight waits out)."""
    gc.collect()
    gc.freeze()


def _public_tls(config: FrontendConfig, log: ContextLogger) -> ssl.SSLContext | None:
    if not (config.wildcard_cert_file.exists() and config.wildcard_key_file.exists()):
        log.error("no wildcard certificate at %s; HTTPS is not served", config.wildcard_cert_file)
        return None
    ctx = public_server_context(config.wildcard_cert_file, config.wildcard_key_file)
    ctx.set_alpn_protocols(["http/1.1"])
    return ctx


async def _listen(proxy: Proxy, tls: ssl.SSLContext | None) -> list[asyncio.Server]:
    config = proxy.config
    loop = asyncio.get_running_loop()
    # Held by the supervisor across restarts (and shared by every serving process): see shared/listeners.
    http = listener("http", config.bind, config.http_port, backlog=_BACKLOG)
    servers = [
        await loop.create_server(lambda: ClientConnection(proxy, b"http"), sock=http, backlog=_BACKLOG)
    ]
    if tls is not None:
        https = listener("https", config.bind, config.https_port, backlog=_BACKLOG)
        timeout = config.handshake_timeout
        servers.append(
            await loop.create_server(
                lambda: TlsBridge(
                    loop, tls, ClientConnection(proxy, b"https"), timeout, proxy.admission, proxy.handshakes
                ),
                sock=https,
                backlog=_BACKLOG,
            )
        )
    return servers


async def _serve_data(
    config: FrontendConfig, proxy: Proxy, log: ContextLogger
) -> tuple[list[asyncio.Server], UsageReporter, bool]:
    tls = _public_tls(config, log)
    if tls is not None:
        tls.sni_callback = _SniContexts(proxy, log).callback
    servers = await _listen(proxy, tls)
    usage = UsageReporter(config, proxy.usage, log)
    proxy.start()
    usage.start()
    return servers, usage, tls is not None


def _counts(proxy: Proxy, usage: UsageReporter) -> HttpCounts:
    """This process's counts as running totals (per site: what usage reports took, and what they did not yet)."""
    counts = HttpCounts()
    counts.add(proxy.counts)
    add_sites(counts.sites, usage.taken)
    add_sites(counts.sites, proxy.usage)
    return counts


async def _drain(proxy: Proxy, servers: list[asyncio.Server], usage: UsageReporter) -> None:
    for server in servers:
        server.close()
    await proxy.drain(proxy.config.drain_timeout)
    await usage.stop()
    for server in servers:
        await server.wait_closed()


async def _serve_single(config: FrontendConfig, stop: asyncio.Event) -> None:
    log = get_logger(config.role, host=config.host)
    proxy = Proxy(config, log)
    https = {"on": False}
    usage_ref: dict[str, UsageReporter] = {}

    def health() -> FrontendFigures:
        figures: dict[str, Any] = {**proxy.health(), "https": https["on"], "processes": 1}
        if "r" in usage_ref:
            figures["usage_pending"] = usage_ref["r"].pending()
            figures["usage_reports_sent"] = usage_ref["r"].reports_sent
        return FrontendFigures.model_validate(figures)

    plane = ControlPlane(config, FrontendSnapshot, proxy.apply, health=health)
    await plane.load_last_known_good()
    servers, usage, https["on"] = await _serve_data(config, proxy, log)
    usage_ref["r"] = usage
    plane.metrics.register(
        HttpCollector("frontend", lambda: _counts(proxy, usage), top_n=config.metrics_top_sites, refused=True)
    )
    await plane.start()
    _settle_heap()
    log.info(
        "serving HTTP on %s:%s, HTTPS on %s",
        config.bind,
        config.http_port,
        config.https_port if https["on"] else "-",
    )
    try:
        await stop.wait()
    finally:
        log.info("draining")
        await _drain(proxy, servers, usage)
        await plane.stop()
        log.info("stopped")


def _handover_file(config: FrontendConfig) -> Any:
    return config.state_dir / "serving.json"


async def _serve_main(config: FrontendConfig, stop: asyncio.Event, children: ServingProcesses) -> None:
    """The control plane only: check each snapshot, hand it to the serving processes."""
    log = get_logger(config.role, host=config.host)
    processes = children.count
    figures: dict[str, Any] = {"sites": 0, "hostnames": 0}

    async def apply(snapshot: FrontendSnapshot) -> None:
        routes = build_routes(
            snapshot,
            lambda h, p, t: Upstream(h, p, t),
            lambda _: [0, 0, 0],
            default_max_body=config.max_body_bytes,
        )
        figures.update(
            domain=routes.domain,
            sites=routes.sites,
            hostnames=len(routes.hosts),
            wildcard="acme" if routes.wildcard is not None else "cloud-ca",
        )
        figures.pop("status", None)
        figures.pop("reason", None)
        figures.update(failure_figures(routes.failed))
        config.state_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_json(_handover_file(config), snapshot.to_json(), mode=0o600)
        children.reload()

    def health() -> FrontendFigures:
        return FrontendFigures.model_validate(
            {**figures, "processes": processes, "serving_pids": children.pids}
        )

    plane = ControlPlane(config, FrontendSnapshot, apply, health=health)
    # The serving processes' counts, summed when scraped.
    plane.metrics.register(
        HttpCollector(
            "frontend",
            lambda: read_counts(config.state_dir, children.pids),
            top_n=config.metrics_top_sites,
            refused=True,
        )
    )
    await plane.load_last_known_good()
    clear_counts(config.state_dir)
    children.start()
    await plane.start()
    _settle_heap()
    log.info(
        "control plane up; %s serving processes on HTTP %s, HTTPS %s",
        processes,
        config.http_port,
        config.https_port,
    )
    try:
        await stop.wait()
    finally:
        await children.stop()
        await plane.stop()
        log.info("stopped")


async def _serve_child(config: FrontendConfig, stop: asyncio.Event, index: int) -> None:
    log = get_logger(config.role, host=config.host, process=index)
    proxy = Proxy(config, log)
    handover = _handover_file(config)
    applied = [0]

    async def reload() -> None:
        with contextlib.suppress(FileNotFoundError):
            raw = await asyncio.to_thread(handover.read_bytes)
            snapshot = await asyncio.to_thread(
                parse_snapshot, FrontendSnapshot, raw, what="handed-over snapshot"
            )
            version = snapshot.version
            if version >= applied[0]:
                await proxy.apply(snapshot)
                applied[0] = version
                log.info("serving config version %s", version)

    stop_reloading = reload_on_sighup(reload)
    await reload()
    servers, usage, _ = await _serve_data(config, proxy, log)
    counts = CountsWriter(
        config.state_dir, lambda: _counts(proxy, usage), keep_sites=4 * config.metrics_top_sites
    )
    counts.start()
    _settle_heap()
    try:
        await stop.wait()
    finally:
        stop_reloading()
        await _drain(proxy, servers, usage)
        await counts.stop()


FRONTEND = PreforkedRole(single=_serve_single, main=_serve_main, serving=_serve_child)
