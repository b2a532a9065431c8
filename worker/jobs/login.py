"""Login: exchange a ``wx.login`` code for openid/unionid and record the user.

The session_key WeChat returns is never returned or logged; it is stored encrypted
(``users.session_key_encrypted``, bound to the user's row). Every code2Session call appends one
row to ``exchange_audit``; a successful call's row is committed with the user row.

Each login is a durable job, a ``login_jobs`` row keyed by the task id (recorded by the producer,
or by the first run for a task sent by another Celery client): queued, running, retrying,
succeeded (with openid and unionid, written in the transaction that records the user and the
call's audit row) or failed (with its error code). The row's end notifies waiting front ends
(:mod:`worker.waiting`).

A login code can be exchanged once. A task that runs again after its login ended (its message
redelivered because the worker died before acknowledging it) finds its job ended and returns the
stored outcome instead of presenting the spent code to WeChat again. Once
code2Session has answered, the code is spent and the session_key exists nowhere else, so the user
write is retried in-process while PostgreSQL is unreachable instead of running the task again.

A delivery of the task while another run of it is at WeChat (a dropped broker connection puts
the messages of running tasks back on the queue) waits for that run: each run claims the task in
Redis for its worker process (:class:`worker.liveness.RunClaims`), and a copy takes the claim
over only when the holder's liveness lease has lapsed. A run presents the code only while its
process's lease surely holds (self-fencing, as for phone jobs).

Retries (at most :data:`MAX_LOGIN_ATTEMPTS` runs, well inside the code's 5-minute life) follow the
failure: WeChat busy or unreachable, or the fleet's limits store (Redis) unreachable before the
call, back off exponentially; a 45011 waits for the next minute. code2Session's 45011 is a
per-user limit (100 calls per user per minute), so it delays only the login that met it and never
pauses the app's other logins.
"""

from __future__ import annotations

import dataclasses
import logging
import random
import time
from collections.abc import Mapping
from contextlib import suppress
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Literal

from sqlalchemy import func, update
from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.orm import Session, sessionmaker

from models import TERMINAL_JOB_STATUSES, LoginJob, PhoneJobStatus, User
from models.exchange_audit import AuditApi
from worker.audit import AuditEntry, append_rows, audit_row, clean_caller, record_exchange
from worker.crypto import DataProtection, default_protection, row_key_version, users_context
from worker.db import retry_while_unreachable
from worker.errors import OperatorActionRequiredError, RequestRejectedError, RetryLaterError, WxphoneError
from worker.jobs.phone import JobPolicy, RunnerLeaseLapsedError
from worker.jobs.validation import ValidatedLogin, code_fingerprint, display_identifier, validate_login
from worker.limits import (
    API_LOGIN,
    CallGate,
    CircuitOpenError,
    LocallyRateLimitedError,
    seconds_to_window_end,
)
from worker.liveness import LivenessUnavailableError, RunClaims, RunnerLease
from worker.settings import AppCredentials
from worker.wechat.client import WeChatClient
from worker.wechat.errors import WeChatQuotaExhaustedError, WeChatRateLimitedError

__all__ = ["LoginOutcome", "login_user"]

log = logging.getLogger(__name__)

#: A login code lives 5 minutes; a handful of backed-off attempts fits well inside that.
MAX_LOGIN_ATTEMPTS = 5
#: A login code's life, from WeChat's documentation: a login job's expiry.
LOGIN_CODE_LIFETIME_SECONDS = 300.0
#: Open statuses: the job may still change.
_OPEN = [PhoneJobStatus.QUEUED.value, PhoneJobStatus.RUNNING.value, PhoneJobStatus.RETRYING.value]


@dataclass(frozen=True)
class LoginOutcome:
    """The result of one login attempt; ``retry_in_seconds`` is set when it must run again."""

    status: Literal["succeeded", "failed", "retrying"]
    error_code: str | None = None
    appid: str | None = None
    openid: str | None = None
    unionid: str | None = None
    retry_in_seconds: float | None = None

    def as_result(self) -> dict[str, Any]:
        """The Celery task result: identifiers only; never the session_key."""
        return {
            "status": self.status,
            "error_code": self.error_code,
            "appid": self.appid,
            "openid": self.openid,
            "unionid": self.unionid,
        }


def login_user(
    *,
    appid: object,
    js_code: object,
    attempt: int,
    sessions: sessionmaker[Session],
    client: WeChatClient,
    apps: Mapping[str, AppCredentials],
    policy: JobPolicy,
    gate: CallGate | None = None,
    protection: DataProtection | None = None,
    task_id: str | None = None,
    caller: object = None,
    lease: RunnerLease | None = None,
    run_claims: RunClaims | None = None,
) -> LoginOutcome:
    """Run one login attempt; retryable failures ask for another attempt with backoff.

    ``protection`` encrypts the session_key (default: the process's keys); ``task_id`` and
    ``caller`` go to the audit row of the WeChat call. With ``lease`` and ``run_claims`` (workers
    pass both), the run claims the task first and waits for another live run of it.
    """
    try:
        login = validate_login(appid=appid, js_code=js_code, configured_appids=apps.keys())
    except RequestRejectedError as error:
        if task_id is not None:
            _record_rejected(sessions, task_id=task_id, appid=appid, error_code=error.error_code)
        return LoginOutcome("failed", error.error_code)
    credentials = apps[login.appid]
    fingerprint = code_fingerprint(policy.fingerprint_key, login.appid, login.js_code)
    if task_id is not None:
        done = _record_or_read_job(sessions, task_id=task_id, appid=login.appid)
        if done is not None:
            return done
    if lease is None or run_claims is None or task_id is None:
        outcome = _started_attempt(
            login, attempt, sessions, client, credentials, policy, gate, protection, task_id, caller,
            fingerprint, lease=None, runner=None,
        )  # fmt: skip
        return _settle_job(sessions, task_id, outcome)
    lease.start()  # a claim never names a runner that has not taken its lease
    runner = lease.runner_id
    with lease.running(task_id):
        try:
            wait_seconds = run_claims.claim(task_id, runner)
        except LivenessUnavailableError as error:
            return _settle_job(sessions, task_id, _retry_or_fail(error, login.appid, attempt, policy))
        if wait_seconds is not None:
            # The other run owns the job's row: this delivery changes nothing in it.
            log.info("login runs elsewhere; looking again in %.1fs", wait_seconds, extra={"task_id": task_id})
            return LoginOutcome(
                "retrying", "running_elsewhere", appid=login.appid, retry_in_seconds=wait_seconds
            )
        try:
            outcome = _started_attempt(
                login, attempt, sessions, client, credentials, policy, gate, protection, task_id, caller,
                fingerprint, lease=lease, runner=runner,
            )  # fmt: skip
            return _settle_job(sessions, task_id, outcome)
        finally:
            run_claims.release(task_id, runner)


def _started_attempt(
    login: ValidatedLogin,
    attempt: int,
    sessions: sessionmaker[Session],
    client: WeChatClient,
    credentials: AppCredentials,
    policy: JobPolicy,
    gate: CallGate | None,
    protection: DataProtection | None,
    task_id: str | None,
    caller: object,
    fingerprint: str,
    *,
    lease: RunnerLease | None,
    runner: str | None,
) -> LoginOutcome:
    """Mark the job ``running`` (one more attempt), then run :func:`_attempt`; a job that ended
    meanwhile (another run finished it) returns its stored outcome, and one whose code is past its
    life fails ``code_expired``, both without a call."""
    if task_id is not None:
        with sessions.begin() as session:
            started = session.execute(
                update(LoginJob)
                .where(
                    LoginJob.job_id == task_id,
                    LoginJob.status.in_(_OPEN),
                    # PostgreSQL's clock, as for phone jobs: a code past its life is never presented.
                    LoginJob.code_expires_at > func.now(),
                )
                .values(
                    status=PhoneJobStatus.RUNNING.value,
                    attempts=LoginJob.attempts + 1,
                    started_at=func.coalesce(LoginJob.started_at, func.now()),
                )
                .returning(LoginJob.job_id)
            ).scalar_one_or_none()
        if started is None:
            done = _stored_outcome(sessions, task_id)
            if done is not None:
                return done
            # Open, but its code's life is over (a backlog, workers down): WeChat would refuse
            # it, and a code is never presented past its life.
            log.warning("login code expired before it could be exchanged", extra={"task_id": task_id})
            return LoginOutcome("failed", "code_expired", appid=login.appid)
    return _attempt(
        login, attempt, sessions, client, credentials, policy, gate, protection, task_id, caller,
        fingerprint, lease=lease, runner=runner,
    )  # fmt: skip


def _attempt(
    login: ValidatedLogin,
    attempt: int,
    sessions: sessionmaker[Session],
    client: WeChatClient,
    credentials: AppCredentials,
    policy: JobPolicy,
    gate: CallGate | None,
    protection: DataProtection | None,
    task_id: str | None,
    caller: object,
    fingerprint: str,
    *,
    lease: RunnerLease | None,
    runner: str | None,
) -> LoginOutcome:
    """The call gate, the code2Session call and the user's write of one claimed run."""
    try:
        if gate is not None:
            gate.acquire(login.appid, API_LOGIN)
    except LocallyRateLimitedError as error:
        # Held back by the fleet-wide limit: no call was made; try again when the window ends.
        return LoginOutcome(
            "retrying", error.error_code, appid=login.appid, retry_in_seconds=error.wait_seconds
        )
    except CircuitOpenError as error:
        return LoginOutcome("failed", error.error_code, appid=login.appid)
    except RetryLaterError as error:
        # The limits store (Redis) is unreachable: no call was made, so try again later.
        return _retry_or_fail(error, login.appid, attempt, policy)
    audit = AuditEntry(
        AuditApi.LOGIN,
        login.appid,
        None,
        task_id,
        fingerprint,
        clean_caller(caller),
    )
    if lease is not None and runner is not None and not lease.may_call(runner):
        # This process's lease may lapse before the call ends: another run could take over and
        # present the code too. Make no call.
        return _retry_or_fail(
            RunnerLeaseLapsedError("this worker's liveness lease is not fresh; no call made"),
            login.appid,
            attempt,
            policy,
        )
    started = time.monotonic()
    try:
        result = client.code_to_session(appid=login.appid, secret=credentials.secret, js_code=login.js_code)
    except Exception as error:
        record_exchange(sessions, audit, started=started, error=error)
        if not isinstance(error, WxphoneError):
            raise
        return _failed_call(error, login.appid, attempt, policy, gate)
    succeeded = audit_row(dataclasses.replace(audit, openid=result.openid), started=started)
    cipher = (protection or default_protection()).cipher
    session_key = cipher.encrypt(
        result.session_key, context=users_context("session_key", login.appid, result.openid)
    )

    def write() -> None:
        _record_user(
            sessions,
            appid=login.appid,
            openid=result.openid,
            unionid=result.unionid,
            session_key_encrypted=session_key,
            key_version=cipher.current_version,
            audit=succeeded,
            job_id=task_id,
        )

    # The code is spent: running the task again would present it a second time (40029).
    retry_while_unreachable(
        write,
        retry_seconds=policy.final_write_retry_seconds,
        what="a login",
        log_extra={"task_id": task_id},
    )
    return LoginOutcome("succeeded", None, appid=login.appid, openid=result.openid, unionid=result.unionid)


def _record_user(
    sessions: sessionmaker[Session],
    *,
    appid: str,
    openid: str,
    unionid: str | None,
    session_key_encrypted: str,
    key_version: str,
    audit: dict[str, object],
    job_id: str | None,
) -> None:
    """Upsert the user with its encrypted session_key, the call's audit row and the job's success
    (its openid and unionid), in one transaction."""
    with sessions.begin() as session:
        statement = insert(User).values(
            appid=appid,
            openid=openid,
            unionid=unionid,
            session_key_encrypted=session_key_encrypted,
            encryption_key_version=key_version,
        )
        statement = statement.on_conflict_do_update(
            index_elements=[User.appid, User.openid],
            set_={
                # A login without unionid (app not bound to an Open Platform account) keeps a known one.
                "unionid": func.coalesce(statement.excluded.unionid, User.unionid),
                "session_key_encrypted": statement.excluded.session_key_encrypted,
                # A phone number still under an older key keeps the row on rotation's list.
                "encryption_key_version": row_key_version(
                    User.phone_number_encrypted, statement.excluded.encryption_key_version
                ),
            },
        )
        session.execute(statement)
        # In the user's transaction: a successful audit row means the user row is there too.
        append_rows(session, [audit])
        if job_id is not None:
            # Even over a job the sweep closed meanwhile: the code is spent and the user recorded,
            # so the job's truth is this success.
            session.execute(
                update(LoginJob)
                .where(LoginJob.job_id == job_id)
                .values(
                    status=PhoneJobStatus.SUCCEEDED.value,
                    error_code=None,
                    openid=openid,
                    unionid=unionid,
                    finished_at=func.now(),
                )
            )


def _record_or_read_job(sessions: sessionmaker[Session], *, task_id: str, appid: str) -> LoginOutcome | None:
    """Record the job (a task sent by another Celery client has no row yet); if it has already
    ended (a redelivered message), its stored outcome: the spent code is not presented again."""
    with sessions.begin() as session:
        session.execute(
            insert(LoginJob)
            .values(
                job_id=task_id,
                appid=appid,
                status=PhoneJobStatus.QUEUED.value,
                code_expires_at=func.now() + timedelta(seconds=LOGIN_CODE_LIFETIME_SECONDS),
            )
            .on_conflict_do_nothing(index_elements=[LoginJob.job_id])
        )
    return _stored_outcome(sessions, task_id)


def _stored_outcome(sessions: sessionmaker[Session], task_id: str) -> LoginOutcome | None:
    """The outcome of the job if it has ended, else None."""
    with sessions() as session:
        job = session.get(LoginJob, task_id)
    if job is None or job.status not in TERMINAL_JOB_STATUSES:
        return None
    log.info("login already ended in an earlier run of this task", extra={"task_id": task_id})
    if job.status == PhoneJobStatus.SUCCEEDED.value:
        return LoginOutcome("succeeded", None, appid=job.appid, openid=job.openid, unionid=job.unionid)
    return LoginOutcome("failed", job.error_code, appid=job.appid)


def _record_rejected(
    sessions: sessionmaker[Session], *, task_id: str, appid: object, error_code: str
) -> None:
    """Record a login refused for its input as a failed job (nothing was called)."""
    with sessions.begin() as session:
        statement = insert(LoginJob).values(
            job_id=task_id,
            appid=display_identifier(appid, limit=64),
            status=PhoneJobStatus.FAILED.value,
            error_code=error_code,
            code_expires_at=func.now(),
            finished_at=func.now(),
        )
        session.execute(
            statement.on_conflict_do_update(
                index_elements=[LoginJob.job_id],
                set_={
                    "status": statement.excluded.status,
                    "error_code": statement.excluded.error_code,
                    "finished_at": statement.excluded.finished_at,
                },
                where=LoginJob.status.in_(_OPEN),
            )
        )


def _settle_job(sessions: sessionmaker[Session], task_id: str | None, outcome: LoginOutcome) -> LoginOutcome:
    """Write a failed or retrying outcome to the job (a success is written with the user)."""
    if task_id is None or outcome.status == "succeeded":
        return outcome
    values: dict[str, object] = (
        {"status": PhoneJobStatus.FAILED.value, "error_code": outcome.error_code, "finished_at": func.now()}
        if outcome.status == "failed"
        else {"status": PhoneJobStatus.RETRYING.value}  # an error code is stored only at the end
    )
    with sessions.begin() as session:
        session.execute(
            update(LoginJob).where(LoginJob.job_id == task_id, LoginJob.status.in_(_OPEN)).values(**values)
        )
    return outcome


def _failed_call(
    error: WxphoneError, appid: str, attempt: int, policy: JobPolicy, gate: CallGate | None
) -> LoginOutcome:
    """The outcome of a code2Session call that raised ``error``."""
    if isinstance(error, RetryLaterError):
        # No pause of the app's logins on a 45011: code2Session's minute quota is per user.
        return _retry_or_fail(error, appid, attempt, policy)
    if isinstance(error, WeChatQuotaExhaustedError) and gate is not None:
        with suppress(RetryLaterError):
            gate.open_circuit(appid, API_LOGIN)
    if isinstance(error, OperatorActionRequiredError):
        log.error("login needs an operator: %s", error)
    return LoginOutcome("failed", error.error_code, appid=appid)


def _retry_or_fail(error: RetryLaterError, appid: str, attempt: int, policy: JobPolicy) -> LoginOutcome:
    """Run again later, or fail ``upstream_unavailable`` after :data:`MAX_LOGIN_ATTEMPTS` runs."""
    if attempt >= MAX_LOGIN_ATTEMPTS:
        log.warning("login gave up after %d attempts: %s", attempt, error)
        return LoginOutcome("failed", "upstream_unavailable", appid=appid)
    if isinstance(error, WeChatRateLimitedError):
        # 45011: this user's minute is used up; try in the next one.
        window_end = seconds_to_window_end(policy.rate_limit_window_seconds, time.time())
        delay = window_end + random.uniform(0.0, 2.0)
    else:
        backoff = policy.retry_backoff_base_seconds * 2 ** (attempt - 1)
        delay = min(policy.retry_backoff_max_seconds, backoff) * random.uniform(0.5, 1.0)
    log.info("login retries in %.1fs: %s", delay, error)
    return LoginOutcome("retrying", error.error_code, appid=appid, retry_in_seconds=delay)
