"""What management, the controller and the front ends share about ACME (RFC 8555) certificates.

The cloud settings that say which ACME directory the controller orders certificates from (and which
CA to trust for it), checked here for management and read here by the controller; and the HTTP-01
challenges the controller puts into the front end snapshot, which every front end answers at
``http://<hostname>/.well-known/acme-challenge/<token>`` (RFC 8555 8.3).
"""

from __future__ import annotations

import datetime as dt
import re
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding

from shared.errors import InvalidInput

__all__ = [
    "BACKOFF_FIRST",
    "BACKOFF_MAX",
    "CHALLENGE_PATH",
    "DIRECTORY_ALIASES",
    "LETSENCRYPT",
    "LETSENCRYPT_STAGING",
    "MAX_DIRECTORY_URL",
    "AcmeChallenge",
    "AcmeSettings",
    "backoff",
    "check_ca_bundle",
    "check_directory_url",
    "check_email",
    "parse_challenges",
    "renewal_time",
]

LETSENCRYPT = "https://acme-v02.api.letsencrypt.org/directory"
LETSENCRYPT_STAGING = "https://acme-staging-v02.api.letsencrypt.org/directory"
# What an admin may type instead of a URL; "off" (or "") turns ACME off.
DIRECTORY_ALIASES = {"letsencrypt": LETSENCRYPT, "letsencrypt-staging": LETSENCRYPT_STAGING, "off": ""}
CHALLENGE_PATH = "/.well-known/acme-challenge/"
# RFC 8555 8.3: the token is base64url; RFC 7638 thumbprint after the dot, base64url too.
_TOKEN = re.compile(r"^[A-Za-z0-9_-]{16,256}$")
_KEY_AUTHORIZATION = re.compile(r"^[A-Za-z0-9_-]{16,256}\.[A-Za-z0-9_-]{16,128}$")
_EMAIL = re.compile(r"^[^@\s:,]{1,64}@[A-Za-z0-9.-]{1,253}$")
MAX_CA_BUNDLE = 256 * 1024
MAX_DIRECTORY_URL = 2000
# After a failed order the next waits this long, doubling with each failure in a row up to the max.
BACKOFF_FIRST = dt.timedelta(minutes=5)
BACKOFF_MAX = dt.timedelta(days=1)


def renewal_time(not_before: dt.datetime, not_after: dt.datetime) -> dt.datetime:
    """Two thirds into the certificate's lifetime: 60 days into Let's Encrypt's 90."""
    return not_before + (not_after - not_before) * 2 / 3


def backoff(failures: int) -> dt.timedelta:
    """How long to wait after ``failures`` failed orders in a row."""
    doublings = max(0, min(failures - 1, 20))
    return min(BACKOFF_FIRST * (1 << doublings), BACKOFF_MAX)


@dataclass(frozen=True)
class AcmeSettings:
    """The cloud settings the controller orders certificates with."""

    directory_url: str = LETSENCRYPT
    # PEM certificates to trust for the directory's HTTPS (a test CA); "" trusts the system's CAs.
    ca_bundle: str = ""
    email: str = ""

    @property
    def enabled(self) -> bool:
        return bool(self.directory_url)

    @classmethod
    def from_settings(cls, values: dict[str, Any]) -> AcmeSettings:
        """From stored setting values (absent keys: the defaults); a bad stored value turns ACME off."""
        url = values.get("acme_directory_url", LETSENCRYPT)
        bundle = values.get("acme_ca_bundle", "")
        email = values.get("acme_email", "")
        return cls(
            directory_url=url if isinstance(url, str) else "",
            ca_bundle=bundle if isinstance(bundle, str) else "",
            email=email if isinstance(email, str) else "",
        )


def check_directory_url(value: object) -> str:
    """An ACME directory URL (https, or http to a loopback test server), an alias, or "" for off."""
    if not isinstance(value, str):
        raise InvalidInput(
            "'acme_directory_url' must be a URL or one of letsencrypt, letsencrypt-staging, off"
        )
    text = value.strip()
    if len(text) > MAX_DIRECTORY_URL:
        raise InvalidInput("'acme_directory_url' is too long", hint=f"at most {MAX_DIRECTORY_URL} characters")
    if text.lower() in DIRECTORY_ALIASES or not text:
        return DIRECTORY_ALIASES.get(text.lower(), "")
    parts = urlsplit(text)
    if parts.scheme != "https" or not parts.hostname or parts.username or parts.password:
        raise InvalidInput(
            f"ACME directory {value!r} is not an https:// URL",
            hint="e.g. https://acme-v02.api.letsencrypt.org/directory, or letsencrypt, letsencrypt-staging, off",
        )
    return text


def check_ca_bundle(value: object) -> str:
    """PEM certificates to trust for the ACME directory, or "" for the system's trust store."""
    if not isinstance(value, str):
        raise InvalidInput("'acme_ca_bundle' must be PEM text")
    if not value.strip():
        return ""
    if len(value) > MAX_CA_BUNDLE:
        raise InvalidInput(f"'acme_ca_bundle' may be at most {MAX_CA_BUNDLE // 1024} KB")
    try:
        certs = x509.load_pem_x509_certificates(value.encode())
    except ValueError:
        raise InvalidInput(
            "'acme_ca_bundle' is not PEM certificates", hint="'-----BEGIN CERTIFICATE-----' blocks"
        ) from None
    return "".join(c.public_bytes(Encoding.PEM).decode() for c in certs)


def check_email(value: object) -> str:
    """The contact address given to the ACME CA (expiry notices), or ""."""
    if not isinstance(value, str) or (value.strip() and not _EMAIL.match(value.strip())):
        raise InvalidInput("'acme_email' must be an e-mail address, or empty")
    return value.strip()


@dataclass(frozen=True)
class AcmeChallenge:
    """One HTTP-01 challenge: the front ends answer ``GET CHALLENGE_PATH + token`` for ``host``."""

    host: str
    token: str
    key_authorization: str

    def to_json(self) -> dict[str, str]:
        return {"host": self.host, "token": self.token, "key_authorization": self.key_authorization}

    @classmethod
    def parse(cls, raw: object) -> AcmeChallenge:
        if not isinstance(raw, dict):
            raise InvalidInput("an ACME challenge must be an object")
        host, token, answer = raw.get("host"), raw.get("token"), raw.get("key_authorization")
        if not isinstance(host, str) or not host or len(host) > 253:
            raise InvalidInput("an ACME challenge needs its host name")
        if not isinstance(token, str) or not _TOKEN.match(token):
            raise InvalidInput("an ACME challenge token must be base64url text")
        if (
            not isinstance(answer, str)
            or not _KEY_AUTHORIZATION.match(answer)
            or not answer.startswith(token)
        ):
            raise InvalidInput("an ACME key authorization must be '<token>.<thumbprint>'")
        return cls(host.lower().rstrip("."), token, answer)


def parse_challenges(raw: object) -> list[AcmeChallenge]:
    """The snapshot's ``acme_challenges`` list (absent: none)."""
    if raw is None:
        return []
    if not isinstance(raw, list):
        raise InvalidInput("'acme_challenges' must be a list")
    return [AcmeChallenge.parse(entry) for entry in raw]
