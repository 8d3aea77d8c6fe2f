"""usage per site and day from the workers too (CPU seconds, memory-seconds) and storage; a day an
admin lifted a site's quota stop

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-10 10:00:00.000000
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0007"
down_revision: str | None = "0006"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("site_usage", schema=None) as batch_op:
        batch_op.add_column(sa.Column("cpu_seconds", sa.Float(), server_default="0", nullable=False))
        batch_op.add_column(sa.Column("memory_mb_seconds", sa.Float(), server_default="0", nullable=False))
        batch_op.add_column(sa.Column("storage_bytes", sa.BigInteger(), nullable=True))
    # Added, not rebuilt: a rebuilt sites table would cascade-delete its credentials and hostnames.
    with op.batch_alter_table("sites", schema=None) as batch_op:
        batch_op.add_column(sa.Column("quota_lifted_day", sa.Date(), nullable=True))


def downgrade() -> None:
    op.drop_column("sites", "quota_lifted_day")
    for column in ("storage_bytes", "memory_mb_seconds", "cpu_seconds"):
        op.drop_column("site_usage", column)
