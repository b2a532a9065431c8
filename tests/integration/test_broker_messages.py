"""Hostile message bodies on the job queue, on both brokers: each is dropped once (never
redelivered in a loop, never run), and the worker goes on with the next good job."""

from __future__ import annotations

import json
from typing import Any

import pytest
from kombu.connection import Connection
from kombu.entity import Queue
from kombu.messaging import Producer as KombuProducer

from tests.support.pipeline import BROKERS, Pipeline, endpoint_counts
from tests.support.waiting import wait_for

APPID = "wxpipeline000001"
JOB_QUEUE = "wxphone"
#: A code inside a hostile body: dropping the message must not log it.
SECRET_CODE = "0c1d2e3f4a5b6c7d8e9f0a1b2c3d4e5f"


def hostile_messages(task_id: str) -> list[tuple[str, bytes | str, str, dict[str, Any]]]:
    """(what, body, content type, headers) of messages no wxphone producer sends."""
    v2_headers = {
        "task": "wxphone.resolve_phone",
        "id": task_id,
        "lang": "py",
        "argsrepr": "",
        "kwargsrepr": "",
    }
    return [
        ("JSON that does not parse", b'{"appid": ', "application/json", v2_headers),
        (
            "a pickle (refused content type)",
            b"\x80\x04\x95\x00",
            "application/x-python-serialize",
            v2_headers,
        ),
        (
            "an unregistered task",
            json.dumps([[APPID, "oHostile02", SECRET_CODE], {}, {}]),
            "application/json",
            {**v2_headers, "task": "os.system"},
        ),
        (
            "no headers at all",
            json.dumps({"task": "wxphone.resolve_phone", "args": [APPID, "oHostile01", SECRET_CODE]}),
            "application/json",
            {},
        ),
        ("binary garbage", bytes(range(256)), "application/octet-stream", v2_headers),
    ]


def queue_depth(broker_url: str) -> int:
    connect: Any = Connection  # kombu is untyped
    declare: Any = Queue
    with connect(broker_url) as connection:
        # Declared as every Celery client declares it (not passive: Redis has no empty queue).
        queue = declare(JOB_QUEUE, channel=connection.channel(), durable=True)
        _, ready, _ = queue.queue_declare()
        return int(ready)


def publish_raw(broker_url: str, body: bytes | str, content_type: str, headers: dict[str, Any]) -> None:
    connect: Any = Connection
    producer: Any = KombuProducer
    declare: Any = Queue
    with connect(broker_url) as connection:
        producer(connection.channel()).publish(
            body,
            routing_key=JOB_QUEUE,
            exchange="",
            content_type=content_type,
            content_encoding="binary" if isinstance(body, bytes) else "utf-8",
            headers=headers,
            declare=[declare(JOB_QUEUE, durable=True)],
            serializer=None,
        )


@pytest.mark.parametrize("broker", BROKERS)
def test_hostile_message_bodies_are_dropped_once_and_the_next_job_succeeds(pipeline: Pipeline) -> None:
    worker = pipeline.start_worker(concurrency=2)
    for what, body, content_type, headers in hostile_messages("hostile-task-0001"):
        publish_raw(pipeline.broker_url, body, content_type, headers)
        try:
            wait_for(lambda: queue_depth(pipeline.broker_url) == 0, timeout_seconds=20, what=f"{what} taken")
        except AssertionError:
            print(worker.output()[-6000:])
            raise

    number = "13700005555"
    code = pipeline.sandbox.mint_phone_code(APPID, phone_number=number, pure_phone_number=number)
    job = pipeline.wait_for_job(pipeline.submit(APPID, "oAfterHostile01", code), timeout_seconds=30)

    assert (job.status, job.attempts) == ("succeeded", 1)
    assert worker.is_running()
    assert endpoint_counts(pipeline.sandbox, "phone").calls == 1  # none of the hostile ones ran
    assert pipeline.producer.get_job("hostile-task-0001") is None
    assert queue_depth(pipeline.broker_url) == 0  # dropped, not requeued
    assert "dropped a message no task can be made of" in worker.output()
    assert "dropped a message for a task this worker does not run" in worker.output()
    assert SECRET_CODE not in worker.output()
