"""The stuck-job sweep closes jobs that can no longer finish, with an error that tells the truth."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import timedelta

import pytest
from sqlalchemy import text
from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.orm import Session, sessionmaker

from models import CodeClaim, LoginJob, PhoneJob
from worker.db import make_engine, session_factory
from worker.jobs.phone import utc_now
from worker.jobs.sweep import sweep_stuck_jobs

STALE_SECONDS = 135.0


@pytest.fixture
def sessions(migrated_database_url: str) -> Iterator[sessionmaker[Session]]:
    engine = make_engine(migrated_database_url)
    with engine.begin() as conn:
        conn.execute(text("TRUNCATE users, phone_jobs, login_jobs, code_claims, key_checks"))
    yield session_factory(engine)
    engine.dispose()


def add_job(
    sessions: sessionmaker[Session],
    job_id: str,
    status: str,
    *,
    expired_seconds_ago: float,
    claim: str | None,
) -> None:
    now = utc_now()
    with sessions.begin() as session:
        session.execute(
            insert(PhoneJob).values(
                job_id=job_id,
                appid="wxsweep000000001",
                openid="oSweep",
                code_fingerprint=f"fp-{job_id}",
                status=status,
                created_at=now - timedelta(seconds=expired_seconds_ago + 300),
                code_expires_at=now - timedelta(seconds=expired_seconds_ago),
            )
        )
        if claim is not None:
            session.execute(
                insert(CodeClaim).values(
                    appid="wxsweep000000001", code_fingerprint=f"fp-{job_id}", job_id=job_id, status=claim
                )
            )


def job_state(sessions: sessionmaker[Session], job_id: str) -> tuple[str, str | None]:
    with sessions() as session:
        job = session.get(PhoneJob, job_id)
        assert job is not None
        return job.status, job.error_code


def test_sweep_closes_only_jobs_past_their_code_life_and_names_the_truth(
    sessions: sessionmaker[Session],
) -> None:
    long_ago = STALE_SECONDS + 60
    add_job(sessions, "lost-mid-exchange", "running", expired_seconds_ago=long_ago, claim="exchanging")
    add_job(sessions, "never-sent", "retrying", expired_seconds_ago=long_ago, claim="pending")
    add_job(sessions, "message-lost", "queued", expired_seconds_ago=long_ago, claim=None)
    add_job(sessions, "still-may-run", "running", expired_seconds_ago=STALE_SECONDS - 60, claim="exchanging")
    add_job(sessions, "done", "succeeded", expired_seconds_ago=long_ago, claim="succeeded")

    closed = sweep_stuck_jobs(sessions=sessions, stale_claim_seconds=STALE_SECONDS)

    assert closed == {"worker_lost": 1, "code_expired": 2}
    assert job_state(sessions, "lost-mid-exchange") == ("failed", "worker_lost")
    assert job_state(sessions, "never-sent") == ("failed", "code_expired")
    assert job_state(sessions, "message-lost") == ("failed", "code_expired")
    assert job_state(sessions, "still-may-run") == ("running", None)
    assert job_state(sessions, "done") == ("succeeded", None)
    with sessions() as session:
        rows = session.execute(text("SELECT job_id, status FROM code_claims")).all()
    claims: dict[str, str] = {str(job_id): str(status) for job_id, status in rows}
    assert claims["lost-mid-exchange"] == "failed"
    assert claims["never-sent"] == "failed"
    assert claims["still-may-run"] == "exchanging"
    # A second sweep finds nothing more to do.
    assert sweep_stuck_jobs(sessions=sessions, stale_claim_seconds=STALE_SECONDS) == {}


def test_sweep_closes_login_jobs_past_their_code_life(sessions: sessionmaker[Session]) -> None:
    now = utc_now()
    long_ago, recently = STALE_SECONDS + 60, STALE_SECONDS - 60
    rows = [
        ("login-lost", "running", long_ago),
        ("login-never-ran", "queued", long_ago),
        ("login-may-run", "retrying", recently),
        ("login-done", "succeeded", long_ago),
    ]
    with sessions.begin() as session:
        for job_id, status, expired_seconds_ago in rows:
            session.add(
                LoginJob(
                    job_id=job_id,
                    appid="wxsweep000000001",
                    status=status,
                    created_at=now - timedelta(seconds=expired_seconds_ago + 300),
                    code_expires_at=now - timedelta(seconds=expired_seconds_ago),
                )
            )

    closed = sweep_stuck_jobs(sessions=sessions, stale_claim_seconds=STALE_SECONDS)

    assert closed == {"login_worker_lost": 1, "login_code_expired": 1}
    with sessions() as session:
        states = {job.job_id: (job.status, job.error_code) for job in session.query(LoginJob)}
    assert states == {
        "login-lost": ("failed", "worker_lost"),
        "login-never-ran": ("failed", "code_expired"),
        "login-may-run": ("retrying", None),
        "login-done": ("succeeded", None),
    }
    assert sweep_stuck_jobs(sessions=sessions, stale_claim_seconds=STALE_SECONDS) == {}
