"""``wxphone config show`` tells an operator what a process runs with, and never a secret."""

from __future__ import annotations

import json
import os
import subprocess
import sys

SECRETS = {
    "WXPHONE_APPS": "wxconfig00000001:an-app-secret-0123456789abcdef",
    "WXPHONE_FINGERPRINT_KEY": "a-fingerprint-key-0123456789",
    "WXPHONE_BLIND_INDEX_KEY": "a-blind-index-key-0123456789",
    "WXPHONE_ENCRYPTION_KEYS": "v1:MDEyMzQ1Njc4OWFiY2RlZjAxMjM0NTY3ODlhYmNkZWY=",
    "WXPHONE_DATABASE_URL": "postgresql://wx:a-database-password@db.internal:5432/wxphone",
    "WXPHONE_BROKER_URL": "redis://:a-redis-password@redis.internal:6379/0",
    "WXPHONE_WECHAT_PROXY_URL": "http://user:a-proxy-password@proxy.internal:3128",
}


def show(extra: dict[str, str]) -> subprocess.CompletedProcess[str]:
    env = {key: value for key, value in os.environ.items() if not key.startswith("WXPHONE_")}
    env.update(SECRETS, WXPHONE_WECHAT_API_BASE="http://127.0.0.1:8780", **extra)
    return subprocess.run(
        [sys.executable, "-m", "worker", "config", "show", "--json"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_config_show_prints_the_effective_delivery_settings_without_secrets() -> None:
    done = show({"WXPHONE_VISIBILITY_TIMEOUT_SECONDS": "75"})
    assert done.returncode == 0, done.stderr
    shown = json.loads(done.stdout)
    assert shown["visibility_timeout_seconds"] == 75
    assert shown["celery"]["visibility_timeout"] == 75
    assert shown["celery"]["result_backend_visibility_timeout"] == 75
    assert shown["retry_countdown_max_seconds"] == 30
    assert shown["runner_lease_seconds"] == 20
    assert shown["apps"] == ["wxconfig00000001"]
    assert shown["encryption_keys"] == ["v1"]
    assert shown["fingerprint_key"] == shown["blind_index_key"] == shown["wechat_proxy_url"] == "set"
    assert shown["database_url"] == "postgresql+psycopg://wx:***@db.internal:5432/wxphone"
    assert shown["broker_url"] == "redis://:***@redis.internal:6379/0"
    for name, value in SECRETS.items():
        secret = value.rsplit(":", 1)[-1] if name in {"WXPHONE_APPS", "WXPHONE_ENCRYPTION_KEYS"} else value
        assert secret not in done.stdout, name
    for password in ("a-database-password", "a-redis-password", "a-proxy-password"):
        assert password not in done.stdout


def test_config_show_refuses_timings_that_break_the_code_clock_naming_the_variable() -> None:
    done = show({"WXPHONE_VISIBILITY_TIMEOUT_SECONDS": "600"})
    assert done.returncode == 2
    assert "WXPHONE_VISIBILITY_TIMEOUT_SECONDS" in done.stderr


def test_config_show_with_rabbitmq_shows_its_delivery_options_and_where_results_go() -> None:
    done = show(
        {
            "WXPHONE_BROKER_URL": "amqp://wx:a-rabbit-password@rabbit.internal:5672//",
            "WXPHONE_REDIS_URL": "redis://:a-redis-password@redis.internal:6379/1",
        }
    )
    assert done.returncode == 0, done.stderr
    shown = json.loads(done.stdout)
    assert shown["broker"] == "rabbitmq"
    assert shown["broker_url"] == "amqp://wx:***@rabbit.internal:5672//"
    # Results (a login's openid) go to the token store's Redis: RabbitMQ is no result store.
    assert shown["result_backend_url"] == "redis://:***@redis.internal:6379/1"
    assert shown["celery"]["visibility_timeout"] is None
    assert shown["celery"]["confirm_publish"] is True
    # A vanished host's messages come back after about two missed heartbeats: well inside a
    # code's life.
    assert 2 * shown["celery"]["broker_heartbeat"] < shown["code_lifetime_seconds"] / 4
    assert "a-rabbit-password" not in done.stdout
    assert "a-redis-password" not in done.stdout


def test_config_show_masks_a_password_given_as_a_url_option() -> None:
    done = show({"WXPHONE_BROKER_URL": "amqps://wx@rabbit.internal:5671//?password=an-option-password&ssl=1"})
    assert done.returncode == 0, done.stderr
    assert "an-option-password" not in done.stdout
    assert json.loads(done.stdout)["broker_url"] == "amqps://wx@rabbit.internal:5671//?password=***&ssl=1"
