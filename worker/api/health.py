"""``GET /healthz``: are the broker, Redis and the database reachable from this API process?

Each check is a blocking call with its own socket timeouts, run on a small pool of threads of
its own (so a hung dependency never takes the threads requests use) and abandoned after
:data:`CHECK_TIMEOUT_SECONDS`. The answer names each dependency and says ``ok`` or
``unreachable``: never a URL, host or password.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Literal

import redis
from kombu.connection import Connection
from sqlalchemy import text
from sqlalchemy.orm import Session, sessionmaker

from worker.settings import is_redis_url

__all__ = [
    "CHECK_TIMEOUT_SECONDS",
    "Check",
    "HealthChecks",
    "HealthReport",
    "broker_check",
    "database_check",
    "redis_check",
]

#: How long one check may take before its dependency counts as unreachable.
CHECK_TIMEOUT_SECONDS = 3.0
#: Socket timeouts of the checks' own connections (below the check's timeout).
CONNECT_TIMEOUT_SECONDS = 2.0
#: Threads for checks: three dependencies, and room for one more round while a check hangs.
CHECK_THREADS = 6

Check = Callable[[], object]
Verdict = Literal["ok", "unreachable"]


def redis_check(client: redis.Redis) -> Check:
    """PING through ``client`` (the token store / limits Redis the API uses)."""
    return client.ping


def broker_check(broker_url: str) -> Check:
    """A round trip to the broker: PING for Redis, a connection for RabbitMQ."""
    if is_redis_url(broker_url):
        client = redis.Redis.from_url(
            broker_url, socket_timeout=CONNECT_TIMEOUT_SECONDS, socket_connect_timeout=CONNECT_TIMEOUT_SECONDS
        )
        return client.ping

    def connect() -> None:
        connect_to: Any = Connection  # kombu is untyped
        connection: Any = connect_to(broker_url, connect_timeout=CONNECT_TIMEOUT_SECONDS)
        with connection:
            connection.ensure_connection(max_retries=1, timeout=CONNECT_TIMEOUT_SECONDS)

    return connect


def database_check(sessions: sessionmaker[Session]) -> Check:
    """``SELECT 1`` on a pooled connection of the producer's database."""

    def select_one() -> None:
        with sessions() as session:
            session.execute(text("SELECT 1"))

    return select_one


@dataclass(frozen=True)
class HealthReport:
    """Each dependency's verdict; healthy when all are ``ok``."""

    checks: dict[str, Verdict]

    @property
    def healthy(self) -> bool:
        return all(verdict == "ok" for verdict in self.checks.values())


class HealthChecks:
    """Runs named checks concurrently on threads of its own, each bounded in time."""

    def __init__(
        self, checks: Mapping[str, Check], *, timeout_seconds: float = CHECK_TIMEOUT_SECONDS
    ) -> None:
        self.checks = dict(checks)
        self.timeout_seconds = timeout_seconds
        self._executor = concurrent.futures.ThreadPoolExecutor(
            max_workers=CHECK_THREADS, thread_name_prefix="wxphone-health"
        )

    async def run(self) -> HealthReport:
        """Every check at once; the report once all have answered or timed out."""
        names = list(self.checks)
        verdicts = await asyncio.gather(*(self._verdict(self.checks[name]) for name in names))
        return HealthReport(checks=dict(zip(names, verdicts, strict=True)))

    async def _verdict(self, check: Check) -> Verdict:
        loop = asyncio.get_running_loop()
        try:
            await asyncio.wait_for(loop.run_in_executor(self._executor, check), self.timeout_seconds)
        except Exception:  # any failure of any client library means: not reachable from here
            return "unreachable"
        return "ok"

    def close(self) -> None:
        """Stop the check threads (a check still running is left to its socket timeout)."""
        self._executor.shutdown(wait=False, cancel_futures=True)
