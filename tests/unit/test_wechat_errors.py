"""The errcode table, the reactions each error carries, and what survives a trip through pickle."""

from __future__ import annotations

import pickle

import pytest

from worker.errors import (
    OperatorActionRequiredError,
    RequestRejectedError,
    RetryLaterError,
    TokenInvalidError,
    WxphoneError,
)
from worker.wechat.errors import (
    API_CLASSIC_TOKEN,
    API_CODE_TO_SESSION,
    API_PHONE_NUMBER,
    API_STABLE_TOKEN,
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
    error_for_errcode,
    extract_rid,
)

BUSINESS_APIS = [API_PHONE_NUMBER, API_CODE_TO_SESSION]
TOKEN_APIS = [API_CLASSIC_TOKEN, API_STABLE_TOKEN]
ALL_APIS = BUSINESS_APIS + TOKEN_APIS

# Codes an operator has to act on (wechat-api.md §6 and §11 item 8), whichever API returns them.
CONFIGURATION_CODES = [40002, 40013, 40125, 40164, 40243, 41001, 41002, 41004, 43002, 48001, 50004, 50007,
                       61024, 89501, 89503, 89506, 89507]  # fmt: skip


@pytest.mark.parametrize("api", ALL_APIS)
@pytest.mark.parametrize(
    ("errcode", "expected"),
    [
        (-1, WeChatBusyError),
        (45011, WeChatRateLimitedError),
        (40029, WeChatInvalidCodeError),
        (40226, WeChatHighRiskUserError),
        (45009, WeChatQuotaExhaustedError),
        (1, WeChatUnknownError),
        (87009, WeChatUnknownError),
    ],
)
def test_errcode_maps_to_the_same_class_on_every_api(
    api: str, errcode: int, expected: type[WeChatError]
) -> None:
    error = error_for_errcode(errcode, api=api)
    assert type(error) is expected
    assert error.errcode == errcode
    assert error.api == api


@pytest.mark.parametrize("api", ALL_APIS)
@pytest.mark.parametrize("errcode", CONFIGURATION_CODES)
def test_configuration_codes_need_an_operator(api: str, errcode: int) -> None:
    error = error_for_errcode(errcode, api=api)
    assert type(error) is WeChatConfigurationError
    assert isinstance(error, OperatorActionRequiredError)


@pytest.mark.parametrize("errcode", [40001, 40014, 42001])
def test_token_errors_mean_a_stale_token_on_business_calls(errcode: int) -> None:
    error = error_for_errcode(errcode, api=API_PHONE_NUMBER)
    assert type(error) is WeChatTokenRejectedError
    assert isinstance(error, TokenInvalidError)


@pytest.mark.parametrize("api", TOKEN_APIS)
@pytest.mark.parametrize("errcode", [40001, 40014, 42001])
def test_token_errors_mean_bad_credentials_on_token_endpoints(api: str, errcode: int) -> None:
    # Refreshing the token cannot fix a wrong AppSecret; retrying would only burn quota.
    error = error_for_errcode(errcode, api=api)
    assert type(error) is WeChatConfigurationError
    assert not isinstance(error, TokenInvalidError)


@pytest.mark.parametrize(
    ("cls", "reaction", "error_code"),
    [
        (WeChatBusyError, RetryLaterError, "upstream_unavailable"),
        (WeChatRateLimitedError, RetryLaterError, "rate_limited"),
        (WeChatUnreachableError, RetryLaterError, "upstream_unavailable"),
        (WeChatReplyLostError, RetryLaterError, "upstream_unavailable"),
        (WeChatMalformedReplyError, RetryLaterError, "upstream_unavailable"),
        (WeChatTokenRejectedError, TokenInvalidError, "token_invalid"),
        (WeChatInvalidCodeError, RequestRejectedError, "invalid_code"),
        (WeChatHighRiskUserError, RequestRejectedError, "high_risk_user"),
        (WeChatUnknownError, RequestRejectedError, "upstream_error"),
        (WeChatConfigurationError, OperatorActionRequiredError, "wechat_config_error"),
        (WeChatQuotaExhaustedError, OperatorActionRequiredError, "quota_exhausted"),
        (WeChatHttpStatusError, OperatorActionRequiredError, "wechat_config_error"),
        (WeChatHttpRefusedError, RetryLaterError, "upstream_unavailable"),
    ],
)
def test_each_error_has_exactly_one_reaction_and_a_stable_error_code(
    cls: type[WeChatError], reaction: type[WxphoneError], error_code: str
) -> None:
    reactions = [RetryLaterError, TokenInvalidError, RequestRejectedError, OperatorActionRequiredError]
    error = cls(api=API_PHONE_NUMBER)
    assert [r for r in reactions if isinstance(error, r)] == [reaction]
    assert error.error_code == error_code


def test_only_a_failed_connect_is_known_not_to_have_reached_wechat() -> None:
    assert WeChatUnreachableError.maybe_processed is False
    assert WeChatReplyLostError.maybe_processed is True
    assert WeChatMalformedReplyError.maybe_processed is True
    assert issubclass(WeChatMalformedReplyError, WeChatReplyLostError)
    assert issubclass(WeChatReplyLostError, WeChatTransportError)
    # HTTP 408/429: the gateway refused the request before anything was processed.
    assert WeChatHttpRefusedError.maybe_processed is False
    assert issubclass(WeChatHttpRefusedError, WeChatTransportError)
    # HTTP 3xx/4xx: a configuration error, never a transport error to retry.
    assert issubclass(WeChatHttpStatusError, WeChatConfigurationError)
    assert not issubclass(WeChatHttpStatusError, RetryLaterError)


@pytest.mark.parametrize(
    ("errmsg", "rid"),
    [
        (
            "invalid code hint: [hElexSDNRa-XiBFgA] rid: 632d16be-15ad5486-1e378de4",
            "632d16be-15ad5486-1e378de4",
        ),
        ("access_token expired rid:6583a0c8-0b3f8d1e-2c6a1b4f", "6583a0c8-0b3f8d1e-2c6a1b4f"),
        ("system error", None),
        ("", None),
        (None, None),
        (40029, None),
    ],
)
def test_extract_rid(errmsg: object, rid: str | None) -> None:
    assert extract_rid(errmsg) == rid


def test_message_names_api_label_errcode_and_rid() -> None:
    error = error_for_errcode(40029, api=API_PHONE_NUMBER, rid="632d16be-15ad5486-1e378de4")
    assert str(error) == "phone: invalid code errcode=40029 rid=632d16be-15ad5486-1e378de4"


def test_http_status_message_names_the_status() -> None:
    assert str(WeChatHttpStatusError(api=API_STABLE_TOKEN, http_status=404)) == (
        "stable_token: not a WeChat reply HTTP 404"
    )


def test_transport_message_carries_the_detail() -> None:
    error = WeChatReplyLostError(api=API_STABLE_TOKEN, detail="read timed out")
    assert str(error) == "stable_token: reply lost read timed out"


@pytest.mark.parametrize(
    "error",
    [
        error_for_errcode(40029, api=API_PHONE_NUMBER, rid="632d16be-15ad5486-1e378de4"),
        error_for_errcode(40001, api=API_CLASSIC_TOKEN),
        error_for_errcode(-1, api=API_CODE_TO_SESSION, rid="r-1"),
        WeChatUnreachableError(api=API_PHONE_NUMBER, detail="connection refused"),
        WeChatMalformedReplyError(api=API_STABLE_TOKEN, detail="reply is not JSON"),
        WeChatHttpStatusError(api=API_PHONE_NUMBER, http_status=404),
        WeChatHttpRefusedError(api=API_STABLE_TOKEN, http_status=429),
    ],
    ids=repr,
)
def test_pickling_keeps_class_errcode_rid_and_message(error: WeChatError) -> None:
    restored = pickle.loads(pickle.dumps(error))

    assert type(restored) is type(error)
    assert (restored.api, restored.errcode, restored.rid, restored.detail, restored.http_status) == (
        error.api,
        error.errcode,
        error.rid,
        error.detail,
        error.http_status,
    )
    assert str(restored) == str(error)
