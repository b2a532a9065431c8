"""Submit to answer: what a front end's caller waits for, from the bench process itself.

Each submission is ``Producer.submit_phone_code(...)`` followed by a wait for the job's end
(``Producer.wait_for_job_async`` on one asyncio event loop, or ``Producer.wait_for_job`` from
caller threads). ``submit_phone_code(..., wait_seconds=...)`` is exactly those two calls
(``Producer._waited``); they are made separately here only so that the wake-up of each job can be
stamped between them: a second callback registered with the producer's own listener
(``listener.watching``) records when the job's NOTIFY reached this process.

Submissions are paced: submission ``i`` starts at ``start + i / rate``, whether or not earlier
ones have been answered (an open workload, as callers behave). The clock of one sample runs from
just before the submit call to the return of the wait with the job's end.

:func:`stage_samples` splits each answer into the stages it went through, from this process's
clock and the job's own times (same host, same wall clock):

``executor wait``   asyncio only: until a thread of the submit pool took up the blocking submit
``submit``          the submit call: the job recorded in PostgreSQL, then published to the broker
``to worker``       submit returned -> the worker started the task (``phone_jobs.started_at``):
                    broker delivery and Celery's hand-over to a pool thread or greenlet
``exchange``        the WeChat call as the worker timed it (``exchange_audit.latency_ms``, whole ms)
``worker other``    the rest of the worker's run up to its final write (``finished_at``): the claim
                    statement, the token, encrypting the number, the connection checkout
``commit + notify`` ``finished_at`` -> the NOTIFY reached the bench's listener: the success
                    statement, its commit, and PostgreSQL's delivery of the notification
``read``            NOTIFY received -> the wait returned: waking the waiter, its read of the job

To tell PostgreSQL's delivery of a notification from the worker's statement and commit, a probe
sends a bare ``pg_notify`` on the same channel from its own autocommit connection ten times a
second during the phase and times it until the producer's listener calls back: the same delivery
path (commit, PostgreSQL, the listener's thread in this process) without the job's statement.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import psycopg
from sqlalchemy import Engine

from bench.report import latency_summary
from models.job_notify import JOB_DONE_CHANNEL
from worker.producer import Producer

__all__ = [
    "STAGES",
    "WAITER_KINDS",
    "AnswerSample",
    "PacedAnswers",
    "paced_answers",
    "stage_samples",
    "stage_summaries",
]

#: ``asyncio``: one event loop, ``wait_for_job_async`` (no thread per waiter); ``threads``:
#: caller threads blocking in ``wait_for_job``.
WAITER_KINDS = ("asyncio", "threads")
#: Caller threads of the ``threads`` waiters (each takes every ANSWER_THREADS-th submission).
ANSWER_THREADS = 64
#: Threads the asyncio callers run their blocking submits on: a pool of their own, as an asyncio
#: web front end has (anyio's ``to_thread``, which FastAPI and Starlette use, allows 40 at once);
#: the producer's batched reads keep the event loop's default executor.
SUBMIT_THREADS = 40
#: Seconds between two NOTIFY probes.
PROBE_INTERVAL_SECONDS = 0.1
STAGES = ("executor wait", "submit", "to worker", "exchange", "worker other", "commit + notify", "read")


@dataclass(frozen=True)
class AnswerSample:
    """One submission as its caller saw it (wall-clock seconds, ``time.time()``)."""

    job_id: str
    scheduled_at: float
    submit_at: float
    #: When ``submit_phone_code`` began to run (asyncio: on an executor thread; threads: at once).
    call_started_at: float
    submitted_at: float
    #: When the job's notification reached this process (the last wake before the answer).
    woken_at: float | None
    answered_at: float
    #: The status the wait returned (``succeeded`` is an answer; anything else is not).
    status: str | None

    @property
    def answer_ms(self) -> float:
        return (self.answered_at - self.submit_at) * 1000

    @property
    def lag_ms(self) -> float:
        """How late the submission started against its schedule (the bench process's own lag)."""
        return max(0.0, (self.submit_at - self.scheduled_at) * 1000)


class _Stamps:
    """When each watched job's wake came, recorded from the listener's thread."""

    def __init__(self) -> None:
        self.woken: dict[str, float] = {}
        self._lock = threading.Lock()
        self.in_flight = 0
        self.most_in_flight = 0

    def callback(self, job_id: str) -> Callable[[], None]:
        def stamp() -> None:
            # The last wake wins: a spurious wake-all on a reconnect is followed by the real one.
            self.woken[job_id] = time.time()

        return stamp

    @contextmanager
    def flight(self) -> Iterator[None]:
        with self._lock:
            self.in_flight += 1
            self.most_in_flight = max(self.most_in_flight, self.in_flight)
        try:
            yield
        finally:
            with self._lock:
                self.in_flight -= 1


@dataclass(frozen=True)
class PacedAnswers:
    samples: list[AnswerSample]
    #: Most submissions between their submit and their answer at one moment.
    most_in_flight: int
    #: Connections the listener made during the phase: 0 unless it lost its connection.
    listener_reconnects: int
    #: CPU seconds of this whole process during the phase (callers, listener, probe, sampler).
    caller_cpu_seconds: float
    #: Milliseconds from sending a bare NOTIFY to the listener's callback, one per probe.
    notify_probe_ms: list[float]


class _NotifyProbe:
    """Times bare notifications on the job channel until the producer's listener hears them."""

    def __init__(self, producer: Producer, engine: Engine) -> None:
        self.producer = producer
        self.conninfo = engine.url.set(drivername="postgresql").render_as_string(hide_password=False)
        self.delays_ms: list[float] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="bench-notify-probe", daemon=True)

    def __enter__(self) -> _NotifyProbe:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join(timeout=10)

    def _run(self) -> None:
        with psycopg.connect(self.conninfo, autocommit=True, application_name="bench-notify-probe") as conn:
            while not self._stop.wait(PROBE_INTERVAL_SECONDS):
                probe_id = f"bench-probe-{uuid.uuid4().hex}"
                heard = threading.Event()
                heard_at: list[float] = []

                def hear(heard_at: list[float] = heard_at, heard: threading.Event = heard) -> None:
                    heard_at.append(time.time())
                    heard.set()

                with self.producer.listener.watching(probe_id, hear):
                    sent_at = time.time()
                    conn.execute("SELECT pg_notify(%s, %s)", (JOB_DONE_CHANNEL, probe_id))
                    if heard.wait(5.0):
                        self.delays_ms.append((heard_at[0] - sent_at) * 1000)


def paced_answers(
    producer: Producer,
    engine: Engine,
    appid: str,
    items: Sequence[tuple[str, str]],
    rate: float,
    *,
    waiters: str = "asyncio",
    timeout_seconds: float = 30.0,
) -> PacedAnswers:
    """Submit ``items`` (openid, code) at ``rate`` per second and wait for each answer; probe
    NOTIFY delivery meanwhile on a connection of its own to ``engine``'s database."""
    if waiters not in WAITER_KINDS:
        raise ValueError(f"waiters must be one of {WAITER_KINDS}")
    # A front end that has been up a while listens already: connect before the clock starts (the
    # first connection also wakes every waiter once, which would blur the stamps).
    if not producer.listener.wait_until_listening(10.0):
        raise RuntimeError("the producer's job-end listener did not connect within 10 s")
    connections_before = producer.listener.connections_made
    stamps = _Stamps()
    cpu_before = time.process_time()
    with _NotifyProbe(producer, engine) as probe:
        if waiters == "asyncio":
            samples = asyncio.run(_paced_async(producer, appid, items, rate, timeout_seconds, stamps))
        else:
            samples = _paced_threads(producer, appid, items, rate, timeout_seconds, stamps)
    return PacedAnswers(
        samples=samples,
        most_in_flight=stamps.most_in_flight,
        listener_reconnects=producer.listener.connections_made - connections_before,
        caller_cpu_seconds=time.process_time() - cpu_before,
        notify_probe_ms=probe.delays_ms,
    )


async def _paced_async(
    producer: Producer,
    appid: str,
    items: Sequence[tuple[str, str]],
    rate: float,
    timeout_seconds: float,
    stamps: _Stamps,
) -> list[AnswerSample]:
    loop = asyncio.get_running_loop()
    submits = concurrent.futures.ThreadPoolExecutor(SUBMIT_THREADS, thread_name_prefix="bench-submit")
    start_loop = loop.time() + 0.2
    start_wall = time.time() + 0.2

    async def one(index: int) -> AnswerSample:
        delay = start_loop + index / rate - loop.time()
        if delay > 0:
            await asyncio.sleep(delay)
        openid, code = items[index]
        call_started: list[float] = []

        def submit() -> str:
            call_started.append(time.time())
            return producer.submit_phone_code(appid=appid, openid=openid, code=code)

        with stamps.flight():
            submit_at = time.time()
            # What an asyncio front end does with the (blocking) submit: a thread pool.
            job_id = await loop.run_in_executor(submits, submit)
            submitted_at = time.time()
            with producer.listener.watching(job_id, stamps.callback(job_id)):
                job = await producer.wait_for_job_async(job_id, timeout_seconds)
            answered_at = time.time()
        return AnswerSample(
            job_id=job_id,
            scheduled_at=start_wall + index / rate,
            submit_at=submit_at,
            call_started_at=call_started[0],
            submitted_at=submitted_at,
            woken_at=stamps.woken.get(job_id),
            answered_at=answered_at,
            status=job.status if job is not None else None,
        )

    try:
        return list(await asyncio.gather(*(one(index) for index in range(len(items)))))
    finally:
        submits.shutdown(wait=False)


def _paced_threads(
    producer: Producer,
    appid: str,
    items: Sequence[tuple[str, str]],
    rate: float,
    timeout_seconds: float,
    stamps: _Stamps,
) -> list[AnswerSample]:
    samples: list[AnswerSample | None] = [None] * len(items)
    start_monotonic = time.monotonic() + 0.2
    start_wall = time.time() + 0.2

    def lane(lane_index: int) -> None:
        for index in range(lane_index, len(items), ANSWER_THREADS):
            delay = start_monotonic + index / rate - time.monotonic()
            if delay > 0:
                time.sleep(delay)
            openid, code = items[index]
            with stamps.flight():
                submit_at = time.time()
                job_id = producer.submit_phone_code(appid=appid, openid=openid, code=code)
                submitted_at = time.time()
                with producer.listener.watching(job_id, stamps.callback(job_id)):
                    job = producer.wait_for_job(job_id, timeout_seconds)
                answered_at = time.time()
            samples[index] = AnswerSample(
                job_id=job_id,
                scheduled_at=start_wall + index / rate,
                submit_at=submit_at,
                call_started_at=submit_at,
                submitted_at=submitted_at,
                woken_at=stamps.woken.get(job_id),
                answered_at=answered_at,
                status=job.status if job is not None else None,
            )

    with concurrent.futures.ThreadPoolExecutor(max_workers=ANSWER_THREADS) as executor:
        for future in [executor.submit(lane, n) for n in range(ANSWER_THREADS)]:
            future.result()
    return [sample for sample in samples if sample is not None]


def stage_samples(
    samples: Sequence[AnswerSample],
    started_at: Mapping[str, float | None],
    finished_at: Mapping[str, float | None],
    exchange_ms: Mapping[str, float],
) -> dict[str, list[float]]:
    """Milliseconds spent in each of :data:`STAGES`, over the answered samples that have every
    time the split needs (job times from ``phone_jobs``, the exchange from ``exchange_audit``)."""
    stages: dict[str, list[float]] = {stage: [] for stage in STAGES}
    for sample in samples:
        started = started_at.get(sample.job_id)
        finished = finished_at.get(sample.job_id)
        exchange = exchange_ms.get(sample.job_id)
        if sample.status != "succeeded" or None in (started, finished, exchange, sample.woken_at):
            continue
        assert started is not None and finished is not None and exchange is not None
        assert sample.woken_at is not None
        stages["executor wait"].append((sample.call_started_at - sample.submit_at) * 1000)
        stages["submit"].append((sample.submitted_at - sample.call_started_at) * 1000)
        stages["to worker"].append((started - sample.submitted_at) * 1000)
        stages["exchange"].append(exchange)
        stages["worker other"].append((finished - started) * 1000 - exchange)
        stages["commit + notify"].append((sample.woken_at - finished) * 1000)
        stages["read"].append((sample.answered_at - sample.woken_at) * 1000)
    return stages


def stage_summaries(stages: Mapping[str, Sequence[float]]) -> dict[str, dict[str, float | None]]:
    """p50/p95/p99/max/mean of each stage."""
    return {stage: latency_summary(values) for stage, values in stages.items()}
