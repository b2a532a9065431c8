"""``wxphone db``: create, migrate and check the PostgreSQL schema."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager

import click
import psycopg
from alembic import command
from alembic.script import ScriptDirectory
from alembic.util import CommandError
from sqlalchemy import exc
from sqlalchemy.engine import make_url

from worker import db
from worker.settings import get_settings

__all__ = ["db_group"]

START_POSTGRES_HINT = (
    "Is PostgreSQL running there? Start it (for example `sudo systemctl start postgresql` or "
    "`sudo pg_ctlcluster <version> main start`) or point WXPHONE_DATABASE_URL at a running server."
)


def _reason(error: BaseException, password: str | None) -> str:
    """The useful part of a driver error, on one line and without the password."""
    original = getattr(error, "orig", None) or error
    lines = [line.strip() for line in str(original).splitlines() if line.strip()]
    text = lines[0] if lines else type(original).__name__
    # libpq prefixes each attempt with 'connection to server at "...", port N failed: '.
    text = text.rsplit(" failed: ", 1)[-1].removeprefix("FATAL:").strip()
    if password:
        text = text.replace(password, "***")
    return text


def _connect_hint(reason: str) -> str:
    """What an operator should do about a failed connection (the hint only; nothing retries on it)."""
    if reason.startswith("database ") and reason.endswith("does not exist"):
        return "Run `wxphone db upgrade` to create and migrate it."
    if "authentication" in reason or reason.startswith("role ") or "password" in reason:
        return "Check the user and password in WXPHONE_DATABASE_URL."
    return START_POSTGRES_HINT


@contextmanager
def _database_errors(database_url: str) -> Iterator[None]:
    """Turn database and migration errors into one-line messages instead of tracebacks."""
    where = db.describe_database(database_url)
    password = make_url(database_url).password
    try:
        yield
    except (exc.OperationalError, psycopg.OperationalError) as error:
        reason = _reason(error, password)
        original = getattr(error, "orig", None) or error
        if str(original).startswith("connection failed"):
            hint = _connect_hint(reason)
            raise click.ClickException(f"cannot connect to {where}: {reason}. {hint}") from None
        raise click.ClickException(f"{where}: {reason}") from None
    except psycopg.errors.InsufficientPrivilege as error:
        raise click.ClickException(
            f"{where}: {_reason(error, password)}. Create the database as a superuser, or grant this "
            "user CREATEDB."
        ) from None
    except (exc.DBAPIError, psycopg.Error) as error:
        raise click.ClickException(f"{where}: {_reason(error, password)}") from None
    except CommandError as error:
        raise click.ClickException(str(error)) from None
    except db.SchemaNotAtHeadError as error:
        raise click.ClickException(str(error)) from None


_STEP_HANDLER = logging.StreamHandler()
_STEP_HANDLER.setFormatter(logging.Formatter("%(message)s"))
# Only the steps; Alembic's other INFO lines ("Context impl PostgresqlImpl.") are noise here.
_STEP_HANDLER.addFilter(lambda record: record.getMessage().startswith("Running "))


def _show_migration_steps() -> None:
    """Print Alembic's "Running upgrade 0001 -> 0002" lines so an operator sees what ran."""
    logger = logging.getLogger("alembic.runtime.migration")
    if _STEP_HANDLER not in logger.handlers:
        logger.addHandler(_STEP_HANDLER)
    logger.setLevel(logging.INFO)


@click.group("db")
def db_group() -> None:
    """Create, migrate and check the PostgreSQL schema."""


@db_group.command("upgrade")
def upgrade_command() -> None:
    """Create the database if it is missing, then migrate it to the newest revision."""
    database_url = get_settings().database_url
    where = db.describe_database(database_url)
    _show_migration_steps()
    with _database_errors(database_url):
        if db.ensure_database_exists(database_url):
            click.echo(f"created {where}")
        revision = db.upgrade_to_head(database_url)
    click.echo(f"{where} is at revision {revision} (head)")


@db_group.command("downgrade")
@click.argument("revision")
@click.option("--yes", is_flag=True, help="Do not ask for confirmation.")
def downgrade_command(revision: str, yes: bool) -> None:
    """Migrate down to REVISION ("base" drops every wxphone table and its data)."""
    database_url = get_settings().database_url
    where = db.describe_database(database_url)
    if not yes:
        click.confirm(f"Downgrade {where} to {revision}? Dropped tables lose their rows.", abort=True)
    _show_migration_steps()
    with _database_errors(database_url):
        current = db.downgrade(database_url, revision)
    click.echo(f"{where} is at revision {current or 'base (no tables)'}")


@db_group.command("current")
def current_command() -> None:
    """Print the revision the database is at."""
    database_url = get_settings().database_url
    engine = db.make_engine(database_url)
    try:
        with _database_errors(database_url):
            current = db.current_revision(engine)
    finally:
        engine.dispose()
    head = db.head_revision()
    state = "head" if current == head else f"head is {head}"
    click.echo(f"{current or 'none (not migrated)'} ({state})")


@db_group.command("check")
def check_command() -> None:
    """Exit 1 unless the database schema is at the revision this code expects."""
    database_url = get_settings().database_url
    engine = db.make_engine(database_url)
    try:
        with _database_errors(database_url):
            db.check_schema_at_head(engine)
    finally:
        engine.dispose()
    click.echo(f"{db.describe_database(database_url)} is at revision {db.head_revision()} (head)")


def _next_revision_id(scripts: ScriptDirectory) -> str:
    numbers = [int(script.revision) for script in scripts.walk_revisions() if script.revision.isdigit()]
    return f"{max(numbers, default=0) + 1:04d}"


@db_group.command("revision")
@click.option("-m", "--message", required=True, help="What the revision changes, in a few words.")
@click.option("--autogenerate", is_flag=True, help="Compare the models with the database (at head).")
def revision_command(message: str, autogenerate: bool) -> None:
    """Write a new migration file (for developers); review it before committing."""
    database_url = get_settings().database_url
    config = db.alembic_config(database_url)
    rev_id = _next_revision_id(ScriptDirectory.from_config(config))
    with _database_errors(database_url):
        script = command.revision(config, message=message, autogenerate=autogenerate, rev_id=rev_id)
    path = script.path if script is not None and not isinstance(script, list) else "?"
    click.echo(f"wrote revision {rev_id}: {path}")
