"""Visitor → frontend → worker → fileserver content, every role a real process, as docs/architecture.md wires them."""

from __future__ import annotations

import http.client
import socket
import ssl
from pathlib import Path

import pytest

from roles.fileserver.config import FileserverConfig
from roles.frontend.config import FrontendConfig
from roles.worker.config import WorkerConfig
from tests.support import CloudPKI, RoleProcess, call, wait_until

DOMAIN = "sites.test"
UID = "0123456789abcdef"


class _SNIConnection(http.client.HTTPSConnection):
    def __init__(self, port: int, server_name: str, ctx: ssl.SSLContext) -> None:
        super().__init__("127.0.0.1", port, context=ctx, timeout=10)
        self._server_name = server_name
        self._ctx = ctx

    def connect(self) -> None:
        sock = socket.create_connection(("127.0.0.1", self.port), timeout=10)
        self.sock = self._ctx.wrap_socket(sock, server_hostname=self._server_name)


def _publish(pki: CloudPKI, fileserver: RoleProcess, site: str, files: dict[str, bytes]) -> None:
    ctx = pki.client_ssl("publisher")
    ops = []
    for path, data in files.items():
        status, body = call(f"{fileserver.control_url}/v1/sites/{site}/blobs", ctx, method="POST", data=data)
        assert status == 200, body
        ops.append({"op": "put", "path": path, "sha256": body["sha256"]})
    status, body = call(
        f"{fileserver.control_url}/v1/sites/{site}/commit", ctx, method="POST", body={"ops": ops}
    )
    assert status == 200, body


def test_a_published_page_is_served_through_frontend_and_worker(pki: CloudPKI, tmp_path: Path) -> None:
    if not Path(__file__).parent.parent.joinpath("roles", "worker", "__main__.py").exists():
        pytest.skip("the worker role is not there yet")
    fs_config = pki.role_config(FileserverConfig, "fileserver", tmp_path / "fileserver")
    w_config = pki.role_config(WorkerConfig, "worker", tmp_path / "worker", version_grace=0.3)
    fe_config = pki.role_config(FrontendConfig, "frontend", tmp_path / "frontend")
    pki.ca.issue_wildcard(DOMAIN).write(fe_config.wildcard_key_file, fe_config.wildcard_cert_file)
    procs = [RoleProcess(c, pki).start(wait=False) for c in (fs_config, w_config, fe_config)]
    fileserver, worker, frontend = procs
    try:
        for proc in procs:
            proc.wait_healthy()
        fileserver.push_config({"version": 1, "sites": {"blog": {"uid": UID, "quota_bytes": 1 << 20}}})
        worker.push_config(
            {"version": 1, "fileserver": fileserver.control_url, "sites": {"blog": {"uid": UID}}}
        )
        frontend.push_config(
            {
                "version": 1,
                "domain": DOMAIN,
                "sites": {"blog": {"workers": [f"localhost:{w_config.data_port}"]}},
            }
        )
        _publish(pki, fileserver, "blog", {"index.html": b"<h1>hello from blog</h1>"})

        conn = _SNIConnection(fe_config.https_port, f"blog.{DOMAIN}", pki.client_ssl(None))

        def served() -> bool:
            conn.request("GET", "/", headers={"Host": f"blog.{DOMAIN}"})
            resp = conn.getresponse()
            return resp.status == 200 and resp.read() == b"<h1>hello from blog</h1>"

        wait_until(served, timeout=10, what="the published page through the frontend")
        conn.request("HEAD", "/", headers={"Host": f"blog.{DOMAIN}"})
        resp = conn.getresponse()
        assert (resp.status, resp.read(), resp.getheader("Content-Length")) == (200, b"", "24")
        conn.request("GET", "/", headers={"Host": f"blog.{DOMAIN}"})  # still in step after the HEAD
        resp = conn.getresponse()
        assert (resp.status, resp.read()) == (200, b"<h1>hello from blog</h1>")
        conn.request("GET", "/", headers={"Host": f"other.{DOMAIN}"})
        resp = conn.getresponse()
        assert resp.status == 404 and b"No site here" in resp.read()
        conn.close()
        assert frontend.health()["upstream_connections"] >= 1
    finally:
        for proc in reversed(procs):
            proc.stop()
