"""Closing jobs that can no longer finish by themselves.

A job whose worker died is normally taken over by its next delivery once the dead process's
liveness lease has lapsed (worker.liveness). This sweep is the
backstop for everything else (a message lost with a Redis crash, a whole host gone for longer
than the code lives): once a job's code has expired *and* any run that could still hold it has
ended (no run outlives the hard time limit), the job is closed with the error that tells the
truth. wxphone never stores a code, so a sweep can only close jobs, never re-run them:

* ``worker_lost``: its code may have reached WeChat (the job's code claim was ``exchanging``);
  whether WeChat consumed it is unknown;
* ``code_expired``: its code never reached WeChat.

Login jobs are closed the same way: ``worker_lost`` for one left ``running`` (its code may have
reached WeChat), ``code_expired`` for one that never ran again.
"""

from __future__ import annotations

import logging
from collections import Counter
from datetime import timedelta

from sqlalchemy import case, func, select, update
from sqlalchemy.orm import Session, sessionmaker

from models import CodeClaim, LoginJob, PhoneJob
from models.code_claim import CodeClaimStatus
from models.phone_job import PhoneJobStatus

__all__ = ["SWEEP_BATCH_SIZE", "sweep_stuck_jobs"]

log = logging.getLogger(__name__)

SWEEP_BATCH_SIZE = 500
_OPEN_JOB = [PhoneJobStatus.QUEUED.value, PhoneJobStatus.RUNNING.value, PhoneJobStatus.RETRYING.value]
_OPEN_CLAIM = [CodeClaimStatus.PENDING.value, CodeClaimStatus.EXCHANGING.value]


def sweep_stuck_jobs(*, sessions: sessionmaker[Session], stale_claim_seconds: float) -> dict[str, int]:
    """Close one batch of jobs stuck past their code's life; return counts by error code."""
    # PostgreSQL's clock, as for claims: a beat host whose clock runs ahead must not close jobs
    # whose runs may still be going.
    cutoff = func.now() - timedelta(seconds=stale_claim_seconds)
    closed: Counter[str] = Counter()
    with sessions.begin() as session:
        stuck = session.execute(
            select(PhoneJob.job_id, PhoneJob.appid, PhoneJob.code_fingerprint)
            .where(PhoneJob.status.in_(_OPEN_JOB), PhoneJob.code_expires_at < cutoff)
            .order_by(PhoneJob.code_expires_at)
            .limit(SWEEP_BATCH_SIZE)
            .with_for_update(skip_locked=True)
        ).all()
        for job_id, appid, fingerprint in stuck:
            claim = session.execute(
                select(CodeClaim)
                .where(CodeClaim.appid == appid, CodeClaim.code_fingerprint == fingerprint)
                .with_for_update()
            ).scalar_one_or_none()
            owns_claim = claim is not None and claim.job_id == job_id
            exchanging = owns_claim and claim is not None and claim.status == CodeClaimStatus.EXCHANGING.value
            error_code = "worker_lost" if exchanging else "code_expired"
            session.execute(
                update(PhoneJob)
                .where(PhoneJob.job_id == job_id, PhoneJob.status.in_(_OPEN_JOB))
                .values(status=PhoneJobStatus.FAILED.value, error_code=error_code, finished_at=func.now())
            )
            if owns_claim and claim is not None and claim.status in _OPEN_CLAIM:
                claim.status = CodeClaimStatus.FAILED.value
                claim.error_code = error_code
            closed[error_code] += 1
    with sessions.begin() as session:
        logins = session.execute(
            update(LoginJob)
            .where(
                LoginJob.job_id.in_(
                    select(LoginJob.job_id)
                    .where(LoginJob.status.in_(_OPEN_JOB), LoginJob.code_expires_at < cutoff)
                    .order_by(LoginJob.code_expires_at)
                    .limit(SWEEP_BATCH_SIZE)
                    .with_for_update(skip_locked=True)
                )
            )
            .values(
                status=PhoneJobStatus.FAILED.value,
                error_code=case(
                    (LoginJob.status == PhoneJobStatus.RUNNING.value, "worker_lost"), else_="code_expired"
                ),
                finished_at=func.now(),
            )
            .returning(LoginJob.error_code)
        ).scalars()
        for login_error_code in logins:
            closed[f"login_{login_error_code}"] += 1
    if closed:
        log.warning("closed stuck jobs: %s", dict(closed))
    return dict(closed)
