"""The cloud's certificate authority: made by the controller on first `up`, it issues every role's
key and certificate (the role name sits in the subject's OU, which peers check) and the wildcard
certificate the front ends serve for ``*.<domain>``."""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from shared.files import atomic_write_bytes

__all__ = [
    "RENEW_WITHIN_DAYS",
    "CertificateAuthority",
    "IssuedCert",
    "certificate_expiry",
    "expiry_warning",
    "role_of_peer",
]

_VALIDITY_DAYS = 825
# A role certificate this close to its end is issued again by the next `sitecloud up` (for this
# machine's roles), and the role says Degraded until it is.
RENEW_WITHIN_DAYS = 30


@dataclass(frozen=True)
class IssuedCert:
    key_pem: bytes
    cert_pem: bytes

    def write(self, key_path: Path, cert_path: Path) -> None:
        atomic_write_bytes(key_path, self.key_pem, mode=0o600)
        atomic_write_bytes(cert_path, self.cert_pem, mode=0o644)


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def _new_key() -> ec.EllipticCurvePrivateKey:
    # P-256: the cheapest handshake that every client supports.
    return ec.generate_private_key(ec.SECP256R1())


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


class CertificateAuthority:
    """A self-issued CA kept in one directory: ``ca.pem`` (public) and ``ca.key`` (0600)."""

    def __init__(self, key: ec.EllipticCurvePrivateKey, cert: x509.Certificate) -> None:
        self._key = key
        self.cert = cert

    @property
    def cert_pem(self) -> bytes:
        return self.cert.public_bytes(serialization.Encoding.PEM)

    @classmethod
    def load_or_create(cls, directory: Path, *, name: str = "sitecloud cloud CA") -> CertificateAuthority:
        key_path, cert_path = directory / "ca.key", directory / "ca.pem"
        if key_path.exists() and cert_path.exists():
            key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
            if not isinstance(key, ec.EllipticCurvePrivateKey):
                raise ValueError(f"{key_path} is not an EC key")
            return cls(key, x509.load_pem_x509_certificate(cert_path.read_bytes()))
        directory.mkdir(parents=True, exist_ok=True)
        os.chmod(directory, 0o700)
        key = _new_key()
        subject = x509.Name(
            [
                x509.NameAttribute(NameOID.ORGANIZATION_NAME, "sitecloud"),
                x509.NameAttribute(NameOID.COMMON_NAME, name),
            ]
        )
        cert = (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(_now() - dt.timedelta(hours=1))
            .not_valid_after(_now() + dt.timedelta(days=3650))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True,
                    content_commitment=False,
                    key_encipherment=False,
                    data_encipherment=False,
                    key_agreement=False,
                    key_cert_sign=True,
                    crl_sign=True,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
            .sign(key, hashes.SHA256())
        )
        ca = cls(key, cert)
        atomic_write_bytes(key_path, _key_pem(key), mode=0o600)
        atomic_write_bytes(cert_path, ca.cert_pem, mode=0o644)
        return ca

    def issue(
        self,
        common_name: str,
        *,
        dns_names: list[str] | tuple[str, ...] = (),
        ip_addresses: list[str] | tuple[str, ...] = (),
        role: str | None = None,
        days: int = _VALIDITY_DAYS,
    ) -> IssuedCert:
        """A leaf certificate good for both TLS server and client use.

        ``role`` goes into the subject's OU: the internal API admits a peer by it.
        """
        key = _new_key()
        attrs = [x509.NameAttribute(NameOID.ORGANIZATION_NAME, "sitecloud")]
        if role:
            attrs.append(x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, role))
        attrs.append(x509.NameAttribute(NameOID.COMMON_NAME, common_name[:64]))
        sans: list[x509.GeneralName] = [x509.DNSName(n) for n in dns_names]
        sans += [x509.IPAddress(ipaddress.ip_address(ip)) for ip in ip_addresses]
        builder = (
            x509.CertificateBuilder()
            .subject_name(x509.Name(attrs))
            .issuer_name(self.cert.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(_now() - dt.timedelta(hours=1))
            .not_valid_after(_now() + dt.timedelta(days=days))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(
                x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]),
                critical=False,
            )
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(self._key.public_key()), critical=False
            )
        )
        if sans:
            builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
        cert = builder.sign(self._key, hashes.SHA256())
        return IssuedCert(_key_pem(key), cert.public_bytes(serialization.Encoding.PEM))

    def issue_wildcard(self, domain: str) -> IssuedCert:
        """The front ends' certificate for ``*.<domain>`` (and the bare domain)."""
        return self.issue(f"*.{domain}", dns_names=[f"*.{domain}", domain])


def role_of_peer(peercert: dict[str, object] | None) -> str | None:
    """The role named in a verified peer certificate's OU (``ssl.SSLSocket.getpeercert()`` form)."""
    if not peercert:
        return None
    subject = peercert.get("subject")
    if not isinstance(subject, tuple):
        return None
    for rdn in subject:
        for attr in rdn:
            if attr[0] == "organizationalUnitName":
                return str(attr[1])
    return None


def certificate_expiry(cert_file: Path) -> dt.datetime | None:
    """When the PEM certificate in ``cert_file`` stops being valid (None: no readable one)."""
    try:
        return x509.load_pem_x509_certificate(cert_file.read_bytes()).not_valid_after_utc
    except (OSError, ValueError):
        return None


def expiry_warning(expires: dt.datetime | None, role: str, host: str) -> str | None:
    """What a role says while its certificate is within :data:`RENEW_WITHIN_DAYS` of its end, or past it:
    every call between roles needs it, so the admin is told what issues a new one."""
    if expires is None:
        return None
    left = expires - _now()
    if left > dt.timedelta(days=RENEW_WITHIN_DAYS):
        return None
    fix = f"`sitecloud role repair {role} {host}` issues a new one"
    day = expires.date().isoformat()
    if left <= dt.timedelta(0):
        return f"its certificate expired on {day}: roles refuse its calls; {fix}"
    return f"its certificate expires in {left.days} days ({day}): {fix}"
