"""``wxphone sandbox``: run the local WeChat API sandbox."""

from __future__ import annotations

import logging

import click

from worker.sandbox.server import run_sandbox
from worker.sandbox.state import ENDPOINTS, SandboxConfig, SandboxInputError, SandboxState, parse_latency_ms
from worker.settings import get_settings, parse_apps


def _parse_app_options(values: tuple[str, ...]) -> dict[str, str]:
    try:
        apps = parse_apps(",".join(values))
    except ValueError as error:
        raise click.BadParameter(str(error), param_hint="--app") from None
    return {app.appid: app.secret for app in apps}


def _parse_latency_options(values: tuple[str, ...]) -> dict[str, float]:
    latency: dict[str, float] = {}
    for value in values:
        endpoint, sep, milliseconds = value.rpartition("=")
        try:
            number = float(milliseconds)
            latency.update(parse_latency_ms({endpoint: number} if sep else number))
        except (ValueError, SandboxInputError) as error:
            raise click.BadParameter(
                f"{value!r}: expected MS or ENDPOINT=MS ({error})", param_hint="--latency-ms"
            ) from None
    return latency


@click.command("sandbox")
@click.option("--port", type=int, default=8780, show_default=True, help="TCP port (0: any free port).")
@click.option("--host", default="127.0.0.1", show_default=True, help="Interface to listen on.")
@click.option(
    "--app",
    "app_options",
    multiple=True,
    metavar="APPID:SECRET",
    help="Register an app (repeatable). Without it, apps come from WXPHONE_APPS.",
)
@click.option(
    "--token-lifetime-seconds", type=click.FloatRange(min=0, min_open=True), default=7200.0, show_default=True
)
@click.option(
    "--grace-seconds",
    type=click.FloatRange(min=0),
    default=300.0,
    show_default=True,
    help="How long a superseded classic token keeps working.",
)
@click.option("--code-lifetime-seconds", type=click.FloatRange(min=0), default=300.0, show_default=True)
@click.option(
    "--stable-rollover-seconds",
    type=click.FloatRange(min=0),
    default=300.0,
    show_default=True,
    help="A normal stable_token call in a token's last N seconds issues the next token.",
)
@click.option("--force-refresh-daily-limit", type=click.IntRange(min=0), default=20, show_default=True)
@click.option(
    "--force-refresh-spacing-seconds", type=click.FloatRange(min=0), default=30.0, show_default=True
)
@click.option("--classic-token-daily-limit", type=click.IntRange(min=0), default=2000, show_default=True)
@click.option(
    "--latency-ms",
    "latency_options",
    multiple=True,
    metavar="[ENDPOINT=]MS",
    help=f"Delay before each reply: all endpoints, or one of {', '.join(ENDPOINTS)} (repeatable).",
)
@click.option(
    "--access-log/--no-access-log",
    default=False,
    help="Log method, path and status of each request (never query strings: they hold secrets).",
)
def sandbox_command(
    port: int,
    host: str,
    app_options: tuple[str, ...],
    token_lifetime_seconds: float,
    grace_seconds: float,
    code_lifetime_seconds: float,
    stable_rollover_seconds: float,
    force_refresh_daily_limit: int,
    force_refresh_spacing_seconds: float,
    classic_token_daily_limit: int,
    latency_options: tuple[str, ...],
    access_log: bool,
) -> None:
    """Run the local WeChat API sandbox: token, stable_token, getuserphonenumber and
    jscode2session, plus an admin API under /_sandbox/ to mint codes and inject faults."""
    config = SandboxConfig(
        token_lifetime_seconds=token_lifetime_seconds,
        grace_seconds=grace_seconds,
        code_lifetime_seconds=code_lifetime_seconds,
        stable_rollover_seconds=stable_rollover_seconds,
        force_refresh_daily_limit=force_refresh_daily_limit,
        force_refresh_spacing_seconds=force_refresh_spacing_seconds,
        classic_token_daily_limit=classic_token_daily_limit,
    )
    config.latency_ms.update(_parse_latency_options(latency_options))
    if app_options:
        apps = _parse_app_options(app_options)
    else:
        apps = {app.appid: app.secret for app in get_settings().apps}
    if access_log:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    state = SandboxState(config, apps)

    def announce(url: str) -> None:
        names = ", ".join(state.appids) or "none; register them with POST /_sandbox/apps"
        click.echo(f"wxphone sandbox listening on {url} (apps: {names})")

    try:
        run_sandbox(state, host=host, port=port, access_log=access_log, on_ready=announce)
    except OSError as error:
        raise click.ClickException(f"cannot listen on {host}:{port}: {error.strerror or error}") from None
