"""``wxphone worker`` and ``wxphone beat``: run the Celery processes."""

from __future__ import annotations

import click


@click.command("worker")
def worker_command() -> None:
    """Run a Celery worker (not implemented yet)."""
    raise click.ClickException("not implemented yet")


@click.command("beat")
def beat_command() -> None:
    """Run celery beat (not implemented yet)."""
    raise click.ClickException("not implemented yet")
