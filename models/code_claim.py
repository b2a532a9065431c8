"""``code_claims``: the idempotency record that lets only one submission exchange a given code."""

from __future__ import annotations

from datetime import datetime
from enum import StrEnum

from sqlalchemy import CheckConstraint, String, text
from sqlalchemy.orm import Mapped, mapped_column

from models.base import (
    Base,
    created_at_column,
    in_values_check,
    maintain_updated_at,
    updated_at_column,
)

__all__ = ["TERMINAL_CLAIM_STATUSES", "CodeClaim", "CodeClaimStatus"]


class CodeClaimStatus(StrEnum):
    """The state of the one WeChat exchange of a code."""

    PENDING = "pending"
    EXCHANGING = "exchanging"
    SUCCEEDED = "succeeded"
    FAILED = "failed"


#: Statuses a claim never leaves.
TERMINAL_CLAIM_STATUSES = frozenset({CodeClaimStatus.SUCCEEDED, CodeClaimStatus.FAILED})


class CodeClaim(Base):
    """The first submission of an (appid, code) pair; later submissions defer to its outcome.

    Writers insert with ``INSERT ... ON CONFLICT DO NOTHING``: the primary key makes exactly one
    submission the owner, even when several workers race.
    """

    __tablename__ = "code_claims"
    __table_args__ = (CheckConstraint(in_values_check("status", CodeClaimStatus), name="status"),)

    appid: Mapped[str] = mapped_column(String(64), primary_key=True)
    #: The same keyed HMAC of the code as ``phone_jobs.code_fingerprint``.
    code_fingerprint: Mapped[str] = mapped_column(String(64), primary_key=True)
    #: The job that owns the WeChat exchange for this code.
    job_id: Mapped[str] = mapped_column(String(64), nullable=False)
    status: Mapped[str] = mapped_column(
        String(16), nullable=False, server_default=text(f"'{CodeClaimStatus.PENDING.value}'")
    )
    error_code: Mapped[str | None] = mapped_column(String(64), nullable=True)
    created_at: Mapped[datetime] = created_at_column()
    updated_at: Mapped[datetime] = updated_at_column()

    def __repr__(self) -> str:
        return f"CodeClaim(appid={self.appid!r}, job_id={self.job_id!r}, status={self.status!r})"


maintain_updated_at(Base.metadata.tables[CodeClaim.__tablename__])
