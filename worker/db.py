"""PostgreSQL engines, sessions and schema migrations.

Every database connection in wxphone comes from an engine made here. Callers open one
:class:`~sqlalchemy.orm.Session` per unit of work (``with factory.begin() as session:``) and close it
at the end; nothing in wxphone keeps a module-level session.

Migrations are Alembic revisions in the top-level ``migrations`` package. There is no
``alembic.ini``: :func:`alembic_config` builds the configuration in code from a database URL, so
the URL always comes from :class:`worker.settings.Settings`.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, TypeVar
from weakref import WeakKeyDictionary

import psycopg
from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from psycopg import sql
from sqlalchemy import Engine, create_engine, event, exc
from sqlalchemy.engine import URL, make_url
from sqlalchemy.orm import Session, sessionmaker
from sqlalchemy.pool import ConnectionPoolEntry, PoolProxiedConnection

import migrations

__all__ = [
    "CONNECT_TIMEOUT_SECONDS",
    "MIGRATIONS_DIR",
    "SchemaNotAtHeadError",
    "alembic_config",
    "check_schema_at_head",
    "current_revision",
    "describe_database",
    "downgrade",
    "ensure_database_exists",
    "head_revision",
    "is_transient_database_error",
    "is_unreachable",
    "make_engine",
    "retry_while_unreachable",
    "session_factory",
    "upgrade_to_head",
]

log = logging.getLogger(__name__)

T = TypeVar("T")

#: Where the Alembic environment and revisions live.
MIGRATIONS_DIR = Path(migrations.__file__).parent

#: How long opening a connection may take. A task should fail fast and retry rather than hang
#: when PostgreSQL is down; libpq's default is to wait forever.
CONNECT_TIMEOUT_SECONDS = 5

#: Pool shape per process. A prefork child runs one task at a time and needs one or two
#: connections; the extra room serves the threads pool. Workers x (size + overflow) must stay
#: below the server's max_connections.
POOL_SIZE = 5
POOL_MAX_OVERFLOW = 5
#: How long a checkout waits for a free pooled connection before raising.
POOL_TIMEOUT_SECONDS = 10.0
#: Replace connections older than this, before a firewall or proxy drops them while idle.
POOL_RECYCLE_SECONDS = 1800

#: Pauses between attempts of :func:`retry_while_unreachable`: doubled from the first to the last.
UNREACHABLE_FIRST_PAUSE_SECONDS = 0.2
UNREACHABLE_MAX_PAUSE_SECONDS = 2.0

#: The database used to run CREATE DATABASE; every PostgreSQL server has it.
MAINTENANCE_DATABASE = "postgres"


class SchemaNotAtHeadError(RuntimeError):
    """The database schema is not at the revision this code was written for."""


def describe_database(database_url: str | URL) -> str:
    """``database NAME on HOST:PORT``, for messages; never includes the password."""
    url = make_url(database_url)
    return f"database {url.database} on {url.host or 'localhost'}:{url.port or 5432}"


def make_engine(database_url: str, **engine_options: Any) -> Engine:
    """A pooled psycopg 3 engine whose connections are checked before use.

    ``engine_options`` override the defaults (for example ``pool_size``).
    """
    url = make_url(database_url)
    if url.drivername == "postgresql":
        # A bare postgresql:// would make SQLAlchemy look for psycopg2, which we do not ship.
        url = url.set(drivername="postgresql+psycopg")
    options: dict[str, Any] = {
        # A checkout first runs a ping, so a connection killed by a PostgreSQL restart or failover
        # is replaced instead of failing the task that drew it.
        "pool_pre_ping": True,
        "pool_size": POOL_SIZE,
        "max_overflow": POOL_MAX_OVERFLOW,
        "pool_timeout": POOL_TIMEOUT_SECONDS,
        "pool_recycle": POOL_RECYCLE_SECONDS,
        "isolation_level": "READ COMMITTED",
        "connect_args": {"connect_timeout": CONNECT_TIMEOUT_SECONDS, "application_name": "wxphone"},
    }
    options.update(engine_options)
    engine = create_engine(url, **options)
    _guard_against_fork(engine)
    return engine


def _guard_against_fork(engine: Engine) -> None:
    """Never hand a connection opened by one process to another (SQLAlchemy pooling docs).

    Disposing the inherited engine in the child (``worker.runtime.reset_runtime`` on Celery's
    ``worker_process_init``) is the primary defence; this check catches a process that forked
    without it. Two processes writing to one socket corrupt both sessions.
    """

    @event.listens_for(engine, "connect")
    def _record_pid(_dbapi_connection: Any, record: ConnectionPoolEntry) -> None:
        record.info["pid"] = os.getpid()

    @event.listens_for(engine, "checkout")
    def _check_pid(_dbapi_connection: Any, record: ConnectionPoolEntry, proxy: PoolProxiedConnection) -> None:
        if record.info.get("pid") != os.getpid():
            # Detach without closing: closing would send a terminate message on the parent's socket.
            # (The documented recipe; the typed interfaces declare these attributes read-only.)
            record.dbapi_connection = proxy.dbapi_connection = None  # type: ignore[misc]
            raise exc.DisconnectionError(
                f"connection opened in process {record.info.get('pid')} checked out in {os.getpid()}"
            )


#: SQLSTATE of a unique violation: with ON CONFLICT upserts, only a race between concurrent
#: inserts produces one, and running the statement again resolves it.
UNIQUE_VIOLATION = "23505"


def is_transient_database_error(error: exc.DBAPIError) -> bool:
    """Whether running the same statement later may succeed: the server is unreachable,
    restarting, out of resources or timed the statement out (``OperationalError``), the driver
    lost its connection, or concurrent inserts raced. Anything else (``DataError``, other
    ``IntegrityError``s, ``ProgrammingError``) fails the same way every time."""
    if error.connection_invalidated or isinstance(error, exc.OperationalError | exc.InterfaceError):
        return True
    return isinstance(error, exc.IntegrityError) and getattr(error.orig, "sqlstate", None) == UNIQUE_VIOLATION


def session_factory(engine: Engine) -> sessionmaker[Session]:
    """A session factory bound to ``engine``: ``with factory.begin() as session: ...``."""
    # Objects stay readable after commit. With expiry on, reading an attribute after commit would
    # silently open a new transaction and hold a pooled connection, for example across a WeChat call.
    return sessionmaker(bind=engine, expire_on_commit=False)


_autocommit_engines: WeakKeyDictionary[Engine, Engine] = WeakKeyDictionary()
_autocommit_lock = threading.Lock()


def autocommit(engine: Engine) -> Engine:
    """``engine`` in autocommit mode, sharing its pool: every statement is its own transaction.

    For single statements on a hot path: no BEGIN and COMMIT round trips. Built once per engine
    (deriving it costs more than the statement's own client work).
    """
    with _autocommit_lock:
        derived = _autocommit_engines.get(engine)
        if derived is None:
            derived = _autocommit_engines[engine] = engine.execution_options(isolation_level="AUTOCOMMIT")
        return derived


def alembic_config(database_url: str | None = None) -> Config:
    """An Alembic configuration for our ``migrations`` package and, if given, ``database_url``."""
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS_DIR))
    # New revision files sort by their id: "0002_add_phone_encryption.py".
    config.set_main_option("file_template", "%%(rev)s_%%(slug)s")
    if database_url is not None:
        # Config values go through configparser interpolation; a '%' in a password must be doubled.
        config.set_main_option("sqlalchemy.url", database_url.replace("%", "%%"))
    return config


def head_revision() -> str:
    """The revision the code expects the database to be at."""
    head = ScriptDirectory.from_config(alembic_config()).get_current_head()
    if head is None:
        raise RuntimeError(f"no migrations found in {MIGRATIONS_DIR}")
    return head


def current_revision(engine: Engine) -> str | None:
    """The revision the database is at, or ``None`` for a database never migrated."""
    with engine.connect() as connection:
        return MigrationContext.configure(connection).get_current_revision()


def check_schema_at_head(engine: Engine) -> None:
    """Raise :class:`SchemaNotAtHeadError` unless the database is at :func:`head_revision`."""
    expected = head_revision()
    actual = current_revision(engine)
    if actual != expected:
        found = f"at revision {actual}" if actual else "not migrated (no revision)"
        raise SchemaNotAtHeadError(
            f"{describe_database(engine.url)}: schema is {found}, code expects {expected}: "
            "run `wxphone db upgrade`"
        )


def upgrade_to_head(database_url: str) -> str:
    """Apply every pending migration; return the revision the database is now at."""
    command.upgrade(alembic_config(database_url), "head")
    return head_revision()


def downgrade(database_url: str, revision: str) -> str | None:
    """Migrate down to ``revision`` (``"base"`` removes every table); return the new revision."""
    command.downgrade(alembic_config(database_url), revision)
    engine = make_engine(database_url)
    try:
        return current_revision(engine)
    finally:
        engine.dispose()


def _libpq_conninfo(url: URL, database: str) -> str:
    return url.set(drivername="postgresql", database=database).render_as_string(hide_password=False)


def ensure_database_exists(database_url: str) -> bool:
    """Create the database named in ``database_url`` unless it exists; return whether it was created.

    Safe to run from several hosts at once: a concurrent creator winning the race counts as
    "exists".
    """
    url = make_url(database_url)
    name = url.database
    if not name:
        raise ValueError("the database URL names no database")
    try:
        admin = psycopg.connect(
            _libpq_conninfo(url, MAINTENANCE_DATABASE),
            autocommit=True,
            connect_timeout=CONNECT_TIMEOUT_SECONDS,
        )
    except psycopg.OperationalError:
        # Some hosted servers deny access to the maintenance database; if the target database
        # accepts us it exists and there is nothing to do. Otherwise report the first failure.
        try:
            with psycopg.connect(_libpq_conninfo(url, name), connect_timeout=CONNECT_TIMEOUT_SECONDS):
                return False
        except psycopg.OperationalError:
            pass
        raise
    with admin:
        if admin.execute("SELECT 1 FROM pg_database WHERE datname = %s", (name,)).fetchone():
            return False
        try:
            admin.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
        except (psycopg.errors.DuplicateDatabase, psycopg.errors.UniqueViolation):
            # Another process created it between our check and our CREATE. Two simultaneous
            # CREATE DATABASE statements can also collide on pg_database's unique index.
            return False
        return True


def is_unreachable(error: exc.DBAPIError) -> bool:
    """True when ``error`` means the database could not be reached (a lost or refused connection,
    a server shutting down), as opposed to a statement PostgreSQL refused."""
    return bool(error.connection_invalidated) or isinstance(error, exc.OperationalError)


def retry_while_unreachable(
    write: Callable[[], T],
    *,
    retry_seconds: float,
    what: str,
    log_extra: Mapping[str, object] | None = None,
    sleep: Callable[[float], None] = time.sleep,
) -> T:
    """Run ``write`` (one transaction), retrying it while PostgreSQL is unreachable.

    For writes that must not be lost: the result of a WeChat exchange whose code is spent, which
    exists nowhere else. Retries for up to ``retry_seconds`` (then the last error is raised), with
    pauses from 0.2 s doubling to 2 s; any other database error is raised at once. Each retry
    logs a WARNING ``database unreachable while recording {what}; retrying``.
    """
    deadline = time.monotonic() + retry_seconds
    pause = UNREACHABLE_FIRST_PAUSE_SECONDS
    while True:
        try:
            return write()
        except exc.DBAPIError as error:
            if not is_unreachable(error) or time.monotonic() >= deadline:
                raise
            log.warning(
                "database unreachable while recording %s; retrying", what, extra=dict(log_extra or {})
            )
            sleep(pause)
            pause = min(UNREACHABLE_MAX_PAUSE_SECONDS, pause * 2)
