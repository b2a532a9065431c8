"""The phone job's two hot-path statements, written out in SQL.

A job that goes well touches PostgreSQL twice: once to claim the job and its code before the
WeChat call, once to record the number after it. Each is **one statement** sent in autocommit
mode (a statement is atomic on its own), so each costs a single round trip after the pool's
pre-ping, instead of BEGIN, several statements and COMMIT.

They are plain SQL rather than SQLAlchemy expressions on purpose: building an expression tree
and its cache key for every job was most of a worker's CPU per job (docs/performance.md).
Everything else in :mod:`worker.jobs.phone` (retries, duplicates, expiry, failures) is rare and
stays in ORM/Core code. Column lists must follow the models; the integration tests run both
statements against the migrated schema.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from functools import cache
from typing import Any

from sqlalchemy import Connection

from models.code_claim import CodeClaimStatus
from models.phone_job import PhoneJobStatus
from worker.audit import AUDIT_ROW_COLUMNS

__all__ = ["ClaimedAttempt", "PhoneFields", "RecordedSuccess", "claim_job_and_code", "record_phone_success"]

_RUNNING = PhoneJobStatus.RUNNING.value
_CLAIMABLE_SQL = f"'{PhoneJobStatus.QUEUED.value}', '{PhoneJobStatus.RETRYING.value}'"
_TERMINAL_SQL = f"'{PhoneJobStatus.SUCCEEDED.value}', '{PhoneJobStatus.FAILED.value}'"
_OPEN_CLAIM_SQL = f"'{CodeClaimStatus.PENDING.value}', '{CodeClaimStatus.EXCHANGING.value}'"

# The job is recorded if the producer did not, and compare-and-set to running from a claimable
# state, from a running state whose claim is older than any run can be, or from a running state
# held by takeover_from (a runner known to be gone, worker.liveness); never a row recorded for
# another app or user (a task id reused with other kwargs). Claim times are PostgreSQL's clock,
# so the age of a claim never depends on two hosts' clocks agreeing. The claim names this runner
# and writes the code's fingerprint under the workers' key. In the same statement, a job that may
# go on (attempts left, code still alive) claims its code if no other submission has: ON CONFLICT
# DO NOTHING leaves every other case to the caller's slow path.
_CLAIM_JOB_AND_CODE = f"""
WITH claimed_job AS (
    INSERT INTO phone_jobs AS job (
        job_id, appid, openid, code_fingerprint, status, attempts,
        created_at, started_at, claimed_at, claimed_by, code_expires_at
    )
    VALUES (
        %(job_id)s, %(appid)s, %(openid)s, %(fingerprint)s, '{_RUNNING}', 1,
        %(now)s, %(now)s, statement_timestamp(), %(runner)s, %(code_expires_at)s
    )
    ON CONFLICT (job_id) DO UPDATE SET
        status = '{_RUNNING}',
        attempts = job.attempts + 1,
        started_at = coalesce(job.started_at, EXCLUDED.started_at),
        claimed_at = EXCLUDED.claimed_at,
        claimed_by = EXCLUDED.claimed_by,
        code_fingerprint = EXCLUDED.code_fingerprint
    WHERE (job.status IN ({_CLAIMABLE_SQL})
           OR (job.status = '{_RUNNING}'
               AND (job.claimed_at <= statement_timestamp() - make_interval(secs => %(stale_claim_seconds)s)
                    OR job.claimed_by = %(takeover_from)s)))
      AND job.appid = EXCLUDED.appid AND job.openid = EXCLUDED.openid
    RETURNING job.attempts, job.code_expires_at
), claimed_code AS (
    INSERT INTO code_claims (appid, code_fingerprint, job_id, status)
    SELECT %(appid)s, %(fingerprint)s, %(job_id)s, '{CodeClaimStatus.EXCHANGING.value}'
    FROM claimed_job
    WHERE claimed_job.attempts <= %(max_attempts)s AND claimed_job.code_expires_at > %(now)s
    ON CONFLICT (appid, code_fingerprint) DO NOTHING
    RETURNING 1
)
SELECT attempts, code_expires_at, EXISTS (SELECT FROM claimed_code) AS code_claimed
FROM claimed_job
"""


@dataclass(frozen=True)
class ClaimedAttempt:
    """The job was claimed for this attempt; ``code_claimed`` says whether its code was too."""

    attempts: int
    code_expires_at: datetime
    code_claimed: bool


def claim_job_and_code(
    connection: Connection,
    *,
    job_id: str,
    appid: str,
    openid: str,
    fingerprint: str,
    now: datetime,
    code_expires_at: datetime,
    runner: str,
    stale_claim_seconds: float,
    takeover_from: str | None = None,
    max_attempts: int,
) -> ClaimedAttempt | None:
    """Record and claim the job for ``runner`` and, in the common case, its code. None: the job
    is not claimable (terminal; recorded for another appid or openid; or running elsewhere: a
    running job is taken over only if its claim is older than ``stale_claim_seconds`` by
    PostgreSQL's clock, or held by ``takeover_from``). ``code_claimed`` is
    False when the code was claimed before (a repeat, or this job's own earlier attempt) or the
    job may not go on (too many attempts, code expired): the caller decides those cases.

    ``connection`` must be in autocommit mode: the statement is its own transaction.
    """
    row = connection.exec_driver_sql(
        _CLAIM_JOB_AND_CODE,
        {
            "job_id": job_id,
            "appid": appid,
            "openid": openid,
            "fingerprint": fingerprint,
            "now": now,
            "code_expires_at": code_expires_at,
            "runner": runner,
            "stale_claim_seconds": stale_claim_seconds,
            "takeover_from": takeover_from,
            "max_attempts": max_attempts,
        },
    ).one_or_none()
    if row is None:
        return None
    return ClaimedAttempt(attempts=int(row[0]), code_expires_at=row[1], code_claimed=bool(row[2]))


@dataclass(frozen=True)
class PhoneFields:
    """The protected forms of one verified number, as stored in ``users`` (worker.crypto)."""

    phone_number_encrypted: str
    pure_phone_number_encrypted: str
    phone_blind_index: str
    phone_masked: str
    country_code: str
    key_version: str


@cache
def _record_success_sql(audit_row_count: int) -> str:
    """The success statement with room for ``audit_row_count`` audit rows (1, or 2 after a
    token refresh)."""
    audit_values = ",\n        ".join(
        "(" + ", ".join(f"%(audit{index}_{column})s" for column in AUDIT_ROW_COLUMNS) + ")"
        for index in range(audit_row_count)
    )
    # Data-modifying CTEs all run, exactly once, whether or not the query reads them; each sees
    # the snapshot from before the statement, so the user and the claim depend on finished_job
    # only through its RETURNING rows:
    # * the job becomes succeeded only if it is not terminal (the sweep, or another run's
    #   failure, may have closed it);
    # * the user's number changes only together with that transition, and only if no newer
    #   verification is stored (ordered by the code's issue time, then the job's submission);
    # * the code claim settles with the job; the audit rows are appended once per call.
    # A row's key version is that of its oldest ciphertext (worker.crypto.row_key_version): a
    # session_key under an older key keeps the row on `wxphone keys rotate`'s list.
    return f"""
WITH finished_job AS (
    UPDATE phone_jobs
    SET status = '{PhoneJobStatus.SUCCEEDED.value}', error_code = NULL, finished_at = %(now)s
    WHERE job_id = %(job_id)s AND status NOT IN ({_TERMINAL_SQL})
    RETURNING created_at
), saved_user AS (
    INSERT INTO users AS u (
        appid, openid, encryption_key_version, phone_number_encrypted,
        pure_phone_number_encrypted, phone_blind_index, phone_masked, country_code,
        phone_verified_at, phone_code_issued_at, phone_job_created_at
    )
    SELECT
        %(appid)s, %(openid)s, %(key_version)s, %(phone_number_encrypted)s,
        %(pure_phone_number_encrypted)s, %(phone_blind_index)s, %(phone_masked)s,
        %(country_code)s, %(now)s, %(code_issued_at)s, finished_job.created_at
    FROM finished_job
    ON CONFLICT (appid, openid) DO UPDATE SET
        phone_number_encrypted = EXCLUDED.phone_number_encrypted,
        pure_phone_number_encrypted = EXCLUDED.pure_phone_number_encrypted,
        phone_blind_index = EXCLUDED.phone_blind_index,
        phone_masked = EXCLUDED.phone_masked,
        country_code = EXCLUDED.country_code,
        phone_verified_at = EXCLUDED.phone_verified_at,
        phone_code_issued_at = EXCLUDED.phone_code_issued_at,
        phone_job_created_at = EXCLUDED.phone_job_created_at,
        encryption_key_version = CASE
            WHEN u.session_key_encrypted IS NULL
              OR split_part(u.session_key_encrypted, ':', 1) = EXCLUDED.encryption_key_version
            THEN EXCLUDED.encryption_key_version
            ELSE u.encryption_key_version
        END
    WHERE (coalesce(u.phone_code_issued_at, '-infinity'), coalesce(u.phone_job_created_at, '-infinity'))
       <= (EXCLUDED.phone_code_issued_at, EXCLUDED.phone_job_created_at)
    RETURNING 1
), settled_claim AS (
    UPDATE code_claims
    SET status = '{CodeClaimStatus.SUCCEEDED.value}', error_code = NULL
    WHERE appid = %(appid)s AND code_fingerprint = %(fingerprint)s AND job_id = %(job_id)s
      AND status IN ({_OPEN_CLAIM_SQL}) AND EXISTS (SELECT FROM finished_job)
), audit AS (
    INSERT INTO exchange_audit ({", ".join(AUDIT_ROW_COLUMNS)})
    VALUES
        {audit_values}
    ON CONFLICT (call_id) DO NOTHING
)
SELECT EXISTS (SELECT FROM finished_job), EXISTS (SELECT FROM saved_user)
"""


@dataclass(frozen=True)
class RecordedSuccess:
    """What the success statement changed: the job (this run closed it) and the user's number
    (not when a newer verification was already stored)."""

    job_finished: bool
    number_stored: bool


def record_phone_success(
    connection: Connection,
    *,
    job_id: str,
    appid: str,
    openid: str,
    fingerprint: str,
    fields: PhoneFields,
    code_issued_at: datetime,
    now: datetime,
    audit_rows: list[dict[str, object]],
) -> RecordedSuccess:
    """Mark the job and its code claim succeeded, store the number on the user (unless a newer
    verification is stored) and append the attempt's audit rows, in one statement
    (``connection`` in autocommit mode). Nothing but the audit rows changes when the job is
    already terminal."""
    if not audit_rows:
        raise ValueError("a successful exchange has at least one audit row")
    parameters: dict[str, Any] = {
        "job_id": job_id,
        "appid": appid,
        "openid": openid,
        "fingerprint": fingerprint,
        "now": now,
        "code_issued_at": code_issued_at,
        "key_version": fields.key_version,
        "phone_number_encrypted": fields.phone_number_encrypted,
        "pure_phone_number_encrypted": fields.pure_phone_number_encrypted,
        "phone_blind_index": fields.phone_blind_index,
        "phone_masked": fields.phone_masked,
        "country_code": fields.country_code,
    }
    for index, row in enumerate(audit_rows):
        for column in AUDIT_ROW_COLUMNS:
            parameters[f"audit{index}_{column}"] = row[column]
    changed = connection.exec_driver_sql(_record_success_sql(len(audit_rows)), parameters).one()
    return RecordedSuccess(job_finished=bool(changed[0]), number_stored=bool(changed[1]))
