"""TLS contexts. Internal traffic is mutual TLS with certificates from the cloud CA."""

from __future__ import annotations

import ssl
from pathlib import Path

from shared.config import RoleConfig

__all__ = [
    "FEED_ALPN",
    "INTERMEDIATE_CIPHERS",
    "LANE_ALPN",
    "client_context",
    "client_context_from_files",
    "public_server_context",
    "server_context",
]

# Offered by a front end on its pipelined connections to a worker (docs/architecture.md, "The lane"):
# GETs pipelined over one connection, each answered at once or refused with 421.
LANE_ALPN = "sitecloud-lane/1"
# Offered by a front end on its version feed from a worker (roles/worker/_feed.py): the worker tells
# it of each site's content version before serving a new one; the front end reports its cache hits.
FEED_ALPN = "sitecloud-feed/1"


# Mozilla's "intermediate" TLS 1.2 suites (server-side-tls guidelines, version 5.7): forward secret
# AEAD only. TLS 1.3 suites are OpenSSL's defaults, all of which that profile allows. The DHE suites
# need DH parameters, which are not loaded, so in practice the ECDHE ones are offered.
INTERMEDIATE_CIPHERS = ":".join(
    (
        "ECDHE-ECDSA-AES128-GCM-SHA256",
        "ECDHE-RSA-AES128-GCM-SHA256",
        "ECDHE-ECDSA-AES256-GCM-SHA384",
        "ECDHE-RSA-AES256-GCM-SHA384",
        "ECDHE-ECDSA-CHACHA20-POLY1305",
        "ECDHE-RSA-CHACHA20-POLY1305",
        "DHE-RSA-AES128-GCM-SHA256",
        "DHE-RSA-AES256-GCM-SHA384",
        "DHE-RSA-CHACHA20-POLY1305",
    )
)


def _harden(ctx: ssl.SSLContext) -> ssl.SSLContext:
    # TLS 1.2 and up (RFC 8996 retires 1.0 and 1.1), the intermediate profile's suites.
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.set_ciphers(INTERMEDIATE_CIPHERS)
    # No compression (CRIME); no renegotiation, which only lets a client make the server redo handshakes.
    ctx.options |= ssl.OP_NO_COMPRESSION | ssl.OP_NO_RENEGOTIATION
    return ctx


def server_context(config: RoleConfig, *, require_client_cert: bool = True) -> ssl.SSLContext:
    """For a role's internal listeners: its own certificate, and peers must show one from the cloud CA."""
    ctx = _harden(ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER))
    ctx.load_cert_chain(config.cert_file, config.key_file)
    ctx.load_verify_locations(config.ca_file)
    ctx.verify_mode = ssl.CERT_REQUIRED if require_client_cert else ssl.CERT_NONE
    return ctx


def client_context_from_files(cert_file: Path | None, key_file: Path | None, ca_file: Path) -> ssl.SSLContext:
    ctx = _harden(ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT))
    ctx.load_verify_locations(ca_file)
    ctx.check_hostname = True
    if cert_file is not None:
        ctx.load_cert_chain(cert_file, key_file)
    return ctx


def client_context(config: RoleConfig) -> ssl.SSLContext:
    """For calls to other roles: verifies them against the cloud CA and shows our own certificate."""
    return client_context_from_files(config.cert_file, config.key_file, config.ca_file)


def public_server_context(cert_file: Path, key_file: Path) -> ssl.SSLContext:
    """For listeners that people and browsers reach (API, web deploy, HTTPS sites)."""
    ctx = _harden(ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER))
    ctx.load_cert_chain(cert_file, key_file)
    return ctx
