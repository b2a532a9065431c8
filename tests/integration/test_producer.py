"""The front-end API (worker.producer) against real PostgreSQL and Redis, without a worker."""

from __future__ import annotations

import json
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
import redis
from celery import Celery
from sqlalchemy import text

from tests.support.pipeline import Pipeline, phone_job_row
from tests.support.services import free_port
from worker.jobs.validation import InvalidInputError
from worker.producer import Producer, PublishError, UserView

APPID = "wxpipeline000001"
GOOD_CODE = "0a1B2c3D4e5F6g7H8i9J0k1L2m3N4o5P"


def queued_messages(pipeline: Pipeline) -> list[dict[str, Any]]:
    with redis.Redis.from_url(pipeline.broker_url) as client:
        return [json.loads(raw) for raw in client.lrange("wxphone", 0, -1)]


@pytest.mark.parametrize(
    ("what", "kwargs"),
    [
        ("empty code", {"code": ""}),
        ("oversized code", {"code": "x" * 129}),
        ("code with a newline", {"code": GOOD_CODE + "\n"}),
        ("code with a space", {"code": "abc def"}),
        ("non-ASCII code", {"code": "验证码验证码"}),
        ("empty openid", {"openid": ""}),
        ("oversized openid", {"openid": "o" * 65}),
        ("openid with a NUL", {"openid": "oUser\x00"}),
        ("malformed appid", {"appid": "wx app"}),
        ("empty appid", {"appid": ""}),
    ],
)
def test_malformed_input_is_refused_and_nothing_is_recorded_or_queued(
    pipeline: Pipeline, what: str, kwargs: dict[str, Any]
) -> None:
    arguments = {"appid": APPID, "openid": "oProducer0001", "code": GOOD_CODE, **kwargs}
    with pytest.raises(InvalidInputError) as raised:
        pipeline.producer.submit_phone_code(**arguments)
    assert raised.value.error_code == "invalid_input"
    if arguments["code"]:
        assert arguments["code"] not in str(raised.value), what
    assert pipeline.count("SELECT count(*) FROM phone_jobs") == 0
    assert queued_messages(pipeline) == []


def test_a_submission_is_recorded_then_queued_by_task_name(pipeline: Pipeline) -> None:
    before = datetime.now(UTC)
    job_id = pipeline.producer.submit_phone_code(appid=APPID, openid="oProducer0001", code=GOOD_CODE)

    assert str(uuid.UUID(job_id)) == job_id
    job = pipeline.producer.get_job(job_id)
    assert job is not None
    assert (job.appid, job.openid, job.status, job.error_code, job.attempts) == (
        APPID,
        "oProducer0001",
        "queued",
        None,
        0,
    )
    assert (job.finished_at, job.canonical_job_id) == (None, None)
    assert before <= job.created_at <= datetime.now(UTC)
    assert set(job.as_dict()) == {
        "job_id",
        "kind",
        "appid",
        "openid",
        "status",
        "error_code",
        "attempts",
        "created_at",
        "finished_at",
    }
    row = phone_job_row(pipeline, job_id)
    assert row is not None
    # The code's life is counted from submission, and the code itself is never stored.
    assert row["code_expires_at"] - row["created_at"] == timedelta(seconds=300)
    assert GOOD_CODE not in json.dumps(row, default=str)
    [message] = queued_messages(pipeline)
    assert (message["headers"]["task"], message["headers"]["id"]) == ("wxphone.resolve_phone", job_id)

    # Front ends hold no app configuration: a well-formed unknown appid is the worker's to reject.
    other = pipeline.producer.submit_phone_code(
        appid="wxunknown0000001", openid="oProducer0001", code=GOOD_CODE
    )
    assert pipeline.producer.get_job(other) is not None
    assert len(queued_messages(pipeline)) == 2


def test_unknown_ids_read_as_none_and_a_user_view_hides_the_number_from_its_repr(pipeline: Pipeline) -> None:
    assert pipeline.producer.get_job(str(uuid.uuid4())) is None
    assert pipeline.producer.get_job("not-a-uuid") is None
    assert pipeline.producer.get_user(appid=APPID, openid="oNobody000001") is None

    verified_at = datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)
    user = UserView(
        appid=APPID,
        openid="oProducer0002",
        unionid="uUnion",
        phone_number="13800138000",
        pure_phone_number="13800138000",
        country_code="86",
        phone_verified_at=verified_at,
    )
    assert user.masked_phone_number == "138****8000"
    assert "13800138000" not in repr(user) and "13800138000" not in str(user)
    assert user.as_dict() == {
        "appid": APPID,
        "openid": "oProducer0002",
        "unionid": "uUnion",
        "phone_number": "13800138000",
        "pure_phone_number": "13800138000",
        "country_code": "86",
        "phone_verified_at": "2026-01-02T03:04:05+00:00",
    }


@pytest.mark.parametrize(
    "unreachable_url", ["redis://127.0.0.1:{port}/0", "amqp://guest:guest@127.0.0.1:{port}//"]
)
def test_a_job_the_broker_cannot_take_is_marked_failed(pipeline: Pipeline, unreachable_url: str) -> None:
    # A broker nobody listens on (no result backend: the publish itself must fail).
    unreachable = Celery("frontend", broker=unreachable_url.format(port=free_port()))
    producer = Producer(
        sessions=pipeline.sessions,
        celery_app=unreachable,
        protection=pipeline.producer.protection,
    )
    try:
        with pytest.raises(PublishError) as raised:
            producer.submit_phone_code(appid=APPID, openid="oProducer0003", code=GOOD_CODE)
    finally:
        unreachable.close()
    assert GOOD_CODE not in str(raised.value)
    with pipeline.engine.connect() as conn:
        [job_id] = conn.execute(text("SELECT job_id FROM phone_jobs")).scalars().all()
    assert job_id in str(raised.value)
    job = pipeline.producer.get_job(job_id)
    assert job is not None
    assert (job.status, job.error_code) == ("failed", "enqueue_failed")
    assert job.finished_at is not None


def test_ids_no_job_or_user_can_have_read_as_none(pipeline: Pipeline) -> None:
    # Front ends pass ids from URLs and requests straight through; %00 decodes to a NUL.
    assert pipeline.producer.get_job("job\x00id") is None
    assert pipeline.producer.get_user(appid=APPID, openid="oUser\x00") is None
    assert pipeline.producer.find_users_by_phone(appid="wx\x00", phone_number="13800138000") == []
