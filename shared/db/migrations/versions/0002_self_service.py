"""self-service: plan quotas, users, portal sessions, settings, app settings, custom hostnames

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-24 10:00:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "users",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("username", sa.String(length=64), nullable=False),
        sa.Column("password_hash", sa.String(length=256), nullable=False),
        sa.Column("tenant_id", sa.Integer(), nullable=True),
        sa.Column(
            "created_at",
            sa.DateTime(timezone=True),
            server_default=sa.text("(CURRENT_TIMESTAMP)"),
            nullable=False,
        ),
        sa.Column("last_sign_in_at", sa.DateTime(timezone=True), nullable=True),
        sa.ForeignKeyConstraint(["tenant_id"], ["tenants.id"], ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("username"),
    )
    op.create_table(
        "portal_sessions",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("session_hash", sa.String(length=64), nullable=False),
        sa.Column("user_id", sa.Integer(), nullable=False),
        sa.Column("csrf_token", sa.String(length=64), nullable=False),
        sa.Column(
            "created_at",
            sa.DateTime(timezone=True),
            server_default=sa.text("(CURRENT_TIMESTAMP)"),
            nullable=False,
        ),
        sa.Column("expires_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(["user_id"], ["users.id"], ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("session_hash"),
    )
    op.create_table(
        "settings",
        sa.Column("key", sa.String(length=64), nullable=False),
        sa.Column("value", sa.JSON(), nullable=False),
        sa.PrimaryKeyConstraint("key"),
    )
    op.create_table(
        "custom_hostnames",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("site_id", sa.Integer(), nullable=False),
        sa.Column("hostname", sa.String(length=253), nullable=False),
        sa.Column("cert_pem", sa.Text(), nullable=True),
        sa.Column("key_pem", sa.Text(), nullable=True),
        sa.Column("cert_not_after", sa.DateTime(timezone=True), nullable=True),
        sa.Column(
            "created_at",
            sa.DateTime(timezone=True),
            server_default=sa.text("(CURRENT_TIMESTAMP)"),
            nullable=False,
        ),
        sa.ForeignKeyConstraint(["site_id"], ["sites.id"], ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("hostname"),
    )
    with op.batch_alter_table("plans") as batch:
        batch.add_column(sa.Column("bandwidth_mb_per_day", sa.Integer(), nullable=True))
        batch.add_column(sa.Column("cpu_minutes_per_day", sa.Integer(), nullable=True))
        batch.add_column(sa.Column("max_custom_hostnames", sa.Integer(), server_default="0", nullable=False))
        batch.add_column(
            sa.Column("compute_mode", sa.String(length=16), server_default="shared", nullable=False)
        )
        batch.add_column(sa.Column("worker_size", sa.String(length=16), nullable=True))
        batch.add_column(sa.Column("always_on", sa.Boolean(), server_default=sa.false(), nullable=False))
        batch.add_column(
            sa.Column("max_instances_per_site", sa.Integer(), server_default="1", nullable=False)
        )
        batch.add_column(sa.Column("public", sa.Boolean(), server_default=sa.false(), nullable=False))
        batch.add_column(sa.Column("retired", sa.Boolean(), server_default=sa.false(), nullable=False))
    with op.batch_alter_table("api_tokens") as batch:
        batch.add_column(sa.Column("user_id", sa.Integer(), nullable=True))
        batch.add_column(sa.Column("prefix", sa.String(length=16), server_default="", nullable=False))
        batch.add_column(sa.Column("last_used_at", sa.DateTime(timezone=True), nullable=True))
        batch.create_foreign_key("fk_api_tokens_user_id", "users", ["user_id"], ["id"], ondelete="CASCADE")
    with op.batch_alter_table("sites") as batch:
        batch.add_column(sa.Column("app_settings", sa.JSON(), server_default="{}", nullable=False))


def downgrade() -> None:
    with op.batch_alter_table("sites") as batch:
        batch.drop_column("app_settings")
    with op.batch_alter_table("api_tokens") as batch:
        batch.drop_constraint("fk_api_tokens_user_id", type_="foreignkey")
        batch.drop_column("last_used_at")
        batch.drop_column("prefix")
        batch.drop_column("user_id")
    with op.batch_alter_table("plans") as batch:
        for column in (
            "retired",
            "public",
            "max_instances_per_site",
            "always_on",
            "worker_size",
            "compute_mode",
            "max_custom_hostnames",
            "cpu_minutes_per_day",
            "bandwidth_mb_per_day",
        ):
            batch.drop_column(column)
    op.drop_table("custom_hostnames")
    op.drop_table("settings")
    op.drop_table("portal_sessions")
    op.drop_table("users")
