"""The user's phone fields and the job's final state are committed together, or not at all."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from sqlalchemy import text

from tests.support.pipeline import Pipeline, endpoint_counts, phone_job_row, user_row

APPID = "wxpipeline000001"


@pytest.fixture
def success_refused(pipeline: Pipeline) -> Iterator[None]:
    """Make PostgreSQL refuse to mark any job succeeded (a trigger), for this test only."""
    with pipeline.engine.begin() as conn:
        conn.execute(
            text(
                "CREATE FUNCTION test_refuse_success() RETURNS trigger LANGUAGE plpgsql AS $$"
                " BEGIN IF NEW.status = 'succeeded' THEN RAISE EXCEPTION 'refused by the test'; END IF;"
                " RETURN NEW; END $$"
            )
        )
        conn.execute(
            text(
                "CREATE TRIGGER test_refuse_success BEFORE UPDATE ON phone_jobs"
                " FOR EACH ROW EXECUTE FUNCTION test_refuse_success()"
            )
        )
    try:
        yield
    finally:
        with pipeline.engine.begin() as conn:
            conn.execute(text("DROP TRIGGER test_refuse_success ON phone_jobs"))
            conn.execute(text("DROP FUNCTION test_refuse_success()"))


def test_a_failed_final_write_leaves_no_phone_number_behind(
    pipeline: Pipeline, success_refused: None
) -> None:
    process = pipeline.start_worker()
    number = "13300007777"
    code = pipeline.sandbox.mint_phone_code(APPID, phone_number=number, pure_phone_number=number)
    job_id = pipeline.submit(APPID, "oAtomic000001", code)

    # WeChat answered; PostgreSQL refused the final statement (user + job + claim) for a reason
    # that would repeat, so the job ends at once instead of retrying for ever.
    job = pipeline.wait_for_job(job_id, timeout_seconds=30)
    assert (job.status, job.error_code) == ("failed", "database_rejected")
    process.wait_for_output("PostgreSQL refused a statement (RaiseException)", timeout_seconds=10)

    assert pipeline.sandbox.stats()["codes_exchanged"] == 1
    assert endpoint_counts(pipeline.sandbox, "phone").calls == 1
    assert user_row(pipeline, APPID, "oAtomic000001") is None
    row = phone_job_row(pipeline, job_id)
    assert row is not None and row["attempts"] == 1
    assert pipeline.count("SELECT count(*) FROM code_claims WHERE status = 'succeeded'") == 0
    assert pipeline.count("SELECT count(*) FROM code_claims WHERE error_code = 'database_rejected'") == 1
    assert number not in process.output()
    assert "refused by the test" not in process.output()  # PostgreSQL's message may hold values
