"""Waiting for a job without polling: PostgreSQL notifies a job's end from the transaction that
writes it, and the waiters of every process wake at once; a notification lost with the listening
connection is made up for by a re-check when the listener reconnects."""

from __future__ import annotations

import asyncio
import json
import threading
import time
import uuid
from collections.abc import Collection, Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import timedelta

import psycopg
import pytest
from sqlalchemy import text
from sqlalchemy.orm import Session, sessionmaker

from models import PhoneJob
from tests.support.pipeline import DEVELOPMENT_PROTECTION, Pipeline, plain_celery_client, run_cli
from tests.support.waiting import wait_for
from worker.db import make_engine, session_factory
from worker.jobs.phone import utc_now
from worker.producer import JobView, Producer, _listen_connector
from worker.waiting import JobDoneListener

APPID = "wxpipeline000001"
#: How long a woken waiter may take to return after the commit that ended its job (generous for
#: a loaded CI machine; a poll-based wait would need its poll interval on top).
WAKE_BOUND_SECONDS = 2.0


@pytest.fixture
def sessions(migrated_database_url: str) -> Iterator[sessionmaker[Session]]:
    engine = make_engine(migrated_database_url)
    with engine.begin() as conn:
        conn.execute(text("TRUNCATE users, phone_jobs, login_jobs, code_claims, key_checks"))
    yield session_factory(engine)
    engine.dispose()


class CountingProducer(Producer):
    """A producer that counts its reads of jobs: a waiter reads only when woken or at its end."""

    reads = 0
    batches = 0

    def get_job(self, job_id: str) -> JobView | None:
        self.reads += 1
        return super().get_job(job_id)

    def get_jobs(self, job_ids: Collection[str]) -> dict[str, JobView]:
        self.reads += len(job_ids)
        self.batches += 1
        return super().get_jobs(job_ids)


def make_producer(
    sessions: sessionmaker[Session], listener: JobDoneListener | None = None
) -> CountingProducer:
    # No broker is used: these tests insert and end jobs themselves.
    return CountingProducer(
        sessions=sessions,
        celery_app=plain_celery_client("redis://127.0.0.1:1/0"),
        protection=DEVELOPMENT_PROTECTION,
        listener=listener,
    )


def add_jobs(sessions: sessionmaker[Session], count: int) -> list[str]:
    job_ids = [str(uuid.uuid4()) for _ in range(count)]
    now = utc_now()
    with sessions.begin() as session:
        session.add_all(
            PhoneJob(
                job_id=job_id,
                appid=APPID,
                openid=f"oWait{index:08d}",
                status="queued",
                created_at=now,
                code_expires_at=now + timedelta(minutes=5),
            )
            for index, job_id in enumerate(job_ids)
        )
    return job_ids


def end_jobs(sessions: sessionmaker[Session], job_ids: list[str], status: str = "succeeded") -> None:
    with sessions.begin() as session:
        session.execute(
            text("UPDATE phone_jobs SET status = :status, finished_at = now() WHERE job_id = ANY(:ids)"),
            {"status": status, "ids": job_ids},
        )


def test_a_waiter_wakes_at_the_commit_that_ends_its_job_and_reads_nothing_meanwhile(
    sessions: sessionmaker[Session],
) -> None:
    producer = make_producer(sessions)
    [job_id] = add_jobs(sessions, 1)
    assert producer.listener.wait_until_listening(10)
    ended_at: list[float] = []

    def end_later() -> None:
        time.sleep(1.5)
        with sessions.begin() as session:
            session.execute(
                text("UPDATE phone_jobs SET status = 'running' WHERE job_id = :id"), {"id": job_id}
            )
        time.sleep(0.5)  # a status that is not an end wakes no one
        end_jobs(sessions, [job_id])
        ended_at.append(time.monotonic())

    ender = threading.Thread(target=end_later)
    ender.start()
    job = producer.wait_for_job(job_id, timeout_seconds=30)
    returned_at = time.monotonic()
    ender.join()
    assert job is not None and (job.status, job.kind) == ("succeeded", "phone")
    assert returned_at - ended_at[0] < WAKE_BOUND_SECONDS
    # One read on entry, one when woken: no polling while the job ran.
    assert producer.reads == 2
    producer.close()


def test_a_wait_ends_at_its_timeout_with_the_job_as_it_stands(sessions: sessionmaker[Session]) -> None:
    producer = make_producer(sessions)
    [job_id] = add_jobs(sessions, 1)
    started = time.monotonic()
    job = producer.wait_for_job(job_id, timeout_seconds=1.5)
    assert 1.5 <= time.monotonic() - started < 1.5 + WAKE_BOUND_SECONDS
    assert job is not None and job.status == "queued" and not job.is_terminal
    # The listener's first connection re-checks every waiter once; nothing else reads.
    assert producer.reads <= 3
    assert producer.wait_for_job(str(uuid.uuid4()), timeout_seconds=5) is None  # at once
    assert producer.wait_for_job("bad\x00id", timeout_seconds=5) is None
    producer.close()


def test_a_job_ended_while_the_listener_was_disconnected_is_seen_when_it_reconnects(
    sessions: sessionmaker[Session], migrated_database_url: str
) -> None:
    """The notification is lost with the connection; the re-check on reconnect makes up for it."""
    engine = sessions.kw["bind"]
    connect = _listen_connector(engine)
    reconnect_allowed = threading.Event()
    reconnect_allowed.set()

    def gated_connect() -> psycopg.Connection[tuple[object, ...]]:
        if not reconnect_allowed.is_set():
            raise psycopg.OperationalError("held down by the test")
        return connect()

    listener = JobDoneListener(gated_connect)
    producer = make_producer(sessions, listener)
    [job_id] = add_jobs(sessions, 1)
    assert listener.wait_until_listening(10)
    results: list[JobView | None] = []
    waiter = threading.Thread(target=lambda: results.append(producer.wait_for_job(job_id, 60)))
    waiter.start()
    wait_for(lambda: listener.waiter_count == 1, timeout_seconds=10, what="the waiter")

    # Cut the listening connection from the server's side, and keep it down.
    reconnect_allowed.clear()
    with engine.begin() as conn:
        killed = conn.execute(
            text(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                "WHERE application_name = 'wxphone-listen' AND datname = current_database()"
            )
        ).scalars()
        assert any(killed)
    wait_for(lambda: not listener._listening.is_set(), timeout_seconds=15, what="the listener to notice")
    end_jobs(sessions, [job_id])  # notified to no one
    time.sleep(1.0)
    assert not results  # still waiting: nothing woke it

    reconnected_at = time.monotonic()
    reconnect_allowed.set()
    waiter.join(timeout=30)
    assert results and results[0] is not None and results[0].status == "succeeded"
    assert time.monotonic() - reconnected_at < 5.0  # the backoff is capped at 2 s
    assert listener.connections_made == 2
    producer.close()


def test_thousands_of_async_waiters_share_one_connection_and_no_thread_each(
    sessions: sessionmaker[Session],
) -> None:
    waiters = 2000
    producer = make_producer(sessions)
    job_ids = add_jobs(sessions, waiters)
    assert producer.listener.wait_until_listening(10)
    threads_before = threading.active_count()

    async def main() -> tuple[list[JobView | None], int, float]:
        tasks = [asyncio.create_task(producer.wait_for_job_async(job_id, 60)) for job_id in job_ids]
        await asyncio.sleep(0)
        deadline = time.monotonic() + 60
        while producer.listener.waiter_count < waiters and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        assert producer.listener.waiter_count == waiters
        while producer.reads < waiters and time.monotonic() < deadline:
            await asyncio.sleep(0.05)  # every initial read done
        await asyncio.sleep(0.5)
        peak_threads = threading.active_count()
        # One read each, in batches, until the end is notified (the listener's first
        # connection may have re-checked them once more).
        assert waiters <= producer.reads <= 2 * waiters
        assert producer.batches <= 2 * waiters / 100
        reads_before_end = producer.reads
        await asyncio.get_running_loop().run_in_executor(None, end_jobs, sessions, job_ids)
        ended = time.monotonic()
        results = await asyncio.gather(*tasks)
        assert producer.reads - reads_before_end == waiters  # once more each, when woken
        return results, peak_threads, time.monotonic() - ended

    results, peak_threads, drain_seconds = asyncio.run(main())
    assert [job.status if job else None for job in results] == ["succeeded"] * waiters
    # The loop's executor threads and nothing per waiter.
    assert peak_threads - threads_before <= 40
    assert drain_seconds < 30
    assert producer.listener.waiter_count == 0
    # One LISTEN connection for all of them (other tests' closed listeners let go of theirs).
    wait_for(lambda: listening_connections(sessions) == 1, timeout_seconds=5, what="one listener")
    producer.close()
    wait_for(lambda: listening_connections(sessions) == 0, timeout_seconds=5, what="a closed listener")


def listening_connections(sessions: sessionmaker[Session]) -> int:
    with sessions() as session:
        return int(
            session.execute(
                text(
                    "SELECT count(*) FROM pg_stat_activity "
                    "WHERE application_name = 'wxphone-listen' AND datname = current_database()"
                )
            ).scalar_one()
        )


def test_waiters_in_another_process_wake_too(sessions: sessionmaker[Session]) -> None:
    """Two producers (each its own listener, as two front-end processes) wait for one job."""
    first, second = make_producer(sessions), make_producer(sessions)
    [job_id] = add_jobs(sessions, 1)
    assert first.listener.wait_until_listening(10) and second.listener.wait_until_listening(10)
    with ThreadPoolExecutor(max_workers=2) as pool:
        waits = [pool.submit(producer.wait_for_job, job_id, 30) for producer in (first, second)]
        wait_for(lambda: first.listener.waiter_count == second.listener.waiter_count == 1, timeout_seconds=10)
        end_jobs(sessions, [job_id], status="failed")
        ended = time.monotonic()
        statuses = [wait.result(timeout=30) for wait in waits]
    assert time.monotonic() - ended < WAKE_BOUND_SECONDS
    assert [job.status if job else None for job in statuses] == ["failed", "failed"]
    first.close()
    second.close()


def test_submit_with_a_wait_returns_the_finished_job(pipeline: Pipeline) -> None:
    pipeline.start_worker()
    code = pipeline.sandbox.mint_phone_code(
        APPID, phone_number="13700001111", pure_phone_number="13700001111"
    )
    job = pipeline.producer.submit_phone_code(
        appid=APPID, openid="oWaitSubmit001", code=code, wait_seconds=30
    )
    assert isinstance(job, JobView)
    assert (job.status, job.error_code, job.attempts) == ("succeeded", None, 1)


def test_job_show_waits_from_the_command_line(pipeline: Pipeline) -> None:
    # No worker yet: the wait ends at its timeout with the job still queued (exit status 3).
    code = pipeline.sandbox.mint_phone_code(
        APPID, phone_number="13700002222", pure_phone_number="13700002222"
    )
    job_id = pipeline.producer.submit_phone_code(appid=APPID, openid="oWaitCli00001", code=code)
    still_open = run_cli(pipeline, "job", "show", job_id, "--wait", "1", "--json")
    assert still_open.returncode == 3, still_open.stderr
    assert json.loads(still_open.stdout)["status"] == "queued"

    pipeline.start_worker()
    done = run_cli(pipeline, "job", "show", job_id, "--wait", "60", "--json")
    assert done.returncode == 0, done.stderr
    shown = json.loads(done.stdout)
    assert (shown["status"], shown["kind"], shown["job_id"]) == ("succeeded", "phone", job_id)
    assert "13700002222" not in done.stdout  # a job shows no number
