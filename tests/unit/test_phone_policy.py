"""Retry timing of phone jobs: exponential backoff with jitter, and 45011 waiting for the next minute."""

from __future__ import annotations

import time
from types import SimpleNamespace
from typing import Any

import pytest

import worker.jobs.phone as phone
from worker.errors import RetryLaterError
from worker.jobs.phone import JobOutcome, JobPolicy
from worker.wechat.errors import (
    API_PHONE_NUMBER,
    WeChatBusyError,
    WeChatRateLimitedError,
    WeChatReplyLostError,
    WeChatUnreachableError,
)

POLICY = JobPolicy(fingerprint_key="unit-test-fingerprint-key", retry_backoff_base_seconds=1.0)


def job_run(policy: JobPolicy = POLICY) -> Any:
    # Backoff depends on the policy alone; no collaborator (database, token service) is needed.
    run = object.__new__(phone._JobRun)
    run.policy = policy
    return run


def frozen_wall_clock(monkeypatch: pytest.MonkeyPatch, now: float) -> None:
    monkeypatch.setattr(phone, "time", SimpleNamespace(time=lambda: now, monotonic=time.monotonic))


@pytest.mark.parametrize("seconds_into_minute", [0.0, 1.5, 30.0, 59.9])
def test_a_rate_limited_call_waits_for_the_next_minute(
    monkeypatch: pytest.MonkeyPatch, seconds_into_minute: float
) -> None:
    frozen_wall_clock(monkeypatch, 1_800_000_000.0 + seconds_into_minute)  # a whole minute + offset
    until_next_minute = 60.0 - seconds_into_minute
    error = WeChatRateLimitedError(api=API_PHONE_NUMBER, errcode=45011)
    delays = [job_run()._backoff_seconds(error, attempts) for attempts in (1, 2, 5)]
    for delay in delays:
        # Never earlier than the next minute, whatever the attempt; a little jitter after it.
        assert until_next_minute <= delay <= until_next_minute + 2.0


@pytest.mark.parametrize(
    "error",
    [
        WeChatBusyError(api=API_PHONE_NUMBER, errcode=-1),
        WeChatReplyLostError(api=API_PHONE_NUMBER, detail="HTTP 502"),
        WeChatUnreachableError(api=API_PHONE_NUMBER),
    ],
)
def test_other_transient_errors_back_off_exponentially_with_jitter_up_to_the_cap(
    error: RetryLaterError,
) -> None:
    run = job_run(
        JobPolicy(fingerprint_key="k" * 16, retry_backoff_base_seconds=1.0, retry_backoff_max_seconds=8.0)
    )
    for attempts, ceiling in [(1, 1.0), (2, 2.0), (3, 4.0), (4, 8.0), (5, 8.0), (12, 8.0)]:
        delays = [run._backoff_seconds(error, attempts) for _ in range(200)]
        # Jitter spreads retries over the upper half of the step so workers do not synchronise.
        assert all(ceiling / 2 <= delay <= ceiling for delay in delays), attempts
        assert max(delays) - min(delays) > ceiling / 10, attempts


def test_the_celery_result_carries_identifiers_and_status_only() -> None:
    outcome = JobOutcome("job-1", "failed", "invalid_code", retry_in_seconds=None)
    assert outcome.as_result() == {"job_id": "job-1", "status": "failed", "error_code": "invalid_code"}


def test_the_default_policy_matches_the_code_life() -> None:
    policy = JobPolicy(fingerprint_key="k" * 16)
    assert policy.code_lifetime_seconds == 300.0
    # A 45011 wait (up to 62 s) still fits several times into a code's life.
    assert policy.max_attempts * policy.retry_backoff_max_seconds <= policy.code_lifetime_seconds
