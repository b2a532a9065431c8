"""Errors raised by the shared access-token service (each one of the four reactions)."""

from __future__ import annotations

from worker.errors import OperatorActionRequiredError, RequestRejectedError, RetryLaterError

__all__ = [
    "AppNotConfiguredError",
    "ForceRefreshRefusedError",
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


class AppNotConfiguredError(RequestRejectedError):
    """The appid is not one of the configured mini programs."""

    error_code = "app_not_configured"


class TokenRejectedAfterRefreshError(OperatorActionRequiredError):
    """WeChat rejected a freshly refreshed token too: something outside wxphone holds this app."""

    error_code = "wechat_config_error"


class ForceRefreshRefusedError(OperatorActionRequiredError):
    """A stable-token force refresh would exceed WeChat's daily budget or spacing."""

    error_code = "force_refresh_refused"
