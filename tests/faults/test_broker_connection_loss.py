"""The broker's connections are cut while Redis stays up: a failover, a proxy or a network reset.

``CLIENT KILL`` closes client connections of a private Redis (broker and token store) from the
server side. Workers are not restarted: each must notice within seconds that a connection it
consumes on is dead, say so in its log (a WARNING line with "Connection to broker lost"),
reconnect and consume again, so that every job submitted before the cut ends and every job
submitted after it is consumed.

Jobs running at the cut finish. When the consumer restarts, kombu puts the unacknowledged
messages of its closed channel back on the queue marked ``redelivered``, so a code may be
presented a second time here (counted as a lost reply, the job may end ``reply_lost``). This
module asserts what a connection loss must never do: leave a worker idle, silent, or a job open.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest

from tests.support.faults import (
    SubmittedJob,
    assert_all_terminal_and_correct,
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

APP_A = sorted(APPS)[0]
#: How long the sandbox holds each exchange: cuts land while exchanges are in flight.
EXCHANGE_MS = 2500
CONCURRENCY = 2
#: Jobs submitted after the cut, which the reconnected worker must consume.
LATER_JOBS = 4
#: What the worker's log must say (Celery's line when its consumer restarts, wxphone's when kombu
#: re-opens the consuming connection in place).
CONNECTION_LOST = "Connection to broker lost"
#: Every client connection: commands and BRPOP (normal), remote control (pubsub).
ALL_CONNECTIONS = ("normal", "pubsub")


@pytest.fixture
def cut_redis(pipeline: Pipeline, tmp_path: Path) -> Iterator[RedisServer]:
    """A private Redis (AOF on, as production requires) as the pipeline's broker and token store."""
    server = RedisServer(tmp_path / "redis-cut", appendonly=True)
    server.start()
    try:
        with private_broker(pipeline, server.url(0), server.url(1)):
            pipeline.sandbox.configure(latency_ms={"phone": EXCHANGE_MS})
            yield server
    finally:
        server.stop()


def cut_connections(server: RedisServer, kinds: Sequence[str] = ALL_CONNECTIONS) -> int:
    """Close every client connection of ``server`` of the given types (except the one asking),
    as a failover or a network reset does; return how many were closed."""
    with server.client() as admin:
        return sum(
            int(admin.execute_command("CLIENT", "KILL", "TYPE", kind, "SKIPME", "yes")) for kind in kinds
        )


def waiting_in_brpop(server: RedisServer) -> bool:
    with server.client() as admin:
        clients = admin.client_list()
    return any(client.get("cmd") == "brpop" for client in clients)


def submit_and_wait_until_busy(pipeline: Pipeline, count: int, label: str) -> list[SubmittedJob]:
    """Submit ``count`` jobs and wait until every pool slot holds one mid-exchange."""
    jobs = submit_jobs(pipeline, APP_A, count, label=label)
    wait_for(
        lambda: count_in(pipeline, jobs, "running") >= CONCURRENCY,
        timeout_seconds=60,
        what="every pool slot busy with an exchange",
    )
    return jobs


def recovery_bound_seconds(jobs: int) -> float:
    """From the cut to the last job terminal: the jobs' exchanges at the worker's concurrency, one
    more round for the messages requeued at the cut, and 15 s to notice the loss on a busy machine.
    Far below the visibility timeout (600 s by default), after which lost messages would come back
    anyway."""
    rounds = -(-jobs // CONCURRENCY) + 1
    return rounds * EXCHANGE_MS / 1000 + 15


def connection_lost_lines(worker: ManagedProcess) -> list[str]:
    return [line for line in worker.output().splitlines() if CONNECTION_LOST in line and "WARNING" in line]


def wait_until_all_terminal(pipeline: Pipeline, jobs: Sequence[SubmittedJob], since: float) -> float:
    return wait_until_terminal(
        pipeline,
        jobs,
        timeout_seconds=recovery_bound_seconds(len(jobs)),
        since=since,
        why="the worker must reconnect and consume the rest of the queue",
    )


def assert_consumes_new_jobs(pipeline: Pipeline, label: str) -> None:
    later = submit_jobs(pipeline, APP_A, LATER_JOBS, label=label)
    wait_until_terminal(pipeline, later, timeout_seconds=recovery_bound_seconds(LATER_JOBS), why="new jobs")
    outcome = assert_all_terminal_and_correct(pipeline, later)
    assert outcome.succeeded == len(later)


def assert_recovered(
    pipeline: Pipeline, worker: ManagedProcess, jobs: Sequence[SubmittedJob], label: str
) -> None:
    """The worker runs, said it lost the broker connection, ended every job correctly (a job in
    flight at a cut may end ``reply_lost``, see the module docstring) and consumes new jobs."""
    assert worker.is_running()
    assert connection_lost_lines(worker), "no WARNING about the lost connection:\n" + worker.output()[-3000:]
    assert_all_terminal_and_correct(pipeline, jobs, allowed_errors={"reply_lost"})
    assert_consumes_new_jobs(pipeline, label)


@pytest.mark.parametrize("pool", ["threads", "prefork"])
def test_a_worker_resumes_consuming_after_its_broker_connections_are_cut_mid_load(
    pipeline: Pipeline, cut_redis: RedisServer, pool: str
) -> None:
    worker = pipeline.start_worker(f"cut-{pool}", concurrency=CONCURRENCY, pool=pool)
    jobs = submit_and_wait_until_busy(pipeline, 12, label=f"cut{pool[0]}")

    killed = cut_connections(cut_redis)
    cut_at = time.monotonic()
    seconds = wait_until_all_terminal(pipeline, jobs, since=cut_at)
    print_recovery(
        f"broker connections cut mid-load ({pool})",
        seconds,
        f"{killed} connections closed; 12 jobs of {EXCHANGE_MS} ms at concurrency {CONCURRENCY}",
    )
    assert_recovered(pipeline, worker, jobs, label=f"cutl{pool[0]}")


def test_a_worker_resumes_after_only_its_consuming_connection_is_cut_while_every_slot_is_busy(
    pipeline: Pipeline, cut_redis: RedisServer
) -> None:
    # Commands and BRPOP only (what a proxy closing idle connections does): with every slot busy
    # no BRPOP is pending, and kombu re-opens the connection in place once a slot frees.
    worker = pipeline.start_worker("cut-normal", concurrency=CONCURRENCY, pool="threads")
    jobs = submit_and_wait_until_busy(pipeline, 8, label="cutn")

    killed = cut_connections(cut_redis, ["normal"])
    cut_at = time.monotonic()
    seconds = wait_until_all_terminal(pipeline, jobs, since=cut_at)
    print_recovery("consuming connection cut, every slot busy", seconds, f"{killed} connections closed")
    assert_recovered(pipeline, worker, jobs, label="cutnl")


def test_a_worker_resumes_after_its_broker_connections_are_cut_twice_in_a_row(
    pipeline: Pipeline, cut_redis: RedisServer
) -> None:
    worker = pipeline.start_worker("cut-twice", concurrency=CONCURRENCY, pool="threads")
    jobs = submit_and_wait_until_busy(pipeline, 8, label="cut2")

    queued_at_cut = count_in(pipeline, jobs, "queued")
    cut_connections(cut_redis)
    cut_at = time.monotonic()
    # The second cut hits the connections the worker opened after the first: it comes once the
    # worker has said it lost them and has taken another message from the queue.
    wait_for(lambda: connection_lost_lines(worker), timeout_seconds=15, what="the first loss noticed")
    wait_for(
        lambda: count_in(pipeline, jobs, "queued") < queued_at_cut,
        timeout_seconds=recovery_bound_seconds(2),
        what="a message consumed after the first cut",
    )
    cut_connections(cut_redis)
    seconds = wait_until_all_terminal(pipeline, jobs, since=cut_at)
    print_recovery("broker connections cut twice in a row", seconds)
    assert_recovered(pipeline, worker, jobs, label="cut2l")


def test_an_idle_worker_consumes_jobs_submitted_after_its_broker_connections_are_cut(
    pipeline: Pipeline, cut_redis: RedisServer
) -> None:
    worker = pipeline.start_worker("cut-idle", concurrency=CONCURRENCY, pool="threads")
    # Idle: the worker waits in BRPOP on an empty queue when its connections are cut.
    wait_for(lambda: waiting_in_brpop(cut_redis), timeout_seconds=15, what="the worker waiting in BRPOP")
    killed = cut_connections(cut_redis)
    cut_at = time.monotonic()
    jobs = submit_jobs(pipeline, APP_A, LATER_JOBS, label="cuti")
    seconds = wait_until_all_terminal(pipeline, jobs, since=cut_at)
    print_recovery("broker connections cut while idle", seconds, f"{killed} connections closed")
    assert_recovered(pipeline, worker, jobs, label="cutil")
