"""wxphone's database tables.

Importing this package registers every table on :data:`Base.metadata`, which the migrations
compare against.
"""

from __future__ import annotations

from models.base import NAMING_CONVENTION, Base
from models.code_claim import TERMINAL_CLAIM_STATUSES, CodeClaim, CodeClaimStatus
from models.exchange_audit import AuditApi, AuditOutcome, ExchangeAudit
from models.key_check import KeyCheck
from models.login_job import LoginJob
from models.phone_job import TERMINAL_JOB_STATUSES, PhoneJob, PhoneJobStatus
from models.user import User

__all__ = [
    "NAMING_CONVENTION",
    "TERMINAL_CLAIM_STATUSES",
    "TERMINAL_JOB_STATUSES",
    "AuditApi",
    "AuditOutcome",
    "Base",
    "CodeClaim",
    "CodeClaimStatus",
    "ExchangeAudit",
    "KeyCheck",
    "LoginJob",
    "PhoneJob",
    "PhoneJobStatus",
    "User",
]
