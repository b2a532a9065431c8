"""``wxphone demo``: run the whole system locally against the WeChat sandbox and report."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import click

from worker.cli.services import service_location_options, service_options_from_context
from worker.demo import DemoOptions, run_demo
from worker.settings import get_settings


@click.command("demo")
@click.option(
    "--jobs", type=click.IntRange(min=10), default=300, show_default=True, help="Phone jobs to submit."
)
@click.option(
    "--keep-running",
    is_flag=True,
    help="Leave sandbox, worker, beat (and private servers) running at the end; prints how to stop them.",
)
@click.option(
    "--seconds-timeout",
    type=click.FloatRange(min=1),
    default=120.0,
    show_default=True,
    help="Give up when the jobs have not all finished after this long.",
)
@click.option(
    "--database",
    default="wxphone_demo",
    show_default=True,
    help="Name of the demo's database (dropped and recreated) on the configured PostgreSQL server.",
)
@click.option("--front-ends", type=click.IntRange(min=1, max=64), default=6, show_default=True)
@click.option(
    "--summary-json",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="Also write the summary figures and checks to this file as JSON.",
)
@click.option(
    "--seed", type=int, default=None, help="Seed of the plan (which users repeat, which codes are bad)."
)
@service_location_options
def demo_command(
    jobs: int,
    keep_running: bool,
    seconds_timeout: float,
    database: str,
    front_ends: int,
    summary_json: Path | None,
    seed: int | None,
) -> None:
    """Run wxphone on this machine: sandbox, worker, beat and simulated front ends.

    PostgreSQL and Redis come from WXPHONE_DATABASE_URL / WXPHONE_BROKER_URL / WXPHONE_REDIS_URL
    when they answer (the demo uses its own database and Redis databases 2 and 3 there); else a
    running local server or a private one is used (see `wxphone services`). Everything the demo
    starts is stopped at the end, also on Ctrl-C.
    """
    options = DemoOptions(
        jobs=jobs,
        keep_running=keep_running,
        timeout_seconds=seconds_timeout,
        database=database,
        front_ends=front_ends,
        services=service_options_from_context(),
        summary_json=summary_json,
        seed=seed,
    )
    # The children inherit the environment; run_demo sets the WXPHONE_* variables the demo needs.
    status = run_demo(
        options, get_settings(), inherited_env=dict(os.environ), interactive=sys.stdout.isatty()
    )
    sys.exit(status)
