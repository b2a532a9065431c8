"""``wxphone doctor`` and ``wxphone limits``: operator checks and controls."""

from __future__ import annotations

import json

import click

from worker.doctor import run_checks
from worker.limits import API_LOGIN, API_PHONE, API_TOKEN
from worker.runtime import get_runtime
from worker.settings import get_settings

_MARK = {"ok": "ok  ", "warn": "WARN", "fail": "FAIL"}


@click.command("doctor")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def doctor_command(as_json: bool) -> None:
    """Check both Redis roles (persistence, eviction), database schema, apps, WeChat base URL and keys."""
    findings = run_checks(get_settings())
    if as_json:
        click.echo(json.dumps([finding.__dict__ for finding in findings], indent=2))
    else:
        for finding in findings:
            click.echo(f"{_MARK[finding.verdict]}  {finding.check:<24} {finding.detail}")
    if any(finding.verdict == "fail" for finding in findings):
        raise SystemExit(1)


@click.group("limits")
def limits_group() -> None:
    """Show and reset the fleet-wide limits on WeChat calls."""


@limits_group.command("show")
@click.option("--appid", default=None, help="Only this app.")
def limits_show_command(appid: str | None) -> None:
    """Calls this window, pauses (45011) and open circuits (45009) per app and API."""
    runtime = get_runtime()
    appids = [appid] if appid else sorted(runtime.settings.apps_by_id)
    for each in appids:
        for api in (API_PHONE, API_LOGIN, API_TOKEN):
            state = runtime.gate.state(each, api)
            limit = state.limit_per_window or "unlimited"
            click.echo(
                f"{each}  {api:<5}  used={state.used_this_window}/{limit}  "
                f"paused={state.paused_for_seconds:.0f}s  circuit_open={state.circuit_open_for_seconds:.0f}s"
            )


@limits_group.command("close-circuit")
@click.option("--appid", required=True)
@click.option(
    "--api", type=click.Choice([API_PHONE, API_LOGIN, API_TOKEN]), default=API_PHONE, show_default=True
)
def close_circuit_command(appid: str, api: str) -> None:
    """Let calls through again after a 45009 (for example after clear_quota); ``--api token``
    lets token fetches through again."""
    closed = get_runtime().gate.close_circuit(appid, api)
    click.echo(f"{appid} {api}: circuit {'closed' if closed else 'was not open'}")
