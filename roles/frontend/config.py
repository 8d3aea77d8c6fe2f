from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from shared.config import ServingConfig

__all__ = ["FrontendConfig"]


@dataclass(frozen=True, kw_only=True)
class FrontendConfig(ServingConfig):
    role: str = "frontend"
    http_port: int = 8080
    https_port: int = 8443
    # Client side (seconds, bytes). The header timeout runs from a request's first byte (or from accept
    # for a new connection) to the end of its headers: what stops slowloris.
    header_timeout: float = 15.0
    idle_timeout: float = 75.0
    body_timeout: float = 60.0
    handshake_timeout: float = 10.0
    max_header_bytes: int = 32 * 1024
    max_headers: int = 100
    # Upstream side (the workers).
    connect_timeout: float = 5.0
    response_timeout: float = 60.0
    # Shorter than the worker's keep-alive timeout, so the frontend is the side that closes.
    upstream_idle_timeout: float = 15.0
    upstream_max_idle: int = 64
    # Pipelined connections ("lanes") per worker for GETs it can answer at once; 0: none, every
    # request on a connection of its own. One is fastest (the biggest batches; a worker process
    # answers a lane's requests in about 10 µs each, so one keeps up with several front-end
    # processes); more spread a lane's load over a worker's serving processes.
    lanes_per_worker: int = 1
    drain_timeout: float = 8.0
    # processes (from ServingConfig): above 1 the main process keeps only the control plane.
    # The HTTPS port visitors see (behind an L4 balancer it may differ); 0: https_port. (Not named
    # *_port: it is no port of ours to listen on.)
    public_https: int = 0
    # A request body larger than this gets 413; a site's max_body_bytes (its plan) wins. 0: no limit.
    max_body_bytes: int = 0
    # Static answers kept per serving process (bytes in all, and the largest one), so that a hit
    # takes only a body-less freshness check to the worker; 0: no cache.
    cache_bytes: int = 64 * 1024 * 1024
    cache_max_entry: int = 1024 * 1024
    # How often usage (requests, bytes) goes to the controller; 0: never.
    usage_interval: float = 30.0
    # Visitor connections one client address (IPv6: one /64) may hold open at once, per serving
    # process, from accept to close; past it a new one is closed at once. Far above a browser's 6 per
    # host, so a NAT'd office fits; 0: no limit.
    max_connections_per_ip: int = 256
    # The share of a busy serving process's time that new TLS handshakes may take when many come at
    # once (a flood, a slowloris wave reconnecting); past it they wait their turn, one client address
    # after another (roles/frontend/_handshakes.py). 1: no bound.
    handshake_share: float = 0.1
    # Visitor connections per serving process that may sit with an answer they stopped reading (each
    # holds about a megabyte: the answer read ahead from the worker, TLS buffers); past it the ones
    # stalled longest, for at least stalled_grace seconds, are cut. A slow-read attack from many
    # addresses is then bounded by this, not by memory. 0: no limit (body_timeout alone).
    max_stalled_readers: int = 512
    stalled_grace: float = 5.0

    def __post_init__(self) -> None:
        for name in ("max_connections_per_ip", "max_stalled_readers"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise ValueError(f"{name} must be a whole number >= 0, not {value!r}")
        share = self.handshake_share
        if isinstance(share, bool) or not isinstance(share, int | float) or not 0.01 <= share <= 1:
            raise ValueError(f"handshake_share must be a number from 0.01 to 1, not {share!r}")

    @property
    def wildcard_cert_file(self) -> Path:
        return self.tls_dir / "wildcard.pem"

    @property
    def wildcard_key_file(self) -> Path:
        return self.tls_dir / "wildcard.key"
