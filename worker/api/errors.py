"""The errors of ``wxphone api``, each mapped to an HTTP status by its class.

::

    ApiError                          500 internal_error
    ├── InvalidRequestError           400 invalid_input: malformed JSON, a missing, mistyped,
    │                                     oversized or unprintable field (nothing is enqueued)
    ├── UnauthorizedError             401 unauthorized: no session, or an unknown, expired or
    │                                     tampered one (log in again)
    ├── NotFoundError                 404 not_found: no such job for this caller (also another
    │                                     user's job, and a job of the other kind)
    ├── MethodNotAllowedError         405 method_not_allowed
    ├── PayloadTooLargeError          413 payload_too_large
    ├── RateLimitedError              429 rate_limited, with Retry-After
    ├── ServiceUnavailableError       503 service_unavailable: the broker, the database or Redis
    │                                     cannot be reached now (try again later)
    └── JobFailedError                the job ended ``failed``; its stored ``error_code`` is kept
        ├── JobInputRejectedError     400 invalid_input, app_not_configured
        ├── CodeRejectedError         422 WeChat refused the code itself (invalid_code = 40029,
        │                                 high_risk_user = 40226, code_reused, ...): get a new one
        └── JobNotDoneError           503 the service could not get WeChat's answer in the
                                          code's life (upstream_unavailable, quota_exhausted,
                                          wechat_config_error, code_expired, reply_lost, ...)

A failed job's ``error_code`` (a stable identifier stored in PostgreSQL) is mapped to one of the
three job classes through the wxphone error class that produced it (:mod:`worker.errors`'s four
reactions), or, for codes no class carries, through :data:`STORED_ONLY_ERROR_CODES`. Response
messages come from this module, never from an exception's text: they carry no code, secret or
number.
"""

from __future__ import annotations

from typing import ClassVar

from worker.errors import (
    OperatorActionRequiredError,
    RequestRejectedError,
    RetryLaterError,
    TokenInvalidError,
    WxphoneError,
)
from worker.jobs.phone import (
    CODE_REUSED_ERROR_CODE,
    DATABASE_REJECTED_ERROR_CODE,
    INVALID_JOB_ID_ERROR_CODE,
    JOB_ID_REUSED_ERROR_CODE,
    REPLY_LOST_ERROR_CODE,
    ExchangeInterruptedError,
    RunnerLeaseLapsedError,
)
from worker.jobs.validation import AppNotConfiguredInputError, InvalidInputError
from worker.limits import CircuitOpenError, LimitsUnavailableError, LocallyRateLimitedError
from worker.liveness import LivenessUnavailableError
from worker.tokens.errors import AppNotConfiguredError as TokenAppNotConfiguredError
from worker.tokens.errors import (
    ForceRefreshFailedError,
    ForceRefreshRefusedError,
    TokenConfigurationError,
    TokenFetchBackoffError,
    TokenQuotaExhaustedError,
    TokenRejectedAfterRefreshError,
    TokenStoreUnavailableError,
    TokenWaitTimeoutError,
)
from worker.wechat.errors import (
    WeChatBusyError,
    WeChatConfigurationError,
    WeChatHighRiskUserError,
    WeChatInvalidCodeError,
    WeChatInvalidReplyError,
    WeChatQuotaExhaustedError,
    WeChatRateLimitedError,
    WeChatTokenRejectedError,
    WeChatTransportError,
    WeChatUnknownError,
)

__all__ = [
    "ApiError",
    "CodeRejectedError",
    "InvalidRequestError",
    "JobFailedError",
    "JobInputRejectedError",
    "JobNotDoneError",
    "MethodNotAllowedError",
    "NotFoundError",
    "PayloadTooLargeError",
    "RateLimitedError",
    "ServiceUnavailableError",
    "UnauthorizedError",
    "answer_for",
    "job_failure",
]


class ApiError(Exception):
    """Base class of the errors the API answers with; the class fixes the HTTP status."""

    status_code: ClassVar[int] = 500
    error_code: str = "internal_error"
    default_message: ClassVar[str] = "internal error"

    def __init__(self, message: str | None = None) -> None:
        self.message = message or self.default_message
        super().__init__(self.message)

    def headers(self) -> dict[str, str]:
        """HTTP headers the response carries besides its body."""
        return {}


class InvalidRequestError(ApiError):
    """The request is malformed; nothing was recorded or enqueued."""

    status_code = 400
    error_code = "invalid_input"
    default_message = "the request is malformed"


class UnauthorizedError(ApiError):
    """No valid session: missing, unknown, expired or tampered (the reason is not told)."""

    status_code = 401
    error_code = "unauthorized"
    default_message = "a valid session is required: log in again"

    def headers(self) -> dict[str, str]:
        return {"WWW-Authenticate": "Bearer"}


class NotFoundError(ApiError):
    """No such job for this caller; another user's job answers exactly the same."""

    status_code = 404
    error_code = "not_found"
    default_message = "no such job"


class MethodNotAllowedError(ApiError):
    """The path exists, but not with this HTTP method."""

    status_code = 405
    error_code = "method_not_allowed"
    default_message = "method not allowed"


class PayloadTooLargeError(ApiError):
    """The request body is larger than any valid request."""

    status_code = 413
    error_code = "payload_too_large"
    default_message = "the request body is too large"


class RateLimitedError(ApiError):
    """This session made too many requests in the current window."""

    status_code = 429
    error_code = "rate_limited"
    default_message = "too many requests for this session: retry after the time in Retry-After"

    def __init__(self, *, retry_after_seconds: int) -> None:
        super().__init__()
        self.retry_after_seconds = max(1, retry_after_seconds)

    def headers(self) -> dict[str, str]:
        return {"Retry-After": str(self.retry_after_seconds)}


class ServiceUnavailableError(ApiError):
    """A dependency (broker, database, Redis) cannot be reached now."""

    status_code = 503
    error_code = "service_unavailable"
    default_message = "the service is temporarily unavailable: try again later"


class JobFailedError(ApiError):
    """A job ended ``failed``: the response carries the job's own ``error_code``."""

    def __init__(self, *, job_id: str | None, error_code: str) -> None:
        super().__init__(ERROR_MESSAGES.get(error_code, type(self).default_message))
        self.job_id = job_id
        self.error_code = error_code


class JobInputRejectedError(JobFailedError):
    """The job's input was refused (malformed, or an appid this fleet does not serve)."""

    status_code = 400
    default_message = "the request was refused"


class CodeRejectedError(JobFailedError):
    """WeChat refused the code itself; the same code will never succeed."""

    status_code = 422
    default_message = "WeChat refused the code: get a new one from the user"


class JobNotDoneError(JobFailedError):
    """The service could not get WeChat's answer within the code's life."""

    status_code = 503
    default_message = "the code could not be exchanged: ask the user to try again"


#: Messages for the error codes a failed job may carry; any other gets its class's default.
ERROR_MESSAGES: dict[str, str] = {
    "invalid_input": "the request is malformed",
    "app_not_configured": "this appid is not served here",
    "invalid_code": "WeChat refused the code (invalid, expired or already used): get a new one",
    "high_risk_user": "WeChat blocked this user as high-risk",
    CODE_REUSED_ERROR_CODE: "this code was already submitted for another user",
    "watermark_mismatch": "WeChat's answer was for another app",
    REPLY_LOST_ERROR_CODE: "WeChat's answer for this code was lost: ask the user to tap again",
    "code_expired": "the code expired before it could be exchanged: ask the user to tap again",
    "quota_exhausted": "the app's WeChat quota for today is used up",
    "rate_limited": "WeChat's rate limit held the code back until it expired",
}

#: Error codes that jobs store without an error class carrying them (:mod:`worker.jobs.phone`,
#: :mod:`worker.jobs.sweep`, :mod:`worker.producer`), and how each is answered.
STORED_ONLY_ERROR_CODES: dict[str, type[JobFailedError]] = {
    # WeChat answered about this code, or another user's submission holds it: it is dead.
    CODE_REUSED_ERROR_CODE: CodeRejectedError,
    "watermark_mismatch": CodeRejectedError,
    # The service did not get the answer in time: nothing is wrong with the request itself.
    REPLY_LOST_ERROR_CODE: JobNotDoneError,
    "code_expired": JobNotDoneError,
    "worker_lost": JobNotDoneError,
    "enqueue_failed": JobNotDoneError,
    DATABASE_REJECTED_ERROR_CODE: JobNotDoneError,
    INVALID_JOB_ID_ERROR_CODE: JobNotDoneError,
    JOB_ID_REUSED_ERROR_CODE: JobNotDoneError,
}

#: The wxphone error classes whose ``error_code`` a job may store, so that the answer follows
#: their reaction (:mod:`worker.errors`). A test checks every subclass of WxphoneError: its error
#: code is here, answered as its own class would be.
JOB_ERROR_CLASSES: tuple[type[WxphoneError], ...] = (
    WxphoneError,  # internal_error: what an error of no known class is stored as
    RetryLaterError,
    TokenInvalidError,
    RequestRejectedError,
    OperatorActionRequiredError,
    InvalidInputError,
    AppNotConfiguredInputError,
    WeChatInvalidCodeError,
    WeChatHighRiskUserError,
    WeChatUnknownError,
    WeChatInvalidReplyError,
    WeChatBusyError,
    WeChatRateLimitedError,
    WeChatTransportError,
    WeChatTokenRejectedError,
    WeChatConfigurationError,
    WeChatQuotaExhaustedError,
    LocallyRateLimitedError,
    LimitsUnavailableError,
    CircuitOpenError,
    LivenessUnavailableError,
    ExchangeInterruptedError,
    RunnerLeaseLapsedError,
    TokenStoreUnavailableError,
    TokenWaitTimeoutError,
    TokenFetchBackoffError,
    TokenConfigurationError,
    TokenQuotaExhaustedError,
    TokenAppNotConfiguredError,
    TokenRejectedAfterRefreshError,
    ForceRefreshRefusedError,
    ForceRefreshFailedError,
)


def answer_for(error_class: type[WxphoneError]) -> type[JobFailedError]:
    """The job error class that answers a failure of ``error_class``."""
    if issubclass(error_class, (InvalidInputError, AppNotConfiguredInputError, TokenAppNotConfiguredError)):
        return JobInputRejectedError
    if issubclass(error_class, RequestRejectedError):
        return CodeRejectedError
    # RetryLaterError (retried until the code's life ran out), TokenInvalidError, and
    # OperatorActionRequiredError: the service's side, not the request's.
    return JobNotDoneError


def _answers_by_error_code() -> dict[str, type[JobFailedError]]:
    answers = dict(STORED_ONLY_ERROR_CODES)
    for error_class in JOB_ERROR_CLASSES:
        answer = answer_for(error_class)
        known = answers.setdefault(error_class.error_code, answer)
        if known is not answer:
            # Two classes with one error code but different reactions: the stored code could not
            # tell which happened. Caught by the tests, never at run time in a release.
            raise RuntimeError(f"error code {error_class.error_code} has two reactions")
    return answers


ANSWERS_BY_ERROR_CODE: dict[str, type[JobFailedError]] = _answers_by_error_code()


def job_failure(*, job_id: str | None, error_code: str | None) -> JobFailedError:
    """The error that answers a failed job with this stored ``error_code`` (an unknown or
    missing code is the service's side: :class:`JobNotDoneError`)."""
    code = error_code or "internal_error"
    answer = ANSWERS_BY_ERROR_CODE.get(code, JobNotDoneError)
    return answer(job_id=job_id, error_code=code)
