"""The frontend role: TLS termination, Host → site → worker routing, pooled mTLS proxying.

Its modules depend one way, each only on those below it: ``_server`` (processes, listeners) →
``_client`` (a visitor's connection) → ``_proxy`` (shared state, sweep) → ``_routes``, ``_lane``,
``_feed`` → ``_upstream`` (worker pools and connections; the protocols that name what is above) →
``_head``, ``_http``, ``_cache``, ``config``.
"""

from roles.frontend.config import FrontendConfig

__all__ = ["FrontendConfig"]
