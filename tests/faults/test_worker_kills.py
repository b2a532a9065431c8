"""Workers dying mid-job: a pool child SIGKILLed (OOM killer), a whole worker SIGKILLed (host loss).

A pool child's death is seen by its worker at once: with ``task_reject_on_worker_lost`` the
message is requeued and comes back with ``redelivered=True``, and the job takes over its own
``running`` claim without waiting for it to go stale. A whole worker's death leaves its
messages unacknowledged in Redis; they come back after the visibility timeout.

kombu takes a message in two steps: ``BRPOP`` removes it from the queue in Redis, then the worker
records it as unacknowledged. A worker killed between the two loses the message: no restore can
bring it back, and the job waits, never presented, until the sweep closes it ``code_expired``
once its code has expired (about one whole-worker kill in twenty under load here).

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
import redis
from kombu.transport.redis import Channel as RedisChannel

import celeryconfig
from tests.support.faults import (
    FAST_SETTINGS,
    SubmittedJob,
    ack_error_lines,
    assert_all_terminal_and_correct,
    assert_codes_match_outcomes,
    assert_wechat_calls_accounted,
    count_in,
    jobs_without_message,
    pool_children,
    print_recovery,
    submit_jobs,
    wait_until_terminal,
)
from tests.support.pipeline import APPS, Pipeline, producer_with_policy
from tests.support.processes import ManagedProcess
from tests.support.waiting import wait_for
from worker.producer import Producer
from worker.settings import load_settings

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


#: The codes' life in the whole-worker test: the dead worker's messages are back and rerun well
#: within it, and the sweep closes a job whose message was lost soon after it.
WHOLE_WORKER_CODE_LIFETIME_SECONDS = 75


def test_a_whole_worker_killed_mid_load_is_recovered_after_the_visibility_timeout(pipeline: Pipeline) -> None:
    visibility = float(FAST_SETTINGS["visibility_timeout_seconds"])
    settings = load_settings(**FAST_SETTINGS)
    pipeline.settings.update(FAST_SETTINGS)
    # Each exchange takes a while after WeChat consumed the code, so the kill catches requests in
    # flight whose codes are spent.
    pipeline.sandbox.configure(latency_ms={"phone": 300})
    producer = producer_with_policy(pipeline, code_lifetime_seconds=WHOLE_WORKER_CODE_LIFETIME_SECONDS)
    doomed = pipeline.start_worker("doomed", concurrency=8, pool="threads")
    submitted_at = time.monotonic()
    jobs = submit_jobs(pipeline, APP_A, 40, label="host", producer=producer) + submit_jobs(
        pipeline, APP_B, 40, label="host", producer=producer
    )

    wait_for(lambda: count_in(pipeline, jobs, "succeeded") >= 16, timeout_seconds=60, what="the load")
    doomed.kill()  # SIGKILL to the whole process group: no warm shutdown, nothing requeued
    killed_at = time.monotonic()
    in_flight = count_in(pipeline, jobs, "running")
    # A message the dead worker had taken off the queue but not yet recorded as unacknowledged is
    # gone from Redis (see the module docstring); its job is the sweep's to close.
    lost = jobs_without_message(pipeline, jobs)
    # A supervisor starts a replacement at once; beat runs the sweep.
    replacement = pipeline.start_worker("replacement", concurrency=8, pool="threads")
    pipeline.start_beat()
    # Every message Redis still holds must come back once the visibility timeout has passed, and
    # not much later: a job may not hang for long after the timeout the settings promise.
    seconds = wait_until_terminal(
        pipeline,
        [job for job in jobs if job not in lost],
        timeout_seconds=visibility + 15,
        since=killed_at,
        why=f"the dead worker's messages should be back {visibility:.0f}s after the kill",
    )
    print_recovery(
        "whole worker SIGKILL",
        seconds,
        f"{in_flight} jobs were running at the kill, {len(lost)} message(s) lost between BRPOP and unacked",
    )
    if lost:
        assert count_in(pipeline, lost, "queued") == len(lost)  # never started
        wait_until_terminal(
            pipeline,
            lost,
            timeout_seconds=WHOLE_WORKER_CODE_LIFETIME_SECONDS
            + settings.stale_claim_seconds
            + 2 * settings.sweep_interval_seconds
            + 15,
            since=submitted_at,
            why="the sweep closes a job whose message is gone once its code has expired",
        )
    time.sleep(0.5)  # the last replies of the dead worker's requests

    outcome = assert_all_terminal_and_correct(pipeline, jobs, allowed_errors={"reply_lost", "code_expired"})
    expired = {job_id for job_id, row in outcome.rows.items() if row["error_code"] == "code_expired"}
    assert expired == {job.job_id for job in lost}
    assert_wechat_calls_accounted(pipeline, jobs, outcome)
    assert in_flight > 0
    assert ack_error_lines(replacement.output()) == []
    assert_codes_match_outcomes(pipeline, jobs, outcome)


def test_a_worker_killed_holding_the_restore_lock_does_not_delay_recovery(pipeline: Pipeline) -> None:
    """kombu restores visible unacknowledged messages under a lock in Redis (``unacked_mutex``),
    taken with ``SET NX PX`` for ``unacked_mutex_expire``; a worker killed in the middle of a
    restore scan leaves the lock behind until it expires, and nobody restores meanwhile."""
    visibility = float(FAST_SETTINGS["visibility_timeout_seconds"])
    pipeline.settings.update(FAST_SETTINGS)
    pipeline.sandbox.configure(latency_ms={"phone": 2000})
    doomed = pipeline.start_worker("doomed", concurrency=4, pool="threads")
    jobs = submit_jobs(pipeline, APP_A, 4, label="mutex")
    wait_for(lambda: count_in(pipeline, jobs, "running") == 4, timeout_seconds=60, what="4 exchanges")
    doomed.kill()
    killed_at = time.monotonic()
    # The lock exactly as a worker killed mid-scan leaves it: kombu's key, a token nobody else
    # holds, and the expiry that worker set (from the worker's transport options).
    options = celeryconfig.broker_transport_options
    key = options.get("unacked_mutex_key", RedisChannel.unacked_mutex_key)
    expire_seconds = float(options.get("unacked_mutex_expire", RedisChannel.unacked_mutex_expire))
    with redis.Redis.from_url(pipeline.broker_url) as broker:
        assert broker.set(key, "held-by-the-killed-worker", px=int(expire_seconds * 1000), nx=True)
    replacement = pipeline.start_worker("replacement", concurrency=4, pool="threads")

    seconds = wait_until_terminal(
        pipeline,
        jobs,
        timeout_seconds=visibility + 15,
        since=killed_at,
        why=f"a dead worker's restore lock ({expire_seconds:.0f}s) may not hold its messages back",
    )
    print_recovery(
        "whole worker SIGKILL holding the restore lock", seconds, f"lock expiry {expire_seconds:.0f}s"
    )
    time.sleep(2.5)  # the dead worker's held requests, for the counters
    outcome = assert_all_terminal_and_correct(pipeline, jobs, allowed_errors={"reply_lost"})
    assert_wechat_calls_accounted(pipeline, jobs, outcome)
    assert ack_error_lines(replacement.output()) == []
    assert_codes_match_outcomes(pipeline, jobs, outcome)


def blocked_in_brpop(broker: redis.Redis) -> bool:
    """Whether a client waits in ``BRPOP`` at Redis (a pending message would go to it)."""
    return any(
        client.get("cmd") == "brpop" and "b" in client.get("flags", "") for client in broker.client_list()
    )


def hand_a_message_to_a_stopped_worker(
    pipeline: Pipeline, worker: ManagedProcess, broker: redis.Redis, producer: Producer, *, label: str
) -> tuple[SubmittedJob, bool]:
    """Stop ``worker`` while its ``BRPOP`` waits at Redis, then submit a job: Redis takes the
    message off the queue and sends it to the stopped worker. Return the job and whether that
    happened; it does not when the ``BRPOP`` timed out just before (kombu re-sends it every
    second), and then the worker is resumed and runs the job as usual."""
    wait_for(lambda: blocked_in_brpop(broker), timeout_seconds=30, what="the worker waiting in BRPOP")
    worker.signal_group(signal.SIGSTOP)
    [job] = submit_jobs(pipeline, APP_A, 1, label=label, producer=producer)
    if broker.llen("wxphone") == 0 and broker.hlen("unacked") == 0:
        return job, True
    worker.signal_group(signal.SIGCONT)
    return job, False


def test_a_message_a_worker_took_but_had_not_recorded_when_killed_is_closed_by_the_sweep(
    pipeline: Pipeline,
) -> None:
    """What now and then happens to one message in the whole-worker kill above, made certain: the
    worker's ``BRPOP`` has taken the message off the queue, and the worker dies before recording
    it as unacknowledged."""
    code_lifetime_seconds = 3
    settings = load_settings(**FAST_SETTINGS)
    pipeline.settings.update(FAST_SETTINGS)
    producer = producer_with_policy(pipeline, code_lifetime_seconds=code_lifetime_seconds)
    doomed = pipeline.start_worker("doomed", concurrency=1, pool="threads")
    ran_as_usual: list[SubmittedJob] = []
    with redis.Redis.from_url(pipeline.broker_url) as broker:
        for attempt in range(3):
            job, taken = hand_a_message_to_a_stopped_worker(
                pipeline, doomed, broker, producer, label=f"brpop{attempt}"
            )
            if taken:
                break
            ran_as_usual.append(job)
        assert taken, "three times the worker's BRPOP timed out just before the message came"
        submitted_at = time.monotonic()
        doomed.kill()
        # In neither the queue nor the unacknowledged set: no restore can bring it back.
        assert broker.llen("wxphone") == 0 and broker.hlen("unacked") == 0
    assert jobs_without_message(pipeline, [job]) == [job]

    pipeline.start_worker("survivor", concurrency=1, pool="threads")
    pipeline.start_beat()
    seconds = wait_until_terminal(
        pipeline,
        [job, *ran_as_usual],
        timeout_seconds=code_lifetime_seconds
        + settings.stale_claim_seconds
        + 2 * settings.sweep_interval_seconds
        + 15,
        since=submitted_at,
        why="the sweep closes a job whose message is gone once its code has expired",
    )
    print_recovery(
        "message taken by BRPOP, worker killed before recording it", seconds, "closed by the sweep"
    )
    outcome = assert_all_terminal_and_correct(pipeline, [job, *ran_as_usual], allowed_errors={"code_expired"})
    row = outcome.rows[job.job_id]
    assert (row["status"], row["error_code"], row["attempts"]) == ("failed", "code_expired", 0)
    assert outcome.succeeded == len(ran_as_usual)
    assert pipeline.sandbox.stats()["code_presentations"].get("0") == 1  # its code was never presented


#: What the shipped defaults promise after a whole worker dies (issue: a dead host's jobs come back
#: while their codes live): the last job whose message Redis still holds is terminal this soon.
DEFAULTS_RECOVERY_BOUND_SECONDS = 120


@pytest.mark.parametrize("pool", ["threads", "gevent"])
def test_with_the_shipped_defaults_a_dead_workers_jobs_finish_while_their_codes_live(
    pipeline: Pipeline, pool: str
) -> None:
    """A whole worker SIGKILLed mid-load, with every delivery timing at its shipped default (no
    FAST_SETTINGS): its running and reserved messages come back after the visibility timeout, the
    dead process's claims are taken over (its lease has lapsed by then), and every job whose code
    the dead worker had not presented succeeds, within two minutes of the kill."""
    defaults = load_settings()
    for timing in ("visibility_timeout_seconds", "runner_lease_seconds", "task_time_limit_seconds"):
        assert timing not in pipeline.settings  # what a user runs
    pipeline.sandbox.configure(latency_ms={"phone": 300})
    doomed = pipeline.start_worker("doomed", concurrency=8, pool=pool)
    jobs = submit_jobs(pipeline, APP_A, 15, label="dflt") + submit_jobs(pipeline, APP_B, 15, label="dflt")
    wait_for(
        lambda: pipeline.sandbox.stats()["endpoints"].get("phone", {}).get("calls", 0) >= 6,
        timeout_seconds=60,
        what="six exchanges",
    )
    doomed.kill()
    killed_at = time.monotonic()
    with redis.Redis.from_url(pipeline.broker_url) as broker:
        held_by_the_dead = int(broker.hlen("unacked"))
    lost = jobs_without_message(pipeline, jobs)
    pipeline.start_worker("replacement", concurrency=8, pool=pool)

    seconds = wait_until_terminal(
        pipeline,
        [job for job in jobs if job not in lost],
        timeout_seconds=DEFAULTS_RECOVERY_BOUND_SECONDS,
        since=killed_at,
        why=f"with the defaults (visibility {defaults.visibility_timeout_seconds:.0f}s) a dead worker's "
        f"jobs must finish within {DEFAULTS_RECOVERY_BOUND_SECONDS}s of the kill",
    )
    print_recovery(
        f"whole worker SIGKILL, shipped defaults, {pool} pool",
        seconds,
        f"visibility {defaults.visibility_timeout_seconds:.0f}s, lease {defaults.runner_lease_seconds:.0f}s; "
        f"{held_by_the_dead} message(s) held by the dead worker, {len(lost)} lost between BRPOP and unacked",
    )
    time.sleep(0.5)  # the last replies of the dead worker's requests
    kept = [job for job in jobs if job not in lost]
    outcome = assert_all_terminal_and_correct(pipeline, kept, allowed_errors={"reply_lost"})
    # Only a code the dead worker had presented may be lost: every other job succeeded.
    assert outcome.failed("reply_lost") <= outcome.lost_replies
    assert outcome.succeeded + outcome.failed("reply_lost") == len(kept)
    assert_codes_match_outcomes(pipeline, kept, outcome)
    # A message kombu lost between BRPOP and its unacknowledged record never ran: its job waits
    # for the sweep (its code's life), its code never presented.
    assert count_in(pipeline, lost, "queued") == len(lost)
    assert held_by_the_dead > 0  # the kill caught messages the dead worker held
