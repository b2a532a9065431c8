"""How resolve_phone reacts to each kind of WeChat failure, counted at the sandbox and in PostgreSQL."""

from __future__ import annotations

import re
import time
from datetime import timedelta
from typing import Any

import pytest

from tests.support.pipeline import (
    BROKERS,
    FAST_RETRY_SETTINGS,
    Pipeline,
    endpoint_counts,
    phone_job_row,
    producer_with_policy,
    user_row,
)

APPID = "wxpipeline000001"
OTHER_APPID = "wxpipeline000002"


def error_lines(output: str, pattern: str) -> list[str]:
    return [line for line in output.splitlines() if " ERROR " in line and re.search(pattern, line)]


def test_an_invalid_code_fails_at_once_without_retry(pipeline: Pipeline) -> None:
    pipeline.settings.update(FAST_RETRY_SETTINGS)
    pipeline.start_worker()
    never_minted = pipeline.submit(APPID, "oInvalid00001", "never-minted-code-000000000000001")
    expired_at_wechat = pipeline.submit(
        APPID, "oInvalid00002", pipeline.sandbox.mint_phone_code(APPID, lifetime_seconds=0)
    )

    for job_id in (never_minted, expired_at_wechat):
        job = pipeline.wait_for_job(job_id, timeout_seconds=30)
        assert (job.status, job.error_code, job.attempts) == ("failed", "invalid_code", 1)
        row = phone_job_row(pipeline, job_id)
        assert row is not None and row["last_rid"]  # WeChat's rid is kept for a support request
    phone = endpoint_counts(pipeline.sandbox, "phone")
    assert (phone.calls, phone.errcodes) == (2, {"40029": 2})
    assert pipeline.count("SELECT count(*) FROM users") == 0


@pytest.mark.parametrize("broker", BROKERS)
def test_transient_failures_are_retried_until_the_exchange_succeeds(pipeline: Pipeline) -> None:
    pipeline.settings.update(FAST_RETRY_SETTINGS)
    pipeline.start_worker()
    faults: dict[str, tuple[dict[str, Any], int]] = {
        "busy twice": ({"errcode": -1, "times": 2}, 3),
        "dropped connection": ({"drop_connection": True, "timing": "before"}, 2),
        "HTTP 502": ({"http_status": 502}, 2),
    }
    calls = 0
    for index, (what, (fault, attempts)) in enumerate(faults.items()):
        pipeline.sandbox.inject_fault("phone", **fault)
        number = f"1370000100{index}"
        code = pipeline.sandbox.mint_phone_code(APPID, phone_number=number, pure_phone_number=number)
        openid = f"oTransient00{index}"

        job = pipeline.wait_for_job(pipeline.submit(APPID, openid, code), timeout_seconds=30)

        assert (job.status, job.error_code, job.attempts) == ("succeeded", None, attempts), what
        calls += attempts
        assert endpoint_counts(pipeline.sandbox, "phone").calls == calls, what
        user = pipeline.producer.get_user(appid=APPID, openid=openid)
        assert user is not None and user.phone_number == number, what
    phone = endpoint_counts(pipeline.sandbox, "phone")
    assert phone.errcodes == {"-1": 2, "0": 3}  # the transport faults carry no errcode
    assert pipeline.sandbox.stats()["codes_exchanged"] == 3

    # A reply lost after WeChat used the code: the retry finds the code spent. This is the one
    # case where a code is presented twice; the job counts it and says why it failed.
    pipeline.sandbox.inject_fault("phone", drop_connection=True, timing="after")
    lost_id = pipeline.submit(APPID, "oTransient009", pipeline.sandbox.mint_phone_code(APPID))
    lost = pipeline.wait_for_job(lost_id, timeout_seconds=30)
    assert (lost.status, lost.error_code, lost.attempts) == ("failed", "reply_lost", 2)
    row = phone_job_row(pipeline, lost_id)
    assert row is not None and row["lost_replies"] == 1
    stats = pipeline.sandbox.stats()
    assert (stats["codes_exchanged"], stats["code_presentations"]) == (4, {"1": 3, "2": 1})
    assert user_row(pipeline, APPID, "oTransient009") is None


def test_a_code_past_its_life_fails_without_wechat_and_retries_stop_before_it_dies(
    pipeline: Pipeline,
) -> None:
    pipeline.settings.update(FAST_RETRY_SETTINGS)
    # Picked up after its life: submitted while no worker runs, with a half-second lifetime.
    late = producer_with_policy(pipeline, code_lifetime_seconds=0.5)
    expired_id = late.submit_phone_code(
        appid=APPID, openid="oExpired00001", code=pipeline.sandbox.mint_phone_code(APPID)
    )
    time.sleep(0.6)
    pipeline.start_worker()

    expired = pipeline.wait_for_job(expired_id, timeout_seconds=30)
    assert (expired.status, expired.error_code, expired.attempts) == ("failed", "code_expired", 1)
    assert endpoint_counts(pipeline.sandbox, "phone").calls == 0
    assert endpoint_counts(pipeline.sandbox, "stable_token").calls == 0

    # WeChat stays busy for longer than the code lives: the job gives up inside the code's life.
    pipeline.sandbox.inject_fault("phone", errcode=-1, times=100)
    short = producer_with_policy(pipeline, code_lifetime_seconds=2.0)
    gave_up_id = short.submit_phone_code(
        appid=APPID, openid="oGaveUp000001", code=pipeline.sandbox.mint_phone_code(APPID)
    )
    gave_up = pipeline.wait_for_job(gave_up_id, timeout_seconds=30)
    pipeline.sandbox.clear_faults()

    # The job gives up when its next backoff would outlive the code. (On a machine so busy that
    # the last retry starts only after the code's life, that retry ends code_expired instead,
    # without calling WeChat.) Either way: no call after the code's life, no endless retries.
    assert gave_up.status == "failed"
    assert gave_up.error_code in {"upstream_unavailable", "code_expired"}
    late_start = gave_up.error_code == "code_expired"
    phone = endpoint_counts(pipeline.sandbox, "phone")
    assert phone.calls == phone.errcodes["-1"] == gave_up.attempts - late_start
    assert 2 <= phone.calls < 10  # several backed-off attempts, ended by the code's life
    row = phone_job_row(pipeline, gave_up_id)
    assert row is not None
    assert row["last_rid"]
    # Closed as soon as the code's life is over, not left retrying behind it.
    assert row["finished_at"] < row["code_expires_at"] + timedelta(seconds=2)
    assert user_row(pipeline, APPID, "oGaveUp000001") is None


def test_configuration_and_quota_errors_fail_and_are_logged_for_an_operator(pipeline: Pipeline) -> None:
    pipeline.settings.update(FAST_RETRY_SETTINGS)
    process = pipeline.start_worker()

    pipeline.sandbox.inject_fault("phone", errcode=40013)
    config = pipeline.wait_for_job(
        pipeline.submit(APPID, "oConfig000001", pipeline.sandbox.mint_phone_code(APPID)), timeout_seconds=30
    )
    pipeline.sandbox.inject_fault("phone", errcode=45009)
    quota = pipeline.wait_for_job(
        pipeline.submit(APPID, "oQuota0000001", pipeline.sandbox.mint_phone_code(APPID)), timeout_seconds=30
    )
    # The AppSecret was rotated at WeChat but not in our configuration: the token fetch fails.
    pipeline.sandbox.register_app(OTHER_APPID, "rotated-secret-not-configured")
    secret = pipeline.wait_for_job(
        pipeline.submit(OTHER_APPID, "oSecret000001", pipeline.sandbox.mint_phone_code(OTHER_APPID)),
        timeout_seconds=30,
    )

    assert (config.status, config.error_code, config.attempts) == ("failed", "wechat_config_error", 1)
    assert (quota.status, quota.error_code, quota.attempts) == ("failed", "quota_exhausted", 1)
    assert (secret.status, secret.error_code, secret.attempts) == ("failed", "wechat_config_error", 1)
    phone = endpoint_counts(pipeline.sandbox, "phone")
    assert (phone.calls, phone.errcodes) == (2, {"40013": 1, "45009": 1})
    tokens = pipeline.sandbox.stats()["apps"][OTHER_APPID]["stable_token"]
    assert (tokens["calls"], tokens["errcodes"], tokens["tokens_issued"]) == (1, {"40125": 1}, 0)
    output = process.output()
    assert error_lines(output, r"\b40013\b")
    assert error_lines(output, r"\b45009\b")
    assert error_lines(output, r"\b40125\b")
    assert "pipeline-secret-2" not in output
    assert pipeline.count("SELECT count(*) FROM users") == 0
