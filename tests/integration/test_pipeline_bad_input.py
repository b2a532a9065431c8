"""Any input sent by name from a plain Celery client: rejected before WeChat, and the worker lives on."""

from __future__ import annotations

from typing import Any

import pytest

from tests.support.pipeline import BROKERS, Pipeline, endpoint_counts, phone_job_row

APPID = "wxpipeline000001"
RESOLVE_PHONE = "wxphone.resolve_phone"
GOOD_CODE = "A" * 32


def good(**changes: Any) -> dict[str, Any]:
    return {"appid": APPID, "openid": "oBadInput0001", "code": GOOD_CODE, **changes}


#: (what, kwargs sent, error_code the job must end with)
BAD_KWARGS: list[tuple[str, dict[str, Any], str]] = [
    ("unknown appid", good(appid="wxunknown0000001"), "app_not_configured"),
    ("malformed appid", good(appid="wx app/../1"), "invalid_input"),
    ("appid None", good(appid=None), "invalid_input"),
    ("empty code", good(code=""), "invalid_input"),
    ("10 KB code", good(code="x" * 10_240), "invalid_input"),
    ("code with a newline", good(code="abc\ndef"), "invalid_input"),
    ("code with NUL", good(code="abc\x00def"), "invalid_input"),
    ("non-ASCII code", good(code="验证码" * 11), "invalid_input"),
    ("code is an int", good(code=123456), "invalid_input"),
    ("code is a list", good(code=[GOOD_CODE]), "invalid_input"),
    ("openid None", good(openid=None), "invalid_input"),
    ("empty openid", good(openid=""), "invalid_input"),
    ("1000-character openid", good(openid="o" * 1000), "invalid_input"),
    ("openid with NUL", good(openid="oBad\x00"), "invalid_input"),
    ("openid with a lone surrogate", good(openid="o\ud800"), "invalid_input"),
    ("code is True", good(code=True), "invalid_input"),
    ("openid is a dict", good(openid={"openid": "oBadInput0001"}), "invalid_input"),
    ("no kwargs at all", {}, "invalid_input"),
    ("misspelt kwarg", {"appid": APPID, "open_id": "oBadInput0001", "code": GOOD_CODE}, "invalid_input"),
]


@pytest.mark.parametrize("broker", BROKERS)
def test_bad_input_fails_before_wechat_and_a_good_job_succeeds_right_after(pipeline: Pipeline) -> None:
    process = pipeline.start_worker(concurrency=2)
    sent: dict[str, tuple[str, str]] = {}
    for what, kwargs, error_code in BAD_KWARGS:
        sent[pipeline.send_by_name(RESOLVE_PHONE, **kwargs)] = (what, error_code)
    # Positional arguments are not part of the interface, even with valid values.
    positional = pipeline.celery.send_task(
        RESOLVE_PHONE, args=[APPID, "oBadInput0001", GOOD_CODE], queue="wxphone"
    )
    sent[str(positional.id)] = ("positional args", "invalid_input")

    for task_id, (what, error_code) in sent.items():
        job = pipeline.wait_for_job(task_id, timeout_seconds=30)
        assert (job.job_id, job.status, job.error_code, job.attempts) == (task_id, "failed", error_code, 1), (
            what
        )
        assert job.finished_at is not None, what
        result = pipeline.celery.AsyncResult(task_id).get(timeout=30)
        assert result == {"job_id": task_id, "status": "failed", "error_code": error_code}, what
    # Nothing reached WeChat: no phone call, not even a token fetch.
    assert endpoint_counts(pipeline.sandbox, "phone").calls == 0
    assert endpoint_counts(pipeline.sandbox, "stable_token").calls == 0
    assert pipeline.count("SELECT count(*) FROM code_claims") == 0
    assert pipeline.count("SELECT count(*) FROM users") == 0
    # Junk is not copied into identifier columns.
    long_openid = next(task for task, (what, _) in sent.items() if what == "1000-character openid")
    long_openid_row = phone_job_row(pipeline, long_openid)
    assert long_openid_row is not None and long_openid_row["openid"] == ""

    # The same worker processes a good job sent by name right after.
    number = "13600004444"
    code = pipeline.sandbox.mint_phone_code(APPID, phone_number=number, pure_phone_number=number)
    task_id = pipeline.send_by_name(RESOLVE_PHONE, appid=APPID, openid="oGoodByName01", code=code)
    result = pipeline.celery.AsyncResult(task_id).get(timeout=30)

    assert result == {"job_id": task_id, "status": "succeeded", "error_code": None}
    assert number not in repr(result)
    good_job = pipeline.producer.get_job(task_id)
    assert good_job is not None and (good_job.status, good_job.attempts) == ("succeeded", 1)
    user = pipeline.producer.get_user(appid=APPID, openid="oGoodByName01")
    assert user is not None and user.phone_number == number
    assert endpoint_counts(pipeline.sandbox, "phone").calls == 1

    # Unknown extra kwargs are ignored (a newer front end may send more): the three known ones decide.
    extra_code = pipeline.sandbox.mint_phone_code(APPID)
    extra_id = pipeline.send_by_name(
        RESOLVE_PHONE, appid=APPID, openid="oExtraKwargs01", code=extra_code, lang="zh_CN", trace="x" * 200
    )
    extra = pipeline.wait_for_job(extra_id, timeout_seconds=30)
    assert (extra.status, extra.error_code, extra.attempts) == ("succeeded", None, 1)
    assert endpoint_counts(pipeline.sandbox, "phone").calls == 2
    assert process.is_running()
    assert code not in process.output() and number not in process.output()
