"""The per-session request limit of ``wxphone api``: a fixed window, counted fleet-wide in Redis.

Every API process of the fleet counts a session's requests in one Redis key, so a client that
spreads its requests over several processes behind a load balancer meets the same limit. The
window opens with the session's first request and lasts :data:`WINDOW_SECONDS` by Redis's own
clock (the key's time to live), so the processes' clocks play no part. The key is named by the
random session id the session carries, which is no secret (it is readable in the session, and
forges nothing); never by the session string itself.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import redis

__all__ = ["WINDOW_SECONDS", "RateDecision", "SessionRateLimiter"]

#: The limit is per minute (``WXPHONE_API_RATE_LIMIT_PER_MINUTE``).
WINDOW_SECONDS = 60
KEY_PREFIX = "wxphone:api:rate:"


@dataclass(frozen=True)
class RateDecision:
    """Whether one request may go on, and when the window ends (whole seconds, at least 1)."""

    allowed: bool
    retry_after_seconds: int


class SessionRateLimiter:
    """Counts requests per session id; raises :class:`redis.RedisError` when Redis is out of reach
    (the caller answers 503 rather than serve without a limit)."""

    def __init__(self, client: redis.Redis, *, limit_per_window: int) -> None:
        self.client = client
        self.limit_per_window = limit_per_window

    def hit(self, session_id: str) -> RateDecision:
        """Count one request of ``session_id`` in its current window."""
        key = KEY_PREFIX + session_id
        with self.client.pipeline(transaction=True) as pipe:
            # SET NX EX opens the window with its expiry; INCR keeps that expiry.
            pipe.set(key, 0, ex=WINDOW_SECONDS, nx=True)
            pipe.incr(key)
            pipe.pttl(key)
            _, count, ttl_ms = pipe.execute()
        if int(ttl_ms) < 0:
            # No expiry (a key written by something else): never let it block a session forever.
            self.client.expire(key, WINDOW_SECONDS)
            ttl_ms = WINDOW_SECONDS * 1000
        retry_after = max(1, math.ceil(int(ttl_ms) / 1000))
        return RateDecision(allowed=int(count) <= self.limit_per_window, retry_after_seconds=retry_after)
