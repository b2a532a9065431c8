"""Two beats, no single point of failure: exactly one schedules; kill it and the other takes over.

RedBeat keeps one lock in Redis (``wxphone:redbeat::lock``). The beat holding it schedules and
extends it on every tick; a standby beat blocks on the lock and acquires it once the dead
leader's lease runs out (``redbeat_lock_timeout`` = 5 x ``beat_max_loop_interval`` = 25 s).
The periodic tasks are safe to run twice anyway (token refresh under a lease, the sweep under
row locks), but the lock means they are not sent twice.
"""

from __future__ import annotations

import re
import time
from datetime import datetime

import pytest

import celeryconfig
from tests.support.faults import FAST_SETTINGS, print_recovery
from tests.support.pipeline import BROKERS, Pipeline
from tests.support.waiting import wait_for

pytestmark = pytest.mark.faults

SENT = "Sending due task"
SWEEP_SENT = re.compile(r"^(\S+ \S+) INFO .*Sending due task sweep-stuck-jobs", re.MULTILINE)
LOCK_TIMEOUT_SECONDS = 5 * celeryconfig.beat_max_loop_interval


def sweep_times(*logs: str) -> list[datetime]:
    stamps = [match.group(1) for log in logs for match in SWEEP_SENT.finditer(log)]
    return sorted(datetime.strptime(stamp, "%Y-%m-%d %H:%M:%S,%f") for stamp in stamps)


@pytest.mark.parametrize("broker", BROKERS)  # the sweep and the refresh travel on wxphone.token
def test_two_beats_exactly_one_schedules_and_the_standby_takes_over(pipeline: Pipeline) -> None:
    interval = float(FAST_SETTINGS["sweep_interval_seconds"])
    pipeline.settings.update(FAST_SETTINGS)
    worker = pipeline.start_worker("beatworker", concurrency=2, pool="threads")
    beats = [pipeline.start_beat("beat-a"), pipeline.start_beat("beat-b")]

    wait_for(lambda: any(SENT in beat.output() for beat in beats), timeout_seconds=30, what="a beat to send")
    time.sleep(2 * interval + 1)  # both beats have had every chance to send
    senders = [beat for beat in beats if SENT in beat.output()]
    assert len(senders) == 1, "both beats scheduled"
    [leader] = senders
    [standby] = [beat for beat in beats if beat is not leader]
    assert "Acquired lock" in leader.output() and "Acquired lock" not in standby.output()
    assert sweep_times(leader.output()), "the leader never sent the stuck-job sweep"

    leader.kill()
    killed_at = time.monotonic()
    # The standby gets the lock once the dead leader's lease (extended on its last tick) runs out.
    standby.wait_for_output(SENT, timeout_seconds=LOCK_TIMEOUT_SECONDS + interval + 10)
    takeover = time.monotonic() - killed_at
    assert "Acquired lock" in standby.output()
    assert takeover <= LOCK_TIMEOUT_SECONDS + interval + 5
    wait_for(lambda: len(sweep_times(standby.output())) >= 2, timeout_seconds=3 * interval, what="sweeps")

    # Never two schedulers at once: consecutive sweeps over both logs are a full interval apart.
    times = sweep_times(leader.output(), standby.output())
    gaps = [(later - earlier).total_seconds() for earlier, later in zip(times, times[1:], strict=False)]
    assert min(gaps) >= interval - 1, f"sweeps sent {min(gaps):.1f}s apart: two beats scheduled"
    # And the sweeps sent by both beats ran on the worker.
    wait_for(
        lambda: worker.output().count("wxphone.sweep_stuck_jobs[") >= len(times),
        timeout_seconds=10,
        what="the worker to run the sweeps",
    )
    print_recovery(
        "beat leader SIGKILL",
        takeover,
        f"standby beat sent its first task {takeover:.1f}s after the kill (lock timeout "
        f"{LOCK_TIMEOUT_SECONDS}s); {len(times)} sweeps, none doubled",
    )
