"""``wxphone token``: inspect and refresh the shared access tokens."""

from __future__ import annotations

import json
import time

import click

from worker.errors import WxphoneError
from worker.runtime import get_runtime
from worker.tokens.store import CachedToken


def _selected_apps(appid: str | None) -> list[str]:
    configured = sorted(get_runtime().token_service.apps)
    if appid is None:
        if not configured:
            raise click.ClickException("no apps configured: set WXPHONE_APPS=appid:secret,...")
        return configured
    if appid not in configured:
        raise click.ClickException(f"appid {appid} is not configured (WXPHONE_APPS)")
    return [appid]


def _describe(appid: str, mode: str, token: CachedToken | None, now: float) -> dict[str, object]:
    if token is None:
        return {"appid": appid, "mode": mode, "token": None}
    return {
        "appid": appid,
        "mode": mode,
        "token": token.masked,
        "age_seconds": round(now - token.fetched_at, 1),
        "expires_in_seconds": round(token.expires_at - now, 1),
        "refresh_due_in_seconds": round(max(0.0, token.refresh_at - now), 1),
        "lifetime_seconds": token.expires_in,
        "fence": token.fence,
    }


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
    try:
        rows = [
            _describe(each, runtime.settings.token_mode, runtime.token_store.read(each), now)
            for each in _selected_apps(appid)
        ]
    except WxphoneError as error:
        raise click.ClickException(str(error)) from None
    if as_json:
        click.echo(json.dumps(rows, indent=2))
        return
    for row in rows:
        if row["token"] is None:
            click.echo(f"{row['appid']}  mode={row['mode']}  no token yet")
            continue
        click.echo(
            f"{row['appid']}  mode={row['mode']}  token={row['token']}  age={row['age_seconds']}s  "
            f"expires_in={row['expires_in_seconds']}s  refresh_due_in={row['refresh_due_in_seconds']}s"
        )


@token_group.command("refresh")
@click.option("--appid", default=None, help="Only this app (default: every configured app).")
@click.option(
    "--force",
    is_flag=True,
    help="Stable mode: revoke the current token (for a leak); limited to 20 a day, 30 s apart.",
)
def refresh_command(appid: str | None, force: bool) -> None:
    """Fetch a new token now (operator command)."""
    runtime = get_runtime()
    failed = False
    for each in _selected_apps(appid):
        try:
            token = runtime.token_service.refresh(each, force=force)
        except WxphoneError as error:
            click.echo(f"{each}  refresh failed: {error}", err=True)
            failed = True
            continue
        click.echo(f"{each}  token={token.masked}  expires_in={token.expires_in}s")
    if failed:
        raise SystemExit(1)
