"""``wxphone doctor`` finds what breaks delivery guarantees, and passes a healthy deployment."""

from __future__ import annotations

import base64
import json
import os
import subprocess
from pathlib import Path
from typing import Any

from kombu.connection import Connection
from kombu.entity import Queue

from tests.support.processes import WXPHONE, base_environment
from tests.support.rabbitmq import MakeRabbitMQServer
from tests.support.services import RedisServer, create_database, drop_database
from worker.doctor import _check_rabbitmq


def run_doctor(**settings: object) -> tuple[int, dict[str, dict[str, str]]]:
    completed = subprocess.run(
        [*WXPHONE, "doctor", "--json"],
        env=base_environment(**settings),
        capture_output=True,
        text=True,
        timeout=60,
    )
    findings = {entry["check"]: entry for entry in json.loads(completed.stdout)}
    return completed.returncode, findings


def test_doctor_passes_a_healthy_deployment_and_fails_each_broken_part(
    tmp_path: Path, migrated_database_url: str
) -> None:
    durable = RedisServer(tmp_path / "durable", appendonly=True)
    volatile = RedisServer(tmp_path / "volatile", appendonly=False)
    durable.start()
    volatile.start()
    empty_database = create_database()
    try:
        healthy = {
            "apps": "wxdoctor00000001:doctor-secret-1",
            "broker_url": durable.url(0),
            "redis_url": durable.url(1),
            "database_url": migrated_database_url,
            "wechat_api_base": "http://127.0.0.1:9",
        }
        code, findings = run_doctor(**healthy)
        assert code == 0, findings
        assert findings["broker persistence"]["verdict"] == "ok"
        assert findings["WeChat API"]["verdict"] == "warn"  # a sandbox, not WeChat

        code, findings = run_doctor(**{**healthy, "broker_url": volatile.url(0)})
        assert code == 1
        assert findings["broker persistence"]["verdict"] == "fail"

        with durable.client() as conn:
            conn.config_set("maxmemory-policy", "allkeys-lru")
        code, findings = run_doctor(**healthy)
        assert code == 1
        assert findings["broker eviction"]["verdict"] == "fail"
        with durable.client() as conn:
            conn.config_set("maxmemory-policy", "noeviction")

        code, findings = run_doctor(**{**healthy, "database_url": empty_database})
        assert code == 1
        assert "wxphone db upgrade" in findings["database schema"]["detail"]

        code, findings = run_doctor(**{**healthy, "apps": None})
        assert code == 1
        assert findings["apps"]["verdict"] == "fail"

        volatile.stop()
        code, findings = run_doctor(**{**healthy, "redis_url": volatile.url(1)})
        assert code == 1
        assert findings["token store"]["verdict"] == "fail"
    finally:
        durable.stop()
        volatile.stop()
        drop_database(empty_database)


def test_doctor_requires_persistence_and_noeviction_on_the_token_store_redis(
    tmp_path: Path, migrated_database_url: str
) -> None:
    """The token store (WXPHONE_REDIS_URL) holds fence counters, the force-refresh budget, 45009
    circuits and the RedBeat lock: losing them on a restart is as bad as losing the queue."""
    durable = RedisServer(tmp_path / "durable", appendonly=True)
    volatile = RedisServer(tmp_path / "volatile", appendonly=False)
    durable.start()
    volatile.start()
    try:
        healthy = {
            "apps": "wxdoctor00000001:doctor-secret-1",
            "broker_url": durable.url(0),
            "redis_url": durable.url(1),
            "database_url": migrated_database_url,
            "wechat_api_base": "http://127.0.0.1:9",
        }
        code, findings = run_doctor(**healthy)
        assert code == 0, findings
        assert findings["token store persistence"]["verdict"] == "ok"
        assert findings["token store eviction"]["verdict"] == "ok"

        code, findings = run_doctor(**{**healthy, "redis_url": volatile.url(1)})
        assert code == 1
        assert findings["broker persistence"]["verdict"] == "ok"
        assert findings["token store persistence"]["verdict"] == "fail"
        assert "appendonly" in findings["token store persistence"]["detail"]

        with volatile.client() as conn:
            conn.config_set("appendonly", "yes")
            conn.config_set("maxmemory-policy", "volatile-lru")
        code, findings = run_doctor(**{**healthy, "redis_url": volatile.url(1)})
        assert code == 1
        assert findings["token store persistence"]["verdict"] == "ok"
        assert findings["token store eviction"]["verdict"] == "fail"
    finally:
        durable.stop()
        volatile.stop()


def test_doctor_names_missing_keys_wherever_development_keys_are_not_allowed(
    tmp_path: Path, migrated_database_url: str
) -> None:
    durable = RedisServer(tmp_path / "durable", appendonly=True)
    durable.start()
    try:
        base = {
            "apps": "wxdoctor00000001:a1b2c3d4e5f6a7b8c9d0e1f2a3b4c5d6",
            "broker_url": durable.url(0),
            "redis_url": durable.url(1),
            "database_url": migrated_database_url,
        }
        # A gateway may lead to the real WeChat: the keys are required.
        code, findings = run_doctor(**base, wechat_api_base="https://wechat-gw.internal.example")
        assert code == 1
        assert findings["keys"]["verdict"] == "fail"
        for name in ("WXPHONE_ENCRYPTION_KEYS", "WXPHONE_BLIND_INDEX_KEY", "WXPHONE_FINGERPRINT_KEY"):
            assert name in findings["keys"]["detail"]

        keys = {
            "encryption_keys": "v1:" + base64.b64encode(os.urandom(32)).decode(),
            "blind_index_key": "blind-index-key-0123456789abcdef",
            "fingerprint_key": "fingerprint-key-0123456789abcdef",
        }
        code, findings = run_doctor(**base, **keys, wechat_api_base="https://api2.weixin.qq.com")
        assert code == 0, findings
        assert findings["keys"]["verdict"] == "ok"
        assert findings["WeChat API"]["verdict"] == "ok"

        # Development mode: the development keys are accepted, and doctor says so.
        code, findings = run_doctor(
            **base, wechat_api_base="http://sandbox.internal.example:8780", development_mode="true"
        )
        assert code == 0, findings
        assert findings["keys"]["verdict"] == "warn"
        assert findings["WeChat API"]["verdict"] == "warn"
        assert "WXPHONE_DEVELOPMENT_MODE" in findings["WeChat API"]["detail"]
    finally:
        durable.stop()


def test_doctor_checks_a_rabbitmq_broker_and_refuses_a_queue_plain_producers_cannot_declare(
    tmp_path: Path, migrated_database_url: str, rabbitmq_url: str
) -> None:
    durable = RedisServer(tmp_path / "durable", appendonly=True)
    durable.start()
    try:
        healthy = {
            "apps": "wxdoctor00000001:doctor-secret-1",
            "broker_url": rabbitmq_url,
            "redis_url": durable.url(1),
            "database_url": migrated_database_url,
            "wechat_api_base": "http://127.0.0.1:9",
        }
        code, findings = run_doctor(**healthy)
        assert code == 0, findings
        assert findings["broker"]["verdict"] == "ok"
        assert "RabbitMQ" in findings["broker"]["detail"]
        assert "guest:guest" not in json.dumps(findings)  # the password is masked
        assert findings["broker queue wxphone"]["verdict"] == "ok"
        assert "consumer_timeout" in findings["delivery"]["detail"]

        # A quorum queue of the job queue's name: every plain Celery producer's declaration of
        # queue "wxphone" (durable, no arguments) would fail with PRECONDITION_FAILED.
        declare_quorum_queue(rabbitmq_url, "wxphone")
        code, findings = run_doctor(**healthy)
        assert code == 1
        assert findings["broker queue wxphone"]["verdict"] == "fail"
        assert "classic" in findings["broker queue wxphone"]["detail"]

        code, findings = run_doctor(**{**healthy, "broker_url": "amqp://guest:guest@127.0.0.1:9//"})
        assert code == 1
        assert findings["broker"]["verdict"] == "fail"
    finally:
        durable.stop()


def declare_quorum_queue(url: str, name: str) -> None:
    connect: Any = Connection  # kombu is untyped
    queue: Any = Queue
    with connect(url) as connection:
        queue(
            name, channel=connection.channel(), durable=True, queue_arguments={"x-queue-type": "quorum"}
        ).declare()


def test_doctor_fails_a_job_queue_another_connection_holds_exclusively(
    make_rabbitmq_server: MakeRabbitMQServer,
) -> None:
    # Every worker's and producer's declaration of "wxphone" fails with RESOURCE_LOCKED.
    server = make_rabbitmq_server()
    with server.connection() as holder:
        holder.default_channel.queue_declare(queue="wxphone", durable=False, exclusive=True)
        findings = {each.check: each for each in _check_rabbitmq(server.url())}
    assert findings["broker queue wxphone"].verdict == "fail"
    assert "exclusive" in findings["broker queue wxphone"].detail


def test_doctor_names_missing_permissions_instead_of_advising_to_delete_the_queue(
    make_rabbitmq_server: MakeRabbitMQServer,
) -> None:
    server = make_rabbitmq_server()
    with server.connection() as admin:
        admin.default_channel.queue_declare(queue="wxphone", durable=True)
    server.rabbitmqctl("add_user", "limited", "limited-password")
    server.rabbitmqctl("set_permissions", "-p", "/", "limited", "^nothing$", "^nothing$", "^nothing$")
    findings = {
        each.check: each
        for each in _check_rabbitmq(server.url().replace("guest:guest", "limited:limited-password"))
    }
    assert findings["broker"].verdict == "ok"
    assert findings["broker queue wxphone"].verdict == "fail"
    assert "ACCESS_REFUSED" in findings["broker queue wxphone"].detail
    assert "delete" not in findings["broker queue wxphone"].detail
