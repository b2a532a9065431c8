"""The gevent pool works: ``wxphone worker --pool gevent`` patches the standard library before
anything imports it, so psycopg, redis-py and requests wait cooperatively and a hundred greenlets
share one process. (Patched late, the worker took jobs and ran none.)"""

from __future__ import annotations

import pytest

from tests.support.faults import assert_all_terminal_and_correct, assert_wechat_calls_accounted, submit_jobs
from tests.support.pipeline import APPS, Pipeline, run_cli
from worker.launch import wants_gevent

APP_A, APP_B = sorted(APPS)


def test_phone_jobs_and_logins_run_on_the_gevent_pool(pipeline: Pipeline) -> None:
    pipeline.sandbox.configure(latency_ms={"phone": 300, "login": 300})
    worker = pipeline.start_worker("green", concurrency=50, pool="gevent")
    jobs = submit_jobs(pipeline, APP_A, 30, label="gvt") + submit_jobs(pipeline, APP_B, 30, label="gvt")
    js_code, openid = pipeline.sandbox.mint_login_code(APP_A)
    login = pipeline.celery.send_task(
        "wxphone.login", kwargs={"appid": APP_A, "js_code": js_code}, queue="wxphone"
    )

    pipeline.wait_for_jobs([job.job_id for job in jobs], timeout_seconds=60)
    outcome = assert_all_terminal_and_correct(pipeline, jobs)
    assert outcome.succeeded == len(jobs)
    assert_wechat_calls_accounted(pipeline, jobs, outcome)
    assert login.get(timeout=30)["openid"] == openid
    assert "(gevent)" in worker.output()


def test_gevent_is_patched_only_for_a_gevent_worker() -> None:
    assert wants_gevent(["worker", "--pool", "gevent"], None)
    assert wants_gevent(["worker", "-P", "gevent"], "prefork")
    assert wants_gevent(["worker", "-Pgevent"], None)
    assert wants_gevent(["worker", "--pool=gevent"], None)
    assert wants_gevent(["worker"], "gevent")  # WXPHONE_WORKER_POOL=gevent
    assert not wants_gevent(["worker", "--pool", "threads"], "gevent")
    assert not wants_gevent(["worker", "--", "--pool", "gevent"], None)
    assert not wants_gevent(["beat"], "gevent")
    assert not wants_gevent([], "gevent")


@pytest.mark.parametrize("module", ["worker.cli"])
def test_a_gevent_worker_started_where_patching_is_too_late_is_refused(
    pipeline: Pipeline, module: str
) -> None:
    """``python -m worker.cli`` imports the command line (and what gevent must patch) before it
    can decide: the gevent pool is refused there with the commands that work."""
    import subprocess
    import sys

    done = subprocess.run(
        [sys.executable, "-m", module, "worker", "--pool", "gevent"],
        env=pipeline.env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode != 0
    assert "python -m worker worker" in done.stderr
    assert run_cli(pipeline, "config", "show").returncode == 0
