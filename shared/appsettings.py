"""The one trust boundary for a site's app settings (`sitecloud site set NAME KEY=VALUE`).

Lower-case ``runtime``, ``entry``, ``always_on`` and ``idle_timeout`` configure how the worker runs
the site, ``https_only`` and ``affinity`` how the front ends route to it; every other setting is given
to the app as an environment variable. Management checks each
setting here when it is set; the controller turns the stored settings into the worker snapshot's app
fields with :func:`app_fields`; the worker checks the snapshot again with the same names.
"""

from __future__ import annotations

import re
from typing import Any, Literal

from shared.errors import InvalidInput

__all__ = [
    "ENV_NAME",
    "FRONTEND_KEYS",
    "MAX_ENV_BYTES",
    "RESERVED_ENV",
    "RUNTIMES",
    "SITE_KEYS",
    "Runtime",
    "app_fields",
    "check_app_setting",
    "frontend_fields",
]

Runtime = Literal["static", "python", "php", "command"]
RUNTIMES: tuple[Runtime, ...] = ("static", "python", "php", "command")
FRONTEND_KEYS = frozenset({"https_only", "affinity"})
SITE_KEYS = frozenset({"runtime", "entry", "always_on", "idle_timeout"}) | FRONTEND_KEYS
ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,127}$")
# Set by the worker for every app; a site's settings may not override them.
RESERVED_ENV = frozenset({"PORT", "HOME", "TMPDIR", "PATH", "PYTHONPATH", "LD_PRELOAD", "LD_LIBRARY_PATH"})
MAX_ENV_BYTES = 64 * 1024
_TRUE, _FALSE = ("true", "1", "yes", "on"), ("false", "0", "no", "off")


def check_app_setting(key: str, value: str, *, always_on_allowed: bool = True) -> None:
    """Refuse a setting the worker could not use, with a message that says why."""
    if not isinstance(key, str) or not ENV_NAME.match(key):
        raise InvalidInput(
            f"app setting name {key!r} is not valid",
            hint="use letters, digits and '_', not starting with a digit (at most 128)",
        )
    if not isinstance(value, str) or "\x00" in value:
        raise InvalidInput(f"app setting {key!r} must be text")
    if key == "runtime" and value not in RUNTIMES:
        raise InvalidInput(f"runtime must be one of {', '.join(RUNTIMES)}", hint="or unset it to detect it")
    elif key == "entry" and ("\n" in value or len(value) > 1024):
        raise InvalidInput("entry must be one line of at most 1024 characters", hint="e.g. entry=app:app")
    elif key in ("always_on", *FRONTEND_KEYS):
        if value.lower() not in _TRUE + _FALSE:
            raise InvalidInput(f"{key} must be true or false")
        if key == "always_on" and value.lower() in _TRUE and not always_on_allowed:
            raise InvalidInput("this site's plan does not allow always on", hint="ask for a plan that does")
    elif key == "idle_timeout":
        if not value.isdigit() or int(value) < 1:
            raise InvalidInput("idle_timeout must be a whole number of seconds, at least 1")
    elif key.upper() in RESERVED_ENV:
        raise InvalidInput(f"{key} is set by the platform for every app and cannot be an app setting")


def app_fields(settings: dict[str, str], *, always_on_allowed: bool) -> dict[str, Any]:
    """The worker snapshot's app fields for a site's stored settings (empty: a plain static site)."""
    fields: dict[str, Any] = {}
    env: dict[str, str] = {}
    for key, value in settings.items():
        if key == "runtime":
            fields["runtime"] = value
        elif key == "entry":
            fields["entry"] = value
        elif key == "always_on":
            fields["always_on"] = always_on_allowed and value.lower() in _TRUE
        elif key == "idle_timeout":
            fields["idle_timeout"] = int(value)
        elif key in FRONTEND_KEYS:
            continue
        else:
            env[key] = value
    if env:
        fields["env"] = env
    return fields


def frontend_fields(settings: dict[str, str]) -> dict[str, Any]:
    """The front end snapshot's per-site switches (HTTPS redirect, affinity cookie) that are on."""
    return {key: True for key in sorted(FRONTEND_KEYS) if settings.get(key, "").lower() in _TRUE}
