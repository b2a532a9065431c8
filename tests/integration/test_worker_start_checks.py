"""What a worker checks before it consumes anything: the schema, and the fleet's shared keys.

A worker on a database whose schema is not at the code's revision refuses to start and names the
command that fixes it. Workers record a keyed check value of each shared key in PostgreSQL
(``key_checks``); a worker started with another key refuses to start and names the variable, and
a front end with another blind-index key refuses lookups that would silently find no one.
"""

from __future__ import annotations

import pytest

from tests.support.pipeline import Pipeline, run_cli
from tests.support.services import create_database, drop_database
from worker.crypto import BlindIndex, DataProtection
from worker.keychecks import KeyMismatchError
from worker.producer import Producer

APPID = "wxpipeline000001"
OTHER_KEY = "another-fingerprint-key-of-a-second-worker"


def test_a_worker_with_another_fingerprint_key_refuses_to_start(pipeline: Pipeline) -> None:
    pipeline.start_worker("first")
    pipeline.stop_all()
    pipeline.settings["fingerprint_key"] = OTHER_KEY
    second = pipeline.start_worker_process("second")
    assert second.wait(timeout=60) != 0
    output = second.output()
    assert "WXPHONE_FINGERPRINT_KEY differs from the key the fleet's workers use" in output
    assert OTHER_KEY not in output

    # Changing the key for the whole fleet: forget the recorded check, start again.
    forgot = run_cli(pipeline, "keys", "forget-check", "fingerprint_key")
    assert forgot.returncode == 0 and "check forgotten" in forgot.stdout
    pipeline.start_worker("third")
    code = pipeline.sandbox.mint_phone_code(APPID, pure_phone_number="13688889999")
    assert pipeline.wait_for_job(pipeline.submit(APPID, "oNewKey0000001", code)).status == "succeeded"


def test_jobs_are_fingerprinted_by_the_worker_not_the_front_end(pipeline: Pipeline) -> None:
    code = pipeline.sandbox.mint_phone_code(APPID, pure_phone_number="13699990000")
    job_id = pipeline.submit(APPID, "oFingerprint01", code)
    assert pipeline.count("SELECT count(*) FROM phone_jobs WHERE code_fingerprint IS NULL") == 1
    pipeline.start_worker()
    assert pipeline.wait_for_job(job_id).status == "succeeded"
    assert (
        pipeline.count(
            "SELECT count(*) FROM phone_jobs j JOIN code_claims c "
            "ON c.appid = j.appid AND c.code_fingerprint = j.code_fingerprint AND c.job_id = j.job_id "
            "WHERE j.job_id = :j",
            j=job_id,
        )
        == 1
    )


def test_a_front_end_with_another_blind_index_key_refuses_lookups(pipeline: Pipeline) -> None:
    pipeline.start_worker()  # records the fleet's keys
    mismatched = Producer(
        sessions=pipeline.sessions,
        celery_app=pipeline.celery,
        protection=DataProtection(
            cipher=pipeline.producer.protection.cipher,
            blind_index=BlindIndex("a-blind-index-key-nobody-else-has"),
        ),
    )
    with pytest.raises(KeyMismatchError, match="WXPHONE_BLIND_INDEX_KEY"):
        mismatched.find_users_by_phone(phone_number="13800138000")
    assert pipeline.producer.find_users_by_phone(phone_number="13800138000") == []


def test_a_worker_refuses_to_start_on_a_database_not_at_head(pipeline: Pipeline) -> None:
    empty = create_database()
    try:
        pipeline.settings["database_url"] = empty
        worker = pipeline.start_worker_process("unmigrated")
        assert worker.wait(timeout=60) != 0
        assert "run `wxphone db upgrade`" in worker.output()
        assert "ready." not in worker.output()
    finally:
        drop_database(empty)
