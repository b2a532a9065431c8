"""Errors raised by the shared access-token service (each one of the four reactions)."""

from __future__ import annotations

from worker.errors import OperatorActionRequiredError, RequestRejectedError, RetryLaterError

__all__ = [
    "AppNotConfiguredError",
    "ForceRefreshFailedError",
    "ForceRefreshRefusedError",
    "TokenConfigurationError",
    "TokenFetchBackoffError",
    "TokenQuotaExhaustedError",
    "TokenRejectedAfterRefreshError",
    "TokenStoreUnavailableError",
    "TokenWaitTimeoutError",
]


class TokenStoreUnavailableError(RetryLaterError):
    """Redis, where the shared token lives, cannot be reached.

    Workers never fall back to minting tokens of their own: with classic tokens every fetch
    revokes the fleet's token, and one outage would burn the daily token quota.
    """

    error_code = "token_store_unavailable"


class TokenWaitTimeoutError(RetryLaterError):
    """Another process holds the refresh lock and no token appeared within the wait bound."""

    error_code = "token_unavailable"


class TokenFetchBackoffError(RetryLaterError):
    """A token fetch of this app failed moments ago: no process fetches again until the backoff
    (shared in Redis) runs out. Raised to the process whose fetch failed and to every reader that
    needs a token meanwhile, without a call to WeChat."""

    error_code = "token_unavailable"

    def __init__(self, message: str, *, retry_in_seconds: float) -> None:
        super().__init__(message)
        self.retry_in_seconds = retry_in_seconds

    def __reduce__(self) -> tuple[object, ...]:
        return (_rebuild_backoff, (str(self), self.retry_in_seconds))


def _rebuild_backoff(message: str, retry_in_seconds: float) -> TokenFetchBackoffError:
    return TokenFetchBackoffError(message, retry_in_seconds=retry_in_seconds)


class TokenConfigurationError(OperatorActionRequiredError):
    """WeChat refused this app's credentials or destination (a wrong AppSecret, an IP whitelist,
    an HTTP 4xx from the base URL): no token is fetched until the configuration changes, the
    record lapses or an operator clears it (``wxphone token clear-error``)."""

    error_code = "wechat_config_error"


class TokenQuotaExhaustedError(OperatorActionRequiredError):
    """The token API's daily quota is exhausted (45009): its circuit is open until midnight
    Beijing time, and no token is fetched meanwhile. Not the business API's quota: a job that
    meets it must not close that API's calls."""

    error_code = "quota_exhausted"


class AppNotConfiguredError(RequestRejectedError):
    """The appid is not one of the configured mini programs."""

    error_code = "app_not_configured"


class TokenRejectedAfterRefreshError(OperatorActionRequiredError):
    """WeChat rejected a freshly refreshed token too: something outside wxphone holds this app."""

    error_code = "wechat_config_error"


class ForceRefreshRefusedError(OperatorActionRequiredError):
    """A stable-token force refresh would exceed WeChat's daily budget or spacing."""

    error_code = "force_refresh_refused"


class ForceRefreshFailedError(OperatorActionRequiredError):
    """A force refresh did not end with a token WeChat issued for it: the message says whether a
    token was forced (and what the budget counted)."""

    error_code = "force_refresh_failed"
