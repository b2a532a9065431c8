"""``wxphone enqueue``, ``wxphone job show`` and ``wxphone user show`` run as an operator would."""

from __future__ import annotations

import json
import subprocess
import uuid
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime

from tests.support.pipeline import Pipeline, run_cli

APPID = "wxpipeline000001"
JOB_FIELDS = [
    "job_id",
    "kind",
    "appid",
    "openid",
    "status",
    "error_code",
    "attempts",
    "created_at",
    "finished_at",
]
USER_FIELDS = [
    "appid",
    "openid",
    "unionid",
    "phone_number",
    "pure_phone_number",
    "country_code",
    "phone_verified_at",
]


def iso_8601(value: str) -> datetime:
    parsed = datetime.fromisoformat(value)
    assert parsed.utcoffset() is not None, f"{value} has no UTC offset"
    return parsed


def plain_fields(stdout: str) -> dict[str, str]:
    return dict(line.split(None, 1) for line in stdout.splitlines())


def test_enqueue_then_show_the_job_and_the_user(pipeline: Pipeline) -> None:
    pipeline.start_worker()
    number = "13400006666"
    code = pipeline.sandbox.mint_phone_code(APPID, phone_number=number, pure_phone_number=number)
    missing_job = str(uuid.uuid4())
    with ThreadPoolExecutor(max_workers=4) as pool:
        enqueue = pool.submit(
            run_cli, pipeline, "enqueue", "--appid", APPID, "--openid", "oCli000000001", "--code", code
        )
        bad_enqueue = pool.submit(
            run_cli, pipeline, "enqueue", "--appid", APPID, "--openid", "oCli000000001", "--code", "has space"
        )
        unknown_job = pool.submit(run_cli, pipeline, "job", "show", missing_job, "--json")
        unknown_user = pool.submit(
            run_cli, pipeline, "user", "show", "--appid", APPID, "--openid", "oNobody000001"
        )

    enqueued = enqueue.result()
    assert (enqueued.returncode, enqueued.stderr) == (0, "")
    job_id = enqueued.stdout.strip()
    assert str(uuid.UUID(job_id)) == job_id and enqueued.stdout == job_id + "\n"
    refused = bad_enqueue.result()
    assert refused.returncode != 0 and refused.stdout == ""
    assert "code has characters a WeChat code never has" in refused.stderr
    assert pipeline.count("SELECT count(*) FROM phone_jobs") == 1
    for result, message in (
        (unknown_job.result(), f"no job with id {missing_job}"),
        (unknown_user.result(), f"no user with appid {APPID} and openid oNobody000001"),
    ):
        assert result.returncode != 0 and result.stdout == ""
        assert message in result.stderr
        assert "Traceback" not in result.stderr

    assert pipeline.wait_for_job(job_id, timeout_seconds=30).status == "succeeded"
    with ThreadPoolExecutor(max_workers=4) as pool:
        runs: list[subprocess.CompletedProcess[str]] = list(
            pool.map(
                lambda args: run_cli(pipeline, *args),
                [
                    ("job", "show", job_id, "--json"),
                    ("job", "show", job_id),
                    ("user", "show", "--appid", APPID, "--openid", "oCli000000001", "--json"),
                    ("user", "show", "--appid", APPID, "--openid", "oCli000000001"),
                ],
            )
        )
    for run in runs:
        assert (run.returncode, run.stderr) == (0, ""), run.stderr
    job_json, job_plain, user_json, user_plain = runs

    job = json.loads(job_json.stdout)
    assert list(job) == JOB_FIELDS
    assert {key: job[key] for key in JOB_FIELDS[:7]} == {
        "job_id": job_id,
        "kind": "phone",
        "appid": APPID,
        "openid": "oCli000000001",
        "status": "succeeded",
        "error_code": None,
        "attempts": 1,
    }
    assert iso_8601(job["created_at"]) <= iso_8601(job["finished_at"])
    assert plain_fields(job_plain.stdout) == {
        **{key: str(value) for key, value in job.items()},
        "error_code": "-",
    }

    user = json.loads(user_json.stdout)
    assert list(user) == USER_FIELDS
    assert {key: user[key] for key in USER_FIELDS[:6]} == {
        "appid": APPID,
        "openid": "oCli000000001",
        "unionid": None,
        "phone_number": number,
        "pure_phone_number": number,
        "country_code": "86",
    }
    assert iso_8601(user["phone_verified_at"]) >= iso_8601(job["created_at"])
    assert plain_fields(user_plain.stdout) == {
        **{key: str(value) for key, value in user.items()},
        "unionid": "-",
    }
