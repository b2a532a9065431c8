"""``phone_jobs``: one row per submitted phone code, tracking the Celery task that resolves it."""

from __future__ import annotations

from datetime import datetime
from enum import StrEnum

from sqlalchemy import CheckConstraint, DateTime, Index, Integer, String, text
from sqlalchemy.orm import Mapped, mapped_column

from models.base import Base, created_at_column, in_values_check
from models.job_notify import notify_job_done

__all__ = ["TERMINAL_JOB_STATUSES", "PhoneJob", "PhoneJobStatus"]


class PhoneJobStatus(StrEnum):
    """Where a submission is in its life; stored as plain text guarded by a CHECK constraint."""

    QUEUED = "queued"
    RUNNING = "running"
    RETRYING = "retrying"
    SUCCEEDED = "succeeded"
    FAILED = "failed"


#: Statuses a job never leaves.
TERMINAL_JOB_STATUSES = frozenset({PhoneJobStatus.SUCCEEDED, PhoneJobStatus.FAILED})


class PhoneJob(Base):
    """One submission of a phone code, keyed by the Celery task id it was enqueued under."""

    __tablename__ = "phone_jobs"
    __table_args__ = (
        CheckConstraint(in_values_check("status", PhoneJobStatus), name="status"),
        CheckConstraint("attempts >= 0", name="attempts_not_negative"),
        # Finds the earlier submission of the same code.
        Index(None, "appid", "code_fingerprint"),
        # Sweeps look for jobs stuck in one status since before some time.
        Index(None, "status", "created_at"),
        Index(None, "appid", "openid"),
    )

    #: The Celery task id of this submission.
    job_id: Mapped[str] = mapped_column(String(64), primary_key=True)
    appid: Mapped[str] = mapped_column(String(64), nullable=False)
    openid: Mapped[str] = mapped_column(String(128), nullable=False)
    #: A keyed HMAC of the phone code, written by the worker that first claims the job (front ends
    #: do not hold the fingerprint key); the code itself is never stored.
    code_fingerprint: Mapped[str | None] = mapped_column(String(64), nullable=True)
    status: Mapped[str] = mapped_column(
        String(16), nullable=False, server_default=text(f"'{PhoneJobStatus.QUEUED.value}'")
    )
    #: A stable identifier of why the job failed (``WxphoneError.error_code``).
    error_code: Mapped[str | None] = mapped_column(String(64), nullable=True)
    #: How many times a worker started this job.
    attempts: Mapped[int] = mapped_column(Integer, nullable=False, server_default=text("0"))
    #: WeChat's ``rid`` of the last failed call, for support requests to WeChat.
    last_rid: Mapped[str | None] = mapped_column(String(64), nullable=True)
    created_at: Mapped[datetime] = created_at_column()
    started_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    finished_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    #: When the code's five-minute life ends; retrying after this is pointless.
    code_expires_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), nullable=False)
    #: For a repeated submission of the same (appid, code): the job that owns the WeChat exchange.
    canonical_job_id: Mapped[str | None] = mapped_column(String(64), nullable=True)
    #: When a worker last claimed the job; a ``running`` job with an old claim has lost its worker.
    claimed_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    #: The worker process (its runner id, :mod:`worker.liveness`) that holds a ``running`` job.
    claimed_by: Mapped[str | None] = mapped_column(String(64), nullable=True)
    #: Exchanges whose reply never arrived (timeout after sending, worker death mid-call): the
    #: only case in which the same code may be presented to WeChat twice.
    lost_replies: Mapped[int] = mapped_column(Integer, nullable=False, server_default=text("0"))

    def __repr__(self) -> str:
        return f"PhoneJob(job_id={self.job_id!r}, appid={self.appid!r}, status={self.status!r})"


notify_job_done(Base.metadata.tables[PhoneJob.__tablename__])
