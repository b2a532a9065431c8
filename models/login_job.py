"""``login_jobs``: one row per submitted ``wx.login`` code, tracking the task that exchanges it."""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import CheckConstraint, DateTime, Index, Integer, String, text
from sqlalchemy.orm import Mapped, mapped_column

from models.base import Base, created_at_column, in_values_check
from models.job_notify import notify_job_done
from models.phone_job import PhoneJobStatus

__all__ = ["LoginJob"]


class LoginJob(Base):
    """One login (code2Session) job, keyed by the Celery task id it was enqueued under.

    Its statuses are a phone job's (:class:`PhoneJobStatus`). The result, openid and unionid, is
    written in the transaction that records the user; WeChat's session_key is never here.
    """

    __tablename__ = "login_jobs"
    __table_args__ = (
        CheckConstraint(in_values_check("status", PhoneJobStatus), name="status"),
        CheckConstraint("attempts >= 0", name="attempts_not_negative"),
        # The sweep looks for jobs stuck in one status past their code's life.
        Index(None, "status", "code_expires_at"),
    )

    #: The Celery task id of this login.
    job_id: Mapped[str] = mapped_column(String(64), primary_key=True)
    appid: Mapped[str] = mapped_column(String(64), nullable=False)
    status: Mapped[str] = mapped_column(
        String(16), nullable=False, server_default=text(f"'{PhoneJobStatus.QUEUED.value}'")
    )
    #: A stable identifier of why the login failed (``WxphoneError.error_code``).
    error_code: Mapped[str | None] = mapped_column(String(64), nullable=True)
    #: How many times a worker started this login.
    attempts: Mapped[int] = mapped_column(Integer, nullable=False, server_default=text("0"))
    created_at: Mapped[datetime] = created_at_column()
    started_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    finished_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    #: When the login code's five-minute life ends.
    code_expires_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), nullable=False)
    #: The result of a successful login.
    openid: Mapped[str | None] = mapped_column(String(128), nullable=True)
    unionid: Mapped[str | None] = mapped_column(String(128), nullable=True)

    def __repr__(self) -> str:
        return f"LoginJob(job_id={self.job_id!r}, appid={self.appid!r}, status={self.status!r})"


notify_job_done(Base.metadata.tables[LoginJob.__tablename__])
