"""The Celery application (``celery -A worker.app``). Tasks register by importing their modules."""

from __future__ import annotations

from typing import Any

from celery import Celery, signals

from worker.runtime import reset_runtime

app = Celery("wxphone")
app.config_from_object("celeryconfig")
app.conf.include = ["worker.tokens.tasks"]


@signals.worker_process_init.connect
def _fresh_connections_in_child(**_: Any) -> None:
    # A forked pool child must not reuse the parent's Redis or HTTP sockets.
    reset_runtime()
