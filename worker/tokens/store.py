"""Where the fleet's one access token per app lives: Redis, with a lease lock and fenced writes.

Keys name the appid only (never a secret or a token)::

    wxphone:token:{mode}:{appid}          hash  value, expires_at, refresh_at, fetched_at, expires_in, fence
    wxphone:token-lock:{appid}            str   owner id of the refresh lease (PX expiry)
    wxphone:token-fence:{appid}           int   fencing counter, incremented on every lease grant
    wxphone:token-backoff:{appid}         str   the failed fetch's error; present while no fetch may be
                                                made (PX expiry: the backoff)
    wxphone:token-failures:{appid}        int   failed fetches in a row (forgotten 10 min after the last)
    wxphone:token-config-error:{appid}    hash  credentials (a keyed hash, never the secret), api,
                                                error_code, detail, recorded_at (PX expiry)
    wxphone:token-force:{appid}:{day}     int   stable force refreshes used that Beijing day (UTC+8)
    wxphone:token-force-last:{appid}      str   present while the 30 s force-refresh spacing runs
    wxphone:alert:{appid}:{topic}         str   present while an operator alert is not to be repeated

Every multi-step change is one Lua script, so it is atomic in Redis:

* a lease is granted together with a new fence number;
* a token is written only if its fence is still the newest one granted, so a slow, older refresh
  that finishes late can never overwrite a newer token (or resurrect a dropped one); the write
  also clears the failed-fetch records, since the fetch worked;
* a failed fetch increments the failure count and sets the backoff in one step;
* a token is deleted only if it is still the one that failed (compare-and-delete);
* a lease is released only by its owner.

Backoff and records expire in Redis (PX), so every process sees the same deadlines whatever its
own clock says.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, TypeVar

import redis

from worker.limits import BEIJING
from worker.tokens.errors import TokenStoreUnavailableError
from worker.wechat.types import AccessToken, mask_secret

__all__ = [
    "CachedToken",
    "ConfigurationErrorRecord",
    "FetchBlock",
    "ForceBudget",
    "TokenStore",
    "beijing_day",
]

KEY_PREFIX = "wxphone"
#: Never treat a token as usable in the last stretch of its life: a call made then may arrive late.
USABLE_MARGIN_MAX_SECONDS = 30.0
USABLE_MARGIN_FRACTION = 0.1
#: WeChat's stable_token issues a new token only in the last 5 minutes of the current one's life;
#: a normal-mode call before that hands back the same token (and a shorter ``expires_in``).
STABLE_RENEWAL_WINDOW_SECONDS = 300.0
#: So a stable token's scheduled refresh waits until this long before expiry: inside the window,
#: with room for several of beat's checks (one a minute by default) before workers stop using it.
STABLE_REFRESH_LEAD_SECONDS = 240.0

T = TypeVar("T")

_ACQUIRE_LEASE = """
if redis.call('SET', KEYS[1], ARGV[1], 'NX', 'PX', ARGV[2]) then
  return redis.call('INCR', KEYS[2])
end
return 0
"""

_FENCED_WRITE = """
if tonumber(redis.call('GET', KEYS[2]) or '0') ~= tonumber(ARGV[1]) then
  return 0
end
redis.call('DEL', KEYS[1], KEYS[3], KEYS[4], KEYS[5])
redis.call('HSET', KEYS[1], 'value', ARGV[2], 'expires_at', ARGV[3], 'refresh_at', ARGV[4],
           'fetched_at', ARGV[5], 'expires_in', ARGV[6], 'fence', ARGV[1])
redis.call('PEXPIRE', KEYS[1], ARGV[7])
return 1
"""

# KEYS: backoff, failures. ARGV: base ms, cap ms, minimum ms, failure memory ms, reason.
# Returns {failures in a row, backoff ms}.
_RECORD_FETCH_FAILURE = """
local failures = redis.call('INCR', KEYS[2])
redis.call('PEXPIRE', KEYS[2], ARGV[4])
local delay = tonumber(ARGV[1]) * 2 ^ math.min(failures - 1, 40)
delay = math.min(delay, tonumber(ARGV[2]))
delay = math.max(delay, tonumber(ARGV[3]), 1)
delay = math.floor(delay)
redis.call('SET', KEYS[1], ARGV[5], 'PX', delay)
return {failures, delay}
"""

# KEYS: config error. ARGV: credentials digest, api, error_code, detail, recorded_at, ttl ms.
# Returns 1 when the record is new (no record, or one for other credentials), else 0.
_RECORD_CONFIG_ERROR = """
local previous = redis.call('HGET', KEYS[1], 'credentials')
redis.call('DEL', KEYS[1])
redis.call('HSET', KEYS[1], 'credentials', ARGV[1], 'api', ARGV[2], 'error_code', ARGV[3],
           'detail', ARGV[4], 'recorded_at', ARGV[5])
redis.call('PEXPIRE', KEYS[1], ARGV[6])
if previous == ARGV[1] then
  return 0
end
return 1
"""

_COMPARE_AND_DELETE = """
if redis.call('HGET', KEYS[1], 'value') == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
"""

_RELEASE_LEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
"""

_SPEND_FORCE_BUDGET = """
if redis.call('EXISTS', KEYS[2]) == 1 then
  return -1
end
local used = tonumber(redis.call('GET', KEYS[1]) or '0')
if used >= tonumber(ARGV[1]) then
  return -2
end
redis.call('INCR', KEYS[1])
redis.call('EXPIRE', KEYS[1], 172800)
redis.call('SET', KEYS[2], '1', 'EX', ARGV[2])
return used + 1
"""

_REFUND_FORCE_BUDGET = """
if tonumber(redis.call('GET', KEYS[1]) or '0') > 0 then
  return redis.call('DECR', KEYS[1])
end
return 0
"""


@dataclass(frozen=True)
class CachedToken:
    """A token as stored for the fleet, with the timing derived from WeChat's ``expires_in``."""

    value: str = field(repr=False)
    expires_at: float
    refresh_at: float
    fetched_at: float
    expires_in: int
    fence: int

    def is_usable(self, now: float) -> bool:
        """Whether business calls may still use this token."""
        margin = min(USABLE_MARGIN_MAX_SECONDS, self.expires_in * USABLE_MARGIN_FRACTION)
        return now < self.expires_at - margin

    def is_refresh_due(self, now: float) -> bool:
        """Whether the scheduled refresh should replace this token now."""
        return now >= self.refresh_at or not self.is_usable(now)

    @property
    def masked(self) -> str:
        """The token for display: only its last characters."""
        return mask_secret(self.value)


@dataclass(frozen=True)
class ForceBudget:
    """Stable-token force refreshes: used today (Beijing day) and whether the spacing window runs."""

    used_today: int
    spacing_active: bool


@dataclass(frozen=True)
class ConfigurationErrorRecord:
    """A token fetch WeChat refused for a configuration reason, as recorded for the fleet."""

    #: Keyed hash of the credentials and destination that failed (never the secret itself).
    credentials: str
    api: str
    error_code: str
    detail: str
    recorded_at: float
    #: How long until the record lapses and one fetch tries again.
    expires_in_seconds: float


@dataclass(frozen=True)
class FetchBlock:
    """What holds back token fetches of one app: a configuration error and/or a backoff."""

    configuration_error: ConfigurationErrorRecord | None
    backoff_seconds: float
    backoff_reason: str | None

    @property
    def blocked(self) -> bool:
        return self.configuration_error is not None or self.backoff_seconds > 0


class TokenStore:
    """Redis operations on the shared tokens. Redis errors become :class:`TokenStoreUnavailableError`."""

    def __init__(self, client: redis.Redis, *, mode: str, clock: Callable[[], float] = time.time) -> None:
        self._redis = client
        self.mode = mode
        self._clock = clock
        self._acquire = client.register_script(_ACQUIRE_LEASE)
        self._write = client.register_script(_FENCED_WRITE)
        self._compare_and_delete = client.register_script(_COMPARE_AND_DELETE)
        self._release = client.register_script(_RELEASE_LEASE)
        self._spend_force = client.register_script(_SPEND_FORCE_BUDGET)
        self._refund_force = client.register_script(_REFUND_FORCE_BUDGET)
        self._record_failure = client.register_script(_RECORD_FETCH_FAILURE)
        self._record_config_error = client.register_script(_RECORD_CONFIG_ERROR)

    # -- keys -----------------------------------------------------------------------------

    def token_key(self, appid: str) -> str:
        return f"{KEY_PREFIX}:token:{self.mode}:{appid}"

    @staticmethod
    def lock_key(appid: str) -> str:
        return f"{KEY_PREFIX}:token-lock:{appid}"

    @staticmethod
    def fence_key(appid: str) -> str:
        return f"{KEY_PREFIX}:token-fence:{appid}"

    @staticmethod
    def backoff_key(appid: str) -> str:
        return f"{KEY_PREFIX}:token-backoff:{appid}"

    @staticmethod
    def failures_key(appid: str) -> str:
        return f"{KEY_PREFIX}:token-failures:{appid}"

    @staticmethod
    def config_error_key(appid: str) -> str:
        return f"{KEY_PREFIX}:token-config-error:{appid}"

    @staticmethod
    def alert_key(appid: str, topic: str) -> str:
        return f"{KEY_PREFIX}:alert:{appid}:{topic}"

    @staticmethod
    def _force_keys(appid: str, day: str) -> list[str]:
        return [f"{KEY_PREFIX}:token-force:{appid}:{day}", f"{KEY_PREFIX}:token-force-last:{appid}"]

    # -- operations -----------------------------------------------------------------------

    def read(self, appid: str) -> CachedToken | None:
        """The stored token of ``appid``, or None when there is none (or it has expired)."""
        stored = self._call(self._redis.hgetall, self.token_key(appid))
        raw = {_text(key): _text(value) for key, value in stored.items()}
        if "value" not in raw:
            return None
        try:
            return CachedToken(
                value=raw["value"],
                expires_at=float(raw["expires_at"]),
                refresh_at=float(raw["refresh_at"]),
                fetched_at=float(raw["fetched_at"]),
                expires_in=int(raw["expires_in"]),
                fence=int(raw["fence"]),
            )
        except (KeyError, ValueError):
            return None  # a damaged entry is treated as absent and gets replaced

    def try_acquire_lease(self, appid: str, owner: str, *, lease_seconds: float) -> int:
        """Try to take the refresh lease; return the new fence number, or 0 if someone holds it."""
        keys = [self.lock_key(appid), self.fence_key(appid)]
        fence = self._call(self._acquire, keys=keys, args=[owner, int(lease_seconds * 1000)])
        return int(fence)

    def release_lease(self, appid: str, owner: str) -> bool:
        """Release the lease if ``owner`` still holds it."""
        return bool(self._call(self._release, keys=[self.lock_key(appid)], args=[owner]))

    @contextmanager
    def lease(self, appid: str, *, lease_seconds: float) -> Iterator[int]:
        """Hold the refresh lease for the block; yields the fence (0 when not granted)."""
        owner = uuid.uuid4().hex
        fence = self.try_acquire_lease(appid, owner, lease_seconds=lease_seconds)
        try:
            yield fence
        finally:
            if fence:
                # If Redis is gone the lease simply expires on its own.
                with suppress(TokenStoreUnavailableError):
                    self.release_lease(appid, owner)

    def write(
        self, appid: str, token: AccessToken, *, fence: int, refresh_fraction: float
    ) -> CachedToken | None:
        """Store a freshly fetched token if ``fence`` is still the newest lease; else return None."""
        now = self._clock()
        cached = CachedToken(
            value=token.value,
            expires_at=now + token.expires_in,
            refresh_at=now + self.refresh_delay_seconds(token.expires_in, refresh_fraction),
            fetched_at=now,
            expires_in=token.expires_in,
            fence=fence,
        )
        args: list[Any] = [
            fence,
            cached.value,
            repr(cached.expires_at),
            repr(cached.refresh_at),
            repr(cached.fetched_at),
            cached.expires_in,
            int(token.expires_in * 1000),
        ]
        keys = [
            self.token_key(appid),
            self.fence_key(appid),
            self.backoff_key(appid),
            self.failures_key(appid),
            self.config_error_key(appid),
        ]
        written = self._call(self._write, keys=keys, args=args)
        return cached if written else None

    def refresh_delay_seconds(self, expires_in: int, refresh_fraction: float) -> float:
        """How long after a fetch the scheduled refresh is due.

        ``refresh_fraction`` of the lifetime; for a stable token no earlier than the renewal
        window, since an earlier call would only get the same token back (one call per lifetime
        instead of two).
        """
        delay = expires_in * refresh_fraction
        if self.mode == "stable":
            delay = max(delay, expires_in - STABLE_REFRESH_LEAD_SECONDS)
        return delay

    def delete_if_current(self, appid: str, failed_value: str) -> bool:
        """Drop the stored token only if it is still ``failed_value`` (compare-and-delete)."""
        deleted = self._call(self._compare_and_delete, keys=[self.token_key(appid)], args=[failed_value])
        return bool(deleted)

    # -- failed fetches ---------------------------------------------------------------------

    def record_fetch_failure(
        self,
        appid: str,
        *,
        base_seconds: float,
        max_seconds: float,
        min_seconds: float,
        memory_seconds: float,
        reason: str,
    ) -> tuple[int, float]:
        """Count a failed fetch and hold back every fetch of ``appid`` for the backoff.

        The backoff is ``base_seconds`` doubled per failure in a row, at most ``max_seconds``,
        at least ``min_seconds``. ``reason`` (an error message: no secret) is shown to readers.
        Returns (failures in a row, backoff seconds).
        """
        keys = [self.backoff_key(appid), self.failures_key(appid)]
        args = [
            int(base_seconds * 1000),
            int(max_seconds * 1000),
            int(min_seconds * 1000),
            int(memory_seconds * 1000),
            reason,
        ]
        failures, delay_ms = self._call(self._record_failure, keys=keys, args=args)
        return int(failures), int(delay_ms) / 1000

    def record_configuration_error(
        self, appid: str, *, credentials: str, api: str, error_code: str, detail: str, retry_seconds: float
    ) -> bool:
        """Stop fetches of ``appid`` with these ``credentials`` (a keyed hash) for ``retry_seconds``.

        Returns True when the record is new: nothing was recorded, or it was for other credentials.
        """
        args: list[Any] = [
            credentials,
            api,
            error_code,
            detail,
            repr(self._clock()),
            int(retry_seconds * 1000),
        ]
        recorded = self._call(self._record_config_error, keys=[self.config_error_key(appid)], args=args)
        return bool(recorded)

    def fetch_block(self, appid: str) -> FetchBlock:
        """The recorded configuration error and the backoff of ``appid``, read together."""

        def read(pipe: redis.client.Pipeline) -> list[Any]:
            pipe.hgetall(self.config_error_key(appid))
            pipe.pttl(self.config_error_key(appid))
            pipe.get(self.backoff_key(appid))
            pipe.pttl(self.backoff_key(appid))
            return list(pipe.execute())

        stored, record_ttl_ms, reason, backoff_ttl_ms = self._call(self._pipelined, read)
        raw = {_text(key): _text(value) for key, value in stored.items()}
        record: ConfigurationErrorRecord | None = None
        if "credentials" in raw:
            try:
                record = ConfigurationErrorRecord(
                    credentials=raw["credentials"],
                    api=raw.get("api", ""),
                    error_code=raw.get("error_code", ""),
                    detail=raw.get("detail", ""),
                    recorded_at=float(raw.get("recorded_at", "0")),
                    expires_in_seconds=max(0, int(record_ttl_ms)) / 1000,
                )
            except ValueError:
                record = None  # a damaged record: the next fetch tries again
        backoff_seconds = max(0, int(backoff_ttl_ms)) / 1000 if reason is not None else 0.0
        return FetchBlock(
            configuration_error=record,
            backoff_seconds=backoff_seconds,
            backoff_reason=_text(reason) if reason is not None else None,
        )

    def clear_fetch_errors(self, appid: str) -> bool:
        """Operator action: forget the configuration error and the backoff; True if any was set."""
        keys = [self.config_error_key(appid), self.backoff_key(appid), self.failures_key(appid)]
        return bool(self._call(self._redis.delete, *keys))

    def claim_alert(self, appid: str, topic: str, *, repeat_seconds: float) -> bool:
        """True for the first caller fleet-wide within ``repeat_seconds`` (SET NX): that one alerts."""
        claimed = self._call(
            self._redis.set, self.alert_key(appid, topic), "1", nx=True, px=int(repeat_seconds * 1000)
        )
        return bool(claimed)

    # -- force-refresh budget ----------------------------------------------------------------

    def force_day(self) -> str:
        """Today as WeChat counts its daily quotas: the date in Beijing (UTC+8)."""
        return beijing_day(self._clock())

    def spend_force_refresh(
        self, appid: str, *, daily_limit: int, spacing_seconds: int, day: str | None = None
    ) -> int:
        """Count one force refresh against the budget of ``day`` (default: today in Beijing).

        Returns the number used that day including this one, ``-1`` while the spacing window
        runs, or ``-2`` when the daily budget is spent.
        """
        keys = self._force_keys(appid, day or self.force_day())
        return int(self._call(self._spend_force, keys=keys, args=[daily_limit, spacing_seconds]))

    def refund_force_refresh(self, appid: str, *, day: str) -> None:
        """Give back one force refresh of ``day``: WeChat did not perform it."""
        self._call(self._refund_force, keys=self._force_keys(appid, day)[:1], args=[])

    def exhaust_force_budget(self, appid: str, *, day: str, daily_limit: int) -> None:
        """WeChat says the force refreshes of ``day`` are used up (another system used some)."""
        day_key = self._force_keys(appid, day)[0]
        self._call(self._redis.set, day_key, daily_limit, ex=172800)

    def restart_force_spacing(self, appid: str, *, spacing_seconds: int) -> None:
        """Start the spacing window again when a force call ends: WeChat measures from the call."""
        last_key = self._force_keys(appid, self.force_day())[1]
        self._call(self._redis.set, last_key, "1", ex=spacing_seconds)

    def force_budget(self, appid: str) -> ForceBudget:
        """How much of today's (Beijing day's) force-refresh budget is used."""
        day_key, last_key = self._force_keys(appid, self.force_day())
        used = self._call(self._redis.get, day_key)
        spacing = self._call(self._redis.exists, last_key)
        return ForceBudget(used_today=int(used or 0), spacing_active=bool(spacing))

    def _pipelined(self, operations: Callable[[redis.client.Pipeline], T]) -> T:
        with self._redis.pipeline(transaction=True) as pipe:
            return operations(pipe)

    def ping(self) -> bool:
        """Whether Redis answers."""
        return bool(self._call(self._redis.ping))

    @staticmethod
    def _call(operation: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        try:
            return operation(*args, **kwargs)
        except redis.RedisError:
            # The redis-py message names only host and port, but we keep our own text anyway.
            raise TokenStoreUnavailableError("token store (Redis) unreachable") from None


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


def beijing_day(now: float) -> str:
    """The date (``YYYYMMDD``) in Beijing at Unix time ``now``: WeChat's quota day."""
    return datetime.fromtimestamp(now, BEIJING).strftime("%Y%m%d")
