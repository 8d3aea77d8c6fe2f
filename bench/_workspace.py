"""What the benches against nginx share: the files on disk, the cloud CA, nginx's certificates."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from bench.harness.processes import CloudPKI

__all__ = ["Workspace"]


@dataclass(frozen=True)
class Workspace:
    work: Path
    root: Path  # the files nginx serves (sitecloud gets the same ones published)
    pki: CloudPKI
    cert: Path  # nginx's wildcard certificate for the bench domain, and its key
    key: Path
    hop: tuple[Path, Path, Path]  # cert, key and CA for nginx's mutual-TLS hop

    @classmethod
    def create(cls, work: Path, domain: str, files: dict[str, bytes]) -> Workspace:
        os.chmod(work, 0o755)
        root = work / "www"
        root.mkdir()
        for name, data in files.items():
            (root / name).write_bytes(data)
        pki = CloudPKI(work / "pki")
        cert, key = work / "nginx.pem", work / "nginx.key"
        pki.ca.issue_wildcard(domain).write(key, cert)
        hop_cert, hop_key = work / "hop.pem", work / "hop.key"
        pki.ca.issue("nginx@bench", role="worker", dns_names=["localhost"], ip_addresses=["127.0.0.1"]).write(
            hop_key, hop_cert
        )
        return cls(work, root, pki, cert, key, (hop_cert, hop_key, pki.ca_file))
