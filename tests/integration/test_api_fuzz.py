"""A schemathesis fuzz run of every endpoint of ``wxphone api`` against its own ``/openapi.json``,
with a real session, real workers, PostgreSQL, Redis and the WeChat sandbox behind it."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

from tests.support.api import bearer, empty_login_jobs, log_in, start_api
from tests.support.pipeline import Pipeline

APPID = "wxpipeline000001"
#: Every check schemathesis has, but two. positive_data_acceptance expects a 2xx for any request
#: the schema allows, while a well-formed code WeChat never issued is refused (422) by design.
#: use_after_free needs a DELETE, which this API has none of.
EXCLUDED_CHECKS = "positive_data_acceptance,use_after_free"
#: Examples per operation and phase: enough to walk every field's edges in well under a minute.
MAX_EXAMPLES = 60
SEED = 20261201


def test_every_endpoint_survives_a_fuzz_run_against_its_own_schema(
    pipeline: Pipeline, tmp_path: Path
) -> None:
    empty_login_jobs(pipeline)
    pipeline.start_worker(concurrency=4)
    # Short waits keep the run quick; the limit is far above what the run sends.
    api = start_api(pipeline, api_max_wait_seconds=3, api_rate_limit_per_minute=1_000_000)
    session = log_in(api, pipeline, APPID, "oApiFuzz000001")
    command = [
        str(Path(sys.executable).with_name("schemathesis")),
        "run",
        f"{api.base_url}/openapi.json",
        "--header",
        f"Authorization: {bearer(session)['Authorization']}",
        "--checks",
        "all",
        "--exclude-checks",
        EXCLUDED_CHECKS,
        "--phases",
        "examples,coverage,fuzzing,stateful",
        "--max-examples",
        str(MAX_EXAMPLES),
        "--seed",
        str(SEED),
        "--workers",
        "1",
        "--report",
        "ndjson",
        "--report-dir",
        str(tmp_path / "report"),
        "--request-timeout",
        "20",
        "--no-color",
    ]
    run = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=240, check=False)
    output = run.stdout + run.stderr
    assert run.returncode == 0, output[-12000:]
    # Every operation was exercised (the API's access log names each route's template), and the
    # service answered no request with a server error of its own making.
    log = api.output()
    for operation in (
        "POST /v1/login 4",
        "GET /v1/login/{job_id} 404",
        "POST /v1/phone 2",
        "POST /v1/phone 422",
        "GET /v1/phone/{job_id} 4",
        "GET /healthz 200",
    ):
        assert operation in log, operation
    assert not re.search(r"wxphone\.api\.access\[\d+\]: \S+ \S+ 5\d\d", log)
    assert api.process.is_running()
