"""Jobs that can never finish by themselves do not stay open for ever.

A job whose worker died mid-exchange and whose message is gone too (lost with a Redis that kept
nothing on disk, say) stays ``running`` until the beat's sweep (``wxphone.sweep_stuck_jobs``)
closes it, once its code has expired and any run that could still hold it is over:
``worker_lost`` when the code may have reached WeChat, ``code_expired`` when it never did.
"""

from __future__ import annotations

import time

import pytest
import redis

from tests.support.faults import (
    FAST_SETTINGS,
    assert_all_terminal_and_correct,
    assert_codes_match_outcomes,
    assert_wechat_calls_accounted,
    print_recovery,
    submit_jobs,
    wait_until_terminal,
)
from tests.support.pipeline import APPS, Pipeline, producer_with_policy
from tests.support.waiting import wait_for
from worker.settings import load_settings

pytestmark = pytest.mark.faults

APP_A = sorted(APPS)[0]
CODE_LIFETIME_SECONDS = 3


def test_the_sweep_closes_jobs_whose_worker_and_message_are_gone(pipeline: Pipeline) -> None:
    settings = load_settings(**FAST_SETTINGS)
    pipeline.settings.update(FAST_SETTINGS)
    producer = producer_with_policy(pipeline, code_lifetime_seconds=CODE_LIFETIME_SECONDS)
    # WeChat consumes the code at once and holds the reply: the worker dies mid-exchange.
    pipeline.sandbox.inject_fault("phone", latency_ms=8000, timing="after")
    doomed = pipeline.start_worker("doomed", concurrency=1, pool="threads")
    submitted_at = time.monotonic()
    [mid_exchange] = submit_jobs(pipeline, APP_A, 1, label="stuckx", producer=producer)
    wait_for(lambda: pipeline.sandbox.pending_faults() == [], timeout_seconds=30, what="the exchange")
    doomed.kill()
    # A second job whose message is lost before any worker took it.
    [never_taken] = submit_jobs(pipeline, APP_A, 1, label="stuckq", producer=producer)
    with redis.Redis.from_url(pipeline.broker_url) as broker:
        assert broker.hlen("unacked") == 1 and broker.llen("wxphone") == 1
        broker.delete("unacked", "unacked_index", "wxphone")

    pipeline.start_worker("survivor", concurrency=2, pool="threads")
    pipeline.start_beat()
    jobs = [mid_exchange, never_taken]
    closable_after = CODE_LIFETIME_SECONDS + settings.stale_claim_seconds
    seconds = wait_until_terminal(
        pipeline,
        jobs,
        timeout_seconds=closable_after + 2 * settings.sweep_interval_seconds + 15,
        since=submitted_at,
        why="the sweep closes a job once its code expired and the stale-claim window passed",
    )
    time.sleep(max(0.0, submitted_at + 8.5 - time.monotonic()))  # the held reply, for the counters

    outcome = assert_all_terminal_and_correct(pipeline, jobs, allowed_errors={"worker_lost", "code_expired"})
    assert outcome.rows[mid_exchange.job_id]["error_code"] == "worker_lost"
    assert outcome.rows[never_taken.job_id]["error_code"] == "code_expired"
    assert outcome.rows[never_taken.job_id]["attempts"] == 0  # closed without ever running
    stats = assert_wechat_calls_accounted(pipeline, jobs, outcome)
    assert stats["code_presentations"] == {"0": 1, "1": 1}
    assert_codes_match_outcomes(pipeline, jobs, outcome)
    print_recovery(
        "stuck jobs (worker and message gone)",
        seconds,
        f"closed by the sweep after code expiry ({CODE_LIFETIME_SECONDS}s) + stale window "
        f"({settings.stale_claim_seconds:.0f}s): worker_lost (code reached WeChat), "
        "code_expired (never sent)",
    )
