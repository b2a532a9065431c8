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
  ``force=True`` (an operator command) does, within WeChat's daily budget and 30 s spacing.
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Literal, TypeVar

from worker.errors import TokenInvalidError
from worker.logs import register_secret
from worker.settings import AppCredentials, TokenMode
from worker.tokens.errors import (
    AppNotConfiguredError,
    ForceRefreshRefusedError,
    TokenRejectedAfterRefreshError,
    TokenWaitTimeoutError,
)
from worker.tokens.store import CachedToken, TokenStore
from worker.wechat.client import WeChatClient
from worker.wechat.types import AccessToken

__all__ = ["RefreshOutcome", "TokenService"]

log = logging.getLogger(__name__)

T = TypeVar("T")

#: WeChat allows 20 force refreshes a day per app, at least 30 s apart.
FORCE_REFRESH_DAILY_LIMIT = 20
FORCE_REFRESH_SPACING_SECONDS = 30
#: How often a process waiting for another's refresh looks again.
WAIT_POLL_SECONDS = 0.05

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

        The failed token is dropped only if it is still the stored one, so a fleet of workers
        that all saw the same rejection causes one refresh, not one each.
        """
        token = self.get_token(appid)
        try:
            return call(token.value)
        except TokenInvalidError:
            self._local.pop(appid, None)
            dropped = self.store.delete_if_current(appid, token.value)
            log.warning("access token rejected by WeChat", extra={"appid": appid, "dropped": dropped})
        fresh = self.get_token(appid, reuse=False)
        try:
            return call(fresh.value)
        except TokenInvalidError:
            # A token we just refreshed is rejected too: another system is fetching tokens for
            # this app, or the token belongs elsewhere. Looping would only burn the quota.
            log.error("access token rejected again after a refresh", extra={"appid": appid})
            raise TokenRejectedAfterRefreshError(
                f"{appid}: WeChat rejected a freshly refreshed access token"
            ) from None

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
            written = self._fetch_and_write(appid, fence=fence, force=False)
        self._local.pop(appid, None)
        return RefreshOutcome(
            appid, "refreshed" if written else "busy", written.expires_at if written else None
        )

    def refresh(self, appid: str, *, force: bool = False) -> CachedToken:
        """The operator path: fetch a new token now.

        In stable mode ``force=True`` asks WeChat to revoke the current token (for a leak), and is
        refused beyond WeChat's daily budget or within 30 s of the previous force refresh; without
        it, stable mode fetches in normal mode. In classic mode every fetch issues a new token.
        """
        self._credentials(appid)
        use_force = force and self.mode == "stable"
        if use_force:
            used = self.store.spend_force_refresh(
                appid, daily_limit=FORCE_REFRESH_DAILY_LIMIT, spacing_seconds=FORCE_REFRESH_SPACING_SECONDS
            )
            if used == -1:
                raise ForceRefreshRefusedError(
                    f"{appid}: the previous force refresh was less than {FORCE_REFRESH_SPACING_SECONDS}s ago"
                )
            if used == -2:
                raise ForceRefreshRefusedError(
                    f"{appid}: all {FORCE_REFRESH_DAILY_LIMIT} force refreshes of today are used"
                )
        self._local.pop(appid, None)
        return self._refresh_single_flight(appid, needed=lambda token: True, force=use_force)

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

    def _refresh_single_flight(
        self, appid: str, *, needed: Callable[[CachedToken], bool], force: bool = False
    ) -> CachedToken:
        """Refresh under the lease, or wait for whoever holds it; bounded by ``wait_seconds``."""
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
                    written = self._fetch_and_write(appid, fence=fence, force=force)
                    if written is not None:
                        return written
            current = self.store.read(appid)
            if current is not None and settled(current):
                return current
            if time.monotonic() >= deadline:
                raise TokenWaitTimeoutError(f"{appid}: no access token within {self.wait_seconds:.0f}s")
            self._sleep(WAIT_POLL_SECONDS * (1 + random.random()))

    def _fetch_and_write(self, appid: str, *, fence: int, force: bool) -> CachedToken | None:
        credentials = self._credentials(appid)
        token = self._fetch(credentials, force=force)
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
