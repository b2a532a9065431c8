"""``wxphone config show``: the settings a process runs with, without any secret."""

from __future__ import annotations

import json

import click

from worker.settings import get_settings, public_settings

__all__ = ["config_group"]


@click.group("config")
def config_group() -> None:
    """The effective configuration."""


@config_group.command("show")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def config_show_command(as_json: bool) -> None:
    """Print every setting as this process resolves it (environment, .env, secrets file, defaults),
    the delivery timings derived from them, and the Celery delivery options they set. Secrets are
    shown only as set or unset; URL passwords as ***."""
    shown = public_settings(get_settings())
    shown["celery"] = _delivery_options()
    if as_json:
        click.echo(json.dumps(shown, indent=2, sort_keys=True, default=str))
        return
    for name, value in shown.items():
        if isinstance(value, dict):
            for option, option_value in value.items():
                click.echo(f"{name}.{option} = {option_value}")
        else:
            click.echo(f"{name} = {value}")


def _delivery_options() -> dict[str, object]:
    """What Celery is given from the settings (celeryconfig): the delivery timings that matter."""
    import celeryconfig  # imported late: it reads the settings

    transport = celeryconfig.broker_transport_options
    return {
        # Only a Redis broker has one: RabbitMQ requeues a lost consumer's messages at once.
        "visibility_timeout": transport.get("visibility_timeout"),
        "broker_heartbeat": getattr(celeryconfig, "broker_heartbeat", None),
        "confirm_publish": transport.get("confirm_publish", False),
        "result_backend_visibility_timeout": celeryconfig.result_backend_transport_options[
            "visibility_timeout"
        ],
        "task_time_limit": celeryconfig.task_time_limit,
        "task_soft_time_limit": celeryconfig.task_soft_time_limit,
        "unacked_restore_interval": transport.get("unacked_restore_interval"),
        "unacked_mutex_expire": transport.get("unacked_mutex_expire"),
        "task_acks_late": celeryconfig.task_acks_late,
        "task_reject_on_worker_lost": celeryconfig.task_reject_on_worker_lost,
        "worker_prefetch_multiplier": celeryconfig.worker_prefetch_multiplier,
    }
