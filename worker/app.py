"""The Celery application (``celery -A worker.app``). Tasks register by importing their modules."""

from __future__ import annotations

from typing import Any

from celery import Celery, signals

from worker.broker import BrokerConnectionWatch
from worker.db import check_schema_at_head
from worker.logs import configure_logging
from worker.runtime import get_runtime, reset_runtime
from worker.settings import get_settings

app = Celery("wxphone")
app.config_from_object("celeryconfig")
app.conf.include = ["worker.tokens.tasks", "worker.jobs.tasks"]
# One WARNING line when kombu silently re-opens the connection the worker consumes on.
app.steps["consumer"].add(BrokerConnectionWatch)


@signals.setup_logging.connect
def _configure_logging(**_: Any) -> None:
    # Connecting this signal stops Celery from installing its own handlers: every line, Celery's
    # and the libraries', goes through the one redacting handler on the root logger.
    settings = get_settings()
    configure_logging(settings.log_level, secrets=[each.secret for each in settings.apps])


@signals.worker_process_init.connect
def _fresh_connections_in_child(**_: Any) -> None:
    # A forked pool child must not reuse the parent's Redis, HTTP or database sockets.
    reset_runtime()


@signals.worker_init.connect
def _refuse_outdated_schema(**_: Any) -> None:
    # Raising here stops the worker before it consumes anything, with the message naming the
    # command to run (``wxphone db upgrade``).
    check_schema_at_head(get_runtime().engine)
