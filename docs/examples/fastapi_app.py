"""A FastAPI front end on wxphone's producer API (docs/integration.md).

The routes and shapes of ``wxphone api`` and of the Flask example (docs/examples/flask_app.py),
in async handlers: a request waits for its job with ``await producer.wait_for_job_async(...)``,
which takes no thread, so one process keeps thousands of waiting requests. The producer's other
calls (a PostgreSQL write and a broker publish, or a read) block, so they run in the thread pool.

From docs/examples, with wxphone's settings in the environment::

    EXAMPLE_APPIDS=wx1234567890abcdef EXAMPLE_SECRET_KEY=... uvicorn --factory fastapi_app:from_environment
"""

from __future__ import annotations

import os
from collections.abc import Collection
from typing import Annotated, Any

from fastapi import FastAPI, Header, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from itsdangerous import BadData, URLSafeTimedSerializer
from pydantic import BaseModel, Field
from starlette.concurrency import run_in_threadpool

from worker.jobs.validation import InvalidInputError
from worker.producer import JobView, Producer, PublishError

#: The longest one request waits for a job; a client may ask for less.
MAX_WAIT_SECONDS = 10.0
#: How long ``POST /v1/login`` waits for its login job.
LOGIN_WAIT_SECONDS = 10.0
#: How long a session this front end signed stays valid.
SESSION_MAX_AGE_SECONDS = 24 * 3600
#: The label of this front end in wxphone's audit trail.
CALLER = "fastapi-example"


class LoginRequest(BaseModel):
    appid: str
    js_code: str


class PhoneRequest(BaseModel):
    code: str
    wait_seconds: float = Field(default=0, ge=0, allow_inf_nan=False)


def create_app(
    producer: Producer,
    *,
    appids: Collection[str],
    secret_key: str,
    max_wait_seconds: float = MAX_WAIT_SECONDS,
) -> FastAPI:
    """The app, on ``producer``, for the mini programs ``appids``, signing sessions with ``secret_key``."""
    app = FastAPI(title="wxphone example front end")
    sessions = URLSafeTimedSerializer(secret_key, salt="wxphone-example-session")

    @app.exception_handler(RequestValidationError)
    async def invalid_request(request: Request, exc: RequestValidationError) -> JSONResponse:
        # FastAPI's own 422 reply echoes the input back, and with it the code.
        return error(400, "invalid_input", "send the fields this route takes, with their types")

    def session_user(authorization: str | None) -> tuple[str, str] | None:
        """``(appid, openid)`` of the request's session, or None: the openid never comes from a body."""
        scheme, _, token = (authorization or "").partition(" ")
        if scheme != "Bearer":
            return None
        try:
            appid, openid = sessions.loads(token, max_age=SESSION_MAX_AGE_SECONDS)
        except BadData:  # forged, expired or malformed
            return None
        return str(appid), str(openid)

    # --8<-- [start:answer]
    async def answer(job: JobView) -> JSONResponse:
        """The reply for a phone job: the masked number once it succeeded, never the full one."""
        if job.status == "succeeded" and job.openid is not None:
            user = await run_in_threadpool(producer.get_user, appid=job.appid, openid=job.openid)
            phone = {
                "masked": user.masked_phone_number if user else None,
                "country_code": user.country_code if user else None,
            }
            return JSONResponse({"job_id": job.job_id, "status": "succeeded", "phone": phone})
        if job.status == "failed":
            reply, status = failed(job)
            return JSONResponse(reply, status_code=status)
        return JSONResponse({"job_id": job.job_id, "status": job.status}, status_code=202)

    # --8<-- [end:answer]
    @app.post("/v1/login")
    async def login(body: LoginRequest) -> JSONResponse:
        if body.appid not in appids:
            return error(400, "invalid_input", "send the appid of a mini program served here and a js_code")
        try:
            job_id = await run_in_threadpool(
                producer.submit_login, appid=body.appid, js_code=body.js_code, caller=CALLER
            )
        except InvalidInputError:
            return error(400, "invalid_input", "js_code must be the code wx.login returned")
        except PublishError:  # the broker refused the job or timed out; it is recorded failed
            return error(503, "enqueue_failed", "the login could not be queued; call wx.login again")
        job = await producer.wait_for_job_async(job_id, LOGIN_WAIT_SECONDS)
        if job is None or not job.is_terminal:
            return error(503, "login_pending", "the login is taking too long; call wx.login again")
        if job.status != "succeeded" or job.openid is None:
            reply, status = failed(job)
            return JSONResponse(reply, status_code=status)
        session = sessions.dumps([job.appid, job.openid])
        return JSONResponse({"session": session, "openid": job.openid, "unionid": job.unionid})

    # --8<-- [start:phone]
    @app.post("/v1/phone")
    async def submit_phone(
        body: PhoneRequest, authorization: Annotated[str | None, Header()] = None
    ) -> JSONResponse:
        user = session_user(authorization)
        if user is None:
            return error(401, "unauthorized", "log in again")
        appid, openid = user
        try:
            # Record and queue the job in the thread pool (blocking I/O), then wait without a thread.
            job_id = await run_in_threadpool(
                producer.submit_phone_code, appid=appid, openid=openid, code=body.code, caller=CALLER
            )
        except InvalidInputError:
            return error(400, "invalid_input", "code must be the code getPhoneNumber returned")
        except PublishError:  # the broker refused the job or timed out; it is recorded failed
            return error(503, "enqueue_failed", "the code could not be queued; tap the button again")
        job = await producer.wait_for_job_async(job_id, min(body.wait_seconds, max_wait_seconds))
        if job is None:  # never for a job just recorded; a type checker cannot know that
            return error(404, "not_found", "no such job")
        return await answer(job)

    @app.get("/v1/phone/{job_id}")
    async def phone_job(
        job_id: str,
        wait_seconds: Annotated[float, Query(ge=0, allow_inf_nan=False)] = 0,
        authorization: Annotated[str | None, Header()] = None,
    ) -> JSONResponse:
        user = session_user(authorization)
        if user is None:
            return error(401, "unauthorized", "log in again")
        job = await run_in_threadpool(producer.get_job, job_id)
        # Another user's job reads as no job at all.
        if job is None or job.kind != "phone" or (job.appid, job.openid) != user:
            return error(404, "not_found", "no such job")
        if not job.is_terminal and wait_seconds > 0:
            job = await producer.wait_for_job_async(job_id, min(wait_seconds, max_wait_seconds)) or job
        return await answer(job)

    # --8<-- [end:phone]
    return app


def error(status: int, error_code: str, message: str) -> JSONResponse:
    return JSONResponse({"error_code": error_code, "message": message}, status_code=status)


#: Failed jobs whose code (or user) WeChat refused: only a new code can succeed.
REFUSED = {"invalid_code", "high_risk_user", "code_reused", "watermark_mismatch"}
#: Failed jobs the user can fix with a new tap (docs/integration.md, "Statuses and error codes").
TAP_AGAIN = {"invalid_code", "code_expired", "reply_lost", "worker_lost", "too_many_attempts"}


def failed(job: JobView) -> tuple[dict[str, Any], int]:
    """A failed job's answer, as wxphone api gives it: 422 when WeChat refused the code, 400 for
    input refused, 503 when the service could not get WeChat's answer."""
    if job.error_code in TAP_AGAIN:
        message = "the verification did not go through; try again"
    elif job.error_code in {"upstream_unavailable", "enqueue_failed"}:
        message = "WeChat could not be reached; try again later"
    elif job.error_code == "high_risk_user":
        message = "WeChat refused this login"
    else:
        message = "verification is not available right now"
    if job.error_code in REFUSED:
        status = 422
    elif job.error_code in {"invalid_input", "app_not_configured"}:
        status = 400
    else:
        status = 503
    return {"job_id": job.job_id, "error_code": job.error_code, "message": message}, status


def from_environment() -> FastAPI:
    """The app on the process's wxphone settings, for ``uvicorn --factory fastapi_app:from_environment``."""
    from worker.runtime import get_runtime

    return create_app(
        get_runtime().producer,
        appids=os.environ["EXAMPLE_APPIDS"].split(","),
        secret_key=os.environ["EXAMPLE_SECRET_KEY"],
    )
