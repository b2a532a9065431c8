"""One fingerprint key and one blind-index key for the whole fleet, checked in PostgreSQL.

Two workers with different fingerprint keys would each see the other's codes as new (a repeated
code presented twice) and the sweep could not find a job's code claim; different blind-index
keys would make ``find_users_by_phone`` miss users. So each worker, at start-up, compares a keyed
check value of its keys with the one recorded in ``key_checks`` by the first worker (recording it
if there is none) and refuses to start on a mismatch, naming the variable. A front end reading
numbers checks its blind-index key the same way before its first lookup. Changing one of these
keys for the whole fleet: stop every worker, then ``wxphone keys forget-check NAME``.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets

from sqlalchemy import Engine, delete, select
from sqlalchemy.dialects.postgresql import insert

from models import KeyCheck
from worker.settings import SettingsError

__all__ = [
    "SHARED_KEYS",
    "KeyMismatchError",
    "check_value",
    "key_matches",
    "mismatch_error",
    "forget_check",
    "verify_shared_key",
]

#: The setting names of the keys the fleet must share, with the variable that sets each.
SHARED_KEYS: dict[str, str] = {
    "fingerprint_key": "WXPHONE_FINGERPRINT_KEY",
    "blind_index_key": "WXPHONE_BLIND_INDEX_KEY",
}
_CHECK_TEXT = b"wxphone shared key check v1"


class KeyMismatchError(SettingsError):
    """This process's key differs from the one the fleet recorded."""


def check_value(key: str | bytes) -> str:
    """A new check value of ``key``: a random salt and an HMAC of it under the key, so a value
    read from the database is no offline test of guessed keys across deployments."""
    salt = secrets.token_hex(8)
    return f"{salt}:{_mac(key, salt)}"


def key_matches(key: str | bytes, stored: str) -> bool:
    """Whether ``stored`` (a check value) was made with ``key``."""
    salt, _, mac = stored.partition(":")
    return hmac.compare_digest(mac, _mac(key, salt))


def _mac(key: str | bytes, salt: str) -> str:
    raw = key.encode() if isinstance(key, str) else key
    return hmac.new(raw, _CHECK_TEXT + salt.encode(), hashlib.sha256).hexdigest()[:32]


def verify_shared_key(engine: Engine, name: str, key: str, *, record: bool) -> None:
    """Raise :class:`KeyMismatchError` if the fleet recorded another key under ``name``; with
    ``record`` (workers), record this key's check value when none is recorded yet."""
    with engine.begin() as connection:
        if record:
            connection.execute(
                insert(KeyCheck)
                .values(name=name, check_value=check_value(key))
                .on_conflict_do_nothing(index_elements=["name"])
            )
        stored = connection.execute(
            select(KeyCheck.check_value).where(KeyCheck.name == name)
        ).scalar_one_or_none()
    if stored is not None and not key_matches(key, stored):
        raise mismatch_error(name)


def mismatch_error(name: str) -> KeyMismatchError:
    """The error of a process whose ``name`` key differs from the fleet's."""
    return KeyMismatchError(
        f"{SHARED_KEYS[name]} differs from the key the fleet's workers use (recorded in PostgreSQL "
        "table key_checks): every worker and front end needs the same one. To change it for the "
        f"whole fleet, stop every worker and run `wxphone keys forget-check {name}`"
    )


def forget_check(engine: Engine, name: str) -> bool:
    """Forget the recorded check value of ``name`` (before the fleet changes that key)."""
    with engine.begin() as connection:
        return bool(connection.execute(delete(KeyCheck).where(KeyCheck.name == name)).rowcount)
