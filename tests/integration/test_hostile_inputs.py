"""Properties of the phone job under hostile input, with real PostgreSQL, Redis and HTTP:

* any task id and kwargs (objects, strings, unicode, huge values, ids no job row can hold) end in
  success or a known error code,
  and a failed job leaves no user row behind;
* any reply from something posing as WeChat ends the same way, with no partial write.

The domain function ``resolve_phone_job`` is called directly (no Celery), once per example.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest
import redis
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from sqlalchemy import Engine, text
from sqlalchemy.orm import Session, sessionmaker

from tests.conftest import RedisUrls
from tests.support.scripted_wechat import ScriptedWeChat, scripted_wechat
from worker.crypto import BlindIndex, DataProtection, FieldCipher
from worker.db import make_engine, session_factory
from worker.jobs.phone import JobOutcome, JobPolicy, resolve_phone_job
from worker.liveness import RunnerLease
from worker.sandbox.admin import SandboxAdmin
from worker.settings import (
    DEVELOPMENT_BLIND_INDEX_KEY,
    DEVELOPMENT_ENCRYPTION_KEYS,
    AppCredentials,
    parse_encryption_keys,
)
from worker.tokens.service import TokenService
from worker.tokens.store import TokenStore
from worker.wechat.client import MAX_REPLY_BYTES, WeChatClient

APPID = "wxhostile0000001"
SECRET = "hostile-test-secret-0123456789ab"
#: Every error code a phone job may end with on these paths; "internal_error" (a crash) is not one.
KNOWN_ERROR_CODES = {
    "invalid_input",
    "invalid_job_id",
    "job_id_reused",  # a hostile id drawn twice names an earlier example's job
    "invalid_reply",
    "app_not_configured",
    "invalid_code",
    "high_risk_user",
    "upstream_error",
    "upstream_unavailable",
    "wechat_config_error",
    "quota_exhausted",
    "rate_limited",
    "token_invalid",
    "watermark_mismatch",
    "reply_lost",
    "code_reused",  # the same code submitted earlier for another openid
    "code_expired",
}
PROTECTION = DataProtection(
    FieldCipher(parse_encryption_keys(DEVELOPMENT_ENCRYPTION_KEYS), "dev"),
    BlindIndex(DEVELOPMENT_BLIND_INDEX_KEY),
)
POLICY = JobPolicy(
    fingerprint_key="hostile-test-fingerprint-key", max_attempts=1, final_write_retry_seconds=1.0
)

ANYTHING = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.floats(),
    st.text(max_size=300),
    st.binary(max_size=50),
    st.lists(st.integers(), max_size=3),
    st.dictionaries(st.text(max_size=5), st.text(max_size=5), max_size=3),
    st.text(min_size=1, max_size=20).map(lambda text: text * 5_000),  # huge
    st.sampled_from(
        ["", " ", "\x00", "wx\u200bapp", "../../etc/passwd", "'; DROP TABLE users; --", "\ud7ff"]
    ),
)
MINT = object()  # stands for "a real code minted by the sandbox"


def half(plausible: st.SearchStrategy[Any], hostile: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    """Half plausible, half hostile (a plain one_of would flatten ANYTHING's many branches)."""
    return st.booleans().flatmap(lambda pick: plausible if pick else hostile)


@dataclass
class World:
    engine: Engine
    sessions: sessionmaker[Session]
    redis: redis.Redis
    lease: RunnerLease

    def users(self) -> str:
        """A digest of every users row (an UPDATE also moves updated_at, so any write shows)."""
        with self.engine.connect() as conn:
            digest = conn.execute(
                text(
                    "SELECT count(*)::text || ':' || "
                    "coalesce(md5(string_agg(u::text, ',' ORDER BY id)), '') FROM users u"
                )
            ).scalar_one()
            return str(digest)

    def user_exists(self, openid: object) -> bool:
        if not isinstance(openid, str) or "\x00" in openid:
            return False
        with self.engine.connect() as conn:
            found = conn.execute(
                text("SELECT 1 FROM users WHERE appid = :a AND openid = :o"), {"a": APPID, "o": openid}
            )
            return found.first() is not None


@pytest.fixture
def world(migrated_database_url: str, redis_urls: RedisUrls) -> Iterator[World]:
    engine = make_engine(migrated_database_url)
    with engine.begin() as conn:
        conn.execute(text("TRUNCATE users, phone_jobs, login_jobs, code_claims, key_checks"))
    client = redis.Redis.from_url(redis_urls.redis_url)
    lease = RunnerLease(client, lease_seconds=20, call_budget_seconds=9)
    yield World(engine, session_factory(engine), client, lease)
    lease.stop()
    client.close()
    engine.dispose()


def token_service(client: WeChatClient, world: World) -> TokenService:
    return TokenService(
        store=TokenStore(world.redis, mode="stable"),
        client=client,
        apps={APPID: AppCredentials(APPID, SECRET)},
        mode="stable",
    )


def check(outcome: JobOutcome, world: World, openid: object, users_before: str) -> None:
    """Success writes the user; anything else writes no user row (examples share the tables)."""
    assert isinstance(outcome, JobOutcome)
    if outcome.status == "succeeded":
        assert outcome.error_code is None and world.user_exists(openid)
        return
    assert outcome.status in {"failed", "retrying"}, outcome
    assert outcome.error_code in KNOWN_ERROR_CODES, outcome
    assert world.users() == users_before  # no partial write


@settings(max_examples=80, deadline=None, suppress_health_check=list(HealthCheck))
@given(
    job_id=half(st.none(), st.one_of(st.text(min_size=60, max_size=80), ANYTHING)),
    appid=half(st.just(APPID), st.one_of(st.just("wxnotconfigured1"), ANYTHING)),
    openid=half(st.from_regex(r"o[A-Za-z0-9_-]{5,40}", fullmatch=True), ANYTHING),
    code=half(st.sampled_from([MINT, "never-issued-code-0123456789"]), ANYTHING),
    caller=half(st.from_regex(r"[a-z-]{1,64}", fullmatch=True), ANYTHING),
)
def test_any_task_kwargs_end_in_a_known_outcome_without_partial_writes(
    world: World, sandbox: SandboxAdmin, job_id: Any, appid: Any, openid: Any, code: Any, caller: Any
) -> None:
    sandbox.register_app(APPID, SECRET)
    if code is MINT:
        code = sandbox.mint_phone_code(APPID, pure_phone_number="13812341234")
    client = WeChatClient(sandbox.base_url, timeout=(2.0, 5.0))
    users_before = world.users()
    try:
        outcome = resolve_phone_job(
            job_id=str(uuid.uuid4()) if job_id is None else job_id,
            appid=appid,
            openid=openid,
            code=code,
            engine=world.engine,
            token_service=token_service(client, world),
            client=client,
            policy=POLICY,
            lease=world.lease,
            protection=PROTECTION,
            caller=caller,
        )
    finally:
        client.close()
    event(f"{outcome.status} {outcome.error_code}")
    check(outcome, world, openid, users_before)


JSON_SCALARS = st.one_of(
    st.none(), st.booleans(), st.integers(), st.floats(allow_nan=False), st.text(max_size=30)
)
JSON_VALUES = st.recursive(
    JSON_SCALARS,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=10), inner, max_size=3),
    max_leaves=8,
)
PHONE_INFO = st.fixed_dictionaries(
    {},
    optional={
        "phoneNumber": st.one_of(st.just("13812341234"), JSON_VALUES),
        "purePhoneNumber": st.one_of(st.just("13812341234"), st.text(max_size=40), JSON_VALUES),
        "countryCode": st.one_of(st.just("86"), st.just(86), JSON_VALUES),
        "watermark": st.one_of(
            st.fixed_dictionaries(
                {
                    "appid": st.one_of(st.just(APPID), JSON_VALUES),
                    "timestamp": st.one_of(st.integers(), JSON_VALUES),
                }
            ),
            JSON_VALUES,
        ),
    },
)
REPLIES = st.one_of(
    st.fixed_dictionaries(
        {},
        optional={
            "errcode": st.one_of(
                st.sampled_from([0, -1, 40001, 40029, 45011, 40013, 99999, "0"]), JSON_VALUES
            ),
            "errmsg": st.one_of(st.text(max_size=60), JSON_VALUES),
            "phone_info": st.one_of(PHONE_INFO, JSON_VALUES),
        },
    ).map(lambda body: json.dumps(body).encode()),
    st.binary(max_size=100),
    st.text(max_size=100).map(str.encode),
    st.just(b'{"errcode": 0, "pad": "' + b"x" * (MAX_REPLY_BYTES + 10) + b'"}'),
)


VALID_INFO = {
    "phoneNumber": "13812341234",
    "purePhoneNumber": "13812341234",
    "countryCode": "86",
    "watermark": {"appid": APPID, "timestamp": 1700000000},
}
#: A valid success reply with at most one field of phone_info replaced by something odd.
NEAR_VALID_REPLIES = st.tuples(st.sampled_from([None, *VALID_INFO]), JSON_VALUES).map(
    lambda change: json.dumps(
        {
            "errcode": 0,
            "errmsg": "ok",
            "phone_info": {**VALID_INFO, **({change[0]: change[1]} if change[0] else {})},
        }
    ).encode()
)


@pytest.fixture
def fake_wechat() -> Iterator[ScriptedWeChat]:
    with scripted_wechat() as server:
        yield server


@settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck))
@given(status=half(st.just(200), st.sampled_from([200, 400, 500])), body=half(NEAR_VALID_REPLIES, REPLIES))
def test_any_wechat_reply_ends_in_a_known_outcome_without_partial_writes(
    world: World, fake_wechat: ScriptedWeChat, status: int, body: bytes
) -> None:
    fake_wechat.set_reply(status, body)
    client = WeChatClient(fake_wechat.url, timeout=(2.0, 2.0))
    openid = "oHostile" + uuid.uuid4().hex[:12]
    users_before = world.users()
    try:
        outcome = resolve_phone_job(
            job_id=str(uuid.uuid4()),
            appid=APPID,
            openid=openid,
            code="hostile-reply-code-" + uuid.uuid4().hex,
            engine=world.engine,
            token_service=token_service(client, world),
            client=client,
            policy=POLICY,
            lease=world.lease,
            protection=PROTECTION,
        )
    finally:
        client.close()
    event(f"{outcome.status} {outcome.error_code}")
    check(outcome, world, openid, users_before)
