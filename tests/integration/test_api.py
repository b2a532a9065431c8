"""``wxphone api`` as a real process, over real HTTP, with real workers, PostgreSQL, Redis and the
WeChat sandbox: login and phone flows, waits, sessions, ownership, rate limits, bad input."""

from __future__ import annotations

import base64
import json
import os
import re
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest
import redis
from sqlalchemy import text as sql

from tests.support.api import (
    API_SESSION_KEY,
    bearer,
    empty_login_jobs,
    job_counts,
    log_in,
    start_api,
)
from tests.support.pipeline import Pipeline
from tests.support.processes import WXPHONE, base_environment
from tests.support.services import RedisServer, create_database, drop_database, free_port
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


def test_login_failures_answer_by_the_error_class(api_pipeline: Pipeline) -> None:
    pipeline = api_pipeline
    api = start_api(pipeline)
    js_code, _ = pipeline.sandbox.mint_login_code(APPID, openid="oApiFailures0001")
    high_risk, _ = pipeline.sandbox.mint_login_code(APPID, high_risk=True)
    with api.client() as client:
        assert client.post("/v1/login", json={"appid": APPID, "js_code": js_code}).status_code == 200
        for appid, code, status, error_code in [
            (APPID, js_code, 422, "invalid_code"),  # used once already: WeChat's 40029
            (APPID, high_risk, 422, "high_risk_user"),  # 40226
            ("wxnotservedhere01", js_code, 400, "app_not_configured"),  # well formed, not served
        ]:
            reply = client.post("/v1/login", json={"appid": appid, "js_code": code})
            assert reply.status_code == status, reply.text
            assert set(reply.json()) == {"error_code", "message"}
            assert reply.json()["error_code"] == error_code
            assert code not in reply.text


def test_a_slow_exchange_answers_202_then_get_waits_for_its_end(api_pipeline: Pipeline) -> None:
    pipeline = api_pipeline
    # The login answers 202 at once (no wait); the phone exchange takes 1.5 s at "WeChat".
    api = start_api(pipeline, api_login_wait_seconds=0)
    pipeline.sandbox.configure(latency_ms={"phone": 1500})
    openid = "oApiSlow000001"
    js_code, _ = pipeline.sandbox.mint_login_code(APPID, openid=openid)
    with api.client() as client:
        pending = client.post("/v1/login", json={"appid": APPID, "js_code": js_code})
        assert pending.status_code == 202, pending.text
        login_job_id = pending.json()["job_id"]
        assert pending.json() == {"job_id": login_job_id, "status": "queued"}
        login = client.get(f"/v1/login/{login_job_id}", params={"wait_seconds": WAIT_SECONDS})
        assert login.status_code == 200, login.text
        assert login.json()["openid"] == openid
        session = login.json()["session"]
        # The job id handed out one session; it is no capability any more.
        again = client.get(f"/v1/login/{login_job_id}", params={"wait_seconds": 1})
        assert (again.status_code, again.json()["error_code"]) == (404, "not_found")

        code = phone_code(pipeline, "13900001111")
        started = time.monotonic()
        reply = client.post("/v1/phone", json={"code": code, "wait_seconds": 0.2}, headers=bearer(session))
        assert reply.status_code == 202, reply.text
        job_id = reply.json()["job_id"]
        assert reply.json()["status"] in ("queued", "running", "retrying")
        assert set(reply.json()) == {"job_id", "status"}
        short = client.get(f"/v1/phone/{job_id}", params={"wait_seconds": 0.1}, headers=bearer(session))
        assert short.status_code == 202
        done = client.get(
            f"/v1/phone/{job_id}", params={"wait_seconds": WAIT_SECONDS}, headers=bearer(session)
        )
        elapsed = time.monotonic() - started
        assert done.status_code == 200, done.text
        assert done.json() == {
            "job_id": job_id,
            "status": "succeeded",
            "phone": {"masked": "139****1111", "country_code": "86"},
        }
        # Woken by the job's end, not by the end of the wait.
        assert elapsed < WAIT_SECONDS / 2
        # A finished job answers at once, as often as asked.
        assert client.get(f"/v1/phone/{job_id}", headers=bearer(session)).json() == done.json()


def test_a_login_answered_200_cannot_mint_a_second_session_from_its_job_id(api_pipeline: Pipeline) -> None:
    """A login job id (a Celery task id: in the worker's log, the broker, ``wxphone job show``)
    mints at most one session, also when the login was answered 200 at once (found by review)."""
    api = start_api(api_pipeline)
    js_code, _ = api_pipeline.sandbox.mint_login_code(APPID, openid="oReviewTwice01")
    with api.client() as client:
        first = client.post("/v1/login", json={"appid": APPID, "js_code": js_code})
        assert first.status_code == 200, first.text
        with api_pipeline.engine.connect() as conn:
            [login_job_id] = [
                str(job_id) for job_id in conn.execute(sql("SELECT job_id FROM login_jobs")).scalars()
            ]
        second = client.get(f"/v1/login/{login_job_id}")
    assert second.status_code == 404, second.text
    assert "session" not in second.json()


def test_a_refused_phone_code_answers_422_with_its_job(api_pipeline: Pipeline) -> None:
    pipeline = api_pipeline
    api = start_api(pipeline)
    session = log_in(api, pipeline, APPID, "oApiRefused0001")
    made_up = "0a1B2c3D4e5F6g7H8i9J0k1L2m3N4o5P"  # never issued: WeChat answers 40029
    with api.client(headers=bearer(session)) as client:
        reply = client.post("/v1/phone", json={"code": made_up, "wait_seconds": WAIT_SECONDS})
        assert reply.status_code == 422, reply.text
        body = reply.json()
        assert set(body) == {"job_id", "error_code", "message"}
        assert body["error_code"] == "invalid_code"
        assert made_up not in reply.text
        again = client.get(f"/v1/phone/{body['job_id']}")
        assert (again.status_code, again.json()) == (422, body)


def test_unknown_expired_or_tampered_sessions_answer_401_and_enqueue_nothing(api_pipeline: Pipeline) -> None:
    pipeline = api_pipeline
    api = start_api(pipeline)
    openid = "oApiAuth000001"
    valid = log_in(api, pipeline, APPID, openid)
    counts = job_counts(pipeline)
    payload, signature = valid.rsplit(".", 1)
    flipped = signature[:-1] + ("A" if signature[-1] != "A" else "B")
    other_key = SessionSigner("another-api-session-key-0123456789abcdef", ttl_seconds=3600)
    foreign, _ = other_key.mint(appid=APPID, openid=openid)
    # Another user's payload under this session's signature: the signature no longer fits.
    swapped = foreign.rsplit(".", 1)[0] + "." + signature
    expired, _ = SessionSigner(API_SESSION_KEY, ttl_seconds=60, clock=lambda: time.time() - 3600).mint(
        appid=APPID, openid=openid
    )
    fresh, _ = SessionSigner(API_SESSION_KEY, ttl_seconds=60).mint(appid=APPID, openid=openid)
    cases: dict[str, dict[str, str]] = {
        "no header": {},
        "unknown session": bearer("not-a-session-at-all"),
        "empty bearer": {"Authorization": "Bearer"},
        "basic scheme": {"Authorization": "Basic " + valid},
        "flipped signature": bearer(payload + "." + flipped),
        "swapped payload": bearer(swapped),
        "signed with another key": bearer(foreign),
        "expired": bearer(expired),
        "oversized": bearer(valid * 10),
    }
    code = phone_code(pipeline, "13700002222")
    with api.client() as client:
        for what, headers in cases.items():
            for reply in (
                client.post("/v1/phone", json={"code": code, "wait_seconds": 0}, headers=headers),
                client.get("/v1/phone/00000000-0000-4000-8000-000000000000", headers=headers),
            ):
                assert reply.status_code == 401, (what, reply.text)
                assert reply.json()["error_code"] == "unauthorized", what
                assert reply.headers["www-authenticate"] == "Bearer", what
        assert job_counts(pipeline) == counts
        # The same key signs a session that works: the expired one failed for its age alone.
        reply = client.post(
            "/v1/phone", json={"code": code, "wait_seconds": WAIT_SECONDS}, headers=bearer(fresh)
        )
        assert reply.status_code == 200, reply.text


def test_a_session_reads_only_its_own_users_phone_jobs(api_pipeline: Pipeline) -> None:
    pipeline = api_pipeline
    api = start_api(pipeline)
    alice = log_in(api, pipeline, APPID, "oApiAlice00001")
    alice_again = log_in(api, pipeline, APPID, "oApiAlice00001")
    bob = log_in(api, pipeline, APPID, "oApiBob0000001")
    # The same openid in another app is another user.
    alice_elsewhere = log_in(api, pipeline, OTHER_APPID, "oApiAlice00001")
    login_job_id = pipeline.producer.submit_login(appid=APPID, js_code="a-login-code-never-issued")
    with api.client() as client:
        reply = client.post(
            "/v1/phone",
            json={"code": phone_code(pipeline, "13600003333"), "wait_seconds": WAIT_SECONDS},
            headers=bearer(alice),
        )
        assert reply.status_code == 200, reply.text
        job_id = reply.json()["job_id"]
        assert client.get(f"/v1/phone/{job_id}", headers=bearer(alice_again)).json() == reply.json()

        unknown = client.get("/v1/phone/00000000-0000-4000-8000-000000000000", headers=bearer(bob))
        assert unknown.status_code == 404
        for session, path in [
            (bob, f"/v1/phone/{job_id}"),
            (alice_elsewhere, f"/v1/phone/{job_id}"),
            (bob, f"/v1/phone/{job_id}?wait_seconds=1"),
            (alice, f"/v1/phone/{login_job_id}"),  # a login job is no phone job
        ]:
            other = client.get(path, headers=bearer(session))
            assert (other.status_code, other.content) == (404, unknown.content), path
        # Nor is a phone job a login job.
        assert client.get(f"/v1/login/{job_id}").status_code == 404


def test_each_session_is_rate_limited_fleet_wide_with_retry_after(api_pipeline: Pipeline) -> None:
    pipeline = api_pipeline
    first = start_api(pipeline, "api1", api_rate_limit_per_minute=3)
    second = start_api(pipeline, "api2", api_rate_limit_per_minute=3)
    limited = log_in(first, pipeline, APPID, "oApiLimited001")
    other = log_in(first, pipeline, APPID, "oApiLimited001")
    path = "/v1/phone/00000000-0000-4000-8000-000000000000"
    with first.client() as one, second.client() as two:
        # Three requests in the window, spread over two processes.
        assert [client.get(path, headers=bearer(limited)).status_code for client in (one, two, one)] == [
            404
        ] * 3
        for client in (two, one):
            refused = client.get(path, headers=bearer(limited))
            assert refused.status_code == 429, refused.text
            assert refused.json()["error_code"] == "rate_limited"
            assert 1 <= int(refused.headers["retry-after"]) <= 60
        # Refused before anything else: no submission either.
        counts = job_counts(pipeline)
        post = one.post("/v1/phone", json={"code": "abc", "wait_seconds": 0}, headers=bearer(limited))
        assert post.status_code == 429
        assert job_counts(pipeline) == counts
        # Another session of the same user has its own window.
        assert two.get(path, headers=bearer(other)).status_code == 404
    # The counters are named by the random session id, and hold no session.
    with redis.Redis.from_url(pipeline.redis_url) as client:
        keys = [key.decode() for key in client.scan_iter("wxphone:api:*")]
        assert len([key for key in keys if key.startswith("wxphone:api:rate:")]) == 2
        for key in keys:
            assert limited not in key and other not in key
            value = client.get(key)
            assert value is None or (limited.encode() not in value and other.encode() not in value)


def _bad_requests(session: str) -> list[tuple[str, str, str, dict[str, Any], int]]:
    """(what, method, path, httpx request options, expected status) of malformed requests."""
    code = "0a1B2c3D4e5F6g7H8i9J0k1L2m3N4o5P"
    auth = bearer(session)
    json_header = {**auth, "Content-Type": "application/json"}
    bad: list[tuple[str, str, str, dict[str, Any], int]] = []

    def phone(what: str, body: Any, status: int = 400) -> None:
        bad.append((what, "POST", "/v1/phone", {"json": body, "headers": auth}, status))

    def phone_raw(what: str, content: bytes, headers: dict[str, str], status: int = 400) -> None:
        bad.append((what, "POST", "/v1/phone", {"content": content, "headers": headers}, status))

    def login(what: str, body: Any) -> None:
        bad.append((what, "POST", "/v1/login", {"json": body}, 400))

    phone("no fields", {})
    phone("not an object", [code])
    phone("code is a number", {"code": 123456})
    phone("code is null", {"code": None})
    phone("empty code", {"code": ""})
    phone("oversized code", {"code": "x" * 129})
    phone("code with a newline", {"code": code + "\n"})
    phone("code with a space", {"code": "abc def"})
    phone("code with a NUL", {"code": "abc\x00def"})
    phone("non-ASCII code", {"code": "验证码验证码"})
    phone("openid in the body", {"code": code, "openid": "oSomeoneElse001"})
    phone("negative wait", {"code": code, "wait_seconds": -1})
    phone("wait above the maximum", {"code": code, "wait_seconds": 31})
    phone("wait as a string", {"code": code, "wait_seconds": "5"})
    phone("wait as a boolean", {"code": code, "wait_seconds": True})
    phone_raw("malformed JSON", b'{"code": "abc",', json_header)
    phone_raw("NaN wait", b'{"code": "abc", "wait_seconds": NaN}', json_header)
    phone_raw("infinite wait", b'{"code": "abc", "wait_seconds": Infinity}', json_header)
    phone_raw("not JSON", b"code=abc", {**auth, "Content-Type": "application/x-www-form-urlencoded"})
    phone_raw("invalid UTF-8", b'{"code": "\xff\xfe"}', json_header)
    phone_raw("too large", json.dumps({"code": code, "pad": "x" * 5000}).encode(), json_header, 413)

    def chunks() -> Any:
        for _ in range(10):
            yield b"x" * 1000

    bad.append(
        ("too large, streamed", "POST", "/v1/phone", {"content": chunks(), "headers": json_header}, 413)
    )
    login("no js_code", {"appid": APPID})
    login("appid with a space", {"appid": "wx app", "js_code": code})
    login("oversized appid", {"appid": "w" * 65, "js_code": code})
    login("appid is a number", {"appid": 12, "js_code": code})
    login("js_code with a tab", {"appid": APPID, "js_code": "abc\tdef"})
    login("extra field", {"appid": APPID, "js_code": code, "openid": "oSomeone"})
    for what, params in [
        ("negative wait", {"wait_seconds": "-1"}),
        ("wait not a number", {"wait_seconds": "soon"}),
        ("NaN wait", {"wait_seconds": "nan"}),
        ("wait above the maximum", {"wait_seconds": "31"}),
    ]:
        bad.append(
            (f"GET phone: {what}", "GET", "/v1/phone/some-job", {"params": params, "headers": auth}, 400)
        )
        bad.append((f"GET login: {what}", "GET", "/v1/login/some-job", {"params": params}, 400))
    bad.append(("oversized job id", "GET", "/v1/phone/" + "a" * 65, {"headers": auth}, 400))
    bad.append(("job id with a dot", "GET", "/v1/phone/a.b", {"headers": auth}, 400))
    return bad


def test_bad_input_gets_a_clear_4xx_and_is_never_enqueued(api_pipeline: Pipeline) -> None:
    pipeline = api_pipeline
    api = start_api(pipeline)
    session = log_in(api, pipeline, APPID, "oApiBadInput01")
    counts = job_counts(pipeline)
    with api.client() as client:
        for what, method, path, options, status in _bad_requests(session):
            reply = client.request(method, path, **options)
            assert reply.status_code == status, (what, reply.text)
            body = reply.json()
            assert set(body) == {"error_code", "message"}, what
            assert body["error_code"] == ("invalid_input" if status == 400 else "payload_too_large"), what
            assert "验证码" not in reply.text and "oSomeone" not in reply.text, what
    assert job_counts(pipeline) == counts
    with redis.Redis.from_url(pipeline.broker_url) as broker:
        assert broker.llen("wxphone") == 0


#: Values no response body and no log line may hold (besides the owner's masked number).
SESSION_KEY_SHAPE = re.compile(r"[A-Za-z0-9+/]{22}==")


def test_no_secret_code_session_or_full_number_in_bodies_or_logs(api_pipeline: Pipeline) -> None:
    pipeline = api_pipeline
    # DEBUG: every library's lines are in the log too.
    api = start_api(pipeline, api_login_wait_seconds=0, log_level="DEBUG")
    number = "13511112222"
    openid = "oApiSecrets001"
    js_code, _ = pipeline.sandbox.mint_login_code(APPID, openid=openid)
    code = phone_code(pipeline, number)
    made_up = "Zz9Yy8Xx7Ww6Vv5Uu4Tt3Ss2Rr1Qq0Pp"
    bodies: list[str] = []
    with api.client() as client:
        pending = client.post("/v1/login", json={"appid": APPID, "js_code": js_code})
        login_job_id = pending.json()["job_id"]
        login = client.get(f"/v1/login/{login_job_id}", params={"wait_seconds": WAIT_SECONDS})
        session = login.json()["session"]
        reused = client.post("/v1/login", json={"appid": APPID, "js_code": js_code}).json()["job_id"]
        refused_login = client.get(f"/v1/login/{reused}", params={"wait_seconds": WAIT_SECONDS})
        phone = client.post(
            "/v1/phone", json={"code": code, "wait_seconds": WAIT_SECONDS}, headers=bearer(session)
        )
        refused = client.post(
            "/v1/phone", json={"code": made_up, "wait_seconds": WAIT_SECONDS}, headers=bearer(session)
        )
        bad = client.post("/v1/phone", json={"code": code + " ", "wait_seconds": 1}, headers=bearer(session))
        bodies = [reply.text for reply in (pending, login, refused_login, phone, refused, bad)]
    assert [reply.status_code for reply in (pending, login, refused_login, phone, refused, bad)] == [
        202, 200, 422, 200, 422, 400,
    ]  # fmt: skip
    assert phone.json()["phone"]["masked"] == "135****2222"
    log = api.output()
    assert "DEBUG" in log
    for text in [*bodies, log]:
        for value in (js_code, code, made_up, number, "session_key", *pipeline.settings["apps"].split(",")):
            assert value not in text
        assert SESSION_KEY_SHAPE.search(text) is None
    # The session is in its login's body only; the login job id (a capability until redeemed)
    # is in the 202 body only; neither is logged.
    assert [session in body for body in bodies] == [False, True, False, False, False, False]
    assert session not in log and login_job_id not in log and reused not in log
    assert "GET /v1/login/{job_id} 200" in log


def test_healthz_names_the_unreachable_dependency(pipeline: Pipeline, tmp_path: Path) -> None:
    """Private servers the test stops: a Redis as the API's token store, another as its broker,
    and a throwaway database it drops."""
    token_store = RedisServer(tmp_path / "token-store")
    broker = RedisServer(tmp_path / "broker")
    database_url = create_database("wxphone_api_health")
    try:
        token_store.start()
        broker.start()
        api = start_api(
            pipeline, redis_url=token_store.url(1), broker_url=broker.url(0), database_url=database_url
        )
        all_ok = {"status": "ok", "checks": {"broker": "ok", "redis": "ok", "database": "ok"}}
        with api.client() as client:
            reply = client.get("/healthz")
            assert (reply.status_code, reply.json()) == (200, all_ok)
            token_store.stop()
            broker.stop()
            reply = client.get("/healthz")
            assert reply.status_code == 503
            assert reply.json() == {
                "status": "unavailable",
                "checks": {"broker": "unreachable", "redis": "unreachable", "database": "ok"},
            }
            for secret_or_place in (
                "redis://",
                "postgresql",
                str(token_store.port),
                str(broker.port),
                "127.0.0.1",
            ):
                assert secret_or_place not in reply.text
            token_store.start()
            broker.start()
            assert client.get("/healthz").json() == all_ok
            drop_database(database_url)
            reply = client.get("/healthz")
            assert (reply.status_code, reply.json()["checks"]) == (
                503,
                {"broker": "ok", "redis": "ok", "database": "unreachable"},
            )
    finally:
        token_store.stop()
        broker.stop()
        drop_database(database_url)


@pytest.mark.parametrize(
    ("session_key", "named"),
    [(None, "WXPHONE_API_SESSION_KEY must be set"), ("changeme-changeme-changeme-changeme", "placeholder")],
)
def test_wxphone_api_refuses_to_start_off_loopback_without_a_session_key_of_its_own(
    session_key: str | None, named: str
) -> None:
    env = base_environment(
        wechat_api_base="https://api.weixin.qq.com",
        encryption_keys="v1:" + base64.b64encode(os.urandom(32)).decode(),
        blind_index_key="blind-index-key-0123456789abcdef",
        api_session_key=session_key,
    )
    run = subprocess.run(
        [*WXPHONE, "api", "--port", str(free_port())],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert run.returncode == 2, run.stdout + run.stderr
    assert "WXPHONE_API_SESSION_KEY" in run.stderr and named in run.stderr
    assert "Uvicorn running" not in run.stdout + run.stderr
    if session_key:
        assert session_key not in run.stderr
