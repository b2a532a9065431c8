"""The four reactions every wxphone failure maps to.

Retry decisions are made on these classes, never on message text::

    WxphoneError
    ├── RetryLaterError              transient: retry with backoff and jitter within the code's life
    ├── TokenInvalidError            WeChat rejected the access token: compare-and-delete it,
    │                                refresh once, retry the call once
    ├── RequestRejectedError         permanent for this request: never retry
    └── OperatorActionRequiredError  configuration or quota: log at ERROR for an operator, never retry

Concrete errors (``worker.wechat.errors``, ``worker.tokens.errors``) subclass one of the four.
No exception message in wxphone ever carries a secret, token, code, session_key or phone number.
"""

from __future__ import annotations

__all__ = [
    "OperatorActionRequiredError",
    "RequestRejectedError",
    "RetryLaterError",
    "TokenInvalidError",
    "WxphoneError",
]


class WxphoneError(Exception):
    """Base class of every error wxphone raises on purpose."""

    #: A short stable identifier stored as a job's ``error_code`` (for example ``invalid_code``).
    error_code: str = "internal_error"


class RetryLaterError(WxphoneError):
    """A transient failure: the same request may succeed later."""

    error_code = "upstream_unavailable"


class TokenInvalidError(WxphoneError):
    """WeChat rejected the access token used for a business call."""

    error_code = "token_invalid"


class RequestRejectedError(WxphoneError):
    """A failure that will repeat for this exact request; retrying is pointless."""

    error_code = "rejected"


class OperatorActionRequiredError(WxphoneError):
    """A configuration or quota problem that only an operator can fix."""

    error_code = "wechat_config_error"
