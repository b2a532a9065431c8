"""WeChat misbehaving under load: busy bursts, lost replies, dropped connections, 5xx, 45011, 45009.

Each test runs a threads-pool worker (the documented pool) against the sandbox, injects faults
into the phone endpoint while jobs for both apps are in flight, and then checks the promise:
every job terminal and correct, each extra presentation of a code covered by a counted lost
reply, every user row written once.

How each transport fault is accounted (``timing`` is the sandbox's: ``before`` spoils the
request before WeChat processes it, ``after`` once the code is consumed):

* a reply that never arrives (read timeout, dropped connection, HTTP 5xx) counts one lost reply,
  since the client cannot know which of the two happened, and the job retries;
* ``before``: the retry exchanges the code: ``succeeded``, the code presented once (a read
  timeout ``before`` is the exception: the slow request is still processed later, so the code
  is presented twice, the second time refused);
* ``after``: the retry is refused (40029), and the job ends ``failed``/``reply_lost``: WeChat
  consumed the code, the number never arrived.
"""

from __future__ import annotations

import re
import time
from typing import Any

import pytest
import redis

from tests.support.faults import (
    FAST_SETTINGS,
    ack_error_lines,
    assert_all_terminal_and_correct,
    assert_codes_match_outcomes,
    assert_wechat_calls_accounted,
    print_recovery,
    submit_jobs,
    wait_until_terminal,
)
from tests.support.pipeline import APPS, Pipeline
from tests.support.waiting import wait_for

pytestmark = pytest.mark.faults

APP_A, APP_B = sorted(APPS)
JOBS_PER_APP = 20
CONCURRENCY = 8
PHONE_LATENCY_MS = 50
#: Longer than the read timeout by a wide margin, so the slow request is still asleep at the
#: sandbox when the job's retry arrives.
SLOW_MS = (FAST_SETTINGS["http_read_timeout_seconds"] + 3) * 1000


def start(pipeline: Pipeline, **settings: Any) -> None:
    pipeline.settings.update(FAST_SETTINGS, **settings)
    pipeline.sandbox.configure(latency_ms={"phone": PHONE_LATENCY_MS})
    pipeline.start_worker("faults", concurrency=CONCURRENCY, pool="threads")


TRANSIENT_FAULTS: dict[str, tuple[list[dict[str, Any]], dict[str, int]]] = {
    # scenario: (faults queued in this order, expected figures)
    "busy-burst": (
        [{"errcode": -1, "times": 15}],
        {"reply_lost": 0, "lost_replies": 0, "presented_twice": 0},
    ),
    "read-timeout": (
        [
            {"latency_ms": SLOW_MS, "timing": "after", "times": 2},
            {"latency_ms": SLOW_MS, "timing": "before", "times": 2},
        ],
        {"reply_lost": 2, "lost_replies": 4, "presented_twice": 4},
    ),
    "dropped-connection": (
        [
            {"drop_connection": True, "timing": "before", "times": 2},
            {"drop_connection": True, "timing": "after", "times": 2},
        ],
        {"reply_lost": 2, "lost_replies": 4, "presented_twice": 2},
    ),
    "http-5xx": (
        [
            {"http_status": 502, "timing": "before", "times": 2},
            {"http_status": 503, "timing": "before", "times": 1},
            {"http_status": 503, "timing": "after", "times": 2},
        ],
        {"reply_lost": 2, "lost_replies": 5, "presented_twice": 2},
    ),
}


@pytest.mark.parametrize("scenario", list(TRANSIENT_FAULTS))
def test_transient_faults_end_every_job_truthfully(pipeline: Pipeline, scenario: str) -> None:
    faults, expected = TRANSIENT_FAULTS[scenario]
    start(pipeline)
    for fault in faults:
        pipeline.sandbox.inject_fault("phone", **fault)
    began = time.monotonic()
    jobs = submit_jobs(pipeline, APP_A, JOBS_PER_APP, label=scenario[:4]) + submit_jobs(
        pipeline, APP_B, JOBS_PER_APP, label=scenario[:4]
    )
    seconds = wait_until_terminal(pipeline, jobs, timeout_seconds=60, since=began)
    assert pipeline.sandbox.pending_faults() == []
    # A request whose client gave up may still be asleep at the sandbox: let it finish (and be
    # counted) before reading the counters.
    slowest = max(float(fault.get("latency_ms", 0)) for fault in faults) / 1000
    time.sleep(max(0.0, began + slowest + 1 - time.monotonic()))

    outcome = assert_all_terminal_and_correct(pipeline, jobs, allowed_errors={"reply_lost"})
    stats = assert_wechat_calls_accounted(pipeline, jobs, outcome)
    histogram = stats["code_presentations"]
    assert outcome.failed("reply_lost") == expected["reply_lost"]
    assert outcome.succeeded == len(jobs) - expected["reply_lost"]
    assert outcome.lost_replies == expected["lost_replies"]
    assert histogram.get("2", 0) == expected["presented_twice"]
    assert set(histogram) <= {"1", "2"}
    assert ack_error_lines(*(process.output() for process in pipeline.processes)) == []
    assert_codes_match_outcomes(pipeline, jobs, outcome)
    print_recovery(f"sandbox {scenario}", seconds, f"{len(jobs)} jobs drained; {outcome.summary()}")


def test_45011_pauses_the_app_until_the_window_ends_without_hammering_wechat(pipeline: Pipeline) -> None:
    window = float(FAST_SETTINGS["rate_limit_window_seconds"])
    start(pipeline)
    pipeline.sandbox.inject_fault("phone", errcode=45011)
    # Begin just after a window starts, so the pause that follows the 45011 is nearly a window long.
    wait_for(lambda: time.time() % window < 0.3, timeout_seconds=window + 1, what="a window start")
    began = time.monotonic()
    jobs = submit_jobs(pipeline, APP_A, 2 * JOBS_PER_APP, label="rl")

    def phone_stats() -> dict[str, Any]:
        stats: dict[str, Any] = pipeline.sandbox.stats()["apps"][APP_A]["phone"]
        return stats

    wait_for(lambda: phone_stats()["errcodes"].get("45011"), timeout_seconds=20, what="the 45011")

    def pause_left_ms() -> int:
        with redis.Redis.from_url(pipeline.redis_url) as conn:
            return max(0, int(conn.pttl(f"wxphone:pause:{APP_A}:phone")))

    # The worker that got the 45011 pauses the app for the whole fleet once the reply is in.
    pause_ms = wait_for(pause_left_ms, timeout_seconds=5, what="the fleet-wide pause after the 45011")
    calls_at_pause = int(phone_stats()["calls"])
    window_end = time.time() + pause_ms / 1000
    time.sleep(max(0.0, window_end - time.time() - 0.2))
    calls_during_pause = int(phone_stats()["calls"]) - calls_at_pause

    seconds = wait_until_terminal(pipeline, jobs, timeout_seconds=60, since=began)
    outcome = assert_all_terminal_and_correct(pipeline, jobs)
    stats = assert_wechat_calls_accounted(pipeline, jobs, outcome)
    assert outcome.succeeded == len(jobs)
    assert stats["code_presentations"] == {"1": len(jobs)}
    # Only requests already past the gate when the pause began may reach WeChat during it.
    assert calls_during_pause <= CONCURRENCY - 1, f"{calls_during_pause} calls while paused"
    print_recovery(
        "sandbox 45011",
        seconds,
        f"pause {pause_ms / 1000:.1f}s, {calls_during_pause} phone calls during the pause "
        f"(in flight before it), {len(jobs)} jobs succeeded",
    )


def test_45009_opens_the_circuit_for_that_app_only_with_one_operator_alert(pipeline: Pipeline) -> None:
    start(pipeline)
    # Three 45009s for three concurrent jobs: the circuit opens once, with one alert.
    pipeline.sandbox.inject_fault("phone", errcode=45009, times=3)
    began = time.monotonic()
    first_wave = submit_jobs(pipeline, APP_A, 3, label="qa")
    wait_until_terminal(pipeline, first_wave, timeout_seconds=30)
    pipeline.sandbox.clear_faults()  # unused ones (jobs that met the open circuit) must not leak to app B
    calls_after_opening = int(pipeline.sandbox.stats()["apps"][APP_A]["phone"]["calls"])

    second_wave = submit_jobs(pipeline, APP_A, JOBS_PER_APP, label="qb")
    other_app = submit_jobs(pipeline, APP_B, JOBS_PER_APP, label="qc")
    wait_until_terminal(pipeline, second_wave + other_app, timeout_seconds=30)
    seconds = time.monotonic() - began

    jobs = first_wave + second_wave + other_app
    outcome = assert_all_terminal_and_correct(pipeline, jobs, allowed_errors={"quota_exhausted"})
    assert_wechat_calls_accounted(pipeline, jobs, outcome)
    assert outcome.failed("quota_exhausted") == len(first_wave) + len(second_wave)
    assert outcome.succeeded == len(other_app)
    per_app = pipeline.sandbox.stats()["apps"]
    assert int(per_app[APP_A]["phone"]["calls"]) == calls_after_opening, "calls through an open circuit"
    assert int(per_app[APP_B]["phone"]["calls"]) == len(other_app)
    # Jobs meeting the open circuit fail at once: one attempt each, no retry.
    assert all(outcome.rows[job.job_id]["attempts"] == 1 for job in second_wave)
    log = "".join(process.output() for process in pipeline.processes)
    alerts = [line for line in log.splitlines() if re.search(r" ERROR .*OPERATOR ALERT", line)]
    assert len(alerts) == 1, alerts
    assert APP_A in alerts[0]
    assert_codes_match_outcomes(pipeline, jobs, outcome)
    print_recovery(
        "sandbox 45009",
        seconds,
        f"{len(second_wave)} later {APP_A} jobs failed fast with 0 phone calls; {APP_B} unaffected",
    )
