"""sitecloud's data path for the bench: fileserver, worker and frontend role processes, one site."""

from __future__ import annotations

import hashlib
from pathlib import Path

from roles.fileserver.config import FileserverConfig
from roles.frontend.config import FrontendConfig
from roles.worker.config import WorkerConfig
from shared.net import free_port
from tests.cloud import https_get
from tests.support import CloudPKI, RoleProcess, call, wait_until

__all__ = ["SitecloudStack"]

SITE = "bench"


class SitecloudStack:
    """``processes`` serving processes each for the frontend and the worker."""

    def __init__(self, workdir: Path, domain: str, pki: CloudPKI, *, processes: int = 1) -> None:
        self.dir = workdir
        self.domain = domain
        self._version = 0
        self.pki = pki
        self.fileserver = RoleProcess(
            self.pki.role_config(FileserverConfig, "fileserver", workdir / "fileserver"), self.pki
        )
        self.plain_port = free_port()
        self.worker = RoleProcess(
            self.pki.role_config(
                WorkerConfig,
                "worker",
                workdir / "worker",
                processes=processes,
                loopback_plain_listen=f"127.0.0.1:{self.plain_port}",
            ),
            self.pki,
        )
        fe_config = self.pki.role_config(
            FrontendConfig, "frontend", workdir / "frontend", processes=processes, usage_interval=0.0
        )
        self.pki.ca.issue_wildcard(domain).write(fe_config.wildcard_key_file, fe_config.wildcard_cert_file)
        self.frontend = RoleProcess(fe_config, self.pki)

    @property
    def http_port(self) -> int:
        return int(self.frontend.config.http_port)  # type: ignore[attr-defined]

    @property
    def https_port(self) -> int:
        return int(self.frontend.config.https_port)  # type: ignore[attr-defined]

    def start(self, files: dict[str, bytes]) -> None:
        for role in (self.fileserver, self.worker, self.frontend):
            role.start()
        fs_url = self.fileserver.control_url
        self.fileserver.push_config(
            {"version": 1, "sites": {SITE: {"uid": "bench1", "quota_bytes": 1 << 30}}}
        )
        self.worker.push_config({"version": 1, "fileserver": fs_url, "sites": {SITE: {"uid": "bench1"}}})
        self.route(plain=False)
        publisher = self.pki.client_ssl("publisher")
        ops = []
        for path, data in files.items():
            status, body = call(f"{fs_url}/v1/sites/{SITE}/blobs", publisher, method="POST", data=data)
            assert status == 200, body
            assert body["sha256"] == hashlib.sha256(data).hexdigest()
            ops.append({"op": "put", "path": path, "sha256": body["sha256"]})
        status, body = call(f"{fs_url}/v1/sites/{SITE}/commit", publisher, method="POST", body={"ops": ops})
        assert status == 200, body
        first, data = next(iter(files.items()))
        wait_until(
            lambda: (
                https_get(self.https_port, f"{SITE}.{self.domain}", f"/{first}", ca_file=self.pki.ca_file)[2]
                == data
            ),
            timeout=20,
            what="the bench site to be served through the frontend",
        )

    def route(self, *, plain: bool) -> None:
        """The hop to the worker: mutual TLS (the default), or the opt-in plain HTTP on loopback."""
        self._version += 1
        worker_port = self.worker.config.data_port  # type: ignore[attr-defined]
        address = f"http://127.0.0.1:{self.plain_port}" if plain else f"localhost:{worker_port}"
        self.frontend.push_config(
            {"version": self._version, "domain": self.domain, "sites": {SITE: {"workers": [address]}}}
        )

    def stop(self) -> None:
        for role in (self.frontend, self.worker, self.fileserver):
            role.stop()
