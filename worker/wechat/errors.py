"""Errors raised by the WeChat API client.

Every class also inherits one of the four reactions in :mod:`worker.errors`::

    WeChatError
    ├── WeChatBusyError              -1        RetryLaterError
    ├── WeChatRateLimitedError       45011     RetryLaterError
    ├── WeChatTransportError                   RetryLaterError
    │   ├── WeChatUnreachableError             request never reached WeChat (connect failure)
    │   ├── WeChatHttpRefusedError             HTTP 408 or 429: refused for now, not processed
    │   └── WeChatReplyLostError               request may have been processed (read timeout,
    │       │                                  dropped connection, HTTP 5xx)
    │       └── WeChatMalformedReplyError      HTTP 200 with a body that is not a valid reply
    ├── WeChatInvalidReplyError      a success reply whose phone_info is missing or unusable
    │                                (the code is spent: retrying only gets 40029)  RequestRejectedError
    ├── WeChatTokenRejectedError     40001/40014/42001 on business calls   TokenInvalidError
    ├── WeChatInvalidCodeError       40029     RequestRejectedError
    ├── WeChatHighRiskUserError      40226     RequestRejectedError
    ├── WeChatUnknownError           any errcode not listed here           RequestRejectedError
    ├── WeChatConfigurationError     40001 on the token endpoints, 40002, 40013, 40125, 40164,
    │                                40243, 41001, 41002, 41004, 43002, 48001, 50004, 50007,
    │   │                            61024, 89501, 89503, 89506, 89507     OperatorActionRequiredError
    │   └── WeChatHttpStatusError    HTTP 3xx or 4xx other than 408/429: a wrong base URL, a
    │                                gateway or proxy refusing us; the same every time
    └── WeChatQuotaExhaustedError    45009     OperatorActionRequiredError

Messages carry the API name, errcode or HTTP status, a short label and WeChat's ``rid``; never the
raw request, URL, secret, token, code or phone number.
"""

from __future__ import annotations

import re
from typing import ClassVar

from worker.errors import (
    OperatorActionRequiredError,
    RequestRejectedError,
    RetryLaterError,
    TokenInvalidError,
    WxphoneError,
)

__all__ = [
    "WeChatBusyError",
    "WeChatConfigurationError",
    "WeChatError",
    "WeChatHighRiskUserError",
    "WeChatHttpRefusedError",
    "WeChatHttpStatusError",
    "WeChatInvalidCodeError",
    "WeChatInvalidReplyError",
    "WeChatMalformedReplyError",
    "WeChatQuotaExhaustedError",
    "WeChatRateLimitedError",
    "WeChatReplyLostError",
    "WeChatTokenRejectedError",
    "WeChatTransportError",
    "WeChatUnknownError",
    "WeChatUnreachableError",
    "error_for_errcode",
    "extract_rid",
]

_RID_PATTERN = re.compile(r"rid:\s*([0-9A-Za-z-]{1,64})")

#: API names used in messages and counters.
API_CLASSIC_TOKEN = "token"
API_STABLE_TOKEN = "stable_token"
API_PHONE_NUMBER = "phone"
API_CODE_TO_SESSION = "login"
TOKEN_APIS = frozenset({API_CLASSIC_TOKEN, API_STABLE_TOKEN})


def extract_rid(errmsg: object) -> str | None:
    """Return the ``rid`` WeChat appends to ``errmsg``, if any."""
    if not isinstance(errmsg, str):
        return None
    match = _RID_PATTERN.search(errmsg)
    return match.group(1) if match else None


class WeChatError(WxphoneError):
    """Base class of every error reported by, or on the way to, WeChat."""

    label: ClassVar[str] = "wechat error"

    def __init__(
        self,
        *,
        api: str,
        errcode: int | None = None,
        rid: str | None = None,
        detail: str = "",
        http_status: int | None = None,
    ) -> None:
        self.api = api
        self.errcode = errcode
        self.rid = rid
        #: The HTTP status of a reply that was not a WeChat reply (a 5xx, a 4xx, a redirect).
        self.http_status = http_status
        if http_status is not None and not detail:
            detail = f"HTTP {http_status}"
        self.detail = detail
        parts = [f"{api}: {self.label}"]
        if errcode is not None:
            parts.append(f"errcode={errcode}")
        if detail:
            parts.append(detail)
        if rid:
            parts.append(f"rid={rid}")
        super().__init__(" ".join(parts))

    def __reduce__(self) -> tuple[object, ...]:
        # Keyword-only __init__: teach pickle (Celery result backends) how to rebuild us.
        return (_rebuild, (type(self), self.api, self.errcode, self.rid, self.detail, self.http_status))


def _rebuild(
    cls: type[WeChatError],
    api: str,
    errcode: int | None,
    rid: str | None,
    detail: str,
    http_status: int | None = None,
) -> WeChatError:
    return cls(api=api, errcode=errcode, rid=rid, detail=detail, http_status=http_status)


class WeChatBusyError(WeChatError, RetryLaterError):
    """errcode -1: WeChat is busy; retry with backoff."""

    label = "system busy"


class WeChatRateLimitedError(WeChatError, RetryLaterError):
    """errcode 45011: per-minute limit reached; back off until the next minute."""

    label = "minute quota reached"
    error_code = "rate_limited"


class WeChatTransportError(WeChatError, RetryLaterError):
    """The HTTP exchange itself failed; no WeChat errcode is available."""

    label = "transport error"
    #: Whether WeChat may have processed the request (so a single-use code may be spent).
    maybe_processed: ClassVar[bool] = True


class WeChatUnreachableError(WeChatTransportError):
    """The request never reached WeChat (connection refused, DNS, connect timeout)."""

    label = "unreachable"
    maybe_processed = False


class WeChatHttpRefusedError(WeChatTransportError):
    """HTTP 408 (request timeout) or 429 (too many requests), from WeChat or a gateway on the way.

    The request was refused before it was processed, so a phone code is still unused; the same
    request may succeed later.
    """

    label = "refused for now"
    maybe_processed = False


class WeChatReplyLostError(WeChatTransportError):
    """The request was sent but no usable reply came back (read timeout, reset, HTTP 5xx)."""

    label = "reply lost"


class WeChatMalformedReplyError(WeChatReplyLostError):
    """A reply arrived but is not valid JSON of the documented shape."""

    label = "malformed reply"


class WeChatInvalidReplyError(WeChatError, RequestRejectedError):
    """WeChat answered a phone call with success but its ``phone_info`` is missing, mistyped or
    out of range (a number too long to be one, a country code of more than 4 digits, a watermark
    time outside 2000-2100). WeChat has consumed the code by then, so a retry could only get 40029:
    the job fails ``invalid_reply`` at once."""

    label = "unusable phone_info"
    error_code = "invalid_reply"


class WeChatTokenRejectedError(WeChatError, TokenInvalidError):
    """40001/40014/42001 on a business call: the access token is invalid or expired."""

    label = "access token rejected"


class WeChatInvalidCodeError(WeChatError, RequestRejectedError):
    """40029: the code does not exist, has expired or was already used."""

    label = "invalid code"
    error_code = "invalid_code"


class WeChatHighRiskUserError(WeChatError, RequestRejectedError):
    """40226: WeChat blocked this login as high-risk."""

    label = "high-risk user blocked"
    error_code = "high_risk_user"


class WeChatUnknownError(WeChatError, RequestRejectedError):
    """An errcode this client does not know; not retried, logged for a human."""

    label = "unexpected errcode"
    error_code = "upstream_error"


class WeChatConfigurationError(WeChatError, OperatorActionRequiredError):
    """Wrong appid/secret, IP whitelist, frozen account or another setup problem."""

    label = "configuration error"
    error_code = "wechat_config_error"


class WeChatHttpStatusError(WeChatConfigurationError):
    """HTTP 3xx or 4xx (but 408 and 429): not a WeChat reply at all.

    WeChat answers every request it reads with HTTP 200 and an errcode. A redirect, 403 or 404
    comes from a wrong ``WXPHONE_WECHAT_API_BASE``, a gateway or a proxy refusing us, and it
    answers the same way until an operator changes something: retrying would only run the code
    out of its life.
    """

    label = "not a WeChat reply"


class WeChatQuotaExhaustedError(WeChatError, OperatorActionRequiredError):
    """45009: the daily quota for this API is exhausted."""

    label = "daily quota exhausted"
    error_code = "quota_exhausted"


_TOKEN_REJECTED_CODES = frozenset({40001, 40014, 42001})
_CONFIGURATION_CODES = frozenset(
    {40002, 40013, 40125, 40164, 40243, 41001, 41002, 41004, 43002, 48001, 50004, 50007, 61024,
     89501, 89503, 89506, 89507}
)  # fmt: skip
_PER_CODE: dict[int, type[WeChatError]] = {
    -1: WeChatBusyError,
    45011: WeChatRateLimitedError,
    40029: WeChatInvalidCodeError,
    40226: WeChatHighRiskUserError,
    45009: WeChatQuotaExhaustedError,
}


def error_for_errcode(errcode: int, *, api: str, rid: str | None = None) -> WeChatError:
    """Map a non-zero errcode returned by ``api`` to the exception to raise."""
    cls: type[WeChatError]
    if errcode in _TOKEN_REJECTED_CODES:
        # On the token endpoints 40001 means a wrong AppSecret, not a stale token.
        cls = WeChatConfigurationError if api in TOKEN_APIS else WeChatTokenRejectedError
    elif errcode in _CONFIGURATION_CODES:
        cls = WeChatConfigurationError
    else:
        cls = _PER_CODE.get(errcode, WeChatUnknownError)
    return cls(api=api, errcode=errcode, rid=rid)
