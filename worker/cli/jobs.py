"""``wxphone enqueue``, ``wxphone job show``, ``wxphone user show`` and ``wxphone user find``."""

from __future__ import annotations

import json
from typing import Any

import click

from worker.errors import WxphoneError
from worker.runtime import get_runtime

#: ``job show --wait``'s exit status for a job still open when the wait ended.
STILL_OPEN_EXIT_STATUS = 3


def _print_record(record: dict[str, Any], as_json: bool) -> None:
    if as_json:
        click.echo(json.dumps(record, indent=2))
        return
    width = max(len(key) for key in record)
    for key, value in record.items():
        click.echo(f"{key.ljust(width)}  {'-' if value is None else value}")


@click.command("enqueue")
@click.option("--appid", required=True, help="The mini program's appid.")
@click.option("--openid", required=True, help="The user's openid (from login).")
@click.option("--code", required=True, help="The phone code from getPhoneNumber (e.detail.code).")
def enqueue_command(appid: str, openid: str, code: str) -> None:
    """Submit a phone code for resolution; prints the job id."""
    try:
        job_id = get_runtime().producer.submit_phone_code(appid=appid, openid=openid, code=code)
    except WxphoneError as error:
        raise click.ClickException(str(error)) from None
    click.echo(job_id)


@click.group("job")
def job_group() -> None:
    """Inspect phone-code and login jobs."""


@job_group.command("show")
@click.argument("job_id")
@click.option(
    "--wait",
    "wait_seconds",
    type=click.FloatRange(min=0),
    default=None,
    help="Wait up to SECONDS for the job to end (woken by PostgreSQL, no polling); then show it.",
)
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def job_show_command(job_id: str, wait_seconds: float | None, as_json: bool) -> None:
    """Show one phone or login job: status, error code, attempts and times.

    With --wait, the command exits with status 0 once the job has ended, and 3 when it is still
    open at the end of the wait (shown as it stands)."""
    producer = get_runtime().producer
    job = producer.get_job(job_id) if wait_seconds is None else producer.wait_for_job(job_id, wait_seconds)
    if job is None:
        raise click.ClickException(f"no job with id {job_id}")
    _print_record(job.as_dict(), as_json)
    if wait_seconds is not None and not job.is_terminal:
        raise SystemExit(STILL_OPEN_EXIT_STATUS)


@click.group("user")
def user_group() -> None:
    """Inspect user records."""


@user_group.command("show")
@click.option("--appid", required=True)
@click.option("--openid", required=True)
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def user_show_command(appid: str, openid: str, as_json: bool) -> None:
    """Show a user's record, including the verified phone number."""
    user = get_runtime().producer.get_user(appid=appid, openid=openid)
    if user is None:
        raise click.ClickException(f"no user with appid {appid} and openid {openid}")
    _print_record(user.as_dict(), as_json)


@user_group.command("find")
@click.option("--phone", "phone_number", required=True, help="The number: 13800138000 or +85291234567.")
@click.option("--appid", default=None, help="Only users of this mini program.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON (a list).")
def user_find_command(phone_number: str, appid: str | None, as_json: bool) -> None:
    """Find the users whose verified number is exactly this one (through the blind index)."""
    users = get_runtime().producer.find_users_by_phone(phone_number=phone_number, appid=appid)
    if as_json:
        click.echo(json.dumps([user.as_dict() for user in users], indent=2))
        return
    if not users:
        raise click.ClickException("no user with that phone number")
    for position, user in enumerate(users):
        if position:
            click.echo("")
        _print_record(user.as_dict(), as_json=False)
