"""Engine, sessions and migrations of the runtime DB."""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TypeVar

from sqlalchemy import Engine, create_engine, event, make_url, select
from sqlalchemy.exc import ArgumentError, IntegrityError, OperationalError
from sqlalchemy.orm import Session, sessionmaker

from shared.db.models import CloudState, SiteUsage
from shared.errors import InvalidInput, Unavailable

__all__ = ["Database", "again_on_conflict", "bump_generation", "current_generation", "usage_day"]

T = TypeVar("T")

_MIGRATIONS = Path(__file__).with_name("migrations")
_URL_HINT = "e.g. --db postgresql://user:password@host/sitecloud, or no --db for SQLite in the home"


def _sqlite_pragmas(dbapi_conn, _record) -> None:  # type: ignore[no-untyped-def]
    cur = dbapi_conn.cursor()
    # WAL: controller and management read while the other writes; foreign keys for cascades.
    cur.execute("PRAGMA journal_mode=WAL")
    cur.execute("PRAGMA foreign_keys=ON")
    cur.execute("PRAGMA busy_timeout=10000")
    cur.close()


class Database:
    """One runtime DB: a SQLite file by default, PostgreSQL (``postgresql://``) for a multi-host cloud."""

    def __init__(self, url: str) -> None:
        if url.startswith("postgresql://"):
            url = "postgresql+psycopg://" + url.removeprefix("postgresql://")
        self.url = url
        try:
            backend = make_url(url).get_backend_name()
        except ArgumentError:
            raise InvalidInput("the runtime DB's address is not a database URL", hint=_URL_HINT) from None
        if backend not in ("postgresql", "sqlite"):
            raise InvalidInput(f"the runtime DB cannot be {backend}: PostgreSQL or SQLite", hint=_URL_HINT)
        try:
            self.engine: Engine = create_engine(url, pool_pre_ping=True)
        except ModuleNotFoundError as exc:
            raise InvalidInput(
                f"the runtime DB's driver ({exc.name}) is not installed",
                hint="install sitecloud with its postgres extra (`make up` does)",
            ) from None
        if self.engine.dialect.name == "sqlite":
            event.listen(self.engine, "connect", _sqlite_pragmas)
        self._sessions = sessionmaker(self.engine, expire_on_commit=False)

    @classmethod
    def sqlite(cls, path: Path) -> Database:
        return cls(f"sqlite:///{path}")

    def migrate(self) -> None:
        """Bring the schema to the newest migration (idempotent)."""
        # Imported here: only the controller migrates, and alembic is a sixth of a role's start.
        from alembic import command
        from alembic.config import Config as AlembicConfig

        cfg = AlembicConfig()
        cfg.set_main_option("script_location", str(_MIGRATIONS))
        cfg.attributes["engine"] = self.engine
        try:
            command.upgrade(cfg, "head")
        except OperationalError as exc:
            # The first connection: a server down, a wrong password or database name. Said without
            # the URL's password.
            said = str(exc.orig).strip().splitlines()[0] if exc.orig is not None else str(exc)
            where = make_url(self.url).render_as_string(hide_password=True).replace("+psycopg", "", 1)
            raise Unavailable(
                f"cannot use the runtime DB {where}: {said}",
                hint="check its host, port, user, password and database, and that its server runs",
            ) from None

    @contextmanager
    def session(self) -> Iterator[Session]:
        """A unit of work: committed when the block ends, rolled back if it raises."""
        with self._sessions() as session, session.begin():
            yield session

    def dispose(self) -> None:
        self.engine.dispose()

    def local_file(self) -> Path | None:
        """The SQLite file a local DB keeps its data in (None for a database server)."""
        name = self.engine.url.database
        if self.engine.dialect.name != "sqlite" or not name or name == ":memory:":
            return None
        return Path(name)


def current_generation(session: Session) -> int:
    row = session.get(CloudState, "generation")
    return row.value if row else 0


def bump_generation(session: Session) -> int:
    """Mark desired state changed: the controller pushes snapshots of the new generation."""
    row = session.execute(
        select(CloudState).where(CloudState.key == "generation").with_for_update()
    ).scalar_one_or_none()
    if row is None:
        row = CloudState(key="generation", value=0)
        session.add(row)
    row.value += 1
    session.flush()
    return row.value


def usage_day(session: Session, site: str, day: dt.date) -> SiteUsage:
    """The site's usage row of ``day``, added if there is none yet (see :func:`again_on_conflict`)."""
    row = session.get(SiteUsage, (site, day))
    if row is None:
        row = SiteUsage(
            site=site, day=day, requests=0, bytes_in=0, bytes_out=0, cpu_seconds=0.0, memory_mb_seconds=0.0
        )
        session.add(row)
    return row


def again_on_conflict(work: Callable[[], T], attempts: int = 3) -> T:
    """Run ``work`` (one whole transaction) again when it lost a race to add a row with the same key.

    Two processes add to a site's usage day, the controller its usage reports and management its
    storage, each under a lock of its own: when the other added the row first, the insert fails on
    the key, the transaction is rolled back whole, and the next try finds the row."""
    for attempt in range(attempts):
        try:
            return work()
        except IntegrityError:
            if attempt == attempts - 1:
                raise
    raise AssertionError("unreachable")
