"""The frontend role: TLS termination, Host → site → worker routing, pooled mTLS proxying."""

from roles.frontend.config import FrontendConfig

__all__ = ["FrontendConfig"]
