"""site assignments: when a site was placed on each of its workers

Revision ID: 0015
Revises: 0014
Create Date: 2026-12-05 14:45:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0015"
down_revision: str | None = "0014"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    # Assignments already there get the same time: their order is then each site's own (a hash).
    with op.batch_alter_table("site_assignments") as batch:
        batch.add_column(
            sa.Column(
                "since",
                sa.DateTime(timezone=True),
                server_default=sa.text("(CURRENT_TIMESTAMP)"),
                nullable=False,
            )
        )


def downgrade() -> None:
    with op.batch_alter_table("site_assignments") as batch:
        batch.drop_column("since")
