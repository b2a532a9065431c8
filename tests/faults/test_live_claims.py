"""A delivery that finds its job running elsewhere never presents the code while that run lives.

A broker connection drop (a Redis failover, a proxy closing idle connections, ``CLIENT KILL``)
makes kombu put every unacknowledged message of the dropped channel back on the queue, marked
``redelivered``, including the messages whose tasks are still running. ``redelivered`` therefore
says "delivered before", not "the earlier run is dead": a run that finds its job ``running`` may
take it over only when the claiming process is gone (its liveness lease in Redis has lapsed) or
the claim is older than any run can be.

These tests run with the shipped delivery defaults.
"""

from __future__ import annotations

import time

import pytest
import redis

from tests.support.faults import (
    assert_all_terminal_and_correct,
    assert_wechat_calls_accounted,
    print_recovery,
    queued_message,
    redeliver,
    submit_jobs,
    wait_until_terminal,
)
from tests.support.pipeline import APPS, Pipeline
from tests.support.waiting import wait_for

pytestmark = pytest.mark.faults

APP_A, _ = sorted(APPS)
#: How long the sandbox holds each exchange before WeChat processes the code.
HOLD_MS = 4000
JOBS = 6


def _kill_worker_connections(broker_url: str) -> int:
    """``CLIENT KILL`` every connection but this one: what a failover or a proxy reset does."""
    with redis.Redis.from_url(broker_url, socket_timeout=5) as admin:
        return int(admin.execute_command("CLIENT", "KILL", "TYPE", "normal", "SKIPME", "yes"))


def test_a_broker_connection_drop_does_not_present_running_codes_twice(pipeline: Pipeline) -> None:
    # Free pool slots: the worker has a read pending on the queue when its connections are cut,
    # so Celery restarts its consumer and kombu puts the running tasks' messages back.
    pipeline.start_worker("held", concurrency=JOBS + 2, pool="threads")
    pipeline.sandbox.inject_fault("phone", latency_ms=HOLD_MS, times=JOBS, timing="before")
    jobs = submit_jobs(pipeline, APP_A, JOBS, label="drop")
    # Every exchange is now held at WeChat: the runs are alive and their messages unacknowledged.
    wait_for(lambda: pipeline.sandbox.pending_faults() == [], timeout_seconds=30, what="the held exchanges")
    killed = _kill_worker_connections(pipeline.broker_url)
    killed_at = time.monotonic()
    assert killed > 0
    # A second worker that would pick up whatever the drop put back on the queue.
    pipeline.start_worker("other", concurrency=JOBS, pool="threads")

    seconds = wait_until_terminal(pipeline, jobs, timeout_seconds=90, since=killed_at)
    time.sleep(HOLD_MS / 1000)  # any second presentation is then counted by the sandbox
    outcome = assert_all_terminal_and_correct(pipeline, jobs)
    assert_wechat_calls_accounted(pipeline, jobs, outcome)
    assert outcome.succeeded == JOBS
    assert pipeline.sandbox.stats()["code_presentations"] == {"1": JOBS}
    assert outcome.lost_replies == 0
    print_recovery("broker connections killed mid-exchange", seconds, "each code presented once")


def test_a_redelivered_copy_of_a_running_job_waits_for_the_live_run(pipeline: Pipeline) -> None:
    [job] = submit_jobs(pipeline, APP_A, 1, label="copy")
    message = queued_message(pipeline.broker_url)
    pipeline.sandbox.inject_fault("phone", latency_ms=HOLD_MS, timing="before")
    pipeline.start_worker("live", concurrency=4, pool="threads")
    wait_for(lambda: pipeline.sandbox.pending_faults() == [], timeout_seconds=30, what="the held exchange")
    # The first run is alive, its exchange held at WeChat; a second delivery of its message arrives.
    redeliver(pipeline.broker_url, message)
    redelivered_at = time.monotonic()

    seconds = wait_until_terminal(pipeline, [job], timeout_seconds=60, since=redelivered_at)
    time.sleep(HOLD_MS / 1000)  # a second presentation, had there been one, is counted by now
    outcome = assert_all_terminal_and_correct(pipeline, [job])
    assert_wechat_calls_accounted(pipeline, [job], outcome)
    assert pipeline.sandbox.stats()["code_presentations"] == {"1": 1}
    row = outcome.rows[job.job_id]
    assert (row["status"], row["attempts"], row["lost_replies"]) == ("succeeded", 1, 0)
    print_recovery("redelivered copy of a live run", seconds, "the copy waited; code presented once")
