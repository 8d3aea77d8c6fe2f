"""From the runtime DB to one versioned config snapshot per role.

Reading the DB (:func:`read_desired`) and building snapshots (:func:`snapshots_for`) are separate so
that the snapshot rules are pure functions of the desired state. Placement is the same:
:func:`plan_placement` decides, :func:`place_sites` applies it to the DB.

Roles are addressed by their host's NAME (resolvable by every host of the cloud), never by an address
that only one machine understands. Roles on the ``local`` fabric listen on this machine's loopback, so
roles on other hosts are never pointed at them, unless the cloud was started with ``up --advertise``:
then they listen on every address and other hosts reach them at the advertised one.
"""

from __future__ import annotations

import datetime as dt
import hashlib
from collections.abc import Collection, Iterable
from collections.abc import Set as AbstractSet
from dataclasses import dataclass, field
from typing import Any, TypeVar

from sqlalchemy import select
from sqlalchemy.orm import Session, selectinload

from shared.acme import AcmeChallenge, AcmeSettings
from shared.appsettings import APP_DISK_MIN_MB, app_fields, frontend_fields
from shared.contracts.snapshots import (
    BareSnapshot,
    FileserverSnapshot,
    FrontendSnapshot,
    ManagementSnapshot,
    PublisherSnapshot,
    Refused,
    Snapshot,
    WorkerSnapshot,
)
from shared.db import (
    DEFAULT_WORKER_SIZE,
    Host,
    Plan,
    Role,
    Setting,
    Site,
    SiteAssignment,
    Subscription,
    bump_generation,
    current_generation,
)
from shared.dns01 import RECORD_KEY, PlatformCertificate, WildcardRecord
from shared.errors import InvalidInput
from shared.names import HostnameState
from shared.quota import QuotaStop
from shared.states import SiteState

__all__ = [
    "REPLICAS",
    "DesiredSite",
    "DesiredState",
    "RoleEndpoint",
    "WorkerSlot",
    "place_sites",
    "plan_placement",
    "read_desired",
    "snapshots_for",
    "unreachable_needs",
    "worker_pool",
]

S = TypeVar("S", bound=Snapshot)

# Each site runs on this many workers of its pool (fewer when the pool is smaller): a worker that dies
# or is upgraded leaves another one already serving the site, so front ends only route around it.
REPLICAS = 2


@dataclass(frozen=True)
class RoleEndpoint:
    id: int
    kind: str
    host: str
    control_port: int
    ports: dict[str, Any]
    fabric: str = "local"
    desired_state: str = "running"
    reserved_for: int | None = None
    # For a local role: where roles on other hosts reach it (``up --advertise``); empty: nowhere.
    advertised: str = ""

    @property
    def control_url(self) -> str:
        return f"https://{self.host}:{self.control_port}"

    @property
    def is_local(self) -> bool:
        return self.fabric == "local"

    def reaches(self, other: RoleEndpoint) -> bool:
        """Whether this role can call ``other``: a local role that is not advertised listens on this
        machine's loopback only."""
        return self.is_local or not other.is_local or bool(other.advertised)

    def host_of(self, other: RoleEndpoint) -> str:
        """The name (or address) this role calls ``other`` by."""
        if other.is_local and not self.is_local and other.advertised:
            return other.advertised
        return other.host

    def control_url_of(self, other: RoleEndpoint) -> str:
        host = self.host_of(other)
        return f"https://{f'[{host}]' if ':' in host else host}:{other.control_port}"


@dataclass(frozen=True)
class DesiredSite:
    name: str
    uid: str
    quota_bytes: int
    users: dict[str, str]
    worker_ids: tuple[int, ...]
    subscription_id: int = 0
    # Workers that take its requests at once (the others of ``worker_ids`` stand by).
    instances: int = 1
    # When it was placed on each of its workers (seconds since the epoch; absent: all at once).
    placed: dict[int, float] = field(default_factory=dict)
    # The plan's content retention, for the fileserver.
    retention: dict[str, int] = field(default_factory=dict)
    # Worker snapshot app fields (runtime, entry, env, ...), from the site's app settings.
    app: dict[str, Any] = field(default_factory=dict)
    # Front end snapshot custom hostnames: a name, or {name, cert, key} served by SNI.
    hostnames: tuple[str | dict[str, str], ...] = ()
    # Front end snapshot switches that are on (https_only, affinity).
    routing: dict[str, Any] = field(default_factory=dict)
    # After slot swaps: the site whose workers answer this site's host names ("": its own).
    routed_to: str = ""
    # Only a running site of an active subscription is served; every site keeps its content.
    state: SiteState = SiteState.RUNNING


@dataclass
class DesiredState:
    generation: int
    domain: str
    roles: list[RoleEndpoint] = field(default_factory=list)
    # Every site there is, served or not: a site missing here loses its content on the fileserver.
    sites: list[DesiredSite] = field(default_factory=list)
    # Roles to route around: down, stopped or draining (the controller fills this from health).
    down: frozenset[int] = frozenset()
    # Sites over a daily plan quota: front ends answer them with the quota page (shared.quota).
    quota_stops: dict[str, QuotaStop] = field(default_factory=dict)
    # HTTP-01 answers of the ACME orders in flight (the controller fills this in), for every front end.
    acme_challenges: tuple[AcmeChallenge, ...] = ()
    # The platform's wildcard from ACME, served for <site>.<domain> instead of the cloud CA's one.
    wildcard: PlatformCertificate | None = None
    # Where people reach this machine's roles (FTP, web deploy): its advertised address, else the
    # address `up` binds to.
    public_host: str = "127.0.0.1"

    def of_kind(self, kind: str) -> list[RoleEndpoint]:
        return [r for r in self.roles if r.kind == kind]

    @property
    def serving(self) -> list[DesiredSite]:
        """The sites workers run and front ends route: running, of an active subscription."""
        return [s for s in self.sites if s.state.serving]


@dataclass(frozen=True)
class WorkerSlot:
    id: int
    reserved_for: int | None = None
    size: str = DEFAULT_WORKER_SIZE


def worker_pool(workers: Collection[WorkerSlot], subscription: int, reserved_size: str | None) -> list[int]:
    """The workers a subscription's sites run on. A reserved plan's (``reserved_size``): the workers
    reserved for the subscription of that size. Otherwise, or while there are none: the workers
    reserved for it of any size if a shared plan's, else the shared workers (reserved for nobody)."""
    mine = [w for w in workers if w.reserved_for == subscription]
    if reserved_size is not None:
        mine = [w for w in mine if w.size == reserved_size]
    return [w.id for w in mine] or [w.id for w in workers if w.reserved_for is None]


def plan_placement(
    sites: Iterable[tuple[int, int] | tuple[int, int, int | None] | tuple[int, int, int | None, str | None]],
    workers: Collection[WorkerSlot],
    assignments: dict[int, set[int]],
    down: Collection[int] = (),
    *,
    replicas: int = REPLICAS,
) -> tuple[list[tuple[int, int]], list[tuple[int, int]]]:
    """Which (site, worker) assignments to add and to remove.

    ``sites`` are (site id, subscription id[, instances[, reserved size]]); the reserved size is the
    plan's worker size when its compute mode is reserved. A site's pool is :func:`worker_pool`. Each
    site gets ``replicas`` healthy workers of its pool (the least loaded first). An assignment on a
    down worker is kept, so the worker rejoins with its sites; one outside the pool, or one too many on
    healthy workers, is dropped once the site has enough healthy workers in its pool.
    """
    load = {w.id: 0 for w in workers}
    for held in assignments.values():
        for wid in held:
            if wid in load:
                load[wid] += 1
    adds: list[tuple[int, int]] = []
    removes: list[tuple[int, int]] = []
    for site_id, sub_id, *more in sites:
        instances = more[0] if more else None
        reserved_size = more[1] if len(more) > 1 else None
        assert (instances is None or isinstance(instances, int)) and not isinstance(reserved_size, int)
        pool = worker_pool(workers, sub_id, reserved_size)
        current = set(assignments.get(site_id, set()))
        want = min(max(replicas, instances or 0), len(pool))
        healthy = [w for w in current if w in pool and w not in down]
        candidates = sorted(
            (w for w in pool if w not in current and w not in down), key=lambda w: (load[w], w)
        )
        for wid in candidates[: max(0, want - len(healthy))]:
            adds.append((site_id, wid))
            current.add(wid)
            healthy.append(wid)
            load[wid] += 1
        if len(healthy) >= want:
            extra = sorted(healthy, key=lambda w: (load[w], w))[want:]
            stale = [w for w in current if w not in pool]
            for wid in [*extra, *stale]:
                removes.append((site_id, wid))
                if wid in load:
                    load[wid] -= 1
    return adds, removes


def place_sites(session: Session, down: Collection[int] = (), *, absent: Collection[int] = ()) -> int:
    """Apply :func:`plan_placement` to every live site; returns how many assignments changed.
    ``absent`` workers do not answer: one that never has (no heartbeat ever recorded: a host that does
    not resolve, an install that failed) keeps no sites, unlike one that is down for a while."""
    workers = [
        WorkerSlot(r.id, r.reserved_for_id, r.size or DEFAULT_WORKER_SIZE)
        for r in session.scalars(select(Role).where(Role.kind == "worker").order_by(Role.id))
        if r.id not in absent or r.last_heartbeat is not None
    ]
    if not workers:
        return 0
    live = session.execute(
        select(Site.id, Site.subscription_id, Site.instances, Plan.compute_mode, Plan.worker_size)
        .join(Subscription, Site.subscription_id == Subscription.id)
        .join(Plan, Subscription.plan_id == Plan.id)
        .where(Site.state == "running")
        .order_by(Site.id)
    ).all()
    assignments: dict[int, set[int]] = {}
    for site_id, role_id in session.execute(select(SiteAssignment.site_id, SiteAssignment.role_id)):
        assignments.setdefault(site_id, set()).add(role_id)
    wanted = [
        (s, sub, n, (size or DEFAULT_WORKER_SIZE) if mode == "reserved" else None)
        for s, sub, n, mode, size in live
    ]
    adds, removes = plan_placement(wanted, workers, assignments, down)
    for site_id, role_id in adds:
        session.add(SiteAssignment(site_id=site_id, role_id=role_id))
    for site_id, role_id in removes:
        row = session.get(SiteAssignment, (site_id, role_id))
        if row is not None:
            session.delete(row)
    if adds or removes:
        bump_generation(session)
    return len(adds) + len(removes)


def read_desired(
    session: Session, domain: str, *, advertise: str = "", public_host: str = "127.0.0.1"
) -> DesiredState:
    """The desired state in the DB; ``advertise`` is where other hosts reach the local roles,
    ``public_host`` where people reach them."""
    state = DesiredState(generation=current_generation(session), domain=domain, public_host=public_host)
    state.wildcard = _wildcard(session, domain)
    for role, host in session.execute(
        select(Role, Host).join(Host, Role.host_id == Host.id).order_by(Role.id)
    ):
        state.roles.append(
            RoleEndpoint(
                role.id,
                role.kind,
                host.name,
                role.control_port,
                dict(role.ports),
                fabric=host.fabric,
                desired_state=role.desired_state,
                reserved_for=role.reserved_for_id,
                advertised=advertise if host.fabric == "local" else "",
            )
        )
    sites = session.scalars(
        select(Site)
        .join(Subscription)
        .options(
            selectinload(Site.credentials),
            selectinload(Site.assignments),
            selectinload(Site.subscription).selectinload(Subscription.plan),
            selectinload(Site.hostnames),
        )
        .order_by(Site.name)
    ).all()
    names = {site.id: site.name for site in sites}
    for site in sites:
        plan: Plan = site.subscription.plan
        state.sites.append(
            DesiredSite(
                name=site.name,
                uid=site.uid,
                quota_bytes=plan.storage_mb * 1024 * 1024,
                users={c.username: c.password_hash for c in site.credentials},
                worker_ids=tuple(sorted(a.role_id for a in site.assignments)),
                subscription_id=site.subscription_id,
                instances=max(1, site.instances or 1),
                placed={a.role_id: _seconds(a.since) for a in site.assignments},
                retention={"keep_versions": plan.keep_versions, "keep_days": plan.keep_days},
                app={
                    **app_fields(dict(site.app_settings or {}), always_on_allowed=plan.always_on),
                    **({"restarts": site.restarts} if site.restarts else {}),
                    # The app's writable home is held to the plan's storage, as its content is.
                    "limits": {"disk_mb": max(plan.storage_mb, APP_DISK_MIN_MB)},
                },
                routing=frontend_fields(dict(site.app_settings or {})),
                routed_to=names.get(site.routed_to_id or 0, ""),
                state=SiteState.of(site.state, site.subscription.state),
                hostnames=tuple(
                    {"name": h.hostname, "cert": h.cert_pem, "key": h.key_pem}
                    if h.cert_pem and h.key_pem
                    else h.hostname
                    for h in sorted(site.hostnames, key=lambda h: h.hostname)
                    # A claim DNS has not proven is never routed: it could be another tenant's name.
                    if h.state == HostnameState.VERIFIED
                ),
            )
        )
    return state


def _wildcard(session: Session, domain: str) -> PlatformCertificate | None:
    """The ACME wildcard while it is turned on and one was issued for this domain."""
    keys = ("wildcard_dns01", "acme_directory_url", RECORD_KEY)
    values = {
        r.key: r.value.get("value") for r in session.scalars(select(Setting).where(Setting.key.in_(keys)))
    }
    # Only the switch matters here: a wiring broken later leaves the certificate it got in service.
    if values.get("wildcard_dns01") is not True or not AcmeSettings.from_settings(values).enabled:
        return None
    record = WildcardRecord.parse(values.get(RECORD_KEY))
    return record.certificate(domain) if record is not None else None


# The roles each kind calls: a role placed where it reaches none of them cannot do its job.
_NEEDS = {"worker": "fileserver", "publisher": "fileserver", "frontend": "worker"}


def unreachable_needs(kind: str, remote: bool, others: Iterable[tuple[str, bool]], advertised: bool) -> str:
    """The kind of role a new ``kind`` role would need and not reach, or "".

    ``others`` are the cloud's running roles as (kind, is local). A role on another host reaches a
    role on this machine only when the cloud advertises an address (``up --advertise``).
    """
    needed = _NEEDS.get(kind)
    if not remote or advertised or needed is None:
        return ""
    placed = [local for other, local in others if other == needed]
    return needed if placed and all(placed) else ""


def _fileserver(state: DesiredState) -> RoleEndpoint | None:
    """The cloud's content store: one every role can reach (a remote one before a local one)."""
    candidates = [r for r in state.of_kind("fileserver") if r.desired_state == "running"]
    candidates.sort(key=lambda r: (r.is_local, r.id in state.down, r.id))
    return candidates[0] if candidates else None


def _publisher(state: DesiredState) -> RoleEndpoint | None:
    """The publisher tenants are sent to: a running one (one on a host of its own before this
    machine's, as for the file server)."""
    candidates = [
        r
        for r in state.of_kind("publisher")
        # One being added has no public ports yet: it serves nobody.
        if r.desired_state == "running" and {"ftp", "deploy"} <= set(r.ports)
    ]
    candidates.sort(key=lambda r: (r.is_local, r.id in state.down, r.id))
    return candidates[0] if candidates else None


def _publisher_address(state: DesiredState, management: RoleEndpoint) -> dict[str, Any] | None:
    """Where ``management`` forwards web deploys, and the host and ports it gives tenants: those of
    the host the publisher runs on, wherever that is."""
    publisher = _publisher(state)
    if publisher is None or not management.reaches(publisher):
        return None
    public = (publisher.advertised or state.public_host) if publisher.is_local else publisher.host
    return {
        "control_url": management.control_url_of(publisher),
        "public_host": public,
        "ftp_port": publisher.ports["ftp"],
        "deploy_port": publisher.ports["deploy"],
    }


def _in_turn(site: DesiredSite) -> list[int]:
    """The site's workers in the order front ends turn to them: the first ``instances`` take its
    requests, the next one takes over when one of those cannot. The workers it was placed on first
    come first, so a worker added later (a second host for a cloud that had one) stands by rather than
    take a site whose app's data is on the other; among those placed at once, the order is the site's
    own (highest random weight: a hash of the site and the worker), the same on every front end,
    which spreads the sites of two workers between them rather than all first on the older."""

    def weight(worker: int) -> bytes:
        return hashlib.sha256(f"{site.uid}/{worker}".encode()).digest()

    by_weight = sorted(site.worker_ids, key=weight, reverse=True)
    # Placed within a second of each other: at once (one placement's rows).
    return sorted(by_weight, key=lambda w: int(site.placed.get(w, 0.0)))


def _seconds(when: dt.datetime | None) -> float:
    if when is None:
        return 0.0
    return (when if when.tzinfo else when.replace(tzinfo=dt.UTC)).timestamp()


def _active(site: DesiredSite) -> dict[str, int]:
    """The front end entry's ``active``, where the site has more workers than instances."""
    return {"active": site.instances} if len(site.worker_ids) > site.instances else {}


def _routable(
    frontend: RoleEndpoint, workers: dict[int, RoleEndpoint], ids: Iterable[int], down: AbstractSet[int]
) -> list[RoleEndpoint]:
    """The workers a front end sends a site to: those not down; when every one is down, all of them.

    A health probe that times out on a busy host marks a worker down; if the controller then dies, the
    front end keeps that snapshot. An empty list would be an outage until the controller returns,
    while a worker that is really gone only costs a quick 502, as nginx retries all-failed upstreams.
    """
    reachable = [workers[w] for w in ids if w in workers and frontend.reaches(workers[w])]
    up = [w for w in reachable if w.id not in down]
    return up or reachable


def _site_url(state: DesiredState) -> str:
    """``https://{site}.<domain>[:port]/``, with the HTTPS port of the first front end."""
    ports = [r.ports.get("https") for r in state.of_kind("frontend")]
    port = next((p for p in ports if p), 443)
    return f"https://{{site}}.{state.domain}{'' if port == 443 else f':{port}'}/"


def _quota_entry(stop: QuotaStop | None) -> dict[str, Any]:
    """The front end snapshot's stop of a site: what ran out and until when (no running figures, so a
    generation's snapshot stays the same however often it is built)."""
    if stop is None:
        return {}
    until = stop.until.isoformat().replace("+00:00", "Z")
    return {"quota_stop": {"what": stop.what, "limit": stop.limit, "unit": stop.unit, "until": until}}


def _publisher_entry(
    site: DesiredSite, addresses: list[DesiredSite], workers: list[str], unreached: int = 0
) -> dict[str, Any]:
    """A site's content as the publisher sees it: publishing credentials go with the address, as
    Azure's slot credentials do, so after a swap a slot's users write to what now answers the slot.
    ``workers``: control URLs of the workers holding it, whose logs a deploy follows for its build;
    ``unreached``: how many more hold it that the publisher cannot reach."""
    entry: dict[str, Any] = {"uid": site.uid, "quota_bytes": site.quota_bytes, "workers": workers}
    if unreached:
        entry["unreached_workers"] = unreached
    entry["users"] = {user: hashed for a in addresses for user, hashed in a.users.items()}
    if [a.name for a in addresses] != [site.name]:
        entry["addresses"] = [a.name for a in addresses]
    if not site.state.serving:
        entry["state"] = site.state
    if site.subscription_id:
        entry["subscription"] = site.subscription_id
    return entry


def _whole(kind: type[S], raw: dict[str, Any]) -> S | Refused:
    """A snapshot its role takes whole; one it would refuse goes as it is, for the role to say why."""
    try:
        return kind.parse(raw, what=f"{kind.kind} snapshot")
    except InvalidInput as exc:
        return Refused(str(exc), raw)


def snapshots_for(state: DesiredState, only: Collection[int] | None = None) -> dict[int, Snapshot | Refused]:
    """Role id → the snapshot that role should run with at ``state.generation`` (for the roles in
    ``only``, when given: the ones a push is due to).

    Each is checked as its role will check it, all sites of it in one go. A site entry a worker or a
    front end could not use (a value stored past management's checks) is sent as it is, as
    :class:`Refused`: that role fails the one site and says why; a file server or publisher snapshot
    with such an entry goes whole as :class:`Refused`, and that role refuses it, saying why."""
    version = state.generation
    fileserver = _fileserver(state)
    workers = {r.id: r for r in state.of_kind("worker")}
    serving = state.serving
    by_name = {s.name: s for s in serving}
    # Host names → the site that answers them: one generation flips every front end's routes of a swap.
    # A target that is not served leaves the address to its own site rather than to nothing.
    answers = {s.name: by_name.get(s.routed_to, s) for s in serving}
    # The other way round: the addresses each site's content answers (swapped slots trade theirs); a
    # site that is not served answers none, and is published to under its own name.
    addresses: dict[str, list[DesiredSite]] = {s.name: [s] for s in state.sites if not s.state.serving}
    for s in serving:
        addresses.setdefault(answers[s.name].name, []).append(s)
    suspended = {s.name: s for s in state.sites if s.state is SiteState.SUSPENDED}
    # The workers that serve each site (none for a site that is not served).
    holders = {s.name: [w for w in s.worker_ids if s.state.serving and w in workers] for s in state.sites}
    # Sites that exist and serve nothing: front ends tell their visitors so (left out when there are
    # none, as they always were).
    offline: dict[str, Any] = {}
    if len(serving) < len(state.sites):
        offline["offline"] = {
            s.name: {"state": s.state, **({"hostnames": list(s.hostnames)} if s.hostnames else {})}
            for s in state.sites
            if not s.state.serving
        }
    # Left out when there are none, as they always were.
    acme: dict[str, Any] = {}
    if state.acme_challenges:
        acme["acme_challenges"] = state.acme_challenges
    if state.wildcard is not None:
        acme["wildcard"] = state.wildcard
    shared: dict[str, Snapshot | Refused] = {}  # what every role of a kind gets alike, built once
    out: dict[int, Snapshot | Refused] = {}
    for role in state.roles:
        if only is not None and role.id not in only:
            continue
        fileserver_url = role.control_url_of(fileserver) if fileserver and role.reaches(fileserver) else ""
        if role.kind == "frontend":
            out[role.id] = FrontendSnapshot.parse(
                {
                    "version": version,
                    "domain": state.domain,
                    "sites": {
                        s.name: {
                            "workers": [
                                f"{role.host_of(w)}:{w.ports['data']}"
                                for w in _routable(role, workers, _in_turn(answers[s.name]), state.down)
                            ],
                            **_active(answers[s.name]),
                            **({"serve_as": answers[s.name].name} if answers[s.name] is not s else {}),
                            **({"hostnames": list(s.hostnames)} if s.hostnames else {}),
                            **s.routing,
                            **_quota_entry(state.quota_stops.get(answers[s.name].name)),
                        }
                        for s in serving
                    },
                    **offline,
                    **acme,
                },
                what="frontend snapshot",
            )
        elif role.kind == "worker":
            out[role.id] = WorkerSnapshot.parse(
                {
                    "version": version,
                    "fileserver": fileserver_url,
                    "sites": {
                        s.name: {
                            "uid": s.uid,
                            **({"subscription": s.subscription_id} if s.subscription_id else {}),
                            **s.app,
                        }
                        for s in serving
                        if role.id in s.worker_ids
                    },
                    # Its sites that exist but do not serve now: their apps' homes stay.
                    "kept": sorted(
                        s.uid for s in state.sites if not s.state.serving and role.id in s.worker_ids
                    ),
                },
                what="worker snapshot",
            )
        elif role.kind == "fileserver":
            if "fileserver" not in shared:
                shared["fileserver"] = _whole(
                    FileserverSnapshot,
                    {
                        "version": version,
                        # Every site, served or not: content the snapshot leaves out goes to the trash.
                        "sites": {
                            s.name: {"uid": s.uid, "quota_bytes": s.quota_bytes, **s.retention}
                            for s in state.sites
                        },
                    },
                )
            out[role.id] = shared["fileserver"]
        elif role.kind == "publisher":
            out[role.id] = _whole(
                PublisherSnapshot,
                {
                    "version": version,
                    "fileserver": fileserver_url,
                    # How a site's address reads, for the publisher to tell a pusher where it went live.
                    "site_url": _site_url(state),
                    # A stopped site is published to; what is published serves once it is started.
                    "sites": {
                        s.name: _publisher_entry(
                            s,
                            addresses.get(s.name, []),
                            [
                                role.control_url_of(workers[w])
                                for w in holders[s.name]
                                if role.reaches(workers[w])
                            ],
                            sum(not role.reaches(workers[w]) for w in holders[s.name]),
                        )
                        for s in state.sites
                        if s.name not in suspended
                    },
                    # Left out when there are none, as it always was.
                    **(
                        {"suspended": {n: _publisher_entry(s, [s], []) for n, s in suspended.items()}}
                        if suspended
                        else {}
                    ),
                },
            )
        elif role.kind == "management":
            out[role.id] = _whole(
                ManagementSnapshot, {"version": version, "publisher": _publisher_address(state, role)}
            )
        else:
            out[role.id] = BareSnapshot(version=version)
    return out
