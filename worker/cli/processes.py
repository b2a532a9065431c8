"""``wxphone worker`` and ``wxphone beat``: run the Celery processes with wxphone's settings."""

from __future__ import annotations

import click

from worker.settings import get_settings

#: Queues a worker consumes by default: jobs, and token refreshes that must not wait behind jobs.
DEFAULT_QUEUES = "wxphone,wxphone.token"


@click.command("worker", context_settings={"ignore_unknown_options": True})
@click.option("--queues", "-Q", default=DEFAULT_QUEUES, show_default=True, help="Queues to consume.")
@click.option("--concurrency", "-c", type=int, default=None, help="Pool size [WXPHONE_WORKER_CONCURRENCY].")
@click.option(
    "--pool",
    "-P",
    type=click.Choice(["prefork", "threads", "gevent", "solo"]),
    default=None,
    help="Pool implementation [WXPHONE_WORKER_POOL].",
)
@click.option("--hostname", "-n", default=None, help="Node name, e.g. worker1@%h.")
@click.argument("celery_args", nargs=-1, type=click.UNPROCESSED)
def worker_command(
    queues: str, concurrency: int | None, pool: str | None, hostname: str | None, celery_args: tuple[str, ...]
) -> None:
    """Run a Celery worker consuming phone jobs and token refreshes.

    Extra arguments after ``--`` go to ``celery worker`` unchanged.
    """
    settings = get_settings()
    # Before Celery starts: a worker reads and writes personal data, so without its own keys where
    # the public development keys are not allowed it stops here, naming the variables.
    settings.require_production_secrets()
    from worker.app import app  # imported late: loading it reads the settings

    argv = [
        "worker",
        "--queues",
        queues,
        "--pool",
        pool or settings.worker_pool,
        "--loglevel",
        settings.log_level,
        "--without-mingle",
        "--without-gossip",
    ]
    workers = concurrency or settings.worker_concurrency
    if workers:
        argv += ["--concurrency", str(workers)]
    if hostname:
        argv += ["--hostname", hostname]
    app.worker_main(argv=[*argv, *celery_args])


@click.command("beat", context_settings={"ignore_unknown_options": True})
@click.argument("celery_args", nargs=-1, type=click.UNPROCESSED)
def beat_command(celery_args: tuple[str, ...]) -> None:
    """Run celery beat, which schedules ``wxphone.refresh_access_token``.

    Several beats may run: a lock in Redis lets exactly one schedule; the others stand by.
    """
    settings = get_settings()
    from worker.app import app

    app.start(["beat", "--loglevel", settings.log_level, *celery_args])
