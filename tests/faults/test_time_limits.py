"""A soft time limit that strikes once WeChat has answered does not cost the number.

The prefork pool raises Celery's ``SoftTimeLimitExceeded`` inside the task when the soft limit
passes. Once the number is in hand the code is spent, so only the number's write may end the run:
the write goes on (the hard limit still bounds the run) and the job succeeds.
"""

from __future__ import annotations

import threading

import pytest
from sqlalchemy import text

from tests.support.pipeline import APPS, Pipeline, endpoint_counts, user_row
from tests.support.waiting import wait_for

pytestmark = pytest.mark.faults

APP_A = sorted(APPS)[0]
#: Short limits: the write is held past the soft limit, well within the hard one.
LIMITS = {
    "http_connect_timeout_seconds": 0.5,
    "http_read_timeout_seconds": 1,
    "token_wait_seconds": 1,
    "task_soft_time_limit_seconds": 3,
    "task_time_limit_seconds": 30,
    "runner_lease_seconds": 20,
}


def test_a_soft_time_limit_during_the_final_write_does_not_lose_the_number(pipeline: Pipeline) -> None:
    pipeline.settings.update(LIMITS)
    process = pipeline.start_worker("limited", concurrency=1, pool="prefork")
    openid = "oSoftLimit0001"
    number = "13677778888"
    code = pipeline.sandbox.mint_phone_code(APP_A, phone_number=number, pure_phone_number=number)
    # The user's row exists and the test holds a lock on it: the final write waits for the lock
    # until the soft limit has struck.
    with pipeline.engine.begin() as conn:
        conn.execute(text("INSERT INTO users (appid, openid) VALUES (:a, :o)"), {"a": APP_A, "o": openid})
    release = threading.Event()
    locked = threading.Event()

    def hold_the_row() -> None:
        with pipeline.engine.begin() as conn:
            conn.execute(
                text("SELECT 1 FROM users WHERE appid = :a AND openid = :o FOR UPDATE"),
                {"a": APP_A, "o": openid},
            )
            locked.set()
            release.wait(timeout=60)

    holder = threading.Thread(target=hold_the_row)
    holder.start()
    try:
        assert locked.wait(timeout=10)
        job_id = pipeline.submit(APP_A, openid, code)
        process.wait_for_output("Soft time limit (3.0s) exceeded", timeout_seconds=30)
        # The pool child has met the limit once it says so, or once it has closed the job.
        wait_for(
            lambda: (
                "time limit reached with a number in hand" in process.output()
                or pipeline.count("SELECT count(*) FROM phone_jobs WHERE finished_at IS NOT NULL") > 0
            ),
            timeout_seconds=10,
            what="the pool child to meet the soft limit",
        )
    finally:
        release.set()
        holder.join(timeout=10)

    job = pipeline.wait_for_job(job_id, timeout_seconds=40)
    assert (job.status, job.error_code, job.attempts) == ("succeeded", None, 1)
    user = pipeline.producer.get_user(appid=APP_A, openid=openid)
    assert user is not None and user.pure_phone_number == number
    assert endpoint_counts(pipeline.sandbox, "phone").calls == 1
    assert pipeline.sandbox.stats()["code_presentations"] == {"1": 1}
    # One audit row for the one call, however often the write was sent.
    assert pipeline.count("SELECT count(*) FROM exchange_audit WHERE job_id = :j", j=job_id) == 1
    assert user_row(pipeline, APP_A, openid) is not None
    assert number not in process.output()
