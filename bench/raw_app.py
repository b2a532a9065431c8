"""The raw ceiling: the least a Celery task can do for one phone code.

One HTTP call to the phone endpoint with an access token the harness fetched once, and one SQL
statement that upserts the user and marks the job. No token management, no idempotency, no
validation, no retries. Run with::

    celery -A bench.raw_app worker --pool threads -c 100 -Q bench.raw
"""

from __future__ import annotations

from typing import Any

import requests

from bench.common import (
    RAW_QUEUE,
    RAW_TASK,
    bench_env,
    call_phone_api,
    http_session,
    make_celery_app,
    record_failure,
    record_success,
    shared_engine,
)

TASK_NAME = RAW_TASK
QUEUE = RAW_QUEUE

env = bench_env()
app = make_celery_app("bench_raw", env.broker_url)
app.conf.task_default_queue = QUEUE
_session = http_session()


def _raw_phone(task: Any, *, appid: str, openid: str, code: str) -> dict[str, Any]:
    job_id: str = task.request.id
    engine = shared_engine(env)
    try:
        reply = call_phone_api(
            _session, env.api_base, access_token=env.access_token, code=code, openid=openid
        )
    except requests.RequestException:
        record_failure(engine, job_id=job_id, error_code="transport")
        return {"job_id": job_id, "status": "failed"}
    if reply.errcode != 0:
        record_failure(engine, job_id=job_id, error_code=str(reply.errcode))
        return {"job_id": job_id, "status": "failed"}
    record_success(engine, job_id=job_id, appid=appid, openid=openid, reply=reply)
    return {"job_id": job_id, "status": "succeeded"}


# Registered without decorator syntax: Celery's decorator is untyped.
raw_phone = app.task(name=TASK_NAME, bind=True)(_raw_phone)
