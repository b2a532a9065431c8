"""Writing the append-only ``exchange_audit`` trail: one row per WeChat exchange attempt.

Each row is written in its own short transaction right after the call, before the result is
recorded, so a result write that fails later does not lose the audit row. Writing the row must
never cost a result: a failure to write it is logged (without personal data) and swallowed.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

from sqlalchemy import insert
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session, sessionmaker

from models.exchange_audit import AuditApi, AuditOutcome, ExchangeAudit
from worker.errors import RetryLaterError, TokenInvalidError
from worker.wechat.errors import WeChatError

__all__ = ["MAX_CALLER_LENGTH", "AuditEntry", "clean_caller", "record_exchange"]

log = logging.getLogger(__name__)

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


def record_exchange(
    sessions: sessionmaker[Session],
    entry: AuditEntry,
    *,
    started: float,
    error: BaseException | None = None,
    outcome: AuditOutcome | None = None,
    error_code: str | None = None,
) -> None:
    """Append the row of one attempt that began at ``started`` (``time.monotonic()``)."""
    latency_ms = max(0, int((time.monotonic() - started) * 1000))
    derived, errcode, rid, derived_code = outcome_of(error)
    try:
        with sessions.begin() as session:
            session.execute(
                insert(ExchangeAudit).values(
                    appid=entry.appid,
                    openid=entry.openid,
                    job_id=entry.job_id,
                    code_fingerprint=entry.code_fingerprint,
                    api=entry.api.value,
                    outcome=(outcome or derived).value,
                    errcode=errcode,
                    error_code=error_code or derived_code,
                    rid=rid[:64] if rid else None,
                    latency_ms=latency_ms,
                    caller=entry.caller,
                )
            )
    except SQLAlchemyError as failure:
        log.warning(
            "could not write the audit row of a %s exchange: %s",
            entry.api.value,
            type(failure).__name__,
            extra={"job_id": entry.job_id},
        )
