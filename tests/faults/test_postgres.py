"""PostgreSQL restarted, and down for 30 seconds, while jobs are in flight.

The pipeline runs on a private cluster (never the machine's own server), which the tests restart
and stop. Two rules keep every job whole:

* before the WeChat call, a database error makes the task retry with backoff (nothing was
  spent, so trying again later is free);
* after the call the code is spent and the number exists nowhere else: the final write is
  retried in-process for ``final_write_retry_seconds`` (the soft limit minus the HTTP and token
  budgets), so an outage shorter than that loses nothing and presents no code twice.
"""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest

from tests.support.faults import (
    FAST_SETTINGS,
    assert_all_terminal_and_correct,
    assert_wechat_calls_accounted,
    count_in,
    print_recovery,
    submit_jobs,
    wait_until_terminal,
)
from tests.support.pipeline import APPS, Pipeline
from tests.support.postgres import PostgresServer
from tests.support.waiting import wait_for
from worker.db import upgrade_to_head
from worker.settings import load_settings

pytestmark = pytest.mark.faults

APP_A, APP_B = sorted(APPS)
OUTAGE_SECONDS = 30
#: Timings for the outage test: the final write outlasts a 30-second outage with room to spare.
OUTAGE_SETTINGS = {
    **FAST_SETTINGS,
    "task_soft_time_limit_seconds": 50,
    "task_time_limit_seconds": 55,
    "visibility_timeout_seconds": 130,
}


@pytest.fixture(scope="module")
def postgres() -> Iterator[PostgresServer]:
    server = PostgresServer()
    server.start()
    yield server
    server.remove()


@pytest.fixture(scope="module")
def migrated_database_url(postgres: PostgresServer) -> str:
    """Overrides the session database: these tests run on the private cluster they break."""
    url = postgres.create_database("wxphone_faults")
    upgrade_to_head(url)
    return url


@pytest.fixture(autouse=True)
def postgres_running(postgres: PostgresServer) -> Iterator[None]:
    """Every test starts, and leaves, with the cluster up."""
    if not postgres.is_running():
        postgres.start()
    yield
    if not postgres.is_running():
        postgres.start()


def test_a_postgres_restart_mid_load_loses_nothing(pipeline: Pipeline, postgres: PostgresServer) -> None:
    stale = load_settings(**FAST_SETTINGS).stale_claim_seconds
    pipeline.settings.update(FAST_SETTINGS)
    pipeline.sandbox.configure(latency_ms={"phone": 200})
    for name in ("pg1", "pg2"):
        pipeline.start_worker(name, concurrency=8, pool="threads")
    jobs = submit_jobs(pipeline, APP_A, 60, label="pgr") + submit_jobs(pipeline, APP_B, 60, label="pgr")
    wait_for(lambda: count_in(pipeline, jobs) >= 20, timeout_seconds=60, what="the load under way")

    restarted_at = time.monotonic()
    postgres.restart(mode="fast")  # every connection of every worker is cut
    # A job cut between its claim and its code claim waits for its own claim to go stale.
    seconds = wait_until_terminal(pipeline, jobs, timeout_seconds=stale + 30, since=restarted_at)
    time.sleep(0.5)

    outcome = assert_all_terminal_and_correct(pipeline, jobs)
    stats = assert_wechat_calls_accounted(pipeline, jobs, outcome)
    assert outcome.succeeded == len(jobs)
    assert stats["code_presentations"] == {"1": len(jobs)}
    assert all(process.is_running() for process in pipeline.processes)
    print_recovery("PostgreSQL restart (pg_ctl restart -m fast)", seconds, f"{len(jobs)} jobs, all succeeded")


def test_a_30_second_postgres_outage_commits_every_exchanged_number(
    pipeline: Pipeline, postgres: PostgresServer
) -> None:
    settings = load_settings(**OUTAGE_SETTINGS)
    assert settings.final_write_retry_seconds > OUTAGE_SECONDS + 5
    pipeline.settings.update(OUTAGE_SETTINGS)
    # Replies take a while after WeChat consumed the code: the outage catches exchanges in flight.
    pipeline.sandbox.configure(latency_ms={"phone": 500})
    workers = [pipeline.start_worker(name, concurrency=8, pool="threads") for name in ("pgo1", "pgo2")]
    jobs = submit_jobs(pipeline, APP_A, 50, label="pgo") + submit_jobs(pipeline, APP_B, 50, label="pgo")
    wait_for(lambda: count_in(pipeline, jobs) >= 16, timeout_seconds=60, what="the load under way")

    committed_before = count_in(pipeline, jobs)
    postgres.stop(mode="fast")
    stopped_at = time.monotonic()
    time.sleep(1.0)  # the replies of the exchanges in flight arrive while the database is down
    spent_during_outage = int(pipeline.sandbox.stats()["codes_exchanged"]) - committed_before
    time.sleep(max(0.0, stopped_at + OUTAGE_SECONDS - time.monotonic()))
    postgres.start()
    back_at = time.monotonic()

    # A job cut between its claim and its code claim waits for its own claim to go stale.
    seconds = wait_until_terminal(
        pipeline, jobs, timeout_seconds=settings.stale_claim_seconds + 30, since=back_at
    )
    time.sleep(0.5)

    outcome = assert_all_terminal_and_correct(pipeline, jobs)
    stats = assert_wechat_calls_accounted(pipeline, jobs, outcome)
    # Jobs that had exchanged their code before or during the outage committed it afterwards; the
    # others retried; no code was presented twice and none was lost.
    assert outcome.succeeded == len(jobs)
    assert stats["code_presentations"] == {"1": len(jobs)}
    assert outcome.lost_replies == 0
    assert spent_during_outage > 0, "the outage caught no exchange in flight"
    log = "".join(worker.output() for worker in workers)
    assert "database unreachable while recording a result; retrying" in log
    assert all(worker.is_running() for worker in workers)
    print_recovery(
        f"PostgreSQL down {OUTAGE_SECONDS}s",
        seconds,
        f"after the restart; {spent_during_outage} codes were exchanged but not yet committed at the "
        f"stop and all committed afterwards (in-process final-write retry); {len(jobs)} jobs succeeded",
    )
