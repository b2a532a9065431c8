"""Bounded waiting: every wait in the test suite has a deadline."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


def wait_for(
    predicate: Callable[[], T], *, timeout_seconds: float, interval_seconds: float = 0.05, what: str = ""
) -> T:
    """Poll ``predicate`` until it returns a truthy value; fail the test after ``timeout_seconds``."""
    deadline = time.monotonic() + timeout_seconds
    last: T = predicate()
    while not last:
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out after {timeout_seconds:.1f}s waiting for {what or predicate}")
        time.sleep(interval_seconds)
        last = predicate()
    return last
