"""The bootstrap config every role process starts from.

The controller writes ``role.json`` into the role's own directory before it starts the process. It
holds only what the process needs to come up (where to listen, its key and certificate, where its data
lives). Everything about sites arrives later as a versioned snapshot pushed over the internal API (see
:mod:`shared.control`), and is persisted by the role as its last-known-good config.

Each role subclasses :class:`RoleConfig` with its own fields; :func:`load_role_config` is the one place
a role reads its config file.
"""

from __future__ import annotations

import dataclasses
import json
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, TypeVar, get_args

from shared.files import atomic_write_json

__all__ = ["ROLE_KINDS", "RoleConfig", "RoleKind", "ServingConfig", "load_role_config", "write_role_config"]

RoleKind = Literal["controller", "management", "frontend", "worker", "fileserver", "publisher"]
ROLE_KINDS: tuple[str, ...] = get_args(RoleKind)


@dataclass(frozen=True, kw_only=True)
class RoleConfig:
    """Fields every role has."""

    role: str
    host: str
    home: Path
    bind: str = "127.0.0.1"
    control_port: int = 0
    log_level: str = "INFO"
    # Where the controller's internal API is (for nudges and reports); empty when there is none.
    controller_url: str = ""
    # A plain-HTTP /metrics for a Prometheus scraper without a client certificate; 0: none. Loopback
    # unless metrics_bind says otherwise (it answers anyone who reaches it).
    metrics_port: int = 0
    metrics_bind: str = "127.0.0.1"
    # Per-site metric series: the busiest this many sites, the rest summed as site="_other".
    metrics_top_sites: int = 50
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def tls_dir(self) -> Path:
        return self.home / "tls"

    @property
    def cert_file(self) -> Path:
        return self.tls_dir / "role.pem"

    @property
    def key_file(self) -> Path:
        return self.tls_dir / "role.key"

    @property
    def ca_file(self) -> Path:
        return self.tls_dir / "ca.pem"

    @property
    def state_dir(self) -> Path:
        return self.home / "state"

    @property
    def control_url(self) -> str:
        return f"https://{self.host}:{self.control_port}"


C = TypeVar("C", bound=RoleConfig)


@dataclass(frozen=True, kw_only=True)
class ServingConfig(RoleConfig):
    """Fields of a data-plane role that may serve from several processes (see :mod:`shared.prefork`)."""

    # Serving processes sharing the role's listeners; above 1 the main process keeps the control plane.
    processes: int = 1
    # On SIGTERM, connections in flight get this long to finish.
    drain_timeout: float = 10.0


def _convert(tp: Any, value: Any) -> Any:
    if tp is Path or tp == "Path":
        return Path(value)
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType) and value is not None:
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return _convert(args[0], value) if len(args) == 1 else value
    if origin is tuple and isinstance(value, list):
        return tuple(value)
    return value


def load_role_config(cls: type[C], path: Path) -> C:
    """Read a role's ``role.json`` into its typed config; unknown keys are an error, not ignored."""
    raw = json.loads(path.read_text())
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = set(raw) - names
    if unknown:
        raise ValueError(f"{path}: unknown config keys {sorted(unknown)}")
    return cls(**{k: _convert(hints[k], v) for k, v in raw.items()})


def _jsonable(value: Any) -> Any:
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, tuple):
        return list(value)
    return value


def write_role_config(config: RoleConfig, path: Path) -> None:
    raw = {f.name: _jsonable(getattr(config, f.name)) for f in dataclasses.fields(config)}
    atomic_write_json(path, raw, mode=0o600)
