"""Create users, phone_jobs and code_claims.

Revision ID: 0001
Revises:
Create Date: 2026-11-23 20:01:47.928905
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0001"
down_revision: str | Sequence[str] | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# Revisions are frozen history: they spell out their SQL rather than import it from models,
# which keep changing. This is the same text as models.base.CREATE_TOUCH_FUNCTION_SQL.
CREATE_TOUCH_FUNCTION = """
CREATE OR REPLACE FUNCTION wxphone_touch_updated_at() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    NEW.updated_at := now();
    RETURN NEW;
END;
$$
"""
TABLES_WITH_UPDATED_AT = ("users", "code_claims")


def upgrade() -> None:
    """Create the three tables, their indexes and the updated_at triggers."""
    op.create_table(
        "users",
        sa.Column("id", sa.BigInteger(), sa.Identity(always=False), nullable=False),
        sa.Column("appid", sa.String(length=64), nullable=False),
        sa.Column("openid", sa.String(length=128), nullable=False),
        sa.Column("unionid", sa.String(length=128), nullable=True),
        sa.Column("phone_number", sa.String(length=32), nullable=True),
        sa.Column("pure_phone_number", sa.String(length=32), nullable=True),
        sa.Column("country_code", sa.String(length=8), nullable=True),
        sa.Column("phone_verified_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), server_default=sa.text("now()"), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), server_default=sa.text("now()"), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_users")),
        sa.UniqueConstraint("appid", "openid", name=op.f("uq_users_appid_openid")),
    )
    op.create_table(
        "phone_jobs",
        sa.Column("job_id", sa.String(length=64), nullable=False),
        sa.Column("appid", sa.String(length=64), nullable=False),
        sa.Column("openid", sa.String(length=128), nullable=False),
        sa.Column("code_fingerprint", sa.String(length=64), nullable=False),
        sa.Column("status", sa.String(length=16), server_default=sa.text("'queued'"), nullable=False),
        sa.Column("error_code", sa.String(length=64), nullable=True),
        sa.Column("attempts", sa.Integer(), server_default=sa.text("0"), nullable=False),
        sa.Column("last_rid", sa.String(length=64), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), server_default=sa.text("now()"), nullable=False),
        sa.Column("started_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("finished_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("code_expires_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("canonical_job_id", sa.String(length=64), nullable=True),
        sa.Column("claimed_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("lost_replies", sa.Integer(), server_default=sa.text("0"), nullable=False),
        sa.CheckConstraint(
            "status IN ('queued', 'running', 'retrying', 'succeeded', 'failed')",
            name=op.f("ck_phone_jobs_status"),
        ),
        sa.CheckConstraint("attempts >= 0", name=op.f("ck_phone_jobs_attempts_not_negative")),
        sa.PrimaryKeyConstraint("job_id", name=op.f("pk_phone_jobs")),
    )
    op.create_index(
        op.f("ix_phone_jobs_appid_code_fingerprint"),
        "phone_jobs",
        ["appid", "code_fingerprint"],
        unique=False,
    )
    op.create_index(op.f("ix_phone_jobs_appid_openid"), "phone_jobs", ["appid", "openid"], unique=False)
    op.create_index(
        op.f("ix_phone_jobs_status_created_at"), "phone_jobs", ["status", "created_at"], unique=False
    )
    op.create_table(
        "code_claims",
        sa.Column("appid", sa.String(length=64), nullable=False),
        sa.Column("code_fingerprint", sa.String(length=64), nullable=False),
        sa.Column("job_id", sa.String(length=64), nullable=False),
        sa.Column("status", sa.String(length=16), server_default=sa.text("'pending'"), nullable=False),
        sa.Column("error_code", sa.String(length=64), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), server_default=sa.text("now()"), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), server_default=sa.text("now()"), nullable=False),
        sa.CheckConstraint(
            "status IN ('pending', 'exchanging', 'succeeded', 'failed')", name=op.f("ck_code_claims_status")
        ),
        sa.PrimaryKeyConstraint("appid", "code_fingerprint", name=op.f("pk_code_claims")),
    )
    op.execute(CREATE_TOUCH_FUNCTION)
    for table in TABLES_WITH_UPDATED_AT:
        op.execute(
            f"CREATE TRIGGER trg_{table}_touch_updated_at BEFORE UPDATE ON {table} "
            "FOR EACH ROW EXECUTE FUNCTION wxphone_touch_updated_at()"
        )


def downgrade() -> None:
    """Drop everything :func:`upgrade` created."""
    # Dropping a table drops its triggers; the function goes once nothing uses it.
    op.drop_table("code_claims")
    op.drop_index(op.f("ix_phone_jobs_status_created_at"), table_name="phone_jobs")
    op.drop_index(op.f("ix_phone_jobs_appid_openid"), table_name="phone_jobs")
    op.drop_index(op.f("ix_phone_jobs_appid_code_fingerprint"), table_name="phone_jobs")
    op.drop_table("phone_jobs")
    op.drop_table("users")
    op.execute("DROP FUNCTION IF EXISTS wxphone_touch_updated_at()")
