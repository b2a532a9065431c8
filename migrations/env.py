"""Alembic environment for wxphone.

The database URL comes from the Alembic configuration, which :func:`worker.db.alembic_config`
builds from settings; a caller may instead pass an open connection as
``config.attributes["connection"]``.
"""

from __future__ import annotations

from alembic import context
from sqlalchemy import Connection, create_engine, text
from sqlalchemy.engine import make_url
from sqlalchemy.pool import NullPool

import models

#: Advisory lock key held while migrating, so two deploys running ``wxphone db upgrade`` at once
#: apply each revision once: the second waits, then finds the schema already at head.
MIGRATION_LOCK_KEY = 0x77787068_6F6E6531  # "wxphone1"

config = context.config
target_metadata = models.Base.metadata


def _database_url() -> str:
    url = config.get_main_option("sqlalchemy.url")
    if not url:
        raise RuntimeError("no sqlalchemy.url in the Alembic configuration: use worker.db.alembic_config()")
    return url


def _configure(connection: Connection) -> None:
    context.configure(connection=connection, target_metadata=target_metadata, compare_type=True)


def _migrate(connection: Connection) -> None:
    _configure(connection)
    with context.begin_transaction():
        # Taken inside the migration transaction, before Alembic reads the current revision, and
        # released by its commit. PostgreSQL DDL is transactional, so a failure leaves no half-step.
        connection.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": MIGRATION_LOCK_KEY})
        context.run_migrations()


def run_migrations_offline() -> None:
    """Write the migration SQL to stdout instead of running it (``alembic upgrade --sql``)."""
    context.configure(
        url=_database_url(),
        target_metadata=target_metadata,
        literal_binds=True,
        dialect_opts={"paramstyle": "named"},
        compare_type=True,
    )
    with context.begin_transaction():
        context.run_migrations()


def run_migrations_online() -> None:
    """Run the migrations on the configured database (or the connection we were handed)."""
    connection = config.attributes.get("connection")
    if connection is not None:
        _migrate(connection)
        return
    url = make_url(_database_url())
    if url.drivername == "postgresql":
        url = url.set(drivername="postgresql+psycopg")
    # A one-off command: no pool to keep around afterwards.
    engine = create_engine(url, poolclass=NullPool)
    try:
        with engine.connect() as connection:
            _migrate(connection)
    finally:
        engine.dispose()


if context.is_offline_mode():
    run_migrations_offline()
else:
    run_migrations_online()
