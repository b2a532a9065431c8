"""The ``wxphone`` command line. Each sub-command lives in its own module of this package."""

from __future__ import annotations

import sys

import click

from worker.cli.api import api_command
from worker.cli.config import config_group
from worker.cli.db import db_group
from worker.cli.demo import demo_command
from worker.cli.doctor import doctor_command, limits_group
from worker.cli.jobs import enqueue_command, job_group, user_group
from worker.cli.keys import keys_group
from worker.cli.processes import beat_command, worker_command
from worker.cli.sandbox import sandbox_command
from worker.cli.services import services_group
from worker.cli.token import token_group
from worker.settings import SettingsError


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="wxphone")
def cli() -> None:
    """wxphone: WeChat phone codes in, verified phone numbers in PostgreSQL out."""


cli.add_command(sandbox_command)
cli.add_command(worker_command)
cli.add_command(beat_command)
cli.add_command(token_group)
cli.add_command(db_group)
cli.add_command(enqueue_command)
cli.add_command(job_group)
cli.add_command(user_group)
cli.add_command(keys_group)
cli.add_command(doctor_command)
cli.add_command(config_group)
cli.add_command(limits_group)
cli.add_command(services_group)
cli.add_command(demo_command)
cli.add_command(api_command)


def main() -> None:
    """Console-script entry point: run the CLI, turning configuration errors into a clear exit."""
    try:
        cli.main(prog_name="wxphone", standalone_mode=True)
    except SettingsError as error:
        click.echo(f"wxphone: {error}", err=True)
        sys.exit(2)
