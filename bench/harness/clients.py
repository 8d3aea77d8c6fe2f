"""HTTPS requests as visitors and front ends make them: to a site by name through a front end, or to
a worker's data port with the site in ``X-Sitecloud-Site``."""

from __future__ import annotations

import http.client
import socket
import ssl
from pathlib import Path

from bench.harness.processes import CloudPKI
from roles.worker.config import WorkerConfig

__all__ = ["SiteConnection", "fetch_from_worker", "https_get"]


class SiteConnection(http.client.HTTPSConnection):
    """HTTPS to 127.0.0.1 with a site's name as SNI (and certificate name).

    Python's resolver does not map ``*.localhost`` to loopback the way curl and browsers do.
    """

    def __init__(self, port: int, server_name: str, ca_file: Path) -> None:
        self._site_context = ssl.create_default_context(cafile=str(ca_file))
        super().__init__("127.0.0.1", port, context=self._site_context, timeout=10)
        self._server_name = server_name

    def connect(self) -> None:
        sock = socket.create_connection((self.host, self.port), self.timeout)
        self.sock = self._site_context.wrap_socket(sock, server_hostname=self._server_name)


def https_get(
    port: int,
    host_header: str,
    path: str = "/",
    *,
    ca_file: Path,
    headers: dict[str, str] | None = None,
    method: str = "GET",
    body: bytes | None = None,
) -> tuple[int, dict[str, str], bytes]:
    conn = SiteConnection(port, host_header, ca_file)
    try:
        conn.request(method, path, body=body, headers={"Host": host_header, **(headers or {})})
        resp = conn.getresponse()
        return resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read()
    finally:
        conn.close()


def fetch_from_worker(
    pki: CloudPKI,
    config: WorkerConfig,
    site: str,
    path: str,
    *,
    method: str = "GET",
    headers: dict[str, str] | None = None,
    role: str = "frontend",
) -> tuple[int, dict[str, str], bytes]:
    """One request to a worker's data port for ``site``, as the role ``role`` (a front end by default)."""
    conn = http.client.HTTPSConnection(
        "localhost", config.data_port, context=pki.client_ssl(role), timeout=10
    )
    try:
        conn.request(method, path, headers={"X-Sitecloud-Site": site, **(headers or {})})
        resp = conn.getresponse()
        return resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read()
    finally:
        conn.close()
