"""Redaction proven end to end: after a DEBUG-level run through every path, no secret, token, code,
session_key or phone number appears in any log, task result, Redis key or value, database text
column or exception message.

The flow: happy path over two apps (a mainland and an international number), a duplicate
submission, an invalid code, a busy reply and its retry, a login with unionid, a token revoked
mid-run, and bad input sent by name. Access tokens are captured from the token store while the
flow runs; session_keys are recovered by decrypting the users rows afterwards (the sandbox does
not expose them), and token- and session_key-shaped values are looked for in the logs as well.
"""

from __future__ import annotations

import base64
import binascii
import json
import re
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
from sqlalchemy import text

from tests.support.pipeline import APPS, FAST_RETRY_SETTINGS, Pipeline
from tests.support.processes import ManagedProcess
from worker.crypto import users_context
from worker.jobs.validation import InvalidInputError

APPID, OTHER_APPID = sorted(APPS)
#: Sandbox access tokens: two digits, an underscore and 128 URL-safe characters.
TOKEN_SHAPE = re.compile(r"\d{2}_[A-Za-z0-9_-]{100,}")
#: A session_key is a base64-encoded 16-byte AES key: 22 characters and "==".
SESSION_KEY_SHAPE = re.compile(r"(?<![A-Za-z0-9+/])[A-Za-z0-9+/]{22}==")
#: Kombu's Redis transport keeps message bodies base64-encoded inside JSON.
B64_BODY = re.compile(r'"body":\s*"([A-Za-z0-9+/=]+)"')


class TokenWatcher:
    """Records every access token that appears in the token store while the flow runs."""

    def __init__(self, redis_url: str) -> None:
        self.client = redis.Redis.from_url(redis_url, decode_responses=True)
        self.tokens: set[str] = set()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.poll()
            self._stop.wait(0.02)

    def poll(self) -> None:
        for key in self.client.scan_iter("wxphone:token:*"):
            if self.client.type(key) == "hash":
                value = self.client.hget(key, "value")
                if value:
                    self.tokens.add(as_text(value))

    def __enter__(self) -> TokenWatcher:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        self.poll()
        self.client.close()


def as_text(value: object) -> str:
    return value.decode(errors="replace") if isinstance(value, bytes) else str(value)


def redis_texts(url: str, *, skip_token_values: bool) -> Iterator[tuple[str, str]]:
    """(where, text) for every key and value of one Redis database, message bodies decoded."""
    client = redis.Redis.from_url(url)
    try:
        for raw_key in client.scan_iter("*"):
            key = as_text(raw_key)
            yield f"key {key}", key
            kind = as_text(client.type(raw_key))
            values: list[object] = []
            if kind == "string":
                values = [client.get(raw_key)]
            elif kind == "hash":
                if skip_token_values and key.startswith("wxphone:token:"):
                    continue  # holds the token by design
                for pair in client.hgetall(raw_key).items():
                    values += list(pair)
            elif kind == "list":
                values = list(client.lrange(raw_key, 0, -1))
            elif kind == "set":
                values = list(client.smembers(raw_key))
            elif kind == "zset":
                values = list(client.zrange(raw_key, 0, -1))
            for item in values:
                decoded = as_text(item)
                yield f"value of {key}", decoded
                for body in B64_BODY.findall(decoded):
                    try:
                        decoded_body = base64.b64decode(body).decode(errors="replace")
                    except (binascii.Error, ValueError):
                        continue
                    yield f"message body in {key}", decoded_body
    finally:
        client.close()


def database_texts(pipeline: Pipeline) -> Iterator[tuple[str, str]]:
    with pipeline.engine.connect() as conn:
        for table in ("users", "phone_jobs", "code_claims", "exchange_audit"):
            rows = conn.execute(text(f"SELECT * FROM {table}")).mappings().all()
            yield f"table {table}", json.dumps([dict(row) for row in rows], default=str)


@pytest.mark.slow
def test_nothing_sensitive_reaches_logs_results_redis_or_errors(
    pipeline: Pipeline, sandbox_server: ManagedProcess
) -> None:
    pipeline.settings.update(FAST_RETRY_SETTINGS, log_level="DEBUG")
    pipeline.start_worker("w1")
    pipeline.start_beat()
    exceptions: list[str] = []
    numbers: dict[str, tuple[str, str]] = {}  # openid -> (phoneNumber, purePhoneNumber)
    phone_codes: list[str] = []
    login_codes: list[str] = []

    def mint(appid: str, openid: str, phone: str, pure: str, country_code: str = "86") -> str:
        code = pipeline.sandbox.mint_phone_code(
            appid, phone_number=phone, pure_phone_number=pure, country_code=country_code
        )
        numbers[openid] = (phone, pure)
        phone_codes.append(code)
        return code

    with TokenWatcher(pipeline.redis_url) as watcher:
        # Happy path over two apps, one international number.
        happy = [
            pipeline.submit(
                APPID, "oRedact000001", mint(APPID, "oRedact000001", "13812345678", "13812345678")
            ),
            pipeline.submit(
                OTHER_APPID,
                "oRedact000002",
                mint(OTHER_APPID, "oRedact000002", "+85298765432", "98765432", country_code="852"),
            ),
        ]
        # A duplicate submission of one code.
        duplicate_code = mint(APPID, "oRedact000003", "13923456789", "13923456789")
        duplicates = [pipeline.submit(APPID, "oRedact000003", duplicate_code) for _ in range(2)]
        # An invalid code.
        invalid = pipeline.submit(APPID, "oRedact000004", "never-issued-Redact-code-000000001")
        phone_codes.append("never-issued-Redact-code-000000001")
        # WeChat busy once: the job is retried.
        pipeline.sandbox.inject_fault("phone", errcode=-1)
        busy = pipeline.submit(
            APPID, "oRedact000005", mint(APPID, "oRedact000005", "15034567890", "15034567890")
        )
        for job in pipeline.wait_for_jobs([*happy, *duplicates, busy]):
            assert job.status == "succeeded", job
        assert pipeline.wait_for_job(invalid).error_code == "invalid_code"

        # A login with unionid.
        js_code, login_openid = pipeline.sandbox.mint_login_code(
            APPID, openid="oRedactLogin1", unionid="uRedact1"
        )
        login_codes.append(js_code)
        login = pipeline.celery.send_task(
            "wxphone.login", kwargs={"appid": APPID, "js_code": js_code}, queue="wxphone"
        )
        assert login.get(timeout=30)["status"] == "succeeded"

        # A token revoked mid-run: the next job gets 40001, one refresh, then succeeds.
        watcher.poll()
        assert pipeline.sandbox.revoke_tokens(APPID) >= 1
        revoked = pipeline.submit(
            APPID, "oRedact000006", mint(APPID, "oRedact000006", "18045678901", "18045678901")
        )
        assert pipeline.wait_for_job(revoked).status == "succeeded"

        # Bad input, by name (any Celery client) and through the producer.
        spare = mint(APPID, "oRedactSpare1", "17056789012", "17056789012")
        bad_inputs = [
            {"appid": "wx bad appid", "openid": "oRedact000007", "code": spare},
            {"appid": APPID, "openid": "o" * 500, "code": spare},
            {"appid": APPID, "openid": "oRedact000008", "code": "has space 17056789012"},
            {"appid": APPID, "openid": "oRedact000009", "code": 17056789012},
            {"appid": APPID, "openid": "oRedact000010"},
            {"appid": APPID, "openid": "oRedact000011", "code": spare + "\n" + pipeline.sandbox.base_url},
        ]
        results = [
            pipeline.celery.send_task("wxphone.resolve_phone", kwargs=kwargs, queue="wxphone")
            for kwargs in bad_inputs
        ]
        for result in results:
            outcome = result.get(timeout=30)
            assert (outcome["status"], outcome["error_code"]) == ("failed", "invalid_input")
        for code in ("has space " + spare, spare + "\x00", "x" * 200 + spare):
            with pytest.raises(InvalidInputError) as raised:
                pipeline.producer.submit_phone_code(appid=APPID, openid="oRedact000012", code=code)
            exceptions.append(str(raised.value) + repr(raised.value))

    # Every exchange is done; stop the processes so their logs are complete.
    pipeline.stop_all()

    # session_keys: decrypt them from the users rows (their only copy outside the sandbox).
    with pipeline.engine.connect() as conn:
        stored = conn.execute(
            text(
                "SELECT appid, openid, session_key_encrypted FROM users "
                "WHERE session_key_encrypted IS NOT NULL"
            )
        ).all()
    cipher = pipeline.producer.protection.cipher
    session_keys = [
        cipher.decrypt(value, context=users_context("session_key", appid, openid))
        for appid, openid, value in stored
    ]
    assert [openid for _, openid, _ in stored] == [login_openid] and len(session_keys) == 1

    assert len(watcher.tokens) >= 2  # the first token of each app, and the one after the revocation
    secrets: dict[str, str] = {}
    for appid, secret in APPS.items():
        secrets[secret] = f"AppSecret of {appid}"
    for token in watcher.tokens:
        secrets[token] = "access token"
    for code in phone_codes:
        secrets[code] = "phone code"
    for code in login_codes:
        secrets[code] = "login code"
    for key in session_keys:
        secrets[key] = "session_key"
    for openid, (phone, pure) in numbers.items():
        secrets[phone] = f"phoneNumber of {openid}"
        secrets[pure] = f"purePhoneNumber of {openid}"

    logs: list[tuple[str, str]] = [
        (f"log {path.name}", path.read_text(errors="replace"))
        for path in sorted(Path(pipeline.log_dir).glob("*"))
    ]
    logs.append((f"log {sandbox_server.log_path.name}", sandbox_server.output()))
    assert any("DEBUG" in content for _, content in logs), "the worker did not log at DEBUG"
    corpus = [
        *logs,
        *redis_texts(pipeline.broker_url, skip_token_values=False),
        *redis_texts(pipeline.redis_url, skip_token_values=True),
        *database_texts(pipeline),
        *(("exception", text_) for text_ in exceptions),
    ]
    assert any(where.startswith("value of celery-task-meta-") for where, _ in corpus), "no task results seen"

    hits = [
        f"{label} in {where}"
        for where, content in corpus
        for secret, label in secrets.items()
        if secret in content
    ]
    for where, content in logs:
        hits += [f"token-shaped value in {where}" for _ in TOKEN_SHAPE.findall(content)]
        hits += [f"session_key-shaped value in {where}" for _ in SESSION_KEY_SHAPE.findall(content)]
    assert hits == []
