"""A revoked access token mid-run: one compare-and-delete refresh for the fleet, no failed job."""

from __future__ import annotations

import pytest

from tests.support.pipeline import BROKERS, Pipeline, endpoint_counts

APPID = "wxpipeline000001"


def submit_batch(pipeline: Pipeline, prefix: str, count: int) -> list[str]:
    codes = pipeline.sandbox.mint_phone_codes(APPID, count)
    return [pipeline.submit(APPID, f"o{prefix}{index:05d}", code) for index, code in enumerate(codes)]


@pytest.mark.parametrize("broker", BROKERS)
def test_a_token_revoked_mid_run_is_refreshed_once_and_every_job_succeeds(pipeline: Pipeline) -> None:
    pipeline.start_worker(concurrency=2)
    before_revoke = pipeline.wait_for_jobs(submit_batch(pipeline, "Before", 4), timeout_seconds=30)
    assert {(job.status, job.attempts) for job in before_revoke} == {("succeeded", 1)}
    # Both worker processes started cold: one token fetch served them.
    assert endpoint_counts(pipeline.sandbox, "stable_token").tokens_issued == 1

    assert pipeline.sandbox.revoke_tokens(APPID) == 1
    after_revoke = pipeline.wait_for_jobs(submit_batch(pipeline, "After", 6), timeout_seconds=30)

    assert {(job.status, job.error_code, job.attempts) for job in after_revoke} == {("succeeded", None, 1)}
    assert endpoint_counts(pipeline.sandbox, "stable_token").tokens_issued == 2
    phone = endpoint_counts(pipeline.sandbox, "phone")
    rejected = phone.errcodes.get("40001", 0)
    # Each worker process in flight may present the revoked token once, and only once.
    assert 1 <= rejected <= 2
    assert phone.errcodes == {"0": 10, "40001": rejected}
    assert phone.calls == 10 + rejected
    assert pipeline.count("SELECT count(*) FROM users WHERE phone_verified_at IS NOT NULL") == 10
