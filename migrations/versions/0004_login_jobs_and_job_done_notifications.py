"""Login jobs, and a notification when a job ends.

* ``login_jobs``: a login (code2Session) is a durable job like a phone job: status, error code,
  attempts, times, and its result (openid, unionid; never the session_key).
* ``wxphone_notify_job_done()`` and a trigger on ``phone_jobs`` and ``login_jobs``:
  ``NOTIFY wxphone_job_done, '<job id>'`` from the transaction that makes a job ``succeeded`` or
  ``failed``, so front ends waiting for a job wake at its commit instead of polling.

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-01 22:10:00.000000
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0004"
down_revision: str | Sequence[str] | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# Written out rather than imported: a migration must keep meaning what it meant when it was
# written. The same text as models.job_notify.
CREATE_NOTIFY_FUNCTION = """
CREATE OR REPLACE FUNCTION wxphone_notify_job_done() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('wxphone_job_done', NEW.job_id);
    RETURN NULL;
END;
$$
"""
JOB_TABLES = ("phone_jobs", "login_jobs")


def upgrade() -> None:
    op.create_table(
        "login_jobs",
        sa.Column("job_id", sa.String(length=64), nullable=False),
        sa.Column("appid", sa.String(length=64), nullable=False),
        sa.Column("status", sa.String(length=16), server_default=sa.text("'queued'"), nullable=False),
        sa.Column("error_code", sa.String(length=64), nullable=True),
        sa.Column("attempts", sa.Integer(), server_default=sa.text("0"), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), server_default=sa.text("now()"), nullable=False),
        sa.Column("started_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("finished_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("code_expires_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("openid", sa.String(length=128), nullable=True),
        sa.Column("unionid", sa.String(length=128), nullable=True),
        sa.CheckConstraint(
            "status IN ('queued', 'running', 'retrying', 'succeeded', 'failed')",
            name=op.f("ck_login_jobs_status"),
        ),
        sa.CheckConstraint("attempts >= 0", name=op.f("ck_login_jobs_attempts_not_negative")),
        sa.PrimaryKeyConstraint("job_id", name=op.f("pk_login_jobs")),
    )
    op.create_index(
        op.f("ix_login_jobs_status_code_expires_at"), "login_jobs", ["status", "code_expires_at"]
    )
    op.execute(CREATE_NOTIFY_FUNCTION)
    for table in JOB_TABLES:
        op.execute(
            f"CREATE TRIGGER trg_{table}_notify_done AFTER INSERT OR UPDATE OF status ON {table} "
            "FOR EACH ROW WHEN (NEW.status IN ('succeeded', 'failed')) "
            "EXECUTE FUNCTION wxphone_notify_job_done()"
        )


def downgrade() -> None:
    for table in JOB_TABLES:
        op.execute(f"DROP TRIGGER IF EXISTS trg_{table}_notify_done ON {table}")
    op.execute("DROP FUNCTION IF EXISTS wxphone_notify_job_done()")
    op.drop_index(op.f("ix_login_jobs_status_code_expires_at"), table_name="login_jobs")
    op.drop_table("login_jobs")
