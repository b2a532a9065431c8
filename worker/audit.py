"""Writing the append-only ``exchange_audit`` trail: one row per WeChat exchange attempt.

A phone job buffers the rows of its calls and writes them in the same transaction that records
the call's outcome (the job's final state, or its retry), which saves a round trip per call;
login writes its row in a short transaction of its own. Writing a row must never cost a result:
a standalone write that fails is logged (without personal data) and swallowed.
"""

from __future__ import annotations

import logging
import time
import uuid
from dataclasses import dataclass

from sqlalchemy import Table
from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session, sessionmaker

from models.exchange_audit import AuditApi, AuditOutcome, ExchangeAudit
from worker.errors import RetryLaterError, TokenInvalidError
from worker.wechat.errors import WeChatError

__all__ = [
    "AUDIT_ROW_COLUMNS",
    "MAX_CALLER_LENGTH",
    "AuditEntry",
    "append_rows",
    "audit_row",
    "clean_caller",
    "record_exchange",
]

log = logging.getLogger(__name__)

#: The Core table: inserting through it skips the ORM's bulk-insert bookkeeping on a hot path.
EXCHANGE_AUDIT_TABLE: Table = ExchangeAudit.__table__  # type: ignore[assignment]

#: The caller label a front end may pass: printable text of at most this many characters.
MAX_CALLER_LENGTH = 64


def clean_caller(value: object) -> str | None:
    """The caller label if it is printable text of 1..64 characters, else None (it is dropped)."""
    if isinstance(value, str) and 0 < len(value) <= MAX_CALLER_LENGTH and value.isprintable():
        return value
    return None


@dataclass(frozen=True)
class AuditEntry:
    """What is known about one exchange before its outcome."""

    api: AuditApi
    appid: str
    openid: str | None
    job_id: str | None
    code_fingerprint: str
    caller: str | None = None


def outcome_of(error: BaseException | None) -> tuple[AuditOutcome, int | None, str | None, str | None]:
    """(outcome, errcode, rid, error code) of an attempt that raised ``error`` (None: success)."""
    if error is None:
        return AuditOutcome.SUCCEEDED, 0, None, None
    errcode = error.errcode if isinstance(error, WeChatError) else None
    rid = error.rid if isinstance(error, WeChatError) else None
    error_code = getattr(error, "error_code", None) or "internal_error"
    retryable = isinstance(error, RetryLaterError | TokenInvalidError)
    return (AuditOutcome.RETRYING if retryable else AuditOutcome.FAILED), errcode, rid, error_code


#: The columns of a row built by :func:`audit_row`, in a fixed order (for hand-written inserts).
AUDIT_ROW_COLUMNS = (
    "appid",
    "openid",
    "job_id",
    "code_fingerprint",
    "api",
    "outcome",
    "errcode",
    "error_code",
    "rid",
    "latency_ms",
    "caller",
    "call_id",
)


def audit_row(
    entry: AuditEntry,
    *,
    started: float,
    error: BaseException | None = None,
    outcome: AuditOutcome | None = None,
    error_code: str | None = None,
) -> dict[str, object]:
    """The column values of one attempt that began at ``started`` (``time.monotonic()``)."""
    latency_ms = max(0, int((time.monotonic() - started) * 1000))
    derived, errcode, rid, derived_code = outcome_of(error)
    return {
        "appid": entry.appid,
        "openid": entry.openid,
        "job_id": entry.job_id,
        "code_fingerprint": entry.code_fingerprint,
        "api": entry.api.value,
        "outcome": (outcome or derived).value,
        "errcode": errcode,
        "error_code": error_code or derived_code,
        "rid": rid[:64] if rid else None,
        "latency_ms": latency_ms,
        "caller": entry.caller,
        # Makes the row's insert idempotent: a final write retried after its commit reply was
        # lost appends nothing twice.
        "call_id": uuid.uuid4().hex,
    }


def append_rows(session: Session, rows: list[dict[str, object]]) -> None:
    """Insert audit rows inside the caller's transaction (one Core statement, no ORM work)."""
    if rows:
        session.execute(insert(EXCHANGE_AUDIT_TABLE).on_conflict_do_nothing(index_elements=["call_id"]), rows)


def record_exchange(
    sessions: sessionmaker[Session],
    entry: AuditEntry,
    *,
    started: float,
    error: BaseException | None = None,
    outcome: AuditOutcome | None = None,
    error_code: str | None = None,
) -> None:
    """Append the row of one attempt in its own transaction (used where no other write follows)."""
    row = audit_row(entry, started=started, error=error, outcome=outcome, error_code=error_code)
    try:
        with sessions.begin() as session:
            append_rows(session, [row])
    except SQLAlchemyError as failure:
        log.warning(
            "could not write the audit row of a %s exchange: %s",
            entry.api.value,
            type(failure).__name__,
            extra={"job_id": entry.job_id},
        )
