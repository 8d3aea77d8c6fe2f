"""Logging: one named logger per role; every line carries role and host, and site or tenant where known."""

from __future__ import annotations

import logging
import sys
from collections.abc import Mapping, MutableMapping
from typing import Any

__all__ = ["ContextLogger", "get_logger", "setup_logging"]

_FORMAT = "%(asctime)s %(levelname)s %(name)s %(message)s"


def setup_logging(role: str, host: str, level: str = "INFO") -> None:
    """Configure the process's root logger once; roles log to stderr, which the supervisor captures."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(_FORMAT))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    # The format shows none of these: not looking them up spares every line a few calls.
    logging.logThreads = logging.logProcesses = logging.logMultiprocessing = False
    logging.getLogger("sitecloud").info("starting %s on %s", role, host)


class ContextLogger(logging.LoggerAdapter[logging.Logger]):
    """Prefixes each line with ``[key=value ...]`` context (role, host, site, tenant)."""

    def __init__(self, logger: logging.Logger, extra: Mapping[str, object] | None = None) -> None:
        super().__init__(logger, extra)
        # Made once: a session's logger writes a line for each file it stores.
        ctx = " ".join(f"{k}={v}" for k, v in (extra or {}).items() if v is not None)
        self._prefix = f"[{ctx}] " if ctx else ""

    def process(self, msg: Any, kwargs: MutableMapping[str, Any]) -> tuple[Any, MutableMapping[str, Any]]:
        return (f"{self._prefix}{msg}" if self._prefix else msg), kwargs

    def bind(self, **context: Any) -> ContextLogger:
        return ContextLogger(self.logger, {**(self.extra or {}), **context})


def get_logger(role: str, **context: Any) -> ContextLogger:
    return ContextLogger(logging.getLogger(f"sitecloud.{role}"), context)
