"""Resolving one phone-code job: the domain logic behind ``wxphone.resolve_phone``.

The job row in PostgreSQL is the source of truth; Celery only delivers. One run:

1. validates the input (no WeChat call for bad input or an unknown app);
2. records the job if the producer did not (a task sent by name from any Celery client);
3. claims the job for this process with a compare-and-set (``queued``/``retrying`` ->
   ``running``); a job that is already terminal returns its stored outcome, so a redelivered
   message makes no WeChat call; a job running elsewhere is taken over only when that run is
   provably over (its process's liveness lease lapsed, :mod:`worker.liveness`), never because
   the message says ``redelivered``;
4. fails codes older than their 5-minute life without calling WeChat;
5. claims the code itself in ``code_claims``: only the first submission of an (appid, code)
   exchanges it; later submissions wait for, and end with, the first one's outcome;
6. exchanges the code through the shared token (one compare-and-delete refresh on a rejected
   token), never holding a database transaction across the HTTP call;
7. checks ``watermark.appid`` and commits the user's phone fields, the job's final state, the
   code claim and the audit rows in one transaction: the number is stored only together with
   this job's transition to ``succeeded``, and only if no newer verification of the user is
   stored (ordered by the code's issue time, then the job's submission).

Every other write of a run is fenced on the run's own claim (``status = running`` and
``claimed_by`` = this process): a run that was taken over changes nothing. Once a number is in
hand, only its write may end the run: a soft time limit that strikes then is absorbed.

In the common case steps 2 to 5 are one SQL statement and step 7 another
(:mod:`worker.jobs.statements`); the rarer paths (a repeated code, a retry, an expired code, a
failure) use ORM/Core statements in ordinary transactions.

Failures follow the four reactions of :mod:`worker.errors`; a database error that would repeat
(``DataError``, a non-race ``IntegrityError``) ends the job ``database_rejected`` instead of
looping. No database lock is held across the WeChat call, and nothing here logs or returns a
code or a phone number.
"""

from __future__ import annotations

import dataclasses
import logging
import random
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, Literal, TypeVar, cast

from sqlalchemy import Boolean, ColumnElement, CursorResult, Engine, literal_column, or_, select, update
from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.exc import DBAPIError
from sqlalchemy.orm import Session

from models import CodeClaim, PhoneJob
from models.code_claim import CodeClaimStatus
from models.exchange_audit import AuditApi, AuditOutcome
from models.phone_job import PhoneJobStatus
from worker.audit import AuditEntry, append_rows, audit_row, clean_caller
from worker.crypto import (
    DataProtection,
    default_protection,
    mask_phone_number,
    users_context,
)
from worker.db import autocommit, is_transient_database_error, retry_while_unreachable
from worker.errors import (
    OperatorActionRequiredError,
    RequestRejectedError,
    RetryLaterError,
    WxphoneError,
)
from worker.jobs.statements import (
    ClaimedAttempt,
    PhoneFields,
    RecordedSuccess,
    claim_job_and_code,
    record_phone_success,
)
from worker.jobs.validation import (
    code_fingerprint,
    display_identifier,
    is_valid_task_id,
    validate_phone_job,
)
from worker.limits import (
    API_PHONE,
    CallGate,
    CircuitOpenError,
    LocallyRateLimitedError,
    seconds_to_window_end,
)
from worker.liveness import RunnerLease
from worker.tokens.service import TokenService
from worker.wechat.client import WeChatClient
from worker.wechat.errors import (
    WeChatError,
    WeChatInvalidCodeError,
    WeChatQuotaExhaustedError,
    WeChatRateLimitedError,
    WeChatTransportError,
)
from worker.wechat.types import PhoneInfo

__all__ = [
    "ExchangeInterruptedError",
    "JobOutcome",
    "JobPolicy",
    "RunnerLeaseLapsedError",
    "record_submission",
    "resolve_phone_job",
]

log = logging.getLogger(__name__)

T = TypeVar("T")

OutcomeStatus = Literal["succeeded", "failed", "retrying", "running"]

#: The error of a job whose code WeChat refused after an earlier exchange's reply was lost.
REPLY_LOST_ERROR_CODE = "reply_lost"
#: The error of a job whose code was first submitted for another openid.
CODE_REUSED_ERROR_CODE = "code_reused"
#: The error of a message whose task id cannot be a job id (too long, not printable, NUL).
INVALID_JOB_ID_ERROR_CODE = "invalid_job_id"
#: The error of a message whose task id is the id of another app's or user's job (never stored
#: on that job).
JOB_ID_REUSED_ERROR_CODE = "job_id_reused"
#: The error of a job PostgreSQL refused to record for a reason that would repeat.
DATABASE_REJECTED_ERROR_CODE = "database_rejected"


class ExchangeInterruptedError(RetryLaterError):
    """The run was interrupted (soft time limit) while its request was at WeChat: the code may
    have been consumed, as with a lost reply."""

    error_code = "interrupted"


class RunnerLeaseLapsedError(RetryLaterError):
    """This process could not renew its liveness lease recently enough to present a code: another
    delivery may take its jobs over, so it makes no call (worker.liveness)."""

    error_code = "liveness_lapsed"


@dataclass(frozen=True)
class JobPolicy:
    """Timing rules for phone jobs."""

    fingerprint_key: str
    code_lifetime_seconds: float = 300.0
    retry_backoff_base_seconds: float = 1.0
    retry_backoff_max_seconds: float = 30.0
    #: Attempts at most per job (each start counts), whatever the code's remaining life.
    max_attempts: int = 10
    #: A ``running`` job whose claim is older than this belongs to a dead worker.
    stale_claim_seconds: float = 75.0
    #: How soon a repeated submission first looks whether the first one has finished. Short: the
    #: usual repeat is a double tap, arriving while the first exchange (tens of ms) runs. Each
    #: further look waits ``DUPLICATE_POLL_GROWTH`` times longer, up to the maximum: a first job
    #: held up for a minute (a 45011 pause) is looked at about a dozen times, not 240.
    duplicate_poll_seconds: float = 0.25
    duplicate_poll_max_seconds: float = 8.0
    #: How long the final commit is retried in-process when PostgreSQL is unreachable: the
    #: code is spent by then, so giving up would lose the number.
    final_write_retry_seconds: float = 40.0
    #: WeChat's per-minute window: a 45011 waits for the next one.
    rate_limit_window_seconds: float = 60.0


@dataclass(frozen=True)
class JobOutcome:
    """The result of one run. ``retry_in_seconds`` is set when the job must run again later."""

    job_id: str
    status: OutcomeStatus
    error_code: str | None = None
    retry_in_seconds: float | None = None
    #: False when this run's outcome is not the job's to report: the job was taken over or
    #: closed meanwhile by another run (which reports it), or the message's task id is another
    #: app's or user's job. The task then stores no result (the first stored result would stay).
    reports_job: bool = True

    def as_result(self) -> dict[str, Any]:
        """The Celery task result: identifiers and status only, never personal data."""
        return {"job_id": self.job_id, "status": self.status, "error_code": self.error_code}


#: How much longer each look of a waiting repeated submission waits than the one before.
DUPLICATE_POLL_GROWTH = 1.5


def utc_now() -> datetime:
    return datetime.now(UTC)


def record_submission(
    session: Session,
    *,
    job_id: str,
    appid: str,
    openid: str,
    fingerprint: str | None,
    now: datetime,
    code_lifetime_seconds: float,
) -> None:
    """Insert the ``queued`` job row unless it exists (producers, which leave the fingerprint to
    the worker that claims the job, and workers both call this)."""
    statement = (
        insert(PhoneJob)
        .values(
            job_id=job_id,
            appid=appid,
            openid=openid,
            code_fingerprint=fingerprint,
            status=PhoneJobStatus.QUEUED.value,
            created_at=now,
            code_expires_at=now + timedelta(seconds=code_lifetime_seconds),
        )
        .on_conflict_do_nothing(index_elements=[PhoneJob.job_id])
    )
    session.execute(statement)


def resolve_phone_job(
    *,
    job_id: object,
    appid: object,
    openid: object,
    code: object,
    engine: Engine,
    token_service: TokenService,
    client: WeChatClient,
    policy: JobPolicy,
    lease: RunnerLease,
    gate: CallGate | None = None,
    earlier_retries: int = 0,
    interruptions: tuple[type[BaseException], ...] = (),
    clock: Callable[[], datetime] = utc_now,
    protection: DataProtection | None = None,
    caller: object = None,
) -> JobOutcome:
    """Run one attempt of a phone-code job; see the module docstring for the steps.

    ``lease`` is this process's liveness lease (claims name it; a job running elsewhere is taken
    over only once its holder's lease lapsed). ``earlier_retries`` is how often this job's task
    already asked to run again (a waiting repeated submission backs off with it).
    ``interruptions`` are the exceptions a time limit raises inside the run (Celery's
    ``SoftTimeLimitExceeded``): before the exchange the job retries, during it the reply counts as
    lost, after it the number's write still completes. ``protection`` encrypts the number
    (default: the process's keys); ``caller`` is the front end's optional label for the audit
    trail (dropped unless printable and at most 64 characters).
    """
    if not is_valid_task_id(job_id):
        # Such an id can never be recorded (phone_jobs.job_id is printable text of <= 64
        # characters): refuse the message without touching the database or WeChat.
        log.warning("phone job refused: its task id cannot be a job id")
        return JobOutcome(display_identifier(job_id, limit=64), "failed", INVALID_JOB_ID_ERROR_CODE)
    assert isinstance(job_id, str)
    lease.start()
    run = _JobRun(
        job_id,
        engine,
        token_service,
        client,
        policy,
        clock,
        gate=gate,
        lease=lease,
        earlier_retries=earlier_retries,
        interruptions=interruptions,
    )
    run.protection = protection or default_protection()
    run.caller = clean_caller(caller)
    with lease.running(job_id):
        try:
            return run.execute(appid=appid, openid=openid, code=code)
        except DBAPIError as error:
            if is_transient_database_error(error):
                if run.claimed_attempt is not None:
                    # The job stays running under this process's claim: let the retry (wherever
                    # it lands) take it over at once instead of waiting for the claim to go stale.
                    lease.note_run_ended(job_id, run.claim_identity(run.claimed_attempt))
                raise  # the task retries database outages with backoff
            # The same statement would fail the same way on every retry: end the job.
            log.error(
                "phone job failed: PostgreSQL refused a statement (%s)",
                type(error.orig).__name__,
                extra={"job_id": job_id},
            )
            return run.fail_for_good(DATABASE_REJECTED_ERROR_CODE)
        except interruptions:
            log.warning("phone job interrupted by its time limit; it retries", extra={"job_id": job_id})
            return run.release_after_interruption()
        except Exception:
            # A bug must not leave the job running until the sweep: record it as failed now.
            log.exception("phone job failed unexpectedly", extra={"job_id": job_id})
            return run.fail_for_good("internal_error")


class _JobRun:
    """One attempt at one job; holds the collaborators so the steps read plainly."""

    def __init__(
        self,
        job_id: str,
        engine: Engine,
        token_service: TokenService,
        client: WeChatClient,
        policy: JobPolicy,
        clock: Callable[[], datetime],
        *,
        gate: CallGate | None,
        lease: RunnerLease,
        earlier_retries: int,
        interruptions: tuple[type[BaseException], ...],
    ) -> None:
        self.gate = gate
        self.lease = lease
        #: The runner this run claims as: if the process's lease lapses meanwhile, the process
        #: becomes a new runner and this run may no longer present a code (worker.liveness).
        self.runner = lease.runner_id
        #: The job's attempt number once this run has claimed it.
        self.claimed_attempt: int | None = None
        self.earlier_retries = earlier_retries
        self.interruptions = interruptions
        #: Audit rows of this run's WeChat calls, written with the outcome they led to.
        self.audit_rows: list[dict[str, object]] = []
        self._audit_rows_in_transaction = 0
        self.job_id = job_id
        self.engine = engine
        # The two hot-path statements are each their own transaction (worker.jobs.statements).
        self.autocommit = autocommit(engine)
        self.tokens = token_service
        self.client = client
        self.policy = policy
        self.clock = clock
        # Set by resolve_phone_job: how numbers are encrypted, and the front end's audit label.
        self.protection: DataProtection | None = None
        self.caller: str | None = None

    def execute(self, *, appid: object, openid: object, code: object) -> JobOutcome:
        try:
            job = validate_phone_job(
                appid=appid, openid=openid, code=code, configured_appids=self.tokens.apps.keys()
            )
        except RequestRejectedError as error:
            return self._reject_input(appid, openid, code, error)
        fingerprint = code_fingerprint(self.policy.fingerprint_key, job.appid, job.code)
        started = self._begin_attempt(job.appid, job.openid, fingerprint)
        if isinstance(started, JobOutcome):
            return started
        attempts, code_expires_at = started
        try:
            if self.gate is not None:
                self.gate.acquire(job.appid, API_PHONE)
        except LocallyRateLimitedError as error:
            return self._defer(job.appid, fingerprint, error, code_expires_at)
        except CircuitOpenError as error:
            return self._record_failure(job.appid, fingerprint, error)
        except RetryLaterError as error:
            return self._retry_or_give_up(job.appid, fingerprint, error, attempts, code_expires_at)
        audit = AuditEntry(AuditApi.PHONE, job.appid, job.openid, self.job_id, fingerprint, self.caller)
        try:
            info = self.tokens.call_with_token(
                job.appid, lambda token: self._exchange(audit, token, job.code, job.openid)
            )
        except RetryLaterError as error:
            return self._retry_or_give_up(job.appid, fingerprint, error, attempts, code_expires_at)
        except (RequestRejectedError, OperatorActionRequiredError) as error:
            if isinstance(error, OperatorActionRequiredError):
                log.error("phone job needs an operator: %s", error, extra={"job_id": self.job_id})
            if isinstance(error, WeChatQuotaExhaustedError):
                self._open_circuit(job.appid)
            return self._record_failure(job.appid, fingerprint, error)
        except WxphoneError as error:  # TokenInvalidError cannot escape call_with_token; be safe
            return self._record_failure(job.appid, fingerprint, error)
        # The number is in hand: from here on only its write may end the run.
        return self._to_the_end(lambda: self._finish_exchange(job.appid, job.openid, fingerprint, info))

    def _finish_exchange(self, appid: str, openid: str, fingerprint: str, info: PhoneInfo) -> JobOutcome:
        if info.watermark_appid != appid:
            log.error("phone_info watermark names another app", extra={"job_id": self.job_id})
            return self._record_failure(appid, fingerprint, None, error_code="watermark_mismatch")
        return self._record_success(appid, openid, fingerprint, info)

    def _to_the_end(self, step: Callable[[], T]) -> T:
        """Run ``step`` to its end even when a time limit strikes inside it (Celery's soft limit
        strikes once; the hard limit, which kills the process, still bounds the run)."""
        while True:
            try:
                return step()
            except self.interruptions:
                log.warning(
                    "time limit reached with a number in hand; finishing its write",
                    extra={"job_id": self.job_id},
                )

    def fail_for_good(self, error_code: str) -> JobOutcome:
        """Close the job as failed with ``error_code`` (and its code claim, if it owns one),
        unless another run holds it; when even that write is refused, say so without it."""
        try:
            with self._transaction() as session:
                result = session.execute(
                    update(PhoneJob)
                    .where(
                        PhoneJob.job_id == self.job_id,
                        PhoneJob.status.not_in(_TERMINAL),
                        self._not_held_elsewhere(),
                    )
                    .values(
                        status=PhoneJobStatus.FAILED.value, error_code=error_code, finished_at=self.clock()
                    )
                )
                if cast("CursorResult[Any]", result).rowcount:
                    session.execute(
                        update(CodeClaim)
                        .where(
                            CodeClaim.job_id == self.job_id, CodeClaim.status.not_in(list(_CLAIM_TERMINAL))
                        )
                        .values(status=CodeClaimStatus.FAILED.value, error_code=error_code)
                    )
                self._write_audit(session)
            with Session(self.engine) as session:
                job = session.get(PhoneJob, self.job_id)
        except DBAPIError as error:
            if is_transient_database_error(error):
                raise
            job = None
        if job is None:  # PostgreSQL refused even to record the job
            return JobOutcome(self.job_id, "failed", error_code)
        return JobOutcome(self.job_id, job.status, job.error_code)  # type: ignore[arg-type]

    def release_after_interruption(self) -> JobOutcome:
        """A time limit struck outside the exchange and the number's write: let the job run again.
        If its code was marked as being exchanged, the code may have reached WeChat: count a lost
        reply (the rerun then says ``reply_lost`` if WeChat had consumed it)."""
        with self._transaction() as session:
            claim_status = session.execute(
                select(CodeClaim.status).where(
                    CodeClaim.job_id == self.job_id, CodeClaim.status.not_in(list(_CLAIM_TERMINAL))
                )
            ).scalar_one_or_none()
            values: dict[str, Any] = {"status": PhoneJobStatus.RETRYING.value}
            if claim_status == CodeClaimStatus.EXCHANGING.value:
                values["lost_replies"] = PhoneJob.lost_replies + 1
            if self._update_own_job(session, **values):
                session.execute(
                    update(CodeClaim)
                    .where(CodeClaim.job_id == self.job_id, CodeClaim.status.not_in(list(_CLAIM_TERMINAL)))
                    .values(status=CodeClaimStatus.PENDING.value, error_code=None)
                )
            self._write_audit(session)
        return JobOutcome(
            self.job_id, "retrying", ExchangeInterruptedError.error_code, retry_in_seconds=_jitter(2.0)
        )

    # -- steps ----------------------------------------------------------------------------

    def _exchange(self, audit: AuditEntry, token: str, code: str, openid: str) -> PhoneInfo:
        """One getuserphonenumber call, with its audit row (one per call: a call repeated after
        a token refresh gets its own)."""
        if not self.lease.may_call(self.runner):
            # Our lease may lapse before this call would end: another delivery could then take the
            # job over and present the code too. Make no call; the job retries.
            raise RunnerLeaseLapsedError("this worker's liveness lease is not fresh; no call made")
        started = time.monotonic()
        try:
            info = self.client.get_phone_number(access_token=token, code=code, openid=openid)
        except self.interruptions:
            interrupted = ExchangeInterruptedError("interrupted by the time limit while at WeChat")
            self.audit_rows.append(audit_row(audit, started=started, error=interrupted))
            raise interrupted from None
        except Exception as error:
            self.audit_rows.append(audit_row(audit, started=started, error=error))
            raise
        if info.watermark_appid != audit.appid:
            self.audit_rows.append(
                audit_row(
                    audit, started=started, outcome=AuditOutcome.REJECTED, error_code="watermark_mismatch"
                )
            )
        else:
            self.audit_rows.append(audit_row(audit, started=started))
        return info

    def _write_audit(self, session: Session) -> None:
        """Write the buffered audit rows in ``session``'s transaction (the one recording the
        outcome). They leave the buffer once that transaction commits (:meth:`_transaction`), so
        a transaction written again after its commit failed writes them again (each once: their
        ``call_id`` is unique)."""
        append_rows(session, self.audit_rows)
        self._audit_rows_in_transaction = len(self.audit_rows)

    def _reject_input(self, appid: object, openid: object, code: object, error: WxphoneError) -> JobOutcome:
        """Record a job whose input failed validation as ``failed``; no WeChat call."""
        safe_appid = display_identifier(appid, limit=64)
        raw_code = code if isinstance(code, str) else repr(type(code))
        now = self.clock()
        with self._transaction() as session:
            record_submission(
                session,
                job_id=self.job_id,
                appid=safe_appid,
                openid=display_identifier(openid, limit=128),
                fingerprint=code_fingerprint(self.policy.fingerprint_key, safe_appid, raw_code),
                now=now,
                code_lifetime_seconds=self.policy.code_lifetime_seconds,
            )
            session.execute(
                update(PhoneJob)
                .where(PhoneJob.job_id == self.job_id, PhoneJob.status.not_in(_TERMINAL))
                .values(
                    status=PhoneJobStatus.FAILED.value,
                    error_code=error.error_code,
                    attempts=PhoneJob.attempts + 1,
                    started_at=now,
                    finished_at=now,
                )
            )
        log.warning("phone job rejected: %s", error.error_code, extra={"job_id": self.job_id})
        return self._stored_outcome()

    def _begin_attempt(self, appid: str, openid: str, fingerprint: str) -> tuple[int, datetime] | JobOutcome:
        """Record and claim the job, then claim its code.

        The common case (a fresh job with a fresh code) is one statement. Returns (attempts,
        code_expires_at) when this run goes on to exchange the code, or the outcome of a run that
        must stop here.
        """
        now = self.clock()
        stale_before = now - timedelta(seconds=self.policy.stale_claim_seconds)
        claimed = self._claim(appid, openid, fingerprint, now, takeover_from=None)
        if claimed is None:
            holder = self._gone_holder_or_outcome(appid, openid, now, stale_before)
            if isinstance(holder, JobOutcome):
                return holder
            log.warning("taking over a job whose run is over", extra={"job_id": self.job_id})
            claimed = self._claim(appid, openid, fingerprint, now, takeover_from=holder)
            if claimed is None:  # another delivery took it over first: look again soon
                return JobOutcome(self.job_id, "running", None, retry_in_seconds=_jitter(2.0))
        attempts, code_expires_at = claimed.attempts, claimed.code_expires_at
        self.claimed_attempt = attempts
        if claimed.code_claimed:
            return attempts, code_expires_at
        # The job is ours; its code was claimed before or the job may not go on.
        with self._transaction() as session:
            if attempts > self.policy.max_attempts:
                # Bounded requeue: a job whose runs keep dying (a worker OOM-killed on it, say)
                # stops here instead of looping for ever; brokers do not count redeliveries.
                return self._finish_without_exchange(session, appid, fingerprint, "too_many_attempts")
            if self.clock() >= code_expires_at:
                return self._finish_without_exchange(session, appid, fingerprint, "code_expired")
            deferred = self._claim_code(session, appid, openid, fingerprint, code_expires_at)
            if deferred is not None:
                return deferred
        return attempts, code_expires_at

    def _claim(
        self,
        appid: str,
        openid: str,
        fingerprint: str,
        now: datetime,
        *,
        takeover_from: str | None,
    ) -> ClaimedAttempt | None:
        with self.autocommit.connect() as connection:
            return claim_job_and_code(
                connection,
                job_id=self.job_id,
                appid=appid,
                openid=openid,
                fingerprint=fingerprint,
                now=now,
                code_expires_at=now + timedelta(seconds=self.policy.code_lifetime_seconds),
                runner=self.runner,
                stale_claim_seconds=self.policy.stale_claim_seconds,
                takeover_from=takeover_from,
                max_attempts=self.policy.max_attempts,
            )

    def _gone_holder_or_outcome(
        self, appid: str, openid: str, now: datetime, stale_before: datetime
    ) -> str | JobOutcome:
        """For a job this run could not claim: the runner holding it, when that run is provably
        over (take it over); otherwise the outcome of this run (the job is terminal, or runs
        elsewhere: look again when its holder's lease would lapse; or the job id belongs to
        another app's or user's job: this message fails, the job is not touched)."""
        with Session(self.engine) as session:
            job = session.get(PhoneJob, self.job_id)
        assert job is not None  # the claim statement records it
        if (job.appid, job.openid) != (appid, openid):
            log.warning(
                "phone job refused: its task id is another app's or user's job", extra={"job_id": self.job_id}
            )
            return JobOutcome(self.job_id, "failed", JOB_ID_REUSED_ERROR_CODE, reports_job=False)
        if job.status in _TERMINAL:
            return JobOutcome(self.job_id, job.status, job.error_code)  # type: ignore[arg-type]
        if job.status != PhoneJobStatus.RUNNING.value:
            # Released between our two statements: claim it on the next delivery.
            return JobOutcome(self.job_id, job.status, None, retry_in_seconds=_jitter(1.0))  # type: ignore[arg-type]
        claimed_at = job.claimed_at or now
        wait_seconds = max(1.0, (claimed_at - stale_before).total_seconds())  # until the claim is stale
        holder = job.claimed_by
        if holder is not None:
            if holder == self.runner:
                if self.lease.runs_here(self.job_id) <= 1:
                    return holder  # an earlier run in this process ended without closing the job
                wait_seconds = min(wait_seconds, self.lease.lease_seconds / 2)
            else:
                lapses_in = self.lease.lapses_in_seconds(holder)
                if lapses_in == 0.0 or self.lease.ended_run(self.job_id) == self.claim_identity(
                    job.attempts, holder
                ):
                    return holder
                # Alive (or unknown: Redis unreachable): look again once its lease could lapse.
                until_lapse = self.lease.lease_seconds if lapses_in is None else lapses_in
                wait_seconds = min(wait_seconds, until_lapse + 0.5)
        log.info(
            "phone job runs elsewhere; looking again in %.1fs", wait_seconds, extra={"job_id": self.job_id}
        )
        return JobOutcome(self.job_id, "running", None, retry_in_seconds=wait_seconds)

    def _claim_code(
        self, session: Session, appid: str, openid: str, fingerprint: str, code_expires_at: datetime
    ) -> JobOutcome | None:
        """Make this job the one that exchanges the code, or defer to the job that is."""
        new_claim = insert(CodeClaim).values(
            appid=appid,
            code_fingerprint=fingerprint,
            job_id=self.job_id,
            status=CodeClaimStatus.EXCHANGING.value,
        )
        # On a conflict the no-op update locks the existing claim and returns it unchanged; a
        # fresh code (the common case) is claimed and marked exchanging by this one statement.
        claim = session.execute(
            new_claim.on_conflict_do_update(
                index_elements=[CodeClaim.appid, CodeClaim.code_fingerprint],
                set_={"job_id": CodeClaim.job_id},
            ).returning(
                CodeClaim.job_id,
                CodeClaim.status,
                CodeClaim.error_code,
                literal_column("xmax = 0", Boolean).label("inserted"),
            )
        ).one()
        if claim.inserted:
            return None
        if claim.job_id == self.job_id:
            if claim.status in _CLAIM_TERMINAL:
                # Our own exchange already finished; mirror it (cannot normally happen, as
                # claim and job are committed together).
                return self._mirror_claim(session, claim.status, claim.error_code)
            if claim.status == CodeClaimStatus.EXCHANGING.value:
                # The previous attempt died between sending the code and recording the reply:
                # the one case where a code is presented to WeChat twice. Count it.
                self._update_own_job(session, lost_replies=PhoneJob.lost_replies + 1)
                log.warning("re-exchanging a code whose reply was lost", extra={"job_id": self.job_id})
            else:
                self._set_claim(session, appid, fingerprint, CodeClaimStatus.EXCHANGING.value, None)
            return None
        self._update_own_job(session, canonical_job_id=claim.job_id)
        first_openid = session.execute(
            select(PhoneJob.openid).where(PhoneJob.job_id == claim.job_id)
        ).scalar_one_or_none()
        if first_openid is not None and first_openid != openid:
            # A code belongs to the user who tapped the button: the same code submitted for
            # another openid gets nothing, and says so rather than mirror the first outcome.
            return self._finish_in(session, "failed", CODE_REUSED_ERROR_CODE)
        if claim.status in _CLAIM_TERMINAL:
            return self._mirror_claim(session, claim.status, claim.error_code)
        if self.clock() >= code_expires_at + timedelta(seconds=self.policy.stale_claim_seconds):
            # The first submission never finished; its code is long dead.
            return self._finish_in(session, "failed", "code_expired")
        # Waiting for the first submission is not an attempt at WeChat: do not count it.
        self._update_own_job(session, status=PhoneJobStatus.RETRYING.value, attempts=PhoneJob.attempts - 1)
        return JobOutcome(self.job_id, "retrying", None, retry_in_seconds=self._duplicate_poll_seconds())

    def claim_identity(self, attempt: int, runner: str | None = None) -> str:
        """One claim of the job: the runner that made it and the attempt it counted."""
        return f"{runner or self.runner}#{attempt}"

    def _duplicate_poll_seconds(self) -> float:
        """How long a repeated submission waits before looking at the first one again."""
        policy = self.policy
        growth = DUPLICATE_POLL_GROWTH ** min(self.earlier_retries, 64)
        return _jitter(min(policy.duplicate_poll_max_seconds, policy.duplicate_poll_seconds * growth))

    def _mirror_claim(self, session: Session, claim_status: str, claim_error_code: str | None) -> JobOutcome:
        if claim_status == CodeClaimStatus.SUCCEEDED.value:
            return self._finish_in(session, "succeeded", None)
        return self._finish_in(session, "failed", claim_error_code)

    def _finish_in(
        self, session: Session, status: Literal["succeeded", "failed"], error_code: str | None
    ) -> JobOutcome:
        self._update_own_job(session, status=status, error_code=error_code, finished_at=self.clock())
        return JobOutcome(self.job_id, status, error_code)

    def _finish_without_exchange(
        self, session: Session, appid: str, fingerprint: str, error_code: str
    ) -> JobOutcome:
        """Fail the job before any exchange (and its code claim, if it owns a pending one)."""
        outcome = self._finish_in(session, "failed", error_code)
        self._settle_claim(session, appid, fingerprint, "failed", error_code, only_pending=True)
        return outcome

    def _open_circuit(self, appid: str) -> None:
        opened = False
        if self.gate is not None:
            with suppress(RetryLaterError):
                opened = self.gate.open_circuit(appid, API_PHONE)
        if opened or self.gate is None:
            # One alert per circuit opening, not one per job.
            log.error(
                "OPERATOR ALERT: WeChat daily quota (45009) exhausted for %s; phone calls stop "
                "until midnight Beijing time or `wxphone limits close-circuit`",
                appid,
                extra={"job_id": self.job_id},
            )

    def _defer(
        self, appid: str, fingerprint: str, error: LocallyRateLimitedError, code_expires_at: datetime
    ) -> JobOutcome:
        """Hold the job back for the fleet-wide limit without counting an attempt (no call was made)."""
        delay = error.wait_seconds + random.uniform(0.0, 1.0)
        if self.clock() + timedelta(seconds=delay) >= code_expires_at:
            return self._record_failure(appid, fingerprint, None, error_code="upstream_unavailable")
        with self._transaction() as session:
            if not self._update_own_job(
                session, status=PhoneJobStatus.RETRYING.value, attempts=PhoneJob.attempts - 1
            ):
                return self._taken_over()
            self._set_claim(session, appid, fingerprint, CodeClaimStatus.PENDING.value, None)
        return JobOutcome(self.job_id, "retrying", error.error_code, retry_in_seconds=delay)

    def _retry_or_give_up(
        self, appid: str, fingerprint: str, error: RetryLaterError, attempts: int, code_expires_at: datetime
    ) -> JobOutcome:
        if isinstance(error, WeChatRateLimitedError) and self.gate is not None:
            with suppress(RetryLaterError):
                self.gate.pause_until_window_end(appid, API_PHONE)
        delay = self._backoff_seconds(error, attempts)
        rid = error.rid if isinstance(error, WeChatError) else None
        lost_reply = isinstance(error, ExchangeInterruptedError) or (
            isinstance(error, WeChatTransportError) and error.maybe_processed
        )
        out_of_time = self.clock() + timedelta(seconds=delay) >= code_expires_at
        if out_of_time or attempts >= self.policy.max_attempts:
            log.warning(
                "phone job gave up after %d attempts: %s", attempts, error, extra={"job_id": self.job_id}
            )
            return self._record_failure(
                appid, fingerprint, None, error_code="upstream_unavailable", rid=rid, lost_reply=lost_reply
            )
        with self._transaction() as session:
            values: dict[str, Any] = {"status": PhoneJobStatus.RETRYING.value, "last_rid": rid}
            if lost_reply:
                values["lost_replies"] = PhoneJob.lost_replies + 1
            released = self._update_own_job(session, **values)
            if released:
                self._set_claim(session, appid, fingerprint, CodeClaimStatus.PENDING.value, None)
            self._write_audit(session)
        if not released:
            return self._taken_over()
        log.info("phone job retries in %.1fs: %s", delay, error, extra={"job_id": self.job_id})
        return JobOutcome(self.job_id, "retrying", error.error_code, retry_in_seconds=delay)

    def _backoff_seconds(self, error: RetryLaterError, attempts: int) -> float:
        if isinstance(error, WeChatRateLimitedError):
            # 45011 means "this minute is used up": wait for the next one, not a fixed backoff.
            window_end = seconds_to_window_end(self.policy.rate_limit_window_seconds, time.time())
            return window_end + random.uniform(0.0, 2.0)
        exponential = self.policy.retry_backoff_base_seconds * 2 ** max(0, attempts - 1)
        return _jitter(min(self.policy.retry_backoff_max_seconds, exponential))

    def _record_success(self, appid: str, openid: str, fingerprint: str, info: PhoneInfo) -> JobOutcome:
        """Commit the number with the job's and the code claim's success and the audit rows, in
        one statement (worker.jobs.statements)."""
        protection = self.protection or default_protection()
        fields = _protect(info, appid=appid, openid=openid, protection=protection)
        code_issued_at = datetime.fromtimestamp(info.watermark_timestamp, UTC)

        def write() -> RecordedSuccess:
            with self.autocommit.connect() as connection:
                try:
                    recorded = record_phone_success(
                        connection,
                        job_id=self.job_id,
                        appid=appid,
                        openid=openid,
                        fingerprint=fingerprint,
                        fields=fields,
                        code_issued_at=code_issued_at,
                        now=self.clock(),
                        audit_rows=self.audit_rows,
                    )
                except self.interruptions:
                    # The statement may still be running at the server: never reuse this
                    # connection. Written again, the statement changes nothing twice.
                    connection.invalidate()
                    raise
            self.audit_rows = []
            return recorded

        recorded = self._commit_with_retry(write)
        if not recorded.job_finished:
            # The sweep or another run closed the job first (or our own earlier write did, its
            # commit reply lost): the job's state stands, and the user row was not touched.
            log.warning(
                "phone job was already closed; its number is not stored", extra={"job_id": self.job_id}
            )
            return self._stored_outcome()
        if not recorded.number_stored:
            log.info("a newer verification of this user is stored; keeping it", extra={"job_id": self.job_id})
        return JobOutcome(self.job_id, "succeeded", None)

    def _record_failure(
        self,
        appid: str,
        fingerprint: str,
        error: WxphoneError | None,
        *,
        error_code: str | None = None,
        rid: str | None = None,
        lost_reply: bool = False,
    ) -> JobOutcome:
        """Commit a failed exchange's outcome: job state, code claim and audit rows together."""
        code = error_code or (error.error_code if error is not None else None)
        last_rid = rid or (error.rid if isinstance(error, WeChatError) else None)

        def write() -> JobOutcome:
            with self._transaction() as session:
                now = self.clock()
                final_code = code
                if code == WeChatInvalidCodeError.error_code:
                    # 40029 after an exchange whose reply was lost: WeChat most likely consumed the
                    # code on that earlier exchange. Say so, rather than blame the front end's code.
                    lost = session.execute(
                        select(PhoneJob.lost_replies).where(PhoneJob.job_id == self.job_id)
                    ).scalar_one_or_none()
                    if lost:
                        final_code = REPLY_LOST_ERROR_CODE
                values: dict[str, Any] = {"status": "failed", "error_code": final_code, "finished_at": now}
                if last_rid:
                    values["last_rid"] = last_rid
                if lost_reply:
                    values["lost_replies"] = PhoneJob.lost_replies + 1
                closed = self._update_own_job(session, **values)
                if closed:
                    self._settle_claim(session, appid, fingerprint, "failed", final_code, only_pending=False)
                self._write_audit(session)
                if not closed:
                    return self._taken_over()
                return JobOutcome(self.job_id, "failed", final_code)

        return self._commit_with_retry(write)

    def _taken_over(self) -> JobOutcome:
        """The outcome of a run whose job another run took over (or closed) meanwhile."""
        log.warning(
            "phone job was taken over or closed meanwhile; this run changes nothing",
            extra={"job_id": self.job_id},
        )
        return dataclasses.replace(self._stored_outcome(), reports_job=False)

    def _own_claim(self) -> tuple[ColumnElement[bool], ...]:
        """The job row as this run claimed it: running, held by this process."""
        return (
            PhoneJob.job_id == self.job_id,
            PhoneJob.status == PhoneJobStatus.RUNNING.value,
            PhoneJob.claimed_by == self.runner,
        )

    def _not_held_elsewhere(self) -> ColumnElement[bool]:
        """Not running under another process's claim."""
        return or_(
            PhoneJob.status != PhoneJobStatus.RUNNING.value,
            PhoneJob.claimed_by.is_(None),
            PhoneJob.claimed_by == self.runner,
        )

    def _update_own_job(self, session: Session, **values: Any) -> bool:
        """Update the job if this run still holds its claim; whether it did."""
        result = session.execute(update(PhoneJob).where(*self._own_claim()).values(**values))
        return bool(cast("CursorResult[Any]", result).rowcount)

    def _settle_claim(
        self,
        session: Session,
        appid: str,
        fingerprint: str,
        status: str,
        error_code: str | None,
        *,
        only_pending: bool,
    ) -> None:
        """Record the code's outcome on its claim, if this job owns the claim."""
        allowed = [CodeClaimStatus.PENDING.value]
        if not only_pending:
            allowed.append(CodeClaimStatus.EXCHANGING.value)
        session.execute(
            update(CodeClaim)
            .where(
                CodeClaim.appid == appid,
                CodeClaim.code_fingerprint == fingerprint,
                CodeClaim.job_id == self.job_id,
                CodeClaim.status.in_(allowed),
            )
            .values(status=status, error_code=error_code)
        )

    def _set_claim(
        self, session: Session, appid: str, fingerprint: str, status: str, error_code: str | None
    ) -> None:
        session.execute(
            update(CodeClaim)
            .where(
                CodeClaim.appid == appid,
                CodeClaim.code_fingerprint == fingerprint,
                CodeClaim.job_id == self.job_id,
            )
            .values(status=status, error_code=error_code)
        )

    def _commit_with_retry(self, write: Callable[[], T]) -> T:
        """Run ``write`` (one transaction), retrying while PostgreSQL is unreachable.

        Only used after the code was exchanged: the number exists nowhere else, so a short
        database outage must not turn a success into a loss.
        """
        return retry_while_unreachable(
            write,
            retry_seconds=self.policy.final_write_retry_seconds,
            what="a result",
            log_extra={"job_id": self.job_id},
        )

    @contextmanager
    def _transaction(self) -> Iterator[Session]:
        """A session in a transaction that commits on success and rolls back on error."""
        self._audit_rows_in_transaction = 0
        # Objects stay readable after commit (no implicit new transaction when read later).
        with Session(self.engine, expire_on_commit=False) as session, session.begin():
            yield session
        # Committed: the audit rows written in it are stored.
        del self.audit_rows[: self._audit_rows_in_transaction]
        self._audit_rows_in_transaction = 0

    def _stored_outcome(self) -> JobOutcome:
        with Session(self.engine) as session:
            job = session.get(PhoneJob, self.job_id)
            assert job is not None
            return JobOutcome(self.job_id, job.status, job.error_code)  # type: ignore[arg-type]


_TERMINAL = [PhoneJobStatus.SUCCEEDED.value, PhoneJobStatus.FAILED.value]
_CLAIM_TERMINAL = {CodeClaimStatus.SUCCEEDED.value, CodeClaimStatus.FAILED.value}


def _jitter(seconds: float) -> float:
    """Full-range jitter between half and all of ``seconds`` so retries do not synchronise."""
    return seconds * random.uniform(0.5, 1.0)


def _protect(info: PhoneInfo, *, appid: str, openid: str, protection: DataProtection) -> PhoneFields:
    """The number encrypted (bound to its row), its blind index and its masked form."""
    cipher = protection.cipher
    return PhoneFields(
        phone_number_encrypted=cipher.encrypt(
            info.phone_number, context=users_context("phone_number", appid, openid)
        ),
        pure_phone_number_encrypted=cipher.encrypt(
            info.pure_phone_number, context=users_context("pure_phone_number", appid, openid)
        ),
        phone_blind_index=protection.blind_index.of(info.pure_phone_number, country_code=info.country_code),
        phone_masked=mask_phone_number(info.pure_phone_number),
        country_code=info.country_code,
        key_version=cipher.current_version,
    )
