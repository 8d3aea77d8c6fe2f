"""hostname verification: a verification id per subscription, a state per custom hostname

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-03 01:05:00.000000
"""

import secrets
from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0006"
down_revision: str | None = "0005"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    # Columns are only added (no table is rebuilt): on SQLite a rebuilt subscriptions table would take
    # its sites with it through ON DELETE CASCADE. verification_id stays nullable in the DB; every row has one.
    with op.batch_alter_table("subscriptions", schema=None) as batch_op:
        batch_op.add_column(sa.Column("verification_id", sa.String(length=64), nullable=True))
    subs = sa.table("subscriptions", sa.column("id", sa.Integer()), sa.column("verification_id", sa.String()))
    conn = op.get_bind()
    for (sub_id,) in conn.execute(sa.select(subs.c.id)).all():
        conn.execute(
            subs.update().where(subs.c.id == sub_id).values(verification_id=secrets.token_hex(32).upper())
        )
    # Names added before verification existed were never proven: they start pending and are checked.
    with op.batch_alter_table("custom_hostnames", schema=None) as batch_op:
        batch_op.add_column(
            sa.Column("state", sa.String(length=16), server_default="pending", nullable=False)
        )
        batch_op.add_column(sa.Column("verified_at", sa.DateTime(timezone=True), nullable=True))
        batch_op.add_column(sa.Column("checked_at", sa.DateTime(timezone=True), nullable=True))
        batch_op.add_column(sa.Column("check_result", sa.Text(), nullable=True))


def downgrade() -> None:
    # Plain DROP COLUMN (SQLite 3.35+ has it): a batch rebuild of subscriptions would cascade to its sites.
    for column in ("check_result", "checked_at", "verified_at", "state"):
        op.drop_column("custom_hostnames", column)
    op.drop_column("subscriptions", "verification_id")
