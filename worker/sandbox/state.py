"""The sandbox's in-memory emulation of WeChat's token, phone-number and login APIs.

Nothing here knows about HTTP: :class:`SandboxState` takes already-parsed request fields, returns
the JSON body WeChat would send, and keeps the counters the admin API reports. The HTTP layer
(:mod:`worker.sandbox.server`) calls it from a single event loop without awaiting in between, so
each call is atomic. Time comes from an injectable clock (Unix seconds) so tests can drive token
expiry, grace periods and daily quotas without sleeping.

Deliberate choices where WeChat's documentation is silent or ambiguous:

* A wrong secret is answered with ``40125`` on every endpoint (WeChat also uses ``40001`` on
  ``/cgi-bin/token``); ``40001`` is reserved for rejected access tokens on business calls.
* Classic tokens: each fetch issues a new token; every token it supersedes keeps working for
  ``grace_seconds`` after being superseded (then ``40001``), and any token past its lifetime gets
  ``42001``.
* Stable tokens: a ``force_refresh`` call made less than ``force_refresh_spacing_seconds`` after the
  previous forced refresh performs no refresh, returns the current token and does not count
  against the daily force limit. A forced refresh retires every older stable token at once.
* A token's ``expires_in`` is its remaining lifetime rounded down, never less than 1.
* The daily quotas reset at midnight China time (UTC+8).
* The watermark timestamp of a phone number is the moment its code was minted (when the user
  tapped the button), not the moment of the exchange.
* ``code_presentations`` counts how often a phone code reached the code check, i.e. requests
  whose access token was accepted.
"""

from __future__ import annotations

import base64
import itertools
import math
import random
import secrets
import time
from collections import Counter, deque
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field, fields
from typing import Any, Literal

from worker.settings import APPID_PATTERN
from worker.wechat.errors import API_CLASSIC_TOKEN, API_CODE_TO_SESSION, API_PHONE_NUMBER, API_STABLE_TOKEN

__all__ = [
    "ENDPOINTS",
    "Clock",
    "Fault",
    "SandboxConfig",
    "SandboxInputError",
    "SandboxState",
]

Clock = Callable[[], float]
Timing = Literal["before", "after"]
Reply = dict[str, Any]

#: The emulated WeChat endpoints, named like the client's API names.
ENDPOINTS: tuple[str, ...] = (API_CLASSIC_TOKEN, API_STABLE_TOKEN, API_PHONE_NUMBER, API_CODE_TO_SESSION)
TOKEN_ENDPOINTS = frozenset({API_CLASSIC_TOKEN, API_STABLE_TOKEN})

#: WeChat's daily quotas roll over at midnight Beijing time.
_CHINA_UTC_OFFSET_SECONDS = 8 * 3600
_SECONDS_PER_DAY = 86400
#: How long an expired token is still recognised (and answered with 42001 rather than 40001).
EXPIRED_TOKEN_MEMORY_SECONDS = 3600.0
#: How long a used or expired code is kept so that re-presentations are still counted as such.
SPENT_CODE_MEMORY_SECONDS = 3600.0
#: Records are swept once the store has grown this much since the previous sweep.
_SWEEP_MIN_SIZE = 4096
MAX_CODES_PER_MINT = 100_000

ERRMSG: dict[int, str] = {
    -1: "system error",
    40001: "invalid credential, access_token is invalid or not latest",
    40002: "invalid grant_type",
    40013: "invalid appid",
    40029: "invalid code",
    40125: "invalid appsecret",
    40226: "code blocked",
    41001: "access_token missing",
    41002: "appid missing",
    41004: "appsecret missing",
    41008: "missing code",
    42001: "access_token expired",
    43001: "require GET method",
    43002: "require POST method",
    45009: "reach max api daily quota limit",
    45011: "api minute-quota reach limit mustslower retry next minute",
    47001: "data format error",
}


class SandboxInputError(ValueError):
    """An admin request carried an invalid value; the message says which."""


# -- configuration ----------------------------------------------------------------------------


@dataclass
class SandboxConfig:
    """Every tunable of the emulation; all of them can change at runtime."""

    token_lifetime_seconds: float = 7200.0
    grace_seconds: float = 300.0
    code_lifetime_seconds: float = 300.0
    stable_rollover_seconds: float = 300.0
    force_refresh_daily_limit: int = 20
    force_refresh_spacing_seconds: float = 30.0
    classic_token_daily_limit: int = 2000
    #: Delay added before each reply, per endpoint.
    latency_ms: dict[str, float] = field(default_factory=lambda: dict.fromkeys(ENDPOINTS, 0.0))

    def as_dict(self) -> dict[str, Any]:
        """A JSON-ready copy."""
        return asdict(self)

    def copy(self) -> SandboxConfig:
        """An independent copy."""
        return SandboxConfig(**{**asdict(self), "latency_ms": dict(self.latency_ms)})

    def update(self, changes: Mapping[str, object]) -> None:
        """Apply ``changes`` (all or nothing); raise :class:`SandboxInputError` on a bad one."""
        known = {item.name for item in fields(self)}
        unknown = sorted(set(changes) - known)
        if unknown:
            raise SandboxInputError(f"unknown setting(s): {', '.join(unknown)}")
        staged = self.copy()
        for name, value in changes.items():
            if name == "latency_ms":
                staged.latency_ms.update(parse_latency_ms(value))
            elif name in {"force_refresh_daily_limit", "classic_token_daily_limit"}:
                setattr(staged, name, _non_negative_int(name, value))
            elif name == "token_lifetime_seconds":
                setattr(staged, name, _positive_number(name, value))
            else:
                setattr(staged, name, _non_negative_number(name, value))
        for item in fields(self):
            setattr(self, item.name, getattr(staged, item.name))


def parse_latency_ms(value: object) -> dict[str, float]:
    """Turn a single number (all emulated endpoints) or ``{endpoint: ms}`` into a per-endpoint dict."""
    if isinstance(value, Mapping):
        result: dict[str, float] = {}
        for endpoint, delay in value.items():
            if endpoint not in ENDPOINTS:
                raise SandboxInputError(f"latency_ms: unknown endpoint {endpoint!r}")
            result[endpoint] = _non_negative_number(f"latency_ms.{endpoint}", delay)
        return result
    return dict.fromkeys(ENDPOINTS, _non_negative_number("latency_ms", value))


def _number(name: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise SandboxInputError(f"{name} must be a number")
    return float(value)


def _non_negative_number(name: str, value: object) -> float:
    number = _number(name, value)
    if number < 0:
        raise SandboxInputError(f"{name} must not be negative")
    return number


def _positive_number(name: str, value: object) -> float:
    number = _number(name, value)
    if number <= 0:
        raise SandboxInputError(f"{name} must be positive")
    return number


def _non_negative_int(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise SandboxInputError(f"{name} must be a non-negative integer")
    return value


def _optional_str(payload: Mapping[str, object], name: str) -> str | None:
    value = payload.get(name)
    if value is None:
        return None
    if not isinstance(value, str) or not value:
        raise SandboxInputError(f"{name} must be a non-empty string")
    return value


def _flag(payload: Mapping[str, object], name: str) -> bool:
    value = payload.get(name, False)
    if not isinstance(value, bool):
        raise SandboxInputError(f"{name} must be true or false")
    return value


# -- faults -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Fault:
    """One queued misbehaviour of an endpoint.

    ``timing="before"`` replaces processing; ``"after"`` lets the request be fully processed (a
    phone code is consumed, a token issued) and then spoils the reply. When several effects are
    given, a dropped connection wins over an HTTP status, which wins over an errcode.
    """

    endpoint: str
    errcode: int | None = None
    latency_ms: float = 0.0
    drop_connection: bool = False
    http_status: int | None = None
    timing: Timing = "before"

    @property
    def replaces_reply(self) -> bool:
        """Whether the client gets something other than the normal reply."""
        return self.drop_connection or self.http_status is not None or self.errcode is not None

    @classmethod
    def from_json(cls, payload: Mapping[str, object]) -> tuple[Fault, int]:
        """Parse an admin fault request into the fault and how many requests it applies to."""
        endpoint = payload.get("endpoint")
        if endpoint not in ENDPOINTS:
            raise SandboxInputError(f"endpoint must be one of {', '.join(ENDPOINTS)}")
        errcode = payload.get("errcode")
        if errcode is not None and (isinstance(errcode, bool) or not isinstance(errcode, int)):
            raise SandboxInputError("errcode must be an integer")
        times = payload.get("times", 1)
        if isinstance(times, bool) or not isinstance(times, int) or times < 1:
            raise SandboxInputError("times must be a positive integer")
        latency_ms = _non_negative_number("latency_ms", payload.get("latency_ms", 0))
        drop_connection = _flag(payload, "drop_connection")
        http_status = payload.get("http_status")
        if http_status is not None and (
            isinstance(http_status, bool) or not isinstance(http_status, int) or not 200 <= http_status <= 599
        ):
            raise SandboxInputError("http_status must be an integer from 200 to 599")
        timing = payload.get("timing", "before")
        if timing != "before" and timing != "after":
            raise SandboxInputError('timing must be "before" or "after"')
        if errcode is None and not drop_connection and http_status is None and latency_ms == 0:
            errcode = -1  # a fault with no effect named is a "system busy" reply
        fault = cls(str(endpoint), errcode, latency_ms, drop_connection, http_status, timing)
        return fault, times

    def as_dict(self) -> dict[str, Any]:
        """A JSON-ready copy."""
        return asdict(self)


# -- records ----------------------------------------------------------------------------------


@dataclass(slots=True)
class _Token:
    value: str
    appid: str
    kind: str
    issued_at: float
    expires_at: float
    #: When it stops being accepted because a newer token superseded it.
    retired_at: float | None = None
    revoked: bool = False


@dataclass(slots=True)
class _PhoneCode:
    appid: str
    phone_number: str
    pure_phone_number: str
    country_code: str
    country_code_as_number: bool
    watermark_appid: str
    minted_at: float
    expires_at: float
    used: bool = False
    presentations: int = 0


@dataclass(slots=True)
class _QueuedFault:
    fault: Fault
    remaining: int


@dataclass(slots=True)
class _LoginCode:
    appid: str
    openid: str
    unionid: str | None
    high_risk: bool
    expires_at: float
    used: bool = False


@dataclass(slots=True)
class _EndpointStats:
    calls: int = 0
    errcodes: Counter[int] = field(default_factory=Counter)
    tokens_issued: int = 0
    force_refreshes: int = 0
    faults_applied: int = 0

    def as_dict(self, endpoint: str) -> dict[str, Any]:
        result: dict[str, Any] = {
            "calls": self.calls,
            "errcodes": {str(code): count for code, count in sorted(self.errcodes.items())},
            "faults_applied": self.faults_applied,
        }
        if endpoint in TOKEN_ENDPOINTS:
            result["tokens_issued"] = self.tokens_issued
        if endpoint == API_STABLE_TOKEN:
            result["force_refreshes"] = self.force_refreshes
        return result


@dataclass
class _AppState:
    """Per-app pointers and quotas."""

    current_classic: str | None = None
    current_stable: str | None = None
    last_force_refresh_at: float | None = None
    #: (day number, count) for the classic-token and force-refresh daily quotas.
    classic_fetches: tuple[int, int] = (0, 0)
    force_refreshes: tuple[int, int] = (0, 0)


# -- the emulation ----------------------------------------------------------------------------


class SandboxState:
    """WeChat's server-side state for a set of apps: tokens, codes, quotas, faults and counters."""

    def __init__(
        self,
        config: SandboxConfig | None = None,
        apps: Mapping[str, str] | None = None,
        *,
        clock: Clock = time.time,
    ) -> None:
        self._startup_config = (config or SandboxConfig()).copy()
        self._startup_apps = dict(apps or {})
        self._wall_clock = clock
        self._clock_offset_seconds = 0.0
        self.config = self._startup_config.copy()
        self._secrets: dict[str, str] = {}
        for appid, secret in self._startup_apps.items():
            self.register_app(appid, secret)
        self._rid_counter = itertools.count(1)
        self._phone_number_counter = itertools.count()
        self._clear_runtime_state()

    def _clear_runtime_state(self) -> None:
        self._tokens: dict[str, _Token] = {}
        self._token_count_at_sweep = 0
        self._apps: dict[str, _AppState] = {}
        self._phone_codes: dict[str, _PhoneCode] = {}
        self._phone_code_count_at_sweep = 0
        self._login_codes: dict[str, _LoginCode] = {}
        self._login_code_count_at_sweep = 0
        self._faults: dict[str, deque[_QueuedFault]] = {endpoint: deque() for endpoint in ENDPOINTS}
        self._stats: dict[str, _EndpointStats] = {endpoint: _EndpointStats() for endpoint in ENDPOINTS}
        self._app_stats: dict[str, dict[str, _EndpointStats]] = {}
        self._codes_exchanged = 0
        self._forgotten_presentations: Counter[int] = Counter()
        self._unknown_code_presentations = 0

    # -- time -------------------------------------------------------------------------------

    def now(self) -> float:
        """The sandbox's notion of the current Unix time (the clock plus any admin offset)."""
        return self._wall_clock() + self._clock_offset_seconds

    def advance_clock(self, seconds: object) -> float:
        """Move the sandbox's time forward; return the total offset from the real clock."""
        self._clock_offset_seconds += _non_negative_number("seconds", seconds)
        return self._clock_offset_seconds

    # -- administration ---------------------------------------------------------------------

    @property
    def appids(self) -> list[str]:
        """Registered appids, in registration order."""
        return list(self._secrets)

    def register_app(self, appid: object, secret: object) -> None:
        """Register (or re-key) an app."""
        if not isinstance(appid, str) or not APPID_PATTERN.fullmatch(appid):
            raise SandboxInputError("appid must be 1-64 letters, digits, _ or -")
        if not isinstance(secret, str) or not secret:
            raise SandboxInputError("secret must be a non-empty string")
        self._secrets[appid] = secret

    def revoke_tokens(self, appid: str) -> int:
        """Invalidate every classic and stable token of ``appid`` now; return how many were live."""
        if appid not in self._secrets:
            raise KeyError(appid)
        now = self.now()
        revoked = 0
        for token in self._tokens.values():
            if token.appid == appid and not token.revoked:
                if self._token_errcode(token, now) == 0:
                    revoked += 1
                token.revoked = True
        app = self._app(appid)
        app.current_classic = app.current_stable = None
        return revoked

    def reset(self, *, everything: bool = False) -> None:
        """Forget tokens, codes, faults, counters and clock offset; with ``everything``, also
        return apps and configuration to their start-up values."""
        self._clear_runtime_state()
        self._clock_offset_seconds = 0.0
        if everything:
            self.config = self._startup_config.copy()
            self._secrets = dict(self._startup_apps)

    def add_fault(self, fault: Fault, times: int = 1) -> int:
        """Queue ``fault`` for the next ``times`` requests to its endpoint; return the queue length."""
        queue = self._faults[fault.endpoint]
        queue.append(_QueuedFault(fault, times))
        return sum(entry.remaining for entry in queue)

    def clear_faults(self) -> None:
        """Drop every queued fault."""
        for queue in self._faults.values():
            queue.clear()

    def pending_faults(self) -> list[dict[str, Any]]:
        """The queued faults with how many requests each still applies to."""
        return [
            {**entry.fault.as_dict(), "times": entry.remaining}
            for queue in self._faults.values()
            for entry in queue
        ]

    def take_fault(self, endpoint: str) -> Fault | None:
        """Consume the next fault queued for ``endpoint``, if any."""
        queue = self._faults[endpoint]
        if not queue:
            return None
        entry = queue[0]
        entry.remaining -= 1
        if entry.remaining <= 0:
            queue.popleft()
        return entry.fault

    def mint_phone_codes(self, payload: Mapping[str, object]) -> list[dict[str, str]]:
        """Create phone codes as if users had tapped the button; see the admin API for fields."""
        appid = payload.get("appid")
        if not isinstance(appid, str) or appid not in self._secrets:
            raise SandboxInputError("appid must name a registered app")
        count = payload.get("count", 1)
        if isinstance(count, bool) or not isinstance(count, int) or not 1 <= count <= MAX_CODES_PER_MINT:
            raise SandboxInputError(f"count must be an integer from 1 to {MAX_CODES_PER_MINT}")
        phone_number = _optional_str(payload, "phone_number")
        pure_phone_number = _optional_str(payload, "pure_phone_number")
        country_code = payload.get("country_code", "86")
        if isinstance(country_code, int) and not isinstance(country_code, bool):
            country_code = str(country_code)
        if not isinstance(country_code, str) or not country_code.isdigit():
            raise SandboxInputError('country_code must be digits, such as "86"')
        as_number = _flag(payload, "country_code_as_number")
        watermark_appid = _optional_str(payload, "watermark_appid") or appid
        lifetime = payload.get("lifetime_seconds")
        lifetime_seconds = (
            self.config.code_lifetime_seconds
            if lifetime is None
            else _non_negative_number("lifetime_seconds", lifetime)
        )
        now = self.now()
        minted: list[dict[str, str]] = []
        for _ in range(count):
            pure = pure_phone_number
            if pure is None:
                pure = _strip_country_code(phone_number, country_code) if phone_number else None
            if pure is None:
                pure = f"138{next(self._phone_number_counter) % 100_000_000:08d}"
            full = phone_number or (pure if country_code == "86" else f"+{country_code}{pure}")
            code = _new_code()
            self._phone_codes[code] = _PhoneCode(
                appid=appid,
                phone_number=full,
                pure_phone_number=pure,
                country_code=country_code,
                country_code_as_number=as_number,
                watermark_appid=watermark_appid,
                minted_at=now,
                expires_at=now + lifetime_seconds,
            )
            minted.append(
                {"code": code, "phone_number": full, "pure_phone_number": pure, "country_code": country_code}
            )
        self._maybe_sweep_phone_codes(now)
        return minted

    def mint_login_code(self, payload: Mapping[str, object]) -> dict[str, str]:
        """Create a ``wx.login`` code; return it with the openid (and unionid) it resolves to."""
        appid = payload.get("appid")
        if not isinstance(appid, str) or appid not in self._secrets:
            raise SandboxInputError("appid must name a registered app")
        openid = _optional_str(payload, "openid") or _new_openid()
        unionid = _optional_str(payload, "unionid")
        high_risk = _flag(payload, "high_risk")
        now = self.now()
        code = _new_code()
        self._login_codes[code] = _LoginCode(
            appid, openid, unionid, high_risk, now + self.config.code_lifetime_seconds
        )
        self._maybe_sweep_login_codes(now)
        result = {"code": code, "openid": openid}
        if unionid:
            result["unionid"] = unionid
        return result

    # -- emulated endpoints -----------------------------------------------------------------

    def classic_token(self, method: str, query: Mapping[str, str]) -> Reply:
        """``/cgi-bin/token``: issue a new token, retiring the previous one after the grace period."""
        if method != "GET":
            return self.error(43001)
        appid, failure = self._check_credentials(query, "client_credential")
        if failure:
            return failure
        now = self.now()
        app = self._app(appid)
        day = _china_day(now)
        fetched_today = app.classic_fetches[1] if app.classic_fetches[0] == day else 0
        if fetched_today >= self.config.classic_token_daily_limit:
            return self.error(45009)
        app.classic_fetches = (day, fetched_today + 1)
        previous = self._tokens.get(app.current_classic) if app.current_classic else None
        if previous is not None and previous.retired_at is None:
            previous.retired_at = now + self.config.grace_seconds
        token = self._issue_token(appid, API_CLASSIC_TOKEN, now)
        app.current_classic = token.value
        return {"access_token": token.value, "expires_in": _expires_in(token, now)}

    def stable_token(self, method: str, query: Mapping[str, str], payload: object) -> Reply:
        """``/cgi-bin/stable_token``: the current token, rolled over near its end or on force."""
        if method != "POST" or any(key in query for key in ("grant_type", "appid", "secret")):
            return self.error(43002)
        if not isinstance(payload, dict):
            return self.error(47001)
        credentials = {key: value for key, value in payload.items() if isinstance(value, str)}
        appid, failure = self._check_credentials(credentials, "client_credential")
        if failure:
            return failure
        force = payload.get("force_refresh", False)
        force = force is True or (isinstance(force, str) and force.lower() == "true")
        now = self.now()
        app = self._app(appid)
        current = self._tokens.get(app.current_stable) if app.current_stable else None
        if current is not None and self._token_errcode(current, now) != 0:
            current = None
        if force:
            day = _china_day(now)
            forced_today = app.force_refreshes[1] if app.force_refreshes[0] == day else 0
            if forced_today >= self.config.force_refresh_daily_limit:
                return self.error(45009)
            too_early = (
                app.last_force_refresh_at is not None
                and now - app.last_force_refresh_at < self.config.force_refresh_spacing_seconds
            )
            if not too_early:
                app.force_refreshes = (day, forced_today + 1)
                app.last_force_refresh_at = now
                self._stats[API_STABLE_TOKEN].force_refreshes += 1
                self._app_stats_for(appid)[API_STABLE_TOKEN].force_refreshes += 1
                for token in self._tokens.values():
                    if token.appid == appid and token.kind == API_STABLE_TOKEN and token.retired_at is None:
                        token.retired_at = now
                current = None
        if current is None or current.expires_at - now <= self.config.stable_rollover_seconds:
            # Rolling over leaves the old token valid until its own expiry.
            current = self._issue_token(appid, API_STABLE_TOKEN, now)
            app.current_stable = current.value
        return {"access_token": current.value, "expires_in": _expires_in(current, now)}

    def phone_number(self, method: str, access_token: str | None, payload: object) -> Reply:
        """``/wxa/business/getuserphonenumber``: exchange a single-use phone code."""
        if method != "POST":
            return self.error(43002)
        if not access_token:
            return self.error(41001)
        now = self.now()
        token = self._tokens.get(access_token)
        errcode = 40001 if token is None else self._token_errcode(token, now)
        if errcode or token is None:
            return self.error(errcode or 40001)
        if not isinstance(payload, dict):
            return self.error(47001)
        code_value = payload.get("code")
        if not isinstance(code_value, str) or not code_value:
            return self.error(41008)
        code = self._phone_codes.get(code_value)
        if code is None:
            self._unknown_code_presentations += 1
            return self.error(40029)
        code.presentations += 1
        if code.appid != token.appid:
            return self.error(40013)
        if code.used or now >= code.expires_at:
            return self.error(40029)
        code.used = True
        self._codes_exchanged += 1
        country_code: str | int = int(code.country_code) if code.country_code_as_number else code.country_code
        return {
            "errcode": 0,
            "errmsg": "ok",
            "phone_info": {
                "phoneNumber": code.phone_number,
                "purePhoneNumber": code.pure_phone_number,
                "countryCode": country_code,
                "watermark": {"timestamp": int(code.minted_at), "appid": code.watermark_appid},
            },
        }

    def code_to_session(self, method: str, query: Mapping[str, str]) -> Reply:
        """``/sns/jscode2session``: exchange a single-use login code for openid and session_key."""
        if method != "GET":
            return self.error(43001)
        appid, failure = self._check_credentials(query, "authorization_code")
        if failure:
            return failure
        if not query.get("js_code"):
            return self.error(41008)
        code = self._login_codes.get(query["js_code"])
        if code is None or code.appid != appid or code.used or self.now() >= code.expires_at:
            return self.error(40029)
        code.used = True
        if code.high_risk:
            return self.error(40226)
        reply: Reply = {"session_key": _new_session_key(), "openid": code.openid}
        if code.unionid:
            reply["unionid"] = code.unionid
        return reply

    # -- replies and counters ---------------------------------------------------------------

    def error(self, errcode: int) -> Reply:
        """A WeChat error body with a fresh ``rid``."""
        text = ERRMSG.get(errcode, "sandbox injected error")
        return {"errcode": errcode, "errmsg": f"{text} rid: {self._new_rid()}"}

    def app_of_token(self, access_token: str | None) -> str | None:
        """The appid a token was issued to, if the token is known."""
        token = self._tokens.get(access_token) if access_token else None
        return token.appid if token is not None else None

    def record(self, endpoint: str, appid: str | None, errcode: int | None, *, fault: bool = False) -> None:
        """Count one request: ``errcode`` is what the client received (``None``: no JSON reply)."""
        targets = [self._stats[endpoint]]
        if appid is not None and appid in self._secrets:
            targets.append(self._app_stats_for(appid)[endpoint])
        for stats in targets:
            stats.calls += 1
            if errcode is not None:
                stats.errcodes[errcode] += 1
            if fault:
                stats.faults_applied += 1

    def stats(self) -> dict[str, Any]:
        """Counters per endpoint and per app, plus phone-code exchange and presentation figures.

        ``result["endpoints"][name]`` holds one endpoint's counters; ``result[name]`` is the same
        object, for brevity.
        """
        per_endpoint = {endpoint: self._stats[endpoint].as_dict(endpoint) for endpoint in ENDPOINTS}
        result: dict[str, Any] = {"endpoints": per_endpoint, **per_endpoint}
        result["apps"] = {
            appid: {endpoint: per_app[endpoint].as_dict(endpoint) for endpoint in ENDPOINTS}
            for appid, per_app in sorted(self._app_stats.items())
        }
        histogram = Counter(self._forgotten_presentations)
        histogram.update(code.presentations for code in self._phone_codes.values())
        result["codes_exchanged"] = self._codes_exchanged
        result["code_presentations"] = {str(times): count for times, count in sorted(histogram.items())}
        result["unknown_code_presentations"] = self._unknown_code_presentations
        return result

    # -- internals --------------------------------------------------------------------------

    def _app(self, appid: str) -> _AppState:
        app = self._apps.get(appid)
        if app is None:
            app = self._apps[appid] = _AppState()
        return app

    def _app_stats_for(self, appid: str) -> dict[str, _EndpointStats]:
        per_app = self._app_stats.get(appid)
        if per_app is None:
            per_app = self._app_stats[appid] = {endpoint: _EndpointStats() for endpoint in ENDPOINTS}
        return per_app

    def _check_credentials(self, values: Mapping[str, str], grant_type: str) -> tuple[str, Reply | None]:
        appid = values.get("appid")
        if not appid:
            return "", self.error(41002)
        secret = values.get("secret")
        if not secret:
            return appid, self.error(41004)
        if values.get("grant_type") != grant_type:
            return appid, self.error(40002)
        expected = self._secrets.get(appid)
        if expected is None:
            return appid, self.error(40013)
        if not secrets.compare_digest(secret.encode(), expected.encode()):
            return appid, self.error(40125)
        return appid, None

    def _token_errcode(self, token: _Token, now: float) -> int:
        if token.revoked:
            return 40001
        if now >= token.expires_at:
            return 42001
        if token.retired_at is not None and now >= token.retired_at:
            return 40001
        return 0

    def _issue_token(self, appid: str, kind: str, now: float) -> _Token:
        value = _new_access_token()
        token = _Token(value, appid, kind, now, now + self.config.token_lifetime_seconds)
        self._tokens[value] = token
        self._stats[kind].tokens_issued += 1
        self._app_stats_for(appid)[kind].tokens_issued += 1
        self._maybe_sweep_tokens(now)
        return token

    def _maybe_sweep_tokens(self, now: float) -> None:
        # Tokens that would only ever be answered with 40001 are indistinguishable from unknown
        # ones, and long-expired ones are forgotten, so memory stays bounded on long runs.
        if len(self._tokens) < max(_SWEEP_MIN_SIZE, 2 * self._token_count_at_sweep):
            return
        current = {
            value
            for app in self._apps.values()
            for value in (app.current_classic, app.current_stable)
            if value is not None
        }
        self._tokens = {
            value: token
            for value, token in self._tokens.items()
            if value in current
            or (
                not token.revoked
                and (token.retired_at is None or now < token.retired_at)
                and now < token.expires_at + EXPIRED_TOKEN_MEMORY_SECONDS
            )
        }
        self._token_count_at_sweep = len(self._tokens)

    def _maybe_sweep_phone_codes(self, now: float) -> None:
        if len(self._phone_codes) < max(_SWEEP_MIN_SIZE, 2 * self._phone_code_count_at_sweep):
            return
        kept: dict[str, _PhoneCode] = {}
        for value, code in self._phone_codes.items():
            if now < code.expires_at + SPENT_CODE_MEMORY_SECONDS:
                kept[value] = code
            else:
                self._forgotten_presentations[code.presentations] += 1
        self._phone_codes = kept
        self._phone_code_count_at_sweep = len(kept)

    def _maybe_sweep_login_codes(self, now: float) -> None:
        if len(self._login_codes) < max(_SWEEP_MIN_SIZE, 2 * self._login_code_count_at_sweep):
            return
        self._login_codes = {
            value: code
            for value, code in self._login_codes.items()
            if not code.used and now < code.expires_at
        }
        self._login_code_count_at_sweep = len(self._login_codes)

    def _new_rid(self) -> str:
        # Shaped like WeChat's: hex seconds, then two hex words; the counter makes it unique.
        counter = next(self._rid_counter) & 0xFFFFFFFF
        return f"{int(self.now()) & 0xFFFFFFFF:08x}-{random.getrandbits(32):08x}-{counter:08x}"


def _china_day(now: float) -> int:
    return int((now + _CHINA_UTC_OFFSET_SECONDS) // _SECONDS_PER_DAY)


def _expires_in(token: _Token, now: float) -> int:
    return max(1, int(token.expires_at - now))


def _strip_country_code(phone_number: str, country_code: str) -> str:
    for prefix in (f"+{country_code}", f"00{country_code}"):
        if phone_number.startswith(prefix):
            return phone_number[len(prefix) :].lstrip(" -")
    return phone_number


def _new_code() -> str:
    return secrets.token_urlsafe(24)  # 32 URL-safe characters, like WeChat's codes


def _new_access_token() -> str:
    # Real tokens are ~130 characters: a numeric prefix, an underscore and URL-safe noise.
    return f"{random.randint(70, 99)}_{secrets.token_urlsafe(96)}"


def _new_openid() -> str:
    return "o" + secrets.token_urlsafe(21)[:27]


def _new_session_key() -> str:
    return base64.b64encode(secrets.token_bytes(16)).decode("ascii")  # AES-128 key, as WeChat's
