"""Celery tasks for phone-code and login jobs: thin adapters over the domain functions.

Task names, kwargs and queue are a stable interface; any Celery-protocol producer may send them
by name to queue ``wxphone``:

* ``wxphone.resolve_phone`` (``appid``, ``openid``, ``code``, optional ``caller``) ->
  ``{job_id, status, error_code}``
* ``wxphone.login`` (``appid``, ``js_code``, optional ``caller``) ->
  ``{status, error_code, appid, openid, unionid}``

``caller`` is a label for the audit trail (printable, at most 64 characters, else dropped).
"""

from __future__ import annotations

import contextlib
import logging
import random
import time
from typing import Any

import redis
from celery import Task
from celery.exceptions import Ignore, Reject, SoftTimeLimitExceeded, WorkerLostError
from celery.worker.request import Request
from sqlalchemy.exc import DBAPIError

from worker.app import app
from worker.db import is_transient_database_error
from worker.jobs.login import login_user
from worker.jobs.phone import INVALID_JOB_ID_ERROR_CODE, resolve_phone_job
from worker.jobs.sweep import sweep_stuck_jobs as sweep_stuck
from worker.jobs.validation import is_valid_task_id
from worker.liveness import release_dead_runners
from worker.runtime import get_runtime

log = logging.getLogger(__name__)

RESOLVE_PHONE = "wxphone.resolve_phone"
LOGIN = "wxphone.login"
SWEEP_STUCK_JOBS = "wxphone.sweep_stuck_jobs"


#: Time a run keeps free before its soft time limit when it waits out a countdown it could not
#: hand to the broker.
SOFT_LIMIT_MARGIN_SECONDS = 2.0


def _retry(task: Task, countdown: float, *, started: float) -> Exception:
    """``task.retry`` after ``countdown`` seconds, at most ``WXPHONE_RETRY_COUNTDOWN_MAX_SECONDS``
    (a longer wait is taken in hops: the task finds it must wait again and retries again). A
    countdown waits in a worker's unacknowledged set, and one that outlived the visibility timeout
    would come back as a second delivery.

    When the retry cannot be published (Redis down, RabbitMQ refusing or not confirming it within
    ``WXPHONE_PUBLISH_TIMEOUT_SECONDS``), requeue the message instead of dropping it (Celery rejects
    it *without* requeue, which loses the job), after waiting out the countdown here, as far as
    the soft time limit leaves time (``started``: the run's ``time.monotonic()`` at its start):
    RabbitMQ redelivers a requeued message at once, and without the wait a job that keeps
    retrying would loop through its attempts back to back. A soft time limit striking meanwhile
    still requeues: the message must not be acknowledged as a failure."""
    settings = get_runtime().settings
    countdown = min(countdown, settings.retry_countdown_max_seconds)
    try:
        retry: Exception = task.retry(
            countdown=countdown,
            timeout=settings.publish_timeout_seconds,
            confirm_timeout=settings.publish_timeout_seconds,
        )
    except Reject as rejected:
        left = (
            settings.task_soft_time_limit_seconds - (time.monotonic() - started) - SOFT_LIMIT_MARGIN_SECONDS
        )
        wait_seconds = max(0.0, min(countdown, left))
        log.warning(
            "the retry could not be published; the job goes back on the queue in %.0f s",
            wait_seconds,
            extra={"job_id": task.request.id},
        )
        with contextlib.suppress(SoftTimeLimitExceeded):
            time.sleep(wait_seconds)
        requeued: Exception = Reject(rejected.reason, requeue=True)
        return requeued
    except SoftTimeLimitExceeded:
        log.warning("the soft time limit struck while publishing a retry; the job goes back on the queue")
        struck: Exception = Reject("soft time limit while publishing a retry", requeue=True)
        return struck
    return retry


class JobRequest(Request):  # type: ignore[misc]
    """A task request that, in a prefork worker, releases the liveness lease of a pool child it
    saw die mid-task (SIGKILL, OOM) before the message is requeued: the requeued run may then take
    the job over at once instead of waiting for the dead child's lease to lapse."""

    def on_failure(self, exc_info: Any, send_failed_event: bool = True, return_ok: bool = False) -> None:
        # The pool hands the exception over wrapped (billiard's ExceptionWithTraceback).
        error = getattr(exc_info.exception, "exc", exc_info.exception)
        if isinstance(error, WorkerLostError) and self.worker_pid:
            try:
                release_dead_runners(get_runtime().redis, self.worker_pid)
            except redis.RedisError:
                log.warning("could not release a dead pool child's liveness lease; it lapses by itself")
        super().on_failure(exc_info, send_failed_event=send_failed_event, return_ok=return_ok)


def _database_backoff(retries: int) -> float:
    """Backoff while PostgreSQL is unreachable (before any exchange), capped by the settings."""
    ceiling = get_runtime().settings.database_retry_max_seconds
    return min(ceiling, 2.0**retries) * random.uniform(0.5, 1.0)


@app.task(name=RESOLVE_PHONE, bind=True, max_retries=None, Request=JobRequest)
def resolve_phone(self: Task, *args: Any, **kwargs: Any) -> dict[str, Any]:
    """Resolve one phone code into the user's phone number (job id = this task's id)."""
    started = time.monotonic()
    runtime = get_runtime()
    # Positional arguments are not part of the interface; they count as invalid input.
    appid, openid, code = (
        (None, None, None) if args else (kwargs.get("appid"), kwargs.get("openid"), kwargs.get("code"))
    )
    try:
        outcome = resolve_phone_job(
            job_id=self.request.id,
            appid=appid,
            openid=openid,
            code=code,
            engine=runtime.engine,
            token_service=runtime.token_service,
            client=runtime.wechat_client,
            policy=runtime.job_policy,
            gate=runtime.gate,
            lease=runtime.lease,
            earlier_retries=self.request.retries,
            interruptions=(SoftTimeLimitExceeded,),
            protection=runtime.protection,
            caller=None if args else kwargs.get("caller"),
        )
    except DBAPIError as error:
        log.warning(
            "database error, job retries: %s", type(error).__name__, extra={"job_id": self.request.id}
        )
        raise _retry(self, _database_backoff(self.request.retries), started=started) from None
    if outcome.retry_in_seconds is not None:
        raise _retry(self, outcome.retry_in_seconds, started=started)
    if not outcome.reports_job:
        # This run was taken over (or its job closed) meanwhile, or the task id is another job's:
        # the run that holds the job stores the task's result; a result stored now would be the
        # first, and Celery keeps a task's first result.
        raise Ignore()
    return outcome.as_result()


@app.task(name=LOGIN, bind=True, max_retries=None)
def login(self: Task, *args: Any, **kwargs: Any) -> dict[str, Any]:
    """Exchange a wx.login code for openid/unionid and record the user."""
    started = time.monotonic()
    runtime = get_runtime()
    if not is_valid_task_id(self.request.id):
        # The audit row of the call could never be written: refuse before the code is spent.
        log.warning("login refused: its task id cannot be recorded")
        return {"status": "failed", "error_code": INVALID_JOB_ID_ERROR_CODE}
    appid, js_code = (None, None) if args else (kwargs.get("appid"), kwargs.get("js_code"))
    try:
        outcome = login_user(
            appid=appid,
            js_code=js_code,
            attempt=self.request.retries + 1,
            sessions=runtime.sessions,
            client=runtime.wechat_client,
            apps=runtime.settings.apps_by_id,
            policy=runtime.job_policy,
            gate=runtime.gate,
            protection=runtime.protection,
            task_id=self.request.id,
            caller=None if args else kwargs.get("caller"),
            lease=runtime.lease,
            run_claims=runtime.run_claims,
        )
    except DBAPIError as error:
        if not is_transient_database_error(error):
            log.error(
                "login failed: PostgreSQL refused a statement (%s)",
                type(error.orig).__name__,
                extra={"task_id": self.request.id},
            )
            return {"status": "failed", "error_code": "database_rejected"}
        log.warning(
            "database error, login retries: %s", type(error).__name__, extra={"task_id": self.request.id}
        )
        raise _retry(self, _database_backoff(self.request.retries), started=started) from None
    if outcome.retry_in_seconds is not None:
        raise _retry(self, outcome.retry_in_seconds, started=started)
    return outcome.as_result()


@app.task(name=SWEEP_STUCK_JOBS, ignore_result=True)
def sweep_stuck_jobs() -> dict[str, int]:
    """Close jobs stuck past their code's life (scheduled by beat on queue ``wxphone.token``)."""
    runtime = get_runtime()
    return sweep_stuck(sessions=runtime.sessions, stale_claim_seconds=runtime.settings.stale_claim_seconds)
