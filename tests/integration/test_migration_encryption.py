"""Migration 0002 encrypts the numbers written before it, and its downgrade decrypts them back."""

from __future__ import annotations

import base64
import os
from collections.abc import Iterator

import pytest
from alembic import command
from sqlalchemy import Engine, text

from tests.support.services import create_database, drop_database
from worker import db
from worker.crypto import BlindIndex, FieldCipher, users_context
from worker.settings import get_settings, parse_encryption_keys

KEYS = "v1:" + base64.b64encode(os.urandom(32)).decode()
BLIND_INDEX_KEY = "migration-test-blind-index-key-0123"
ROWS = [
    ("wxmigration00001", "oMigrate0001", "13800138000", "13800138000", "86"),
    ("wxmigration00001", "oMigrate0002", "+85291234567", "91234567", "852"),
    ("wxmigration00002", "oMigrate0001", "13900139000", "13900139000", "86"),
]


@pytest.fixture
def keyed_settings(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Process settings with explicit keys (the migration reads them through get_settings)."""
    for name in list(os.environ):
        if name.startswith("WXPHONE_"):
            monkeypatch.delenv(name)
    monkeypatch.setenv("WXPHONE_ENCRYPTION_KEYS", KEYS)
    monkeypatch.setenv("WXPHONE_BLIND_INDEX_KEY", BLIND_INDEX_KEY)
    get_settings.cache_clear()
    yield
    get_settings.cache_clear()


@pytest.fixture
def engine() -> Iterator[tuple[str, Engine]]:
    url = create_database("wxphone_migrate_data")
    engine = db.make_engine(url)
    yield url, engine
    engine.dispose()
    drop_database(url)


def test_upgrade_encrypts_existing_numbers_and_downgrade_restores_them(
    keyed_settings: None, engine: tuple[str, Engine]
) -> None:
    url, eng = engine
    config = db.alembic_config(url)
    command.upgrade(config, "0001")
    with eng.begin() as conn:
        for appid, openid, phone, pure, country in ROWS:
            conn.execute(
                text(
                    "INSERT INTO users (appid, openid, phone_number, pure_phone_number, country_code) "
                    "VALUES (:a, :o, :p, :q, :c)"
                ),
                {"a": appid, "o": openid, "p": phone, "q": pure, "c": country},
            )
        conn.execute(text("INSERT INTO users (appid, openid) VALUES ('wxmigration00001', 'oNoPhone001')"))

    command.upgrade(config, "0002")

    cipher = FieldCipher(parse_encryption_keys(KEYS), "v1")
    index = BlindIndex(BLIND_INDEX_KEY)
    with eng.connect() as conn:
        columns = set(
            conn.execute(
                text("SELECT column_name FROM information_schema.columns WHERE table_name = 'users'")
            ).scalars()
        )
        assert "phone_number" not in columns and "pure_phone_number" not in columns
        rows = {(row.appid, row.openid): row for row in conn.execute(text("SELECT * FROM users ORDER BY id"))}
        dump = str(conn.execute(text("SELECT * FROM users")).all())
    for appid, openid, phone, pure, country in ROWS:
        assert phone not in dump and pure not in dump
        row = rows[(appid, openid)]
        assert row.encryption_key_version == "v1"
        assert (
            cipher.decrypt(row.phone_number_encrypted, context=users_context("phone_number", appid, openid))
            == phone
        )
        assert (
            cipher.decrypt(
                row.pure_phone_number_encrypted, context=users_context("pure_phone_number", appid, openid)
            )
            == pure
        )
        assert row.phone_blind_index == index.of(pure, country_code=country)
        assert row.phone_masked.endswith(pure[-4:]) and "****" in row.phone_masked
    assert rows[("wxmigration00001", "oMigrate0002")].phone_blind_index == index.of("+85291234567")
    no_phone = rows[("wxmigration00001", "oNoPhone001")]
    assert (no_phone.phone_number_encrypted, no_phone.encryption_key_version) == (None, None)

    command.downgrade(config, "0001")

    with eng.connect() as conn:
        restored = {
            (row.appid, row.openid): (row.phone_number, row.pure_phone_number, row.country_code)
            for row in conn.execute(text("SELECT * FROM users WHERE phone_number IS NOT NULL"))
        }
    assert restored == {(a, o): (p, q, c) for a, o, p, q, c in ROWS}


def test_upgrade_refuses_development_keys_for_real_numbers(
    monkeypatch: pytest.MonkeyPatch, engine: tuple[str, Engine]
) -> None:
    """Against the real WeChat API, existing numbers are never encrypted under public keys."""
    for name in list(os.environ):
        if name.startswith("WXPHONE_"):
            monkeypatch.delenv(name)
    get_settings.cache_clear()
    url, eng = engine
    config = db.alembic_config(url)
    command.upgrade(config, "0001")
    with eng.begin() as conn:
        conn.execute(
            text(
                "INSERT INTO users (appid, openid, phone_number, pure_phone_number, country_code) "
                "VALUES ('wxmigration00001', 'oMigrate0001', '13800138000', '13800138000', '86')"
            )
        )
    try:
        with pytest.raises(RuntimeError, match="WXPHONE_ENCRYPTION_KEYS"):
            command.upgrade(config, "0002")
    finally:
        get_settings.cache_clear()
    assert db.current_revision(eng) == "0001"
    with eng.connect() as conn:
        assert conn.execute(text("SELECT phone_number FROM users")).scalar_one() == "13800138000"
