"""The Python API for web front ends: submit phone codes, read jobs and users.

Front ends need the broker and the database, never an AppSecret::

    from worker.producer import submit_phone_code, get_job, get_user

    job_id = submit_phone_code(appid="wx123", openid=openid, code=code, caller="web-checkout")
    job = get_job(job_id)            # JobView: status queued/running/retrying/succeeded/failed
    job = wait_for_job(job_id, timeout_seconds=5)   # at its end, or its state after 5 s
    job = submit_phone_code(appid="wx123", openid=openid, code=code, wait_seconds=5)  # both at once
    user = get_user(appid="wx123", openid=openid)   # UserView with the verified number
    users = find_users_by_phone(phone_number="13800138000")   # exact match, via the blind index

Numbers are stored encrypted (``docs/security.md``); reading them needs the same
``WXPHONE_ENCRYPTION_KEYS`` and ``WXPHONE_BLIND_INDEX_KEY`` as the workers. Front ends do not need
the fingerprint key: the workers alone fingerprint codes.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import queue
import threading
import time
import uuid
import weakref
from collections.abc import Callable, Collection
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any, cast, overload

import psycopg
from celery import Celery
from sqlalchemy import CursorResult, Engine, select, update
from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.orm import Session, sessionmaker

from models import TERMINAL_JOB_STATUSES, KeyCheck, LoginJob, PhoneJob, PhoneJobStatus, User
from worker.audit import clean_caller
from worker.crypto import DataProtection, default_protection, users_context
from worker.jobs.phone import record_submission, utc_now
from worker.jobs.validation import validate_login, validate_phone_job
from worker.keychecks import mismatch_error
from worker.settings import is_redis_url
from worker.waiting import JobDoneListener
from worker.wechat.types import mask_phone_number

__all__ = [
    "JobReadTimeoutError",
    "JobView",
    "Producer",
    "UserView",
    "find_users_by_phone",
    "get_job",
    "get_user",
    "submit_login",
    "submit_phone_code",
    "wait_for_job",
]

PHONE_KIND = "phone"
LOGIN_KIND = "login"
RESOLVE_PHONE_TASK = "wxphone.resolve_phone"
LOGIN_TASK = "wxphone.login"
JOB_QUEUE = "wxphone"
#: A phone code's life, from WeChat's documentation.
DEFAULT_CODE_LIFETIME_SECONDS = 300.0
#: Threads a producer publishes from with RabbitMQ: publishes wait for confirms in parallel,
#: and a broker that blocks publishers holds at most this many.
PUBLISH_THREADS = 8
#: Celery's publish retry for submissions: one retry, at once.
PUBLISH_RETRY_POLICY = {"max_retries": 1, "interval_start": 0, "interval_step": 0.2, "interval_max": 0.2}
#: How long past its end an async wait gives a read of its job before it gives up.
READ_GRACE_SECONDS = 3.0
#: Most job ids one batched read of waiting jobs asks for.
READ_BATCH_SIZE = 500
#: How long opening the LISTEN connection may take.
LISTEN_CONNECT_TIMEOUT_SECONDS = 5
#: ``Settings.publish_timeout_seconds``'s default.
DEFAULT_PUBLISH_TIMEOUT_SECONDS = 10.0


def _iso(value: datetime | None) -> str | None:
    return value.isoformat() if value is not None else None


@dataclass(frozen=True)
class JobView:
    """A phone or login job as front ends see it.

    ``kind`` is ``phone`` or ``login``. A login job's ``openid`` and ``unionid`` are its result:
    unset until it succeeded (WeChat's session_key is never here).
    """

    job_id: str
    kind: str
    appid: str
    openid: str | None
    status: str
    error_code: str | None
    attempts: int
    created_at: datetime
    finished_at: datetime | None
    canonical_job_id: str | None = None
    unionid: str | None = None

    @property
    def is_terminal(self) -> bool:
        """Whether the job has ended (``succeeded`` or ``failed``): it never changes again."""
        return self.status in TERMINAL_JOB_STATUSES

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready fields, times in ISO 8601."""
        record: dict[str, Any] = {
            "job_id": self.job_id,
            "kind": self.kind,
            "appid": self.appid,
            "openid": self.openid,
            "status": self.status,
            "error_code": self.error_code,
            "attempts": self.attempts,
            "created_at": _iso(self.created_at),
            "finished_at": _iso(self.finished_at),
        }
        if self.kind == LOGIN_KIND:
            record["unionid"] = self.unionid
        return record


@dataclass(frozen=True)
class UserView:
    """A user record. The full number is returned to the caller but kept out of the repr."""

    appid: str
    openid: str
    unionid: str | None
    phone_number: str | None = field(repr=False)
    pure_phone_number: str | None = field(repr=False)
    country_code: str | None
    phone_verified_at: datetime | None

    @property
    def masked_phone_number(self) -> str | None:
        """For display: ``138****8000``."""
        return mask_phone_number(self.pure_phone_number) if self.pure_phone_number else None

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready fields, times in ISO 8601."""
        return {
            "appid": self.appid,
            "openid": self.openid,
            "unionid": self.unionid,
            "phone_number": self.phone_number,
            "pure_phone_number": self.pure_phone_number,
            "country_code": self.country_code,
            "phone_verified_at": _iso(self.phone_verified_at),
        }


class JobReadTimeoutError(TimeoutError):
    """A wait could not read its job in time: the database did not answer."""


class PublishError(RuntimeError):
    """The job was recorded but could not be handed to the broker; it is marked failed."""


class Producer:
    """Submits jobs (record first, publish after commit) and reads their results."""

    def __init__(
        self,
        *,
        sessions: sessionmaker[Session],
        celery_app: Celery,
        code_lifetime_seconds: float = DEFAULT_CODE_LIFETIME_SECONDS,
        clock: Callable[[], datetime] = utc_now,
        protection: DataProtection | None = None,
        publish_timeout_seconds: float = DEFAULT_PUBLISH_TIMEOUT_SECONDS,
        listener: JobDoneListener | None = None,
    ) -> None:
        self.sessions = sessions
        self.celery_app = celery_app
        #: How long a code lives from submission (WeChat's 5 minutes): a job's expiry.
        self.code_lifetime_seconds = code_lifetime_seconds
        self.clock = clock
        #: The keys that decrypt numbers and build lookups (default: this process's settings).
        #: Resolved now, so a front end without keys where the public development keys are not
        #: allowed stops when it builds its producer (SettingsError), not on its first read.
        self.protection = protection or default_protection()
        self._blind_index_key_checked = False
        #: How long a publish may wait for the broker (socket writes, RabbitMQ's confirm) before it
        #: fails: a broker that blocks publishers (a RabbitMQ resource alarm) must not hang the
        #: front end's request.
        self.publish_timeout_seconds = publish_timeout_seconds
        self._publisher_lock = threading.Lock()
        self._publisher_pool: _Publisher | None = None
        self._listener = listener
        self._loop_reads: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, _BatchedJobReads]
        self._loop_reads = weakref.WeakKeyDictionary()

    @overload
    def submit_phone_code(
        self, *, appid: str, openid: str, code: str, caller: str | None = None, wait_seconds: None = None
    ) -> str: ...

    @overload
    def submit_phone_code(
        self, *, appid: str, openid: str, code: str, caller: str | None = None, wait_seconds: float
    ) -> JobView: ...

    def submit_phone_code(
        self,
        *,
        appid: str,
        openid: str,
        code: str,
        caller: str | None = None,
        wait_seconds: float | None = None,
    ) -> str | JobView:
        """Record a ``queued`` job and enqueue ``wxphone.resolve_phone``; return the job id.

        With ``wait_seconds``, wait for the job as :meth:`wait_for_job` does and return its view
        instead: the job at its end, or as it stands when the wait is over.

        ``caller`` is an optional label of the front end for the audit trail (printable, at most
        64 characters; anything else is dropped).

        Raises :class:`worker.jobs.validation.InvalidInputError` for malformed input (nothing is
        recorded) and :class:`PublishError` when the broker cannot take the job (the job is then
        marked ``failed``/``enqueue_failed``, unless a worker already took it up: a publish that
        raised after the broker stored the message returns the job id as usual).
        """
        job = validate_phone_job(appid=appid, openid=openid, code=code, configured_appids=None)
        job_id = str(uuid.uuid4())
        with self.sessions.begin() as session:
            # No fingerprint here: front ends do not hold the fingerprint key; the worker that
            # claims the job writes it with the fleet's one key.
            record_submission(
                session,
                job_id=job_id,
                appid=job.appid,
                openid=job.openid,
                fingerprint=None,
                now=self.clock(),
                code_lifetime_seconds=self.code_lifetime_seconds,
            )
        # Published only after the row is committed, so a worker always finds its job.
        try:
            self._send(
                RESOLVE_PHONE_TASK,
                _with_caller({"appid": job.appid, "openid": job.openid, "code": job.code}, caller),
                job_id,
            )
        except Exception as error:
            # The publish may have failed after the broker took the message (a lost confirm, a
            # connection dropped after the write): a job a worker has already started or finished
            # is not touched, and is this submission's job after all.
            with self.sessions.begin() as session:
                marked = session.execute(
                    update(PhoneJob)
                    .where(PhoneJob.job_id == job_id, PhoneJob.status == PhoneJobStatus.QUEUED.value)
                    .values(status="failed", error_code="enqueue_failed", finished_at=self.clock())
                )
            if not cast("CursorResult[Any]", marked).rowcount:
                return job_id if wait_seconds is None else self._waited(job_id, wait_seconds)
            raise PublishError(f"job {job_id} could not be enqueued: {type(error).__name__}") from None
        return job_id if wait_seconds is None else self._waited(job_id, wait_seconds)

    def submit_login(self, *, appid: str, js_code: str, caller: str | None = None) -> str:
        """Record a ``queued`` login job and enqueue ``wxphone.login``; return the job id.

        The job is read like a phone job (:meth:`get_job`, :meth:`wait_for_job`); once it
        succeeded its view carries the user's openid and unionid. Raises
        :class:`worker.jobs.validation.InvalidInputError` for malformed input (nothing is
        recorded or sent) and :class:`PublishError` as :meth:`submit_phone_code` does.
        """
        login = validate_login(appid=appid, js_code=js_code, configured_appids=None)
        job_id = str(uuid.uuid4())
        now = self.clock()
        with self.sessions.begin() as session:
            session.execute(
                insert(LoginJob).values(
                    job_id=job_id,
                    appid=login.appid,
                    status=PhoneJobStatus.QUEUED.value,
                    created_at=now,
                    code_expires_at=now + timedelta(seconds=self.code_lifetime_seconds),
                )
            )
        try:
            self._send(
                LOGIN_TASK, _with_caller({"appid": login.appid, "js_code": login.js_code}, caller), job_id
            )
        except Exception as error:
            with self.sessions.begin() as session:
                marked = session.execute(
                    update(LoginJob)
                    .where(LoginJob.job_id == job_id, LoginJob.status == PhoneJobStatus.QUEUED.value)
                    .values(status="failed", error_code="enqueue_failed", finished_at=self.clock())
                )
            if not cast("CursorResult[Any]", marked).rowcount:
                return job_id
            raise PublishError(f"job {job_id} could not be enqueued: {type(error).__name__}") from None
        return job_id

    @property
    def listener(self) -> JobDoneListener:
        """Wakes :meth:`wait_for_job` waiters when a job ends: one LISTEN connection to the
        sessions' database, opened by the first wait (built on first use)."""
        with self._publisher_lock:
            if self._listener is None:
                self._listener = JobDoneListener(_listen_connector(_bound_engine(self.sessions)))
            return self._listener

    def close(self) -> None:
        """Stop this producer's job-end listener (a process that ends need not call it)."""
        if self._listener is not None:
            self._listener.close()

    def _waited(self, job_id: str, wait_seconds: float) -> JobView:
        job = self.wait_for_job(job_id, wait_seconds)
        if job is None:  # the row was committed before the publish: only a deleted row is missing
            raise LookupError(f"job {job_id} disappeared")
        return job

    def wait_for_job(self, job_id: str, timeout_seconds: float) -> JobView | None:
        """The job once it has ended, or as it stands after ``timeout_seconds``; None if no job
        has this id. Blocks the calling thread, which wakes when PostgreSQL notifies the job's
        end (:mod:`worker.waiting`), not by polling."""
        deadline = time.monotonic() + max(0.0, timeout_seconds)
        woken = threading.Event()
        with self.listener.watching(job_id, woken.set):
            while True:
                woken.clear()  # before reading: an end committed after the read sets it again
                job = self.get_job(job_id)
                remaining = deadline - time.monotonic()
                if job is None or job.is_terminal or remaining <= 0:
                    return job
                woken.wait(remaining)

    async def wait_for_job_async(self, job_id: str, timeout_seconds: float) -> JobView | None:
        """:meth:`wait_for_job` for asyncio: the waiting task holds no thread, and the reads of
        all the waits on one event loop are batched (one query for every job to look at, run on
        the loop's default executor), so one process can hold thousands of waits.

        A read the database does not answer by the end of the wait (and
        :data:`READ_GRACE_SECONDS` more) raises :class:`JobReadTimeoutError`: a request never
        hangs on a database that stopped answering."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + max(0.0, timeout_seconds)
        woken = asyncio.Event()
        reads = self._batched_reads(loop)

        def wake() -> None:
            # RuntimeError: the loop closed while the wait was still registered.
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(woken.set)

        with self.listener.watching(job_id, wake):
            while True:
                woken.clear()
                try:
                    job = await asyncio.wait_for(
                        reads.read(job_id), max(0.0, deadline - loop.time()) + READ_GRACE_SECONDS
                    )
                except TimeoutError:
                    raise JobReadTimeoutError(
                        f"job {job_id} could not be read: the database did not answer"
                    ) from None
                remaining = deadline - loop.time()
                if job is None or job.is_terminal or remaining <= 0:
                    return job
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(woken.wait(), remaining)

    def _batched_reads(self, loop: asyncio.AbstractEventLoop) -> _BatchedJobReads:
        with self._publisher_lock:
            reads = self._loop_reads.get(loop)
            if reads is None:
                reads = self._loop_reads[loop] = _BatchedJobReads(self.get_jobs)
            return reads

    def get_jobs(self, job_ids: Collection[str]) -> dict[str, JobView]:
        """The phone and login jobs among ``job_ids``, by id (two queries however many)."""
        wanted = [job_id for job_id in set(job_ids) if "\x00" not in job_id]
        if not wanted:
            return {}
        with self.sessions() as session:
            phones = session.execute(select(PhoneJob).where(PhoneJob.job_id.in_(wanted))).scalars().all()
            views = {job.job_id: _phone_view(job) for job in phones}
            missing = [job_id for job_id in wanted if job_id not in views]
            if missing:
                logins = session.execute(select(LoginJob).where(LoginJob.job_id.in_(missing))).scalars()
                views.update((job.job_id, _login_view(job)) for job in logins)
        return views

    def _send(self, task_name: str, kwargs: dict[str, Any], task_id: str) -> None:
        """Publish one task to the job queue, failing (``TimeoutError``) after a bounded time.

        Each write and each RabbitMQ confirm waits at most ``publish_timeout_seconds``. While a
        RabbitMQ memory or disk alarm blocks publishers, a failed publish still hangs afterwards:
        kombu closes the channel and waits for a reply RabbitMQ sends only once the alarm clears
        (py-amqp retries its read on EAGAIN, so no socket timeout ends that wait). So with
        RabbitMQ the publish runs on one of a few publishing threads and the caller stops waiting
        for it after twice the publish timeout (a publish that has not started by then is not
        sent); a message that lands later finds its job failed and changes nothing."""

        # With confirms, a message no queue takes (the job queue deleted after this connection
        # declared it) is returned before its confirm, and the publish raises instead of it being
        # dropped unseen. Without confirms nothing waits for the return: it would surface later,
        # in an unrelated wait on the pooled channel.
        transport_options = self.celery_app.conf.broker_transport_options or {}
        confirmed = bool(transport_options.get("confirm_publish"))

        def send() -> None:
            self.celery_app.send_task(
                task_name,
                kwargs=kwargs,
                task_id=task_id,
                queue=JOB_QUEUE,
                timeout=self.publish_timeout_seconds,
                confirm_timeout=self.publish_timeout_seconds,
                mandatory=confirmed,
                # One more try on a fresh connection (a broker restart), and no more: each waits
                # the publish timeout, and a message RabbitMQ took before its confirm timed out
                # lands once more for every try.
                retry_policy=PUBLISH_RETRY_POLICY,
            )

        if is_redis_url(str(self.celery_app.conf.broker_url or "")):
            send()  # every Redis command carries a socket timeout of its own
            return
        publishing = self._publisher().submit(send)
        try:
            publishing.result(timeout=2 * self.publish_timeout_seconds)
        except concurrent.futures.TimeoutError:
            publishing.cancel()  # not sent at all if it had not started
            raise TimeoutError(
                f"the broker took no message within {2 * self.publish_timeout_seconds:.0f} s"
            ) from None

    def _publisher(self) -> _Publisher:
        """The threads this producer publishes from with RabbitMQ (started on first use)."""
        with self._publisher_lock:
            if self._publisher_pool is None:
                self._publisher_pool = _Publisher(PUBLISH_THREADS)
            return self._publisher_pool

    def get_job(self, job_id: str) -> JobView | None:
        """The phone or login job with this id, or None."""
        if "\x00" in job_id:
            return None  # PostgreSQL text cannot hold NUL, so no job has such an id
        with self.sessions() as session:
            job = session.get(PhoneJob, job_id)
            if job is not None:
                return _phone_view(job)
            login = session.get(LoginJob, job_id)
            return None if login is None else _login_view(login)

    def get_user(self, *, appid: str, openid: str) -> UserView | None:
        """The user (appid, openid) with the full, decrypted number, or None."""
        if "\x00" in appid or "\x00" in openid:
            return None
        with self.sessions() as session:
            user = session.execute(
                select(User).where(User.appid == appid, User.openid == openid)
            ).scalar_one_or_none()
            return None if user is None else self._view(user)

    def find_users_by_phone(self, *, phone_number: str, appid: str | None = None) -> list[UserView]:
        """Users whose verified number is ``phone_number`` (exact match), in one app or in all.

        ``phone_number`` may carry its country code (``+86 138 0013 8000``); without one it is a
        mainland number. The lookup uses the keyed blind index, never a plaintext column.
        """
        self._check_blind_index_key()
        try:
            index = self.protection.blind_index.of(phone_number)
        except ValueError:
            return []
        query = select(User).where(User.phone_blind_index == index)
        if appid is not None:
            if "\x00" in appid:
                return []
            query = query.where(User.appid == appid)
        with self.sessions() as session:
            users = session.execute(query.order_by(User.appid, User.id)).scalars().all()
            return [self._view(user) for user in users]

    def _check_blind_index_key(self) -> None:
        """Refuse lookups under a blind-index key other than the workers' (they would find no
        one); checked until the workers have recorded theirs, then once."""
        if self._blind_index_key_checked:
            return
        with self.sessions() as session:
            stored = session.execute(
                select(KeyCheck.check_value).where(KeyCheck.name == "blind_index_key")
            ).scalar_one_or_none()
        if stored is not None and not self.protection.blind_index.matches_check(stored):
            raise mismatch_error("blind_index_key")
        self._blind_index_key_checked = stored is not None

    def _view(self, user: User) -> UserView:
        cipher = self.protection.cipher

        def decrypted(column: str, stored: str | None) -> str | None:
            if stored is None:
                return None
            return cipher.decrypt(stored, context=users_context(column, user.appid, user.openid))

        return UserView(
            appid=user.appid,
            openid=user.openid,
            unionid=user.unionid,
            phone_number=decrypted("phone_number", user.phone_number_encrypted),
            pure_phone_number=decrypted("pure_phone_number", user.pure_phone_number_encrypted),
            country_code=user.country_code,
            phone_verified_at=user.phone_verified_at,
        )


def _phone_view(job: PhoneJob) -> JobView:
    return JobView(
        job_id=job.job_id,
        kind=PHONE_KIND,
        appid=job.appid,
        openid=job.openid,
        status=job.status,
        error_code=job.error_code,
        attempts=job.attempts,
        created_at=job.created_at,
        finished_at=job.finished_at,
        canonical_job_id=job.canonical_job_id,
    )


def _login_view(job: LoginJob) -> JobView:
    return JobView(
        job_id=job.job_id,
        kind=LOGIN_KIND,
        appid=job.appid,
        openid=job.openid,
        status=job.status,
        error_code=job.error_code,
        attempts=job.attempts,
        created_at=job.created_at,
        finished_at=job.finished_at,
        unionid=job.unionid,
    )


class _BatchedJobReads:
    """Coalesces the job reads of one event loop's waits: while one batch is being read, the
    next one gathers, so a thousand waiters woken together (a listener that reconnected) cost a
    few queries, not a thousand."""

    def __init__(self, get_jobs: Callable[[Collection[str]], dict[str, JobView]]) -> None:
        self._get_jobs = get_jobs
        self._pending: dict[str, list[asyncio.Future[JobView | None]]] = {}
        self._reading = False

    async def read(self, job_id: str) -> JobView | None:
        future: asyncio.Future[JobView | None] = asyncio.get_running_loop().create_future()
        self._pending.setdefault(job_id, []).append(future)
        if not self._reading:
            self._reading = True
            asyncio.get_running_loop().create_task(self._drain())
        return await future

    async def _drain(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            while self._pending:
                batch = dict(list(self._pending.items())[:READ_BATCH_SIZE])
                for job_id in batch:
                    del self._pending[job_id]
                try:
                    views = await loop.run_in_executor(None, self._get_jobs, list(batch))
                except Exception as error:  # handed to every waiter of the batch
                    for futures in batch.values():
                        for future in futures:
                            if not future.done():
                                future.set_exception(error)
                    continue
                for job_id, futures in batch.items():
                    for future in futures:
                        if not future.done():
                            future.set_result(views.get(job_id))
        finally:
            self._reading = False


class _Publisher:
    """A few daemon threads that run publishes handed to them. Daemon threads, unlike a
    ``ThreadPoolExecutor``'s, do not hold the process at exit while a publish waits for a broker
    that blocks publishers."""

    def __init__(self, threads: int) -> None:
        self._work: queue.SimpleQueue[tuple[concurrent.futures.Future[None], Callable[[], None]]]
        self._work = queue.SimpleQueue()
        for index in range(threads):
            threading.Thread(target=self._run, name=f"wxphone-publish-{index}", daemon=True).start()

    def submit(self, publish: Callable[[], None]) -> concurrent.futures.Future[None]:
        future: concurrent.futures.Future[None] = concurrent.futures.Future()
        self._work.put((future, publish))
        return future

    def _run(self) -> None:
        while True:
            future, publish = self._work.get()
            if not future.set_running_or_notify_cancel():
                continue  # the caller gave up before it started: never sent
            try:
                publish()
            except BaseException as error:  # handed to the caller
                future.set_exception(error)
            else:
                future.set_result(None)


def _bound_engine(sessions: sessionmaker[Session]) -> Engine:
    bind = sessions.kw.get("bind")
    if not isinstance(bind, Engine):
        raise TypeError("the session factory must be bound to an Engine")
    return bind


def _listen_connector(engine: Engine) -> Callable[[], psycopg.Connection[tuple[object, ...]]]:
    """Opens the LISTEN connection of :class:`JobDoneListener` to the engine's database."""
    conninfo = engine.url.set(drivername="postgresql").render_as_string(hide_password=False)

    def connect() -> psycopg.Connection[tuple[object, ...]]:
        return psycopg.connect(
            conninfo,
            autocommit=True,
            connect_timeout=LISTEN_CONNECT_TIMEOUT_SECONDS,
            application_name="wxphone-listen",
            # A peer gone without a word (a host lost, a firewall dropping the idle flow) is
            # noticed by the listener's probe; keepalives end the probe's wait.
            keepalives=1,
            keepalives_idle=10,
            keepalives_interval=5,
            keepalives_count=3,
        )

    return connect


def _with_caller(kwargs: dict[str, Any], caller: str | None) -> dict[str, Any]:
    label = clean_caller(caller)
    return {**kwargs, "caller": label} if label is not None else kwargs


def _default() -> Producer:
    from worker.runtime import get_runtime

    return get_runtime().producer


def submit_phone_code(*, appid: str, openid: str, code: str, caller: str | None = None) -> str:
    """:meth:`Producer.submit_phone_code` with the process-wide settings."""
    return _default().submit_phone_code(appid=appid, openid=openid, code=code, caller=caller)


def get_job(job_id: str) -> JobView | None:
    """:meth:`Producer.get_job` with the process-wide settings."""
    return _default().get_job(job_id)


def submit_login(*, appid: str, js_code: str, caller: str | None = None) -> str:
    """:meth:`Producer.submit_login` with the process-wide settings."""
    return _default().submit_login(appid=appid, js_code=js_code, caller=caller)


def wait_for_job(job_id: str, timeout_seconds: float) -> JobView | None:
    """:meth:`Producer.wait_for_job` with the process-wide settings."""
    return _default().wait_for_job(job_id, timeout_seconds)


def get_user(*, appid: str, openid: str) -> UserView | None:
    """:meth:`Producer.get_user` with the process-wide settings."""
    return _default().get_user(appid=appid, openid=openid)


def find_users_by_phone(*, phone_number: str, appid: str | None = None) -> list[UserView]:
    """:meth:`Producer.find_users_by_phone` with the process-wide settings."""
    return _default().find_users_by_phone(phone_number=phone_number, appid=appid)
