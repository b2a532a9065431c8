"""The hand-rolled baseline: what most teams write around an SDK in ~30 lines.

It behaves like wechatpy with its default ``MemoryStorage``: every worker process keeps its own
classic access token in memory (two keys, token and expiry, no lock, so concurrent threads that
find no token all fetch one), refreshes it shortly before ``expires_in`` runs out, and on
40001/40014/42001 fetches a new token and retries the call once (wechatpy retries without bound;
one retry is the kinder version). Then it upserts the user. No shared token, no idempotency:
a repeated code is sent to WeChat again. Run with::

    celery -A bench.baseline_app worker --pool threads -c 100 -Q bench.baseline
"""

from __future__ import annotations

import time
from typing import Any

import requests

from bench.common import (
    BASELINE_QUEUE,
    BASELINE_TASK,
    CLASSIC_TOKEN_PATH,
    HTTP_TIMEOUT_SECONDS,
    bench_env,
    call_phone_api,
    http_session,
    make_celery_app,
    record_failure,
    record_success,
    shared_engine,
)

TASK_NAME = BASELINE_TASK
QUEUE = BASELINE_QUEUE
#: wechatpy's access_token property refetches when fewer than 60 s of 7200 s remain; the same
#: proportion is used so that the shortened token lifetimes of the rotation run scale alike.
EARLY_REFRESH_SECONDS = 60.0
EARLY_REFRESH_FRACTION = 60.0 / 7200.0
TOKEN_ERRCODES = frozenset({40001, 40014, 42001})

env = bench_env()
app = make_celery_app("bench_baseline", env.broker_url)
app.conf.task_default_queue = QUEUE
_session = http_session()


class MemoryTokenClient:
    """wechatpy's ``BaseWeChatClient.access_token`` over ``MemoryStorage``: one per process."""

    def __init__(self, session: requests.Session, api_base: str, appid: str, secret: str) -> None:
        self.session = session
        self.api_base = api_base
        self.appid = appid
        self.secret = secret
        self.storage: dict[str, Any] = {}

    @property
    def access_token(self) -> str:
        token = self.storage.get("access_token")
        expires_at = self.storage.get("expires_at")
        lifetime = self.storage.get("expires_in", 7200)
        early = min(EARLY_REFRESH_SECONDS, lifetime * EARLY_REFRESH_FRACTION)
        if token and (expires_at is None or expires_at - time.time() > early):
            return str(token)
        self.fetch_access_token()
        return str(self.storage["access_token"])

    def fetch_access_token(self) -> None:
        response = self.session.get(
            self.api_base + CLASSIC_TOKEN_PATH,
            params={"grant_type": "client_credential", "appid": self.appid, "secret": self.secret},
            timeout=HTTP_TIMEOUT_SECONDS,
        )
        body = response.json()
        if "access_token" not in body:
            raise TokenFetchError(int(body.get("errcode", -1)))
        # Two separate writes, as wechatpy's storage does (token and expiry are separate keys).
        self.storage["access_token"] = body["access_token"]
        self.storage["expires_in"] = int(body["expires_in"])
        self.storage["expires_at"] = time.time() + int(body["expires_in"])


class TokenFetchError(Exception):
    def __init__(self, errcode: int) -> None:
        super().__init__(f"token fetch failed: {errcode}")
        self.errcode = errcode


client = MemoryTokenClient(_session, env.api_base, env.appid, env.secret)


def _baseline_phone(task: Any, *, appid: str, openid: str, code: str) -> dict[str, Any]:
    job_id: str = task.request.id
    engine = shared_engine(env)
    try:
        reply = call_phone_api(
            _session, env.api_base, access_token=client.access_token, code=code, openid=openid
        )
        if reply.errcode in TOKEN_ERRCODES:
            client.fetch_access_token()
            reply = call_phone_api(
                _session, env.api_base, access_token=client.access_token, code=code, openid=openid
            )
    except requests.RequestException:
        record_failure(engine, job_id=job_id, error_code="transport")
        return {"job_id": job_id, "status": "failed"}
    except TokenFetchError as error:
        record_failure(engine, job_id=job_id, error_code=str(error.errcode))
        return {"job_id": job_id, "status": "failed"}
    if reply.errcode != 0:
        record_failure(engine, job_id=job_id, error_code=str(reply.errcode))
        return {"job_id": job_id, "status": "failed"}
    record_success(engine, job_id=job_id, appid=appid, openid=openid, reply=reply)
    return {"job_id": job_id, "status": "succeeded"}


baseline_phone = app.task(name=TASK_NAME, bind=True)(_baseline_phone)
