"""Workers dying mid-job: a pool child SIGKILLed (OOM killer), a whole worker SIGKILLed (host loss).

A pool child's death is seen by its worker at once: with ``task_reject_on_worker_lost`` the
message is requeued and comes back with ``redelivered=True``, and the job takes over its own
``running`` claim without waiting for it to go stale. A whole worker's death leaves its
messages unacknowledged in Redis; they come back after the visibility timeout.

A run killed while its request was at WeChat is the one case in which a code may be presented
twice. The job counts it (``lost_replies``) and the rerun presents the code again:

* if WeChat had not processed the first request yet, the rerun exchanges the code and the job
  succeeds (the dead request, processed later, is refused);
* if WeChat had consumed the code, the rerun is refused and the job ends ``failed``/
  ``reply_lost``: the number is gone, and the job says so.
"""

from __future__ import annotations

import os
import signal
import time

import pytest

from tests.support.faults import (
    FAST_SETTINGS,
    SubmittedJob,
    ack_error_lines,
    assert_all_terminal_and_correct,
    assert_codes_match_outcomes,
    assert_wechat_calls_accounted,
    count_in,
    pool_children,
    print_recovery,
    submit_jobs,
    wait_until_terminal,
)
from tests.support.pipeline import APPS, Pipeline
from tests.support.waiting import wait_for

pytestmark = pytest.mark.faults

APP_A, APP_B = sorted(APPS)
#: How long the sandbox holds the doomed request (before or after processing it): longer than the
#: prefork pool may take to notice the dead child (up to about 5 s) and rerun the job.
HANG_MS = 12000


def test_a_pool_child_killed_mid_exchange_is_rerun_at_once_and_accounted(pipeline: Pipeline) -> None:
    pipeline.settings.update(FAST_SETTINGS)
    worker = pipeline.start_worker("prefork", concurrency=1, pool="prefork")
    results: dict[str, SubmittedJob] = {}
    recovery: dict[str, float] = {}
    for timing in ("before", "after"):
        pipeline.sandbox.inject_fault("phone", latency_ms=HANG_MS, timing=timing)
        [job] = submit_jobs(pipeline, APP_A, 1, label=f"child{timing}")
        # The fault is taken when the request reaches the sandbox: the child is now mid-exchange.
        wait_for(lambda: pipeline.sandbox.pending_faults() == [], timeout_seconds=30, what="the request")
        [child] = pool_children(worker.pid)
        os.kill(child, signal.SIGKILL)
        killed_at = time.monotonic()
        recovery[timing] = wait_until_terminal(pipeline, [job], timeout_seconds=30, since=killed_at)
        results[timing] = job
        assert worker.is_running()
    # Let the dead requests finish at the sandbox, so every presentation is counted.
    wait_for(
        lambda: pipeline.sandbox.stats()["endpoints"]["phone"]["calls"] >= 4,
        timeout_seconds=HANG_MS / 1000 + 5,
        what="the dead requests to finish at the sandbox",
    )

    jobs = list(results.values())
    outcome = assert_all_terminal_and_correct(pipeline, jobs, allowed_errors={"reply_lost"})
    assert_wechat_calls_accounted(pipeline, jobs, outcome)
    before, after = (outcome.rows[results[timing].job_id] for timing in ("before", "after"))
    # Killed before WeChat processed the code: the rerun exchanged it.
    assert (before["status"], before["attempts"], before["lost_replies"]) == ("succeeded", 2, 1)
    # Killed after WeChat consumed the code: the rerun was refused, and the job tells the truth.
    assert (after["status"], after["error_code"], after["attempts"], after["lost_replies"]) == (
        "failed",
        "reply_lost",
        2,
        1,
    )
    assert pipeline.sandbox.stats()["code_presentations"] == {"2": 2}
    log = worker.output()
    assert log.count("WorkerLostError") >= 2 or log.count("signal 9") >= 2, log[-3000:]
    assert_codes_match_outcomes(pipeline, jobs, outcome)
    print_recovery(
        "pool child SIGKILL",
        max(recovery.values()),
        f"rerun at once (redelivered takeover): killed before processing -> succeeded in "
        f"{recovery['before']:.1f}s; after -> reply_lost in {recovery['after']:.1f}s; "
        "each code presented twice, one lost reply counted per job",
    )


def test_a_whole_worker_killed_mid_load_is_recovered_after_the_visibility_timeout(pipeline: Pipeline) -> None:
    visibility = float(FAST_SETTINGS["visibility_timeout_seconds"])
    pipeline.settings.update(FAST_SETTINGS)
    # Each exchange takes a while after WeChat consumed the code, so the kill catches requests in
    # flight whose codes are spent.
    pipeline.sandbox.configure(latency_ms={"phone": 300})
    doomed = pipeline.start_worker("doomed", concurrency=8, pool="threads")
    jobs = submit_jobs(pipeline, APP_A, 40, label="host") + submit_jobs(pipeline, APP_B, 40, label="host")

    wait_for(lambda: count_in(pipeline, jobs, "succeeded") >= 16, timeout_seconds=60, what="the load")
    doomed.kill()  # SIGKILL to the whole process group: no warm shutdown, nothing requeued
    killed_at = time.monotonic()
    in_flight = count_in(pipeline, jobs, "running")
    # A supervisor starts a replacement at once.
    replacement = pipeline.start_worker("replacement", concurrency=8, pool="threads")
    # The dead worker's messages must come back once the visibility timeout has passed, and not
    # much later: a job may not hang for long after the timeout the settings promise.
    seconds = wait_until_terminal(
        pipeline,
        jobs,
        timeout_seconds=visibility + 15,
        since=killed_at,
        why=f"the dead worker's messages should be back {visibility:.0f}s after the kill",
    )
    print_recovery("whole worker SIGKILL", seconds, f"{in_flight} jobs were running at the kill")
    time.sleep(0.5)  # the last replies of the dead worker's requests

    outcome = assert_all_terminal_and_correct(pipeline, jobs, allowed_errors={"reply_lost"})
    assert_wechat_calls_accounted(pipeline, jobs, outcome)
    assert in_flight > 0
    assert ack_error_lines(replacement.output()) == []
    assert_codes_match_outcomes(pipeline, jobs, outcome)
