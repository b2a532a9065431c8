"""The shared access-token service: one token per app for the whole fleet.

* Workers only read the token (:meth:`TokenService.get_token`). When there is none yet (cold
  start, or after a compare-and-delete), they go through the same single-flight refresh as beat:
  one process takes the lease and fetches; the others wait for its result. N concurrent readers
  cause exactly one upstream fetch.
* Beat calls :meth:`TokenService.refresh_if_due` for every app on a schedule. When a token is
  refreshed is derived from the ``expires_in`` WeChat returned (``refresh_fraction`` of it).
* A business call that reports the token invalid goes through :meth:`TokenService.call_with_token`:
  drop the token only if it is still the one that failed, refresh once, retry once. Never more.
* Stable mode never forces a refresh on an automatic path. Only :meth:`TokenService.refresh` with
  ``force=True`` (an operator command) does, within WeChat's daily budget (counted per Beijing
  day) and 30 s spacing. The forced call is made by that command under the lease, or the command
  fails saying it did not force; the budget counts only calls that may have forced.
* A failed fetch is recorded for the fleet before the lease is released, so waiting processes and
  retrying jobs do not fetch again: a transient failure (-1, 45011, a timeout) sets a backoff in
  Redis (1 s, doubling per failure in a row, at most 60 s) during which every reader fails at once
  with :class:`TokenFetchBackoffError`; a configuration error (wrong AppSecret, IP whitelist, an
  HTTP 4xx) raises one operator alert and stops fetches with these credentials for 10 minutes or
  until the configuration changes or ``wxphone token clear-error``; a 45009 opens the token API's
  circuit until midnight Beijing time. At most one token call per app per backoff interval.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import random
import time
from collections.abc import Callable, Mapping
from contextlib import suppress
from dataclasses import dataclass
from typing import Literal, TypeVar

from worker.errors import RetryLaterError, TokenInvalidError, WxphoneError
from worker.limits import API_TOKEN, CallGate, seconds_to_window_end
from worker.logs import register_secret
from worker.settings import AppCredentials, TokenMode
from worker.tokens.errors import (
    AppNotConfiguredError,
    ForceRefreshFailedError,
    ForceRefreshRefusedError,
    TokenConfigurationError,
    TokenFetchBackoffError,
    TokenQuotaExhaustedError,
    TokenRejectedAfterRefreshError,
    TokenStoreUnavailableError,
    TokenWaitTimeoutError,
)
from worker.tokens.store import CachedToken, TokenStore
from worker.wechat.client import WeChatClient
from worker.wechat.errors import (
    WeChatConfigurationError,
    WeChatError,
    WeChatHttpStatusError,
    WeChatQuotaExhaustedError,
    WeChatRateLimitedError,
    WeChatTransportError,
)
from worker.wechat.types import AccessToken

__all__ = ["RefreshOutcome", "TokenService"]

log = logging.getLogger(__name__)

T = TypeVar("T")

#: WeChat allows 20 force refreshes a day per app, at least 30 s apart.
FORCE_REFRESH_DAILY_LIMIT = 20
FORCE_REFRESH_SPACING_SECONDS = 30
#: How often a process waiting for another's refresh looks again.
WAIT_POLL_SECONDS = 0.05
#: After a failed token fetch no process fetches for this app for a backoff shared in Redis:
#: 1 s, doubled per failure in a row, at most 60 s. A day-long outage costs at most 1,440 token
#: calls per app, whatever the fleet's size: under the strictest documented token quota (classic,
#: 2,000 a day) even if failed calls count; the end of an outage is seen within a minute.
FETCH_BACKOFF_BASE_SECONDS = 1.0
FETCH_BACKOFF_MAX_SECONDS = 60.0
#: The count of failures in a row is forgotten this long after the last one.
FETCH_FAILURE_MEMORY_SECONDS = 600.0
#: WeChat's minute: a 45011 from the token endpoint holds fetches until the minute ends.
RATE_LIMIT_WINDOW_SECONDS = 60.0
#: A configuration error stops fetches with the same credentials for this long, then one fetch
#: tries again: some fixes happen at WeChat, not here (an IP whitelist, an unfrozen AppSecret, an
#: admin confirming an IP), and the next failure raises the alert again.
CONFIG_ERROR_RETRY_SECONDS = 600.0
#: A business call's configuration error (an HTTP 4xx, 40013, ...) is alerted once per app, API
#: and error in this time, fleet-wide; every job meeting it still fails at once.
BUSINESS_ALERT_REPEAT_SECONDS = 600.0

RefreshStatus = Literal["refreshed", "fresh", "busy"]


@dataclass(frozen=True)
class RefreshOutcome:
    """What a refresh attempt did; safe to log and to return from a task (no token inside)."""

    appid: str
    status: RefreshStatus
    expires_at: float | None = None

    def as_dict(self) -> dict[str, object]:
        return {"appid": self.appid, "status": self.status, "expires_at": self.expires_at}


class TokenService:
    """Reads, refreshes and invalidates the fleet's shared access tokens."""

    def __init__(
        self,
        *,
        store: TokenStore,
        client: WeChatClient,
        apps: Mapping[str, AppCredentials],
        mode: TokenMode,
        refresh_fraction: float = 0.5,
        lease_seconds: float = 60.0,
        wait_seconds: float = 15.0,
        local_reuse_seconds: float = 0.0,
        gate: CallGate | None = None,
        fetch_backoff_base_seconds: float = FETCH_BACKOFF_BASE_SECONDS,
        fetch_backoff_max_seconds: float = FETCH_BACKOFF_MAX_SECONDS,
        config_error_retry_seconds: float = CONFIG_ERROR_RETRY_SECONDS,
        clock: Callable[[], float] = time.time,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self.store = store
        self.client = client
        self.apps = dict(apps)
        self.mode = mode
        self.refresh_fraction = refresh_fraction
        self.lease_seconds = lease_seconds
        self.wait_seconds = wait_seconds
        #: Where the token API's 45009 circuit lives (None: a 45009 only backs off).
        self.gate = gate
        self.fetch_backoff_base_seconds = fetch_backoff_base_seconds
        self.fetch_backoff_max_seconds = fetch_backoff_max_seconds
        self.config_error_retry_seconds = config_error_retry_seconds
        self._clock = clock
        self._sleep = sleep
        self._redacted_fences: dict[str, int] = {}
        #: A process reuses the token it last read for ``local_reuse_seconds`` before reading the
        #: store again (0: read it for every call). appid -> (token, reuse until).
        self.local_reuse_seconds = local_reuse_seconds
        self._local: dict[str, tuple[CachedToken, float]] = {}

    # -- reading ------------------------------------------------------------------------------

    def get_token(self, appid: str, *, reuse: bool = True) -> CachedToken:
        """The current token of ``appid``; fetches it (single-flight) only when there is none.

        With ``reuse`` (and ``local_reuse_seconds`` > 0) a token this process read moments ago
        is returned without asking the store: a token beat has just replaced stays valid for
        minutes (WeChat keeps a superseded classic token working for 5 minutes), and a call it
        fails is retried with a token read from the store.
        """
        now = self._clock()
        if reuse:
            local = self._local.get(appid)
            if local is not None and now < local[1] and local[0].is_usable(now):
                return local[0]
        self._credentials(appid)
        cached = self.store.read(appid)
        if cached is None or not cached.is_usable(self._clock()):
            cached = self._refresh_single_flight(
                appid, needed=lambda token: not token.is_usable(self._clock())
            )
        self._redact_from_logs(appid, cached)
        if self.local_reuse_seconds > 0:
            self._local[appid] = (cached, now + self.local_reuse_seconds)
        return cached

    def call_with_token(self, appid: str, call: Callable[[str], T]) -> T:
        """Run ``call(access_token)``; on a token rejection refresh once and retry once.

        A retry whose token was fetched before the rejection was seen (it may have been revoked
        with the rejected one) and is rejected too gets one more try, with a token fetched after.

        The failed token is dropped only if it is still the stored one, so a fleet of workers
        that all saw the same rejection causes one refresh, not one each.
        """
        token = self.get_token(appid)
        try:
            return call(token.value)
        except TokenInvalidError:
            rejected_at = self._clock()
            self._drop_rejected(appid, token)
        except WeChatConfigurationError as error:
            self._alert_business_configuration_error(appid, error)
            raise
        fresh = self.get_token(appid, reuse=False)
        try:
            return call(fresh.value)
        except WeChatConfigurationError as error:
            self._alert_business_configuration_error(appid, error)
            raise
        except TokenInvalidError:
            if fresh.fetched_at >= rejected_at:
                # A token fetched after the rejection is rejected too: another system is fetching
                # tokens for this app, or the token belongs elsewhere. Looping would only burn
                # the quota.
                log.error("access token rejected again after a refresh", extra={"appid": appid})
                raise TokenRejectedAfterRefreshError(
                    f"{appid}: WeChat rejected a freshly refreshed access token"
                ) from None
            # The stored token was fetched before this run saw the rejection (a refresh that ran
            # while the tokens were revoked): it may have been revoked with the rest. Once more,
            # with a token fetched from now on.
            self._drop_rejected(appid, fresh)
        newest = self.get_token(appid, reuse=False)
        try:
            return call(newest.value)
        except WeChatConfigurationError as error:
            self._alert_business_configuration_error(appid, error)
            raise
        except TokenInvalidError:
            log.error("access token rejected again after a refresh", extra={"appid": appid})
            raise TokenRejectedAfterRefreshError(
                f"{appid}: WeChat rejected a freshly refreshed access token"
            ) from None

    def _drop_rejected(self, appid: str, token: CachedToken) -> None:
        """Forget a token WeChat rejected: here, and in the store if it is still the stored one."""
        self._local.pop(appid, None)
        dropped = self.store.delete_if_current(appid, token.value)
        log.warning("access token rejected by WeChat", extra={"appid": appid, "dropped": dropped})

    # -- refreshing ---------------------------------------------------------------------------

    def refresh_if_due(self, appid: str) -> RefreshOutcome:
        """The scheduled path: refresh when ``refresh_fraction`` of the lifetime has passed."""
        self._credentials(appid)
        cached = self.store.read(appid)
        now = self._clock()
        if cached is not None and not cached.is_refresh_due(now):
            return RefreshOutcome(appid, "fresh", cached.expires_at)
        with self.store.lease(appid, lease_seconds=self.lease_seconds) as fence:
            if not fence:
                # Someone else is refreshing right now; their result serves us too.
                return RefreshOutcome(appid, "busy", cached.expires_at if cached else None)
            current = self.store.read(appid)
            if current is not None and not current.is_refresh_due(self._clock()):
                return RefreshOutcome(appid, "fresh", current.expires_at)
            self._raise_if_fetch_blocked(self._credentials(appid))
            written = self._fetch_and_write(appid, fence=fence)
        self._local.pop(appid, None)
        return RefreshOutcome(
            appid, "refreshed" if written else "busy", written.expires_at if written else None
        )

    def refresh(self, appid: str, *, force: bool = False) -> CachedToken:
        """The operator path: fetch a new token now.

        Without ``force`` the result may come from a refresh another process completed meanwhile
        (it is as new as ours would be). With ``force`` this call makes the fetch itself, under the
        lease (waiting up to ``wait_seconds`` for it), or raises :class:`ForceRefreshFailedError`
        saying it did not force. In stable mode that fetch sets ``force_refresh`` so WeChat revokes
        the current token (for a leak): refused beyond WeChat's daily budget (counted per Beijing
        day) or within 30 s of the previous force refresh, and counted only when WeChat may have
        performed it. In classic mode every fetch issues a new token anyway.
        """
        credentials = self._credentials(appid)
        self._local.pop(appid, None)
        if force:
            return self._force_refresh(credentials)
        return self._refresh_single_flight(appid, needed=lambda token: True)

    def clear_fetch_errors(self, appid: str) -> bool:
        """Operator action: forget a recorded configuration error and the backoff of ``appid``."""
        self._credentials(appid)
        return self.store.clear_fetch_errors(appid)

    def invalidate(self, appid: str, failed_value: str) -> bool:
        """Drop the stored token if it is still ``failed_value``."""
        self._local.pop(appid, None)
        return self.store.delete_if_current(appid, failed_value)

    # -- internals ----------------------------------------------------------------------------

    def _redact_from_logs(self, appid: str, token: CachedToken) -> None:
        # Registering rebuilds the redaction pattern, so do it once per token, not per call.
        if self._redacted_fences.get(appid) != token.fence:
            register_secret(token.value)
            self._redacted_fences[appid] = token.fence

    def _credentials(self, appid: str) -> AppCredentials:
        try:
            return self.apps[appid]
        except KeyError:
            raise AppNotConfiguredError(f"appid {appid} is not configured") from None

    def _refresh_single_flight(self, appid: str, *, needed: Callable[[CachedToken], bool]) -> CachedToken:
        """Refresh under the lease, or wait for whoever holds it; bounded by ``wait_seconds``.

        A failure the lease holder recorded (a backoff, a configuration error, the token circuit)
        ends the wait at once, without a fetch of our own.
        """
        credentials = self._credentials(appid)
        deadline = time.monotonic() + self.wait_seconds
        first_seen = self.store.read(appid)
        first_fence = first_seen.fence if first_seen else None

        def settled(token: CachedToken | None) -> bool:
            # Served when the token no longer needs refreshing, or another process has completed
            # a refresh since we started (its result is as new as ours would be).
            return (
                token is not None
                and token.is_usable(self._clock())
                and (not needed(token) or token.fence != first_fence)
            )

        while True:
            with self.store.lease(appid, lease_seconds=self.lease_seconds) as fence:
                if fence:
                    current = self.store.read(appid)  # double-check under the lease
                    if current is not None and settled(current):
                        return current
                    # Under the lease, so no other process is fetching or recording a failure.
                    self._raise_if_fetch_blocked(credentials)
                    written = self._fetch_and_write(appid, fence=fence)
                    if written is not None:
                        return written
            current = self.store.read(appid)
            if current is not None and settled(current):
                return current
            self._raise_if_fetch_blocked(credentials)
            if time.monotonic() >= deadline:
                raise TokenWaitTimeoutError(f"{appid}: no access token within {self.wait_seconds:.0f}s")
            self._sleep(WAIT_POLL_SECONDS * (1 + random.random()))

    def _fetch_and_write(self, appid: str, *, fence: int) -> CachedToken | None:
        """One normal-mode fetch under the lease; a failure is recorded for the fleet and raised."""
        credentials = self._credentials(appid)
        try:
            token = self._fetch(credentials, force=False)
        except WxphoneError as error:
            failure = self._record_fetch_failure(credentials, error)
            if failure is error:
                raise
            raise failure from error
        return self._write(appid, token, fence=fence)

    def _write(self, appid: str, token: AccessToken, *, fence: int) -> CachedToken | None:
        register_secret(token.value)
        written = self.store.write(appid, token, fence=fence, refresh_fraction=self.refresh_fraction)
        if written is None:
            log.warning("discarded a token from a refresh that lost its lease", extra={"appid": appid})
        else:
            log.info(
                "access token refreshed",
                extra={"appid": appid, "mode": self.mode, "expires_in": token.expires_in, "fence": fence},
            )
        return written

    def _fetch(self, credentials: AppCredentials, *, force: bool) -> AccessToken:
        if self.mode == "classic":
            return self.client.fetch_classic_token(appid=credentials.appid, secret=credentials.secret)
        return self.client.fetch_stable_token(
            appid=credentials.appid, secret=credentials.secret, force_refresh=force
        )

    # -- failed fetches -----------------------------------------------------------------------

    def _raise_if_fetch_blocked(self, credentials: AppCredentials) -> None:
        """Raise what holds back a token fetch of this app, if anything; no call to WeChat."""
        appid = credentials.appid
        block = self.store.fetch_block(appid)
        record = block.configuration_error
        if record is not None and hmac.compare_digest(
            record.credentials, self._credentials_digest(credentials)
        ):
            raise TokenConfigurationError(
                f"{appid}: no token is fetched after a configuration error ({record.detail}); fetching "
                f"resumes when the AppSecret, API base URL or token mode changes, in "
                f"{record.expires_in_seconds:.0f}s, or with `wxphone token clear-error {appid}`"
            )
        if self.gate is not None:
            open_seconds = self.gate.circuit_open_seconds(appid, API_TOKEN)
            if open_seconds > 0:
                raise TokenQuotaExhaustedError(
                    f"{appid}: the token API's daily quota is exhausted (45009); no token is fetched until "
                    f"midnight Beijing time or `wxphone limits close-circuit --appid {appid} --api token`"
                )
        if block.backoff_seconds > 0:
            raise TokenFetchBackoffError(
                f"{appid}: no token call for {block.backoff_seconds:.1f}s after a failed fetch "
                f"({block.backoff_reason})",
                retry_in_seconds=block.backoff_seconds,
            )

    def _record_fetch_failure(self, credentials: AppCredentials, error: WxphoneError) -> WxphoneError:
        """Record a failed normal-mode fetch for the fleet; return the error to raise.

        Runs under the lease, so the record is in Redis before any other process may fetch.
        """
        appid = credentials.appid
        if isinstance(error, WeChatQuotaExhaustedError):
            return self._open_token_circuit(credentials, error)
        if isinstance(error, WeChatConfigurationError):
            self._record_configuration_error(credentials, error)
            return error
        retry_in = self._back_off(appid, error)
        if isinstance(error, RetryLaterError):
            return TokenFetchBackoffError(
                f"{appid}: token fetch failed ({error}); no token call for {retry_in:.1f}s",
                retry_in_seconds=retry_in,
            )
        return error  # an unknown errcode: this job fails; the backoff spares the others' quota

    def _back_off(self, appid: str, error: WxphoneError) -> float:
        minimum = 0.0
        if isinstance(error, WeChatRateLimitedError):
            # 45011: this minute's calls are used up; the next one starts a new minute.
            minimum = seconds_to_window_end(RATE_LIMIT_WINDOW_SECONDS, time.time())
        failures, delay = self.store.record_fetch_failure(
            appid,
            base_seconds=self.fetch_backoff_base_seconds,
            max_seconds=self.fetch_backoff_max_seconds,
            min_seconds=minimum,
            memory_seconds=FETCH_FAILURE_MEMORY_SECONDS,
            reason=str(error),
        )
        log.warning(
            "token fetch failed (%s); no token call for %.1fs (%d failed in a row)",
            error,
            delay,
            failures,
            extra={"appid": appid},
        )
        return delay

    def _record_configuration_error(
        self, credentials: AppCredentials, error: WeChatConfigurationError
    ) -> None:
        appid = credentials.appid
        try:
            new = self.store.record_configuration_error(
                appid,
                credentials=self._credentials_digest(credentials),
                api=error.api,
                error_code=error.error_code,
                detail=str(error),
                retry_seconds=self.config_error_retry_seconds,
            )
        except TokenStoreUnavailableError:
            new = True  # one alert too many rather than none
        if new:
            hint = (
                "check WXPHONE_WECHAT_API_BASE and any gateway or proxy on the way"
                if isinstance(error, WeChatHttpStatusError)
                else "check the AppSecret in WXPHONE_APPS, the API IP whitelist and the account at WeChat"
            )
            log.error(
                "OPERATOR ALERT: %s: WeChat's %s API refused the token fetch: %s. No token is fetched "
                "for this app until the AppSecret, API base URL or token mode changes, for %.0f minutes, "
                "or until `wxphone token clear-error %s`; jobs fail wechat_config_error once no valid "
                "token is stored (%s)",
                appid,
                error.api,
                error,
                self.config_error_retry_seconds / 60,
                appid,
                hint,
                extra={"appid": appid},
            )

    def _open_token_circuit(
        self, credentials: AppCredentials, error: WeChatQuotaExhaustedError
    ) -> WxphoneError:
        appid = credentials.appid
        if self.gate is None:
            self._back_off(appid, error)
            opened = True
        else:
            try:
                opened = self.gate.open_circuit(appid, API_TOKEN)
            except RetryLaterError:
                opened = True  # the limits store is down: alert anyway
        if opened:
            # One alert per opening, however many processes and jobs meet the circuit.
            log.error(
                "OPERATOR ALERT: WeChat's daily quota of the token API (%s, 45009) is exhausted for %s; "
                "no token is fetched until midnight Beijing time or `wxphone limits close-circuit "
                "--appid %s --api token` (after clear_quota); jobs fail quota_exhausted once no valid "
                "token is stored",
                error.api,
                appid,
                appid,
                extra={"appid": appid},
            )
        return TokenQuotaExhaustedError(f"{appid}: the token API's daily quota is exhausted (45009)")

    def _alert_business_configuration_error(self, appid: str, error: WeChatConfigurationError) -> None:
        """One operator alert per app, API and error per ``BUSINESS_ALERT_REPEAT_SECONDS``, fleet-wide."""
        what = f"http{error.http_status}" if error.http_status is not None else f"errcode{error.errcode}"
        try:
            first = self.store.claim_alert(
                appid, f"{error.api}:{what}", repeat_seconds=BUSINESS_ALERT_REPEAT_SECONDS
            )
        except TokenStoreUnavailableError:
            first = True
        if first:
            hint = (
                "check WXPHONE_WECHAT_API_BASE and any gateway or proxy on the way"
                if isinstance(error, WeChatHttpStatusError)
                else "check the app's settings at WeChat"
            )
            log.error(
                "OPERATOR ALERT: %s: %s: a configuration error; every such call fails at once until it "
                "is fixed (%s). Not repeated for %.0f minutes",
                appid,
                error,
                hint,
                BUSINESS_ALERT_REPEAT_SECONDS / 60,
                extra={"appid": appid},
            )

    def _credentials_digest(self, credentials: AppCredentials) -> str:
        """A keyed hash (HMAC-SHA256, keyed with the AppSecret) of what a token fetch depends on.

        Every process with the same configuration computes the same value, a process with another
        AppSecret, base URL, proxy or token mode a different one; the value reveals nothing of
        the secret.
        """
        proxies = sorted((str(key), str(value)) for key, value in (self.client.session.proxies or {}).items())
        material = json.dumps(
            ["wxphone-token-fetch", credentials.appid, self.mode, self.client.base_url, proxies]
        )
        return hmac.new(credentials.secret.encode(), material.encode(), hashlib.sha256).hexdigest()

    # -- forced refresh -----------------------------------------------------------------------

    def _force_refresh(self, credentials: AppCredentials) -> CachedToken:
        """Make the forced fetch under the lease, or say that it was not made.

        Every error raised here says whether a token was forced: :class:`ForceRefreshRefusedError`
        and :class:`ForceRefreshFailedError` in their message; any other error was raised before a
        call to WeChat (nothing forced, nothing counted).
        """
        appid = credentials.appid
        if self.mode == "stable":
            self._check_force_budget(appid)  # refuse at once, spending nothing
        deadline = time.monotonic() + self.wait_seconds
        while True:
            with self.store.lease(appid, lease_seconds=self.lease_seconds) as fence:
                if fence:
                    self._raise_if_fetch_blocked(credentials)
                    if self.mode == "stable":
                        return self._forced_stable_fetch(credentials, fence=fence)
                    return self._forced_classic_fetch(credentials, fence=fence)
            if time.monotonic() >= deadline:
                raise ForceRefreshFailedError(
                    f"{appid}: not forced: another refresh held the lease for {self.wait_seconds:.0f}s; "
                    "no force refresh was made or counted, try again"
                )
            self._sleep(WAIT_POLL_SECONDS * (1 + random.random()))

    def _check_force_budget(self, appid: str) -> None:
        budget = self.store.force_budget(appid)
        if budget.spacing_active:
            raise ForceRefreshRefusedError(
                f"{appid}: not forced: the previous force refresh was less than "
                f"{FORCE_REFRESH_SPACING_SECONDS}s ago"
            )
        if budget.used_today >= FORCE_REFRESH_DAILY_LIMIT:
            raise ForceRefreshRefusedError(
                f"{appid}: not forced: all {FORCE_REFRESH_DAILY_LIMIT} force refreshes of today "
                "(Beijing time) are used"
            )

    def _forced_classic_fetch(self, credentials: AppCredentials, *, fence: int) -> CachedToken:
        """Classic mode: every fetch issues a new token and retires the old one; ours, under the lease."""
        appid = credentials.appid
        try:
            written = self._fetch_and_write(appid, fence=fence)
        except WxphoneError as error:
            cause = error.__cause__ if isinstance(error.__cause__, WxphoneError) else error
            if _may_have_been_performed(cause):
                raise ForceRefreshFailedError(
                    f"{appid}: refresh outcome unknown ({cause}): WeChat may have issued a new token; "
                    "workers pick it up after their next token rejection"
                ) from error
            raise ForceRefreshFailedError(f"{appid}: not forced: {error}") from error
        if written is None:
            raise ForceRefreshFailedError(
                f"{appid}: refreshed, but the lease ran out before the new token was stored; workers "
                "pick it up after their next token rejection"
            )
        return written

    def _forced_stable_fetch(self, credentials: AppCredentials, *, fence: int) -> CachedToken:
        """Under the lease: spend one force refresh, make the call, and keep the count honest."""
        appid = credentials.appid
        day = self.store.force_day()
        used = self.store.spend_force_refresh(
            appid,
            daily_limit=FORCE_REFRESH_DAILY_LIMIT,
            spacing_seconds=FORCE_REFRESH_SPACING_SECONDS,
            day=day,
        )
        if used < 0:
            self._check_force_budget(appid)  # raises the precise refusal
            raise ForceRefreshRefusedError(f"{appid}: not forced: the force-refresh budget refused it")
        previous = self.store.read(appid)
        try:
            token = self._fetch(credentials, force=True)
        except WeChatQuotaExhaustedError:
            # On a forced call, 45009 is the force budget (another system spent some today); it
            # says nothing about normal fetches, so the token circuit stays closed.
            with suppress(TokenStoreUnavailableError):
                self.store.exhaust_force_budget(appid, day=day, daily_limit=FORCE_REFRESH_DAILY_LIMIT)
            raise ForceRefreshRefusedError(
                f"{appid}: not forced: WeChat says today's force refreshes are used up (45009)"
            ) from None
        except WxphoneError as error:
            maybe_forced = _may_have_been_performed(error)
            with suppress(TokenStoreUnavailableError):
                if maybe_forced:
                    self.store.restart_force_spacing(appid, spacing_seconds=FORCE_REFRESH_SPACING_SECONDS)
                else:
                    self.store.refund_force_refresh(appid, day=day)
                self._record_fetch_failure(credentials, error)  # backoff, or the configuration alert
            if maybe_forced:
                raise ForceRefreshFailedError(
                    f"{appid}: force refresh outcome unknown ({error}): WeChat may have revoked the "
                    "current token; it is counted against today's budget, and workers pick up the new "
                    "token after their next token rejection"
                ) from error
            raise ForceRefreshFailedError(f"{appid}: not forced: {error}; not counted") from error
        if previous is not None and token.value == previous.value:
            # WeChat performs no force refresh within 30 s of the previous one (made by another
            # system, here) and hands back the current token: not forced, and WeChat did not count it.
            with suppress(TokenStoreUnavailableError):
                self.store.refund_force_refresh(appid, day=day)
                self.store.restart_force_spacing(appid, spacing_seconds=FORCE_REFRESH_SPACING_SECONDS)
            raise ForceRefreshFailedError(
                f"{appid}: not forced: WeChat returned the current token (it skips a force refresh "
                f"within {FORCE_REFRESH_SPACING_SECONDS}s of another, perhaps by another system); "
                "not counted, try again in a minute"
            )
        try:
            # WeChat measures the spacing from its own call: start ours again now the call is over.
            self.store.restart_force_spacing(appid, spacing_seconds=FORCE_REFRESH_SPACING_SECONDS)
            written = self._write(appid, token, fence=fence)
        except TokenStoreUnavailableError:
            written = None
        if written is None:
            raise ForceRefreshFailedError(
                f"{appid}: forced (WeChat issued a new token and revoked the old one), but it could not "
                "be stored; workers pick it up after their next token rejection"
            )
        log.warning(
            "access token force-refreshed (%d of today's %d)",
            used,
            FORCE_REFRESH_DAILY_LIMIT,
            extra={"appid": appid},
        )
        return written


def _may_have_been_performed(error: WxphoneError) -> bool:
    """Whether WeChat may have carried out a request that ended in ``error``."""
    if isinstance(error, WeChatTransportError):
        return error.maybe_processed
    if isinstance(error, WeChatHttpStatusError):
        return False  # a redirect or 4xx from the base URL or a gateway: WeChat never saw it
    # WeChat answered with an errcode: it did nothing. Anything else: assume it may have.
    return not (isinstance(error, WeChatError) and error.errcode is not None)
