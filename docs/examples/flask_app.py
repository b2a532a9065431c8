"""A Flask front end on wxphone's producer API (docs/integration.md).

It answers the mini-program page of docs/integration.md with the routes and shapes of
``wxphone api``, so the page works against either:

- ``POST /v1/login {"appid", "js_code"}`` -> ``200 {"session", "openid", "unionid"}``
- ``POST /v1/phone {"code", "wait_seconds"}`` with ``Authorization: Bearer <session>`` ->
  ``200 {"job_id", "status": "succeeded", "phone": {"masked", "country_code"}}`` when the job
  ends within the wait, ``202 {"job_id", "status"}`` when it is still on its way, ``4xx
  {"error_code", "message"}`` otherwise
- ``GET /v1/phone/<job_id>?wait_seconds=N``: the same answer, for the session's own jobs only

A waiting request holds one thread of the server for up to ``max_wait_seconds``: run it threaded
(``flask run`` is; gunicorn needs ``--threads``). From docs/examples, with wxphone's settings in
the environment::

    EXAMPLE_APPIDS=wx1234567890abcdef EXAMPLE_SECRET_KEY=... flask --app 'flask_app:from_environment()' run
"""

from __future__ import annotations

import math
import os
from collections.abc import Collection
from typing import Any

from flask import Flask, request
from itsdangerous import BadData, URLSafeTimedSerializer

from worker.jobs.validation import InvalidInputError
from worker.producer import JobView, Producer, PublishError

#: The longest one request waits for a job; a client may ask for less.
MAX_WAIT_SECONDS = 10.0
#: How long ``POST /v1/login`` waits for its login job.
LOGIN_WAIT_SECONDS = 10.0
#: How long a session this front end signed stays valid.
SESSION_MAX_AGE_SECONDS = 24 * 3600
#: The label of this front end in wxphone's audit trail.
CALLER = "flask-example"

Reply = tuple[dict[str, Any], int]


def create_app(
    producer: Producer,
    *,
    appids: Collection[str],
    secret_key: str,
    max_wait_seconds: float = MAX_WAIT_SECONDS,
) -> Flask:
    """The app, on ``producer``, for the mini programs ``appids``, signing sessions with ``secret_key``."""
    app = Flask(__name__)
    sessions = URLSafeTimedSerializer(secret_key, salt="wxphone-example-session")

    def session_user() -> tuple[str, str] | None:
        """``(appid, openid)`` of the request's session, or None: the openid never comes from a body."""
        scheme, _, token = request.headers.get("Authorization", "").partition(" ")
        if scheme != "Bearer":
            return None
        try:
            appid, openid = sessions.loads(token, max_age=SESSION_MAX_AGE_SECONDS)
        except BadData:  # forged, expired or malformed
            return None
        return str(appid), str(openid)

    # --8<-- [start:answer]
    def answer(job: JobView) -> Reply:
        """The reply for a phone job: the masked number once it succeeded, never the full one."""
        if job.status == "succeeded" and job.openid is not None:
            user = producer.get_user(appid=job.appid, openid=job.openid)
            phone = {
                "masked": user.masked_phone_number if user else None,
                "country_code": user.country_code if user else None,
            }
            return {"job_id": job.job_id, "status": "succeeded", "phone": phone}, 200
        if job.status == "failed":
            return failed(job)
        return {"job_id": job.job_id, "status": job.status}, 202

    # --8<-- [end:answer]
    # --8<-- [start:login]
    @app.post("/v1/login")
    def login() -> Reply:
        body = request.get_json(silent=True)
        if not isinstance(body, dict):
            return error(400, "invalid_input", "send {appid, js_code}")
        appid = body.get("appid")
        if not isinstance(appid, str) or appid not in appids:
            return error(400, "invalid_input", "send the appid of a mini program served here and a js_code")
        try:
            job_id = producer.submit_login(appid=appid, js_code=body.get("js_code", ""), caller=CALLER)
        except InvalidInputError:
            return error(400, "invalid_input", "js_code must be the code wx.login returned")
        except PublishError:  # the broker refused the job or timed out; it is recorded failed
            return error(503, "enqueue_failed", "the login could not be queued; call wx.login again")
        job = producer.wait_for_job(job_id, LOGIN_WAIT_SECONDS)
        if job is None or not job.is_terminal:
            return error(503, "login_pending", "the login is taking too long; call wx.login again")
        if job.status != "succeeded" or job.openid is None:
            return failed(job)
        session = sessions.dumps([job.appid, job.openid])
        return {"session": session, "openid": job.openid, "unionid": job.unionid}, 200

    # --8<-- [end:login]
    # --8<-- [start:phone]
    @app.post("/v1/phone")
    def submit_phone() -> Reply:
        user = session_user()
        if user is None:
            return error(401, "unauthorized", "log in again")
        body = request.get_json(silent=True)
        if not isinstance(body, dict):
            return error(400, "invalid_input", "send {code, wait_seconds}")
        wait = wait_seconds(body.get("wait_seconds", 0), max_wait_seconds)
        if wait is None:
            return error(400, "invalid_input", "wait_seconds must be a number of seconds")
        appid, openid = user
        try:
            # Records the job, queues it, then waits (this thread) until it ends or the wait is over.
            job = producer.submit_phone_code(
                appid=appid, openid=openid, code=body.get("code", ""), caller=CALLER, wait_seconds=wait
            )
        except InvalidInputError:
            return error(400, "invalid_input", "code must be the code getPhoneNumber returned")
        except PublishError:  # the broker refused the job or timed out; it is recorded failed
            return error(503, "enqueue_failed", "the code could not be queued; tap the button again")
        return answer(job)

    @app.get("/v1/phone/<job_id>")
    def phone_job(job_id: str) -> Reply:
        user = session_user()
        if user is None:
            return error(401, "unauthorized", "log in again")
        wait = wait_seconds(request.args.get("wait_seconds", "0"), max_wait_seconds)
        if wait is None:
            return error(400, "invalid_input", "wait_seconds must be a number of seconds")
        job = producer.get_job(job_id)
        # Another user's job reads as no job at all.
        if job is None or job.kind != "phone" or (job.appid, job.openid) != user:
            return error(404, "not_found", "no such job")
        if not job.is_terminal and wait > 0:
            job = producer.wait_for_job(job_id, wait) or job
        return answer(job)

    # --8<-- [end:phone]
    return app


def wait_seconds(value: object, limit: float) -> float | None:
    """The wait a client asked for, at most ``limit``; None unless it is a number of seconds >= 0."""
    if isinstance(value, bool) or not isinstance(value, str | int | float):
        return None
    try:
        seconds = float(value)
    except (ValueError, OverflowError):
        return None
    if not math.isfinite(seconds) or seconds < 0:
        return None
    return min(seconds, limit)


def error(status: int, error_code: str, message: str) -> Reply:
    return {"error_code": error_code, "message": message}, status


# --8<-- [start:failed]
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


# --8<-- [end:failed]
def from_environment() -> Flask:
    """The app on the process's wxphone settings, for ``flask --app 'flask_app:from_environment()'``."""
    from worker.runtime import get_runtime

    return create_app(
        get_runtime().producer,
        appids=os.environ["EXAMPLE_APPIDS"].split(","),
        secret_key=os.environ["EXAMPLE_SECRET_KEY"],
    )
