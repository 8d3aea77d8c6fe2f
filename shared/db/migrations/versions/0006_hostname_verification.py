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
    with op.batch_alter_table("subscriptions", schema=None) as batch_op:
        batch_op.add_column(sa.Column("verification_id", sa.String(length=64), nullable=True))
    subs = sa.table("subscriptions", sa.column("id", sa.Integer()), sa.column("verification_id", sa.String()))
    conn = op.get_bind()
    for (sub_id,) in conn.execute(sa.select(subs.c.id)).all():
        conn.execute(
            subs.update().where(subs.c.id == sub_id).values(verification_id=secrets.token_hex(32).upper())
        )
    with op.batch_alter_table("subscriptions", schema=None) as batch_op:
        batch_op.alter_column("verification_id", existing_type=sa.String(length=64), nullable=False)
    # Names added before verification existed were never proven: they start pending and are checked.
    with op.batch_alter_table("custom_hostnames", schema=None) as batch_op:
        batch_op.add_column(
            sa.Column("state", sa.String(length=16), server_default="pending", nullable=False)
        )
        batch_op.add_column(sa.Column("verified_at", sa.DateTime(timezone=True), nullable=True))
        batch_op.add_column(sa.Column("checked_at", sa.DateTime(timezone=True), nullable=True))
        batch_op.add_column(sa.Column("check_result", sa.Text(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("custom_hostnames", schema=None) as batch_op:
        batch_op.drop_column("check_result")
        batch_op.drop_column("checked_at")
        batch_op.drop_column("verified_at")
        batch_op.drop_column("state")
    with op.batch_alter_table("subscriptions", schema=None) as batch_op:
        batch_op.drop_column("verification_id")
