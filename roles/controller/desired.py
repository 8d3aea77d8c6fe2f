"""From the runtime DB to one versioned config snapshot per role.

Reading the DB (:func:`read_desired`) and building snapshots (:func:`snapshots_for`) are separate so
that the snapshot rules are pure functions of the desired state.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.orm import Session, selectinload

from shared.db import (
    Host,
    Plan,
    Role,
    Site,
    SiteAssignment,
    Subscription,
    bump_generation,
    current_generation,
)

__all__ = ["DesiredSite", "DesiredState", "RoleEndpoint", "place_sites", "read_desired", "snapshots_for"]


@dataclass(frozen=True)
class RoleEndpoint:
    id: int
    kind: str
    host: str
    control_port: int
    ports: dict[str, Any]

    @property
    def control_url(self) -> str:
        return f"https://{self.host}:{self.control_port}"


@dataclass(frozen=True)
class DesiredSite:
    name: str
    uid: str
    quota_bytes: int
    users: dict[str, str]
    worker_ids: tuple[int, ...]


@dataclass
class DesiredState:
    generation: int
    domain: str
    roles: list[RoleEndpoint] = field(default_factory=list)
    sites: list[DesiredSite] = field(default_factory=list)

    def of_kind(self, kind: str) -> list[RoleEndpoint]:
        return [r for r in self.roles if r.kind == kind]


def place_sites(session: Session) -> int:
    """Assign every unplaced live site to the worker holding the fewest sites; returns how many moved."""
    workers = session.scalars(select(Role).where(Role.kind == "worker")).all()
    if not workers:
        return 0
    load: dict[int, int] = {
        role_id: count
        for role_id, count in session.execute(
            select(SiteAssignment.role_id, func.count()).group_by(SiteAssignment.role_id)
        )
    }
    counts = {w.id: load.get(w.id, 0) for w in workers}
    unplaced = session.scalars(select(Site).where(~Site.assignments.any()).order_by(Site.id)).all()
    for site in unplaced:
        role_id = min(counts, key=lambda rid: (counts[rid], rid))
        session.add(SiteAssignment(site_id=site.id, role_id=role_id))
        counts[role_id] += 1
    if unplaced:
        bump_generation(session)
    return len(unplaced)


def read_desired(session: Session, domain: str) -> DesiredState:
    state = DesiredState(generation=current_generation(session), domain=domain)
    for role, host in session.execute(
        select(Role, Host).join(Host, Role.host_id == Host.id).order_by(Role.id)
    ):
        state.roles.append(
            RoleEndpoint(role.id, role.kind, host.address or host.name, role.control_port, dict(role.ports))
        )
    sites = session.scalars(
        select(Site)
        .join(Subscription)
        .where(Site.state == "running", Subscription.state == "active")
        .options(
            selectinload(Site.credentials),
            selectinload(Site.assignments),
            selectinload(Site.subscription).selectinload(Subscription.plan),
        )
        .order_by(Site.name)
    ).all()
    for site in sites:
        plan: Plan = site.subscription.plan
        state.sites.append(
            DesiredSite(
                name=site.name,
                uid=site.uid,
                quota_bytes=plan.storage_mb * 1024 * 1024,
                users={c.username: c.password_hash for c in site.credentials},
                worker_ids=tuple(sorted(a.role_id for a in site.assignments)),
            )
        )
    return state


def snapshots_for(state: DesiredState) -> dict[int, dict[str, Any]]:
    """Role id → the snapshot that role should run with at ``state.generation``."""
    version = state.generation
    fileservers = state.of_kind("fileserver")
    fileserver_url = fileservers[0].control_url if fileservers else ""
    workers = {r.id: r for r in state.of_kind("worker")}
    out: dict[int, dict[str, Any]] = {}
    for role in state.roles:
        body: dict[str, Any]
        if role.kind == "frontend":
            body = {
                "domain": state.domain,
                "sites": {
                    s.name: {
                        "workers": [
                            f"{workers[w].host}:{workers[w].ports['data']}"
                            for w in s.worker_ids
                            if w in workers
                        ]
                    }
                    for s in state.sites
                },
            }
        elif role.kind == "worker":
            body = {
                "fileserver": fileserver_url,
                "sites": {s.name: {"uid": s.uid} for s in state.sites if role.id in s.worker_ids},
            }
        elif role.kind == "fileserver":
            body = {"sites": {s.name: {"uid": s.uid, "quota_bytes": s.quota_bytes} for s in state.sites}}
        elif role.kind == "publisher":
            body = {
                "fileserver": fileserver_url,
                "sites": {
                    s.name: {"uid": s.uid, "quota_bytes": s.quota_bytes, "users": s.users}
                    for s in state.sites
                },
            }
        else:
            body = {}
        out[role.id] = {"version": version, **body}
    return out
