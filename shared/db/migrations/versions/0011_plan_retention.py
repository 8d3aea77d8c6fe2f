"""plan retention: how many content versions, and how many days of them, a plan's sites keep

Revision ID: 0011
Revises: 0010
Create Date: 2026-12-03 10:40:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0011"
down_revision: str | None = "0010"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("plans", schema=None) as batch_op:
        batch_op.add_column(sa.Column("keep_versions", sa.Integer(), server_default="20", nullable=False))
        batch_op.add_column(sa.Column("keep_days", sa.Integer(), server_default="0", nullable=False))


def downgrade() -> None:
    with op.batch_alter_table("plans", schema=None) as batch_op:
        batch_op.drop_column("keep_days")
        batch_op.drop_column("keep_versions")
