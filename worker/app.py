"""The Celery application (``celery -A worker.app``). Tasks register by importing their modules."""

from __future__ import annotations

from typing import Any

from celery import Celery, signals

from worker.broker import BrokerConnectionWatch, UnackedRestore
from worker.db import SchemaNotAtHeadError, check_schema_at_head
from worker.keychecks import verify_shared_key
from worker.logs import configure_logging
from worker.runtime import current_runtime, get_runtime, reset_runtime
from worker.settings import SettingsError, get_settings

app = Celery("wxphone")
app.config_from_object("celeryconfig")
app.conf.include = ["worker.tokens.tasks", "worker.jobs.tasks"]
# One WARNING line when kombu silently re-opens the connection the worker consumes on.
app.steps["consumer"].add(BrokerConnectionWatch)
# A worker without an event loop (gevent) restores a dead worker's messages on a timer of its own.
app.steps["consumer"].add(UnackedRestore)


@signals.setup_logging.connect
def _configure_logging(**_: Any) -> None:
    # Connecting this signal stops Celery from installing its own handlers: every line, Celery's
    # and the libraries', goes through the one redacting handler on the root logger.
    settings = get_settings()
    configure_logging(settings.log_level, secrets=[each.secret for each in settings.apps])
    settings.warn_if_development_mode()


@signals.worker_process_init.connect
def _fresh_connections_in_child(**_: Any) -> None:
    # A forked pool child must not reuse the parent's Redis, HTTP or database sockets.
    reset_runtime()


@signals.worker_process_shutdown.connect
@signals.worker_shutdown.connect
def _give_up_liveness_lease(**_: Any) -> None:
    # A warm shutdown has finished every run of this process: its jobs need not wait for the
    # lease to lapse before another delivery may take them over.
    runtime = current_runtime()
    if runtime is not None and "lease" in runtime.__dict__:
        runtime.lease.stop()


@signals.worker_init.connect
def _refuse_to_start_misconfigured(**_: Any) -> None:
    # Stop the worker before it consumes anything when it has no keys of its own where the public
    # development keys are not allowed, when the schema is not the one this code expects, or when
    # its fingerprint or blind-index key differs from the one the fleet recorded (the message
    # names the variables, or the command to run: ``wxphone db upgrade``). Celery logs and
    # swallows an Exception raised by a signal handler and starts anyway; SystemExit stops it.
    try:
        get_settings().require_production_secrets()  # all three keys: workers fingerprint codes
        runtime = get_runtime()
        settings = runtime.settings
        check_schema_at_head(runtime.engine)
        verify_shared_key(runtime.engine, "fingerprint_key", settings.fingerprint_key, record=True)
        verify_shared_key(runtime.engine, "blind_index_key", settings.field_blind_index_key(), record=True)
    except (SettingsError, SchemaNotAtHeadError) as error:
        raise SystemExit(f"wxphone worker: {error}") from None
