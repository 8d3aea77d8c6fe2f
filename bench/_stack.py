"""sitecloud's data path for the bench: fileserver, worker and frontend role processes, one site."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

from bench.harness.clients import https_get
from bench.harness.processes import CloudPKI, RoleProcess, call, wait_until
from roles.fileserver.config import FileserverConfig
from roles.frontend.config import FrontendConfig
from roles.worker.config import WorkerConfig

__all__ = ["SitecloudStack"]

SITE = "bench"


class SitecloudStack:
    """``processes`` serving processes each for the frontend and the worker; with ``lanes_off`` also
    a second front end to the same worker that keeps no lanes (every request on a connection of its
    own), to measure what the lanes bring."""

    def __init__(
        self, workdir: Path, domain: str, pki: CloudPKI, *, processes: int = 1, lanes_off: bool = False
    ) -> None:
        self.dir = workdir
        self.domain = domain
        self.pki = pki
        self.fileserver = RoleProcess(
            self.pki.role_config(FileserverConfig, "fileserver", workdir / "fileserver"), self.pki
        )
        self.worker = RoleProcess(
            self.pki.role_config(WorkerConfig, "worker", workdir / "worker", processes=processes), self.pki
        )
        self.frontend = self._frontend(workdir / "frontend", processes)
        self.frontend_without_lanes = (
            self._frontend(workdir / "frontend-no-lanes", processes, lanes_per_worker=0)
            if lanes_off
            else None
        )

    def _frontend(self, home: Path, processes: int, **fields: int) -> RoleProcess:
        config = self.pki.role_config(
            FrontendConfig, "frontend", home, processes=processes, usage_interval=0.0, **fields
        )
        self.pki.ca.issue_wildcard(self.domain).write(config.wildcard_key_file, config.wildcard_cert_file)
        return RoleProcess(config, self.pki)

    @property
    def frontends(self) -> list[RoleProcess]:
        return [fe for fe in (self.frontend, self.frontend_without_lanes) if fe is not None]

    @property
    def http_port(self) -> int:
        return int(self.frontend.config.http_port)  # type: ignore[attr-defined]

    @property
    def https_port(self) -> int:
        return int(self.frontend.config.https_port)  # type: ignore[attr-defined]

    @property
    def https_port_without_lanes(self) -> int:
        assert self.frontend_without_lanes is not None
        return int(self.frontend_without_lanes.config.https_port)  # type: ignore[attr-defined]

    def start(self, files: dict[str, bytes], *, site_settings: dict[str, Any] | None = None) -> None:
        """``site_settings``: the bench site's app settings on the worker (its limits, say)."""
        for role in (self.fileserver, self.worker, *self.frontends):
            role.start()
        fs_url = self.fileserver.control_url
        self.fileserver.push_config(
            {"version": 1, "sites": {SITE: {"uid": "bench1", "quota_bytes": 1 << 30}}}
        )
        self.worker.push_config(
            {"version": 1, "fileserver": fs_url, "sites": {SITE: {"uid": "bench1", **(site_settings or {})}}}
        )
        worker_port = self.worker.config.data_port  # type: ignore[attr-defined]
        for frontend in self.frontends:
            frontend.push_config(
                {
                    "version": 1,
                    "domain": self.domain,
                    "sites": {SITE: {"workers": [f"localhost:{worker_port}"]}},
                }
            )
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
        for frontend in self.frontends:
            port = int(frontend.config.https_port)  # type: ignore[attr-defined]
            wait_until(
                lambda port=port: (
                    https_get(port, f"{SITE}.{self.domain}", f"/{first}", ca_file=self.pki.ca_file)[2] == data
                ),
                timeout=20,
                what="the bench site to be served through the frontend",
            )

    def roles(self) -> dict[str, RoleProcess]:
        """Every role process of the stack, by name."""
        named = {"fileserver": self.fileserver, "worker": self.worker, "frontend": self.frontend}
        if self.frontend_without_lanes is not None:
            named["frontend-no-lanes"] = self.frontend_without_lanes
        return named

    def stop(self) -> None:
        for role in (*self.frontends, self.worker, self.fileserver):
            role.stop()
