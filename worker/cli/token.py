"""``wxphone token``: inspect and refresh the shared access tokens."""

from __future__ import annotations

import json
import time

import click

from worker.errors import WxphoneError
from worker.limits import API_TOKEN
from worker.runtime import get_runtime
from worker.tokens.errors import ForceRefreshFailedError, ForceRefreshRefusedError
from worker.tokens.store import CachedToken, FetchBlock


def _selected_apps(appid: str | None) -> list[str]:
    configured = sorted(get_runtime().token_service.apps)
    if appid is None:
        if not configured:
            raise click.ClickException("no apps configured: set WXPHONE_APPS=appid:secret,...")
        return configured
    if appid not in configured:
        raise click.ClickException(f"appid {appid} is not configured (WXPHONE_APPS)")
    return [appid]


def _describe(
    appid: str,
    mode: str,
    token: CachedToken | None,
    block: FetchBlock,
    token_circuit_seconds: float,
    now: float,
) -> dict[str, object]:
    row: dict[str, object] = {"appid": appid, "mode": mode, "token": None}
    if token is not None:
        row.update(
            token=token.masked,
            age_seconds=round(now - token.fetched_at, 1),
            expires_in_seconds=round(token.expires_at - now, 1),
            refresh_due_in_seconds=round(max(0.0, token.refresh_at - now), 1),
            lifetime_seconds=token.expires_in,
            fence=token.fence,
        )
    record = block.configuration_error
    if record is not None:
        # The record's detail is an error message (API, errcode or HTTP status, rid): no secret.
        row["configuration_error"] = {
            "detail": record.detail,
            "retry_in_seconds": round(record.expires_in_seconds, 1),
        }
    if block.backoff_seconds > 0:
        row["fetch_backoff"] = {"reason": block.backoff_reason, "seconds": round(block.backoff_seconds, 1)}
    if token_circuit_seconds > 0:
        row["token_circuit_open_seconds"] = round(min(token_circuit_seconds, 86400.0), 1)
    return row


@click.group("token")
def token_group() -> None:
    """Inspect and refresh the shared access tokens."""


@token_group.command("show")
@click.option("--appid", default=None, help="Only this app (default: every configured app).")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def show_command(appid: str | None, as_json: bool) -> None:
    """Show each app's token (masked), its age, expiry and mode."""
    runtime = get_runtime()
    now = time.time()
    store = runtime.token_store
    try:
        rows = [
            _describe(
                each,
                runtime.settings.token_mode,
                store.read(each),
                store.fetch_block(each),
                runtime.gate.circuit_open_seconds(each, API_TOKEN),
                now,
            )
            for each in _selected_apps(appid)
        ]
    except WxphoneError as error:
        raise click.ClickException(str(error)) from None
    if as_json:
        click.echo(json.dumps(rows, indent=2))
        return
    for row in rows:
        if row["token"] is None:
            line = f"{row['appid']}  mode={row['mode']}  no token yet"
        else:
            line = (
                f"{row['appid']}  mode={row['mode']}  token={row['token']}  age={row['age_seconds']}s  "
                f"expires_in={row['expires_in_seconds']}s  refresh_due_in={row['refresh_due_in_seconds']}s"
            )
        click.echo(line)
        if "configuration_error" in row:
            record = row["configuration_error"]
            assert isinstance(record, dict)
            click.echo(
                f"  fetching stopped: {record['detail']}; retried in {record['retry_in_seconds']}s "
                f"or after `wxphone token clear-error {row['appid']}`"
            )
        if "fetch_backoff" in row:
            backoff = row["fetch_backoff"]
            assert isinstance(backoff, dict)
            click.echo(f"  fetching backed off for {backoff['seconds']}s after: {backoff['reason']}")
        if "token_circuit_open_seconds" in row:
            click.echo(
                f"  token circuit open (45009) for {row['token_circuit_open_seconds']}s "
                f"(`wxphone limits close-circuit --appid {row['appid']} --api token`)"
            )


@token_group.command("refresh")
@click.option("--appid", default=None, help="Only this app (default: every configured app).")
@click.option(
    "--force",
    is_flag=True,
    help="Stable mode: revoke the current token (for a leak); limited to 20 a day, 30 s apart.",
)
def refresh_command(appid: str | None, force: bool) -> None:
    """Fetch a new token now (operator command).

    With ``--force`` the command makes the forced call itself (waiting for a refresh in progress)
    or exits 1 saying it did not force.
    """
    runtime = get_runtime()
    failed = False
    for each in _selected_apps(appid):
        try:
            token = runtime.token_service.refresh(each, force=force)
        except (ForceRefreshFailedError, ForceRefreshRefusedError) as error:
            click.echo(f"{each}  {error}", err=True)  # says whether a token was forced
            failed = True
            continue
        except WxphoneError as error:
            # Raised before any call to WeChat (token store, a recorded fetch error, ...).
            click.echo(f"{each}  {'not forced' if force else 'refresh failed'}: {error}", err=True)
            failed = True
            continue
        forced = "forced  " if force else ""
        click.echo(f"{each}  {forced}token={token.masked}  expires_in={token.expires_in}s")
    if failed:
        raise SystemExit(1)


@token_group.command("clear-error")
@click.argument("appid")
def clear_error_command(appid: str) -> None:
    """Let token fetches resume after a configuration error was fixed outside wxphone (an IP
    whitelist, an unfrozen AppSecret), and drop a fetch backoff. The token circuit (45009) is
    closed with ``wxphone limits close-circuit --api token``."""
    runtime = get_runtime()
    try:
        _selected_apps(appid)
        cleared = runtime.token_service.clear_fetch_errors(appid)
    except WxphoneError as error:
        raise click.ClickException(str(error)) from None
    if cleared:
        click.echo(f"{appid}  cleared: the next read fetches a token")
    else:
        click.echo(f"{appid}  nothing recorded: token fetches were not held back")
