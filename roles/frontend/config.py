from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from shared.config import RoleConfig

__all__ = ["FrontendConfig"]


@dataclass(frozen=True, kw_only=True)
class FrontendConfig(RoleConfig):
    role: str = "frontend"
    http_port: int = 8080
    https_port: int = 8443

    @property
    def wildcard_cert_file(self) -> Path:
        return self.tls_dir / "wildcard.pem"

    @property
    def wildcard_key_file(self) -> Path:
        return self.tls_dir / "wildcard.key"
