"""Redis (broker and token store) crashes mid-load and comes back on the same port and data.

Redis runs with ``appendonly yes``, as ``wxphone doctor`` requires: queued and unacknowledged
messages survive the crash. Workers are not restarted: they must reconnect and consume again by
themselves (Celery/kombu once reconnected and then sat idle; kombu >= 5.4 fixed it, and this
test keeps it fixed).

What becomes of a message a worker held when Redis died:

* a running task's: the task finishes and its ack or requeue runs once the worker is connected
  again (both wait in the event loop). Only if one ran in the instant between the crash and the
  worker noticing it does it fail ("Couldn't ack"/"Couldn't reject"); the message then comes back
  after the visibility timeout, to find its job terminal or to run it;
* a retry's, waiting for its countdown: Celery forgets it when the connection is lost, and the
  worker puts it back on the queue once reconnected (``worker/broker.py`` ``Consumer``);
* one ``BRPOP`` had just taken off the queue and the worker had not yet recorded as
  unacknowledged (kombu takes a message in two steps; the record fails with Redis gone): the
  worker keeps it and records and requeues it once reconnected (``Consumer`` again).

Only a message Redis removed from the queue in the instant before it died, its answer to the
``BRPOP`` written to the append-only file but never sent, is lost: no one holds it, as when a
worker dies between the two steps (docs/reliability.md, kombu #305). Its job, its code never
presented, is closed ``code_expired`` by the sweep once the code has expired; at most one such
message per worker (each has one ``BRPOP`` at a time).
"""

from __future__ import annotations

import json
import time
from datetime import datetime
from pathlib import Path

import pytest
import redis

from tests.support.faults import (
    FAST_SETTINGS,
    JOB_QUEUE_KEY,
    UNACKED_KEY,
    SubmittedJob,
    assert_all_terminal_and_correct,
    assert_codes_match_outcomes,
    assert_wechat_calls_accounted,
    count_in,
    jobs_without_message,
    print_recovery,
    private_broker,
    submit_jobs,
    wait_until_terminal,
)
from tests.support.pipeline import APPS, Pipeline, producer_with_policy
from tests.support.processes import ManagedProcess
from tests.support.services import RedisServer
from tests.support.waiting import wait_for
from worker.settings import load_settings

pytestmark = pytest.mark.faults

APP_A, APP_B = sorted(APPS)
DOWN_SECONDS = 3
#: One per worker thread: the first calls of the load get a busy reply, so that their jobs'
#: retries are scheduled, a second or so out, when Redis dies and come due while it is down.
BUSY_REPLIES = 16
#: Long enough for every job the crash delays to finish (some wait for the visibility timeout),
#: short enough for the sweep to close a job whose message the crash cost within the test.
CODE_LIFETIME_SECONDS = 75


def diagnosis(workers: list[ManagedProcess]) -> str:
    """What the workers said about the outage: crashes, and messages dropped instead of retried."""
    lines = [f"{worker.name} running: {worker.is_running()}" for worker in workers]
    for worker in workers:
        lines += [
            f"{worker.name}: {line[:200]}"
            for line in worker.output().splitlines()
            if "Unrecoverable error" in line or "reject requeue=False" in line
        ]
    return "\n".join(lines)


def test_workers_resume_by_themselves_after_redis_crashes_mid_load(
    pipeline: Pipeline, tmp_path: Path
) -> None:
    visibility = float(FAST_SETTINGS["visibility_timeout_seconds"])
    settings = load_settings(**FAST_SETTINGS)
    server = RedisServer(tmp_path / "redis-aof", appendonly=True)
    server.start()
    try:
        with private_broker(pipeline, server.url(0), server.url(1)):
            # Retries a second or so out, so that those scheduled just before the crash come due
            # while Redis is down.
            pipeline.settings.update(FAST_SETTINGS, retry_backoff_base_seconds=1, retry_backoff_max_seconds=2)
            pipeline.sandbox.configure(latency_ms={"phone": 100})
            workers = [
                pipeline.start_worker(name, concurrency=8, pool="threads") for name in ("redis1", "redis2")
            ]
            producer = producer_with_policy(pipeline, code_lifetime_seconds=CODE_LIFETIME_SECONDS)
            # WeChat is busy as the load starts: the first call of every thread gets a busy reply
            # and its job schedules a retry. Queued before the jobs, the busy replies are all
            # taken, whatever the pace of the load.
            pipeline.sandbox.inject_fault("phone", errcode=-1, times=BUSY_REPLIES)
            submitted_at = time.monotonic()
            jobs = submit_jobs(pipeline, APP_A, 60, label="rds", producer=producer) + submit_jobs(
                pipeline, APP_B, 60, label="rds", producer=producer
            )
            wait_for(lambda: pipeline.sandbox.pending_faults() == [], timeout_seconds=30, what="busy replies")
            server.kill()
            killed_at = time.monotonic()
            done_at_kill = count_in(pipeline, jobs)
            time.sleep(DOWN_SECONDS)
            server.start()  # same port, same directory: the append-only file is replayed

            # Every job ends, except one whose message Redis no longer holds anywhere (see above).
            def settled() -> list[SubmittedJob] | None:
                lost = jobs_without_message(pipeline, jobs)
                return lost if len(jobs) - count_in(pipeline, jobs) == len(lost) else None

            try:
                wait_for(
                    lambda: settled() is not None,
                    timeout_seconds=visibility + 20,
                    interval_seconds=0.2,
                    what="every job whose message survived to end "
                    "(an unacknowledged message whose ack failed is back after the visibility timeout)",
                )
            except AssertionError as error:
                raise AssertionError(f"{error}\n{diagnosis(workers)}") from None
            seconds = time.monotonic() - killed_at
            lost = settled() or []
            print_recovery(
                "Redis crash mid-load",
                seconds,
                f"down {DOWN_SECONDS}s, {done_at_kill} of {len(jobs)} jobs done at the crash, "
                f"{len(lost)} message(s) Redis no longer held, workers not restarted",
            )
            assert all(worker.is_running() for worker in workers)
            if lost:
                # (A job seen here between BRPOP and its record simply finishes.)
                pipeline.start_beat()
                wait_until_terminal(
                    pipeline,
                    jobs,
                    timeout_seconds=CODE_LIFETIME_SECONDS
                    + settings.stale_claim_seconds
                    + 2 * settings.sweep_interval_seconds
                    + 15,
                    since=submitted_at,
                    why="the sweep closes a job whose message is gone once its code has expired",
                )
            time.sleep(0.5)
            outcome = assert_all_terminal_and_correct(
                pipeline, jobs, allowed_errors={"reply_lost", "code_expired"}
            )
            expired = {job_id for job_id, row in outcome.rows.items() if row["error_code"] == "code_expired"}
            assert expired <= {job.job_id for job in lost}
            assert len(expired) <= len(workers), "each worker has one BRPOP at a time"
            assert_wechat_calls_accounted(pipeline, jobs, outcome)
            assert_codes_match_outcomes(pipeline, jobs, outcome)  # expired codes were never spent

            # The workers consume new work too (not "connected but idle").
            after = submit_jobs(pipeline, APP_A, 10, label="rdsafter")
            wait_until_terminal(pipeline, after, timeout_seconds=30)
            later = assert_all_terminal_and_correct(pipeline, after)
            assert later.succeeded == len(after)
    finally:
        server.stop()


#: A retry's countdown: long enough that Redis dies well before it ends, however busy the machine.
RETRY_COUNTDOWN_SECONDS = 8
#: Long enough that a message back only after it cannot pass for a prompt recovery.
LONG_VISIBILITY_SECONDS = 60


def held_retry_eta(broker_url: str, job: SubmittedJob) -> float | None:
    """When the retry of ``job`` is due, if a worker holds its message waiting for the countdown:
    taken off the queue, unacknowledged, the only message of the job in Redis, due later."""
    with redis.Redis.from_url(broker_url) as broker:
        queued = broker.lrange(JOB_QUEUE_KEY, 0, -1)
        unacked = [json.loads(raw)[0] for raw in broker.hvals(UNACKED_KEY)]
    if queued or len(unacked) != 1 or unacked[0]["headers"]["id"] != job.job_id:
        return None
    eta = unacked[0]["headers"].get("eta")
    due = datetime.fromisoformat(eta).timestamp() if eta else None
    return due if due is not None and due > time.time() else None


def test_a_retry_waiting_for_its_countdown_when_redis_crashes_runs_soon_after_redis_is_back(
    pipeline: Pipeline, tmp_path: Path
) -> None:
    """Celery forgets a retry it holds for its countdown when the broker connection is lost; the
    worker requeues it once reconnected, so the job does not wait for the visibility timeout."""
    server = RedisServer(tmp_path / "redis-aof", appendonly=True)
    server.start()
    try:
        with private_broker(pipeline, server.url(0), server.url(1)):
            pipeline.settings.update(
                FAST_SETTINGS,
                visibility_timeout_seconds=LONG_VISIBILITY_SECONDS,
                retry_backoff_base_seconds=RETRY_COUNTDOWN_SECONDS,
                retry_backoff_max_seconds=RETRY_COUNTDOWN_SECONDS,
            )
            worker = pipeline.start_worker("countdown", concurrency=2, pool="threads")
            pipeline.sandbox.inject_fault("phone", errcode=-1, times=1)
            [job] = submit_jobs(pipeline, APP_A, 1, label="eta")
            due: float = wait_for(
                lambda: held_retry_eta(pipeline.broker_url, job) or 0.0,
                timeout_seconds=30,
                what="the worker to hold the job's retry, waiting for its countdown",
            )
            server.kill()
            killed_at = time.monotonic()
            assert time.time() < due, "Redis died before the retry was due"
            time.sleep(DOWN_SECONDS)
            server.start()

            seconds = wait_until_terminal(
                pipeline,
                [job],
                timeout_seconds=LONG_VISIBILITY_SECONDS / 2,
                since=killed_at,
                why=f"the retry is due {RETRY_COUNTDOWN_SECONDS}s at most after the busy reply; "
                f"it must not wait for the visibility timeout ({LONG_VISIBILITY_SECONDS}s)",
            )
            print_recovery(
                "retry waiting for its countdown at a Redis crash",
                seconds,
                f"down {DOWN_SECONDS}s, countdown up to {RETRY_COUNTDOWN_SECONDS}s",
            )
            outcome = assert_all_terminal_and_correct(pipeline, [job])
            assert outcome.succeeded == 1
            assert outcome.attempts == 2
            assert_wechat_calls_accounted(pipeline, [job], outcome)
            assert "waiting for their countdown go back on the queue" in worker.output()
    finally:
        server.stop()


#: Where the test keeps the job's message until the worker's other connections are cut.
PARKED_KEY = "wxphone-test-parked"


def blocked_in_brpop(admin: redis.Redis) -> bool:
    return any("b" in client["flags"] for client in admin.client_list(_type="normal"))


def test_a_message_redis_handed_over_just_before_it_went_away_is_put_back(
    pipeline: Pipeline, tmp_path: Path
) -> None:
    """kombu takes a message in two steps: ``BRPOP``, then a record in the unacknowledged set. When
    Redis goes away between the two (a crash right after it answered), the worker holds the only
    copy; it must record and requeue it once reconnected, not lose it (the job would wait, its code
    never presented, until its code had expired). Here Redis stays up but refuses every connection
    but the ``BRPOP`` itself when it hands the message over: the record fails, as after a crash."""
    server = RedisServer(tmp_path / "redis-aof", appendonly=True)
    server.start()
    try:
        with private_broker(pipeline, server.url(0), server.url(1)), server.client() as admin:
            pipeline.settings.update(FAST_SETTINGS)
            # Submitted with no worker running; the message is parked until the trap is set.
            [job] = submit_jobs(pipeline, APP_A, 1, label="handover")
            assert admin.lmove(JOB_QUEUE_KEY, PARKED_KEY) is not None
            worker = pipeline.start_worker("handover", concurrency=1, pool="threads")
            wait_for(lambda: blocked_in_brpop(admin), timeout_seconds=30, what="the worker's BRPOP")
            # Every new connection refused, every other connection of the worker closed: the record
            # that follows the BRPOP's answer cannot reach Redis.
            admin.config_set("maxclients", 1)
            for client in admin.client_list(_type="normal"):
                if "b" not in client["flags"] and int(client["id"]) != admin.client_id():
                    admin.client_kill_filter(_id=client["id"])
            assert admin.lmove(PARKED_KEY, JOB_QUEUE_KEY) is not None  # BRPOP takes it at once
            handed_over_at = time.monotonic()
            worker.wait_for_output("consumer: Connection to broker lost", timeout_seconds=30)
            admin.config_set("maxclients", 10000)

            seconds = wait_until_terminal(
                pipeline,
                [job],
                timeout_seconds=30,
                since=handed_over_at,
                why="the worker holds the only copy of the message and must put it back",
            )
            print_recovery("message handed over as Redis went away", seconds)
            outcome = assert_all_terminal_and_correct(pipeline, [job])
            assert outcome.succeeded == 1
            assert_wechat_calls_accounted(pipeline, [job], outcome)
            assert "taken off the queue but not recorded go back on the queue" in worker.output()
    finally:
        server.stop()
