"""The Celery application (``celery -A worker.app``). Tasks are registered by importing their modules."""

from __future__ import annotations

from celery import Celery

app = Celery("wxphone")
app.config_from_object("celeryconfig")
app.conf.include = ["worker.tokens.tasks"]
