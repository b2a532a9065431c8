"""``exchange_audit``: one append-only row per WeChat exchange attempt (phone codes and logins).

Who asked for which app and user, when, with which outcome, errcode, WeChat ``rid`` and latency;
never the code itself (only its keyed fingerprint) and never a phone number or session_key. The
database refuses UPDATE and DELETE on the table (a trigger), and wxphone only ever inserts.
"""

from __future__ import annotations

from datetime import datetime
from enum import StrEnum

from sqlalchemy import BigInteger, CheckConstraint, Identity, Index, Integer, String, event
from sqlalchemy.orm import Mapped, mapped_column

from models.base import Base, created_at_column, in_values_check, run_sql

__all__ = [
    "APPEND_ONLY_FUNCTION",
    "CREATE_APPEND_ONLY_FUNCTION_SQL",
    "AuditApi",
    "AuditOutcome",
    "ExchangeAudit",
    "append_only_trigger_ddl",
]


class AuditApi(StrEnum):
    """Which WeChat exchange the row records."""

    PHONE = "phone"
    LOGIN = "login"


class AuditOutcome(StrEnum):
    """What became of one attempt."""

    SUCCEEDED = "succeeded"  # WeChat answered with the number / session
    FAILED = "failed"  # a final refusal (invalid code, high-risk user, quota, ...)
    RETRYING = "retrying"  # a retryable failure (busy, rate limit, lost reply, no token)
    REJECTED = "rejected"  # refused after the reply (watermark of another app)


#: A trigger function that refuses to change or remove a row.
APPEND_ONLY_FUNCTION = "wxphone_refuse_change"
CREATE_APPEND_ONLY_FUNCTION_SQL = f"""
CREATE OR REPLACE FUNCTION {APPEND_ONLY_FUNCTION}() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION '% is append-only: % refused', TG_TABLE_NAME, TG_OP
        USING ERRCODE = 'insufficient_privilege';
END;
$$
"""
DROP_APPEND_ONLY_FUNCTION_SQL = f"DROP FUNCTION IF EXISTS {APPEND_ONLY_FUNCTION}()"


def append_only_trigger_ddl(table_name: str) -> tuple[str, str]:
    """The (create, drop) SQL of the trigger that refuses UPDATE and DELETE on ``table_name``."""
    trigger = f"trg_{table_name}_append_only"
    create = (
        f"CREATE TRIGGER {trigger} BEFORE UPDATE OR DELETE ON {table_name} "
        f"FOR EACH ROW EXECUTE FUNCTION {APPEND_ONLY_FUNCTION}()"
    )
    return create, f"DROP TRIGGER IF EXISTS {trigger} ON {table_name}"


class ExchangeAudit(Base):
    """One WeChat exchange attempt."""

    __tablename__ = "exchange_audit"
    __table_args__ = (
        CheckConstraint(in_values_check("api", AuditApi), name="api"),
        CheckConstraint(in_values_check("outcome", AuditOutcome), name="outcome"),
        CheckConstraint("latency_ms >= 0", name="latency_not_negative"),
        Index(None, "appid", "openid"),
        Index(None, "job_id"),
        Index(None, "created_at"),
        # A retried final write appends a call's row at most once.
        Index(None, "call_id", unique=True),
    )

    id: Mapped[int] = mapped_column(BigInteger, Identity(), primary_key=True)
    created_at: Mapped[datetime] = created_at_column()
    appid: Mapped[str] = mapped_column(String(64), nullable=False)
    #: Known for phone jobs; for logins, known only when WeChat answered.
    openid: Mapped[str | None] = mapped_column(String(128), nullable=True)
    #: The phone job's id, or the login task's id.
    job_id: Mapped[str | None] = mapped_column(String(64), nullable=True)
    #: Keyed HMAC of (appid, code), as in ``phone_jobs``; never the code.
    code_fingerprint: Mapped[str] = mapped_column(String(64), nullable=False)
    api: Mapped[str] = mapped_column(String(16), nullable=False)
    outcome: Mapped[str] = mapped_column(String(16), nullable=False)
    #: WeChat's errcode (0 on success); None when no reply came back.
    errcode: Mapped[int | None] = mapped_column(Integer, nullable=True)
    #: wxphone's error code of a failed attempt (``invalid_code``, ``reply_lost`` ...).
    error_code: Mapped[str | None] = mapped_column(String(64), nullable=True)
    #: WeChat's request id, for support requests.
    rid: Mapped[str | None] = mapped_column(String(64), nullable=True)
    latency_ms: Mapped[int] = mapped_column(Integer, nullable=False)
    #: Optional label the front end passed (``caller=``): printable, at most 64 characters.
    caller: Mapped[str | None] = mapped_column(String(64), nullable=True)
    #: One random id per WeChat call (32 hex characters).
    call_id: Mapped[str | None] = mapped_column(String(32), nullable=True)

    def __repr__(self) -> str:
        return (
            f"ExchangeAudit(id={self.id!r}, appid={self.appid!r}, api={self.api!r}, outcome={self.outcome!r})"
        )


# create_all()/drop_all() build the same function and trigger as the migration.
_table = Base.metadata.tables[ExchangeAudit.__tablename__]
event.listen(_table, "before_create", run_sql(CREATE_APPEND_ONLY_FUNCTION_SQL))
event.listen(_table, "after_create", run_sql(append_only_trigger_ddl(ExchangeAudit.__tablename__)[0]))
event.listen(_table, "after_drop", run_sql(DROP_APPEND_ONLY_FUNCTION_SQL))
