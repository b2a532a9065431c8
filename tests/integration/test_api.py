"""``wxphone api`` as a real process, over real HTTP, with real workers, PostgreSQL, Redis and the
WeChat sandbox: login and phone flows, waits, sessions, ownership, rate limits, bad input."""

from __future__ import annotations

import json
import re
import time
from typing import Any

import pytest
import redis

from tests.support.api import (
    API_SESSION_KEY,
    RunningApi,
    bearer,
    empty_login_jobs,
    job_counts,
    log_in,
    start_api,
)
from tests.support.pipeline import Pipeline
from worker.api.sessions import SessionSigner

APPID = "wxpipeline000001"
OTHER_APPID = "wxpipeline000002"
#: A phone code's longest wait in these tests: the pipeline answers in milliseconds.
WAIT_SECONDS = 10


@pytest.fixture
def api_pipeline(pipeline: Pipeline) -> Pipeline:
    """The pipeline with one worker running and no login job recorded."""
    empty_login_jobs(pipeline)
    pipeline.start_worker()
    return pipeline


def phone_code(pipeline: Pipeline, number: str, appid: str = APPID) -> str:
    return pipeline.sandbox.mint_phone_code(appid, phone_number=number, pure_phone_number=number)


def test_login_then_phone_answers_the_owners_masked_number(api_pipeline: Pipeline) -> None:
    pipeline = api_pipeline
    api = start_api(pipeline)
    openid, unionid = "oApiUser000001", "uApiUnion000001"
    js_code, _ = pipeline.sandbox.mint_login_code(APPID, openid=openid, unionid=unionid)
    with api.client() as client:
        login = client.post("/v1/login", json={"appid": APPID, "js_code": js_code})
        assert login.status_code == 200, login.text
        body = login.json()
        assert set(body) == {"session", "openid", "unionid", "expires_in_seconds"}
        assert (body["openid"], body["unionid"], body["expires_in_seconds"]) == (openid, unionid, 7200)
        assert "session_key" not in login.text

        number = "13812345678"
        code = phone_code(pipeline, number)
        reply = client.post(
            "/v1/phone", json={"code": code, "wait_seconds": WAIT_SECONDS}, headers=bearer(body["session"])
        )
        assert reply.status_code == 200, reply.text
        answer = reply.json()
        assert answer == {
            "job_id": answer["job_id"],
            "status": "succeeded",
            "phone": {"masked": "138****5678", "country_code": "86"},
        }
        assert number not in reply.text and code not in reply.text

    # The job belongs to the session's user: the openid came from the session, not the body.
    job = pipeline.producer.get_job(answer["job_id"])
    assert job is not None
    assert (job.kind, job.appid, job.openid, job.status) == ("phone", APPID, openid, "succeeded")
    user = pipeline.producer.get_user(appid=APPID, openid=openid)
    assert user is not None and user.pure_phone_number == number
