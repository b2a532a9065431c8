"""The WeChat server API client. It knows nothing of Celery, Redis or the database."""

from worker.wechat.client import WeChatClient
from worker.wechat.errors import (
    WeChatBusyError,
    WeChatConfigurationError,
    WeChatError,
    WeChatHighRiskUserError,
    WeChatHttpRefusedError,
    WeChatHttpStatusError,
    WeChatInvalidCodeError,
    WeChatMalformedReplyError,
    WeChatQuotaExhaustedError,
    WeChatRateLimitedError,
    WeChatReplyLostError,
    WeChatTokenRejectedError,
    WeChatTransportError,
    WeChatUnknownError,
    WeChatUnreachableError,
)
from worker.wechat.types import AccessToken, LoginSession, PhoneInfo

__all__ = [
    "AccessToken",
    "LoginSession",
    "PhoneInfo",
    "WeChatBusyError",
    "WeChatClient",
    "WeChatConfigurationError",
    "WeChatError",
    "WeChatHighRiskUserError",
    "WeChatHttpRefusedError",
    "WeChatHttpStatusError",
    "WeChatInvalidCodeError",
    "WeChatMalformedReplyError",
    "WeChatQuotaExhaustedError",
    "WeChatRateLimitedError",
    "WeChatReplyLostError",
    "WeChatTokenRejectedError",
    "WeChatTransportError",
    "WeChatUnknownError",
    "WeChatUnreachableError",
]
