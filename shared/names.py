"""The one trust boundary for names people choose: sites, plans, tenants, hostnames."""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Iterable
from enum import StrEnum

import idna

from shared.errors import InvalidInput

__all__ = [
    "DEFAULT_IP_DNS_SERVICES",
    "HOSTNAME_MAX",
    "NAME_MAX",
    "NAME_PATTERN",
    "RESERVED_SITE_NAMES",
    "SITE_NAME_MAX",
    "SITE_NAME_PATTERN",
    "SLOT_NAME_PATTERN",
    "CertState",
    "HostnameState",
    "canonical_hostname",
    "suggest_site_name",
    "validate_custom_hostname",
    "validate_hostname",
    "validate_name",
    "validate_site_name",
    "validate_slot_name",
]

# A DNS label (RFC 1035 / 1123), lower case only, so one site has one spelling.
# The patterns are also the API schema's (JSON Schema regexes), so they stay in the common subset.
SITE_NAME_PATTERN = r"^[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?$"
SITE_NAME_MAX = 63
NAME_PATTERN = r"^[a-z0-9](?:[a-z0-9._-]{0,62}[a-z0-9])?$"
NAME_MAX = 64
HOSTNAME_MAX = 253
_LABEL = re.compile(SITE_NAME_PATTERN)
_NAME = re.compile(NAME_PATTERN)

# Names a tenant could use to look like the platform itself.
RESERVED_SITE_NAMES = frozenset({"www", "api", "admin", "portal", "ftp", "deploy", "publish", "management"})


_LABEL_RULE = "use letters a-z, digits and '-', not starting or ending with '-'"


def _site_name_problem(name: str) -> str | None:
    if name != name.lower():
        return f"site name {name!r} has upper-case letters"
    if len(name) > SITE_NAME_MAX:
        return f"site name {name!r} is longer than {SITE_NAME_MAX} characters (a DNS label's limit)"
    if not _LABEL.match(name):
        return f"site name {name!r} is not a valid DNS label"
    if name in RESERVED_SITE_NAMES:
        return f"site name {name!r} is reserved by the platform"
    return None


def suggest_site_name(name: str) -> str | None:
    """A valid site name close to ``name`` (``Blog_1`` → ``blog-1``), or None if there is no obvious one.

    Whatever it returns passes :func:`validate_site_name`, so a hint never offers a name that is then refused.
    """
    if not name.isascii():
        return None  # dropping letters would suggest a different name, not a spelling of this one
    label = re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")[:63].rstrip("-")
    if label in RESERVED_SITE_NAMES:
        label = f"{label}-site"
    if not label or label == name or _site_name_problem(label) is not None:
        return None
    return label


def validate_site_name(name: str) -> str:
    """A site name is one DNS label: it becomes ``<name>.<domain>``."""
    if not isinstance(name, str) or not name:
        raise InvalidInput("a site name is required")
    problem = _site_name_problem(name)
    if problem is None:
        return name
    if name in RESERVED_SITE_NAMES:
        raise InvalidInput(problem, hint="choose another name")
    better = suggest_site_name(name)
    raise InvalidInput(problem, hint=f"use {better!r}" if better else _LABEL_RULE)


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
    if len(host) > HOSTNAME_MAX or not all(_LABEL.match(label) for label in host.split(".")):
        raise InvalidInput(f"{name!r} is not a valid host name")
    return host


class HostnameState(StrEnum):
    """Where a tenant's claim on a custom hostname stands; stored as these strings."""

    # Claimed, not yet proven by DNS: shown with the record to create, never routed.
    PENDING = "pending"
    # DNS proved the tenant owns it: routed to the site.
    VERIFIED = "verified"


class CertState(StrEnum):
    """Where a custom hostname's certificate stands, as the CLI, API and portal show it."""

    # The name is not proven yet: no certificate is asked for a name that may be someone else's.
    PENDING_VERIFICATION = "pending_verification"
    # The controller is getting one from the ACME CA (first issue, a renewal, or a retry after a failure).
    ISSUING = "issuing"
    # A certificate is served; ``until`` says to when.
    VALID = "valid"
    # The last ACME order failed; ``reason`` says why, ``retry_at`` when the next try is.
    FAILED = "failed"
    # Verified, but no certificate and ACME is off: served over HTTPS with the platform's wildcard only.
    NONE = "none"


# Wildcard DNS services that answer a name with the IP address written inside it (127.0.0.1.nip.io,
# 10-0-0-1.sslip.io, ...): anyone can "own" such a name, so none may be a custom hostname.
DEFAULT_IP_DNS_SERVICES: tuple[str, ...] = (
    "nip.io",
    "sslip.io",
    "xip.io",
    "traefik.me",
    "localtest.me",
    "lvh.me",
    "localhost",
)

# Any form inet_aton(3) takes as an IPv4 address: 1 to 4 parts, decimal, octal or 0x hex (127.1, 0x7f.1, 2130706433).
_IPV4_PART = re.compile(r"^(?:0x[0-9a-f]*|[0-9]+)$")
_DASHED_IPV4 = re.compile(r"(?:^|[^0-9])(\d{1,3})-(\d{1,3})-(\d{1,3})-(\d{1,3})(?:$|[^0-9])")


def _is_ip_literal(host: str) -> bool:
    try:
        ipaddress.ip_address(host.strip("[]"))
        return True
    except ValueError:
        pass
    parts = host.split(".")
    return 1 <= len(parts) <= 4 and all(_IPV4_PART.match(p) for p in parts)


def _octet(text: str) -> bool:
    return text.isdigit() and int(text) <= 255


def _embeds_ipv4(labels: list[str]) -> bool:
    """True if the labels hold an IPv4 address: four dotted labels in a row, or one label ``a-b-c-d``."""
    for i in range(len(labels) - 3):
        if all(_octet(label) for label in labels[i : i + 4]):
            return True
    for label in labels:
        for m in _DASHED_IPV4.finditer(label):
            if all(_octet(g) for g in m.groups()):
                return True
    return False


def _under(host: str, suffix: str) -> bool:
    return host == suffix or host.endswith(f".{suffix}")


def _a_labels(name: str) -> str:
    """The name in A-labels (IDNA 2008 with UTS 46 mapping): a Unicode name is converted, a bad one refused."""
    try:
        return idna.encode(name, uts46=True).decode("ascii")
    except idna.IDNAError as err:
        raise InvalidInput(
            f"{name!r} is not a valid host name: {err}",
            hint="use labels of letters, digits and '-' (Unicode names are converted to xn-- form)",
        ) from None


def canonical_hostname(name: object) -> str:
    """A host name as DNS spells it (lower-case A-labels, no final dot); IP literals and bad syntax are refused."""
    if not isinstance(name, str) or not name.strip():
        raise InvalidInput("a host name is required", hint="e.g. www.example.com")
    raw = name.strip().lower()
    if raw.endswith("."):
        raw = raw[:-1]
    if _is_ip_literal(raw):
        raise InvalidInput(
            f"{name!r} is an IP address, not a host name",
            hint="a custom hostname is a DNS name you own, e.g. www.example.com",
        )
    if any(c.isspace() or c in "/:@[]\\?#%*" for c in raw):
        raise InvalidInput(f"{name!r} is not a host name", hint="use only the name, e.g. www.example.com")
    host = _a_labels(raw) if not raw.isascii() or "xn--" in raw else raw
    labels = host.split(".")
    if len(host) > HOSTNAME_MAX or not all(_LABEL.match(label) for label in labels):
        raise InvalidInput(
            f"{name!r} is not a valid host name",
            hint="labels of 1-63 letters, digits and '-', not starting or ending with '-', 253 characters at most",
        )
    return host


def validate_custom_hostname(
    name: object,
    *,
    platform_domain: str,
    reserved: Iterable[str] = (),
    ip_dns_services: Iterable[str] = DEFAULT_IP_DNS_SERVICES,
) -> str:
    """The one check on a host name a tenant wants for a site; returns it in lower-case A-labels.

    Refused: IP literals in any form, single labels, ``localhost`` and ``*.localhost``, names under the
    platform's domain or equal to (or under) a ``reserved`` name of the platform's own roles, names that
    are not valid DNS (IDNA 2008), and names that resolve to an IP address they embed (under one of
    ``ip_dns_services``, or holding an IPv4 address in dotted or dashed form).
    """
    host = canonical_hostname(name)
    labels = host.split(".")
    domain = platform_domain.lower().rstrip(".")
    if _under(host, domain):
        raise InvalidInput(
            f"{name!r}: names under {domain} belong to the platform",
            hint=f"your site already has <site>.{domain}; a custom hostname is a domain of your own",
        )
    if _under(host, "localhost"):
        raise InvalidInput(f"{name!r} is a loopback name (localhost and *.localhost are this machine)")
    if len(labels) < 2:
        raise InvalidInput(
            f"{name!r} is a single label", hint="a custom hostname needs a domain, e.g. www.example.com"
        )
    if labels[-1].isdigit():
        raise InvalidInput(f"{name!r} ends in a numeric label: no top-level domain is all digits")
    for own in reserved:
        own = own.lower().rstrip(".")
        if own and _under(host, own):
            raise InvalidInput(f"{name!r} is a name of the platform's own services")
    for service in ip_dns_services:
        service = service.lower().strip(".")
        if service and _under(host, service):
            raise InvalidInput(
                f"{name!r} is under {service}, a wildcard DNS service that resolves names to an IP address "
                "they embed",
                hint="use a domain you own",
            )
    if _embeds_ipv4(labels):
        raise InvalidInput(
            f"{name!r} embeds an IP address (names like 10.0.0.1.example.com or 10-0-0-1.example.com "
            "resolve to it on wildcard DNS services)",
            hint="use a domain you own",
        )
    return host


SLOT_NAME_PATTERN = r"^[a-z0-9]{1,20}$"
_SLOT_NAME = re.compile(SLOT_NAME_PATTERN)


def validate_slot_name(slot: object) -> str:
    """A slot's name: 1-20 lower-case letters and digits (the site is ``<production>-<slot>``)."""
    if not isinstance(slot, str) or not _SLOT_NAME.fullmatch(slot) or slot == "production":
        raise InvalidInput(
            f"slot name {str(slot)[:40]!r} is not allowed",
            hint="1-20 lower-case letters and digits, not 'production' (e.g. staging)",
        )
    return slot
