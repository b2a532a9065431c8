"""Property: whatever WeChat (or something posing as it) sends back, the client raises a
WeChatError subclass or returns a well-typed value; never another exception."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.support.scripted_wechat import ScriptedWeChat, scripted_wechat
from worker.wechat.client import MAX_REPLY_BYTES, WeChatClient
from worker.wechat.errors import WeChatError
from worker.wechat.types import AccessToken, LoginSession, PhoneInfo

JSON_SCALARS = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=False),
    st.text(max_size=40),
)
JSON_VALUES = st.recursive(
    JSON_SCALARS,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=12), inner, max_size=4),
    max_leaves=12,
)
ERRCODES = st.one_of(
    st.sampled_from(
        [0, -1, 40001, 40029, 45011, 45009, 40226, 40013, 99999, "0", "40029", "x", "", None, 1.5]
    ),
    JSON_VALUES,
)


def plausible_phone_info() -> st.SearchStrategy[Any]:
    """Shapes close to a real reply, with any field missing, mistyped or odd."""
    field = st.one_of(st.text(max_size=20), st.from_regex(r"1[3-9]\d{9}", fullmatch=True), JSON_VALUES)
    watermark = st.fixed_dictionaries(
        {}, optional={"appid": field, "timestamp": st.one_of(st.integers(), JSON_VALUES)}
    )
    return st.fixed_dictionaries(
        {},
        optional={
            "phoneNumber": field,
            "purePhoneNumber": field,
            "countryCode": st.one_of(st.integers(), st.text(max_size=5), JSON_VALUES),
            "watermark": st.one_of(watermark, JSON_VALUES),
        },
    )


JSON_BODIES = st.fixed_dictionaries(
    {},
    optional={
        "errcode": ERRCODES,
        "errmsg": st.one_of(st.text(max_size=60), JSON_VALUES),
        "phone_info": st.one_of(plausible_phone_info(), JSON_VALUES),
        "openid": st.one_of(st.text(max_size=40), JSON_VALUES),
        "unionid": st.one_of(st.text(max_size=40), JSON_VALUES),
        "session_key": st.one_of(st.text(max_size=40), JSON_VALUES),
        "access_token": st.one_of(st.text(max_size=40), JSON_VALUES),
        "expires_in": st.one_of(st.integers(), JSON_VALUES),
    },
).map(lambda body: json.dumps(body).encode())

BODIES = st.one_of(
    JSON_BODIES,
    JSON_VALUES.map(lambda value: json.dumps(value).encode()),  # not an object
    st.binary(max_size=200),  # not JSON at all
    st.text(max_size=200).map(lambda text: text.encode("utf-8", "surrogatepass")),
    st.text(max_size=50).map(lambda text: text.encode("utf-16")),  # another encoding
    st.integers(min_value=1, max_value=40).map(lambda depth: b"[" * (depth * 1000) + b"]" * (depth * 1000)),
    st.integers(min_value=MAX_REPLY_BYTES - 10, max_value=MAX_REPLY_BYTES * 3).map(
        lambda size: b'{"errcode": 0, "pad": "' + b"x" * size + b'"}'
    ),
    JSON_BODIES.map(lambda body: body[: max(0, len(body) - 3)]),  # truncated
)
STATUSES = st.sampled_from([200, 200, 200, 200, 204, 301, 400, 404, 418, 500, 502, 503])

Call = Callable[[WeChatClient], object]
CALLS: dict[str, tuple[Call, type]] = {
    "phone": (lambda client: client.get_phone_number(access_token="T" * 40, code="C" * 32), PhoneInfo),
    "login": (
        lambda client: client.code_to_session(appid="wxa", secret="S" * 32, js_code="J" * 32),
        LoginSession,
    ),
    "stable_token": (lambda client: client.fetch_stable_token(appid="wxa", secret="S" * 32), AccessToken),
}


@pytest.fixture(scope="module")
def server() -> Iterator[ScriptedWeChat]:
    with scripted_wechat(script_tokens=True) as running:
        yield running


@pytest.fixture(scope="module")
def client(server: ScriptedWeChat) -> Iterator[WeChatClient]:
    wechat = WeChatClient(server.url, timeout=(1.0, 2.0))
    yield wechat
    wechat.close()


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(status=STATUSES, body=BODIES, api=st.sampled_from(sorted(CALLS)))
def test_any_reply_ends_in_a_value_or_a_wechat_error(
    server: ScriptedWeChat, client: WeChatClient, status: int, body: bytes, api: str
) -> None:
    server.set_reply(status, body)
    call, expected = CALLS[api]
    try:
        value = call(client)
    except WeChatError as error:
        assert error.error_code and type(error) is not WeChatError
        assert "T" * 40 not in str(error) and "C" * 32 not in str(error) and "S" * 32 not in str(error)
        return
    assert status == 200 and isinstance(value, expected)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(info=plausible_phone_info())
def test_a_successful_phone_reply_is_typed_or_refused(
    server: ScriptedWeChat, client: WeChatClient, info: dict[str, Any]
) -> None:
    server.set_reply(200, json.dumps({"errcode": 0, "errmsg": "ok", "phone_info": info}).encode())
    try:
        value = client.get_phone_number(access_token="T" * 40, code="C" * 32)
    except WeChatError as error:
        # The code is spent once WeChat answers success: an unusable phone_info is refused for good
        # (a retry could only get 40029), never trusted and never stored.
        assert error.error_code == "invalid_reply"
        return
    assert isinstance(value, PhoneInfo)
    assert all(isinstance(part, str) for part in (value.phone_number, value.pure_phone_number))
    assert value.country_code.isdigit() and 1 <= len(value.country_code) <= 4
    assert isinstance(value.watermark_timestamp, int)
    assert len(value.phone_number) <= 32 and value.pure_phone_number.isdigit()
