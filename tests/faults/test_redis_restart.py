"""Redis (broker and token store) crashes mid-load and comes back on the same port and data.

Redis runs with ``appendonly yes``, as ``wxphone doctor`` requires: queued and unacknowledged
messages survive the crash. Workers are not restarted: they must reconnect and consume again by
themselves (Celery/kombu once reconnected and then sat idle; kombu >= 5.4 fixed it, and this
test keeps it fixed). Jobs caught mid-flight either finish (their late ack then fails, and the
message comes back after the visibility timeout to find its job terminal) or are redelivered.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from tests.support.faults import (
    FAST_SETTINGS,
    assert_all_terminal_and_correct,
    assert_codes_match_outcomes,
    assert_wechat_calls_accounted,
    count_in,
    print_recovery,
    private_broker,
    submit_jobs,
    wait_until_terminal,
)
from tests.support.pipeline import APPS, Pipeline
from tests.support.processes import ManagedProcess
from tests.support.services import RedisServer
from tests.support.waiting import wait_for

pytestmark = pytest.mark.faults

APP_A, APP_B = sorted(APPS)
DOWN_SECONDS = 3
BUSY_REPLIES = 16


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
            jobs = submit_jobs(pipeline, APP_A, 60, label="rds") + submit_jobs(
                pipeline, APP_B, 60, label="rds"
            )
            wait_for(
                lambda: count_in(pipeline, jobs, "succeeded") >= 20,
                timeout_seconds=60,
                what="the load to be under way",
            )
            # WeChat is busy for a moment: every thread's job schedules a retry, then Redis dies.
            pipeline.sandbox.inject_fault("phone", errcode=-1, times=BUSY_REPLIES)
            wait_for(lambda: pipeline.sandbox.pending_faults() == [], timeout_seconds=30, what="busy replies")
            server.kill()
            killed_at = time.monotonic()
            done_at_kill = count_in(pipeline, jobs)
            time.sleep(DOWN_SECONDS)
            server.start()  # same port, same directory: the append-only file is replayed

            try:
                seconds = wait_until_terminal(
                    pipeline,
                    jobs,
                    timeout_seconds=visibility + 20,
                    since=killed_at,
                    why="every message survives in the AOF; unacknowledged ones are back after the timeout",
                )
            except AssertionError as error:
                raise AssertionError(f"{error}\n{diagnosis(workers)}") from None
            print_recovery(
                "Redis crash mid-load",
                seconds,
                f"down {DOWN_SECONDS}s, {done_at_kill} of {len(jobs)} jobs done at the crash, "
                "workers not restarted",
            )
            assert all(worker.is_running() for worker in workers)
            time.sleep(0.5)
            outcome = assert_all_terminal_and_correct(pipeline, jobs, allowed_errors={"reply_lost"})
            assert_wechat_calls_accounted(pipeline, jobs, outcome)
            assert_codes_match_outcomes(pipeline, jobs, outcome)

            # The workers consume new work too (not "connected but idle").
            after = submit_jobs(pipeline, APP_A, 10, label="rdsafter")
            wait_until_terminal(pipeline, after, timeout_seconds=30)
            later = assert_all_terminal_and_correct(pipeline, after)
            assert later.succeeded == len(after)
    finally:
        server.stop()
