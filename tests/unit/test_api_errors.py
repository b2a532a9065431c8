"""The API answers each failure by its class: every error code a job can store has one answer."""

from __future__ import annotations

import importlib
import pkgutil

import pytest

import worker
from worker.api.errors import (
    ANSWERS_BY_ERROR_CODE,
    ERROR_MESSAGES,
    ApiError,
    CodeRejectedError,
    InvalidRequestError,
    JobInputRejectedError,
    JobNotDoneError,
    NotFoundError,
    PayloadTooLargeError,
    RateLimitedError,
    ServiceUnavailableError,
    UnauthorizedError,
    answer_for,
    job_failure,
)
from worker.errors import WxphoneError


def all_subclasses(cls: type[WxphoneError]) -> set[type[WxphoneError]]:
    found = set(cls.__subclasses__())
    for sub in list(found):
        found |= all_subclasses(sub)
    return found


def test_every_wxphone_error_code_is_answered_as_its_class_reacts() -> None:
    # Import every module of the package, so that every error class exists.
    for module in pkgutil.walk_packages(worker.__path__, "worker."):
        if not module.name.endswith("__main__"):  # those run the command line
            importlib.import_module(module.name)
    classes = all_subclasses(WxphoneError)
    assert len(classes) > 30
    for error_class in classes:
        assert ANSWERS_BY_ERROR_CODE.get(error_class.error_code) is answer_for(error_class), error_class


@pytest.mark.parametrize(
    ("error_code", "answer", "status"),
    [
        ("invalid_input", JobInputRejectedError, 400),
        ("app_not_configured", JobInputRejectedError, 400),
        ("invalid_code", CodeRejectedError, 422),
        ("high_risk_user", CodeRejectedError, 422),
        ("code_reused", CodeRejectedError, 422),
        ("watermark_mismatch", CodeRejectedError, 422),
        ("upstream_unavailable", JobNotDoneError, 503),
        ("quota_exhausted", JobNotDoneError, 503),
        ("wechat_config_error", JobNotDoneError, 503),
        ("reply_lost", JobNotDoneError, 503),
        ("code_expired", JobNotDoneError, 503),
        ("enqueue_failed", JobNotDoneError, 503),
        ("an_error_code_from_a_later_release", JobNotDoneError, 503),
        (None, JobNotDoneError, 503),
    ],
)
def test_a_failed_job_is_answered_by_the_class_of_its_error(
    error_code: str | None, answer: type[ApiError], status: int
) -> None:
    failure = job_failure(job_id="job-1", error_code=error_code)
    assert type(failure) is answer
    assert failure.status_code == status
    assert failure.error_code == (error_code or "internal_error")
    assert failure.job_id == "job-1"
    assert failure.message == ERROR_MESSAGES.get(failure.error_code, answer.default_message)


def test_the_api_errors_statuses_and_headers() -> None:
    assert [cls.status_code for cls in (InvalidRequestError, UnauthorizedError, NotFoundError)] == [
        400,
        401,
        404,
    ]
    assert [cls.status_code for cls in (PayloadTooLargeError, ServiceUnavailableError)] == [413, 503]
    assert UnauthorizedError().headers() == {"WWW-Authenticate": "Bearer"}
    limited = RateLimitedError(retry_after_seconds=0)
    assert (limited.status_code, limited.headers()) == (429, {"Retry-After": "1"})
