"""A misconfigured worker exits at start-up, before it consumes anything, saying what to fix.

* Against a WeChat API base that is not on loopback, without keys of its own: it names the
  variables, instead of protecting real numbers with the public development keys.
* On a database whose schema is not the one the code expects: it names ``wxphone db upgrade``.

Both as ``wxphone worker`` and as the Celery application started directly (which used to log the
refusal and start anyway).
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
from sqlalchemy import text

from tests.conftest import RedisUrls
from tests.support.processes import WXPHONE, ManagedProcess, base_environment
from tests.support.services import create_database, drop_database
from tests.support.waiting import wait_for
from worker.db import make_engine

REAL_SECRET = "a1b2c3d4e5f6a7b8c9d0e1f2a3b4c5d6"
COMMANDS = {
    "wxphone worker": [*WXPHONE, "worker", "--concurrency", "1"],
    # The Celery application started directly refuses too.
    "celery -A worker.app worker": [sys.executable, "-m", "celery", "-A", "worker.app", "worker", "-c", "1"],
}


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_a_worker_without_keys_against_a_non_loopback_base_exits_naming_the_variables(
    command: str, redis_urls: RedisUrls, migrated_database_url: str, log_dir: Path
) -> None:
    # Everything else a worker needs is there: without the refusal it would start consuming.
    env = base_environment(
        apps=f"wxstartup0000001:{REAL_SECRET}",
        wechat_api_base="https://api2.weixin.qq.com",
        broker_url=redis_urls.broker_url,
        redis_url=redis_urls.redis_url,
        database_url=migrated_database_url,
    )
    process = ManagedProcess(command, COMMANDS[command], env, log_dir / "worker.log").start()
    try:
        wait_for(lambda: not process.is_running(), timeout_seconds=60, what=f"{command} to exit")
        assert process.process is not None and process.process.returncode != 0
        output = process.output()
        for name in ("WXPHONE_ENCRYPTION_KEYS", "WXPHONE_BLIND_INDEX_KEY", "WXPHONE_FINGERPRINT_KEY"):
            assert name in output, output[-2000:]
        assert "ready." not in output
        assert REAL_SECRET not in output
    finally:
        process.stop()


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_a_worker_on_a_database_not_at_the_expected_schema_exits_naming_the_fix(
    command: str, redis_urls: RedisUrls, log_dir: Path
) -> None:
    empty_database = create_database()
    env = base_environment(
        apps="wxstartup0000001:sandbox-secret",
        wechat_api_base="http://127.0.0.1:9",
        broker_url=redis_urls.broker_url,
        redis_url=redis_urls.redis_url,
        database_url=empty_database,
    )
    process = ManagedProcess(command, COMMANDS[command], env, log_dir / "worker.log").start()
    try:
        wait_for(lambda: not process.is_running(), timeout_seconds=60, what=f"{command} to exit")
        assert process.process is not None and process.process.returncode != 0
        assert "run `wxphone db upgrade`" in process.output()
        assert "ready." not in process.output()
    finally:
        process.stop()
        drop_database(empty_database)


def test_a_worker_in_development_mode_off_loopback_starts_and_warns(
    redis_urls: RedisUrls, migrated_database_url: str, log_dir: Path
) -> None:
    """A sandbox on another host (a container's name): development keys, placeholder secrets, and
    a WARNING in the worker's log."""
    env = base_environment(
        apps="wxstartup0000001:sandbox-secret",
        wechat_api_base="http://sandbox.internal.example:8780",
        development_mode="true",
        broker_url=redis_urls.broker_url,
        redis_url=redis_urls.redis_url,
        database_url=migrated_database_url,
    )
    # The session database's shared-key checks were recorded by other tests' workers.
    forget_key_checks(migrated_database_url)
    process = ManagedProcess("worker", COMMANDS["wxphone worker"], env, log_dir / "worker.log").start()
    try:
        process.wait_for_output("ready.", timeout_seconds=60)
        warnings = [
            line for line in process.output().splitlines() if "WXPHONE_DEVELOPMENT_MODE is on" in line
        ]
        assert len(warnings) == 1 and " WARNING " in warnings[0], warnings
    finally:
        process.stop()


def forget_key_checks(database_url: str) -> None:
    engine = make_engine(database_url)
    try:
        with engine.begin() as conn:
            conn.execute(text("TRUNCATE key_checks"))
    finally:
        engine.dispose()
