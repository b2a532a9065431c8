"""A fleet sharing one classic token: beat keeps it fresh, workers only read it.

Classic tokens are the hard case: every fetch revokes the previous token after a grace period,
so workers that fetched their own tokens would keep invalidating each other (40001 storms).
"""

from __future__ import annotations

import time

import pytest

from tests.support.pipeline import APPS, Pipeline

TOKEN_LIFETIME_SECONDS = 6
GRACE_SECONDS = 3
REFRESH_FRACTION = 0.5
CHECK_INTERVAL_SECONDS = 0.5
DURATION_SECONDS = 60
JOBS_PER_SECOND = 8


@pytest.mark.slow
def test_classic_tokens_rotate_under_steady_load_without_a_single_40001(pipeline: Pipeline) -> None:
    appid = sorted(APPS)[0]
    pipeline.sandbox.configure(token_lifetime_seconds=TOKEN_LIFETIME_SECONDS, grace_seconds=GRACE_SECONDS)
    pipeline.settings.update(
        token_mode="classic",
        token_refresh_fraction=REFRESH_FRACTION,
        token_check_interval_seconds=CHECK_INTERVAL_SECONDS,
    )
    codes = pipeline.sandbox.mint_phone_codes(appid, DURATION_SECONDS * JOBS_PER_SECOND)
    # Two worker nodes with two pool processes each: four processes reading the one token.
    pipeline.start_worker("fleet1", concurrency=2)
    pipeline.start_worker("fleet2", concurrency=2)
    pipeline.start_beat()

    job_ids: list[str] = []
    started = time.monotonic()
    for index, code in enumerate(codes):
        # Steady load: job N goes out at N / JOBS_PER_SECOND seconds.
        time.sleep(max(0.0, started + index / JOBS_PER_SECOND - time.monotonic()))
        job_ids.append(pipeline.submit(appid, f"oFleet{index:04d}", code))
    duration = time.monotonic() - started
    jobs = pipeline.wait_for_jobs(job_ids, timeout_seconds=60)

    failed = [(job.job_id, job.error_code) for job in jobs if job.status != "succeeded"]
    assert failed == []
    phone = pipeline.sandbox_endpoint("phone")
    assert phone["calls"] == len(codes)
    assert phone["errcodes"].get("40001", 0) == 0, "a worker used a token WeChat had revoked"
    assert phone["errcodes"].get("42001", 0) == 0, "a worker used an expired token"

    per_app = pipeline.sandbox.stats()["apps"]
    # Beat keeps every configured app's token fresh; each app has its own token and its own count.
    for each in sorted(APPS):
        assert per_app[each]["phone"]["errcodes"].get("40001", 0) == 0
    issued = int(per_app[appid]["token"]["tokens_issued"])
    refresh_interval = TOKEN_LIFETIME_SECONDS * REFRESH_FRACTION
    expected = duration / refresh_interval + 1
    print(f"\ntoken fetches: {issued} over {duration:.1f}s (expected about {expected:.1f})")
    # Each refresh lands on the first beat tick after it is due, so the real interval is a little
    # longer than the nominal one; never shorter.
    lower = duration / (refresh_interval + CHECK_INTERVAL_SECONDS + 0.5) + 1
    assert lower - 1 <= issued <= expected + 1
