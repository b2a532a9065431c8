"""Encrypt phone numbers at rest, store session_keys encrypted, add the exchange audit table.

Upgrade adds the encrypted columns, encrypts every existing plaintext number with the configured
keys (``WXPHONE_ENCRYPTION_KEYS`` / ``WXPHONE_BLIND_INDEX_KEY``, read through
:func:`worker.settings.get_settings`), then drops the plaintext columns. Downgrade re-adds them
and decrypts back into them (session_keys, which the old schema had no place for, are dropped).

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-23 20:40:00.000000
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import sqlalchemy as sa
from alembic import context, op

revision: str = "0002"
down_revision: str | Sequence[str] | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

BATCH_SIZE = 1000

# Frozen copies of models.exchange_audit.CREATE_APPEND_ONLY_FUNCTION_SQL and its trigger.
CREATE_APPEND_ONLY_FUNCTION = """
CREATE OR REPLACE FUNCTION wxphone_refuse_change() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION '% is append-only: % refused', TG_TABLE_NAME, TG_OP
        USING ERRCODE = 'insufficient_privilege';
END;
$$
"""
CREATE_APPEND_ONLY_TRIGGER = (
    "CREATE TRIGGER trg_exchange_audit_append_only BEFORE UPDATE OR DELETE ON exchange_audit "
    "FOR EACH ROW EXECUTE FUNCTION wxphone_refuse_change()"
)


def _protection() -> tuple[Any, Any]:
    """The field cipher and blind index of the configured keys (imported late: settings are
    read only when there are rows to convert)."""
    from worker.crypto import BlindIndex, FieldCipher
    from worker.settings import get_settings

    settings = get_settings()
    if settings.uses_real_wechat and not (settings.encryption_keys and settings.blind_index_key):
        # Never encrypt real numbers under the public development keys.
        raise RuntimeError(
            "set WXPHONE_ENCRYPTION_KEYS and WXPHONE_BLIND_INDEX_KEY before migrating users with "
            "phone numbers (see docs/security.md)"
        )
    return FieldCipher.from_settings(settings), BlindIndex.from_settings(settings)


def _batches(connection: sa.Connection, sql: str) -> Iterator[list[sa.Row[Any]]]:
    last_id = 0
    while True:
        rows = list(connection.execute(sa.text(sql), {"after": last_id, "limit": BATCH_SIZE}))
        if not rows:
            return
        yield rows
        last_id = rows[-1].id


def _require_online(step: str) -> None:
    if context.is_offline_mode():
        raise RuntimeError(f"{step} converts data and cannot run in offline (--sql) mode")


def upgrade() -> None:
    """Add encrypted columns, encrypt existing numbers, drop plaintext; create exchange_audit."""
    _require_online("0002 upgrade")
    op.add_column("users", sa.Column("phone_number_encrypted", sa.Text(), nullable=True))
    op.add_column("users", sa.Column("pure_phone_number_encrypted", sa.Text(), nullable=True))
    op.add_column("users", sa.Column("phone_blind_index", sa.String(length=64), nullable=True))
    op.add_column("users", sa.Column("phone_masked", sa.String(length=32), nullable=True))
    op.add_column("users", sa.Column("session_key_encrypted", sa.Text(), nullable=True))
    op.add_column("users", sa.Column("encryption_key_version", sa.String(length=16), nullable=True))
    op.create_index(
        op.f("ix_users_appid_phone_blind_index"), "users", ["appid", "phone_blind_index"], unique=False
    )

    connection = op.get_bind()
    pending = connection.execute(
        sa.text("SELECT count(*) FROM users WHERE phone_number IS NOT NULL OR pure_phone_number IS NOT NULL")
    ).scalar_one()
    if pending:
        from worker.crypto import mask_phone_number, users_context

        cipher, index = _protection()
        select = (
            "SELECT id, appid, openid, phone_number, pure_phone_number, country_code FROM users "
            "WHERE id > :after AND (phone_number IS NOT NULL OR pure_phone_number IS NOT NULL) "
            "ORDER BY id LIMIT :limit"
        )
        update = sa.text(
            "UPDATE users SET phone_number_encrypted = :phone, pure_phone_number_encrypted = :pure, "
            "phone_blind_index = :blind, phone_masked = :masked, encryption_key_version = :version "
            "WHERE id = :id"
        )
        for rows in _batches(connection, select):
            params = []
            for row in rows:
                pure = row.pure_phone_number or row.phone_number
                phone = row.phone_number or row.pure_phone_number
                params.append(
                    {
                        "id": row.id,
                        "phone": cipher.encrypt(
                            phone, context=users_context("phone_number", row.appid, row.openid)
                        ),
                        "pure": cipher.encrypt(
                            pure, context=users_context("pure_phone_number", row.appid, row.openid)
                        ),
                        "blind": index.of(pure, country_code=row.country_code),
                        "masked": mask_phone_number(pure),
                        "version": cipher.current_version,
                    }
                )
            connection.execute(update, params)
    op.drop_column("users", "pure_phone_number")
    op.drop_column("users", "phone_number")

    op.create_table(
        "exchange_audit",
        sa.Column("id", sa.BigInteger(), sa.Identity(always=False), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), server_default=sa.text("now()"), nullable=False),
        sa.Column("appid", sa.String(length=64), nullable=False),
        sa.Column("openid", sa.String(length=128), nullable=True),
        sa.Column("job_id", sa.String(length=64), nullable=True),
        sa.Column("code_fingerprint", sa.String(length=64), nullable=False),
        sa.Column("api", sa.String(length=16), nullable=False),
        sa.Column("outcome", sa.String(length=16), nullable=False),
        sa.Column("errcode", sa.Integer(), nullable=True),
        sa.Column("error_code", sa.String(length=64), nullable=True),
        sa.Column("rid", sa.String(length=64), nullable=True),
        sa.Column("latency_ms", sa.Integer(), nullable=False),
        sa.Column("caller", sa.String(length=64), nullable=True),
        sa.CheckConstraint("api IN ('phone', 'login')", name=op.f("ck_exchange_audit_api")),
        sa.CheckConstraint(
            "outcome IN ('succeeded', 'failed', 'retrying', 'rejected')",
            name=op.f("ck_exchange_audit_outcome"),
        ),
        sa.CheckConstraint("latency_ms >= 0", name=op.f("ck_exchange_audit_latency_not_negative")),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_exchange_audit")),
    )
    op.create_index(
        op.f("ix_exchange_audit_appid_openid"), "exchange_audit", ["appid", "openid"], unique=False
    )
    op.create_index(op.f("ix_exchange_audit_job_id"), "exchange_audit", ["job_id"], unique=False)
    op.create_index(op.f("ix_exchange_audit_created_at"), "exchange_audit", ["created_at"], unique=False)
    op.execute(CREATE_APPEND_ONLY_FUNCTION)
    op.execute(CREATE_APPEND_ONLY_TRIGGER)


def downgrade() -> None:
    """Drop exchange_audit; decrypt numbers back into plaintext columns; drop encrypted columns."""
    _require_online("0002 downgrade")
    op.drop_table("exchange_audit")  # drops its trigger and indexes
    op.execute("DROP FUNCTION IF EXISTS wxphone_refuse_change()")

    op.add_column("users", sa.Column("phone_number", sa.String(length=32), nullable=True))
    op.add_column("users", sa.Column("pure_phone_number", sa.String(length=32), nullable=True))
    connection = op.get_bind()
    pending = connection.execute(
        sa.text("SELECT count(*) FROM users WHERE phone_number_encrypted IS NOT NULL")
    ).scalar_one()
    if pending:
        from worker.crypto import users_context

        cipher, _ = _protection()
        select = (
            "SELECT id, appid, openid, phone_number_encrypted, pure_phone_number_encrypted FROM users "
            "WHERE id > :after AND phone_number_encrypted IS NOT NULL ORDER BY id LIMIT :limit"
        )
        update = sa.text("UPDATE users SET phone_number = :phone, pure_phone_number = :pure WHERE id = :id")
        for rows in _batches(connection, select):
            params = []
            for row in rows:
                phone = cipher.decrypt(
                    row.phone_number_encrypted, context=users_context("phone_number", row.appid, row.openid)
                )
                pure = (
                    cipher.decrypt(
                        row.pure_phone_number_encrypted,
                        context=users_context("pure_phone_number", row.appid, row.openid),
                    )
                    if row.pure_phone_number_encrypted
                    else None
                )
                params.append({"id": row.id, "phone": phone, "pure": pure})
            connection.execute(update, params)

    op.drop_index(op.f("ix_users_appid_phone_blind_index"), table_name="users")
    for column in (
        "encryption_key_version",
        "session_key_encrypted",
        "phone_masked",
        "phone_blind_index",
        "pure_phone_number_encrypted",
        "phone_number_encrypted",
    ):
        op.drop_column("users", column)
