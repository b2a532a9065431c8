"""When the token store (Redis) is down, workers retry later instead of minting their own tokens."""

from __future__ import annotations

import time
from pathlib import Path

from tests.support.pipeline import APPS, Pipeline
from tests.support.services import RedisServer
from tests.support.waiting import wait_for

REUSE_SECONDS = 0.5


def token_fetches(pipeline: Pipeline, appid: str) -> int:
    """Calls to WeChat's token endpoints for ``appid`` (stable mode may hand back the same token)."""
    per_app = pipeline.sandbox.stats()["apps"].get(appid, {})
    return sum(int(per_app.get(endpoint, {}).get("calls", 0)) for endpoint in ("token", "stable_token"))


def test_token_store_outage_means_no_token_fetch_and_recovery_without_restart(
    pipeline: Pipeline, tmp_path: Path
) -> None:
    appid = sorted(APPS)[0]
    # The token store gets its own server so the broker keeps delivering while it is down.
    token_store = RedisServer(tmp_path / "token-store")
    token_store.start()
    try:
        pipeline.settings.update(
            redis_url=token_store.url(1),
            retry_backoff_base_seconds=0.3,
            retry_backoff_max_seconds=1.0,
            token_local_reuse_seconds=REUSE_SECONDS,
            call_gate_reuse_seconds=REUSE_SECONDS,
        )
        worker = pipeline.start_worker()
        first = pipeline.submit(appid, "oOutage000", pipeline.sandbox.mint_phone_code(appid))
        assert pipeline.wait_for_job(first).status == "succeeded"
        assert token_fetches(pipeline, appid) == 1

        token_store.stop()
        # A worker reuses the token and the open gate it read for a moment; after that, every
        # call needs the store.
        time.sleep(2 * REUSE_SECONDS)
        job_ids = [
            pipeline.submit(appid, f"oOutage{index:03d}", pipeline.sandbox.mint_phone_code(appid))
            for index in range(1, 4)
        ]

        def all_retried() -> bool:
            jobs = [pipeline.producer.get_job(job_id) for job_id in job_ids]
            return all(job is not None and job.attempts >= 2 for job in jobs)

        wait_for(all_retried, timeout_seconds=30, what="jobs retried while the token store is down")
        assert all(pipeline.producer.get_job(job_id).status != "failed" for job_id in job_ids)  # type: ignore[union-attr]
        assert token_fetches(pipeline, appid) == 1, (
            "a worker fetched a token of its own while the shared store was down"
        )

        token_store.start()  # empty again: it keeps nothing on disk
        jobs = pipeline.wait_for_jobs(job_ids, timeout_seconds=60)
        assert [job.status for job in jobs] == ["succeeded"] * len(job_ids)
        assert worker.is_running()
        # The restarted store was empty: exactly one cold-start fetch served all three jobs.
        assert token_fetches(pipeline, appid) == 2
    finally:
        token_store.stop()
