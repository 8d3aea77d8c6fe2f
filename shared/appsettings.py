"""The one trust boundary for a site's app settings (`sitecloud site set NAME KEY=VALUE`).

Lower-case ``runtime``, ``entry``, ``always_on`` and ``idle_timeout`` configure how the worker runs
the site, ``https_only``, ``hsts`` and ``affinity`` how the front ends route to it; every other setting is given
to the app as an environment variable.

There is one function per kind of value, each returning the typed value or raising
:class:`~shared.errors.InvalidInput` that says what is wrong and what is allowed. Management calls
:func:`check_app_setting` and :func:`check_settings` when a setting is set; the controller turns the
stored settings into the worker snapshot's app fields with :func:`app_fields`; the worker reads the
snapshot back with the same functions (``roles/worker/apps/_spec.py``). So what management accepts is
exactly what the worker can run, and a value that got past management anyway is refused by the worker
for that one site.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any, Literal

from shared.errors import InvalidInput, LimitReached

__all__ = [
    "APP_DISK_MIN_MB",
    "ENV_NAME",
    "FRONTEND_KEYS",
    "IDLE_TIMEOUT_MAX",
    "IDLE_TIMEOUT_MIN",
    "LOADER_ENV",
    "MAX_ENTRY_CHARS",
    "MAX_ENV_BYTES",
    "MAX_SETTINGS",
    "MAX_VALUE_CHARS",
    "RESERVED_ENV",
    "RUNTIMES",
    "SITE_KEYS",
    "Runtime",
    "app_fields",
    "boolean",
    "check_app_setting",
    "check_settings",
    "entry",
    "env_bytes",
    "env_value",
    "frontend_fields",
    "idle_timeout",
    "loader_variable",
    "runtime",
    "setting_name",
    "text",
]

Runtime = Literal["static", "python", "php", "node", "command"]
RUNTIMES: tuple[Runtime, ...] = ("static", "python", "php", "node", "command")
FRONTEND_KEYS = frozenset({"https_only", "hsts", "affinity"})
SITE_KEYS = frozenset({"runtime", "entry", "always_on", "idle_timeout"}) | FRONTEND_KEYS
ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,127}$")
# Set by the worker for every app; a site's settings may not override them.
RESERVED_ENV = frozenset({"PORT", "HOME", "TMPDIR", "PATH", "PYTHONPATH", "LD_PRELOAD", "LD_LIBRARY_PATH"})
# Variables the dynamic loader and libc act on before a program's own code runs (glibc ignores them for
# setuid programs for that reason). The sandbox and its privilege drop start as root with the app's
# environment: one of these would run a tenant's library as root on the host.
LOADER_ENV = frozenset(
    {
        "GCONV_PATH",
        "GETCONF_DIR",
        "GLIBC_TUNABLES",
        "HOSTALIASES",
        "LOCALDOMAIN",
        "LOCPATH",
        "MALLOC_TRACE",
        "NIS_PATH",
        "NLSPATH",
        "RESOLV_HOST_CONF",
        "RES_OPTIONS",
        "TZDIR",
    }
)


def loader_variable(key: str) -> bool:
    """Whether ``key`` is one the loader or libc acts on at a program's start (``LD_*`` and the like)."""
    upper = key.upper()
    return upper.startswith("LD_") or upper in LOADER_ENV


# What the worker gives an app as environment, counted as the kernel does ("KEY=VALUE\0", in bytes).
MAX_ENV_BYTES = 64 * 1024
# The smallest disk an app's home and temp directory get (an ext4 volume with its journal); a plan
# with less storage still gets this much for its app.
APP_DISK_MIN_MB = 16
MAX_SETTINGS = 100
MAX_VALUE_CHARS = 4096
MAX_ENTRY_CHARS = 1024
# An app left idle this long is stopped; a week bounds it well inside what a timer can hold.
IDLE_TIMEOUT_MIN, IDLE_TIMEOUT_MAX = 1, 7 * 24 * 3600
_TRUE, _FALSE = ("true", "1", "yes", "on"), ("false", "0", "no", "off")
# ASCII digits only: str.isdigit() also takes "²" and other digits int() refuses.
_DIGITS = re.compile(r"[0-9]{1,9}", re.ASCII)


def text(what: str, value: Any, *, max_chars: int, one_line: bool = False) -> str:
    """Text a process can be given: a string of valid UTF-8 (no lone surrogates), no NUL, bounded."""
    if not isinstance(value, str):
        raise InvalidInput(f"{what} must be text")
    if len(value) > max_chars:
        raise InvalidInput(f"{what} is {len(value)} characters long", hint=f"at most {max_chars} are allowed")
    if "\x00" in value:
        raise InvalidInput(f"{what} contains a NUL character", hint="any text but NUL is allowed")
    if one_line and ("\n" in value or "\r" in value):
        raise InvalidInput(f"{what} must be one line", hint="no line breaks")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise InvalidInput(
            f"{what} is not valid UTF-8 text (it holds a lone surrogate)", hint="use valid Unicode text"
        ) from None
    return value


def setting_name(key: Any) -> str:
    """An app setting's name: an environment variable name, not one the platform sets."""
    if not isinstance(key, str) or not ENV_NAME.match(key):
        shown = repr(key)[:60]
        raise InvalidInput(
            f"app setting name {shown} is not valid",
            hint="use letters, digits and '_', not starting with a digit (at most 128)",
        )
    if key.upper() in RESERVED_ENV:
        raise InvalidInput(
            f"{key} is set by the platform for every app and cannot be an app setting",
            hint=f"reserved names: {', '.join(sorted(RESERVED_ENV))}",
        )
    if loader_variable(key):
        raise InvalidInput(
            f"{key} changes how every program loads and cannot be an app setting",
            hint=f"names starting with LD_ and {', '.join(sorted(LOADER_ENV))} are refused",
        )
    return key


def env_value(key: str, value: Any) -> str:
    """The value of an environment setting."""
    return text(f"app setting {key!r}", value, max_chars=MAX_VALUE_CHARS)


def runtime(value: Any) -> Runtime:
    for r in RUNTIMES:
        if value == r:
            return r
    raise InvalidInput(f"runtime must be one of {', '.join(RUNTIMES)}", hint="or unset it to detect it")


def entry(value: Any) -> str:
    """What the app runtime starts: a module, a script, or a command line."""
    return text("entry", value, max_chars=MAX_ENTRY_CHARS, one_line=True)


def boolean(key: str, value: Any) -> bool:
    """A switch: true/false, or as text true/false, 1/0, yes/no, on/off."""
    if isinstance(value, bool):
        return value
    if isinstance(value, str):
        low = value.lower()
        if low in _TRUE:
            return True
        if low in _FALSE:
            return False
    raise InvalidInput(f"{key} must be true or false", hint="also accepted: 1/0, yes/no, on/off")


def idle_timeout(value: Any) -> int:
    """Seconds without a request before the app is stopped: a whole number within the bounds."""
    seconds: int | None = None
    if isinstance(value, int) and not isinstance(value, bool):
        seconds = value
    elif isinstance(value, str) and _DIGITS.fullmatch(value):
        seconds = int(value)
    if seconds is None or not IDLE_TIMEOUT_MIN <= seconds <= IDLE_TIMEOUT_MAX:
        raise InvalidInput(
            "idle_timeout must be a whole number of seconds",
            hint=f"from {IDLE_TIMEOUT_MIN} to {IDLE_TIMEOUT_MAX} (a week)",
        )
    return seconds


def env_bytes(env: Mapping[str, str]) -> int:
    """The room ``env`` takes in a process's environment."""
    return sum(len(k.encode()) + len(v.encode()) + 2 for k, v in env.items())


def _env_total(env: Mapping[str, str]) -> None:
    size = env_bytes(env)
    if size > MAX_ENV_BYTES:
        raise InvalidInput(
            f"the site's app settings would take {size} bytes of environment",
            hint=f"at most {MAX_ENV_BYTES} bytes in all (names and values)",
        )


def check_app_setting(key: str, value: str, *, always_on_allowed: bool = True) -> None:
    """Refuse one setting the worker could not use, with a message that says why."""
    if key in SITE_KEYS:
        if key == "runtime":
            runtime(value)
        elif key == "entry":
            entry(value)
        elif key == "idle_timeout":
            idle_timeout(value)
        elif boolean(key, value) and key == "always_on" and not always_on_allowed:
            # A plan's limit, as its other limits are (409, exit 5), not a mistyped value.
            raise LimitReached(
                "this site's plan does not allow always on",
                hint="an admin allows it with `sitecloud plan update PLAN --always-on`, or moves the "
                "subscription to a plan that does",
            )
        return
    command = _COMMAND_KEYS.get(key)
    if command is not None:
        raise InvalidInput(
            f"{key!r} is not a setting: {command}",
            hint=f"in upper case ({key.upper()}) it is an environment variable for the app, if that is what you mean",
        )
    near = _near_site_key(key)
    if near is not None:
        raise InvalidInput(
            f"{key!r} is not a setting of the platform: did you mean {near}?",
            hint=f"the platform's settings are {', '.join(sorted(SITE_KEYS))}; any other name is an "
            f"environment variable for the app (in upper case, {key.upper()}, if that is what you mean)",
        )
    env_value(setting_name(key), value)


# Lower-case names that other commands set: as app variables they would change nothing, silently.
_COMMAND_KEYS = {
    "instances": "a site's instances are set with `sitecloud site scale NAME --instances N`",
    "scale": "a site's instances are set with `sitecloud site scale NAME --instances N`",
    "hostname": "a custom hostname is added with `sitecloud hostname add NAME HOSTNAME`",
}


def _near_site_key(key: str) -> str | None:
    """The platform setting a lower-case name is a slip of (``https_onyl``, ``https-only``), if any: set
    as an app variable, it would change nothing, silently."""
    if key != key.lower() or key in SITE_KEYS:
        return None
    import difflib

    close = difflib.get_close_matches(key.replace("-", "_"), sorted(SITE_KEYS), n=1, cutoff=0.8)
    return close[0] if close else None


def check_settings(settings: Mapping[str, str]) -> None:
    """Refuse a site's whole set of settings that the worker could not give its app together."""
    if len(settings) > MAX_SETTINGS:
        raise LimitReached(f"a site may have at most {MAX_SETTINGS} app settings")
    _env_total({k: v for k, v in settings.items() if k not in SITE_KEYS})


def app_fields(settings: Mapping[str, str], *, always_on_allowed: bool) -> dict[str, Any]:
    """The worker snapshot's app fields for a site's stored settings (empty: a plain static site).

    A stored value these checks refuse (one written past management) goes into the snapshot as it is:
    the worker refuses it for that site alone and says why, and the controller goes on for the rest.
    """
    fields: dict[str, Any] = {}
    env: dict[str, str] = {}
    for key, value in settings.items():
        if key in FRONTEND_KEYS:
            continue
        try:
            if key == "runtime":
                fields["runtime"] = runtime(value)
            elif key == "entry":
                fields["entry"] = entry(value)
            elif key == "always_on":
                fields["always_on"] = always_on_allowed and boolean(key, value)
            elif key == "idle_timeout":
                fields["idle_timeout"] = idle_timeout(value)
            else:
                env[key] = value
        except InvalidInput:
            fields[key] = value
    if env:
        fields["env"] = env
    return fields


def frontend_fields(settings: Mapping[str, str]) -> dict[str, Any]:
    """The front end snapshot's per-site switches (HTTPS redirect, HSTS, affinity cookie) that are on."""
    out: dict[str, Any] = {}
    for key in sorted(FRONTEND_KEYS):
        if key in settings:
            try:
                if boolean(key, settings[key]):
                    out[key] = True
            except InvalidInput:
                out[key] = settings[key]  # the front end leaves this one site out, and says why
    return out
