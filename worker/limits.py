"""Fleet-wide limits on outgoing WeChat calls, per (appid, API), kept in Redis.

Three mechanisms share one gate, checked by one Lua script before every phone or login call:

* a **rate limit**: at most N calls per window (``WXPHONE_RATE_LIMIT_*_PER_WINDOW``), counted for
  the whole fleet, so adding workers never adds WeChat traffic beyond what is configured;
* a **pause**: when WeChat answers 45011 (minute quota reached) on the phone API, whose quota is
  the app's, every worker holds that app's calls until the window ends instead of hammering
  WeChat. (code2Session's 45011 is a per-user limit: :mod:`worker.jobs.login` retries only that
  login and pauses nothing.)
* a **circuit**: when WeChat answers 45009 (daily quota exhausted), the circuit opens for that
  app and API until midnight Beijing time, when WeChat restores daily quotas (or until an
  operator closes it with ``wxphone limits close-circuit``). Jobs that meet an open circuit end
  ``failed``/``quota_exhausted`` at once: a phone code lives five minutes, the quota will not
  return within that time, and failing fast tells the front end to stop prompting users.

The token API has a circuit too (``API_TOKEN``): a 45009 from the token endpoint opens it, and
the token service fetches no token for the app until it closes (jobs fail ``quota_exhausted`` once
no valid token is stored). Phone and login calls keep their own circuits.

For an API without a per-window limit there is nothing to count, so a worker process that found
the gate open trusts that for ``WXPHONE_CALL_GATE_REUSE_SECONDS`` (1 s) before asking Redis again:
a pause or circuit set by one process holds back the others' calls within that time (its own at
once). A call that slips through in that second meets the same 45011 or 45009 at WeChat and is
handled the same way.

Keys name the appid and API only::

    wxphone:limit:{appid}:{api}:{window}   int   calls counted in that window
    wxphone:pause:{appid}:{api}            str   present while paused (PX expiry)
    wxphone:circuit:{appid}:{api}          str   present while open (PX expiry)
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from typing import Any

import redis

from worker.errors import OperatorActionRequiredError, RetryLaterError

__all__ = [
    "API_LOGIN",
    "API_PHONE",
    "API_TOKEN",
    "CallGate",
    "CircuitOpenError",
    "GateState",
    "LimitsUnavailableError",
    "LocallyRateLimitedError",
    "seconds_to_window_end",
]

log = logging.getLogger(__name__)

API_PHONE = "phone"
API_LOGIN = "login"
#: The access-token API (classic or stable, whichever mode is configured): only a circuit.
API_TOKEN = "token"
KEY_PREFIX = "wxphone"
BEIJING = timezone(timedelta(hours=8))

# Returns {0, 0} when the call may go, {1, wait_ms} when limited or paused, {2, ttl_ms} when the
# circuit is open. The counter is taken only when the call may go.
_ACQUIRE = """
local circuit = redis.call('PTTL', KEYS[1])
if circuit > 0 or circuit == -1 then
  return {2, circuit}
end
local paused = redis.call('PTTL', KEYS[2])
if paused > 0 then
  return {1, paused}
end
local limit = tonumber(ARGV[1])
if limit > 0 then
  local used = redis.call('INCR', KEYS[3])
  if used == 1 then
    redis.call('PEXPIRE', KEYS[3], ARGV[2])
  end
  if used > limit then
    return {1, tonumber(ARGV[3])}
  end
end
return {0, 0}
"""


class LimitsUnavailableError(RetryLaterError):
    """Redis, which holds the fleet's limits, cannot be reached."""

    error_code = "limits_unavailable"


class LocallyRateLimitedError(RetryLaterError):
    """The fleet-wide limit (or a 45011 pause) holds this call back for ``wait_seconds``."""

    error_code = "rate_limited"

    def __init__(self, message: str, *, wait_seconds: float) -> None:
        super().__init__(message)
        self.wait_seconds = wait_seconds


class CircuitOpenError(OperatorActionRequiredError):
    """The daily quota of this app and API is exhausted; no call is made until it returns."""

    error_code = "quota_exhausted"


@dataclass(frozen=True)
class GateState:
    """What the gate holds for one (appid, API), for operators."""

    appid: str
    api: str
    used_this_window: int
    limit_per_window: int
    paused_for_seconds: float
    circuit_open_for_seconds: float


class CallGate:
    """Checks and records fleet-wide limits on WeChat calls."""

    def __init__(
        self,
        client: redis.Redis,
        *,
        limits_per_window: Mapping[str, int],
        window_seconds: float = 60.0,
        open_reuse_seconds: float = 0.0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._redis = client
        self.limits_per_window = dict(limits_per_window)
        self.window_seconds = window_seconds
        #: For an API without a per-window limit there is nothing to count: a process that found
        #: the gate open (no circuit, no pause) trusts that for this long before asking again.
        self.open_reuse_seconds = open_reuse_seconds
        self._open_until: dict[tuple[str, str], float] = {}
        #: When this process last paused or opened the circuit of (appid, api): a check that
        #: began before then must not mark the gate open.
        self._closed_at: dict[tuple[str, str], float] = {}
        self._local_lock = threading.Lock()
        self._clock = clock
        self._acquire = client.register_script(_ACQUIRE)

    @staticmethod
    def _circuit_key(appid: str, api: str) -> str:
        return f"{KEY_PREFIX}:circuit:{appid}:{api}"

    @staticmethod
    def _pause_key(appid: str, api: str) -> str:
        return f"{KEY_PREFIX}:pause:{appid}:{api}"

    def _counter_key(self, appid: str, api: str, now: float) -> str:
        return f"{KEY_PREFIX}:limit:{appid}:{api}:{int(now // self.window_seconds)}"

    def seconds_to_window_end(self, now: float | None = None) -> float:
        return seconds_to_window_end(self.window_seconds, self._clock() if now is None else now)

    def acquire(self, appid: str, api: str) -> None:
        """Let one call through, or raise :class:`LocallyRateLimitedError` / :class:`CircuitOpenError`."""
        now = self._clock()
        limit = self.limits_per_window.get(api, 0)
        reusable = limit == 0 and self.open_reuse_seconds > 0
        if reusable and now < self._open_until.get((appid, api), 0.0):
            return
        wait_ms = int(self.seconds_to_window_end(now) * 1000) + 1
        keys = [
            self._circuit_key(appid, api),
            self._pause_key(appid, api),
            self._counter_key(appid, api, now),
        ]
        args = [limit, int(self.window_seconds * 2000), wait_ms]
        verdict, milliseconds = self._call(self._acquire, keys=keys, args=args)
        if verdict == 0 and reusable:
            with self._local_lock:
                if now > self._closed_at.get((appid, api), float("-inf")):
                    self._open_until[(appid, api)] = now + self.open_reuse_seconds
        if verdict == 2:
            raise CircuitOpenError(f"{appid}: daily quota of the {api} API exhausted; circuit open")
        if verdict == 1:
            wait_seconds = max(0.05, int(milliseconds) / 1000)
            raise LocallyRateLimitedError(
                f"{appid}: {api} calls held back for {wait_seconds:.1f}s", wait_seconds=wait_seconds
            )

    def pause_until_window_end(self, appid: str, api: str) -> float:
        """After a 45011: hold every worker's calls for this app and API until the window ends."""
        wait_seconds = self.seconds_to_window_end()
        self._close_locally(appid, api)
        self._call(self._redis.set, self._pause_key(appid, api), "45011", px=int(wait_seconds * 1000) + 1)
        return wait_seconds

    def open_circuit(self, appid: str, api: str) -> bool:
        """After a 45009: open the circuit until midnight Beijing time; True if this call opened it."""
        ttl_seconds = _seconds_to_beijing_midnight(self._clock())
        self._close_locally(appid, api)
        opened = self._call(
            self._redis.set, self._circuit_key(appid, api), "45009", px=int(ttl_seconds * 1000), nx=True
        )
        return bool(opened)

    def circuit_open_seconds(self, appid: str, api: str) -> float:
        """How long the circuit of (appid, api) stays open (0 when closed); always asks Redis."""
        ttl_ms = int(self._call(self._redis.pttl, self._circuit_key(appid, api)))
        if ttl_ms == -1:
            return float("inf")  # no expiry: open until an operator closes it
        return max(0, ttl_ms) / 1000

    def close_circuit(self, appid: str, api: str) -> bool:
        """Operator action: let calls through again (after ``clear_quota``, say)."""
        return bool(self._call(self._redis.delete, self._circuit_key(appid, api)))

    def _close_locally(self, appid: str, api: str) -> None:
        """Forget that the gate was open: this process's next call asks Redis."""
        with self._local_lock:
            self._closed_at[(appid, api)] = self._clock()
            self._open_until.pop((appid, api), None)

    def state(self, appid: str, api: str) -> GateState:
        """Counters and timers of one (appid, API)."""
        now = self._clock()
        used = self._call(self._redis.get, self._counter_key(appid, api, now))
        paused = self._call(self._redis.pttl, self._pause_key(appid, api))
        circuit = self._call(self._redis.pttl, self._circuit_key(appid, api))
        return GateState(
            appid=appid,
            api=api,
            used_this_window=int(used or 0),
            limit_per_window=self.limits_per_window.get(api, 0),
            paused_for_seconds=max(0, int(paused)) / 1000,
            circuit_open_for_seconds=max(0, int(circuit)) / 1000,
        )

    @staticmethod
    def _call(operation: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        try:
            return operation(*args, **kwargs)
        except redis.RedisError:
            raise LimitsUnavailableError("limits store (Redis) unreachable") from None


def seconds_to_window_end(window_seconds: float, now: float) -> float:
    """Seconds until the current window (windows are aligned to the epoch, like WeChat's minutes) ends."""
    return window_seconds - (now % window_seconds)


def _seconds_to_beijing_midnight(now: float) -> float:
    local = datetime.fromtimestamp(now, BEIJING)
    midnight = (local + timedelta(days=1)).replace(hour=0, minute=0, second=0, microsecond=0)
    return max(1.0, (midnight - local).total_seconds())
