"""Live claims, ordered phone numbers, idempotent audit rows, workers' key checks.

* ``phone_jobs.claimed_by``: the worker process (runner) holding a ``running`` job. A delivery
  that finds the job running takes it over only when that runner's liveness lease has lapsed.
* ``phone_jobs.code_fingerprint`` may be NULL: front ends no longer fingerprint codes; the worker
  that first claims the job writes it with the fleet's one fingerprint key.
* ``users.phone_code_issued_at`` / ``users.phone_job_created_at``: when the code behind the stored
  number was issued (WeChat's watermark) and submitted; an older verification never overwrites a
  newer one.
* ``exchange_audit.call_id``: one id per WeChat call, unique, so a final write that is retried
  after its commit reply was lost appends nothing twice.
* ``key_checks``: a keyed check value of each key the fleet must share (fingerprint, blind index);
  a worker started with another key refuses to run.

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-01 15:30:00.000000
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0003"
down_revision: str | Sequence[str] | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.add_column("phone_jobs", sa.Column("claimed_by", sa.String(length=64), nullable=True))
    op.alter_column("phone_jobs", "code_fingerprint", existing_type=sa.String(length=64), nullable=True)
    op.add_column("users", sa.Column("phone_code_issued_at", sa.DateTime(timezone=True), nullable=True))
    op.add_column("users", sa.Column("phone_job_created_at", sa.DateTime(timezone=True), nullable=True))
    op.add_column("exchange_audit", sa.Column("call_id", sa.String(length=32), nullable=True))
    op.create_index(op.f("ix_exchange_audit_call_id"), "exchange_audit", ["call_id"], unique=True)
    op.create_table(
        "key_checks",
        sa.Column("name", sa.String(length=64), nullable=False),
        sa.Column("check_value", sa.String(length=64), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), server_default=sa.text("now()"), nullable=False),
        sa.PrimaryKeyConstraint("name", name=op.f("pk_key_checks")),
    )


def downgrade() -> None:
    op.drop_table("key_checks")
    op.drop_index(op.f("ix_exchange_audit_call_id"), table_name="exchange_audit")
    op.drop_column("exchange_audit", "call_id")
    op.drop_column("users", "phone_job_created_at")
    op.drop_column("users", "phone_code_issued_at")
    # Jobs recorded by front ends but never claimed have no fingerprint yet; the old schema
    # needs one, and such a job's code was never presented: an empty marker will do.
    op.execute("UPDATE phone_jobs SET code_fingerprint = '' WHERE code_fingerprint IS NULL")
    op.alter_column("phone_jobs", "code_fingerprint", existing_type=sa.String(length=64), nullable=False)
    op.drop_column("phone_jobs", "claimed_by")
