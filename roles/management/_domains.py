"""Proof that a tenant owns a custom hostname, as Azure App Service asks for it.

A claim is proven when DNS holds a TXT record ``asuid.<hostname>`` with the subscription's
verification id. A CNAME from the hostname to the site's own name ``<site>.<domain>`` sends visitors
here but proves nothing on its own: a site's name is free again once the site is deleted, and a CNAME
its owner left behind would then hand the name to whoever makes a site of that name next (the
dangling-CNAME takeover Azure closed the same way). DNS is asked through the resolvers the admin
configured (cloud setting ``dns_resolvers``), or the system's.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass

import dns.exception
import dns.message
import dns.name
import dns.nameserver
import dns.rdatatype
import dns.resolver

from shared.errors import InvalidInput

__all__ = [
    "DnsRecord",
    "check_ip_dns_services",
    "check_ownership",
    "parse_resolvers",
    "records_to_create",
    "txt_name",
]

_DOMAIN = re.compile(r"^(?:[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?\.)*[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?$")
# One check asks two names; each answer gets this long in all, so a dead resolver costs seconds, not minutes.
_LIFETIME = 3.0


@dataclass(frozen=True)
class DnsRecord:
    """A record the tenant creates at their DNS provider."""

    type: str
    name: str
    value: str

    def to_json(self) -> dict[str, str]:
        return {"type": self.type, "name": self.name, "value": self.value}


def txt_name(hostname: str) -> str:
    return f"asuid.{hostname}"


def records_to_create(hostname: str, site_host: str, verification_id: str) -> list[DnsRecord]:
    """The TXT record proves the claim; the CNAME sends the visitors here."""
    return [DnsRecord("TXT", txt_name(hostname), verification_id), DnsRecord("CNAME", hostname, site_host)]


def parse_resolvers(value: object) -> list[tuple[str, int]]:
    """``["10.0.0.53", "10.0.0.54:5353", "[2001:db8::53]:53"]`` → (address, port) pairs; bad entries are refused."""
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise InvalidInput("'dns_resolvers' must be a list of IP addresses (with an optional :port)")
    out: list[tuple[str, int]] = []
    for entry in value:
        text, port = entry.strip(), "53"
        if text.startswith("["):
            text, _, rest = text[1:].partition("]")
            if rest:
                port = rest.removeprefix(":")
        elif text.count(":") == 1:
            text, port = text.split(":")
        try:
            address = str(ipaddress.ip_address(text))
        except ValueError:
            raise InvalidInput(
                f"DNS resolver {entry!r} is not an IP address", hint="e.g. 10.0.0.53 or 10.0.0.53:5353"
            ) from None
        if not port.isdigit() or not 1 <= int(port) <= 65535:
            raise InvalidInput(f"DNS resolver {entry!r} has a bad port", hint="a port is 1-65535")
        out.append((address, int(port)))
    return out


def check_ip_dns_services(value: object) -> list[str]:
    """The admin's list of wildcard-IP DNS services: domain names, stored lower-case without a final dot."""
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise InvalidInput(
            "'ip_dns_services' must be a list of domain names", hint='e.g. ["nip.io", "sslip.io"]'
        )
    out = []
    for entry in value:
        name = entry.strip().lower().rstrip(".")
        if not _DOMAIN.match(name):
            raise InvalidInput(f"{entry!r} is not a domain name", hint="e.g. nip.io")
        out.append(name)
    return out


def _resolver(resolvers: list[tuple[str, int]]) -> dns.resolver.Resolver:
    if not resolvers:
        resolver = dns.resolver.Resolver(configure=True)
    else:
        resolver = dns.resolver.Resolver(configure=False)
        resolver.nameservers = [dns.nameserver.Do53Nameserver(addr, port) for addr, port in resolvers]
    resolver.lifetime = _LIFETIME
    resolver.cache = None
    return resolver


def _answers(resolver: dns.resolver.Resolver, name: str, rdtype: str) -> tuple[list[str], str]:
    """The record texts for a name and type, and what went wrong if there are none."""
    try:
        answer = resolver.resolve(name, rdtype, raise_on_no_answer=False, search=False)
    except dns.resolver.NXDOMAIN:
        return [], f"{name} does not exist in DNS"
    except dns.resolver.NoNameservers:
        return [], f"no DNS server answered for {name}"
    except dns.exception.Timeout:
        return [], f"DNS did not answer for {name} in time"
    except dns.exception.DNSException as err:
        return [], f"DNS lookup of {name} failed: {err}"
    if answer.rrset is None:
        return [], f"{name} has no {rdtype} record"
    if rdtype == "TXT":
        return [b"".join(r.strings).decode("utf-8", "replace") for r in answer.rrset], ""
    return [r.to_text() for r in answer.rrset], ""


def check_ownership(
    hostname: str, *, site_host: str, verification_id: str, resolvers: list[tuple[str, int]]
) -> str | None:
    """None when DNS proves the claim; otherwise why not, in words the tenant can act on."""
    try:
        resolver = _resolver(resolvers)
    except dns.exception.DNSException as err:
        return f"no DNS resolver is configured on the management host ({err})"
    texts, txt_problem = _answers(resolver, txt_name(hostname), "TXT")
    if verification_id in (t.strip() for t in texts):
        return None
    txt_why = (
        txt_problem or f"{txt_name(hostname)} holds {', '.join(map(repr, texts))}, not the verification id"
    )
    targets, _ = _answers(resolver, hostname, "CNAME")
    wanted = dns.name.from_text(site_host)
    if any(dns.name.from_text(t) == wanted for t in targets):
        return f"{txt_why}; the CNAME to {site_host} sends visitors here, but only the TXT record proves the name is yours"
    return txt_why
