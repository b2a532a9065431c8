"""``key_checks``: a keyed check value of each key every worker must share.

Workers fingerprint codes (duplicate detection, the sweep's view of a job's code claim) and
build the phone number's blind index with keys that must be the same across the whole fleet. A
worker records an HMAC of a fixed text under each key the first time and refuses to start when its
key gives another value. The check value reveals nothing about the key.
"""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import String
from sqlalchemy.orm import Mapped, mapped_column

from models.base import Base, created_at_column

__all__ = ["KeyCheck"]


class KeyCheck(Base):
    """The check value of one shared key, by the setting's name (``fingerprint_key``, ...)."""

    __tablename__ = "key_checks"

    name: Mapped[str] = mapped_column(String(64), primary_key=True)
    check_value: Mapped[str] = mapped_column(String(64), nullable=False)
    created_at: Mapped[datetime] = created_at_column()

    def __repr__(self) -> str:
        return f"KeyCheck(name={self.name!r})"
