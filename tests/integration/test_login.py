"""wxphone.login by name: code2Session, the user upserted with openid/unionid, no session_key anywhere."""

from __future__ import annotations

import json
import re
import time
import uuid
from typing import Any

import pytest
import redis
from sqlalchemy import text

from tests.support.pipeline import (
    APPS,
    BROKERS,
    DEVELOPMENT_PROTECTION,
    FAST_RETRY_SETTINGS,
    FINGERPRINT_KEY,
    Pipeline,
    endpoint_counts,
    producer_with_policy,
    run_cli,
)
from tests.support.waiting import wait_for
from worker.jobs.login import LoginOutcome, login_user
from worker.jobs.phone import JobPolicy
from worker.jobs.validation import InvalidInputError
from worker.settings import AppCredentials
from worker.wechat.client import WeChatClient

APPID = "wxpipeline000001"
LOGIN = "wxphone.login"
RESULT_KEYS = {"status", "error_code", "appid", "openid", "unionid"}
#: A session_key is a base64-encoded 16-byte AES key: 22 characters and "==".
SESSION_KEY_SHAPE = re.compile(r"[A-Za-z0-9+/]{22}==")


def login(pipeline: Pipeline, **kwargs: Any) -> dict[str, Any]:
    task_id = pipeline.send_by_name(LOGIN, **kwargs)
    result: dict[str, Any] = pipeline.celery.AsyncResult(task_id).get(timeout=30)
    assert set(result) == RESULT_KEYS
    return result


@pytest.mark.parametrize("broker", BROKERS)
def test_login_records_the_user_and_never_exposes_the_session_key(pipeline: Pipeline) -> None:
    # DEBUG: even the HTTP library's request lines are in the log, and must not carry secrets.
    pipeline.settings.update(FAST_RETRY_SETTINGS, log_level="DEBUG")
    process = pipeline.start_worker()
    openid, unionid = "oLoginUser0001", "uLoginUnion0001"
    js_code, minted_openid = pipeline.sandbox.mint_login_code(APPID, openid=openid, unionid=unionid)
    assert minted_openid == openid
    pipeline.sandbox.inject_fault("login", errcode=-1)  # busy once: the login is retried

    assert login(pipeline, appid=APPID, js_code=js_code) == {
        "status": "succeeded",
        "error_code": None,
        "appid": APPID,
        "openid": openid,
        "unionid": unionid,
    }
    user_id = pipeline.count("SELECT id FROM users WHERE openid = :openid", openid=openid)
    user = pipeline.producer.get_user(appid=APPID, openid=openid)
    assert user is not None
    assert (user.unionid, user.phone_number, user.phone_verified_at) == (unionid, None, None)

    # A reused code, a high-risk user, an unknown app, a missing code: failures, not crashes.
    high_risk_code, _ = pipeline.sandbox.mint_login_code(APPID, high_risk=True)
    failures = [
        (login(pipeline, appid=APPID, js_code=js_code), "invalid_code", APPID),
        (login(pipeline, appid=APPID, js_code=high_risk_code), "high_risk_user", APPID),
        (login(pipeline, appid="wxunknown0000001", js_code=js_code), "app_not_configured", None),
        (login(pipeline, appid=APPID, js_code=""), "invalid_input", None),
        (login(pipeline, appid=APPID), "invalid_input", None),
    ]
    for result, error_code, appid in failures:
        assert result == {
            "status": "failed",
            "error_code": error_code,
            "appid": appid,
            "openid": None,
            "unionid": None,
        }
    calls = endpoint_counts(pipeline.sandbox, "login")
    assert (calls.calls, calls.errcodes) == (4, {"-1": 1, "0": 1, "40029": 1, "40226": 1})
    assert pipeline.count("SELECT count(*) FROM users") == 1

    # The phone number then lands on the same user row, next to the unionid.
    number = "13500005555"
    phone_code = pipeline.sandbox.mint_phone_code(APPID, phone_number=number, pure_phone_number=number)
    assert pipeline.wait_for_job(pipeline.submit(APPID, openid, phone_code)).status == "succeeded"
    with_phone = pipeline.producer.get_user(appid=APPID, openid=openid)
    assert with_phone is not None
    assert pipeline.count("SELECT id FROM users WHERE openid = :openid", openid=openid) == user_id
    assert (with_phone.unionid, with_phone.phone_number) == (unionid, number)

    # A later login without unionid (WeChat omits it for some apps) keeps what is known.
    again_code, _ = pipeline.sandbox.mint_login_code(APPID, openid=openid)
    assert login(pipeline, appid=APPID, js_code=again_code)["unionid"] is None
    after = pipeline.producer.get_user(appid=APPID, openid=openid)
    assert after is not None
    assert pipeline.count("SELECT id FROM users WHERE openid = :openid", openid=openid) == user_id
    assert (after.unionid, after.phone_number) == (unionid, number)

    # The session_key is never logged, and stored only encrypted (docs/security.md).
    output = process.output()
    assert "session_key" not in output
    assert SESSION_KEY_SHAPE.search(output) is None
    assert js_code not in output and number not in output
    with pipeline.engine.connect() as conn:
        columns = conn.execute(
            text("SELECT column_name FROM information_schema.columns WHERE table_schema = 'public'")
        ).scalars()
        assert [column for column in columns if "session" in column] == ["session_key_encrypted"]
        stored = conn.execute(text("SELECT session_key_encrypted FROM users")).scalar_one()
        assert stored.startswith("dev:")  # a ciphertext under the development key

    # Positional arguments are not part of the interface. (Last: at DEBUG, Celery logs the
    # sender's own repr of positional arguments, which no key-based redaction can recognise.)
    positional = pipeline.celery.send_task(LOGIN, args=[APPID, js_code], queue="wxphone")
    assert positional.get(timeout=30) == {
        "status": "failed",
        "error_code": "invalid_input",
        "appid": None,
        "openid": None,
        "unionid": None,
    }
    assert endpoint_counts(pipeline.sandbox, "login").calls == 5


def test_a_login_run_again_after_it_succeeded_returns_the_user_without_a_second_exchange(
    pipeline: Pipeline,
) -> None:
    """What a redelivered ``wxphone.login`` does (its worker died after the login committed,
    before the message was acknowledged): the same task id and code run again."""
    openid, unionid = "oLoginAgain0001", "uLoginAgain0001"
    js_code, _ = pipeline.sandbox.mint_login_code(APPID, openid=openid, unionid=unionid)
    client = WeChatClient(pipeline.sandbox.base_url, timeout=(2.0, 5.0))

    def run(task_id: str) -> LoginOutcome:
        return login_user(
            appid=APPID,
            js_code=js_code,
            attempt=1,
            sessions=pipeline.sessions,
            client=client,
            apps={APPID: AppCredentials(APPID, APPS[APPID])},
            policy=JobPolicy(fingerprint_key=FINGERPRINT_KEY),
            protection=DEVELOPMENT_PROTECTION,
            task_id=task_id,
        )

    task_id = str(uuid.uuid4())
    first = run(task_id)
    assert (first.status, first.openid, first.unionid) == ("succeeded", openid, unionid)
    assert run(task_id) == first  # the code is spent at WeChat: not presented again
    job = pipeline.producer.get_job(task_id)
    assert job is not None and (job.kind, job.status, job.attempts, job.openid) == (
        "login",
        "succeeded",
        1,
        openid,
    )
    calls = endpoint_counts(pipeline.sandbox, "login")
    assert (calls.calls, calls.errcodes) == (1, {"0": 1})
    audit = "SELECT count(*) FROM exchange_audit WHERE api = 'login' AND job_id = :task_id"
    assert pipeline.count(audit, task_id=task_id) == 1  # one exchange, one row, two runs

    # The same code under another task id is a genuine reuse, refused by WeChat as before.
    assert run(str(uuid.uuid4())).error_code == "invalid_code"
    assert endpoint_counts(pipeline.sandbox, "login").calls == 2
    client.close()


def test_a_45011_on_one_users_login_delays_only_that_login(pipeline: Pipeline) -> None:
    """code2Session's minute quota is per user (100 calls per user per minute): one user's 45011
    must not hold back the app's other logins until the minute ends."""
    window_seconds = 20.0
    pipeline.settings.update(rate_limit_window_seconds=window_seconds)
    pipeline.start_worker()
    flooding_code, flooding_openid = pipeline.sandbox.mint_login_code(APPID, openid="oLoginFlooding01")
    other_code, other_openid = pipeline.sandbox.mint_login_code(APPID, openid="oLoginOtherUser1")
    # Start early in a window (windows are aligned to the epoch, like WeChat's minutes), so that
    # the other user's login has most of the window to finish in.
    remaining = window_seconds - time.time() % window_seconds
    if remaining < 12:
        time.sleep(remaining + 0.1)
    window_ends_at = time.time() + (window_seconds - time.time() % window_seconds)

    pipeline.sandbox.inject_fault("login", errcode=45011)
    flooding = pipeline.celery.AsyncResult(pipeline.send_by_name(LOGIN, appid=APPID, js_code=flooding_code))
    wait_for(
        lambda: endpoint_counts(pipeline.sandbox, "login").errcodes.get("45011") == 1,
        timeout_seconds=10,
        what="the 45011",
    )
    other = pipeline.celery.AsyncResult(pipeline.send_by_name(LOGIN, appid=APPID, js_code=other_code))
    assert other.get(timeout=max(1.0, window_ends_at - time.time() - 1))["openid"] == other_openid
    assert time.time() < window_ends_at  # it did not wait for the window
    assert not flooding.ready()  # the login that met the 45011 waits for the next minute
    with redis.Redis.from_url(pipeline.redis_url) as store:
        assert store.keys("wxphone:pause:*") == []  # no pause of the app's logins

    # Then the delayed login runs again in the next window and succeeds.
    assert flooding.get(timeout=window_seconds + 10)["openid"] == flooding_openid
    calls = endpoint_counts(pipeline.sandbox, "login")
    assert (calls.calls, calls.errcodes) == (3, {"0": 2, "45011": 1})


@pytest.mark.parametrize("broker", BROKERS)
def test_a_login_is_a_durable_job_readable_and_waitable_by_its_id(pipeline: Pipeline) -> None:
    pipeline.settings.update(FAST_RETRY_SETTINGS)
    pipeline.start_worker()
    openid, unionid = "oLoginJob00001", "uLoginJob00001"
    js_code, _ = pipeline.sandbox.mint_login_code(APPID, openid=openid, unionid=unionid)
    pipeline.sandbox.inject_fault("login", errcode=-1)  # busy once: a second attempt

    job_id = pipeline.producer.submit_login(appid=APPID, js_code=js_code)
    queued = pipeline.producer.get_job(job_id)
    assert queued is not None and (queued.kind, queued.status, queued.openid) == ("login", "queued", None)
    job = pipeline.producer.wait_for_job(job_id, timeout_seconds=30)
    assert job is not None
    assert (job.kind, job.status, job.error_code, job.attempts) == ("login", "succeeded", None, 2)
    assert (job.openid, job.unionid, job.appid) == (openid, unionid, APPID)
    assert job.finished_at is not None and job.created_at <= job.finished_at

    shown = run_cli(pipeline, "job", "show", job_id, "--wait", "5", "--json")
    assert shown.returncode == 0, shown.stderr
    assert json.loads(shown.stdout) == job.as_dict()
    assert "session" not in shown.stdout

    # A failed login keeps its error code; a spent code is refused by WeChat, once.
    failed = pipeline.producer.wait_for_job(
        pipeline.producer.submit_login(appid=APPID, js_code=js_code), timeout_seconds=30
    )
    assert failed is not None and (failed.status, failed.error_code, failed.openid) == (
        "failed",
        "invalid_code",
        None,
    )
    # Bad input is refused before anything is recorded or sent.
    for bad in ({"appid": APPID, "js_code": ""}, {"appid": "not an appid", "js_code": "x"}):
        with pytest.raises(InvalidInputError):
            pipeline.producer.submit_login(**bad)
    assert pipeline.count("SELECT count(*) FROM login_jobs") == 2
    assert endpoint_counts(pipeline.sandbox, "login").calls == 3


def test_a_login_sent_by_another_celery_client_is_recorded_as_a_job(pipeline: Pipeline) -> None:
    pipeline.start_worker()
    js_code, openid = pipeline.sandbox.mint_login_code(APPID)
    task_id = pipeline.send_by_name(LOGIN, appid=APPID, js_code=js_code)
    assert pipeline.celery.AsyncResult(task_id).get(timeout=30)["status"] == "succeeded"
    job = pipeline.producer.get_job(task_id)
    assert job is not None and (job.kind, job.status, job.openid, job.attempts) == (
        "login",
        "succeeded",
        openid,
        1,
    )
    # Input refused by the worker is a failed job too (its code was never presented).
    refused = pipeline.send_by_name(LOGIN, appid=APPID, js_code="")
    assert pipeline.celery.AsyncResult(refused).get(timeout=30)["error_code"] == "invalid_input"
    refused_job = pipeline.producer.get_job(refused)
    assert refused_job is not None and (refused_job.status, refused_job.error_code) == (
        "failed",
        "invalid_input",
    )


def test_a_login_code_past_its_life_fails_without_wechat_like_a_phone_code(pipeline: Pipeline) -> None:
    """A login job picked up after its ``code_expires_at`` (a broker backlog, workers down) ends
    ``code_expired`` without a code2Session call, as a phone job does (found by review)."""
    pipeline.settings.update(FAST_RETRY_SETTINGS)
    late = producer_with_policy(pipeline, code_lifetime_seconds=0.5)
    js_code, _ = pipeline.sandbox.mint_login_code(APPID)
    job_id = late.submit_login(appid=APPID, js_code=js_code)
    time.sleep(0.6)  # no worker yet: the code's life ends in the queue
    pipeline.start_worker()

    job = pipeline.wait_for_job(job_id, timeout_seconds=30)
    calls = endpoint_counts(pipeline.sandbox, "login").calls
    assert (job.status, job.error_code, calls) == ("failed", "code_expired", 0)
