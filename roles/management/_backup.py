"""The runtime DB's tenant data as a logical, version-tagged dump, and its restore into a fresh cloud.

A dump is JSON: each table that says who the tenants are and what they run (plans, tenants, users,
tokens, settings, subscriptions, sites, publishing credentials, custom hostnames with their
certificates, usage history), read in one transaction, with the alembic revision the rows were written
under. The same form serves SQLite and PostgreSQL (and a move from one to the other). What belongs to
one home is left out: its hosts and roles, site placement, portal sessions, reset links and the seeded
admin token (a restored cloud keeps its own).
"""

from __future__ import annotations

import datetime as dt
from typing import Any

from sqlalchemy import Connection, Date, DateTime, Table, delete, func, insert, select, text, update

from shared.db import Database, bump_generation
from shared.db.models import ApiToken, Base
from shared.errors import AlreadyExists, InvalidInput, NotSupported

__all__ = ["BACKUP_FORMAT", "TABLES", "alembic_revision", "dump_tables", "restore_tables"]

BACKUP_FORMAT = "sitecloud-backup/1"
# In the order rows are inserted (parents first); deleted in the reverse order.
TABLES = (
    "plans",
    "tenants",
    "users",
    "api_tokens",
    "settings",
    "subscriptions",
    "sites",
    "publishing_credentials",
    "custom_hostnames",
    "site_usage",
)
# A cloud holding any of these is not empty: a restore would mix two clouds' tenants.
_OCCUPIED = ("plans", "tenants", "users", "sites")
# Columns that only mean something in the cloud that wrote them (its config generations): not kept.
_LOCAL = {"sites": frozenset({"live_from", "restarts"})}
Json = dict[str, Any]


def _table(name: str) -> Table:
    return Base.metadata.tables[name]


def alembic_revision(conn: Connection) -> str:
    return str(conn.execute(text("SELECT version_num FROM alembic_version")).scalar_one())


def _plain(value: Any) -> Any:
    if isinstance(value, dt.datetime):
        # SQLite hands datetimes back naive; they were written in UTC.
        return (value if value.tzinfo else value.replace(tzinfo=dt.UTC)).isoformat()
    if isinstance(value, dt.date):
        return value.isoformat()
    return value


def _typed(table: Table, row: Json) -> Json:
    out: Json = {}
    for key, value in row.items():
        column = table.columns.get(key)
        if column is None:
            raise InvalidInput(
                f"the backup's table {table.name} has a column {key!r} this cloud does not know"
            )
        if value is not None and isinstance(column.type, DateTime):
            value = dt.datetime.fromisoformat(value)
        elif value is not None and isinstance(column.type, Date):
            value = dt.date.fromisoformat(value)
        out[key] = value
    return out


def _seeded_admin_token(table: Table) -> Any:
    return (table.c.tenant_id.is_(None)) & (table.c.user_id.is_(None))


def dump_tables(db: Database) -> Json:
    """Every backed-up table's rows, read in one transaction (a consistent point in time)."""
    with db.engine.connect() as conn, conn.begin():
        tables: dict[str, list[Json]] = {}
        for name in TABLES:
            table = _table(name)
            query = select(table)
            if name == ApiToken.__tablename__:
                query = query.where(~_seeded_admin_token(table))
            pk = list(table.primary_key.columns)
            rows = conn.execute(query.order_by(*pk)).mappings()
            local = _LOCAL.get(name, frozenset())
            tables[name] = [{k: _plain(v) for k, v in row.items() if k not in local} for row in rows]
        return {
            "format": BACKUP_FORMAT,
            "alembic_revision": alembic_revision(conn),
            "dialect": db.engine.dialect.name,
            "created_at": dt.datetime.now(dt.UTC).isoformat(),
            "tables": tables,
        }


def restore_tables(db: Database, revision: str, tables: dict[str, list[Json]], *, force: bool) -> Json:
    """Put a dump's rows in (all or nothing); with ``force`` the cloud's own tenant data goes first."""
    unknown = sorted(set(tables) - set(TABLES))
    if unknown:
        raise InvalidInput(
            f"the backup holds table(s) this cloud does not restore: {', '.join(unknown)}",
            hint=f"restorable tables: {', '.join(TABLES)}",
        )
    with db.engine.connect() as conn, conn.begin():
        ours = alembic_revision(conn)
        if revision != ours:
            raise NotSupported(
                f"the backup was written at schema revision {revision}; this cloud is at {ours}",
                hint="restore into a cloud of the same sitecloud version as the one backed up",
            )
        occupied = {
            name: n
            for name in _OCCUPIED
            if (n := conn.execute(select(func.count()).select_from(_table(name))).scalar_one())
        }
        if occupied and not force:
            what = ", ".join(f"{n} {name}" for name, n in occupied.items())
            raise AlreadyExists(
                f"this cloud is not empty ({what}): a restore would mix two clouds",
                hint="restore into a fresh `sitecloud up`, or pass --force to replace its tenants, plans and sites",
            )
        for name in reversed(TABLES):
            table = _table(name)
            query = delete(table)
            if name == ApiToken.__tablename__:
                query = query.where(~_seeded_admin_token(table))
            conn.execute(query)
        counts: dict[str, int] = {}
        for name in TABLES:
            table = _table(name)
            rows = [_typed(table, row) for row in tables.get(name, [])]
            # A row may point at one of its own table put back after it (a swapped site at its slot):
            # those references are set once every row is in.
            own = [c.name for c in table.columns if any(fk.column.table is table for fk in c.foreign_keys)]
            later = [(row["id"], {c: row[c] for c in own if row.get(c) is not None}) for row in rows if own]
            if rows:
                conn.execute(insert(table), [{**row, **dict.fromkeys(own)} for row in rows])
            for row_id, refs in later:
                if refs:
                    conn.execute(update(table).where(table.c.id == row_id).values(refs))
            counts[name] = len(rows)
        if conn.dialect.name == "postgresql":
            # Rows came with their ids: move each id sequence past them (table names are ours, above).
            for name in TABLES:
                if "id" in _table(name).columns:
                    top = conn.execute(select(func.max(_table(name).c.id))).scalar_one() or 0
                    conn.execute(
                        text("SELECT setval(pg_get_serial_sequence(:t, 'id'), :n, false)"),
                        {"t": name, "n": top + 1},
                    )
    with db.session() as s:
        bump_generation(s)
    return counts
