"""Delivery faults with RabbitMQ as the broker, on a private rabbitmq-server each test may kill.

RabbitMQ requeues a consumer's unacknowledged messages the moment its connection closes: a dead
worker's reserved messages are redelivered at once, not after a visibility timeout. Its running
jobs' messages come back at once too, but their claims still name the dead process: the new
delivery takes a claim over only once that process's liveness lease has lapsed
(``WXPHONE_RUNNER_LEASE_SECONDS``, 20 s by default), so the whole-worker kill recovers in about
that long, with the shipped defaults.

A closed connection also requeues the messages of tasks still running in a live worker (a
network reset, a proxy, a broker restart). Those deliveries wait for the live run instead of
presenting its code a second time: here no code reaches WeChat twice.
"""

from __future__ import annotations

import contextlib
import os
import signal
import time
from collections.abc import Iterator
from typing import Any

import pytest
from sqlalchemy import text

from tests.support.faults import (
    assert_all_terminal_and_correct,
    assert_codes_match_outcomes,
    assert_wechat_calls_accounted,
    count_in,
    pool_children,
    print_recovery,
    private_broker,
    submit_jobs,
    wait_until_terminal,
)
from tests.support.pipeline import APPS, Pipeline, plain_celery_client
from tests.support.processes import ManagedProcess
from tests.support.rabbitmq import MakeRabbitMQServer, RabbitMQServer
from tests.support.waiting import wait_for
from worker.producer import Producer, PublishError
from worker.settings import load_settings

pytestmark = pytest.mark.faults

APP_A, APP_B = sorted(APPS)
JOB_QUEUE = "wxphone"
#: What a worker's log says when its consumer restarts on a lost broker connection (Celery's line).
CONNECTION_LOST = "Connection to broker lost"
#: After a whole worker dies, with the shipped defaults: the dead process's lease lapses (20 s),
#: the redelivered message's wait for it ends (its backoff is at most 8 s), the exchange runs.
RABBITMQ_KILL_RECOVERY_BOUND_SECONDS = 45


@pytest.fixture
def rabbitmq(pipeline: Pipeline, make_rabbitmq_server: MakeRabbitMQServer) -> Iterator[RabbitMQServer]:
    """A private RabbitMQ this test may kill, as the pipeline's broker (the token store stays the
    pipeline's Redis)."""
    server = make_rabbitmq_server()
    with private_broker(pipeline, server.url(), pipeline.redis_url):
        yield server


def connection_lost_lines(worker: ManagedProcess) -> list[str]:
    return [line for line in worker.output().splitlines() if CONNECTION_LOST in line]


def assert_each_code_presented_once(pipeline: Pipeline, jobs: int) -> None:
    assert pipeline.sandbox.stats()["code_presentations"] == {"1": jobs}


@pytest.mark.parametrize("pool", ["threads", "gevent"])
def test_with_the_shipped_defaults_a_dead_workers_jobs_come_back_at_once(
    pipeline: Pipeline, rabbitmq: RabbitMQServer, pool: str
) -> None:
    """A whole worker SIGKILLed mid-load, every delivery timing at its shipped default: RabbitMQ
    requeues its reserved and running messages when its connection closes; the replacement runs
    the reserved ones at once and takes the running ones over when the dead lease lapses."""
    defaults = load_settings()
    for timing in ("visibility_timeout_seconds", "runner_lease_seconds", "task_time_limit_seconds"):
        assert timing not in pipeline.settings  # what a user runs
    pipeline.sandbox.configure(latency_ms={"phone": 300})
    doomed = pipeline.start_worker("doomed", concurrency=8, pool=pool)
    jobs = submit_jobs(pipeline, APP_A, 15, label="rdflt") + submit_jobs(pipeline, APP_B, 15, label="rdflt")
    wait_for(
        lambda: pipeline.sandbox.stats()["endpoints"].get("phone", {}).get("calls", 0) >= 6,
        timeout_seconds=60,
        what="six exchanges",
    )
    held_by_the_dead = rabbitmq.unacknowledged(JOB_QUEUE)
    doomed.kill()
    killed_at = time.monotonic()
    pipeline.start_worker("replacement", concurrency=8, pool=pool)

    seconds = wait_until_terminal(
        pipeline,
        jobs,
        timeout_seconds=RABBITMQ_KILL_RECOVERY_BOUND_SECONDS,
        since=killed_at,
        why=f"RabbitMQ redelivers at once; the dead lease ({defaults.runner_lease_seconds:.0f}s) "
        "is the only wait",
    )
    print_recovery(
        f"whole worker SIGKILL, shipped defaults, RabbitMQ, {pool} pool",
        seconds,
        f"lease {defaults.runner_lease_seconds:.0f}s; {held_by_the_dead} message(s) held by the dead "
        "worker, none lost",
    )
    wait_for(lambda: rabbitmq.unacknowledged(JOB_QUEUE) == 0, timeout_seconds=10, what="every ack")
    outcome = assert_all_terminal_and_correct(pipeline, jobs, allowed_errors={"reply_lost"})
    # Only a code the dead worker had presented may be lost: every other job succeeded.
    assert outcome.failed("reply_lost") <= outcome.lost_replies
    assert outcome.succeeded + outcome.failed("reply_lost") == len(jobs)
    assert_codes_match_outcomes(pipeline, jobs, outcome)
    assert held_by_the_dead > 0  # the kill caught messages the dead worker held


def test_a_pool_child_killed_mid_exchange_is_rerun_at_once(
    pipeline: Pipeline, rabbitmq: RabbitMQServer
) -> None:
    """A prefork child SIGKILLed while WeChat holds its request (before processing it): the worker
    rejects the message with requeue, RabbitMQ redelivers it at once, and the rerun exchanges
    the code."""
    worker = pipeline.start_worker("prefork", concurrency=1, pool="prefork")
    pipeline.sandbox.inject_fault("phone", latency_ms=12000, timing="before")
    [job] = submit_jobs(pipeline, APP_A, 1, label="rchild")
    wait_for(lambda: pipeline.sandbox.pending_faults() == [], timeout_seconds=30, what="the request")
    [child] = pool_children(worker.pid)
    os.kill(child, signal.SIGKILL)
    killed_at = time.monotonic()
    seconds = wait_until_terminal(pipeline, [job], timeout_seconds=30, since=killed_at)
    print_recovery("pool child SIGKILL, RabbitMQ", seconds, "requeued by the worker, redelivered at once")
    wait_for(
        lambda: pipeline.sandbox.stats()["endpoints"]["phone"]["calls"] >= 2,
        timeout_seconds=20,
        what="the dead request to finish at the sandbox",
    )
    outcome = assert_all_terminal_and_correct(pipeline, [job])
    assert_wechat_calls_accounted(pipeline, [job], outcome)
    assert (outcome.succeeded, outcome.lost_replies) == (1, 1)
    assert worker.is_running()


@pytest.mark.parametrize("pool", ["threads", "prefork"])
def test_connections_closed_mid_load_lose_nothing_and_present_no_code_twice(
    pipeline: Pipeline, rabbitmq: RabbitMQServer, pool: str
) -> None:
    """``close_all_connections`` (a network reset, a proxy, a failover) while exchanges are held
    at WeChat: RabbitMQ requeues the running tasks' messages; the worker reconnects, says so,
    and the redelivered messages wait for their live runs instead of presenting the codes."""
    pipeline.sandbox.configure(latency_ms={"phone": 2500})
    worker = pipeline.start_worker(f"close-{pool}", concurrency=2, pool=pool)
    jobs = submit_jobs(pipeline, APP_A, 10, label=f"rcut{pool[0]}")
    wait_for(lambda: count_in(pipeline, jobs, "running") >= 2, timeout_seconds=60, what="both slots busy")

    rabbitmq.close_all_connections()
    cut_at = time.monotonic()
    seconds = wait_until_terminal(pipeline, jobs, timeout_seconds=60, since=cut_at, why="reconnect and go on")
    print_recovery(f"broker connections closed mid-load, RabbitMQ ({pool})", seconds, "10 jobs of 2.5 s")
    assert worker.is_running()
    assert connection_lost_lines(worker), worker.output()[-3000:]
    outcome = assert_all_terminal_and_correct(pipeline, jobs)
    assert outcome.succeeded == len(jobs)
    assert_each_code_presented_once(pipeline, len(jobs))
    later = submit_jobs(pipeline, APP_A, 4, label=f"rcutl{pool[0]}")
    wait_until_terminal(pipeline, later, timeout_seconds=30, why="new jobs after the cut")
    wait_for(lambda: rabbitmq.unacknowledged(JOB_QUEUE) == 0, timeout_seconds=10, what="every ack")


def test_a_retry_waiting_for_its_countdown_when_connections_close_runs_after_it(
    pipeline: Pipeline, rabbitmq: RabbitMQServer
) -> None:
    """A retry's message waits, unacknowledged, in the worker until its countdown ends; a closed
    connection requeues it and the worker receives it again, countdown and all."""
    pipeline.settings.update(retry_backoff_base_seconds=4, retry_backoff_max_seconds=4)
    worker = pipeline.start_worker("countdown", concurrency=2, pool="threads")
    pipeline.sandbox.inject_fault("phone", errcode=-1)  # busy once: the job retries in 4 s
    [job] = submit_jobs(pipeline, APP_A, 1, label="rcount")
    wait_for(lambda: count_in(pipeline, [job], "retrying") == 1, timeout_seconds=30, what="the retry")
    rabbitmq.close_all_connections()
    cut_at = time.monotonic()
    seconds = wait_until_terminal(pipeline, [job], timeout_seconds=30, since=cut_at)
    print_recovery("retry countdown across a closed connection, RabbitMQ", seconds)
    assert connection_lost_lines(worker), worker.output()[-3000:]
    outcome = assert_all_terminal_and_correct(pipeline, [job])
    assert outcome.succeeded == 1
    assert pipeline.sandbox.stats()["endpoints"]["phone"]["calls"] == 2  # the busy reply, the exchange


@contextlib.contextmanager
def confirming_producer(pipeline: Pipeline, **options: Any) -> Iterator[Producer]:
    """A front end's producer with publisher confirms on: a submission returns once RabbitMQ has
    the message on disk (the one setting a front end on RabbitMQ needs to survive a broker crash)."""
    client = plain_celery_client(pipeline.broker_url, pipeline.redis_url)
    client.conf.broker_transport_options = {"confirm_publish": True}
    try:
        yield Producer(
            sessions=pipeline.sessions, celery_app=client, protection=pipeline.producer.protection, **options
        )
    finally:
        client.close()


def refuse_publishes(rabbitmq: RabbitMQServer) -> None:
    """Make RabbitMQ nack every publish to the job queue (a length limit with reject-publish, as
    an operator sets to protect the broker); requeues and deliveries go on."""
    rabbitmq.rabbitmqctl(
        "set_policy", "--apply-to", "queues", "limit", f"^{JOB_QUEUE}$",
        '{"max-length-bytes": 1, "overflow": "reject-publish"}',
    )  # fmt: skip


@pytest.mark.parametrize("how", ["restart", "kill"])
def test_workers_resume_by_themselves_after_rabbitmq_restarts_mid_load(
    pipeline: Pipeline, rabbitmq: RabbitMQServer, how: str
) -> None:
    """RabbitMQ stopped (or SIGKILLed) and started again while jobs wait and run: durable queues
    and persistent, confirmed messages survive; the worker reconnects on its own; every job
    ends, none presented twice."""
    pipeline.sandbox.configure(latency_ms={"phone": 1000})
    worker = pipeline.start_worker(f"restart-{how}", concurrency=2, pool="threads")
    with confirming_producer(pipeline) as producer:
        jobs = submit_jobs(pipeline, APP_A, 12, label=f"r{how}", producer=producer)
    wait_for(lambda: count_in(pipeline, jobs, "running") >= 2, timeout_seconds=60, what="both slots busy")

    down_at = time.monotonic()
    rabbitmq.restart(kill=how == "kill")
    back_after = time.monotonic() - down_at
    seconds = wait_until_terminal(
        pipeline, jobs, timeout_seconds=90, since=down_at, why="reconnect and go on"
    )
    print_recovery(f"RabbitMQ {how} mid-load", seconds, f"broker back after {back_after:.1f}s")
    assert worker.is_running()
    assert connection_lost_lines(worker), worker.output()[-3000:]
    outcome = assert_all_terminal_and_correct(pipeline, jobs)
    assert outcome.succeeded == len(jobs)
    assert_each_code_presented_once(pipeline, len(jobs))


#: A host that vanishes without closing its sockets: RabbitMQ notices after about three missed
#: 20 s heartbeats (measured: 60 s), requeues, and the replacement takes the jobs over (the frozen
#: process's lease lapsed long before).
FROZEN_HOST_RECOVERY_BOUND_SECONDS = 100


def test_a_frozen_worker_host_is_found_by_heartbeats_and_its_late_runs_change_nothing(
    pipeline: Pipeline, rabbitmq: RabbitMQServer
) -> None:
    """SIGSTOP a whole worker mid-load (a host that hangs or drops off the network: no FIN, no
    heartbeats), start a replacement: RabbitMQ closes the silent connection after its heartbeat
    timeout and redelivers; every job ends inside the code's life. Then SIGCONT the frozen worker:
    its runs wake up after their lease lapsed and present no code a second time (a run frozen
    mid-request counts its lost reply)."""
    pipeline.sandbox.configure(latency_ms={"phone": 300})
    frozen = pipeline.start_worker("frozen", concurrency=4, pool="threads")
    jobs = submit_jobs(pipeline, APP_A, 12, label="rfroz")
    wait_for(
        lambda: pipeline.sandbox.stats()["endpoints"].get("phone", {}).get("calls", 0) >= 3,
        timeout_seconds=60,
        what="three exchanges",
    )
    frozen.signal_group(signal.SIGSTOP)
    frozen_at = time.monotonic()
    try:
        pipeline.start_worker("replacement", concurrency=4, pool="threads")
        seconds = wait_until_terminal(
            pipeline,
            jobs,
            timeout_seconds=FROZEN_HOST_RECOVERY_BOUND_SECONDS,
            since=frozen_at,
            why="RabbitMQ must notice the silent connection by its heartbeats and redeliver",
        )
    finally:
        frozen.signal_group(signal.SIGCONT)
    print_recovery("worker host frozen (SIGSTOP), RabbitMQ", seconds, "heartbeat 20 s, lease 20 s")
    # A warm shutdown waits for the woken worker's runs (and their requests) to end.
    frozen.stop(timeout_seconds=60)
    outcome = assert_all_terminal_and_correct(pipeline, jobs, allowed_errors={"reply_lost"})
    assert_wechat_calls_accounted(pipeline, jobs, outcome)
    assert outcome.failed("reply_lost") <= outcome.lost_replies
    assert outcome.succeeded + outcome.failed("reply_lost") == len(jobs)
    assert_codes_match_outcomes(pipeline, jobs, outcome)


def test_a_submission_fails_within_its_timeout_while_rabbitmq_blocks_publishers(
    pipeline: Pipeline, rabbitmq: RabbitMQServer
) -> None:
    """RabbitMQ blocks every publishing connection during a memory or disk alarm and confirms
    nothing: a submission must not hang the front end's request. It fails after the publish
    timeout (``PublishError``, the job ``enqueue_failed``), and once the alarm clears the copies
    RabbitMQ took meanwhile find the job finished and change nothing."""
    with confirming_producer(pipeline, publish_timeout_seconds=2) as producer:
        warm = submit_jobs(pipeline, APP_A, 1, label="ralarmw", producer=producer)  # declares the queue
        rabbitmq.rabbitmqctl("set_vm_memory_high_watermark", "absolute", "1")
        wait_for(
            lambda: "memory" in rabbitmq.rabbitmqctl("eval", "rabbit_alarm:get_alarms()."),
            timeout_seconds=20,
            what="the memory alarm",
        )
        started = time.monotonic()
        try:
            with pytest.raises(PublishError):
                submit_jobs(pipeline, APP_A, 1, label="ralarm", producer=producer)
            failed_after = time.monotonic() - started
        finally:
            rabbitmq.rabbitmqctl("set_vm_memory_high_watermark", "0.4")
    # The producer stops waiting after twice the publish timeout (2 s).
    assert failed_after < 2 * 2 + 3, failed_after
    with pipeline.engine.connect() as conn:
        [blocked_job_id] = conn.execute(
            text("SELECT job_id FROM phone_jobs WHERE openid LIKE 'oralarm%' AND openid NOT LIKE 'oralarmw%'")
        ).scalars()
    blocked = pipeline.producer.get_job(blocked_job_id)
    assert blocked is not None and (blocked.status, blocked.error_code) == ("failed", "enqueue_failed")

    pipeline.start_worker("after-alarm", concurrency=2, pool="threads")
    wait_until_terminal(pipeline, warm, timeout_seconds=30)
    wait_for(
        lambda: rabbitmq.queue_depth(JOB_QUEUE) == 0 and rabbitmq.unacknowledged(JOB_QUEUE) == 0,
        timeout_seconds=30,
        what="every copy taken",
    )
    after = pipeline.producer.get_job(blocked_job_id)
    assert after is not None and (after.status, after.error_code) == ("failed", "enqueue_failed")
    assert pipeline.sandbox.stats()["endpoints"]["phone"]["calls"] == 1  # the warm-up job's only


def test_a_retry_rabbitmq_refuses_waits_out_its_countdown_instead_of_looping(
    pipeline: Pipeline, rabbitmq: RabbitMQServer
) -> None:
    """A retry's publish that RabbitMQ nacks (a length limit with ``overflow: reject-publish``)
    requeues the message, and RabbitMQ redelivers a requeued message at once: the run waits out
    its countdown first, so a job that keeps retrying does not burn its attempts back to back."""
    pipeline.settings.update(retry_backoff_base_seconds=6, retry_backoff_max_seconds=6)
    pipeline.sandbox.inject_fault("phone", errcode=-1, latency_ms=4000)  # held while the policy is set
    worker = pipeline.start_worker("nacked", concurrency=1, pool="threads")
    [job] = submit_jobs(pipeline, APP_A, 1, label="rnack")
    wait_for(lambda: pipeline.sandbox.pending_faults() == [], timeout_seconds=30, what="the held request")
    refuse_publishes(rabbitmq)
    pipeline.sandbox.inject_fault("phone", errcode=-1, times=1000)  # WeChat stays busy
    policy_at = time.monotonic()

    def deliveries() -> int:
        return worker.output().count(f"resolve_phone[{job.job_id}] received")

    wait_for(lambda: deliveries() >= 4, timeout_seconds=90, what="three redeliveries")
    elapsed = time.monotonic() - policy_at
    # Three requeues, each after a countdown of 3-6 s (6 s with jitter); back to back they took
    # about a second each.
    assert elapsed >= 3 * 3, f"{deliveries()} deliveries in {elapsed:.1f}s: a requeue loop"
    assert "the retry could not be published" in worker.output()
    rabbitmq.rabbitmqctl("clear_policy", "limit")


def test_a_submission_no_queue_takes_fails_instead_of_vanishing(
    pipeline: Pipeline, rabbitmq: RabbitMQServer
) -> None:
    """The job queue deleted after a front end declared it (an operator recreating it): kombu does
    not declare it again on that connection, so RabbitMQ has nowhere to route the message. It
    must not confirm a message it dropped: the submission fails (``enqueue_failed``) instead of
    returning a job id whose message exists nowhere."""
    with confirming_producer(pipeline) as producer:
        first = submit_jobs(pipeline, APP_A, 1, label="rqdel", producer=producer)  # declares the queue
        rabbitmq.rabbitmqctl("delete_queue", JOB_QUEUE)
        with pytest.raises(PublishError):
            submit_jobs(pipeline, APP_A, 1, label="rqdelx", producer=producer)
        # The next submission declares the queue again on a fresh connection and runs.
        later = submit_jobs(pipeline, APP_A, 1, label="rqdell", producer=producer)
    pipeline.start_worker("after-delete", concurrency=2, pool="threads")
    wait_until_terminal(pipeline, later, timeout_seconds=30, why="a submission after the queue came back")
    assert assert_all_terminal_and_correct(pipeline, later).succeeded == 1
    assert count_in(pipeline, first, "queued") == 1  # its message went with the deleted queue


def test_a_retry_refused_late_in_a_run_is_requeued_before_the_soft_time_limit(
    pipeline: Pipeline, rabbitmq: RabbitMQServer
) -> None:
    """A retry RabbitMQ refuses when the run has used most of its soft time limit: the wait before
    the requeue is cut to what the limit leaves, so the limit cannot strike there (Celery would
    acknowledge the message as failed, and the job would have no message anywhere)."""
    pipeline.settings.update(
        http_connect_timeout_seconds=0.5,
        http_read_timeout_seconds=4,
        token_wait_seconds=0.4,
        task_soft_time_limit_seconds=5,
        task_time_limit_seconds=30,
        retry_backoff_base_seconds=6,
        retry_backoff_max_seconds=6,
    )
    # WeChat answers busy after 3.9 s: the retry is published about 4 s into a 5 s soft limit.
    pipeline.sandbox.inject_fault("phone", errcode=-1, latency_ms=3900)
    worker = pipeline.start_worker("late-retry", concurrency=1, pool="prefork")
    [job] = submit_jobs(pipeline, APP_A, 1, label="rsoft")
    wait_for(lambda: pipeline.sandbox.pending_faults() == [], timeout_seconds=30, what="the held request")
    refuse_publishes(rabbitmq)

    def deliveries() -> int:
        return worker.output().count(f"resolve_phone[{job.job_id}] received")

    wait_for(lambda: deliveries() >= 2, timeout_seconds=30, what="the requeued message delivered again")
    rabbitmq.rabbitmqctl("clear_policy", "limit")
    assert "the retry could not be published" in worker.output()
    assert "SoftTimeLimitExceeded" not in worker.output()
    wait_until_terminal(pipeline, [job], timeout_seconds=60)
    assert assert_all_terminal_and_correct(pipeline, [job]).succeeded == 1
