"""WeChatClient against a real local HTTP server that plays WeChat's part, reply by reply."""

from __future__ import annotations

import json
import pickle
import socket
import threading
import traceback
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlsplit

import pytest
import requests

from worker.errors import (
    OperatorActionRequiredError,
    RequestRejectedError,
    RetryLaterError,
    TokenInvalidError,
)
from worker.settings import AppCredentials
from worker.wechat.client import WeChatClient
from worker.wechat.errors import (
    WeChatBusyError,
    WeChatConfigurationError,
    WeChatError,
    WeChatHighRiskUserError,
    WeChatInvalidCodeError,
    WeChatInvalidReplyError,
    WeChatMalformedReplyError,
    WeChatQuotaExhaustedError,
    WeChatRateLimitedError,
    WeChatReplyLostError,
    WeChatTokenRejectedError,
    WeChatUnknownError,
    WeChatUnreachableError,
)
from worker.wechat.types import AccessToken, LoginSession, PhoneInfo

APPID = "wx1234567890abcdef"
APP_SECRET = "0123456789abcdefSECRETfedcba9876"
ACCESS_TOKEN = "ACCESSTOKEN_81_xYzAbCdEfGhIjKlMnOpQrStUvWxYz0123456789"
PHONE_CODE = "PHONECODE-e31968a7f94cc5ee25fafc2aef2773f0"
JS_CODE = "JSCODE-0a1b2c3d4e5f6a7b8c9d"
SESSION_KEY = "SESSIONKEY-tiihtNczf5v6AKRyjwEUhQ=="
PHONE_NUMBER = "13800138000"
SECRETS = (APP_SECRET, ACCESS_TOKEN, PHONE_CODE, JS_CODE, SESSION_KEY, PHONE_NUMBER)

RID = "632d16be-15ad5486-1e378de4"
RID_ERRMSG = f"invalid code hint: [hElexSDNRa-XiBFgA] rid: {RID}"
SHORT_READ_TIMEOUT = 0.3


# -- the scripted server ------------------------------------------------------------------------


@dataclass(frozen=True)
class Reply:
    """What the server does for one request."""

    status: int = 200
    body: bytes = b"{}"
    delay: float = 0.0
    drop: bool = False  # close the connection without writing a reply


@dataclass(frozen=True)
class ReceivedRequest:
    method: str
    path: str
    query: dict[str, list[str]]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


@dataclass
class ScriptedServer:
    """Replies are consumed in order; once the script runs out, the last reply repeats."""

    httpd: ThreadingHTTPServer
    script: deque[Reply] = field(default_factory=deque)
    received: list[ReceivedRequest] = field(default_factory=list)
    stopping: threading.Event = field(default_factory=threading.Event)
    last: Reply = field(default_factory=Reply)

    @property
    def url(self) -> str:
        host, port = self.httpd.server_address[:2]
        return f"http://{host!s}:{port}"

    def reply(self, reply: Reply) -> None:
        self.script.append(reply)

    def reply_json(self, body: object, *, status: int = 200) -> None:
        self.script.append(Reply(status=status, body=json.dumps(body).encode()))

    def next_reply(self) -> Reply:
        if self.script:
            self.last = self.script.popleft()
        return self.last


class _Handler(BaseHTTPRequestHandler):
    server: _Server

    def _serve(self) -> None:
        scripted = self.server.scripted
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else b""
        parts = urlsplit(self.path)
        scripted.received.append(
            ReceivedRequest(self.command, parts.path, parse_qs(parts.query, keep_blank_values=True), body)
        )
        reply = scripted.next_reply()
        if reply.delay and scripted.stopping.wait(reply.delay):
            return
        if reply.drop:
            self.close_connection = True
            return
        try:
            self.send_response(reply.status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(reply.body)))
            self.end_headers()
            self.wfile.write(reply.body)
        except OSError:
            # The client gave up first (timeout, oversized reply); that is the point of the test.
            self.close_connection = True

    do_GET = _serve
    do_POST = _serve

    def log_message(self, format: str, *args: Any) -> None:
        """Keep the test output clean."""


class _Server(ThreadingHTTPServer):
    scripted: ScriptedServer

    def handle_error(self, request: Any, client_address: Any) -> None:
        """Clients that hang up early are expected here."""


@pytest.fixture
def server() -> Iterator[ScriptedServer]:
    httpd = _Server(("127.0.0.1", 0), _Handler)
    scripted = ScriptedServer(httpd)
    httpd.scripted = scripted
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    yield scripted
    scripted.stopping.set()
    httpd.shutdown()
    httpd.server_close()
    thread.join(timeout=5)


@pytest.fixture
def client(server: ScriptedServer) -> Iterator[WeChatClient]:
    wechat = WeChatClient(server.url, timeout=(1.0, SHORT_READ_TIMEOUT))
    yield wechat
    wechat.close()


@pytest.fixture
def closed_port_url() -> str:
    """A URL on which nothing listens, so connecting is refused."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    return f"http://127.0.0.1:{port}"


# -- calls and replies ----------------------------------------------------------------------------

Call = Callable[[WeChatClient], object]


def call_classic_token(client: WeChatClient) -> object:
    return client.fetch_classic_token(appid=APPID, secret=APP_SECRET)


def call_stable_token(client: WeChatClient) -> object:
    return client.fetch_stable_token(appid=APPID, secret=APP_SECRET)


def call_phone(client: WeChatClient) -> object:
    return client.get_phone_number(access_token=ACCESS_TOKEN, code=PHONE_CODE)


def call_login(client: WeChatClient) -> object:
    return client.code_to_session(appid=APPID, secret=APP_SECRET, js_code=JS_CODE)


ALL_CALLS: dict[str, Call] = {
    "classic_token": call_classic_token,
    "stable_token": call_stable_token,
    "phone": call_phone,
    "login": call_login,
}


def phone_reply(country_code: object = "86") -> dict[str, object]:
    return {
        "errcode": 0,
        "errmsg": "ok",
        "phone_info": {
            "phoneNumber": PHONE_NUMBER,
            "purePhoneNumber": PHONE_NUMBER,
            "countryCode": country_code,
            "watermark": {"timestamp": 1637744274, "appid": APPID},
        },
    }


def error_reply(errcode: object, errmsg: str = RID_ERRMSG) -> dict[str, object]:
    return {"errcode": errcode, "errmsg": errmsg}


# -- errcode mapping --------------------------------------------------------------------------------

ERRCODE_CASES = [
    # (call, errcode, exception, reaction)
    ("phone", -1, WeChatBusyError, RetryLaterError),
    ("login", -1, WeChatBusyError, RetryLaterError),
    ("phone", 45011, WeChatRateLimitedError, RetryLaterError),
    ("stable_token", 45011, WeChatRateLimitedError, RetryLaterError),
    ("phone", 40001, WeChatTokenRejectedError, TokenInvalidError),
    ("phone", 40014, WeChatTokenRejectedError, TokenInvalidError),
    ("phone", 42001, WeChatTokenRejectedError, TokenInvalidError),
    ("classic_token", 40001, WeChatConfigurationError, OperatorActionRequiredError),
    ("stable_token", 40001, WeChatConfigurationError, OperatorActionRequiredError),
    ("phone", 40029, WeChatInvalidCodeError, RequestRejectedError),
    ("login", 40029, WeChatInvalidCodeError, RequestRejectedError),
    ("login", 40226, WeChatHighRiskUserError, RequestRejectedError),
    ("phone", 40013, WeChatConfigurationError, OperatorActionRequiredError),
    ("classic_token", 40125, WeChatConfigurationError, OperatorActionRequiredError),
    ("stable_token", 40164, WeChatConfigurationError, OperatorActionRequiredError),
    ("classic_token", 40243, WeChatConfigurationError, OperatorActionRequiredError),
    ("stable_token", 41004, WeChatConfigurationError, OperatorActionRequiredError),
    ("phone", 48001, WeChatConfigurationError, OperatorActionRequiredError),
    ("classic_token", 50004, WeChatConfigurationError, OperatorActionRequiredError),
    ("stable_token", 89503, WeChatConfigurationError, OperatorActionRequiredError),
    ("phone", 45009, WeChatQuotaExhaustedError, OperatorActionRequiredError),
    ("classic_token", 45009, WeChatQuotaExhaustedError, OperatorActionRequiredError),
    ("phone", 99999, WeChatUnknownError, RequestRejectedError),
    ("login", 12345, WeChatUnknownError, RequestRejectedError),
]


@pytest.mark.parametrize(("call", "errcode", "expected", "reaction"), ERRCODE_CASES)
def test_errcode_maps_to_its_exception_and_reaction(
    server: ScriptedServer,
    client: WeChatClient,
    call: str,
    errcode: int,
    expected: type[WeChatError],
    reaction: type[Exception],
) -> None:
    server.reply_json(error_reply(errcode))

    with pytest.raises(WeChatError) as caught:
        ALL_CALLS[call](client)

    assert type(caught.value) is expected
    assert isinstance(caught.value, reaction)
    assert caught.value.errcode == errcode
    assert caught.value.rid == RID
    assert RID in str(caught.value)


def test_errcode_given_as_a_numeric_string_is_mapped(server: ScriptedServer, client: WeChatClient) -> None:
    server.reply_json(error_reply("40029"))
    with pytest.raises(WeChatInvalidCodeError) as caught:
        call_phone(client)
    assert caught.value.errcode == 40029

    server.reply_json(error_reply("-1"))
    with pytest.raises(WeChatBusyError):
        call_phone(client)


def test_error_without_rid_in_errmsg_has_no_rid(server: ScriptedServer, client: WeChatClient) -> None:
    server.reply_json(
        {"errcode": 45011, "errmsg": "api minute-quota reach limit mustslower retry next minute"}
    )
    with pytest.raises(WeChatRateLimitedError) as caught:
        call_phone(client)
    assert caught.value.rid is None


@pytest.mark.parametrize("errcode", [None, 40029.0, "forty", True, "--1", "\u00b2", "40029\n"])
def test_errcode_that_is_not_an_integer_is_a_malformed_reply(
    server: ScriptedServer, client: WeChatClient, errcode: object
) -> None:
    server.reply_json(error_reply(errcode))
    with pytest.raises(WeChatMalformedReplyError):
        call_phone(client)


# -- transport failures ---------------------------------------------------------------------------


@pytest.mark.parametrize("call", sorted(ALL_CALLS))
def test_connection_refused_is_unreachable_and_not_processed(closed_port_url: str, call: str) -> None:
    wechat = WeChatClient(closed_port_url, timeout=(1.0, 1.0))
    try:
        with pytest.raises(WeChatUnreachableError) as caught:
            ALL_CALLS[call](wechat)
    finally:
        wechat.close()
    assert caught.value.maybe_processed is False
    assert isinstance(caught.value, RetryLaterError)


def test_read_timeout_is_a_lost_reply_that_may_have_been_processed(
    server: ScriptedServer, client: WeChatClient
) -> None:
    server.reply(Reply(body=json.dumps(phone_reply()).encode(), delay=SHORT_READ_TIMEOUT * 4))

    with pytest.raises(WeChatReplyLostError) as caught:
        call_phone(client)

    assert type(caught.value) is WeChatReplyLostError
    assert caught.value.maybe_processed is True
    assert isinstance(caught.value, RetryLaterError)
    assert len(server.received) == 1  # sent once: the client itself never resends a phone code


def test_connection_closed_without_reply_is_a_lost_reply(
    server: ScriptedServer, client: WeChatClient
) -> None:
    server.reply(Reply(drop=True))

    with pytest.raises(WeChatReplyLostError) as caught:
        call_phone(client)

    assert type(caught.value) is WeChatReplyLostError
    assert caught.value.maybe_processed is True


@pytest.mark.parametrize("status", [500, 502, 503, 504])
def test_http_5xx_is_a_lost_reply(server: ScriptedServer, client: WeChatClient, status: int) -> None:
    server.reply(Reply(status=status, body=b"<html>Bad Gateway</html>"))

    with pytest.raises(WeChatReplyLostError) as caught:
        call_phone(client)

    assert type(caught.value) is WeChatReplyLostError
    assert caught.value.maybe_processed is True


@pytest.mark.parametrize(
    "body",
    [
        pytest.param(b"<html>not json</html>", id="html"),
        pytest.param(b"", id="empty"),
        pytest.param(b"\xff\xfe\x00garbage", id="not-utf8"),
        pytest.param(b"[1, 2, 3]", id="json-array"),
        pytest.param(b'"ok"', id="json-string"),
        pytest.param(b"[" * 60000, id="deeply-nested"),
        pytest.param(b'{"errcode": 0, "pad": "' + b"x" * (70 * 1024) + b'"}', id="over-64KiB"),
    ],
)
@pytest.mark.parametrize("call", sorted(ALL_CALLS))
def test_http_200_with_an_unusable_body_is_malformed(
    server: ScriptedServer, client: WeChatClient, call: str, body: bytes
) -> None:
    server.reply(Reply(body=body))

    with pytest.raises(WeChatMalformedReplyError) as caught:
        ALL_CALLS[call](client)

    assert caught.value.maybe_processed is True


@pytest.mark.parametrize("status", [400, 401, 403, 404, 405, 410, 413])
@pytest.mark.parametrize("call", sorted(ALL_CALLS))
def test_http_4xx_is_a_configuration_error_not_a_lost_reply(
    server: ScriptedServer, client: WeChatClient, call: str, status: int
) -> None:
    """A wrong base URL or a gateway refusing us answers the same way every time: never retried."""
    server.reply(Reply(status=status, body=b"<html>no</html>"))

    with pytest.raises(WeChatConfigurationError) as caught:
        ALL_CALLS[call](client)

    assert isinstance(caught.value, OperatorActionRequiredError)
    assert not isinstance(caught.value, RetryLaterError)
    assert caught.value.error_code == "wechat_config_error"
    assert caught.value.http_status == status
    assert f"HTTP {status}" in str(caught.value)


@pytest.mark.parametrize("status", [408, 429])
def test_http_408_and_429_are_retried_later_as_not_processed(
    server: ScriptedServer, client: WeChatClient, status: int
) -> None:
    """Request timeout and rate limiting by a gateway: the request was refused, so the code is intact."""
    server.reply(Reply(status=status, body=b"slow down"))

    with pytest.raises(RetryLaterError) as caught:
        call_phone(client)

    assert isinstance(caught.value, WeChatError)
    assert not isinstance(caught.value, OperatorActionRequiredError)
    assert caught.value.maybe_processed is False  # type: ignore[attr-defined]
    assert caught.value.http_status == status


@pytest.mark.parametrize(
    "body",
    [
        pytest.param({"expires_in": 7200}, id="no-access_token"),
        pytest.param({"access_token": "", "expires_in": 7200}, id="empty-access_token"),
        pytest.param({"access_token": ACCESS_TOKEN}, id="no-expires_in"),
        pytest.param({"access_token": ACCESS_TOKEN, "expires_in": 0}, id="zero-expires_in"),
        pytest.param({"access_token": ACCESS_TOKEN, "expires_in": "soon"}, id="text-expires_in"),
        pytest.param({"access_token": ACCESS_TOKEN, "expires_in": "\u00b2"}, id="superscript-expires_in"),
        pytest.param({"access_token": ACCESS_TOKEN, "expires_in": "-5"}, id="negative-expires_in"),
    ],
)
@pytest.mark.parametrize("call", ["classic_token", "stable_token"])
def test_token_reply_missing_fields_is_malformed(
    server: ScriptedServer, client: WeChatClient, call: str, body: dict[str, object]
) -> None:
    server.reply_json(body)
    with pytest.raises(WeChatMalformedReplyError):
        ALL_CALLS[call](client)


@pytest.mark.parametrize(
    "phone_info",
    [
        pytest.param(None, id="no-phone_info"),
        pytest.param({"purePhoneNumber": PHONE_NUMBER, "countryCode": "86"}, id="no-phoneNumber"),
        pytest.param(
            {"phoneNumber": PHONE_NUMBER, "purePhoneNumber": PHONE_NUMBER, "countryCode": "CN",
             "watermark": {"timestamp": 1, "appid": APPID}},
            id="letters-countryCode",
        ),
        pytest.param(
            {"phoneNumber": PHONE_NUMBER, "purePhoneNumber": PHONE_NUMBER, "countryCode": "\uff18\uff16",
             "watermark": {"timestamp": 1, "appid": APPID}},
            id="fullwidth-countryCode",
        ),
        pytest.param(
            {"phoneNumber": PHONE_NUMBER, "purePhoneNumber": PHONE_NUMBER, "countryCode": "86"},
            id="no-watermark",
        ),
    ],
)  # fmt: skip
def test_phone_reply_missing_fields_is_refused_for_good(
    server: ScriptedServer, client: WeChatClient, phone_info: object
) -> None:
    # A success reply: the code is spent, so retrying could only get 40029.
    server.reply_json({"errcode": 0, "errmsg": "ok", "phone_info": phone_info})
    with pytest.raises(WeChatInvalidReplyError):
        call_phone(client)


@pytest.mark.parametrize(
    ("field", "value"),
    [
        pytest.param("countryCode", "123456789", id="countryCode-longer-than-the-column"),
        pytest.param("countryCode", 8612345, id="numeric-countryCode-too-long"),
        pytest.param("purePhoneNumber", "1" * 40, id="pure-number-too-long"),
        pytest.param("purePhoneNumber", "138-0013", id="pure-number-not-digits"),
        pytest.param("phoneNumber", "+86 " + "1" * 40, id="number-too-long"),
        pytest.param("phoneNumber", "call me", id="number-without-digits"),
    ],
)
def test_phone_reply_with_values_no_number_has_is_refused_for_good(
    server: ScriptedServer, client: WeChatClient, field: str, value: object
) -> None:
    info: dict[str, object] = {
        "phoneNumber": PHONE_NUMBER,
        "purePhoneNumber": PHONE_NUMBER,
        "countryCode": "86",
        "watermark": {"timestamp": 1_700_000_000, "appid": APPID},
        field: value,
    }
    server.reply_json({"errcode": 0, "errmsg": "ok", "phone_info": info})
    with pytest.raises(WeChatInvalidReplyError) as raised:
        call_phone(client)
    assert raised.value.error_code == "invalid_reply"
    assert str(value) not in str(raised.value)


@pytest.mark.parametrize("timestamp", [0, 1, -5, 2**40])
def test_phone_reply_with_a_watermark_time_out_of_range_is_refused(
    server: ScriptedServer, client: WeChatClient, timestamp: int
) -> None:
    info = {
        "phoneNumber": PHONE_NUMBER,
        "purePhoneNumber": PHONE_NUMBER,
        "countryCode": "86",
        "watermark": {"timestamp": timestamp, "appid": APPID},
    }
    server.reply_json({"errcode": 0, "errmsg": "ok", "phone_info": info})
    with pytest.raises(WeChatInvalidReplyError):
        call_phone(client)


@pytest.mark.parametrize(
    "body",
    [
        pytest.param({"session_key": SESSION_KEY}, id="no-openid"),
        pytest.param({"openid": "o-1"}, id="no-session_key"),
        pytest.param({"openid": "o-1", "session_key": SESSION_KEY, "unionid": 7}, id="numeric-unionid"),
    ],
)
def test_login_reply_missing_fields_is_malformed(
    server: ScriptedServer, client: WeChatClient, body: dict[str, object]
) -> None:
    server.reply_json(body)
    with pytest.raises(WeChatMalformedReplyError):
        call_login(client)


# -- timeouts on every request --------------------------------------------------------------------


class RecordingSession(requests.Session):
    """A real session that remembers the keyword arguments of every request."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[dict[str, Any]] = []

    def request(self, method: str | bytes, url: str | bytes, *args: Any, **kwargs: Any) -> requests.Response:
        self.calls.append(kwargs)
        return super().request(method, url, *args, **kwargs)


@pytest.mark.parametrize("call", sorted(ALL_CALLS))
def test_every_request_carries_the_configured_timeouts(server: ScriptedServer, call: str) -> None:
    server.reply_json(
        {"access_token": ACCESS_TOKEN, "expires_in": 7200, "openid": "o-1", "session_key": SESSION_KEY}
        | phone_reply()
    )
    session = RecordingSession()
    wechat = WeChatClient(server.url, session=session, timeout=(1.5, 2.5))
    try:
        ALL_CALLS[call](wechat)
    finally:
        wechat.close()

    assert len(session.calls) == 1
    assert session.calls[0]["timeout"] == (1.5, 2.5)
    # A redirect would resend the secret or token to wherever WeChat (or a proxy) points.
    assert session.calls[0]["allow_redirects"] is False


def test_default_timeouts_are_bounded(server: ScriptedServer) -> None:
    server.reply_json(phone_reply())
    session = RecordingSession()
    wechat = WeChatClient(server.url, session=session)
    try:
        call_phone(wechat)
    finally:
        wechat.close()

    connect, read = session.calls[0]["timeout"]
    assert 0 < connect <= 10
    assert 0 < read <= 30


def test_redirect_is_not_followed_and_is_a_configuration_error(
    server: ScriptedServer, client: WeChatClient
) -> None:
    """WeChat never redirects: a redirect means the base URL is wrong (http for https, a moved gateway)."""
    server.reply(Reply(status=302, body=b""))
    with pytest.raises(WeChatConfigurationError) as caught:
        call_classic_token(client)
    assert len(server.received) == 1
    assert caught.value.http_status == 302


# -- tolerant parsing of good replies ---------------------------------------------------------------


@pytest.mark.parametrize("country_code", ["86", 86, "+86"])
def test_country_code_is_normalised_to_digits(
    server: ScriptedServer, client: WeChatClient, country_code: object
) -> None:
    server.reply_json(phone_reply(country_code))

    info = client.get_phone_number(access_token=ACCESS_TOKEN, code=PHONE_CODE)

    assert info == PhoneInfo(
        phone_number=PHONE_NUMBER,
        pure_phone_number=PHONE_NUMBER,
        country_code="86",
        watermark_appid=APPID,
        watermark_timestamp=1637744274,
    )


def test_login_reply_without_errcode_is_success(server: ScriptedServer, client: WeChatClient) -> None:
    server.reply_json({"openid": "o-1", "session_key": SESSION_KEY})

    login = client.code_to_session(appid=APPID, secret=APP_SECRET, js_code=JS_CODE)

    assert login == LoginSession(openid="o-1", unionid=None, session_key=SESSION_KEY)


def test_login_reply_with_unionid_and_errcode_zero(server: ScriptedServer, client: WeChatClient) -> None:
    server.reply_json({"errcode": 0, "openid": "o-1", "session_key": SESSION_KEY, "unionid": "u-1"})

    login = client.code_to_session(appid=APPID, secret=APP_SECRET, js_code=JS_CODE)

    assert login.unionid == "u-1"


@pytest.mark.parametrize("call", ["classic_token", "stable_token"])
def test_token_lifetime_is_kept_as_returned(server: ScriptedServer, client: WeChatClient, call: str) -> None:
    server.reply_json({"access_token": ACCESS_TOKEN, "expires_in": 345})

    token = ALL_CALLS[call](client)

    assert token == AccessToken(value=ACCESS_TOKEN, expires_in=345)


def test_token_lifetime_given_as_a_string_is_accepted(server: ScriptedServer, client: WeChatClient) -> None:
    server.reply_json({"access_token": ACCESS_TOKEN, "expires_in": "7200"})
    assert call_stable_token(client) == AccessToken(value=ACCESS_TOKEN, expires_in=7200)


# -- requests have the documented shape -------------------------------------------------------------


def test_classic_token_request(server: ScriptedServer, client: WeChatClient) -> None:
    server.reply_json({"access_token": ACCESS_TOKEN, "expires_in": 7200})

    call_classic_token(client)

    (request,) = server.received
    assert (request.method, request.path) == ("GET", "/cgi-bin/token")
    assert request.query == {"grant_type": ["client_credential"], "appid": [APPID], "secret": [APP_SECRET]}
    assert request.body == b""


@pytest.mark.parametrize("force_refresh", [False, True])
def test_stable_token_request(server: ScriptedServer, client: WeChatClient, force_refresh: bool) -> None:
    server.reply_json({"access_token": ACCESS_TOKEN, "expires_in": 7200})

    client.fetch_stable_token(appid=APPID, secret=APP_SECRET, force_refresh=force_refresh)

    (request,) = server.received
    assert (request.method, request.path) == ("POST", "/cgi-bin/stable_token")
    assert request.query == {}  # the secret travels in the body only
    assert request.json() == {
        "grant_type": "client_credential",
        "appid": APPID,
        "secret": APP_SECRET,
        "force_refresh": force_refresh,
    }


def test_phone_request(server: ScriptedServer, client: WeChatClient) -> None:
    server.reply_json(phone_reply())

    call_phone(client)

    (request,) = server.received
    assert (request.method, request.path) == ("POST", "/wxa/business/getuserphonenumber")
    assert request.query == {"access_token": [ACCESS_TOKEN]}
    assert request.json() == {"code": PHONE_CODE}


def test_phone_request_with_openid(server: ScriptedServer, client: WeChatClient) -> None:
    server.reply_json(phone_reply())

    client.get_phone_number(access_token=ACCESS_TOKEN, code=PHONE_CODE, openid="o-1")

    assert server.received[0].json() == {"code": PHONE_CODE, "openid": "o-1"}


def test_login_request(server: ScriptedServer, client: WeChatClient) -> None:
    server.reply_json({"openid": "o-1", "session_key": SESSION_KEY})

    call_login(client)

    (request,) = server.received
    assert (request.method, request.path) == ("GET", "/sns/jscode2session")
    assert request.query == {
        "appid": [APPID],
        "secret": [APP_SECRET],
        "js_code": [JS_CODE],
        "grant_type": ["authorization_code"],
    }


def test_base_url_trailing_slash_is_ignored(server: ScriptedServer) -> None:
    server.reply_json({"access_token": ACCESS_TOKEN, "expires_in": 7200})
    wechat = WeChatClient(server.url + "/", timeout=(1.0, 1.0))
    try:
        call_classic_token(wechat)
    finally:
        wechat.close()
    assert server.received[0].path == "/cgi-bin/token"


# -- no secret in any exception text ----------------------------------------------------------------


def exception_texts(exc: BaseException) -> list[str]:
    """Everything a log line, a result backend or an error tracker could show for ``exc``."""
    texts = [str(exc), repr(exc), "".join(traceback.format_exception(exc))]
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        texts += [str(current), repr(current), str(current.args)]
        current = current.__cause__ or (None if current.__suppress_context__ else current.__context__)
    return texts


def assert_no_secret(exc: BaseException) -> None:
    for text in exception_texts(exc):
        for secret in SECRETS:
            assert secret not in text


# Server behaviours for every failure kind. Error replies echo the codes and secrets back in
# errmsg, so a client that copied errmsg into its messages would be caught.
_ECHO = f"bad request {APP_SECRET} {ACCESS_TOKEN} {PHONE_CODE} {JS_CODE} rid: {RID}"
FAILURE_REPLIES: dict[str, Reply] = {
    "busy": Reply(body=json.dumps(error_reply(-1, _ECHO)).encode()),
    "token-rejected": Reply(body=json.dumps(error_reply(40001, _ECHO)).encode()),
    "invalid-code": Reply(body=json.dumps(error_reply(40029, _ECHO)).encode()),
    "unknown": Reply(body=json.dumps(error_reply(77777, _ECHO)).encode()),
    "http-502": Reply(status=502, body=_ECHO.encode()),
    "http-403": Reply(status=403, body=_ECHO.encode()),
    "http-429": Reply(status=429, body=_ECHO.encode()),
    "not-json": Reply(body=_ECHO.encode()),
    "too-large": Reply(body=(_ECHO * 2000).encode()),
    "dropped": Reply(drop=True),
    "timeout": Reply(body=b"{}", delay=SHORT_READ_TIMEOUT * 4),
}


@pytest.mark.parametrize("failure", sorted(FAILURE_REPLIES))
@pytest.mark.parametrize("call", sorted(ALL_CALLS))
def test_no_secret_in_exception_text(
    server: ScriptedServer, client: WeChatClient, call: str, failure: str
) -> None:
    server.reply(FAILURE_REPLIES[failure])

    with pytest.raises(WeChatError) as caught:
        ALL_CALLS[call](client)

    assert_no_secret(caught.value)


@pytest.mark.parametrize("call", sorted(ALL_CALLS))
def test_no_secret_in_unreachable_exception_text(closed_port_url: str, call: str) -> None:
    wechat = WeChatClient(closed_port_url, timeout=(1.0, 1.0))
    try:
        with pytest.raises(WeChatUnreachableError) as caught:
            ALL_CALLS[call](wechat)
    finally:
        wechat.close()

    assert_no_secret(caught.value)


def test_values_hide_secrets_in_repr_and_str() -> None:
    values: list[object] = [
        AccessToken(value=ACCESS_TOKEN, expires_in=7200),
        PhoneInfo(
            phone_number=PHONE_NUMBER,
            pure_phone_number=PHONE_NUMBER,
            country_code="86",
            watermark_appid=APPID,
            watermark_timestamp=1,
        ),
        LoginSession(openid="o-1", unionid=None, session_key=SESSION_KEY),
        AppCredentials(appid=APPID, secret=APP_SECRET),
    ]
    for value in values:
        for text in (repr(value), str(value), f"{value}", f"{value!r}", repr([value])):
            for secret in SECRETS:
                assert secret not in text


def test_client_repr_shows_no_secret(server: ScriptedServer, client: WeChatClient) -> None:
    server.reply_json({"access_token": ACCESS_TOKEN, "expires_in": 7200})
    call_classic_token(client)
    assert APP_SECRET not in repr(client)
    assert ACCESS_TOKEN not in repr(client)


def test_error_survives_pickling(server: ScriptedServer, client: WeChatClient) -> None:
    server.reply_json(error_reply(40029))
    with pytest.raises(WeChatInvalidCodeError) as caught:
        call_phone(client)

    restored = pickle.loads(pickle.dumps(caught.value))

    assert type(restored) is WeChatInvalidCodeError
    assert (restored.errcode, restored.rid, restored.api) == (40029, RID, caught.value.api)
    assert str(restored) == str(caught.value)
