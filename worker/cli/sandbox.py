"""``wxphone sandbox``: run the local WeChat API sandbox."""

from __future__ import annotations

import click


@click.command("sandbox")
@click.option("--port", type=int, default=8780, show_default=True)
def sandbox_command(port: int) -> None:
    """Run the local WeChat API sandbox (not implemented yet)."""
    raise click.ClickException("not implemented yet")
