"""``wxphone keys status`` and ``wxphone keys rotate``: the encryption keys of stored personal data.

Rotation re-encrypts, under the current key (``WXPHONE_ENCRYPTION_KEY_VERSION``, default the
highest of ``WXPHONE_ENCRYPTION_KEYS``), every ``users`` row whose key version is another one. It
works in batches, one transaction each, taking rows with ``FOR UPDATE SKIP LOCKED``: workers keep
writing meanwhile (a row a worker holds is skipped and picked up by a later batch or run), and
running it again is harmless. See docs/security.md for the whole procedure.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import click
from sqlalchemy import ColumnElement, func, select, update
from sqlalchemy.orm import Session, sessionmaker

from models import User
from worker.crypto import DecryptionError, FieldCipher, users_context
from worker.keychecks import SHARED_KEYS, forget_check
from worker.runtime import get_runtime

__all__ = ["RotationResult", "keys_group", "key_version_counts", "rotate_keys"]

#: The encrypted columns of ``users`` and the column name their associated data uses.
ENCRYPTED_COLUMNS: tuple[tuple[str, str], ...] = (
    ("phone_number_encrypted", "phone_number"),
    ("pure_phone_number_encrypted", "pure_phone_number"),
    ("session_key_encrypted", "session_key"),
)


class RotationError(Exception):
    """A stored value cannot be decrypted with the configured keys (names the row id only)."""


@dataclass(frozen=True)
class RotationResult:
    rotated: int
    batches: int
    remaining: int


def _outdated(current: str) -> ColumnElement[bool]:
    return User.encryption_key_version.is_not(None) & (User.encryption_key_version != current)


def rotate_keys(
    sessions: sessionmaker[Session],
    cipher: FieldCipher,
    *,
    batch_size: int = 500,
    progress: Callable[[int, int], None] | None = None,
) -> RotationResult:
    """Re-encrypt every row not under ``cipher.current_version``; see the module docstring."""
    current = cipher.current_version
    rotated = batches = 0
    while True:
        with sessions.begin() as session:
            rows = session.execute(
                select(User)
                .where(_outdated(current))
                .order_by(User.id)
                .limit(batch_size)
                .with_for_update(skip_locked=True)
            ).scalars()
            count = 0
            for user in rows:
                values: dict[str, str] = {}
                for attribute, column in ENCRYPTED_COLUMNS:
                    stored: str | None = getattr(user, attribute)
                    if stored is None or FieldCipher.version_of(stored) == current:
                        continue
                    context = users_context(column, user.appid, user.openid)
                    try:
                        values[attribute] = cipher.reencrypt(stored, context=context)
                    except DecryptionError as error:
                        raise RotationError(f"users row {user.id}, {column}: {error}") from None
                session.execute(
                    update(User).where(User.id == user.id).values(encryption_key_version=current, **values)
                )
                count += 1
        if count == 0:
            break
        rotated += count
        batches += 1
        if progress is not None:
            progress(rotated, batches)
    with sessions() as session:
        remaining = session.execute(
            select(func.count()).select_from(User).where(_outdated(current))
        ).scalar_one()
    return RotationResult(rotated=rotated, batches=batches, remaining=int(remaining))


def key_version_counts(sessions: sessionmaker[Session]) -> dict[str | None, int]:
    """Rows of ``users`` per key version (None: a row without any ciphertext)."""
    with sessions() as session:
        rows = session.execute(
            select(User.encryption_key_version, func.count()).group_by(User.encryption_key_version)
        ).all()
    return {version: int(count) for version, count in rows}


@click.group("keys")
def keys_group() -> None:
    """Encryption keys of stored phone numbers and session_keys."""


@keys_group.command("status")
def keys_status_command() -> None:
    """Show the configured key versions and how many users rows each one protects."""
    runtime = get_runtime()
    cipher = runtime.protection.cipher
    click.echo(f"current key version: {cipher.current_version}")
    click.echo(f"configured versions: {', '.join(cipher.versions)}")
    counts = key_version_counts(runtime.sessions)
    if not counts:
        click.echo("no users rows")
    for version, count in sorted(counts.items(), key=lambda item: (item[0] is None, item[0] or "")):
        label = "(no ciphertext)" if version is None else version
        marker = "" if version in (None, cipher.current_version) else "  <- needs `wxphone keys rotate`"
        click.echo(f"  {label}: {count}{marker}")


@keys_group.command("rotate")
@click.option("--batch-size", default=500, show_default=True, type=click.IntRange(1, 100_000))
def keys_rotate_command(batch_size: int) -> None:
    """Re-encrypt every users row under the current key version, in batches, while workers run."""
    runtime = get_runtime()
    cipher = runtime.protection.cipher
    click.echo(f"re-encrypting under key version {cipher.current_version} (batches of {batch_size})")

    def progress(rotated: int, batches: int) -> None:
        click.echo(f"  batch {batches}: {rotated} rows re-encrypted so far")

    try:
        result = rotate_keys(runtime.sessions, cipher, batch_size=batch_size, progress=progress)
    except RotationError as error:
        raise click.ClickException(f"{error}; is its key still listed in WXPHONE_ENCRYPTION_KEYS?") from None
    click.echo(f"done: {result.rotated} rows re-encrypted in {result.batches} batches")
    if result.remaining:
        click.echo(f"{result.remaining} rows were busy (locked by a worker) and remain: run it again")
        raise SystemExit(1)


@keys_group.command("forget-check")
@click.argument("name", type=click.Choice(sorted(SHARED_KEYS)))
def keys_forget_check_command(name: str) -> None:
    """Forget the fleet's recorded check of a shared key (fingerprint_key or blind_index_key).

    Workers refuse to start with a key other than the one the first worker recorded. To change
    the key for the whole fleet, stop every worker, run this, then start them with the new key.
    """
    forgotten = forget_check(get_runtime().engine, name)
    click.echo(f"{name}: {'check forgotten' if forgotten else 'no check was recorded'}")
