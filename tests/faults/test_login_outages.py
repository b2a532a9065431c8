"""``wxphone.login`` through outages of the limits Redis and of PostgreSQL.

A ``wx.login`` code lives five minutes and is single-use: a login must ride out a short outage
of either store, and must never present its code to WeChat a second time because of one.

* The limits Redis (``WXPHONE_REDIS_URL``, the call gate) is down before the call: nothing was
  spent, so the login retries later.
* PostgreSQL goes down while code2Session is in flight: the code is spent and the session_key
  exists nowhere else, so the user write is retried in-process until the database is back.

Both run a real worker; the servers they stop are private to these tests (the limits Redis is
separate from the broker's, PostgreSQL is a cluster of its own).
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from celery.result import AsyncResult

from tests.support.faults import print_recovery
from tests.support.pipeline import APPS, Pipeline, endpoint_counts
from tests.support.postgres import PostgresServer
from tests.support.services import RedisServer
from tests.support.waiting import wait_for
from worker.db import upgrade_to_head

pytestmark = pytest.mark.faults

APPID = sorted(APPS)[0]
LOGIN = "wxphone.login"
#: code2Session's reply is held this long after WeChat consumed the code (below the default
#: 5 s read timeout), so the database can be stopped while the call is in flight.
REPLY_HELD_MS = 3000


@pytest.fixture(scope="module")
def postgres() -> Iterator[PostgresServer]:
    server = PostgresServer()
    server.start()
    yield server
    server.remove()


@pytest.fixture(scope="module")
def migrated_database_url(postgres: PostgresServer) -> str:
    """Overrides the session database: these tests run on a private cluster they may stop."""
    url = postgres.create_database("wxphone_login_faults")
    upgrade_to_head(url)
    return url


@pytest.fixture(autouse=True)
def postgres_running(postgres: PostgresServer) -> Iterator[None]:
    """Every test starts, and leaves, with the cluster up."""
    if not postgres.is_running():
        postgres.start()
    yield
    if not postgres.is_running():
        postgres.start()


def login_result(pipeline: Pipeline, task_id: str) -> AsyncResult:
    return pipeline.celery.AsyncResult(task_id)


def test_a_login_rides_out_an_outage_of_the_limits_redis(pipeline: Pipeline, tmp_path: Path) -> None:
    # Shipped retry defaults: the promise is about them.
    limits = RedisServer(tmp_path / "limits-redis")
    limits.start()
    try:
        pipeline.settings.update(redis_url=limits.url(1))
        worker = pipeline.start_worker("limits")
        openid = "oLimitsOutage0001"
        js_code, _ = pipeline.sandbox.mint_login_code(APPID, openid=openid)

        limits.stop()
        task_id = pipeline.send_by_name(LOGIN, appid=APPID, js_code=js_code)
        result = login_result(pipeline, task_id)
        # The worker met the outage: it either scheduled a retry or (the bug) ended the task.
        wait_for(
            lambda: "login retries" in worker.output() or result.ready(),
            timeout_seconds=30,
            what="the login to meet the stopped limits Redis",
        )
        limits.start()
        back_at = time.monotonic()

        outcome = result.get(timeout=60, propagate=False)
        seconds = time.monotonic() - back_at
        assert result.successful(), f"the login task ended {result.state}: {outcome!r}"
        assert outcome == {
            "status": "succeeded",
            "error_code": None,
            "appid": APPID,
            "openid": openid,
            "unionid": None,
        }
        calls = endpoint_counts(pipeline.sandbox, "login")
        assert (calls.calls, calls.errcodes) == (1, {"0": 1})
        assert pipeline.count("SELECT count(*) FROM users WHERE openid = :openid", openid=openid) == 1
        print_recovery("limits Redis down during a login", seconds, "succeeded, code presented once")
    finally:
        limits.stop()


def test_a_login_whose_user_write_meets_a_database_outage_commits_it_without_a_second_exchange(
    pipeline: Pipeline, postgres: PostgresServer
) -> None:
    worker = pipeline.start_worker("pg-login")
    openid, unionid = "oLoginPgOutage001", "uLoginPgOutage001"
    js_code, _ = pipeline.sandbox.mint_login_code(APPID, openid=openid, unionid=unionid)
    # WeChat consumes the code at once and holds the reply: the database goes down meanwhile.
    pipeline.sandbox.inject_fault("login", latency_ms=REPLY_HELD_MS, timing="after")

    task_id = pipeline.send_by_name(LOGIN, appid=APPID, js_code=js_code)
    # The sandbox takes the fault (and consumes the code) when the request arrives.
    wait_for(
        lambda: pipeline.sandbox.pending_faults() == [], timeout_seconds=30, what="code2Session in flight"
    )
    postgres.stop(mode="fast")
    stopped_at = time.monotonic()
    # The reply lands while the database is down and the user write fails: the worker says so
    # (and retries the write in-process; before that fix, the whole task was retried).
    wait_for(
        lambda: "database unreachable" in worker.output() or "database error" in worker.output(),
        timeout_seconds=30,
        what="the user write to meet the stopped database",
    )
    time.sleep(max(0.0, stopped_at + 5 - time.monotonic()))  # down for five seconds in all
    postgres.start()
    back_at = time.monotonic()

    result = login_result(pipeline, task_id)
    outcome = result.get(timeout=60, propagate=False)
    seconds = time.monotonic() - back_at
    assert result.successful(), f"the login task ended {result.state}: {outcome!r}"
    assert outcome == {
        "status": "succeeded",
        "error_code": None,
        "appid": APPID,
        "openid": openid,
        "unionid": unionid,
    }
    # The code was presented once: no 40029 from a second presentation.
    calls = endpoint_counts(pipeline.sandbox, "login")
    assert (calls.calls, calls.errcodes) == (1, {"0": 1})
    user = pipeline.producer.get_user(appid=APPID, openid=openid)
    assert user is not None and user.unionid == unionid
    audit = (
        "SELECT count(*) FROM exchange_audit WHERE api = 'login' AND job_id = :task_id AND outcome = :outcome"
    )
    assert pipeline.count(audit, task_id=task_id, outcome="succeeded") == 1
    assert "database unreachable while recording a login; retrying" in worker.output()
    assert worker.is_running()
    print_recovery("PostgreSQL down 5 s during code2Session", seconds, "succeeded, code presented once")
