"""The controller's ACME (RFC 8555) client, on certbot's ``acme`` library: one account per directory,
one order per host name with HTTP-01 challenges, or one for the platform's wildcard with DNS-01.

Blocking (the library uses requests): the certificate loop runs each step in a thread. An order is
two steps so that the controller can publish the answers between them (in the front ends' snapshot, or
in DNS): :meth:`AcmeClient.begin` or :meth:`AcmeClient.begin_dns01` (new order, the answers to
publish) and :meth:`AcmeClient.finish` (tell the CA to check, wait, finalize with the CSR, download
the chain).
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

from acme import challenges, client, crypto_util, errors, messages
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from josepy.jwa import ES256
from josepy.jwk import JWKEC

from roles.controller._dnsupdate import TxtRecord
from shared.acme import AcmeChallenge, AcmeSettings
from shared.files import atomic_write_bytes
from shared.version import CODE_VERSION

__all__ = ["AcmeClient", "AcmeFailure", "IssuedCertificate", "PendingOrder"]

# How long the CA gets to check the challenges and sign, per order.
_ORDER_DEADLINE = dt.timedelta(seconds=90)
_NETWORK_TIMEOUT = 30


class AcmeFailure(Exception):
    """An order that did not give a certificate; the message is what the tenant is shown."""


@dataclass
class PendingOrder:
    hostname: str
    key_pem: bytes
    order: messages.OrderResource
    # The challenges the CA waits for, and their answers for the front ends.
    to_answer: list[messages.ChallengeBody] = field(default_factory=list)
    challenges: list[AcmeChallenge] = field(default_factory=list)
    # DNS-01: the TXT records to put in DNS.
    txt_records: list[TxtRecord] = field(default_factory=list)


@dataclass(frozen=True)
class IssuedCertificate:
    cert_pem: str
    key_pem: str
    not_before: dt.datetime
    not_after: dt.datetime


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def _problem(err: BaseException) -> str:
    """An ACME error in words: the CA's own problem detail where it gave one."""
    if isinstance(err, errors.ValidationError):
        details = []
        for authzr in err.failed_authzrs:
            for chall in authzr.body.challenges:
                if chall.error is not None:
                    details.append(f"{authzr.body.identifier.value}: {chall.error.detail or chall.error.typ}")
        return "the CA could not validate the challenge: " + "; ".join(details)
    if isinstance(err, messages.Error):
        return f"the CA refused: {err.detail or err.typ}"
    if isinstance(err, errors.TimeoutError):
        return "the CA did not finish the order in time"
    text = str(err) or type(err).__name__
    return text if len(text) < 400 else text[:400] + "…"


class AcmeClient:
    """An account with one ACME directory; its key is kept in ``state_dir`` (the controller's home)."""

    def __init__(self, settings: AcmeSettings, state_dir: Path) -> None:
        self.settings = settings
        self._dir = state_dir
        tag = hashlib.sha256(settings.directory_url.encode()).hexdigest()[:16]
        self._account_file = state_dir / f"account-{tag}.json"
        self._bundle_file = state_dir / f"ca-bundle-{tag}.pem"
        self._client: client.ClientV2 | None = None
        self._key: JWKEC | None = None

    def _account_key(self) -> tuple[ec.EllipticCurvePrivateKey, str | None]:
        if self._account_file.exists():
            saved = json.loads(self._account_file.read_text())
            key = serialization.load_pem_private_key(saved["key"].encode(), password=None)
            assert isinstance(key, ec.EllipticCurvePrivateKey)
            return key, saved.get("uri")
        return ec.generate_private_key(ec.SECP256R1()), None

    def _save_account(self, key: ec.EllipticCurvePrivateKey, uri: str) -> None:
        self._dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        pem = _pem_key(key).decode()
        atomic_write_bytes(self._account_file, json.dumps({"key": pem, "uri": uri}).encode(), mode=0o600)

    def _connect(self) -> client.ClientV2:
        if self._client is not None:
            return self._client
        raw_key, uri = self._account_key()
        key = JWKEC(key=raw_key)
        net = client.ClientNetwork(
            key, alg=ES256, user_agent=f"sitecloud/{CODE_VERSION}", timeout=_NETWORK_TIMEOUT
        )
        if self.settings.ca_bundle:
            self._dir.mkdir(parents=True, exist_ok=True, mode=0o700)
            atomic_write_bytes(self._bundle_file, self.settings.ca_bundle.encode(), mode=0o644)
            # requests takes a CA bundle path where the library passes its verify flag.
            net.verify_ssl = str(self._bundle_file)  # type: ignore[assignment]
        try:
            directory = client.ClientV2.get_directory(self.settings.directory_url, net)
            acme = client.ClientV2(directory, net)
            if uri is None:
                contact = (f"mailto:{self.settings.email}",) if self.settings.email else ()
                registration = messages.NewRegistration.from_data(
                    terms_of_service_agreed=True, contact=contact
                )
                try:
                    regr = acme.new_account(registration)
                except errors.ConflictError as known:
                    regr = acme.query_registration(
                        messages.RegistrationResource(uri=known.location, body=messages.Registration())
                    )
                self._save_account(raw_key, regr.uri)
            else:
                net.account = messages.RegistrationResource(uri=uri, body=messages.Registration())
        except Exception as err:
            raise AcmeFailure(
                f"the ACME directory {self.settings.directory_url} could not be used: {_problem(err)}"
            ) from err
        self._client, self._key = acme, key
        return acme

    def begin(self, hostname: str) -> PendingOrder:
        """A new order for ``hostname`` with a fresh key, and the HTTP-01 answers to publish."""
        return self._begin([hostname], challenges.HTTP01)

    def begin_dns01(self, names: list[str]) -> PendingOrder:
        """A new order for ``names`` (a wildcard among them) and the DNS-01 TXT records to publish."""
        return self._begin(names, challenges.DNS01)

    def _begin(self, names: list[str], kind: type[challenges.KeyAuthorizationChallenge]) -> PendingOrder:
        acme = self._connect()
        assert self._key is not None
        key_pem = _pem_key(ec.generate_private_key(ec.SECP256R1()))
        try:
            order = acme.new_order(crypto_util.make_csr(key_pem, names))
        except Exception as err:
            raise AcmeFailure(_problem(err)) from err
        pending = PendingOrder(names[0], key_pem, order)
        for authzr in order.authorizations:
            if authzr.body.status == messages.STATUS_VALID:
                continue  # the CA still trusts an earlier proof for this name
            # A wildcard's authorization names the domain under it (RFC 8555 7.1.4).
            name = authzr.body.identifier.value
            challb = next((c for c in authzr.body.challenges if isinstance(c.chall, kind)), None)
            if challb is None:
                raise AcmeFailure(f"the CA offers no {kind.typ} challenge for {name}")
            pending.to_answer.append(challb)
            if isinstance(challb.chall, challenges.DNS01):
                pending.txt_records.append(
                    TxtRecord(challb.chall.validation_domain_name(name), challb.chall.validation(self._key))
                )
            else:
                validation = challb.chall.validation(self._key)
                pending.challenges.append(AcmeChallenge(name, challb.chall.encode("token"), str(validation)))
        return pending

    def finish(self, pending: PendingOrder) -> IssuedCertificate:
        """Ask the CA to check the published answers, then finalize and download the chain."""
        acme = self._connect()
        assert self._key is not None
        try:
            for challb in pending.to_answer:
                acme.answer_challenge(challb, challb.response(self._key))
            deadline = dt.datetime.now() + _ORDER_DEADLINE
            done = acme.poll_and_finalize(pending.order, deadline)
        except Exception as err:
            raise AcmeFailure(_problem(err)) from err
        chain = done.fullchain_pem
        if not chain:
            raise AcmeFailure("the CA finalized the order without a certificate")
        leaf = x509.load_pem_x509_certificates(chain.encode())[0]
        return IssuedCertificate(
            cert_pem=chain,
            key_pem=pending.key_pem.decode(),
            not_before=leaf.not_valid_before_utc,
            not_after=leaf.not_valid_after_utc,
        )

    def close(self) -> None:
        if self._client is not None:
            self._client.net.session.close()
            self._client = None
