"""The platform's own wildcard certificate, ``*.<domain>`` and ``<domain>``, by ACME DNS-01 (RFC 8555 8.4).

What management, the controller and the front ends share about it: the cloud settings that wire the
DNS update method (RFC 2136 dynamic updates signed with a TSIG key, RFC 8945), checked here for
management and read here by the controller; the record the controller keeps of the certificate and
its state (a runtime DB row management shows); and the ``wildcard`` entry of the front end snapshot.
"""

from __future__ import annotations

import base64
import binascii
import datetime as dt
import hashlib
import ipaddress
import re
from dataclasses import asdict, dataclass
from enum import StrEnum
from typing import Any

from shared.errors import InvalidInput

__all__ = [
    "RECORD_KEY",
    "TSIG_ALGORITHMS",
    "Dns01Settings",
    "PlatformCertificate",
    "WildcardRecord",
    "WildcardState",
    "challenge_name",
    "check_key_name",
    "check_secret",
    "check_update_server",
    "check_zone",
    "parse_update_server",
    "wildcard_view",
]

# The runtime DB settings row the controller keeps the certificate and its state in (not an admin setting).
RECORD_KEY = "wildcard_certificate"
# RFC 8945 6: HMAC-SHA256 is what BIND's tsig-keygen, Knot's keymgr and PowerDNS make by default.
TSIG_ALGORITHMS = ("hmac-sha256", "hmac-sha384", "hmac-sha512", "hmac-sha224", "hmac-sha1")
MAX_SECRET_BYTES = 512
_LABEL = re.compile(r"^(?!-)[a-z0-9_-]{1,63}(?<!-)$")


class WildcardState(StrEnum):
    """Where the platform's wildcard certificate stands, as the CLI, API and admin portal show it."""

    # Not turned on (or ACME is off): the cloud CA's wildcard is served.
    OFF = "off"
    # Turned on, not ordered yet.
    PENDING = "pending"
    # The controller is getting one (first issue, a renewal, a retry).
    ISSUING = "issuing"
    VALID = "valid"
    # The last order failed; ``reason`` says why, ``retry_at`` when the next try is.
    FAILED = "failed"


def challenge_name(domain: str) -> str:
    """Where the DNS-01 TXT records for ``*.<domain>`` and ``<domain>`` go (RFC 8555 8.4)."""
    return f"_acme-challenge.{domain}"


def _dns_name(value: object, what: str) -> str:
    if not isinstance(value, str):
        raise InvalidInput(f"{what} must be a DNS name")
    name = value.strip().lower().rstrip(".")
    if not name or len(name) > 253 or not all(_LABEL.match(label) for label in name.split(".")):
        raise InvalidInput(
            f"{what} {value!r} is not a DNS name",
            hint="labels of letters, digits, '-' and '_', dot-separated, e.g. example.net",
        )
    return name


def check_zone(value: object, domain: str = "") -> str:
    """The zone the update goes to ("" for none); it must hold ``_acme-challenge.<domain>``."""
    if isinstance(value, str) and not value.strip():
        return ""
    zone = _dns_name(value, "'dns_update_zone'")
    if domain and not (challenge_name(domain) + ".").endswith("." + zone + "."):
        raise InvalidInput(
            f"zone {zone!r} does not hold {challenge_name(domain)}, where the DNS-01 records go",
            hint=f"the zone of {domain} or a parent of it, e.g. {domain.partition('.')[2] or domain}",
        )
    return zone


def check_key_name(value: object) -> str:
    """The TSIG key's name, as the DNS server knows it ("" for none)."""
    if isinstance(value, str) and not value.strip():
        return ""
    return _dns_name(value, "'dns_update_key_name'")


def check_secret(value: object) -> str:
    """The TSIG secret: base64 (RFC 4648), as tsig-keygen, keymgr and pdnsutil print it ("" for none)."""
    if not isinstance(value, str):
        raise InvalidInput("'dns_update_key_secret' must be base64 text")
    text = "".join(value.split())
    if not text:
        return ""
    try:
        raw = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise InvalidInput(
            "'dns_update_key_secret' is not base64",
            hint="the secret line of the key file, e.g. from tsig-keygen",
        ) from None
    if not 8 <= len(raw) <= MAX_SECRET_BYTES:
        raise InvalidInput(f"'dns_update_key_secret' must be 8 to {MAX_SECRET_BYTES} bytes once decoded")
    return text


def parse_update_server(value: str) -> tuple[str, int]:
    """``host``, ``host:port``, ``ip``, ``[ipv6]:port`` -> (host, port); port 53 by default."""
    text = value.strip()
    host, port = text, "53"
    if text.startswith("["):
        host, _, rest = text[1:].partition("]")
        if rest:
            if not rest.startswith(":"):
                raise ValueError(text)
            port = rest[1:]
    elif text.count(":") == 1:
        host, _, port = text.partition(":")
    if not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(text)
    try:
        host = str(ipaddress.ip_address(host))
    except ValueError:
        host = _dns_name(host, "the update server")
    return host, int(port)


def check_update_server(value: object) -> str:
    """The DNS server that takes the updates (its primary): ``host[:port]`` ("" for none)."""
    if not isinstance(value, str):
        raise InvalidInput("'dns_update_server' must be 'host[:port]'")
    if not value.strip():
        return ""
    try:
        host, port = parse_update_server(value)
    except (ValueError, InvalidInput):
        raise InvalidInput(
            f"'dns_update_server' {value!r} is not 'host[:port]'",
            hint="e.g. ns1.example.net, 192.0.2.53:53 or [2001:db8::53]:53",
        ) from None
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


@dataclass(frozen=True)
class Dns01Settings:
    """The cloud settings the controller orders the wildcard with."""

    on: bool = False
    server: str = ""
    zone: str = ""
    key_name: str = ""
    algorithm: str = "hmac-sha256"
    secret: str = ""
    # The ACME directory it orders from (kept here so that a new CA counts as a new wiring too).
    directory_url: str = ""

    @property
    def complete(self) -> bool:
        return bool(self.server and self.zone and self.key_name and self.secret)

    @property
    def enabled(self) -> bool:
        return self.on and self.complete and self.algorithm in TSIG_ALGORITHMS

    @property
    def tag(self) -> str:
        """Tells one wiring from another (the secret hashed): a changed wiring is retried at once."""
        parts = (self.server, self.zone, self.key_name, self.algorithm, self.secret, self.directory_url)
        text = "\n".join(parts)
        return hashlib.sha256(text.encode()).hexdigest()[:16]

    @classmethod
    def from_settings(cls, values: dict[str, Any]) -> Dns01Settings:
        """From stored setting values (absent keys: the defaults)."""

        def text(key: str, default: str = "") -> str:
            value = values.get(key, default)
            return value if isinstance(value, str) else default

        return cls(
            on=values.get("wildcard_dns01") is True,
            server=text("dns_update_server"),
            zone=text("dns_update_zone"),
            key_name=text("dns_update_key_name"),
            algorithm=text("dns_update_key_algorithm", "hmac-sha256"),
            secret=text("dns_update_key_secret"),
            directory_url=text("acme_directory_url"),
        )


def _time(value: object) -> dt.datetime | None:
    if not isinstance(value, str) or not value:
        return None
    when = dt.datetime.fromisoformat(value)
    return when if when.tzinfo else when.replace(tzinfo=dt.UTC)


def _iso(when: dt.datetime | None) -> str | None:
    return when.isoformat() if when is not None else None


@dataclass(frozen=True)
class WildcardRecord:
    """The controller's record of the wildcard: the certificate it holds (if any) and the last order."""

    domain: str
    state: WildcardState = WildcardState.PENDING
    reason: str | None = None
    cert_pem: str = ""
    key_pem: str = ""
    not_after: dt.datetime | None = None
    # When the next order is due: the renewal time, or the end of a back-off.
    due_at: dt.datetime | None = None
    failures: int = 0
    # The wiring (Dns01Settings.tag) the last order ran with.
    tag: str = ""

    def to_json(self) -> dict[str, Any]:
        raw = asdict(self)
        raw.update(state=str(self.state), not_after=_iso(self.not_after), due_at=_iso(self.due_at))
        return raw

    @classmethod
    def parse(cls, raw: object) -> WildcardRecord | None:
        """A stored record; None for none or one this code cannot read (it is ordered again)."""
        if not isinstance(raw, dict) or not isinstance(raw.get("domain"), str):
            return None
        try:
            return cls(
                domain=raw["domain"],
                state=WildcardState(raw.get("state", "pending")),
                reason=raw.get("reason") if isinstance(raw.get("reason"), str) else None,
                cert_pem=str(raw.get("cert_pem") or ""),
                key_pem=str(raw.get("key_pem") or ""),
                not_after=_time(raw.get("not_after")),
                due_at=_time(raw.get("due_at")),
                failures=int(raw.get("failures") or 0),
                tag=str(raw.get("tag") or ""),
            )
        except (ValueError, TypeError):
            return None

    def certificate(self, domain: str) -> PlatformCertificate | None:
        """What the front ends serve for ``<site>.<domain>``, if this record holds one for ``domain``."""
        if self.domain != domain or not self.cert_pem or not self.key_pem:
            return None
        return PlatformCertificate(self.cert_pem, self.key_pem)

    def view(self, settings: Dns01Settings, acme_on: bool, domain: str) -> dict[str, Any]:
        """The state as the API shows it (never the key)."""
        names = [f"*.{domain}", domain]
        mine = self.domain == domain
        if not (settings.enabled and acme_on):
            state = WildcardState.OFF
        else:
            state = self.state if mine else WildcardState.PENDING
        return {
            "state": str(state),
            "names": names,
            "until": _iso(self.not_after) if mine and self.cert_pem else None,
            "reason": self.reason if state == WildcardState.FAILED else None,
            "retry_at": _iso(self.due_at) if state == WildcardState.FAILED else None,
        }


def wildcard_view(raw: object, settings: Dns01Settings, acme_on: bool, domain: str) -> dict[str, Any]:
    """The API's ``wildcard_certificate`` for a stored record (or none yet)."""
    record = WildcardRecord.parse(raw) or WildcardRecord(domain="")
    return record.view(settings, acme_on, domain)


@dataclass(frozen=True)
class PlatformCertificate:
    """The snapshot's ``wildcard``: a chain and key the front ends serve for ``<site>.<domain>``."""

    cert_pem: str
    key_pem: str

    def to_json(self) -> dict[str, str]:
        return {"cert": self.cert_pem, "key": self.key_pem}

    @classmethod
    def parse(cls, raw: object) -> PlatformCertificate | None:
        """The snapshot's entry (absent: None, the cloud CA's wildcard is served)."""
        if raw is None:
            return None
        if not isinstance(raw, dict):
            raise InvalidInput("'wildcard' must be an object {cert, key}")
        cert, key = raw.get("cert"), raw.get("key")
        if not (isinstance(cert, str) and isinstance(key, str) and "BEGIN" in cert and "BEGIN" in key):
            raise InvalidInput("'wildcard': 'cert' and 'key' must both be PEM text")
        return cls(cert, key)
