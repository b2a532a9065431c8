"""resolve_phone end to end: producer -> broker -> real worker -> sandbox -> PostgreSQL."""

from __future__ import annotations

import pytest

from tests.support.pipeline import APPS, BROKERS, Pipeline


@pytest.mark.parametrize("broker", BROKERS)
def test_phone_codes_over_two_apps_land_in_user_records(pipeline: Pipeline) -> None:
    pipeline.start_worker(concurrency=2)
    submitted: list[tuple[str, str, str, str]] = []
    for index, appid in enumerate(sorted(APPS) * 3):
        number = f"1390000{index:04d}"
        code = pipeline.sandbox.mint_phone_code(appid, phone_number=number, pure_phone_number=number)
        openid = f"oUser{index:03d}"
        submitted.append((pipeline.submit(appid, openid, code), appid, openid, number))
    for job_id, appid, openid, number in submitted:
        job = pipeline.wait_for_job(job_id)
        assert (job.status, job.error_code, job.attempts) == ("succeeded", None, 1)
        user = pipeline.producer.get_user(appid=appid, openid=openid)
        assert user is not None
        assert (user.phone_number, user.pure_phone_number, user.country_code) == (number, number, "86")
        assert user.phone_verified_at is not None
    assert pipeline.sandbox_endpoint("phone")["calls"] == len(submitted)
    assert pipeline.count("SELECT count(*) FROM users") == len(submitted)
