"""worker.localservices: reuse a running server, start a private one, or say what to install.

Never touches the machine's shared servers: "absent" servers are probed on closed ports,
"absent" programs are simulated with empty search folders, and only servers these tests start
are stopped.
"""

from __future__ import annotations

import os
import shutil
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
from sqlalchemy.engine import make_url

from tests.support.services import POSTGRES_ADMIN_URL, RedisServer, free_port
from worker.localservices import (
    INSTALL_POSTGRES,
    INSTALL_REDIS,
    LocalServices,
    NotInstalledError,
    PostgresInstance,
    Programs,
    RedisInstance,
    ServiceError,
    ensure_postgres,
    ensure_redis,
    find_private_redis,
    postgres_answers,
    redis_answers,
    stop,
)


@pytest.fixture
def closed_port() -> int:
    """A port on 127.0.0.1 where nothing listens (it was free a moment ago)."""
    return free_port()


@pytest.fixture
def no_programs(tmp_path: Path) -> Programs:
    """A search path and PostgreSQL folder with no programs in them."""
    empty = tmp_path / "empty"
    empty.mkdir()
    return Programs(search_path=str(empty), postgres_lib_dir=empty)


@pytest.fixture
def redis_binary_only(tmp_path: Path) -> Programs:
    """Programs that find redis-server (the real one) and nothing else."""
    binary = shutil.which("redis-server")
    assert binary, "the tests need redis-server"
    folder = tmp_path / "bin"
    folder.mkdir()
    (folder / "redis-server").symlink_to(binary)
    return Programs(search_path=str(folder), postgres_lib_dir=tmp_path / "no-postgres")


# -- what to install -----------------------------------------------------------------------------


def test_without_a_server_or_redis_server_the_error_is_the_apt_command(
    tmp_path: Path, closed_port: int, no_programs: Programs
) -> None:
    with pytest.raises(NotInstalledError) as raised:
        ensure_redis(tmp_path / "state", probe_port=closed_port, programs=no_programs)
    assert str(raised.value) == INSTALL_REDIS == "sudo apt-get install -y redis-server"
    assert raised.value.service == "redis"
    assert str(closed_port) in raised.value.reason
    assert not (tmp_path / "state").exists(), "nothing is created when nothing can start"


def test_without_a_server_or_postgresql_binaries_the_error_is_the_apt_command(
    tmp_path: Path, closed_port: int, no_programs: Programs
) -> None:
    with pytest.raises(NotInstalledError) as raised:
        ensure_postgres(tmp_path / "state", probe_port=closed_port, programs=no_programs)
    assert str(raised.value) == INSTALL_POSTGRES == "sudo apt-get install -y postgresql"
    assert raised.value.service == "postgres"


def _fake_program(path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("#!/bin/sh\nexit 0\n")
    path.chmod(path.stat().st_mode | stat.S_IXUSR)


def test_the_newest_complete_postgresql_version_is_chosen(tmp_path: Path) -> None:
    lib = tmp_path / "lib"
    for version, programs in {
        "9.6": ("initdb", "pg_ctl", "postgres"),
        "13": ("initdb", "pg_ctl", "postgres"),
        "15": ("initdb", "pg_ctl", "postgres"),
        "16": ("pg_ctl",),  # a client-only or broken install does not count
    }.items():
        for name in programs:
            _fake_program(lib / version / "bin" / name)
    assert (
        Programs(search_path=str(tmp_path / "none"), postgres_lib_dir=lib).postgres_bin_dir()
        == lib / "15" / "bin"
    )


# -- reuse -----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def running_redis(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path_factory.mktemp("reused-redis"))
    server.start()
    yield server
    server.stop()


def test_a_redis_that_answers_is_reused_and_nothing_is_started(
    tmp_path: Path, running_redis: RedisServer, no_programs: Programs
) -> None:
    instance = ensure_redis(tmp_path, probe_port=running_redis.port, programs=no_programs)
    assert instance == RedisInstance("127.0.0.1", running_redis.port)
    assert not instance.started and not instance.private
    assert instance.url(3) == f"redis://127.0.0.1:{running_redis.port}/3"


def test_a_postgresql_that_answers_is_reused_and_nothing_is_started(
    tmp_path: Path, no_programs: Programs
) -> None:
    url = make_url(POSTGRES_ADMIN_URL)
    if url.username != "postgres" or url.password:
        pytest.skip("the test server is not reachable as postgres without a password")
    instance = ensure_postgres(
        tmp_path, probe_host=url.host or "127.0.0.1", probe_port=url.port or 5432, programs=no_programs
    )
    assert not instance.started and not instance.private
    assert postgres_answers(instance.admin_url)
    assert instance.url("wxphone_demo").endswith(f":{url.port or 5432}/wxphone_demo")


def test_a_given_admin_url_is_used_as_it_is(tmp_path: Path, no_programs: Programs) -> None:
    given = "postgresql+psycopg://someone:pw@db.example:6543/postgres"
    instance = ensure_postgres(tmp_path, admin_url=given, programs=no_programs)
    assert instance == PostgresInstance(given)
    assert instance.url("wxphone") == "postgresql+psycopg://someone:pw@db.example:6543/wxphone"


def test_a_server_not_ours_is_never_stopped(running_redis: RedisServer) -> None:
    with pytest.raises(ServiceError, match="not a private server"):
        stop(RedisInstance("127.0.0.1", running_redis.port))
    with pytest.raises(ServiceError, match="not a private server"):
        stop(PostgresInstance("postgresql+psycopg://postgres@127.0.0.1:5432/postgres"))
    assert redis_answers("127.0.0.1", running_redis.port)


# -- a private Redis -----------------------------------------------------------------------------


def test_a_private_redis_is_started_on_its_port_reused_and_stopped(
    tmp_path: Path, closed_port: int, redis_binary_only: Programs
) -> None:
    state = tmp_path / "state"
    private_port = free_port()
    instance = ensure_redis(
        state, probe_port=closed_port, private_port=private_port, programs=redis_binary_only
    )
    try:
        assert instance.started and instance.private
        assert instance.port == private_port and instance.directory == state.absolute() / "redis"
        assert redis_answers("127.0.0.1", private_port)
        # Durable settings, as for a development queue that must not lose jobs.
        client = redis.Redis(port=private_port)
        try:
            assert client.config_get("appendonly")["appendonly"] == "yes"
            assert client.config_get("maxmemory-policy")["maxmemory-policy"] == "noeviction"
        finally:
            client.close()

        again = ensure_redis(
            state, probe_port=closed_port, private_port=private_port, programs=redis_binary_only
        )
        assert again.port == private_port and not again.started, "a running private server is reused"
        assert find_private_redis(state, port=private_port) == RedisInstance(
            "127.0.0.1", private_port, directory=state.absolute() / "redis"
        )
    finally:
        stop(instance)
    assert not redis_answers("127.0.0.1", private_port)
    assert find_private_redis(state, port=private_port) is None


def test_a_private_port_taken_by_another_server_is_an_error(
    tmp_path: Path, closed_port: int, running_redis: RedisServer, redis_binary_only: Programs
) -> None:
    with pytest.raises(ServiceError, match=f"port {running_redis.port} is taken"):
        ensure_redis(
            tmp_path, probe_port=closed_port, private_port=running_redis.port, programs=redis_binary_only
        )
    assert redis_answers("127.0.0.1", running_redis.port)


def test_a_stale_pid_file_is_not_mistaken_for_a_private_server(tmp_path: Path) -> None:
    directory = tmp_path / "redis"
    directory.mkdir()
    (directory / "redis.pid").write_text(f"{os.getpid()}\n")  # this pytest process, not a redis-server
    assert find_private_redis(tmp_path, port=free_port()) is None


# -- a private PostgreSQL ------------------------------------------------------------------------


@pytest.mark.slow
def test_a_private_postgresql_is_created_started_and_stopped(tmp_path: Path, closed_port: int) -> None:
    programs = Programs()
    if programs.postgres_bin_dir() is None:
        pytest.skip("no PostgreSQL server programs installed")
    private_port = free_port()
    instance = ensure_postgres(tmp_path / "state", probe_port=closed_port, private_port=private_port)
    assert instance.cluster_dir is not None
    try:
        assert instance.started and instance.private
        assert instance.address == f"127.0.0.1:{private_port}"
        assert postgres_answers(instance.admin_url)
        again = ensure_postgres(tmp_path / "state", probe_port=closed_port, private_port=private_port)
        assert again.cluster_dir == instance.cluster_dir and not again.started
    finally:
        stop(instance)
        assert not postgres_answers(instance.admin_url)
        if instance.cluster_dir.is_relative_to(tmp_path):
            shutil.rmtree(instance.cluster_dir, ignore_errors=True)
        else:  # moved out of reach of the postgres user: a per-checkout folder in the temp directory
            shutil.rmtree(instance.cluster_dir.parent, ignore_errors=True)


# -- exports ---------------------------------------------------------------------------------------


def test_export_lines_keep_the_contract_of_scripts_services() -> None:
    services = LocalServices(
        postgres=PostgresInstance("postgresql+psycopg://postgres@127.0.0.1:55432/postgres", started=True),
        redis=RedisInstance("127.0.0.1", 6379),
        test_postgres_url="postgresql+psycopg://postgres@127.0.0.1:55432/postgres",
        database_url="postgresql+psycopg://postgres@127.0.0.1:55432/wxphone",
        broker_url="redis://127.0.0.1:6379/0",
        redis_url="redis://127.0.0.1:6379/1",
    )
    assert services.export_lines() == [
        "export WXPHONE_TEST_POSTGRES_URL=postgresql+psycopg://postgres@127.0.0.1:55432/postgres",
        "export WXPHONE_DATABASE_URL=postgresql+psycopg://postgres@127.0.0.1:55432/wxphone",
        "export WXPHONE_BROKER_URL=redis://127.0.0.1:6379/0",
        "export WXPHONE_REDIS_URL=redis://127.0.0.1:6379/1",
        "export WXPHONE_SERVICES_STARTED=postgres",
    ]
