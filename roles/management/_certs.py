"""The trust boundary for certificates tenants upload for their custom hostnames (PEM or PFX).

An upload is accepted only when the private key belongs to the certificate, the certificate is valid
now and it covers the host name. What is kept is the chain as PEM (leaf first) and the key as
unencrypted PKCS#8 PEM, the form the front end will load.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, rsa
from cryptography.hazmat.primitives.serialization import pkcs12
from cryptography.x509.oid import NameOID

from shared.errors import InvalidInput

__all__ = ["MAX_UPLOAD_BYTES", "HostnameCertificate", "describe", "load_certificate", "name_matches"]

MAX_UPLOAD_BYTES = 64 * 1024

_KEY_TYPES = (rsa.RSAPrivateKey, ec.EllipticCurvePrivateKey, ed25519.Ed25519PrivateKey, ed448.Ed448PrivateKey)
# Each visitor's handshake signs with the key on the front end's one loop, which serves every site,
# and an RSA signature's cost grows with the cube of the modulus: 1.3 ms at 2048 bits, 0.25 s at
# 16384 (the loop stalled a quarter of a second for everyone, per handshake the tenant asked for).
# What public CAs issue for: RSA 2048 to 4096 bits, the NIST prime curves.
_RSA_BITS = (2048, 4096)
_CURVES = ("secp256r1", "secp384r1", "secp521r1")


@dataclass(frozen=True)
class HostnameCertificate:
    cert_pem: str
    key_pem: str
    not_after: dt.datetime


def _spki(public_key: object) -> bytes:
    return public_key.public_bytes(  # type: ignore[attr-defined, no-any-return]
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def _names(cert: x509.Certificate) -> list[str]:
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        return [n.lower() for n in san.get_values_for_type(x509.DNSName)]
    except x509.ExtensionNotFound:
        # Browsers ignore the CN today; old certificates without a SAN still name the host there.
        return [str(a.value).lower() for a in cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)]


def name_matches(pattern: str, hostname: str) -> bool:
    """RFC 6125 matching: exact, or a wildcard standing for exactly one left-most label."""
    pattern, hostname = pattern.lower().rstrip("."), hostname.lower().rstrip(".")
    if pattern == hostname:
        return True
    if not pattern.startswith("*."):
        return False
    head, _, rest = hostname.partition(".")
    return bool(head) and rest == pattern[2:] and rest.count(".") >= 1


def _load_key(data: bytes, password: str | None) -> object:
    try:
        return serialization.load_pem_private_key(data, password=password.encode() if password else None)
    except TypeError:
        raise InvalidInput(
            "the private key is encrypted", hint="give its password, or upload the key unencrypted"
        ) from None
    except ValueError:
        raise InvalidInput(
            "the private key could not be read (wrong password, or not a PEM private key)"
        ) from None


def _from_pem(
    cert_pem: bytes, key_pem: bytes | None, password: str | None
) -> tuple[object, list[x509.Certificate]]:
    try:
        certs = x509.load_pem_x509_certificates(cert_pem)
    except ValueError:
        raise InvalidInput(
            "the certificate is not PEM ('-----BEGIN CERTIFICATE-----')", hint="or upload a .pfx file"
        ) from None
    if key_pem is None:
        if b"PRIVATE KEY-----" not in cert_pem:
            raise InvalidInput(
                "a private key is required with a PEM certificate", hint="upload the key file too"
            )
        key_pem = cert_pem
    return _load_key(key_pem, password), certs


def _from_pfx(pfx: bytes, password: str | None) -> tuple[object, list[x509.Certificate]]:
    try:
        key, cert, extra = pkcs12.load_key_and_certificates(pfx, password.encode() if password else None)
    except ValueError:
        raise InvalidInput("the PFX file could not be opened (wrong password, or not a PFX file)") from None
    if key is None or cert is None:
        raise InvalidInput("the PFX file must hold a certificate and its private key")
    return key, [cert, *extra]


def _check_key_size(key: object) -> None:
    if isinstance(key, rsa.RSAPrivateKey) and not _RSA_BITS[0] <= key.key_size <= _RSA_BITS[1]:
        raise InvalidInput(
            f"the RSA key has {key.key_size} bits",
            hint=f"use a key of {_RSA_BITS[0]} to {_RSA_BITS[1]} bits (or ECDSA P-256), as public CAs issue",
        )
    if isinstance(key, ec.EllipticCurvePrivateKey) and key.curve.name not in _CURVES:
        raise InvalidInput(
            f"the ECDSA key's curve {key.curve.name} is not supported", hint="use P-256, P-384 or P-521"
        )


def load_certificate(
    hostname: str,
    *,
    cert_pem: bytes | None = None,
    key_pem: bytes | None = None,
    pfx: bytes | None = None,
    password: str | None = None,
    now: dt.datetime | None = None,
) -> HostnameCertificate:
    """Check an upload for ``hostname`` and return it in the stored form; :class:`InvalidInput` if not."""
    for part in (cert_pem, key_pem, pfx):
        if part is not None and len(part) > MAX_UPLOAD_BYTES:
            raise InvalidInput(f"a certificate upload may be at most {MAX_UPLOAD_BYTES // 1024} KB")
    if pfx is not None:
        key, certs = _from_pfx(pfx, password)
    elif cert_pem is not None:
        key, certs = _from_pem(cert_pem, key_pem, password)
    else:
        raise InvalidInput("give a PEM certificate (and key) or a PFX file")
    if not isinstance(key, _KEY_TYPES):
        raise InvalidInput("the private key type is not supported (use RSA, ECDSA or Ed25519)")
    _check_key_size(key)
    key_spki = _spki(key.public_key())
    leaf = next((c for c in certs if _spki(c.public_key()) == key_spki), None)
    if leaf is None:
        raise InvalidInput("the private key does not match the certificate")
    when = now or dt.datetime.now(dt.UTC)
    if leaf.not_valid_after_utc <= when:
        raise InvalidInput(f"the certificate expired on {leaf.not_valid_after_utc:%Y-%m-%d}")
    if leaf.not_valid_before_utc > when + dt.timedelta(minutes=5):
        raise InvalidInput(
            f"the certificate is not valid before {leaf.not_valid_before_utc:%Y-%m-%d %H:%M} UTC"
        )
    names = _names(leaf)
    if not any(name_matches(n, hostname) for n in names):
        raise InvalidInput(
            f"the certificate does not cover {hostname}",
            hint=f"it is for {', '.join(names) or 'no host name'}",
        )
    chain = [leaf, *(c for c in certs if c is not leaf)]
    return HostnameCertificate(
        cert_pem="".join(c.public_bytes(serialization.Encoding.PEM).decode() for c in chain),
        key_pem=key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        ).decode(),
        not_after=leaf.not_valid_after_utc,
    )


def describe(cert_pem: str) -> dict[str, object]:
    """What the portal and API show of a stored certificate (never the key)."""
    leaf = x509.load_pem_x509_certificates(cert_pem.encode())[0]
    return {
        "subject": leaf.subject.rfc4514_string(),
        "issuer": leaf.issuer.rfc4514_string(),
        "names": _names(leaf),
        "not_after": leaf.not_valid_after_utc.isoformat(),
        "fingerprint_sha256": leaf.fingerprint(hashes.SHA256()).hex(),
    }
