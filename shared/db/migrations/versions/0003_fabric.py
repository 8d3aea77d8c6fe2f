"""fabric: desired run state, size and reservation of roles, installed code, load figures

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-25 10:00:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0003"
down_revision: str | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("roles") as batch:
        batch.add_column(
            sa.Column("desired_state", sa.String(length=16), server_default="running", nullable=False)
        )
        batch.add_column(sa.Column("size", sa.String(length=16), nullable=True))
        batch.add_column(sa.Column("reserved_for_id", sa.Integer(), nullable=True))
        batch.add_column(sa.Column("code_hash", sa.String(length=64), server_default="", nullable=False))
        batch.add_column(sa.Column("load", sa.JSON(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("roles") as batch:
        for column in ("load", "code_hash", "reserved_for_id", "size", "desired_state"):
            batch.drop_column(column)
