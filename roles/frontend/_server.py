"""The frontend process: control plane, HTTP and HTTPS listeners, drain on stop."""

from __future__ import annotations

import asyncio
import ssl

from roles.frontend._client import ClientConnection
from roles.frontend._proxy import Proxy
from roles.frontend.config import FrontendConfig
from shared.control import ControlPlane
from shared.logs import ContextLogger, get_logger
from shared.tls import public_server_context

__all__ = ["serve"]

_BACKLOG = 1024


def _sni(sslobj: ssl.SSLObject, server_name: str | None, ctx: ssl.SSLContext) -> None:
    """The SNI hook: a custom hostname will set ``sslobj.context`` to its own certificate's context.

    Until custom hostnames exist, every name gets the wildcard certificate of the listener.
    """
    return None


def _public_tls(config: FrontendConfig, log: ContextLogger) -> ssl.SSLContext | None:
    if not (config.wildcard_cert_file.exists() and config.wildcard_key_file.exists()):
        log.error("no wildcard certificate at %s; HTTPS is not served", config.wildcard_cert_file)
        return None
    ctx = public_server_context(config.wildcard_cert_file, config.wildcard_key_file)
    ctx.set_alpn_protocols(["http/1.1"])
    ctx.sni_callback = _sni
    return ctx


async def serve(config: FrontendConfig, stop: asyncio.Event) -> None:
    log = get_logger(config.role, host=config.host)
    proxy = Proxy(config, log)
    tls = _public_tls(config, log)

    def health() -> dict[str, object]:
        return {**proxy.health(), "https": tls is not None}

    plane = ControlPlane(config, proxy.apply, health=health)
    await plane.load_last_known_good()
    loop = asyncio.get_running_loop()
    servers = [
        await loop.create_server(
            lambda: ClientConnection(proxy, b"http"), config.bind, config.http_port, backlog=_BACKLOG
        )
    ]
    if tls is not None:
        servers.append(
            await loop.create_server(
                lambda: ClientConnection(proxy, b"https"),
                config.bind,
                config.https_port,
                ssl=tls,
                ssl_handshake_timeout=config.handshake_timeout,
                backlog=_BACKLOG,
            )
        )
    proxy.start()
    await plane.start()
    log.info(
        "serving HTTP on %s:%s, HTTPS on %s", config.bind, config.http_port, config.https_port if tls else "-"
    )
    try:
        await stop.wait()
    finally:
        log.info("draining")
        for server in servers:
            server.close()
        await proxy.drain(config.drain_timeout)
        await plane.stop()
        for server in servers:
            await server.wait_closed()
        log.info("stopped")
