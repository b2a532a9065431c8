"""``wxphone token``: inspect and refresh access tokens."""

from __future__ import annotations

import click


@click.group("token")
def token_group() -> None:
    """Inspect and refresh the shared access tokens."""
