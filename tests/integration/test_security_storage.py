"""Personal data at rest, end to end: encrypted numbers and session_keys, the blind index, the
append-only audit trail, ``wxphone user find`` and ``wxphone keys rotate`` while workers run."""

from __future__ import annotations

import base64
import json
import os
import subprocess
import threading
from typing import Any

import pytest
from sqlalchemy import text
from sqlalchemy.exc import DBAPIError

from tests.support.pipeline import (
    FAST_RETRY_SETTINGS,
    Pipeline,
    run_cli,
    user_row,
)
from worker.crypto import BlindIndex, DataProtection, FieldCipher, users_context
from worker.producer import Producer
from worker.settings import parse_encryption_keys

APPID = "wxpipeline000001"
OTHER_APPID = "wxpipeline000002"
KEY_1 = "v1:" + base64.b64encode(os.urandom(32)).decode()
KEY_2 = "v2:" + base64.b64encode(os.urandom(32)).decode()
BLIND_INDEX_KEY = "security-test-blind-index-key-01"


def audit_rows(pipeline: Pipeline, **where: Any) -> list[dict[str, Any]]:
    clause = " AND ".join(f"{name} = :{name}" for name in where) or "true"
    with pipeline.engine.connect() as conn:
        rows = conn.execute(text(f"SELECT * FROM exchange_audit WHERE {clause} ORDER BY id"), where)
        return [dict(row) for row in rows.mappings()]


@pytest.fixture
def clean_audit(pipeline: Pipeline) -> Pipeline:
    # The pipeline fixture empties the other tables; TRUNCATE is not a row-level change, so the
    # append-only trigger allows a test to start from an empty trail.
    with pipeline.engine.begin() as conn:
        conn.execute(text("TRUNCATE exchange_audit"))
    return pipeline


def test_numbers_are_stored_encrypted_and_every_exchange_is_audited(clean_audit: Pipeline) -> None:
    pipeline = clean_audit
    pipeline.settings.update(FAST_RETRY_SETTINGS)
    pipeline.start_worker()
    number = "13800138000"
    code = pipeline.sandbox.mint_phone_code(APPID, phone_number=number, pure_phone_number=number)
    pipeline.sandbox.inject_fault("phone", errcode=-1)  # busy once: one retry
    job_id = pipeline.producer.submit_phone_code(
        appid=APPID, openid="oSecure000001", code=code, caller="checkout-web"
    )
    assert pipeline.wait_for_job(job_id).status == "succeeded"
    # The same number for a user of the other app; an invalid code; a label that is dropped.
    other = pipeline.sandbox.mint_phone_code(OTHER_APPID, phone_number=number, pure_phone_number=number)
    other_id = pipeline.producer.submit_phone_code(
        appid=OTHER_APPID, openid="oSecure000002", code=other, caller="bad\nlabel"
    )
    invalid_id = pipeline.producer.submit_phone_code(
        appid=APPID, openid="oSecure000003", code="never-issued-code-0123456789", caller="x" * 65
    )
    assert pipeline.wait_for_job(other_id).status == "succeeded"
    assert pipeline.wait_for_job(invalid_id).error_code == "invalid_code"

    row = user_row(pipeline, APPID, "oSecure000001")
    assert row is not None
    assert number not in json.dumps(row, default=str)
    assert row["phone_masked"] == "138****8000"
    assert row["encryption_key_version"] == "dev"
    assert len(row["phone_blind_index"]) == 64
    assert row["phone_blind_index"] == user_row(pipeline, OTHER_APPID, "oSecure000002")["phone_blind_index"]  # type: ignore[index]
    # Bound to its row: the ciphertext of one user does not decrypt as another's.
    cipher = pipeline.producer.protection.cipher
    with pytest.raises(Exception, match="authentication"):
        cipher.decrypt(
            row["phone_number_encrypted"], context=users_context("phone_number", APPID, "oSecure000002")
        )

    user = pipeline.producer.get_user(appid=APPID, openid="oSecure000001")
    assert user is not None and (user.phone_number, user.pure_phone_number) == (number, number)
    found = pipeline.producer.find_users_by_phone(phone_number="+86 138 0013 8000")
    assert sorted((each.appid, each.openid, each.phone_number) for each in found) == [
        (APPID, "oSecure000001", number),
        (OTHER_APPID, "oSecure000002", number),
    ]
    assert [
        each.openid for each in pipeline.producer.find_users_by_phone(phone_number=number, appid=APPID)
    ] == ["oSecure000001"]
    assert pipeline.producer.find_users_by_phone(phone_number="13800138001") == []

    with pipeline.engine.connect() as conn:
        fingerprint = conn.execute(
            text("SELECT code_fingerprint FROM phone_jobs WHERE job_id = :j"), {"j": job_id}
        ).scalar_one()
    first = audit_rows(pipeline, job_id=job_id)
    assert [(r["api"], r["outcome"], r["errcode"], r["caller"]) for r in first] == [
        ("phone", "retrying", -1, "checkout-web"),
        ("phone", "succeeded", 0, "checkout-web"),
    ]
    assert all(r["appid"] == APPID and r["openid"] == "oSecure000001" for r in first)
    assert all(r["code_fingerprint"] == fingerprint and r["latency_ms"] >= 0 for r in first)
    assert first[0]["rid"]  # the sandbox's errmsg carries a rid
    assert [(r["outcome"], r["caller"]) for r in audit_rows(pipeline, job_id=other_id)] == [
        ("succeeded", None)
    ]
    [invalid] = audit_rows(pipeline, job_id=invalid_id)
    assert (invalid["outcome"], invalid["errcode"], invalid["error_code"], invalid["caller"]) == (
        "failed",
        40029,
        "invalid_code",
        None,
    )
    everything = json.dumps(audit_rows(pipeline), default=str)
    assert code not in everything and number not in everything and other not in everything

    # Append-only: the database itself refuses changes and deletions.
    for statement in ("UPDATE exchange_audit SET outcome = 'failed'", "DELETE FROM exchange_audit"):
        with pytest.raises(DBAPIError, match="append-only"), pipeline.engine.begin() as conn:
            conn.execute(text(statement))
    assert len(audit_rows(pipeline)) == 4


def test_login_stores_the_session_key_encrypted_and_is_audited(clean_audit: Pipeline) -> None:
    pipeline = clean_audit
    pipeline.start_worker()
    js_code, openid = pipeline.sandbox.mint_login_code(APPID, openid="oSecureLogin1", unionid="uSecure1")
    task_id = pipeline.celery.send_task(
        "wxphone.login", kwargs={"appid": APPID, "js_code": js_code, "caller": "mp-login"}, queue="wxphone"
    )
    assert task_id.get(timeout=30)["status"] == "succeeded"
    row = user_row(pipeline, APPID, openid)
    assert row is not None and row["session_key_encrypted"].startswith("dev:")
    session_key = pipeline.producer.protection.cipher.decrypt(
        row["session_key_encrypted"], context=users_context("session_key", APPID, openid)
    )
    assert len(base64.b64decode(session_key)) == 16  # an AES-128 key, as WeChat's
    [audit] = audit_rows(pipeline, api="login")
    assert (audit["appid"], audit["openid"], audit["job_id"], audit["outcome"], audit["caller"]) == (
        APPID,
        openid,
        task_id.id,
        "succeeded",
        "mp-login",
    )
    assert js_code not in json.dumps(audit, default=str)


def test_user_find_and_keys_commands(pipeline: Pipeline) -> None:
    pipeline.start_worker()
    number = "13600136000"
    code = pipeline.sandbox.mint_phone_code(APPID, phone_number=number, pure_phone_number=number)
    assert pipeline.wait_for_job(pipeline.submit(APPID, "oFindMe000001", code)).status == "succeeded"

    found = run_cli(pipeline, "user", "find", "--phone", number, "--json")
    assert found.returncode == 0, found.stderr
    [user] = json.loads(found.stdout)
    assert (user["openid"], user["phone_number"]) == ("oFindMe000001", number)
    plain = run_cli(pipeline, "user", "find", "--phone", "+86" + number, "--appid", APPID)
    assert plain.returncode == 0 and "oFindMe000001" in plain.stdout
    missing = run_cli(pipeline, "user", "find", "--phone", "13600136001")
    assert missing.returncode != 0 and "no user with that phone number" in missing.stderr
    assert number not in missing.stderr
    assert (
        run_cli(pipeline, "user", "find", "--phone", number, "--appid", OTHER_APPID, "--json").stdout.strip()
        == "[]"
    )

    status = run_cli(pipeline, "keys", "status")
    assert status.returncode == 0, status.stderr
    assert "current key version: dev" in status.stdout and "dev: 1" in status.stdout


def keyed_producer(pipeline: Pipeline, keys: str, version: str) -> Producer:
    protection = DataProtection(
        FieldCipher(parse_encryption_keys(keys), version), BlindIndex(BLIND_INDEX_KEY)
    )
    return Producer(
        sessions=pipeline.sessions,
        celery_app=pipeline.celery,
        protection=protection,
    )


@pytest.mark.slow
def test_keys_rotate_re_encrypts_every_row_while_workers_write(pipeline: Pipeline) -> None:
    pipeline.settings.update(encryption_keys=KEY_1, blind_index_key=BLIND_INDEX_KEY)
    first = pipeline.start_worker("old-keys")
    numbers = [f"1370000{index:04d}" for index in range(40)]
    codes = [
        pipeline.sandbox.mint_phone_code(APPID, phone_number=number, pure_phone_number=number)
        for number in numbers
    ]
    for index in range(5):  # users with a session_key too
        js_code, _ = pipeline.sandbox.mint_login_code(APPID, openid=f"oRotate{index:06d}")
        login = pipeline.celery.send_task(
            "wxphone.login", kwargs={"appid": APPID, "js_code": js_code}, queue="wxphone"
        )
        assert login.get(timeout=30)["status"] == "succeeded"
    ids = [pipeline.submit(APPID, f"oRotate{index:06d}", code) for index, code in enumerate(codes[:20])]
    pipeline.wait_for_jobs(ids)

    # Deploy v2 to the workers (v1 still listed to read old rows), then rotate while they write.
    first.stop()
    pipeline.processes.remove(first)
    pipeline.settings.update(encryption_keys=f"{KEY_1},{KEY_2}")
    pipeline.start_worker("new-keys")
    later = [pipeline.submit(APPID, f"oRotate{index:06d}", code) for index, code in enumerate(codes[20:], 20)]
    rotation: dict[str, subprocess.CompletedProcess[str]] = {}
    runner = threading.Thread(
        target=lambda: rotation.setdefault("run", run_cli(pipeline, "keys", "rotate", "--batch-size", "3"))
    )
    runner.start()
    pipeline.wait_for_jobs(later)
    runner.join(timeout=60)
    result = rotation["run"]
    assert result.returncode in (0, 1), result.stderr  # 1: a row was busy; run it again
    again = run_cli(pipeline, "keys", "rotate")
    assert again.returncode == 0, again.stderr
    assert "re-encrypted" in result.stdout and "batch" in result.stdout

    status = run_cli(pipeline, "keys", "status")
    assert "current key version: v2" in status.stdout and "v1:" not in status.stdout
    with pipeline.engine.connect() as conn:
        stored = conn.execute(
            text(
                "SELECT phone_number_encrypted, pure_phone_number_encrypted, session_key_encrypted FROM users"
            )
        ).all()
    ciphertexts = [value for row in stored for value in row if value is not None]
    assert len(ciphertexts) == 40 * 2 + 5 and all(value.startswith("v2:") for value in ciphertexts)

    # Only v2 is needed now; every number reads back, and lookups still work.
    producer = keyed_producer(pipeline, KEY_2, "v2")
    for index, number in enumerate(numbers):
        user = producer.get_user(appid=APPID, openid=f"oRotate{index:06d}")
        assert user is not None and user.phone_number == number
    assert [user.openid for user in producer.find_users_by_phone(phone_number=numbers[7])] == [
        "oRotate000007"
    ]
    # Idempotent.
    assert "done: 0 rows re-encrypted" in run_cli(pipeline, "keys", "rotate").stdout
