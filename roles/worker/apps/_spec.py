"""What the snapshot says about a site's app, and what its content says when the snapshot is silent.

A site's entry in the worker snapshot is :class:`~shared.contracts.snapshots.WorkerSite`; an absent
``runtime`` is detected from the content of the version being served.
"""

from __future__ import annotations

import json
import os
import re
import shlex
from dataclasses import dataclass, field
from functools import lru_cache

from roles.worker._source import is_app_source
from shared.appsettings import Runtime
from shared.contracts.snapshots import AppLimits as WireLimits
from shared.contracts.snapshots import WorkerSite

__all__ = [
    "SIZES",
    "AppLimits",
    "AppSpec",
    "Runtime",
    "SizeDefaults",
    "app_spec",
    "detect_runtime",
    "is_app_source",
    "node_entry",
    "parse_app_spec",
    "procfile_command",
    "procfile_web",
    "unserved_static_note",
]

# A PHP site keeps its scripts below the top level too (a blog/ folder): looked for this deep, and
# in this many directory entries at most, once per content version.
_PHP_SEARCH_DEPTH = 8
_PHP_SEARCH_ENTRIES = 20_000


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


# Worker sizes: per-site limits and how many app processes a worker keeps at once.
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
    restarts: int = 0  # a new value: the owner asked for new processes


def parse_app_spec(site: str, raw: object, default_limits: AppLimits) -> AppSpec | None:
    """The app part of one site's snapshot entry as it came over the wire (see :func:`app_spec`)."""
    return app_spec(WorkerSite.parse(raw, what=f"site {site!r}"), default_limits)


def app_spec(site: WorkerSite, default_limits: AppLimits) -> AppSpec | None:
    """The app part of one site's snapshot entry; None when it says nothing about an app.

    The entry was read with the checks management applied when each value was set
    (:mod:`shared.appsettings`, through the contract's field types); a limit the entry leaves out is
    the worker size's default.
    """
    if not site.has_app_fields:
        return None
    d, lim = default_limits, site.limits or WireLimits()
    limits = AppLimits(
        memory_mb=d.memory_mb if lim.memory_mb is None else lim.memory_mb,
        cpu_percent=d.cpu_percent if lim.cpu_percent is None else lim.cpu_percent,
        nofile=d.nofile if lim.nofile is None else lim.nofile,
        nproc=d.nproc if lim.nproc is None else lim.nproc,
        cpu_seconds=d.cpu_seconds if lim.cpu_seconds is None else lim.cpu_seconds,
        disk_mb=d.disk_mb if lim.disk_mb is None else lim.disk_mb,
    )
    return AppSpec(
        runtime=site.runtime,
        entry=site.entry,
        env=tuple(site.env.items()),
        always_on=site.always_on,
        idle_timeout=float(site.idle_timeout) if site.idle_timeout is not None else None,
        limits=limits,
        restarts=site.restarts,
    )


def procfile_web(root: str) -> str | None:
    """The ``web:`` command of the site's Procfile, if it has one."""
    return procfile_command(root, "web")


def procfile_command(root: str, kind: str) -> str | None:
    """The command of the site's Procfile for ``kind`` (``web``, ``release``), if it has one."""
    try:
        with open(os.path.join(root, "Procfile"), encoding="utf-8", errors="replace") as f:
            text = f.read(64 * 1024)
    except OSError:
        return None
    for line in text.splitlines():
        name, sep, command = line.partition(":")
        if sep and name.strip() == kind and command.strip():
            return command.strip()
    return None


_DJANGO_REQUIREMENT = re.compile(r"^\s*django\s*(?:[<>=!~;\[#@]|$)", re.IGNORECASE | re.MULTILINE)
COLLECTSTATIC = "python manage.py collectstatic --noinput"


def collectstatic_command(root: str, env: dict[str, str], release: str | None) -> str | None:
    """Django's ``collectstatic``, run before a version's release as Heroku and App Service run it
    for a Django project (``manage.py`` at the top, ``Django`` in ``requirements.txt``), so its
    ``STATIC_ROOT`` (whitenoise serves from it) is filled without a line in the Procfile. None when
    ``DISABLE_COLLECTSTATIC`` is set (Heroku's switch) or the release command runs it already."""
    if env.get("DISABLE_COLLECTSTATIC", "0") not in ("", "0"):
        return None
    if release is not None and "collectstatic" in release:
        return None
    if not os.path.isfile(os.path.join(root, "manage.py")):
        return None
    try:
        with open(os.path.join(root, "requirements.txt"), encoding="utf-8", errors="replace") as f:
            requirements = f.read(256 * 1024)
    except OSError:
        return None
    return COLLECTSTATIC if _DJANGO_REQUIREMENT.search(requirements) else None


# Django's collectstatic ends "N static files copied to '/path'." (with ", M unmodified" when some were).
_COPIED_TO = re.compile(r"static files? copied to '(?P<dest>[^']+)'")
_WHITENOISE = re.compile(r"^\s*whitenoise\b", re.IGNORECASE | re.MULTILINE)


def unserved_static_note(root: str, output: list[str]) -> str | None:
    """What to do when collectstatic (its ``output`` lines) put a Django project's files where nothing
    serves them: not in ``static/``, which the worker serves at /static/, and no whitenoise to serve
    them from there (the STATIC_ROOT Heroku's and Django's own deployment guides show, staticfiles/,
    leaves the admin unstyled)."""
    dest = next((m["dest"] for line in reversed(output) if (m := _COPIED_TO.search(line))), None)
    if dest is None:
        return None
    rel = os.path.relpath(dest, root)
    if rel == "static":
        return None
    try:
        with open(os.path.join(root, "requirements.txt"), encoding="utf-8", errors="replace") as f:
            if _WHITENOISE.search(f.read(256 * 1024)):
                return None
    except OSError:
        pass
    where = dest if rel.startswith("..") else f"{rel}/"
    return (
        f"collectstatic put the static files in {where}, which the platform does not serve: set "
        "STATIC_ROOT = BASE_DIR / 'static' (served at /static/), or add whitenoise to serve them"
    )


def detect_runtime(root: str) -> tuple[Runtime, str]:
    """(runtime, default entry) from a version directory: its top level, then (no app there) a PHP
    script anywhere below. A version directory never changes, so the search is done once per version."""
    try:
        st = os.stat(root)
    except OSError:
        return "static", ""
    return _detect(root, st.st_ino, st.st_mtime_ns)


@lru_cache(maxsize=4096)
def _detect(root: str, ino: int, mtime_ns: int) -> tuple[Runtime, str]:
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
    if "manage.py" in names:
        # Django's layout: <project>/wsgi.py beside manage.py.
        for name in sorted(names):
            if name.isidentifier() and os.path.isfile(os.path.join(root, name, "wsgi.py")):
                return "python", f"{name}.wsgi:application"
    for module in _APP_MODULES:
        # FastAPI's tutorial layout (main.py, app = FastAPI()), and Elastic Beanstalk's application.py.
        if f"{module}.py" in names and _binds_app(os.path.join(root, f"{module}.py")):
            return "python", module
    if any(n.lower().endswith(".php") for n in names):
        return "php", "index.php"
    if "package.json" in names:
        command = node_entry(root)
        if command:
            return "node", command
    if _php_below(root):
        return "php", "index.php"
    return "static", ""


# Modules that are an app only when they bind one (a main.py may as well be a script of a static site).
_APP_MODULES = ("main", "application")
_BINDS_APP = re.compile(rb"^(?:app|application)\s*(?::[^=\n]*)?=", re.MULTILINE)


def _binds_app(path: str) -> bool:
    try:
        with open(path, "rb") as f:
            return _BINDS_APP.search(f.read(1024 * 1024)) is not None
    except OSError:
        return False


# A package.json ``main`` is not always there; Node apps are usually started from one of these.
_NODE_MAINS = ("server.js", "index.js", "app.js", "server.mjs", "index.mjs", "app.mjs")


def node_entry(root: str) -> str | None:
    """How a Node app (a ``package.json``) starts: its ``start`` script (run directly when it is a
    plain ``node ...`` command: npm itself would cost each cold start a few hundred ms and stay
    resident), else ``node <main>``; None when package.json names nothing to run (a site that uses npm
    only for its build tools)."""
    try:
        with open(os.path.join(root, "package.json"), "rb") as f:
            pkg = json.loads(f.read(1024 * 1024))
    except (OSError, ValueError):
        return None
    if not isinstance(pkg, dict):
        return None
    scripts = pkg.get("scripts")
    start = scripts.get("start") if isinstance(scripts, dict) else None
    if isinstance(start, str) and start.strip():
        start = start.strip()
        try:
            words = shlex.split(start)
        except ValueError:
            words = []
        plain = words[:1] == ["node"] and not any(c in start for c in ";&|<>`()$")
        return start if plain else "npm start"
    main = pkg.get("main")
    candidates = ([main] if isinstance(main, str) else []) + list(_NODE_MAINS)
    for name in candidates:
        path = os.path.normpath(os.path.join(root, name))
        if path.startswith(root.rstrip("/") + "/") and os.path.isfile(path):
            return f"node {shlex.quote(os.path.relpath(path, root))}"
    return None


def _php_below(root: str) -> bool:
    """Whether a ``*.php`` file lies in a sub-folder (dot folders aside), within the search bounds."""
    pending, seen = [(root, 0)], 0
    while pending:
        path, depth = pending.pop()
        try:
            entries = list(os.scandir(path))
        except OSError:
            continue
        seen += len(entries)
        if seen > _PHP_SEARCH_ENTRIES:
            return False
        for entry in entries:
            if entry.name[:1] == ".":
                continue
            if entry.is_dir(follow_symlinks=False):
                if depth < _PHP_SEARCH_DEPTH:
                    pending.append((entry.path, depth + 1))
            elif entry.name.lower().endswith(".php") and entry.is_file(follow_symlinks=False):
                return True
    return False
