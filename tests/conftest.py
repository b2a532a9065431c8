"""Shared fixtures: a private Redis, a throwaway PostgreSQL database and a running WeChat sandbox.

Also private RabbitMQ brokers, for tests that run wxphone with RabbitMQ as its Celery broker.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.support.pipeline import Pipeline, running_pipeline
from tests.support.processes import ManagedProcess, base_environment, sandbox_process
from tests.support.rabbitmq import MakeRabbitMQServer, RabbitMQNotInstalled, RabbitMQServer, find_rabbitmq
from tests.support.services import RedisServer, create_database, drop_database, free_port
from worker.db import upgrade_to_head
from worker.sandbox.admin import SandboxAdmin

#: Redis database numbers inside the private test server.
BROKER_DB = 0
TOKEN_STORE_DB = 1


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    """A redis-server private to this test session (tests may kill and restart it)."""
    server = RedisServer(tmp_path_factory.mktemp("redis"))
    server.start()
    yield server
    server.stop()


@dataclass(frozen=True)
class RedisUrls:
    broker_url: str
    redis_url: str


@pytest.fixture
def redis_urls(redis_server: RedisServer) -> RedisUrls:
    """Broker and token-store URLs on the private server, emptied before each test."""
    if not redis_server.process:
        redis_server.start()
    for db in (BROKER_DB, TOKEN_STORE_DB):
        with redis_server.client(db) as conn:
            conn.flushdb()
    return RedisUrls(broker_url=redis_server.url(BROKER_DB), redis_url=redis_server.url(TOKEN_STORE_DB))


def running_in_ci() -> bool:
    """True when the CI variable is set (CI=true): there, a missing service fails the tests."""
    return os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no")


def require_rabbitmq() -> None:
    """Skip the test when RabbitMQ is not installed, printing the install command; in CI, fail it."""
    try:
        find_rabbitmq()
    except RabbitMQNotInstalled as missing:
        if running_in_ci():
            pytest.fail(f"{missing} (CI must run the RabbitMQ tests, so they fail here)", pytrace=False)
        pytest.skip(str(missing))


@pytest.fixture(scope="session")
def rabbitmq_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RabbitMQServer]:
    """A RabbitMQ broker private to this test session, started when a test first asks for it.

    Its management plugin makes emptying it between tests take milliseconds. Tests that stop,
    kill or restart a broker make their own with ``make_rabbitmq_server`` instead.
    """
    require_rabbitmq()
    server = RabbitMQServer(tmp_path_factory.mktemp("rabbitmq"), management=True)
    try:
        server.start()
        yield server
    finally:
        # Also after a failed start (its epmd runs). Nothing in it is kept: remove() kills,
        # where a graceful stop would take five seconds.
        server.remove()


@pytest.fixture
def rabbitmq_url(rabbitmq_server: RabbitMQServer) -> str:
    """The AMQP URL (vhost ``/``) of the session's broker, with no queue or exchange left in it."""
    if not rabbitmq_server.is_running():
        rabbitmq_server.start()
    rabbitmq_server.reset()
    return rabbitmq_server.url()


@pytest.fixture
def make_rabbitmq_server(tmp_path: Path) -> Iterator[MakeRabbitMQServer]:
    """A factory of brokers this test owns (to stop, kill, restart), removed when the test ends.

    ``make_rabbitmq_server()`` returns a started broker with its folder in ``tmp_path``;
    ``start=False`` returns it unstarted; ``management`` and ``port`` go to :class:`RabbitMQServer`.
    """
    require_rabbitmq()
    servers: list[RabbitMQServer] = []

    def make(*, management: bool = False, port: int | None = None, start: bool = True) -> RabbitMQServer:
        server = RabbitMQServer(tmp_path / f"rabbitmq-{len(servers)}", management=management, port=port)
        servers.append(server)
        if start:
            server.start()
        return server

    yield make
    for server in servers:
        server.remove()


@pytest.fixture(scope="session")
def database_url() -> Iterator[str]:
    """An empty PostgreSQL database for this test session, dropped at the end."""
    url = create_database()
    yield url
    drop_database(url)


@pytest.fixture(scope="session")
def sandbox_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ManagedProcess]:
    """One ``wxphone sandbox`` process for the whole session."""
    port = free_port()
    process = sandbox_process(port, base_environment(), tmp_path_factory.mktemp("sandbox")).start()
    admin = SandboxAdmin(f"http://127.0.0.1:{port}")
    admin.wait_until_ready(timeout_seconds=20)
    yield process
    process.stop()


@pytest.fixture
def sandbox(sandbox_server: ManagedProcess) -> SandboxAdmin:
    """The admin client of the session's sandbox, with all state cleared for this test."""
    port = int(sandbox_server.args[sandbox_server.args.index("--port") + 1])
    admin = SandboxAdmin(f"http://127.0.0.1:{port}")
    admin.reset(all=True)
    return admin


@pytest.fixture
def log_dir(tmp_path: Path) -> Path:
    """Where a test's subprocesses write their output."""
    path = tmp_path / "logs"
    path.mkdir()
    return path


@pytest.fixture(scope="session")
def migrated_database_url(database_url: str) -> str:
    """The session database, migrated to head."""
    upgrade_to_head(database_url)
    return database_url


@pytest.fixture(params=["redis"])
def broker(request: pytest.FixtureRequest) -> str:
    """The broker the ``pipeline`` fixture runs on: Redis unless a test parametrizes ``broker``."""
    return str(request.param)


@pytest.fixture
def pipeline(
    migrated_database_url: str,
    redis_urls: RedisUrls,
    sandbox: SandboxAdmin,
    log_dir: Path,
    broker: str,
    request: pytest.FixtureRequest,
) -> Iterator[Pipeline]:
    """A clean wxphone (empty tables, broker, Redis and sandbox) with the apps of
    ``tests.support.pipeline``, on the test's ``broker`` (a private RabbitMQ for ``rabbitmq``;
    the token store is Redis either way).

    Start processes with ``pipeline.start_worker()`` / ``pipeline.start_beat()``; they are
    stopped when the test ends.
    """
    broker_url = redis_urls.broker_url
    if broker == "rabbitmq":
        broker_url = str(request.getfixturevalue("rabbitmq_url"))
    with running_pipeline(
        database_url=migrated_database_url,
        broker_url=broker_url,
        redis_url=redis_urls.redis_url,
        sandbox=sandbox,
        log_dir=log_dir,
    ) as running:
        yield running
