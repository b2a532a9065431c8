"""The notification a job's end sends: ``NOTIFY wxphone_job_done, '<job id>'``.

A trigger on ``phone_jobs`` and ``login_jobs`` sends it when a row becomes ``succeeded`` or
``failed``. PostgreSQL delivers a notification only when the transaction that sent it commits,
and with it: a waiter that wakes on it reads the committed end, and a rolled-back write wakes no
one. Every writer (workers, the sweep, a producer marking an unpublished job) is covered without
any of them remembering to notify.
"""

from __future__ import annotations

from sqlalchemy import Table, event

from models.base import Base, run_sql

__all__ = [
    "CREATE_NOTIFY_FUNCTION_SQL",
    "DROP_NOTIFY_FUNCTION_SQL",
    "JOB_DONE_CHANNEL",
    "notify_job_done",
    "notify_job_done_trigger_ddl",
]

#: The LISTEN channel; the payload is the job id (a UUID: nothing secret).
JOB_DONE_CHANNEL = "wxphone_job_done"
NOTIFY_FUNCTION = "wxphone_notify_job_done"

CREATE_NOTIFY_FUNCTION_SQL = f"""
CREATE OR REPLACE FUNCTION {NOTIFY_FUNCTION}() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('{JOB_DONE_CHANNEL}', NEW.job_id);
    RETURN NULL;
END;
$$
"""
DROP_NOTIFY_FUNCTION_SQL = f"DROP FUNCTION IF EXISTS {NOTIFY_FUNCTION}()"


def notify_job_done_trigger_ddl(table_name: str) -> tuple[str, str]:
    """The (create, drop) SQL of the trigger that notifies the end of a job in ``table_name``."""
    trigger = f"trg_{table_name}_notify_done"
    create = (
        f"CREATE TRIGGER {trigger} AFTER INSERT OR UPDATE OF status ON {table_name} FOR EACH ROW "
        "WHEN (NEW.status IN ('succeeded', 'failed')) "
        f"EXECUTE FUNCTION {NOTIFY_FUNCTION}()"
    )
    return create, f"DROP TRIGGER IF EXISTS {trigger} ON {table_name}"


def notify_job_done(table: Table) -> None:
    """Attach the notifying trigger to ``table`` for ``metadata.create_all()`` (tests, tools)."""
    create_trigger, _ = notify_job_done_trigger_ddl(table.name)
    event.listen(table, "before_create", run_sql(CREATE_NOTIFY_FUNCTION_SQL))
    event.listen(table, "after_create", run_sql(create_trigger))


# drop_all() removes the function once the tables (and their triggers) are gone.
event.listen(Base.metadata, "after_drop", run_sql(DROP_NOTIFY_FUNCTION_SQL))
