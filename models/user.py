"""``users``: one row per mini-program user, holding the verified phone number once known.

The number is stored encrypted (:mod:`worker.crypto`): AES-GCM ciphertexts bound to the row, a
keyed blind index for exact lookups and a masked form for display. The session_key of the last
login is stored encrypted the same way. No column holds a number or a session_key in plain text.
"""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import BigInteger, DateTime, Identity, Index, String, Text, UniqueConstraint
from sqlalchemy.orm import Mapped, mapped_column

from models.base import Base, created_at_column, maintain_updated_at, updated_at_column

__all__ = ["User"]


class User(Base):
    """A WeChat user of one mini program, identified by (appid, openid)."""

    __tablename__ = "users"
    # openid is only unique within one appid: the same person has a different openid per app.
    __table_args__ = (
        UniqueConstraint("appid", "openid"),
        # Exact lookup by phone number within an app (and across apps by the second column).
        Index(None, "appid", "phone_blind_index"),
    )

    id: Mapped[int] = mapped_column(BigInteger, Identity(), primary_key=True)
    appid: Mapped[str] = mapped_column(String(64), nullable=False)
    openid: Mapped[str] = mapped_column(String(128), nullable=False)
    unionid: Mapped[str | None] = mapped_column(String(128), nullable=True)
    #: The number as WeChat shows it (``phoneNumber``), encrypted: ``<key version>:<base64>``.
    phone_number_encrypted: Mapped[str | None] = mapped_column(Text, nullable=True)
    #: The number without the country code (``purePhoneNumber``), encrypted.
    pure_phone_number_encrypted: Mapped[str | None] = mapped_column(Text, nullable=True)
    #: Keyed HMAC of country code + number (64 hex characters), for exact lookups.
    phone_blind_index: Mapped[str | None] = mapped_column(String(64), nullable=True)
    #: For display only: ``138****8000``.
    phone_masked: Mapped[str | None] = mapped_column(String(32), nullable=True)
    #: The session_key of the last login, encrypted.
    session_key_encrypted: Mapped[str | None] = mapped_column(Text, nullable=True)
    #: The key version of every ciphertext in this row (``wxphone keys rotate`` moves it forward).
    encryption_key_version: Mapped[str | None] = mapped_column(String(16), nullable=True)
    #: Always a string of digits such as ``"86"``, never an int (a leading zero would be lost).
    country_code: Mapped[str | None] = mapped_column(String(8), nullable=True)
    phone_verified_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    #: When the code behind the stored number was issued (WeChat's ``watermark.timestamp``, the
    #: user's tap) and when its job was submitted: a verification that is older by this pair never
    #: replaces the stored number, whatever order the jobs finish in.
    phone_code_issued_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    phone_job_created_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    created_at: Mapped[datetime] = created_at_column()
    updated_at: Mapped[datetime] = updated_at_column()

    def __repr__(self) -> str:
        # Deliberately without phone numbers: reprs end up in logs.
        return f"User(id={self.id!r}, appid={self.appid!r}, openid={self.openid!r})"


maintain_updated_at(Base.metadata.tables[User.__tablename__])
