"""Certificates for verified custom hostnames, ordered from the cloud's ACME directory by the controller,
and (opt-in) the platform's wildcard ``*.<domain>`` by DNS-01.

Every verified name whose certificate is not the tenant's own upload gets one: at once when it is
verified, again at two thirds of the certificate's lifetime (as Let's Encrypt advises), and after a
failure when its back-off ends (5 minutes, doubling up to a day). The state of each name is written
to the runtime DB, where management shows it; a new certificate reaches the front ends in their next
snapshot, so a renewal swaps it for new handshakes while open connections go on with the old one.

The wildcard follows the same rules in the same loop; its answers go into DNS by the update method
the admin wired (:mod:`roles.controller._dnsupdate`), and are deleted again whatever the outcome.
A changed wiring ends a back-off at once: the admin who fixed a key wants to see it work now.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import datetime as dt
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from sqlalchemy import func, or_, select
from sqlalchemy.orm import Session

from roles.controller._acme import AcmeClient, AcmeFailure, IssuedCertificate
from roles.controller._dnsupdate import DnsUpdateFailure, DnsUpdater, TxtRecord
from shared.acme import AcmeChallenge, AcmeSettings, backoff, renewal_time
from shared.db import CustomHostname, Database, Setting, bump_generation
from shared.dns01 import RECORD_KEY, Dns01Settings, WildcardRecord, WildcardState
from shared.logs import ContextLogger
from shared.names import CertState, HostnameState

__all__ = ["CertificateManager", "ChallengeBoard"]

# Looked at this often even without a nudge (renewals fall due on their own).
_PASS_EVERY = 30.0
# Names ordered per pass: a burst of new names does not hold up the loop's other work for long.
_PER_PASS = 10
_SETTINGS = (
    "acme_directory_url",
    "acme_ca_bundle",
    "acme_email",
    "wildcard_dns01",
    "dns_update_server",
    "dns_update_zone",
    "dns_update_key_name",
    "dns_update_key_algorithm",
    "dns_update_key_secret",
    RECORD_KEY,
)


def wildcard_due_at(
    record: WildcardRecord | None, settings: Dns01Settings, domain: str, now: dt.datetime
) -> dt.datetime | None:
    """When the platform's wildcard is to be ordered next; None while it is off."""
    if not settings.enabled:
        return None
    if (
        record is None
        or record.domain != domain
        or record.state in (WildcardState.PENDING, WildcardState.ISSUING)
    ):
        return now  # never ordered for this domain, or an order a stop cut short
    if record.state == WildcardState.FAILED and record.tag != settings.tag:
        return now
    return record.due_at or now


@dataclass(frozen=True)
class _Plan:
    acme: AcmeSettings
    due: list[tuple[int, str]]
    next_due: dt.datetime | None
    dns01: Dns01Settings
    wildcard_at: dt.datetime | None


class ChallengeBoard(Protocol):
    """Where the controller puts HTTP-01 answers so every front end serves them."""

    async def publish_challenges(self, challenges: Sequence[AcmeChallenge]) -> bool: ...

    async def withdraw_challenges(self, challenges: Sequence[AcmeChallenge]) -> None: ...


class CertificateManager:
    def __init__(
        self, db: Database, state_dir: Path, board: ChallengeBoard, log: ContextLogger, *, domain: str
    ) -> None:
        self._db = db
        self._domain = domain
        self._state_dir = state_dir
        self._board = board
        self._log = log
        self._wake = asyncio.Event()
        self._client: AcmeClient | None = None

    def wake(self) -> None:
        self._wake.set()

    async def run(self, stop: asyncio.Event) -> None:
        try:
            while not stop.is_set():
                self._wake.clear()
                try:
                    wait = await self.pass_once()
                except Exception:
                    self._log.exception("certificate pass failed; retrying")
                    wait = _PASS_EVERY
                if wait <= 0:
                    continue
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), wait)
        finally:
            if self._client is not None:
                await asyncio.to_thread(self._client.close)

    async def pass_once(self) -> float:
        """Order certificates for the names that are due; seconds until the next pass is needed."""
        now = dt.datetime.now(dt.UTC)
        plan = await asyncio.to_thread(self._due, now)
        settings = plan.acme
        if not settings.enabled:
            return _PASS_EVERY
        wildcard = plan.wildcard_at is not None and plan.wildcard_at <= now
        if plan.due or wildcard:
            if self._client is None or self._client.settings != settings:
                if self._client is not None:
                    await asyncio.to_thread(self._client.close)
                self._client = AcmeClient(settings, self._state_dir)
            for row_id, hostname in plan.due[:_PER_PASS]:
                await self._issue(self._client, row_id, hostname)
            if wildcard:
                await self._issue_wildcard(self._client, plan.dns01)
            if len(plan.due) > _PER_PASS:
                return 0.0
            plan = await asyncio.to_thread(self._due, dt.datetime.now(dt.UTC))
        upcoming = [when for when in (plan.next_due, plan.wildcard_at) if when is not None]
        if not upcoming:
            return _PASS_EVERY
        # Wake when the next renewal or back-off ends, so a renewal is not late by a whole pass.
        return min(_PASS_EVERY, max(0.5, (min(upcoming) - dt.datetime.now(dt.UTC)).total_seconds()))

    def _due(self, now: dt.datetime) -> _Plan:
        with self._db.session() as s:
            values = {
                r.key: r.value.get("value")
                for r in s.scalars(select(Setting).where(Setting.key.in_(_SETTINGS)))
            }
            ours = (CustomHostname.state == HostnameState.VERIFIED) & or_(
                CustomHostname.cert_source.is_(None), CustomHostname.cert_source != "upload"
            )
            rows = s.execute(
                select(CustomHostname.id, CustomHostname.hostname)
                .where(ours)
                .where(or_(CustomHostname.acme_due_at.is_(None), CustomHostname.acme_due_at <= now))
                .order_by(CustomHostname.acme_due_at.is_not(None), CustomHostname.acme_due_at)
                .limit(_PER_PASS + 1)
            ).all()
            later = s.scalar(
                select(func.min(CustomHostname.acme_due_at))
                .where(ours)
                .where(CustomHostname.acme_due_at > now)
            )
        next_due = later if later is None or later.tzinfo else later.replace(tzinfo=dt.UTC)
        dns01 = Dns01Settings.from_settings(values)
        record = WildcardRecord.parse(values.get(RECORD_KEY))
        return _Plan(
            AcmeSettings.from_settings(values),
            [(i, h) for i, h in rows],
            next_due,
            dns01,
            wildcard_due_at(record, dns01, self._domain, now),
        )

    @staticmethod
    def _current(s: Session, row_id: int, hostname: str) -> CustomHostname | None:
        """The row if it is still this verified name with no uploaded certificate (management may have
        removed it, given it to another site, or the tenant uploaded a certificate meanwhile)."""
        row = s.get(CustomHostname, row_id)
        if (
            row is None
            or row.hostname != hostname
            or row.state != HostnameState.VERIFIED
            or row.cert_source == "upload"
        ):
            return None
        return row

    def _mark_issuing(self, row_id: int, hostname: str) -> bool:
        with self._db.session() as s:
            row = self._current(s, row_id, hostname)
            if row is None:
                return False
            row.acme_state = CertState.ISSUING
            row.acme_attempted_at = dt.datetime.now(dt.UTC)
            return True

    def _record_success(self, row_id: int, hostname: str, cert: IssuedCertificate) -> bool:
        with self._db.session() as s:
            row = self._current(s, row_id, hostname)
            if row is None:
                return False
            row.cert_pem, row.key_pem, row.cert_source = cert.cert_pem, cert.key_pem, "acme"
            row.cert_not_before, row.cert_not_after = cert.not_before, cert.not_after
            row.acme_state, row.acme_reason, row.acme_failures = CertState.VALID, None, 0
            row.acme_due_at = renewal_time(cert.not_before, cert.not_after)
            bump_generation(s)  # the new certificate goes to the front ends
            return True

    def _record_failure(
        self, row_id: int, hostname: str, reason: str, now: dt.datetime
    ) -> dt.datetime | None:
        with self._db.session() as s:
            row = self._current(s, row_id, hostname)
            if row is None:
                return None
            row.acme_failures = (row.acme_failures or 0) + 1
            row.acme_state, row.acme_reason = CertState.FAILED, reason[:1000]
            row.acme_due_at = now + backoff(row.acme_failures)
            return row.acme_due_at

    async def _issue(self, acme: AcmeClient, row_id: int, hostname: str) -> None:
        if not await asyncio.to_thread(self._mark_issuing, row_id, hostname):
            return
        log = self._log.bind(hostname=hostname)
        published: list[AcmeChallenge] = []
        try:
            pending = await asyncio.to_thread(acme.begin, hostname)
            if pending.challenges:
                published = pending.challenges
                if not await self._board.publish_challenges(published):
                    log.warning("not every front end took the ACME challenge in time; asking the CA anyway")
            issued = await asyncio.to_thread(acme.finish, pending)
        except AcmeFailure as err:
            retry = await asyncio.to_thread(
                self._record_failure, row_id, hostname, str(err), dt.datetime.now(dt.UTC)
            )
            log.warning("certificate order failed: %s; next try at %s", err, retry)
            return
        except Exception as err:  # a bug or a surprise from the library: the name fails, the loop lives
            log.exception("certificate order failed")
            await asyncio.to_thread(
                self._record_failure, row_id, hostname, f"internal error: {err}", dt.datetime.now(dt.UTC)
            )
            return
        finally:
            if published:
                await self._board.withdraw_challenges(published)
        if await asyncio.to_thread(self._record_success, row_id, hostname, issued):
            log.info("certificate issued, valid until %s", issued.not_after.isoformat())

    # -- the platform's wildcard, by DNS-01

    def _wildcard_record(self, s: Session) -> WildcardRecord:
        row = s.get(Setting, RECORD_KEY)
        record = WildcardRecord.parse(row.value.get("value")) if row is not None else None
        if record is None or record.domain != self._domain:
            return WildcardRecord(domain=self._domain)
        return record

    @staticmethod
    def _store_wildcard(s: Session, record: WildcardRecord) -> None:
        row = s.get(Setting, RECORD_KEY)
        if row is None:
            s.add(Setting(key=RECORD_KEY, value={"value": record.to_json()}))
        else:
            row.value = {"value": record.to_json()}

    def _wildcard_issuing(self, settings: Dns01Settings) -> None:
        with self._db.session() as s:
            record = self._wildcard_record(s)
            # A new wiring starts its back-off afresh: the failures so far were the old one's.
            failures = record.failures if record.tag == settings.tag else 0
            self._store_wildcard(
                s,
                dataclasses.replace(record, state=WildcardState.ISSUING, tag=settings.tag, failures=failures),
            )

    def _wildcard_success(self, cert: IssuedCertificate) -> None:
        with self._db.session() as s:
            record = dataclasses.replace(
                self._wildcard_record(s),
                state=WildcardState.VALID,
                reason=None,
                cert_pem=cert.cert_pem,
                key_pem=cert.key_pem,
                not_after=cert.not_after,
                due_at=renewal_time(cert.not_before, cert.not_after),
                failures=0,
            )
            self._store_wildcard(s, record)
            bump_generation(s)  # the new certificate goes to the front ends

    def _wildcard_failure(self, reason: str, now: dt.datetime) -> dt.datetime:
        with self._db.session() as s:
            record = self._wildcard_record(s)
            failures = record.failures + 1
            # A certificate it still holds is served on until it expires; only the order failed.
            record = dataclasses.replace(
                record,
                state=WildcardState.FAILED,
                reason=reason[:1000],
                failures=failures,
                due_at=now + backoff(failures),
            )
            self._store_wildcard(s, record)
            assert record.due_at is not None
            return record.due_at

    async def _issue_wildcard(self, acme: AcmeClient, settings: Dns01Settings) -> None:
        names = [f"*.{self._domain}", self._domain]
        log = self._log.bind(hostname=names[0])
        await asyncio.to_thread(self._wildcard_issuing, settings)
        dns = DnsUpdater(settings)
        added: list[TxtRecord] = []
        try:
            pending = await asyncio.to_thread(acme.begin_dns01, names)
            if pending.txt_records:
                try:
                    await asyncio.to_thread(dns.add, pending.txt_records)
                except DnsUpdateFailure as err:
                    if not err.answered:  # it may have been applied: delete to be sure
                        added = pending.txt_records
                    raise
                added = pending.txt_records
                await asyncio.to_thread(dns.wait_visible, added)
            issued = await asyncio.to_thread(acme.finish, pending)
        except (AcmeFailure, DnsUpdateFailure) as err:
            retry = await asyncio.to_thread(self._wildcard_failure, str(err), dt.datetime.now(dt.UTC))
            log.warning("wildcard certificate order failed: %s; next try at %s", err, retry)
            return
        except Exception as err:  # a bug or a surprise from a library: the order fails, the loop lives
            log.exception("wildcard certificate order failed")
            await asyncio.to_thread(self._wildcard_failure, f"internal error: {err}", dt.datetime.now(dt.UTC))
            return
        finally:
            if added:
                try:
                    await asyncio.to_thread(dns.remove, added)
                except DnsUpdateFailure as err:
                    log.warning("the DNS-01 records at %s were not deleted: %s", added[0].name, err)
        await asyncio.to_thread(self._wildcard_success, issued)
        log.info("wildcard certificate issued, valid until %s", issued.not_after.isoformat())
