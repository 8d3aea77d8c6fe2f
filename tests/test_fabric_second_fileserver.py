"""`role add` refusals made before anything is installed: a second fileserver; a worker reserved for
a subscription whose plan wants workers of another size.

The fileserver holds every site's content and several sharing it are not supported: a second one (a
remote one is chosen before this machine's) took over as the content store while empty, so a deploy
landed there as a version number the workers already held (reported "served", old content served)
and management kept reading the first one.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from sqlalchemy import select

from roles.management._fabric import _add_role
from shared.db import Database, Host, Plan, Role, Subscription, Tenant
from shared.errors import InUse, InvalidInput


def _cloud(tmp_path: Path, *, fileserver: bool) -> Database:
    db = Database.sqlite(tmp_path / "runtime.db")
    db.migrate()
    with db.session() as s:
        local = Host(name="localhost", address="localhost", fabric="local", state="ready")
        s.add(local)
        s.flush()
        s.add(Role(kind="management", host_id=local.id, control_port=9000, ports={}))
        if fileserver:
            s.add(Role(kind="fileserver", host_id=local.id, control_port=9004, ports={}))
    return db


def test_a_second_fileserver_is_refused_and_nothing_is_recorded(tmp_path: Path) -> None:
    db = _cloud(tmp_path, fileserver=True)
    with pytest.raises(InUse) as refused:
        _add_role(db, {"role": "fileserver", "host": "files2.example.net"})
    assert "localhost" in refused.value.message and "backup" in (refused.value.hint or "")
    with db.session() as s:
        assert list(s.scalars(select(Role.kind).where(Role.kind == "fileserver"))) == ["fileserver"]
        assert s.scalar(select(Host).where(Host.name == "files2.example.net")) is None


def test_the_first_fileserver_and_other_roles_are_added_as_before(tmp_path: Path) -> None:
    db = _cloud(tmp_path, fileserver=False)
    assert _add_role(db, {"role": "fileserver", "host": "files1.example.net"}) > 0
    # Adding it again after a failed install is still allowed (the same host's own row).
    with db.session() as s:
        role = s.scalar(select(Role).where(Role.kind == "fileserver"))
        assert role is not None
        role.state = "Failed"
    assert _add_role(db, {"role": "fileserver", "host": "files1.example.net"}) > 0
    assert _add_role(db, {"role": "worker", "host": "web1.example.net"}) > 0


def test_a_worker_reserved_for_a_subscription_must_be_of_its_plan_s_size(tmp_path: Path) -> None:
    # Sites of a plan reserved for large workers go only to large workers reserved for them: a small
    # one reserved for the subscription would sit there taking none, with nothing said.
    db = _cloud(tmp_path, fileserver=True)
    with db.session() as s:
        tenant = Tenant(name="woodgrove")
        plan = Plan(
            name="dedicated", max_sites=1, storage_mb=10, compute_mode="reserved", worker_size="large"
        )
        shared = Plan(name="basic", max_sites=1, storage_mb=10)
        s.add_all([tenant, plan, shared])
        s.flush()
        dedicated = Subscription(tenant_id=tenant.id, plan_id=plan.id)
        basic = Subscription(tenant_id=tenant.id, plan_id=shared.id)
        s.add_all([dedicated, basic])
        s.flush()
        ids = dedicated.id, basic.id
    with pytest.raises(InvalidInput) as refused:
        _add_role(db, {"role": "worker", "host": "web1.example.net", "reserved_for": ids[0]})
    assert "large workers" in refused.value.message and refused.value.hint == "add it with --size large"
    with db.session() as s:
        assert s.scalar(select(Host).where(Host.name == "web1.example.net")) is None
    assert (
        _add_role(db, {"role": "worker", "host": "web1.example.net", "size": "large", "reserved_for": ids[0]})
        > 0
    )
    # A shared plan's subscription takes a reserved worker of any size, as before.
    assert _add_role(db, {"role": "worker", "host": "web2.example.net", "reserved_for": ids[1]}) > 0
