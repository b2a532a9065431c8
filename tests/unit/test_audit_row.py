"""An audit row has exactly the columns the hand-written success statement inserts."""

from __future__ import annotations

import time

from models.exchange_audit import AuditApi
from worker.audit import AUDIT_ROW_COLUMNS, AuditEntry, audit_row


def test_audit_rows_have_exactly_the_listed_columns() -> None:
    entry = AuditEntry(AuditApi.PHONE, "wxaudit000000001", "oAudit", "job-1", "f" * 64, "web")
    row = audit_row(entry, started=time.monotonic())
    # worker.jobs.statements inserts these columns, in this order, for a successful exchange.
    assert tuple(row) == AUDIT_ROW_COLUMNS
