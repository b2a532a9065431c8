"""One WeChat exchange per phone code: repeated submissions and redelivered tasks make no second call."""

from __future__ import annotations

from sqlalchemy import text

from tests.support.pipeline import Pipeline, endpoint_counts, phone_job_row, user_row

APPID = "wxpipeline000001"
RESOLVE_PHONE = "wxphone.resolve_phone"


def code_claims(pipeline: Pipeline) -> list[tuple[str, str, str | None]]:
    with pipeline.engine.connect() as conn:
        rows = conn.execute(text("SELECT job_id, status, error_code FROM code_claims ORDER BY created_at"))
        return [(row.job_id, row.status, row.error_code) for row in rows]


def test_repeated_submissions_of_one_code_share_the_first_exchange(pipeline: Pipeline) -> None:
    # Slow replies keep the first exchange in flight while the repeats are picked up.
    pipeline.sandbox.configure(latency_ms={"phone": 1000})
    process = pipeline.start_worker(concurrency=2)
    number = "13912345678"
    code = pipeline.sandbox.mint_phone_code(APPID, phone_number=number, pure_phone_number=number)

    job_ids = [pipeline.submit(APPID, "oDuplicate001", code) for _ in range(3)]
    jobs = pipeline.wait_for_jobs(job_ids, timeout_seconds=30)

    assert [(job.status, job.error_code) for job in jobs] == [("succeeded", None)] * 3
    # The repeats ran while the exchange was in flight: they waited for it and looked again,
    # and waiting is not an attempt at WeChat.
    assert any(f"[{job_id}] retry:" in process.output() for job_id in job_ids)
    assert [job.attempts for job in jobs] == [1, 1, 1]
    phone = endpoint_counts(pipeline.sandbox, "phone")
    assert (phone.calls, phone.errcodes) == (1, {"0": 1})
    assert pipeline.sandbox.stats()["codes_exchanged"] == 1
    # Exactly one submission owns the exchange; the others point at it.
    [(owner, claim_status, claim_error)] = code_claims(pipeline)
    assert (claim_status, claim_error) == ("succeeded", None)
    assert owner in job_ids
    assert {job.job_id: job.canonical_job_id for job in jobs} == {
        job_id: (None if job_id == owner else owner) for job_id in job_ids
    }
    user = pipeline.producer.get_user(appid=APPID, openid="oDuplicate001")
    assert user is not None
    assert (user.phone_number, user.pure_phone_number, user.country_code) == (number, number, "86")
    assert pipeline.count("SELECT count(*) FROM users") == 1

    # The same code replayed under another openid fails code_reused and gives that openid
    # nothing: a code belongs to the user who tapped the button.
    replay = pipeline.wait_for_job(pipeline.submit(APPID, "oSomeoneElse01", code), timeout_seconds=30)
    assert (replay.status, replay.error_code, replay.canonical_job_id) == ("failed", "code_reused", owner)
    assert user_row(pipeline, APPID, "oSomeoneElse01") is None
    assert endpoint_counts(pipeline.sandbox, "phone").calls == 1

    # A repeat of a code whose first exchange failed ends with the same failure, no new call.
    unknown_code = "never-minted-code-0000000000000001"
    first = pipeline.wait_for_job(pipeline.submit(APPID, "oDuplicate002", unknown_code), timeout_seconds=30)
    assert (first.status, first.error_code, first.attempts) == ("failed", "invalid_code", 1)
    repeat = pipeline.wait_for_job(pipeline.submit(APPID, "oDuplicate002", unknown_code), timeout_seconds=30)
    assert (repeat.status, repeat.error_code, repeat.canonical_job_id) == (
        "failed",
        "invalid_code",
        first.job_id,
    )
    phone = endpoint_counts(pipeline.sandbox, "phone")
    assert (phone.calls, phone.errcodes) == (2, {"0": 1, "40029": 1})
    assert user_row(pipeline, APPID, "oDuplicate002") is None
    assert code not in process.output() and number not in process.output()


def test_a_redelivered_task_with_a_known_outcome_makes_no_second_call(pipeline: Pipeline) -> None:
    pipeline.start_worker(concurrency=2)
    code = pipeline.sandbox.mint_phone_code(APPID, pure_phone_number="13700000001")
    kwargs = {"appid": APPID, "openid": "oRedelivered01", "code": code}
    job_id = pipeline.submit(**kwargs)
    assert pipeline.wait_for_job(job_id, timeout_seconds=30).status == "succeeded"
    result = pipeline.celery.AsyncResult(job_id)
    assert result.get(timeout=30) == {"job_id": job_id, "status": "succeeded", "error_code": None}
    before = phone_job_row(pipeline, job_id)
    result.forget()

    # The broker hands the same message out again (visibility timeout, a lost ack).
    pipeline.celery.send_task(RESOLVE_PHONE, kwargs=kwargs, task_id=job_id, queue="wxphone")
    again = pipeline.celery.AsyncResult(job_id).get(timeout=30)

    assert again == {"job_id": job_id, "status": "succeeded", "error_code": None}
    assert phone_job_row(pipeline, job_id) == before
    phone = endpoint_counts(pipeline.sandbox, "phone")
    assert (phone.calls, phone.errcodes) == (1, {"0": 1})

    # Same for a job that failed: its stored failure is returned, WeChat is not asked again.
    failed_kwargs = {"appid": APPID, "openid": "oRedelivered02", "code": "never-minted-code-redelivery"}
    failed_id = pipeline.submit(**failed_kwargs)
    assert pipeline.wait_for_job(failed_id, timeout_seconds=30).error_code == "invalid_code"
    failed_before = phone_job_row(pipeline, failed_id)
    pipeline.celery.AsyncResult(failed_id).forget()
    pipeline.celery.send_task(RESOLVE_PHONE, kwargs=failed_kwargs, task_id=failed_id, queue="wxphone")
    assert pipeline.celery.AsyncResult(failed_id).get(timeout=30) == {
        "job_id": failed_id,
        "status": "failed",
        "error_code": "invalid_code",
    }
    assert phone_job_row(pipeline, failed_id) == failed_before
    assert endpoint_counts(pipeline.sandbox, "phone").calls == 2
