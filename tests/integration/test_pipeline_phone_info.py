"""What WeChat's phone_info turns into: country codes as strings, numbers verbatim, the watermark check."""

from __future__ import annotations

from tests.support.pipeline import Pipeline, endpoint_counts, user_row

APPID = "wxpipeline000001"
OTHER_APPID = "wxotherapp000001"


def test_phone_info_is_stored_verbatim_with_a_string_country_code(pipeline: Pipeline) -> None:
    process = pipeline.start_worker()
    numeric = pipeline.sandbox.mint_phone_code(
        APPID, phone_number="13800001111", pure_phone_number="13800001111", country_code_as_number=True
    )
    hong_kong = pipeline.sandbox.mint_phone_code(
        APPID, phone_number="+85291234567", pure_phone_number="91234567", country_code="852"
    )
    numeric_id = pipeline.submit(APPID, "oNumericCC001", numeric)
    hong_kong_id = pipeline.submit(APPID, "oHongKong0001", hong_kong)

    for job_id in (numeric_id, hong_kong_id):
        job = pipeline.wait_for_job(job_id, timeout_seconds=30)
        assert (job.status, job.error_code, job.attempts) == ("succeeded", None, 1)
    numeric_user = pipeline.producer.get_user(appid=APPID, openid="oNumericCC001")
    hong_kong_user = pipeline.producer.get_user(appid=APPID, openid="oHongKong0001")
    assert numeric_user is not None and hong_kong_user is not None
    assert (
        numeric_user.phone_number,
        numeric_user.pure_phone_number,
        numeric_user.country_code,
    ) == (
        "13800001111",
        "13800001111",
        "86",
    )
    assert (
        hong_kong_user.phone_number,
        hong_kong_user.pure_phone_number,
        hong_kong_user.country_code,
    ) == ("+85291234567", "91234567", "852")
    assert numeric_user.phone_verified_at is not None
    assert hong_kong_user.phone_verified_at is not None
    # Stored as text whatever type WeChat sent.
    assert pipeline.count("SELECT count(*) FROM users WHERE country_code = '86'") == 1
    output = process.output()
    assert "13800001111" not in output and "+85291234567" not in output and "91234567" not in output


def test_a_watermark_naming_another_app_fails_and_writes_nothing_to_the_user(pipeline: Pipeline) -> None:
    process = pipeline.start_worker()
    # A user with a verified number, then a code whose phone_info claims to come from another app.
    verified = pipeline.sandbox.mint_phone_code(
        APPID, phone_number="13900002222", pure_phone_number="13900002222"
    )
    assert pipeline.wait_for_job(pipeline.submit(APPID, "oWatermark001", verified)).status == "succeeded"
    before = user_row(pipeline, APPID, "oWatermark001")
    verified_user = pipeline.producer.get_user(appid=APPID, openid="oWatermark001")
    assert verified_user is not None and verified_user.phone_number == "13900002222"

    foreign = pipeline.sandbox.mint_phone_code(
        APPID, phone_number="13900003333", pure_phone_number="13900003333", watermark_appid=OTHER_APPID
    )
    foreign_new_user = pipeline.sandbox.mint_phone_code(APPID, watermark_appid=OTHER_APPID)
    mismatch_ids = [
        pipeline.submit(APPID, "oWatermark001", foreign),
        pipeline.submit(APPID, "oWatermark002", foreign_new_user),
    ]

    for job_id in mismatch_ids:
        job = pipeline.wait_for_job(job_id, timeout_seconds=30)
        assert (job.status, job.error_code, job.attempts) == ("failed", "watermark_mismatch", 1)
    # Not a single column of the existing user changed; no user was created for the other.
    assert user_row(pipeline, APPID, "oWatermark001") == before
    assert pipeline.producer.get_user(appid=APPID, openid="oWatermark001") == verified_user
    assert user_row(pipeline, APPID, "oWatermark002") is None
    phone = endpoint_counts(pipeline.sandbox, "phone")
    assert (phone.calls, phone.errcodes) == (3, {"0": 3})
    lines = [
        line
        for line in process.output().splitlines()
        if " ERROR " in line and "watermark names another app" in line
    ]
    assert len(lines) == 2
