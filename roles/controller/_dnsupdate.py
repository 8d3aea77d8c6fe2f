"""DNS-01 records by RFC 2136 dynamic update, signed with the admin's TSIG key (RFC 8945).

This is how BIND, PowerDNS, Knot and many DNS providers take ACME DNS-01 records (certbot-dns-rfc2136
and lego do the same). Blocking (dnspython's query functions): the certificate loop calls it in a thread.
Only the TXT values this order made are added and deleted, never the whole record set, so another
client's records at the same name are left alone.
"""

from __future__ import annotations

import socket
import time
from collections.abc import Sequence
from dataclasses import dataclass

import dns.exception
import dns.message
import dns.name
import dns.query
import dns.rcode
import dns.rdatatype
import dns.tsig
import dns.tsigkeyring
import dns.update

from shared.dns01 import Dns01Settings, parse_update_server

__all__ = ["DnsUpdateFailure", "DnsUpdater", "TxtRecord"]

_TIMEOUT = 10.0
# Short: the records live only while the CA checks them.
_TTL = 60


class DnsUpdateFailure(Exception):
    """The update method did not do what it was asked; the message is what the admin is shown.

    ``answered``: the server said no, so nothing changed; otherwise (no answer) the update may have
    been applied.
    """

    def __init__(self, message: str, *, answered: bool = True) -> None:
        super().__init__(message)
        self.answered = answered


@dataclass(frozen=True)
class TxtRecord:
    """One DNS-01 answer: a TXT value at ``name`` (absolute, no final dot)."""

    name: str
    value: str


def _texts(rrset: object) -> set[str]:
    return {b"".join(rd.strings).decode() for rd in rrset}  # type: ignore[attr-defined]


class DnsUpdater:
    def __init__(self, settings: Dns01Settings) -> None:
        self.settings = settings
        self._zone = dns.name.from_text(settings.zone)
        self._key = dns.name.from_text(settings.key_name)
        self._algorithm = dns.name.from_text(settings.algorithm)
        self._keyring = dns.tsigkeyring.from_text({settings.key_name: (settings.algorithm, settings.secret)})

    def _where(self) -> tuple[str, int]:
        host, port = parse_update_server(self.settings.server)
        try:
            info = socket.getaddrinfo(host, port, type=socket.SOCK_DGRAM)
        except OSError as err:
            raise DnsUpdateFailure(f"the DNS update server {host} does not resolve: {err}") from None
        return str(info[0][4][0]), port

    def _update(self, records: Sequence[TxtRecord], *, add: bool) -> None:
        update = dns.update.UpdateMessage(
            self._zone, keyring=self._keyring, keyname=self._key, keyalgorithm=self._algorithm
        )
        for record in records:
            name = dns.name.from_text(record.name)
            if not name.is_subdomain(self._zone):
                raise DnsUpdateFailure(f"{record.name} is not in the zone {self.settings.zone}")
            text = '"' + record.value + '"'
            if add:
                update.add(name, _TTL, dns.rdatatype.TXT, text)
            else:
                update.delete(name, dns.rdatatype.TXT, text)
        where, port = self._where()
        server = self.settings.server
        key = self.settings.key_name
        try:
            answer, _ = dns.query.udp_with_fallback(update, where, timeout=_TIMEOUT, port=port)
        except dns.tsig.PeerBadKey:
            raise DnsUpdateFailure(
                f"the DNS server {server} does not know the TSIG key {key!r} "
                f"with algorithm {self.settings.algorithm} (BADKEY)"
            ) from None
        except dns.tsig.PeerBadSignature:
            raise DnsUpdateFailure(
                f"the DNS server {server} refused the signature of TSIG key {key!r} (BADSIG): "
                "its secret or algorithm is not the one the server has"
            ) from None
        except dns.tsig.PeerBadTime:
            raise DnsUpdateFailure(
                f"the DNS server {server} refused the TSIG time (BADTIME): this host's clock is off"
            ) from None
        except dns.exception.Timeout:
            raise DnsUpdateFailure(
                f"the DNS server {server} did not answer within {_TIMEOUT:.0f} s", answered=False
            ) from None
        except (dns.exception.DNSException, OSError) as err:
            raise DnsUpdateFailure(
                f"the update to the DNS server {server} failed: {err}", answered=False
            ) from None
        rcode = answer.rcode()
        if rcode != dns.rcode.NOERROR:
            why = {
                dns.rcode.NOTAUTH: f"it is not authoritative for {self.settings.zone} or did not accept key {key!r}",
                dns.rcode.REFUSED: f"its update policy does not let key {key!r} change TXT records there",
                dns.rcode.NOTZONE: f"the name is outside the zone {self.settings.zone}",
            }.get(rcode, "")
            raise DnsUpdateFailure(
                f"the DNS server {server} answered the update of {records[0].name} with "
                f"{dns.rcode.to_text(rcode)}" + (f": {why}" if why else "")
            )

    def add(self, records: Sequence[TxtRecord]) -> None:
        """Add the TXT values in one update (RFC 2136: applied all or none)."""
        self._update(records, add=True)

    def remove(self, records: Sequence[TxtRecord]) -> None:
        """Delete exactly these TXT values."""
        self._update(records, add=False)

    def visible(self, records: Sequence[TxtRecord]) -> bool:
        """Whether the update server answers every value (asked directly: no cache between)."""
        where, port = self._where()
        for name in {r.name for r in records}:
            query = dns.message.make_query(name, dns.rdatatype.TXT)
            try:
                answer, _ = dns.query.udp_with_fallback(query, where, timeout=_TIMEOUT, port=port)
            except (dns.exception.DNSException, OSError):
                return False
            found: set[str] = set()
            for rrset in answer.answer:
                if rrset.rdtype == dns.rdatatype.TXT:
                    found |= _texts(rrset)
            if not {r.value for r in records if r.name == name} <= found:
                return False
        return True

    def wait_visible(self, records: Sequence[TxtRecord], timeout: float = 30.0) -> None:
        """Wait until the update server answers the new values, so the CA is not asked too early."""
        deadline = time.monotonic() + timeout
        while not self.visible(records):
            if time.monotonic() >= deadline:
                raise DnsUpdateFailure(
                    f"the DNS server {self.settings.server} took the update but does not answer "
                    f"the TXT records at {records[0].name} after {timeout:.0f} s"
                )
            time.sleep(0.5)
