"""The declarative base shared by every wxphone table.

Constraint and index names follow :data:`NAMING_CONVENTION`, so a migration can drop or alter a
constraint by a name that is the same on every database rather than one PostgreSQL made up.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from datetime import datetime

from sqlalchemy import Connection, DateTime, MetaData, Table, event, func, text
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

__all__ = [
    "CREATE_TOUCH_FUNCTION_SQL",
    "DROP_TOUCH_FUNCTION_SQL",
    "NAMING_CONVENTION",
    "TOUCH_UPDATED_AT_FUNCTION",
    "Base",
    "created_at_column",
    "in_values_check",
    "maintain_updated_at",
    "run_sql",
    "touch_updated_at_trigger_ddl",
    "updated_at_column",
]

NAMING_CONVENTION: dict[str, str] = {
    "ix": "ix_%(table_name)s_%(column_0_N_name)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_N_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}

#: A trigger function that stamps ``updated_at`` on every UPDATE of a row.
TOUCH_UPDATED_AT_FUNCTION = "wxphone_touch_updated_at"

#: DDL for :data:`TOUCH_UPDATED_AT_FUNCTION`; the initial migration runs the same text.
CREATE_TOUCH_FUNCTION_SQL = f"""
CREATE OR REPLACE FUNCTION {TOUCH_UPDATED_AT_FUNCTION}() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    NEW.updated_at := now();
    RETURN NEW;
END;
$$
"""
DROP_TOUCH_FUNCTION_SQL = f"DROP FUNCTION IF EXISTS {TOUCH_UPDATED_AT_FUNCTION}()"


class Base(DeclarativeBase):
    """Declarative base whose metadata carries the naming convention."""

    metadata = MetaData(naming_convention=NAMING_CONVENTION)


def run_sql(sql: str) -> Callable[..., None]:
    """A DDL event listener that executes ``sql`` on the connection doing the create or drop."""

    def listener(_target: object, connection: Connection, **_kwargs: object) -> None:
        connection.execute(text(sql))

    return listener


# create_all()/drop_all() manage the trigger function the way the migrations do.
event.listen(Base.metadata, "before_create", run_sql(CREATE_TOUCH_FUNCTION_SQL))
event.listen(Base.metadata, "after_drop", run_sql(DROP_TOUCH_FUNCTION_SQL))


def in_values_check(column: str, values: Iterable[str]) -> str:
    """The SQL of a CHECK that ``column`` holds one of ``values`` (for example a StrEnum)."""
    return f"{column} IN ({', '.join(repr(str(value)) for value in values)})"


def created_at_column() -> Mapped[datetime]:
    """A ``created_at timestamptz NOT NULL DEFAULT now()`` column."""
    return mapped_column(DateTime(timezone=True), nullable=False, server_default=func.now())


def updated_at_column() -> Mapped[datetime]:
    """An ``updated_at`` column; :func:`maintain_updated_at` keeps it current."""
    # onupdate covers ORM and Core updates; the trigger also covers INSERT ... ON CONFLICT DO
    # UPDATE and hand-written SQL, which never see Python-side onupdate defaults.
    return mapped_column(
        DateTime(timezone=True), nullable=False, server_default=func.now(), onupdate=func.now()
    )


def touch_updated_at_trigger_ddl(table_name: str) -> tuple[str, str]:
    """The (create, drop) SQL of the trigger that maintains ``table_name.updated_at``."""
    trigger = f"trg_{table_name}_touch_updated_at"
    create = (
        f"CREATE TRIGGER {trigger} BEFORE UPDATE ON {table_name} "
        f"FOR EACH ROW EXECUTE FUNCTION {TOUCH_UPDATED_AT_FUNCTION}()"
    )
    return create, f"DROP TRIGGER IF EXISTS {trigger} ON {table_name}"


def maintain_updated_at(table: Table) -> None:
    """Attach the ``updated_at`` trigger to ``table`` for ``metadata.create_all()`` (tests, tools).

    Production schemas come from the migrations, which create the same function and triggers.
    """
    create_trigger, _ = touch_updated_at_trigger_ddl(table.name)
    event.listen(table, "after_create", run_sql(create_trigger))
