"""Attacks on the liveness lease that licenses takeovers of running jobs.

A delivery that finds its job ``running`` takes it over only when the claiming run is provably
over, and self-fencing stops a run whose process's lease lapsed from presenting the code: a code
reaches WeChat once. These attack the edges: a worker paused for longer than its lease, two
workers whose processes share pids (PID namespaces on one host name), a worker whose clock runs
ahead, and a login's message delivered twice.
"""

from __future__ import annotations

import base64
import json
import os
import signal
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import timedelta

import pytest
import redis
from sqlalchemy import text

from tests.support.faults import pool_children, queued_message, redeliver, submit_jobs
from tests.support.pipeline import (
    APPS,
    DEVELOPMENT_PROTECTION,
    FINGERPRINT_KEY,
    Pipeline,
    endpoint_counts,
    phone_job_row,
)
from tests.support.processes import WXPHONE, ManagedProcess, worker_process
from tests.support.waiting import wait_for
from worker.jobs.phone import JobPolicy, resolve_phone_job, utc_now
from worker.liveness import RunnerLease
from worker.settings import AppCredentials, load_settings
from worker.tokens.service import TokenService
from worker.tokens.store import TokenStore
from worker.wechat.client import WeChatClient

pytestmark = pytest.mark.faults

APP_A, _ = sorted(APPS)
RUNNER_KEYS = "wxphone:runner:*"


@contextmanager
def _job_row_locked(pipeline: Pipeline, job_id: str) -> Iterator[None]:
    """Hold the job row's lock (as any slow transaction on it would): the claim statement waits."""
    with pipeline.engine.connect() as conn:
        transaction = conn.begin()
        conn.execute(text("SELECT 1 FROM phone_jobs WHERE job_id = :id FOR UPDATE"), {"id": job_id})
        try:
            yield
        finally:
            transaction.rollback()


def _claim_waiting_on_lock(pipeline: Pipeline) -> bool:
    with pipeline.engine.connect() as conn:
        waiting = conn.execute(
            text(
                "SELECT count(*) FROM pg_stat_activity WHERE application_name = 'wxphone' "
                "AND wait_event_type = 'Lock' AND query LIKE '%claimed_job%'"
            )
        ).scalar_one()
    return int(waiting) > 0


def _presentations(pipeline: Pipeline) -> dict[str, int]:
    return {str(k): int(v) for k, v in pipeline.sandbox.stats()["code_presentations"].items()}


def test_a_run_whose_lease_lapsed_and_came_back_does_not_present_a_taken_over_code(
    pipeline: Pipeline,
) -> None:
    """A worker paused for longer than its lease (a VM freeze, SIGSTOP, swap storm, a long GC)
    after claiming a job: another delivery rightly takes the job over once the lease lapsed and
    exchanges the code. When the paused worker resumes, it is a new runner: its run under the old
    one may not present the code (it once renewed its lease and called)."""
    [job] = submit_jobs(pipeline, APP_A, 1, label="frz")
    message = queued_message(pipeline.broker_url)
    with _job_row_locked(pipeline, job.job_id):
        # One slot, busy with the claim: no read is pending on the queue, so the copy goes elsewhere.
        holder = pipeline.start_worker("frozen", concurrency=1, pool="threads")
        wait_for(lambda: _claim_waiting_on_lock(pipeline), timeout_seconds=30, what="the claim to wait")
        os.kill(holder.pid, signal.SIGSTOP)  # paused between its claim and its WeChat call
    try:
        # The lock is gone: the paused worker's claim statement commits at the server.
        wait_for(
            lambda: (phone_job_row(pipeline, job.job_id) or {}).get("status") == "running",
            timeout_seconds=10,
            what="the paused worker's claim",
        )
        redeliver(pipeline.broker_url, message)
        pipeline.start_worker("other", concurrency=2, pool="threads")
        # The other worker waits for the paused one's lease to lapse (20 s), then takes over.
        pipeline.wait_for_job(job.job_id, timeout_seconds=90)
        assert _presentations(pipeline) == {"1": 1}
    finally:
        os.kill(holder.pid, signal.SIGCONT)
    resumed_at = time.monotonic()
    # Bounded: the resumed run reaches WeChat within a second or two, or never.
    while time.monotonic() - resumed_at < 10 and _presentations(pipeline) == {"1": 1}:
        time.sleep(0.1)
    row = phone_job_row(pipeline, job.job_id)
    assert row is not None and row["status"] == "succeeded"
    assert _presentations(pipeline) == {"1": 1}, (
        f"the resumed, taken-over run presented the code again: calls per code {_presentations(pipeline)}"
    )


# -- a prefork parent releases the lease of a live process in another worker ------------------


def _runner_keys(redis_url: str) -> set[str]:
    with redis.Redis.from_url(redis_url, socket_timeout=5) as client:
        return {bytes(key).decode() for key in client.scan_iter(match=RUNNER_KEYS, count=1000)}


def _pid_of(key: str) -> int:
    """The pid a runner key names (``wxphone:runner:{host}/{worker nonce}/{pid}/{random}``)."""
    return int(key.split("/")[2])


def _namespaced_worker(pipeline: Pipeline, name: str) -> ManagedProcess:
    """A prefork worker in a PID namespace of its own on this host (same hostname), as in
    containers that share the host's network and so its hostname (``docker run --network host``,
    Kubernetes ``hostNetwork: true``): each container numbers its processes from 1."""
    process = worker_process(pipeline.env, pipeline.log_dir, name=name, concurrency=1, pool="prefork")
    process.args = ["unshare", "--pid", "--fork", *WXPHONE, *list(process.args)[len(WXPHONE) :]]
    process.start()
    pipeline.processes.append(process)
    process.wait_for_output("ready.", timeout_seconds=60)
    return process


def _descendants(pid: int) -> list[int]:
    found: list[int] = []
    for child in pool_children(pid):
        found += [child, *_descendants(child)]
    return found


def test_a_dead_pool_child_releases_only_its_own_lease(pipeline: Pipeline) -> None:
    """Two prefork workers on one host name whose pool children have the same pid (separate PID
    namespaces). A child of one is killed mid-task; its parent releases that child's lease, and
    only that one (runner ids carry the worker's nonce): a copy of the other worker's live job
    waits, its code presented once."""
    pipeline.settings.update(http_read_timeout_seconds=9)  # room for a 7 s hold at the sandbox
    [live_job] = submit_jobs(pipeline, APP_A, 1, label="nsl")
    message = queued_message(pipeline.broker_url)
    pipeline.sandbox.inject_fault("phone", latency_ms=7000, timing="before")
    live = _namespaced_worker(pipeline, "ns-live")
    wait_for(lambda: pipeline.sandbox.pending_faults() == [], timeout_seconds=30, what="the live exchange")
    [live_key] = _runner_keys(pipeline.redis_url)

    pipeline.sandbox.inject_fault("phone", latency_ms=7000, timing="before")
    doomed = _namespaced_worker(pipeline, "ns-doomed")
    [doomed_job] = submit_jobs(pipeline, APP_A, 1, label="nsd")
    wait_for(lambda: pipeline.sandbox.pending_faults() == [], timeout_seconds=30, what="the doomed exchange")
    keys = _runner_keys(pipeline.redis_url)
    assert len(keys) == 2 and {_pid_of(key) for key in keys} == {_pid_of(live_key)}, keys
    [doomed_key] = keys - {live_key}
    pipeline.start_worker("spare", concurrency=4, pool="threads")  # takes whatever comes back

    [doomed_child] = [pid for pid in _descendants(doomed.pid) if pid not in _descendants(live.pid)][-1:]
    os.kill(doomed_child, signal.SIGKILL)
    wait_for(
        lambda: doomed_key not in _runner_keys(pipeline.redis_url),
        timeout_seconds=10,
        interval_seconds=0.01,
        what="the dead child's lease to be released",
    )
    assert live_key in _runner_keys(pipeline.redis_url)  # the other worker's child, same pid, lives
    redeliver(pipeline.broker_url, message)  # the live child's job, put back by a broker drop

    pipeline.wait_for_job(live_job.job_id, timeout_seconds=60)
    wait_for(
        # The live exchange, the doomed one and its rerun; never the live job's copy.
        lambda: pipeline.sandbox.stats()["endpoints"]["phone"]["calls"] >= 3,
        timeout_seconds=20,
        what="the held requests to finish",
    )
    pipeline.wait_for_job(doomed_job.job_id, timeout_seconds=30)
    presentations = pipeline.sandbox.stats()["code_presentations"]
    row = phone_job_row(pipeline, live_job.job_id)
    # The doomed job's code is presented twice (its child died mid-exchange: a counted lost
    # reply); the live job's code must be presented once, its run never taken over.
    assert row is not None and row["lost_replies"] == 0 and presentations == {"2": 1, "1": 1}, (
        f"the live child's code was presented while its exchange was at WeChat: calls per code "
        f"{presentations}, job {row and (row['status'], row['attempts'], row['lost_replies'])}"
    )


# -- the stale-claim rule compares two processes' wall clocks ---------------------------------


def test_a_worker_whose_clock_runs_ahead_does_not_take_over_a_live_run(pipeline: Pipeline) -> None:
    """The age of a claim is PostgreSQL's to tell: a worker host whose clock runs ahead by more
    than the stale window (135 s with the shipped limits) still finds a live run live."""
    shipped = load_settings(
        wechat_api_base=pipeline.sandbox.base_url, apps="wxa:s", fingerprint_key=FINGERPRINT_KEY
    )
    [job] = submit_jobs(pipeline, APP_A, 1, label="skew")
    message = json.loads(queued_message(pipeline.broker_url))
    pipeline.sandbox.inject_fault("phone", latency_ms=4000, timing="before")
    pipeline.start_worker("live", concurrency=1, pool="threads")
    wait_for(lambda: pipeline.sandbox.pending_faults() == [], timeout_seconds=30, what="the live exchange")

    # The copy of the message, delivered to a worker on a host whose clock is 140 s ahead.
    body = json.loads(base64.b64decode(message["body"]))
    kwargs = body[1]
    skew = timedelta(seconds=shipped.stale_claim_seconds + 5)
    client = redis.Redis.from_url(pipeline.redis_url, socket_timeout=5)
    wechat = WeChatClient(pipeline.sandbox.base_url, timeout=(3.05, 5.0))
    lease = RunnerLease(
        client,
        lease_seconds=shipped.runner_lease_seconds,
        call_budget_seconds=shipped.wechat_call_budget_seconds,
    )
    try:
        outcome = resolve_phone_job(
            job_id=job.job_id,
            appid=kwargs["appid"],
            openid=kwargs["openid"],
            code=kwargs["code"],
            engine=pipeline.engine,
            token_service=TokenService(
                store=TokenStore(client, mode="stable"),
                client=wechat,
                apps={appid: AppCredentials(appid, secret) for appid, secret in APPS.items()},
                mode="stable",
            ),
            client=wechat,
            policy=JobPolicy(
                fingerprint_key=FINGERPRINT_KEY, stale_claim_seconds=shipped.stale_claim_seconds
            ),
            lease=lease,
            clock=lambda: utc_now() + skew,
            protection=DEVELOPMENT_PROTECTION,
        )
    finally:
        lease.stop()
        wechat.close()
        client.close()
    pipeline.wait_for_job(job.job_id, timeout_seconds=30)
    wait_for(
        lambda: pipeline.sandbox.stats()["endpoints"]["phone"]["calls"] >= 1 + (outcome.status != "running"),
        timeout_seconds=10,
        what="the held exchange to finish",
    )
    assert outcome.status == "running", f"the skewed delivery did not wait for the live run: {outcome}"
    assert _presentations(pipeline) == {"1": 1}


# -- login jobs have no claim at all ----------------------------------------------------------


@pytest.mark.parametrize("timing", ["before", "after"])
def test_a_redelivered_copy_of_a_running_login_does_not_present_its_code_again(
    pipeline: Pipeline, timing: str
) -> None:
    """The same broker connection drop that puts running phone jobs' messages back puts running
    logins' messages back. The copy waits for the live run (its run claim), so the js_code is
    presented once and the task's result is the login's."""
    appid = APP_A
    js_code, openid = pipeline.sandbox.mint_login_code(appid, openid="oLoginCopy0001")
    task_id = pipeline.send_by_name("wxphone.login", appid=appid, js_code=js_code)
    message = queued_message(pipeline.broker_url)
    pipeline.sandbox.inject_fault("login", latency_ms=4000, timing=timing)  # type: ignore[arg-type]
    pipeline.start_worker("live", concurrency=4, pool="threads")
    wait_for(lambda: pipeline.sandbox.pending_faults() == [], timeout_seconds=30, what="the held login")
    redeliver(pipeline.broker_url, message)

    wait_for(
        lambda: (
            pipeline.count("SELECT count(*) FROM exchange_audit WHERE job_id = :t", t=task_id) >= 1
            and endpoint_counts(pipeline.sandbox, "login").calls >= 1
        ),
        timeout_seconds=30,
        what="the login",
    )
    result = pipeline.celery.AsyncResult(task_id).get(timeout=30)
    # The copy, looking again after the live run, finds the login done.
    wait_for(
        lambda: "login already ended in an earlier run of this task" in pipeline.processes[-1].output(),
        timeout_seconds=40,
        what="the copy to find the login done",
    )
    calls = endpoint_counts(pipeline.sandbox, "login")
    assert calls.calls == 1, f"js_code presented {calls.calls} times: {calls.errcodes}; result {result}"
    assert result["status"] == "succeeded" and result["openid"] == openid, result
    job = pipeline.producer.get_job(task_id)
    assert job is not None and (job.kind, job.status, job.attempts) == ("login", "succeeded", 1)
