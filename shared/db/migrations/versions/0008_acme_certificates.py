"""ACME certificates: where a custom hostname's certificate came from, and the controller's ACME state

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-04 10:00:00.000000
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0008"
down_revision: str | None = "0007"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_COLUMNS = (
    "acme_attempted_at",
    "acme_due_at",
    "acme_failures",
    "acme_reason",
    "acme_state",
    "cert_not_before",
    "cert_source",
)


def upgrade() -> None:
    # Columns are only added, as in 0006: no table is rebuilt under its foreign keys.
    with op.batch_alter_table("custom_hostnames", schema=None) as batch_op:
        batch_op.add_column(sa.Column("cert_source", sa.String(length=8), nullable=True))
        batch_op.add_column(sa.Column("cert_not_before", sa.DateTime(timezone=True), nullable=True))
        batch_op.add_column(sa.Column("acme_state", sa.String(length=16), nullable=True))
        batch_op.add_column(sa.Column("acme_reason", sa.Text(), nullable=True))
        batch_op.add_column(sa.Column("acme_failures", sa.Integer(), server_default="0", nullable=False))
        batch_op.add_column(sa.Column("acme_due_at", sa.DateTime(timezone=True), nullable=True))
        batch_op.add_column(sa.Column("acme_attempted_at", sa.DateTime(timezone=True), nullable=True))
    # Every certificate stored so far was uploaded by its tenant: ACME leaves those alone.
    hostnames = sa.table(
        "custom_hostnames", sa.column("cert_pem", sa.Text()), sa.column("cert_source", sa.String())
    )
    op.get_bind().execute(
        hostnames.update().where(hostnames.c.cert_pem.is_not(None)).values(cert_source="upload")
    )


def downgrade() -> None:
    for column in _COLUMNS:
        op.drop_column("custom_hostnames", column)
