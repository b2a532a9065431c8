"""Configuration errors on the way to WeChat end phone jobs at once, with one operator alert:
an HTTP 4xx from the base URL, and a 45009 from the token endpoint (the token API's circuit)."""

from __future__ import annotations

import re

import redis

from tests.support.pipeline import FAST_RETRY_SETTINGS, Pipeline, endpoint_counts

APPID = "wxpipeline000001"
OTHER_APPID = "wxpipeline000002"


def alert_lines(output: str) -> list[str]:
    return [line for line in output.splitlines() if " ERROR " in line and "OPERATOR ALERT" in line]


def circuit_ttl_ms(pipeline: Pipeline, appid: str, api: str) -> int:
    with redis.Redis.from_url(pipeline.redis_url) as conn:
        return int(conn.pttl(f"wxphone:circuit:{appid}:{api}"))


def test_an_http_4xx_from_the_phone_api_fails_jobs_at_once_with_one_alert(pipeline: Pipeline) -> None:
    pipeline.settings.update(FAST_RETRY_SETTINGS)
    process = pipeline.start_worker()
    pipeline.sandbox.inject_fault("phone", http_status=404, times=3)  # say, a gateway without the route
    jobs = [
        pipeline.wait_for_job(
            pipeline.submit(APPID, f"oHttp4xx{index:05d}", pipeline.sandbox.mint_phone_code(APPID)),
            timeout_seconds=30,
        )
        for index in range(3)
    ]

    assert [(job.status, job.error_code, job.attempts) for job in jobs] == [
        ("failed", "wechat_config_error", 1)
    ] * 3
    assert endpoint_counts(pipeline.sandbox, "phone").calls == 3  # one call each, no retry
    assert pipeline.sandbox.stats()["codes_exchanged"] == 0
    alerts = alert_lines(process.output())
    assert len(alerts) == 1, alerts
    assert "HTTP 404" in alerts[0] and APPID in alerts[0]
    assert pipeline.count("SELECT count(*) FROM users") == 0


def test_45009_from_the_token_endpoint_opens_the_token_circuit_and_names_the_token_api(
    pipeline: Pipeline,
) -> None:
    pipeline.settings.update(FAST_RETRY_SETTINGS)
    process = pipeline.start_worker()
    pipeline.sandbox.inject_fault("stable_token", errcode=45009, times=100)
    first = pipeline.wait_for_job(
        pipeline.submit(APPID, "oTokenQuota001", pipeline.sandbox.mint_phone_code(APPID)), timeout_seconds=30
    )
    later = pipeline.wait_for_jobs(
        [
            pipeline.submit(APPID, f"oTokenQuota{index:03d}", pipeline.sandbox.mint_phone_code(APPID))
            for index in range(2, 6)
        ],
        timeout_seconds=30,
    )

    assert (first.status, first.error_code, first.attempts) == ("failed", "quota_exhausted", 1)
    assert {(job.status, job.error_code, job.attempts) for job in later} == {("failed", "quota_exhausted", 1)}
    stats = pipeline.sandbox.stats()
    assert stats["apps"][APPID]["stable_token"]["calls"] == 1  # later jobs met the open circuit
    assert stats["endpoints"]["phone"]["calls"] == 0
    assert circuit_ttl_ms(pipeline, APPID, "token") > 0
    assert circuit_ttl_ms(pipeline, APPID, "phone") < 0, "a token-API 45009 closed phone calls"
    alerts = alert_lines(process.output())
    assert len(alerts) == 1, alerts
    assert re.search(r"\btoken\b", alerts[0]) and APPID in alerts[0]
    assert "phone calls" not in alerts[0]

    # The other app has its own quota, token and circuit.
    pipeline.sandbox.clear_faults()
    other = pipeline.wait_for_job(
        pipeline.submit(OTHER_APPID, "oTokenQuota900", pipeline.sandbox.mint_phone_code(OTHER_APPID)),
        timeout_seconds=30,
    )
    assert (other.status, other.attempts) == ("succeeded", 1)
