"""Alembic environment: runs against the engine :meth:`shared.db.Database.migrate` hands it."""

from alembic import context

from shared.db.models import Base

engine = context.config.attributes["engine"]
with engine.begin() as connection:
    context.configure(connection=connection, target_metadata=Base.metadata, render_as_batch=True)
    context.run_migrations()
