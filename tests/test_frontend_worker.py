"""Visitor → frontend → worker → fileserver content, every role a real process, as docs/architecture.md wires them."""

from __future__ import annotations

import http.client
import itertools
import socket
import ssl
from pathlib import Path

import pytest

from roles.fileserver.config import FileserverConfig
from roles.frontend.config import FrontendConfig
from roles.worker.config import WorkerConfig
from shared.net import free_port
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
    plain_port = free_port()
    w_config = pki.role_config(
        WorkerConfig,
        "worker",
        tmp_path / "worker",
        version_grace=0.3,
        loopback_plain_listen=f"127.0.0.1:{plain_port}",
    )
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
            body = resp.read()  # always: the connection is reused
            return resp.status == 200 and body == b"<h1>hello from blog</h1>"

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
        assert frontend.health()["upstream_connections"] >= 1
        # The opt-in plain hop to a worker on loopback (for measuring; mTLS stays the default).
        frontend.push_config(
            {
                "version": 2,
                "domain": DOMAIN,
                "sites": {
                    "blog": {"workers": [f"http://127.0.0.1:{plain_port}"]},
                    "bad": {"workers": ["http://10.1.2.3:80"]},  # plain only to loopback: fails alone
                },
            }
        )
        conn.request("GET", "/", headers={"Host": f"blog.{DOMAIN}"})
        resp = conn.getresponse()
        assert (resp.status, resp.read()) == (200, b"<h1>hello from blog</h1>")
        conn.request("GET", "/", headers={"Host": f"bad.{DOMAIN}"})
        resp = conn.getresponse()
        assert resp.status == 503 and b"not running anywhere" in resp.read()
        conn.close()
        assert frontend.health()["sites"] == 1
    finally:
        for proc in reversed(procs):
            proc.stop()


def test_a_killed_worker_is_ejected_and_taken_back(pki: CloudPKI, tmp_path: Path) -> None:
    """Two real workers (one with two serving processes); one is killed mid-test, then comes back."""
    fs_config = pki.role_config(FileserverConfig, "fileserver", tmp_path / "fileserver")
    w1_config = pki.role_config(WorkerConfig, "worker", tmp_path / "w1", version_grace=0.3)
    w2_config = pki.role_config(WorkerConfig, "worker", tmp_path / "w2", version_grace=0.3, processes=2)
    fe_config = pki.role_config(FrontendConfig, "frontend", tmp_path / "frontend", connect_timeout=1.0)
    pki.ca.issue_wildcard(DOMAIN).write(fe_config.wildcard_key_file, fe_config.wildcard_cert_file)
    fileserver, w1, w2, frontend = procs = [
        RoleProcess(c, pki).start(wait=False) for c in (fs_config, w1_config, w2_config, fe_config)
    ]
    try:
        for proc in procs:
            proc.wait_healthy()
        fileserver.push_config({"version": 1, "sites": {"blog": {"uid": UID, "quota_bytes": 1 << 20}}})
        for worker in (w1, w2):
            worker.push_config(
                {"version": 1, "fileserver": fileserver.control_url, "sites": {"blog": {"uid": UID}}}
            )
        workers = [f"localhost:{w1_config.data_port}", f"localhost:{w2_config.data_port}"]
        frontend.push_config({"version": 1, "domain": DOMAIN, "sites": {"blog": {"workers": workers}}})
        _publish(pki, fileserver, "blog", {"index.html": b"v1"})
        ctx = pki.client_ssl(None)

        def get(conn: http.client.HTTPConnection) -> tuple[int, bytes]:
            conn.request("GET", "/", headers={"Host": f"blog.{DOMAIN}"})
            resp = conn.getresponse()
            return resp.status, resp.read()

        kept = _SNIConnection(fe_config.https_port, f"blog.{DOMAIN}", ctx)
        wait_until(lambda: all(get(kept) == (200, b"v1") for _ in range(4)), timeout=15, what="both workers")
        # w2's serving processes get each version from its main process: publish again, both follow.
        _publish(pki, fileserver, "blog", {"index.html": b"v2"})

        def direct(port: int) -> tuple[int, bytes]:
            conn = http.client.HTTPSConnection(
                "localhost", port, context=pki.client_ssl("frontend"), timeout=5
            )
            try:
                conn.request("GET", "/", headers={"X-Sitecloud-Site": "blog"})
                resp = conn.getresponse()
                return resp.status, resp.read()
            finally:
                conn.close()

        for port in (w1_config.data_port, w2_config.data_port):
            wait_until(
                lambda p=port: direct(p) == (200, b"v2"), timeout=15, what=f"v2 on the worker at {port}"
            )
        assert all(get(kept) == (200, b"v2") for _ in range(6))

        w1.kill()  # no drain: its pooled connections just die
        for _ in range(10):
            assert get(kept) == (200, b"v2")  # each GET lands on w2, retried there if it hit w1
            fresh = _SNIConnection(fe_config.https_port, f"blog.{DOMAIN}", ctx)
            assert get(fresh) == (200, b"v2")
            fresh.close()

        w1.start()  # back on the same port: the front end tries it again after a while
        asked = itertools.count()

        def miss(conn: http.client.HTTPConnection) -> tuple[int, bytes]:
            # A target not held by the front end's cache (held answers go to neither worker).
            conn.request("GET", f"/?n={next(asked)}", headers={"Host": f"blog.{DOMAIN}"})
            resp = conn.getresponse()
            return resp.status, resp.read()

        wait_until(
            lambda: miss(kept) == (200, b"v2") and w1.health()["connections"] > 0,
            timeout=15,
            what="the restarted worker to get requests again",
        )
        kept.close()
    finally:
        for proc in reversed(procs):
            proc.stop()
