"""The one trust boundary for names people choose: sites, plans, tenants, hostnames."""

from __future__ import annotations

import re

from shared.errors import InvalidInput

__all__ = ["RESERVED_SITE_NAMES", "validate_hostname", "validate_name", "validate_site_name"]

# A DNS label (RFC 1035 / 1123), lower case only, so one site has one spelling.
_LABEL = re.compile(r"^[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?$")
_NAME = re.compile(r"^[a-z0-9](?:[a-z0-9._-]{0,62}[a-z0-9])?$")

# Names a tenant could use to look like the platform itself.
RESERVED_SITE_NAMES = frozenset({"www", "api", "admin", "portal", "ftp", "deploy", "publish", "management"})


def validate_site_name(name: str) -> str:
    """A site name is one DNS label: it becomes ``<name>.<domain>``."""
    if not isinstance(name, str) or not name:
        raise InvalidInput("a site name is required")
    if name != name.lower():
        raise InvalidInput(f"site name {name!r} has upper-case letters", hint=f"use {name.lower()!r}")
    if len(name) > 63:
        raise InvalidInput(f"site name {name!r} is longer than 63 characters (a DNS label's limit)")
    if not _LABEL.match(name):
        raise InvalidInput(
            f"site name {name!r} is not a valid DNS label",
            hint="use letters a-z, digits and '-', not starting or ending with '-'",
        )
    if name in RESERVED_SITE_NAMES:
        raise InvalidInput(f"site name {name!r} is reserved by the platform", hint="choose another name")
    return name


def validate_name(name: str, *, what: str) -> str:
    """Plan and tenant names: short slugs."""
    if not isinstance(name, str) or not name:
        raise InvalidInput(f"a {what} name is required")
    if not _NAME.match(name):
        raise InvalidInput(
            f"{what} name {name!r} is not valid",
            hint="use 1-64 characters a-z, 0-9, '.', '_' or '-', starting and ending with a letter or digit",
        )
    return name


def validate_hostname(name: str) -> str:
    """A fully qualified host name (custom hostnames, role hosts); returned lower-cased."""
    if not isinstance(name, str) or not name:
        raise InvalidInput("a host name is required")
    host = name.lower().rstrip(".")
    if len(host) > 253 or not all(_LABEL.match(label) for label in host.split(".")):
        raise InvalidInput(f"{name!r} is not a valid host name")
    return host
