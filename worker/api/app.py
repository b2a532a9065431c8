"""The ``wxphone api`` application: :func:`create_app` builds it from its collaborators.

Routes (their schemas are served at ``/openapi.json``):

* ``POST /v1/login`` ``{"appid", "js_code"}``: a login job, waited for up to
  ``WXPHONE_API_LOGIN_WAIT_SECONDS``; 200 with a session, or 202 with the job id.
* ``GET /v1/login/{job_id}?wait_seconds=N``: the session of a login that answered 202 (once).
* ``POST /v1/phone`` ``{"code", "wait_seconds"}`` with ``Authorization: Bearer <session>``: a
  phone job for the session's user; 200 with the masked number, or 202 with the job id.
* ``GET /v1/phone/{job_id}?wait_seconds=N``: the same answer, for the session's own jobs only.
* ``GET /healthz``: broker, Redis and database reachable (200) or not (503).

Waits hold no thread: they are :meth:`worker.producer.Producer.wait_for_job_async`, woken by the
database's notification when the job ends. The producer's blocking calls (submissions, reads) run
on the threadpool. Every error answers through a class of :mod:`worker.api.errors`.

No module of this package reads the environment: the settings come in as an argument.
"""

# No ``from __future__ import annotations`` here: FastAPI reads the route functions' annotations
# at run time, and the phone request model is built inside create_app.

import hashlib
import logging
import time
from collections.abc import AsyncIterator, Callable, Mapping
from contextlib import asynccontextmanager
from typing import Annotated, Any, Final

import psycopg
from fastapi import Depends, FastAPI, Path, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from pydantic import BaseModel
from redis import Redis, RedisError
from sqlalchemy.exc import SQLAlchemyError
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from worker.api.errors import (
    ApiError,
    InvalidRequestError,
    JobFailedError,
    MethodNotAllowedError,
    NotFoundError,
    PayloadTooLargeError,
    RateLimitedError,
    ServiceUnavailableError,
    UnauthorizedError,
    job_failure,
)
from worker.api.health import Check, HealthChecks, broker_check, database_check, redis_check
from worker.api.middleware import AccessLogMiddleware, BodyLimitMiddleware
from worker.api.models import (
    JOB_ID_SCHEMA_PATTERN,
    ErrorBody,
    HealthBody,
    JobErrorBody,
    LoginBody,
    LoginRequest,
    MaskedPhone,
    PendingJobBody,
    PendingStatus,
    PhoneBody,
    PhoneRequestBase,
    phone_request_model,
)
from worker.api.ratelimit import SessionRateLimiter
from worker.api.sessions import ApiSession, InvalidSessionError, SessionSigner
from worker.jobs.validation import InvalidInputError
from worker.producer import LOGIN_KIND, PHONE_KIND, JobReadTimeoutError, JobView, Producer, PublishError
from worker.settings import Settings

__all__ = ["API_CALLER", "MAX_BODY_BYTES", "create_app"]

log = logging.getLogger(__name__)

#: How the API's submissions are labelled in the exchange audit trail.
API_CALLER = "wxphone-api"
#: No valid request body comes near this (a code is at most 128 characters).
MAX_BODY_BYTES = 4096
SUCCEEDED: Final = "succeeded"
FAILED: Final = "failed"
#: Redis keys of login jobs whose session was handed out by ``GET /v1/login/{job_id}``, named by a
#: hash of the job id (the id is a capability until then).
REDEEMED_LOGIN_PREFIX = "wxphone:api:login-redeemed:"

_ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    400: {"model": ErrorBody, "description": "Malformed request (nothing was enqueued)"},
    413: {"model": ErrorBody, "description": "Request body too large"},
    503: {"model": ErrorBody, "description": "A dependency is unreachable: try again later"},
}
_SESSION_RESPONSES: dict[int | str, dict[str, Any]] = {
    401: {"model": ErrorBody, "description": "No valid session: log in again"},
    429: {
        "model": ErrorBody,
        "description": "Too many requests for this session",
        "headers": {"Retry-After": {"schema": {"type": "integer"}, "description": "Seconds to wait"}},
    },
}


def create_app(
    *,
    producer: Producer,
    redis: Redis,
    settings: Settings,
    health_checks: Mapping[str, Check] | None = None,
    clock: Callable[[], float] = time.time,
) -> FastAPI:
    """The API bound to ``producer`` (broker and database), ``redis`` (rate limits, redeemed
    logins) and ``settings`` (the ``api_*`` fields, the code lifetime and the session key).

    ``health_checks`` replaces the checks of ``/healthz`` (default: the broker of
    ``settings.broker_url``, ``redis`` and the producer's database); ``clock`` (epoch seconds)
    dates sessions. Raises :class:`worker.settings.SettingsError` when the session key is unset
    where the public development key is not allowed.
    """
    signer = SessionSigner(
        settings.field_api_session_key(), ttl_seconds=settings.api_session_ttl_seconds, clock=clock
    )
    limiter = SessionRateLimiter(redis, limit_per_window=settings.api_rate_limit_per_minute)
    checks = HealthChecks(
        health_checks
        if health_checks is not None
        else {
            "broker": broker_check(settings.broker_url),
            "redis": redis_check(redis),
            "database": database_check(producer.sessions),
        }
    )
    login_wait_seconds = settings.api_login_wait_seconds
    max_wait_seconds = settings.api_max_wait_seconds
    # A login job id answers with a session only while its code could still be alive: the id is a
    # bearer capability, and must not stay one for longer than a client needs to ask for it.
    login_redeem_seconds = settings.code_lifetime_seconds
    phone_request: type[PhoneRequestBase] = phone_request_model(max_wait_seconds)

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        yield
        checks.close()

    app = FastAPI(
        title="wxphone API",
        version="1",
        summary="WeChat Mini Program login and verified phone numbers",
        description=(
            "Log in with a `wx.login` code for a session, then exchange the phone-number button's "
            "code for the user's verified (masked) number. See docs/integration.md."
        ),
        docs_url=None,  # the interactive pages load scripts from a CDN; the schema is enough
        redoc_url=None,
        lifespan=lifespan,
    )
    app.add_middleware(
        BodyLimitMiddleware,
        max_body_bytes=MAX_BODY_BYTES,
        error_body=_error_body(PayloadTooLargeError()),
    )
    app.add_middleware(AccessLogMiddleware, fixed_paths=frozenset({app.openapi_url or "/openapi.json"}))
    _install_error_handlers(app)

    bearer = HTTPBearer(
        auto_error=False, bearerFormat="opaque", description="The session from POST /v1/login"
    )

    async def current_session(
        credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)],
    ) -> ApiSession:
        """The caller's valid session, counted against its rate limit."""
        if credentials is None:
            raise UnauthorizedError()
        try:
            session = signer.verify(credentials.credentials)
        except InvalidSessionError:
            raise UnauthorizedError() from None
        decision = await run_in_threadpool(limiter.hit, session.session_id)
        if not decision.allowed:
            raise RateLimitedError(retry_after_seconds=decision.retry_after_seconds)
        return session

    Session = Annotated[ApiSession, Depends(current_session)]
    JobId = Annotated[str, Path(min_length=1, max_length=64, pattern=JOB_ID_SCHEMA_PATTERN)]
    WaitSeconds = Annotated[
        float,
        Query(
            ge=0,
            le=max_wait_seconds,
            allow_inf_nan=False,
            description="How long to wait for the job to end before answering 202 (seconds)",
        ),
    ]

    async def read_job(job_id: str) -> JobView | None:
        return await run_in_threadpool(producer.get_job, job_id)

    async def wait(job: JobView, wait_seconds: float) -> JobView:
        if job.is_terminal or wait_seconds <= 0:
            return job
        waited = await producer.wait_for_job_async(job.job_id, wait_seconds)
        return waited if waited is not None else job

    def login_answer(job: JobView) -> JSONResponse:
        if job.status == SUCCEEDED and job.openid:
            token, _ = signer.mint(appid=job.appid, openid=job.openid)
            body = LoginBody(
                session=token,
                openid=job.openid,
                unionid=job.unionid,
                expires_in_seconds=int(settings.api_session_ttl_seconds),
            )
            return _json(body, 200)
        if job.status in (SUCCEEDED, FAILED):
            # A login's failure carries no job id: the caller never needs it again.
            raise job_failure(job_id=None, error_code=job.error_code if job.status == FAILED else None)
        return _json(PendingJobBody(job_id=job.job_id, status=_pending(job.status)), 202)

    async def phone_answer(job: JobView, session: ApiSession) -> JSONResponse:
        if job.status == SUCCEEDED:
            user = await run_in_threadpool(
                lambda: producer.get_user(appid=session.appid, openid=session.openid)
            )
            masked = user.masked_phone_number if user is not None else None
            if user is None or masked is None:
                # Succeeded jobs commit the number with their status: only a deleted user is here.
                raise ServiceUnavailableError("the verified number is no longer recorded")
            return _json(
                PhoneBody(
                    job_id=job.job_id,
                    status=SUCCEEDED,
                    phone=MaskedPhone(masked=masked, country_code=user.country_code),
                ),
                200,
            )
        if job.status == FAILED:
            raise job_failure(job_id=job.job_id, error_code=job.error_code)
        return _json(PendingJobBody(job_id=job.job_id, status=_pending(job.status)), 202)

    def owns(job: JobView | None, session: ApiSession) -> bool:
        return (
            job is not None
            and job.kind == PHONE_KIND
            and job.appid == session.appid
            and job.openid == session.openid
        )

    async def redeem(job_id: str) -> bool:
        """Mark the session of a succeeded login job as handed out; False if it already was. A
        login job id (a Celery task id: in logs, the broker, ``wxphone job show``) mints at most
        one session, whether it was answered at once or followed up."""
        marked = await run_in_threadpool(
            lambda: redis.set(
                REDEEMED_LOGIN_PREFIX + hashlib.sha256(job_id.encode()).hexdigest(),
                1,
                nx=True,
                ex=int(login_redeem_seconds) + 60,
            )
        )
        return bool(marked)

    @app.post(
        "/v1/login",
        summary="Log in with a wx.login code",
        operation_id="login",
        response_model=None,
        responses={
            200: {"model": LoginBody, "description": "Logged in"},
            202: {
                "model": PendingJobBody,
                "description": "Not finished yet: GET /v1/login/{job_id}",
                "links": {"LoginJob": _job_link("login_job")},
            },
            404: {"model": ErrorBody, "description": "This login's session was already handed out"},
            422: {"model": ErrorBody, "description": "WeChat refused the code: call wx.login again"},
            **_ERROR_RESPONSES,
        },
        tags=["login"],
    )
    async def login(request: LoginRequest) -> JSONResponse:
        """Exchange the code through a login job and answer with a session (never WeChat's
        session_key). A login that takes longer than the configured wait answers 202 with the
        job id, to be asked for with ``GET /v1/login/{job_id}``."""
        job_id = await _submitted(
            lambda: producer.submit_login(appid=request.appid, js_code=request.js_code, caller=API_CALLER)
        )
        job = await producer.wait_for_job_async(job_id, login_wait_seconds)
        if job is None:
            raise ServiceUnavailableError()  # recorded before it was sent: only a deleted row
        if job.status == SUCCEEDED and not await redeem(job_id):
            raise NotFoundError()  # never: this request is the first to see its success
        return login_answer(job)

    @app.get(
        "/v1/login/{job_id}",
        summary="The session of a login that answered 202",
        operation_id="login_job",
        response_model=None,
        responses={
            200: {"model": LoginBody, "description": "Logged in"},
            202: {"model": PendingJobBody, "description": "Not finished yet"},
            404: {"model": ErrorBody, "description": "No such login, or its session was handed out"},
            422: {"model": ErrorBody, "description": "WeChat refused the code: call wx.login again"},
            **_ERROR_RESPONSES,
        },
        tags=["login"],
    )
    async def login_job(job_id: JobId, wait_seconds: WaitSeconds = 0) -> JSONResponse:
        """Wait up to ``wait_seconds`` for the login; once it succeeded, answer with a session.
        A login's session is handed out once, and only within the login code's life."""
        job = await read_job(job_id)
        if job is None or job.kind != LOGIN_KIND or _age_seconds(job, clock) > login_redeem_seconds:
            raise NotFoundError()
        job = await wait(job, wait_seconds)
        if job.status == SUCCEEDED and not await redeem(job_id):
            raise NotFoundError()
        return login_answer(job)

    @app.post(
        "/v1/phone",
        summary="Exchange a phone-number code",
        operation_id="submit_phone_code",
        response_model=None,
        responses={
            200: {
                "model": PhoneBody,
                "description": "The owner's verified number, masked",
                "links": {"PhoneJob": _job_link("phone_job")},
            },
            202: {
                "model": PendingJobBody,
                "description": "Not finished yet: GET /v1/phone/{job_id}",
                "links": {"PhoneJob": _job_link("phone_job")},
            },
            400: {"model": ErrorBody, "description": "Malformed request (nothing was enqueued)"},
            422: {
                "model": JobErrorBody,
                "description": "WeChat refused the code: get a new one",
                "links": {"PhoneJob": _job_link("phone_job")},
            },
            503: {"model": JobErrorBody, "description": "Not exchanged, or a dependency is unreachable"},
            **{key: value for key, value in _ERROR_RESPONSES.items() if key not in (400, 503)},
            **_SESSION_RESPONSES,
        },
        tags=["phone"],
    )
    async def phone(session: Session, request: phone_request) -> JSONResponse:  # type: ignore[valid-type]
        """Submit the code of the phone-number button for the session's user (the openid comes
        from the session) and wait up to ``wait_seconds`` for the verified number."""
        body: PhoneRequestBase = request
        job_id = await _submitted(
            lambda: producer.submit_phone_code(
                appid=session.appid, openid=session.openid, code=body.code, caller=API_CALLER
            )
        )
        job = await producer.wait_for_job_async(job_id, body.wait_seconds)
        if job is None:
            raise ServiceUnavailableError()
        return await phone_answer(job, session)

    @app.get(
        "/v1/phone/{job_id}",
        summary="A phone job of this session's user",
        operation_id="phone_job",
        response_model=None,
        responses={
            200: {"model": PhoneBody, "description": "The owner's verified number, masked"},
            202: {"model": PendingJobBody, "description": "Not finished yet"},
            404: {"model": ErrorBody, "description": "No such job for this user"},
            422: {"model": JobErrorBody, "description": "WeChat refused the code: get a new one"},
            503: {"model": JobErrorBody, "description": "Not exchanged, or a dependency is unreachable"},
            **{key: value for key, value in _ERROR_RESPONSES.items() if key != 503},
            **_SESSION_RESPONSES,
        },
        tags=["phone"],
    )
    async def phone_job(session: Session, job_id: JobId, wait_seconds: WaitSeconds = 0) -> JSONResponse:
        """Wait up to ``wait_seconds`` for one of the session user's phone jobs. Another user's
        job, a login job and an unknown id all answer 404 alike."""
        job = await read_job(job_id)
        if job is None or not owns(job, session):
            raise NotFoundError()
        return await phone_answer(await wait(job, wait_seconds), session)

    @app.get(
        "/healthz",
        summary="Are the broker, Redis and the database reachable?",
        operation_id="healthz",
        response_model=None,
        responses={
            200: {"model": HealthBody, "description": "All reachable"},
            503: {"model": HealthBody, "description": "At least one unreachable"},
        },
        tags=["operations"],
    )
    async def healthz() -> JSONResponse:
        """Each dependency as ``ok`` or ``unreachable`` (no URL, host or password)."""
        report = await checks.run()
        body = HealthBody(status="ok" if report.healthy else "unavailable", checks=report.checks)
        return _json(body, 200 if report.healthy else 503)

    return app


def _job_link(operation_id: str) -> dict[str, Any]:
    """An OpenAPI link: the ``job_id`` of this response is the path parameter of that operation."""
    return {"operationId": operation_id, "parameters": {"job_id": "$response.body#/job_id"}}


async def _submitted(submit: Callable[[], str]) -> str:
    """Run a producer submission on the threadpool; its refusals become API errors."""
    try:
        return await run_in_threadpool(submit)
    except InvalidInputError:
        # The models check what the producer checks, so this is a gap between the two.
        raise InvalidRequestError() from None
    except (PublishError, TimeoutError):
        # The broker did not take the job (it is marked failed, or was never sent).
        raise ServiceUnavailableError() from None


def _pending(status: str) -> PendingStatus:
    """A job status that is not terminal, as the 202 body states it."""
    if status == "running":
        return "running"
    if status == "retrying":
        return "retrying"
    return "queued"


def _age_seconds(job: JobView, clock: Callable[[], float]) -> float:
    return clock() - job.created_at.timestamp()


def _json(body: BaseModel, status_code: int, headers: Mapping[str, str] | None = None) -> JSONResponse:
    return JSONResponse(body.model_dump(mode="json"), status_code=status_code, headers=headers)


def _error_body(error: ApiError) -> dict[str, str]:
    if isinstance(error, JobFailedError) and error.job_id is not None:
        return JobErrorBody(
            job_id=error.job_id, error_code=error.error_code, message=error.message
        ).model_dump()
    return ErrorBody(error_code=error.error_code, message=error.message).model_dump()


def _error_response(error: ApiError) -> JSONResponse:
    return JSONResponse(_error_body(error), status_code=error.status_code, headers=error.headers())


#: Starlette's own HTTP errors (routing, body parsing) answered through the API's classes.
_HTTP_STATUS_ERRORS: dict[int, type[ApiError]] = {
    400: InvalidRequestError,
    404: NotFoundError,
    405: MethodNotAllowedError,
    413: PayloadTooLargeError,
}

#: Validation messages name at most this many problems (a client learns what to fix).
MAX_REPORTED_PROBLEMS = 3


def _validation_message(error: RequestValidationError) -> str:
    """Where each problem is and what it is: pydantic's message and the field's location, never
    the value sent (it may be a code)."""
    problems = []
    for detail in error.errors()[:MAX_REPORTED_PROBLEMS]:
        where = ".".join(str(part)[:64] for part in detail.get("loc", ()) if not isinstance(part, int))
        problems.append(f"{where}: {detail.get('msg', 'invalid')}")
    return "; ".join(problems) or "the request is malformed"


def _install_error_handlers(app: FastAPI) -> None:
    async def api_error(_: Request, error: Exception) -> JSONResponse:
        assert isinstance(error, ApiError)
        return _error_response(error)

    async def validation_error(_: Request, error: Exception) -> JSONResponse:
        assert isinstance(error, RequestValidationError)
        return _error_response(InvalidRequestError(_validation_message(error)))

    async def http_error(_: Request, error: Exception) -> JSONResponse:
        assert isinstance(error, StarletteHTTPException)
        api_class = _HTTP_STATUS_ERRORS.get(error.status_code)
        if error.status_code == 404:
            answer: ApiError = NotFoundError("no such path")  # the router's: no route serves it
        else:
            answer = api_class() if api_class is not None else ApiError()
        response = _error_response(answer)
        if api_class is None:
            response.status_code = error.status_code
        for name, value in (error.headers or {}).items():
            response.headers[name] = value  # the Allow header of a 405
        return response

    async def unavailable(_: Request, error: Exception) -> JSONResponse:
        # The database or Redis could not be reached (or refused): the client may try again.
        log.warning("a dependency failed: %s", type(error).__name__)
        return _error_response(ServiceUnavailableError())

    async def internal(_: Request, error: Exception) -> JSONResponse:
        log.error("internal error answering a request: %s", type(error).__name__)
        return _error_response(ApiError())

    app.add_exception_handler(ApiError, api_error)
    app.add_exception_handler(RequestValidationError, validation_error)
    app.add_exception_handler(StarletteHTTPException, http_error)
    for dependency_error in (SQLAlchemyError, psycopg.Error, RedisError, JobReadTimeoutError):
        app.add_exception_handler(dependency_error, unavailable)
    app.add_exception_handler(Exception, internal)
