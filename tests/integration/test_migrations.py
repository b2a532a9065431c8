"""The Alembic migrations build exactly the schema the models describe, on a real PostgreSQL."""

from __future__ import annotations

import subprocess
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Connection, Engine, text
from sqlalchemy.engine import make_url

import models
from tests.support.processes import WXPHONE, base_environment
from tests.support.services import POSTGRES_ADMIN_URL, create_database, drop_database, free_port
from worker import db

APP_TABLES = {"users", "phone_jobs", "login_jobs", "code_claims", "exchange_audit", "key_checks"}


@pytest.fixture
def empty_database_url() -> Iterator[str]:
    """A private, empty database (these tests migrate up and down, so they share nothing)."""
    url = create_database("wxphone_migrations")
    yield url
    drop_database(url)


@pytest.fixture
def engine(empty_database_url: str) -> Iterator[Engine]:
    engine = db.make_engine(empty_database_url)
    yield engine
    engine.dispose()


def table_names(engine: Engine) -> set[str]:
    with engine.connect() as connection:
        rows = connection.execute(text("SELECT tablename FROM pg_tables WHERE schemaname = 'public'"))
        return {row[0] for row in rows}


def schema_snapshot(connection: Connection) -> dict[str, set[tuple[Any, ...]]]:
    """Columns, constraints, indexes, triggers and functions of the public schema, as PostgreSQL sees them."""
    queries = {
        "columns": """
            SELECT table_name, column_name, data_type, character_maximum_length, is_nullable,
                   column_default, is_identity, identity_generation
            FROM information_schema.columns
            WHERE table_schema = 'public' AND table_name <> 'alembic_version'""",
        "constraints": """
            SELECT conrelid::regclass::text, conname, pg_get_constraintdef(oid)
            FROM pg_constraint
            WHERE connamespace = 'public'::regnamespace AND conrelid::regclass::text <> 'alembic_version'""",
        "indexes": """
            SELECT tablename, indexname, indexdef FROM pg_indexes
            WHERE schemaname = 'public' AND tablename <> 'alembic_version'""",
        "triggers": """
            SELECT tgrelid::regclass::text, tgname, pg_get_triggerdef(oid)
            FROM pg_trigger WHERE NOT tgisinternal""",
        "functions": """
            SELECT proname, pg_get_functiondef(oid) FROM pg_proc
            WHERE pronamespace = 'public'::regnamespace""",
    }
    return {name: {tuple(row) for row in connection.execute(text(sql))} for name, sql in queries.items()}


def test_there_is_exactly_one_head() -> None:
    scripts = ScriptDirectory.from_config(db.alembic_config())
    assert scripts.get_heads() == [db.head_revision()]


def test_upgrade_from_empty_then_downgrade_to_base_then_upgrade_again(
    empty_database_url: str, engine: Engine
) -> None:
    assert db.current_revision(engine) is None

    assert db.upgrade_to_head(empty_database_url) == db.head_revision()
    assert db.current_revision(engine) == db.head_revision()
    assert table_names(engine) == APP_TABLES | {"alembic_version"}

    assert db.downgrade(empty_database_url, "base") is None
    # Only Alembic's own (now empty) bookkeeping table may remain; no wxphone table or function.
    assert table_names(engine) == {"alembic_version"}
    with engine.connect() as connection:
        assert schema_snapshot(connection) == {
            "columns": set(),
            "constraints": set(),
            "indexes": set(),
            "triggers": set(),
            "functions": set(),
        }

    assert db.upgrade_to_head(empty_database_url) == db.head_revision()
    assert table_names(engine) == APP_TABLES | {"alembic_version"}


def test_every_revision_downgrades_and_upgrades_again(empty_database_url: str, engine: Engine) -> None:
    """Each step's downgrade undoes its upgrade well enough for the upgrade to run again."""
    config = db.alembic_config(empty_database_url)
    scripts = ScriptDirectory.from_config(config)
    for script in reversed(list(scripts.walk_revisions())):
        below = script.down_revision
        assert below is None or isinstance(below, str), "merge revisions need their own test"
        command.upgrade(config, script.revision)
        command.downgrade(config, below or "base")
        assert db.current_revision(engine) == below
        command.upgrade(config, script.revision)
        assert db.current_revision(engine) == script.revision


def test_models_match_the_migrated_schema(empty_database_url: str, engine: Engine) -> None:
    db.upgrade_to_head(empty_database_url)
    with engine.connect() as connection:
        context = MigrationContext.configure(
            connection, opts={"compare_type": True, "compare_server_default": True}
        )
        assert compare_metadata(context, models.Base.metadata) == []


def test_create_all_and_migrations_build_the_same_schema(empty_database_url: str, engine: Engine) -> None:
    """Also covers what autogenerate cannot see: CHECK constraints, triggers and functions."""
    db.upgrade_to_head(empty_database_url)
    other_url = create_database("wxphone_create_all")
    other = db.make_engine(other_url)
    try:
        models.Base.metadata.create_all(other)
        with engine.connect() as migrated, other.connect() as created:
            assert schema_snapshot(migrated) == schema_snapshot(created)
    finally:
        other.dispose()
        drop_database(other_url)


def test_check_schema_at_head_refuses_an_unmigrated_database(empty_database_url: str, engine: Engine) -> None:
    with pytest.raises(db.SchemaNotAtHeadError, match="run `wxphone db upgrade`"):
        db.check_schema_at_head(engine)

    db.upgrade_to_head(empty_database_url)
    db.check_schema_at_head(engine)

    db.downgrade(empty_database_url, "base")
    with pytest.raises(db.SchemaNotAtHeadError, match=f"code expects {db.head_revision()}"):
        db.check_schema_at_head(engine)


def unused_database_url() -> str:
    """The URL of a database that does not exist yet, on the test server."""
    url = make_url(POSTGRES_ADMIN_URL).set(database=f"wxphone_new_{uuid.uuid4().hex[:10]}")
    return url.render_as_string(hide_password=False)


def database_exists(database_url: str) -> bool:
    engine = db.make_engine(POSTGRES_ADMIN_URL)
    try:
        with engine.connect() as connection:
            name = make_url(database_url).database
            found = connection.execute(text("SELECT 1 FROM pg_database WHERE datname = :n"), {"n": name})
            return found.first() is not None
    finally:
        engine.dispose()


def test_ensure_database_exists_creates_a_missing_database_once() -> None:
    url = unused_database_url()
    try:
        assert db.ensure_database_exists(url) is True
        assert database_exists(url)
        assert db.ensure_database_exists(url) is False
    finally:
        drop_database(url)


def test_ensure_database_exists_is_safe_when_hosts_race() -> None:
    url = unused_database_url()
    racers = 6
    barrier = threading.Barrier(racers)
    results: list[bool] = []
    errors: list[BaseException] = []

    def race() -> None:
        barrier.wait(timeout=10)
        try:
            results.append(db.ensure_database_exists(url))
        except BaseException as error:  # reported below, with the others
            errors.append(error)

    threads = [threading.Thread(target=race) for _ in range(racers)]
    try:
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=30)
        assert errors == []
        assert sorted(results) == [False] * (racers - 1) + [True]
        assert database_exists(url)
    finally:
        drop_database(url)


def run_wxphone(database_url: str, *args: str, tmp_path: Path) -> subprocess.CompletedProcess[str]:
    """Run the real ``wxphone`` command line with only WXPHONE_DATABASE_URL set."""
    return subprocess.run(
        [*WXPHONE, *args],
        env=base_environment(database_url=database_url),
        cwd=tmp_path,  # no stray .env file
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_cli_upgrade_creates_and_migrates_a_missing_database(tmp_path: Path) -> None:
    url = unused_database_url()
    head = db.head_revision()
    try:
        check = run_wxphone(url, "db", "check", tmp_path=tmp_path)
        assert check.returncode == 1
        assert "Traceback" not in check.stderr

        first = run_wxphone(url, "db", "upgrade", tmp_path=tmp_path)
        assert first.returncode == 0, first.stderr
        assert f"revision {head} (head)" in first.stdout
        assert "created database" in first.stdout

        again = run_wxphone(url, "db", "upgrade", tmp_path=tmp_path)
        assert again.returncode == 0, again.stderr
        assert "created database" not in again.stdout

        current = run_wxphone(url, "db", "current", tmp_path=tmp_path)
        assert current.stdout.split()[0] == head
        assert run_wxphone(url, "db", "check", tmp_path=tmp_path).returncode == 0

        down = run_wxphone(url, "db", "downgrade", "base", "--yes", tmp_path=tmp_path)
        assert down.returncode == 0, down.stderr
        engine = db.make_engine(url)
        try:
            assert table_names(engine) == {"alembic_version"}
        finally:
            engine.dispose()
    finally:
        drop_database(url)


def test_cli_check_fails_on_an_unmigrated_database_with_the_fix(
    empty_database_url: str, tmp_path: Path
) -> None:
    result = run_wxphone(empty_database_url, "db", "check", tmp_path=tmp_path)
    assert result.returncode == 1
    assert "run `wxphone db upgrade`" in result.stderr
    assert "Traceback" not in result.stderr


def test_cli_downgrade_asks_before_dropping_tables(empty_database_url: str, tmp_path: Path) -> None:
    db.upgrade_to_head(empty_database_url)
    result = run_wxphone(empty_database_url, "db", "downgrade", "base", tmp_path=tmp_path)
    assert result.returncode != 0
    engine = db.make_engine(empty_database_url)
    try:
        assert db.current_revision(engine) == db.head_revision()
    finally:
        engine.dispose()


def test_cli_names_an_unreachable_server_without_a_traceback_or_password(tmp_path: Path) -> None:
    port = free_port()  # nothing listens here
    url = f"postgresql+psycopg://wxphone:hunter2-secret@127.0.0.1:{port}/wxphone"
    result = run_wxphone(url, "db", "upgrade", tmp_path=tmp_path)
    assert result.returncode == 1
    assert f"127.0.0.1:{port}" in result.stderr
    assert "PostgreSQL running" in result.stderr
    assert "Traceback" not in result.stderr
    assert "hunter2-secret" not in result.stdout + result.stderr
