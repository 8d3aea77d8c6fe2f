"""What the snapshot says about a site's app, and what its content says when the snapshot is silent.

Per site in the worker snapshot (all optional beside ``uid``)::

    {"uid": "<hex>", "runtime": "static|python|php|command", "entry": "app:app",
     "env": {"KEY": "value"}, "always_on": false, "idle_timeout": 1200,
     "limits": {"memory_mb": 256, "cpu_percent": 50, "nofile": 256, "nproc": 64, "disk_mb": 1024}}

An absent ``runtime`` is detected from the content of the version being served.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

from shared.appsettings import ENV_NAME, MAX_ENV_BYTES, RESERVED_ENV, RUNTIMES, Runtime
from shared.errors import InvalidInput

__all__ = [
    "SIZES",
    "AppLimits",
    "AppSpec",
    "Runtime",
    "SizeDefaults",
    "detect_runtime",
    "is_app_source",
    "parse_app_spec",
    "procfile_web",
]

# Never served as files from a dynamic site: they are its code and its secrets.
_SOURCE_SUFFIXES = (".py", ".pyc", ".php", ".phtml", ".inc")
_SOURCE_NAMES = frozenset(
    {"procfile", "requirements.txt", "pyproject.toml", "composer.json", "composer.lock"}
)


@dataclass(frozen=True, slots=True)
class AppLimits:
    memory_mb: int = 256
    # Share of one CPU (100 = one whole core); enforced by cgroup cpu.max, otherwise only nice.
    cpu_percent: int = 50
    nofile: int = 256
    nproc: int = 64
    # Without cgroups: RLIMIT_CPU, a backstop against a process that spins for ever.
    cpu_seconds: int = 3600
    # Disk quota of a sandboxed app's HOME and TMPDIR (plan storage).
    disk_mb: int = 1024


@dataclass(frozen=True, slots=True)
class SizeDefaults:
    limits: AppLimits
    max_active_apps: int


# Worker sizes (issue 5): per-site limits and how many app processes a worker keeps at once.
SIZES: dict[str, SizeDefaults] = {
    "small": SizeDefaults(AppLimits(memory_mb=256, cpu_percent=50, nofile=256, nproc=64, disk_mb=1024), 50),
    "medium": SizeDefaults(
        AppLimits(memory_mb=512, cpu_percent=100, nofile=1024, nproc=128, disk_mb=2048), 100
    ),
    "large": SizeDefaults(
        AppLimits(memory_mb=1024, cpu_percent=200, nofile=4096, nproc=256, disk_mb=4096), 200
    ),
}


@dataclass(frozen=True, slots=True)
class AppSpec:
    """A site's app settings from the snapshot (``runtime`` None: detect from content)."""

    runtime: Runtime | None = None
    entry: str = ""
    env: tuple[tuple[str, str], ...] = ()
    always_on: bool = False
    idle_timeout: float | None = None
    limits: AppLimits = field(default_factory=AppLimits)


def _int(raw: dict[str, Any], key: str, default: int, low: int, high: int, site: str) -> int:
    value = raw.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise InvalidInput(f"site {site!r}: limits.{key} must be an integer from {low} to {high}")
    return value


def parse_app_spec(site: str, raw: dict[str, Any], default_limits: AppLimits) -> AppSpec | None:
    """The app part of one site's snapshot entry; None when it says nothing about an app."""
    keys = ("runtime", "entry", "env", "always_on", "idle_timeout", "limits")
    if not any(k in raw for k in keys):
        return None
    runtime = raw.get("runtime")
    if runtime is not None and runtime not in RUNTIMES:
        raise InvalidInput(f"site {site!r}: runtime must be one of {', '.join(RUNTIMES)}")
    entry = raw.get("entry", "")
    if not isinstance(entry, str) or len(entry) > 1024 or "\n" in entry or "\x00" in entry:
        raise InvalidInput(f"site {site!r}: entry must be one line of text")
    env_raw = raw.get("env", {})
    if not isinstance(env_raw, dict):
        raise InvalidInput(f"site {site!r}: env must be an object of strings")
    env: list[tuple[str, str]] = []
    size = 0
    for key, value in sorted(env_raw.items()):
        if not isinstance(key, str) or not ENV_NAME.match(key) or key.upper() in RESERVED_ENV:
            raise InvalidInput(f"site {site!r}: {key!r} cannot be an app setting name")
        if not isinstance(value, str) or "\x00" in value:
            raise InvalidInput(f"site {site!r}: setting {key} must be a string")
        size += len(key) + len(value)
        env.append((key, value))
    if size > MAX_ENV_BYTES:
        raise InvalidInput(f"site {site!r}: app settings exceed {MAX_ENV_BYTES} bytes")
    always_on = raw.get("always_on", False)
    if not isinstance(always_on, bool):
        raise InvalidInput(f"site {site!r}: always_on must be true or false")
    idle = raw.get("idle_timeout")
    if idle is not None and (isinstance(idle, bool) or not isinstance(idle, int | float) or idle <= 0):
        raise InvalidInput(f"site {site!r}: idle_timeout must be a positive number of seconds")
    lim = raw.get("limits", {})
    if not isinstance(lim, dict):
        raise InvalidInput(f"site {site!r}: limits must be an object")
    d = default_limits
    limits = AppLimits(
        memory_mb=_int(lim, "memory_mb", d.memory_mb, 16, 1024 * 1024, site),
        cpu_percent=_int(lim, "cpu_percent", d.cpu_percent, 1, 100 * 1024, site),
        nofile=_int(lim, "nofile", d.nofile, 16, 1024 * 1024, site),
        nproc=_int(lim, "nproc", d.nproc, 4, 1024 * 1024, site),
        cpu_seconds=_int(lim, "cpu_seconds", d.cpu_seconds, 1, 10**9, site),
        disk_mb=_int(lim, "disk_mb", d.disk_mb, 16, 1024 * 1024, site),
    )
    return AppSpec(
        runtime=runtime,
        entry=entry,
        env=tuple(env),
        always_on=always_on,
        idle_timeout=float(idle) if idle is not None else None,
        limits=limits,
    )


def procfile_web(root: str) -> str | None:
    """The ``web:`` command of the site's Procfile, if it has one."""
    try:
        with open(os.path.join(root, "Procfile"), encoding="utf-8", errors="replace") as f:
            text = f.read(64 * 1024)
    except OSError:
        return None
    for line in text.splitlines():
        name, sep, command = line.partition(":")
        if sep and name.strip() == "web" and command.strip():
            return command.strip()
    return None


def detect_runtime(root: str) -> tuple[Runtime, str]:
    """(runtime, default entry) from a version directory's top level: a few stats, no reads but one."""
    try:
        names = set(os.listdir(root))
    except OSError:
        return "static", ""
    if "Procfile" in names:
        command = procfile_web(root)
        if command:
            return "command", command
    for module in ("app", "wsgi", "asgi"):
        if f"{module}.py" in names:
            return "python", module
    if "index.php" in names or any(n.endswith(".php") for n in names):
        return "php", "index.php"
    return "static", ""


def is_app_source(rel: str) -> bool:
    """A path a dynamic site's visitors never get as a file: code, dependency lists, dot files."""
    for part in rel.split("/"):
        if part.startswith(".") or part == "__pycache__":
            return True
    base = rel.rsplit("/", 1)[-1].lower()
    return base in _SOURCE_NAMES or base.endswith(_SOURCE_SUFFIXES)
