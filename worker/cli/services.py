"""``wxphone services up|down|status|env``: local PostgreSQL and Redis for the demo and the tests.

A thin layer over :mod:`worker.localservices`. The location options are shared with
``wxphone demo`` (see :func:`service_location_options`); ``scripts/services`` maps its
``WXPHONE_PG_PROBE_PORT``-style variables onto them.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import click

from worker.localservices import (
    PG_PRIVATE_PORT,
    PG_PROBE_HOST,
    PG_PROBE_PORT,
    REDIS_PRIVATE_PORT,
    REDIS_PROBE_HOST,
    REDIS_PROBE_PORT,
    LocalServices,
    NotInstalledError,
    ServiceError,
    ServiceOptions,
    ensure_services,
    find_private_postgres,
    find_private_redis,
    status_lines,
    stop,
)
from worker.settings import get_settings

F = TypeVar("F", bound=Callable[..., Any])

_META_KEY = "wxphone.service_options"


def _remember(ctx: click.Context, param: click.Parameter, value: object) -> object:
    ctx.meta.setdefault(_META_KEY, {})[param.name] = value
    return value


def _location_option(*names: str, **attrs: Any) -> Callable[[F], F]:
    # Not passed to the command function: collected in ctx.meta by _remember instead, so
    # commands sharing them need not list seven parameters each.
    return click.option(*names, expose_value=False, callback=_remember, show_default=True, **attrs)


_LOCATION_OPTIONS: list[Callable[[F], F]] = [
    _location_option(
        "--state-dir",
        type=click.Path(file_okay=False, path_type=Path),
        default=Path(".wxphone"),
        help="Where private servers keep their data.",
    ),
    _location_option("--pg-probe-host", default=PG_PROBE_HOST, help="Look for a running PostgreSQL here."),
    _location_option("--pg-probe-port", type=int, default=PG_PROBE_PORT),
    _location_option("--pg-private-port", type=int, default=PG_PRIVATE_PORT, help="Private cluster's port."),
    _location_option("--redis-probe-host", default=REDIS_PROBE_HOST, help="Look for a running Redis here."),
    _location_option("--redis-probe-port", type=int, default=REDIS_PROBE_PORT),
    _location_option(
        "--redis-private-port", type=int, default=REDIS_PRIVATE_PORT, help="Private Redis's port."
    ),
]


def service_location_options(command: F) -> F:
    """Add the ``--state-dir``/``--*-probe-*``/``--*-private-port`` options to a command.

    Their values are read with :func:`service_options_from_context`, not passed as arguments.
    """
    for option in reversed(_LOCATION_OPTIONS):
        command = option(command)
    return command


def service_options_from_context() -> ServiceOptions:
    """The :class:`ServiceOptions` given on the current command line."""
    values: dict[str, Any] = dict(click.get_current_context().meta.get(_META_KEY, {}))
    values["state_dir"] = Path(values.get("state_dir", ".wxphone")).absolute()
    return ServiceOptions(**values)


def say(message: str) -> None:
    """A progress line on stderr (stdout may be eval'ed by a shell)."""
    click.echo(f"services: {message}", err=True)


@click.group("services")
def services_group() -> None:
    """Local PostgreSQL and Redis: reuse running servers, else start private ones.

    A server already answering on 127.0.0.1:5432 (user postgres, no password) or 127.0.0.1:6379
    is used; otherwise a private one is started from the installed binaries under the state
    folder (ports 55432 and 56379). With neither, the apt-get command to install it is printed.
    """


def _ensure(test_postgres_url: str | None) -> LocalServices:
    settings = get_settings()
    given = settings.model_fields_set
    try:
        return ensure_services(
            service_options_from_context(),
            test_postgres_url=test_postgres_url,
            database_url=settings.database_url if "database_url" in given else None,
            broker_url=settings.broker_url if {"broker_url", "redis_url"} <= given else None,
            redis_url=settings.redis_url if {"broker_url", "redis_url"} <= given else None,
            report=say,
        )
    except NotInstalledError as error:
        say(f"{error.reason}. Install it with:")
        click.echo(error.install_command, err=True)
        raise SystemExit(1) from None
    except ServiceError as error:
        raise click.ClickException(str(error)) from None


_test_postgres_url_option = click.option(
    "--test-postgres-url",
    default=None,
    metavar="URL",
    help="Use this PostgreSQL admin URL as it is instead of looking for a server.",
)


@services_group.command("up")
@service_location_options
@_test_postgres_url_option
def up_command(test_postgres_url: str | None) -> None:
    """Find or start PostgreSQL and Redis and say where they are."""
    services = _ensure(test_postgres_url)
    click.echo(f"postgres  {services.postgres.address}{' (private)' if services.postgres.private else ''}")
    if services.redis is not None:
        click.echo(f"redis     {services.redis.address}{' (private)' if services.redis.private else ''}")
    if services.started:
        click.echo(f"started   {' '.join(services.started)} (stop with: wxphone services down)")


@services_group.command("env")
@service_location_options
@_test_postgres_url_option
def env_command(test_postgres_url: str | None) -> None:
    """Like ``up``, then print ``export WXPHONE_...=...`` lines: eval "$(wxphone services env)"."""
    for line in _ensure(test_postgres_url).export_lines():
        click.echo(line)


@services_group.command("down")
@service_location_options
@click.argument("which", nargs=-1, type=click.Choice(["postgres", "redis"]))
def down_command(which: tuple[str, ...]) -> None:
    """Stop the private servers (data stays in the state folder); never a server not ours."""
    options = service_options_from_context()
    try:
        for name in which or ("postgres", "redis"):
            if name == "postgres":
                postgres = find_private_postgres(options.state_dir, programs=options.programs)
                if postgres is not None:
                    stop(postgres, report=say)
            else:
                redis_instance = find_private_redis(options.state_dir, port=options.redis_private_port)
                if redis_instance is not None:
                    stop(redis_instance, report=say)
    except ServiceError as error:
        raise click.ClickException(str(error)) from None


@services_group.command("status")
@service_location_options
def status_command() -> None:
    """Say what answers where, and which private servers run."""
    for line in status_lines(service_options_from_context()):
        click.echo(line)
