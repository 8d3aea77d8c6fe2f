"""deployment slots: a slot is a site of its own linked to its production site; swaps exchange routes

Revision ID: 0010
Revises: 0009
Create Date: 2026-12-03 10:30:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0010"
down_revision: str | None = "0009"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("sites") as batch:
        batch.add_column(sa.Column("slot_of_id", sa.Integer(), nullable=True))
        batch.add_column(sa.Column("slot_name", sa.String(length=20), nullable=True))
        batch.add_column(sa.Column("routed_to_id", sa.Integer(), nullable=True))
        batch.add_column(sa.Column("sticky_settings", sa.JSON(), server_default="[]", nullable=False))
        batch.create_foreign_key("fk_sites_slot_of", "sites", ["slot_of_id"], ["id"], ondelete="CASCADE")
        batch.create_foreign_key("fk_sites_routed_to", "sites", ["routed_to_id"], ["id"], ondelete="SET NULL")


def downgrade() -> None:
    with op.batch_alter_table("sites") as batch:
        batch.drop_constraint("fk_sites_routed_to", type_="foreignkey")
        batch.drop_constraint("fk_sites_slot_of", type_="foreignkey")
        batch.drop_column("sticky_settings")
        batch.drop_column("routed_to_id")
        batch.drop_column("slot_name")
        batch.drop_column("slot_of_id")
