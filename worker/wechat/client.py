"""A small, strict client for the four WeChat server APIs wxphone uses.

It takes its base URL, a ``requests.Session`` and (connect, read) timeouts; it returns typed
values (:mod:`worker.wechat.types`) or raises the classes in :mod:`worker.wechat.errors`.
It never logs, and no message it produces carries a URL, secret, token, code or phone number.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from typing import Any

import requests

from worker.wechat.errors import (
    API_CLASSIC_TOKEN,
    API_CODE_TO_SESSION,
    API_PHONE_NUMBER,
    API_STABLE_TOKEN,
    WeChatHttpRefusedError,
    WeChatHttpStatusError,
    WeChatInvalidReplyError,
    WeChatMalformedReplyError,
    WeChatReplyLostError,
    WeChatUnreachableError,
    error_for_errcode,
    extract_rid,
)
from worker.wechat.types import AccessToken, LoginSession, PhoneInfo

__all__ = ["DEFAULT_TIMEOUT_SECONDS", "WeChatClient"]

#: (connect, read) seconds. Connect is just above a TCP retransmission window.
DEFAULT_TIMEOUT_SECONDS: tuple[float, float] = (3.05, 5.0)
#: WeChat replies are a few hundred bytes; anything far larger is not a WeChat reply.
MAX_REPLY_BYTES = 64 * 1024
#: Statuses that mean "not now" (request timeout, rate limited by a gateway): retried later.
#: Every other 3xx/4xx is a configuration error: WeChat itself answers HTTP 200 with an errcode.
_REFUSED_FOR_NOW_STATUSES = frozenset({408, 429})

_CLASSIC_TOKEN_PATH = "/cgi-bin/token"
_STABLE_TOKEN_PATH = "/cgi-bin/stable_token"
_PHONE_NUMBER_PATH = "/wxa/business/getuserphonenumber"
_CODE_TO_SESSION_PATH = "/sns/jscode2session"

# str.isdigit() also accepts "²" and "--1" after lstrip, which int() then rejects with a bare
# ValueError; these ASCII patterns keep every odd value on the malformed-reply path.
_INTEGER_TEXT = re.compile(r"-?[0-9]+")
_COUNTRY_CODE_TEXT = re.compile(r"\+?[0-9]{1,4}")
#: What a phone number WeChat returns may look like: the national number (4-20 digits), and the
#: number as shown to the user (digits with an optional leading + and separators, at most 32).
_PURE_PHONE_NUMBER_TEXT = re.compile(r"[0-9]{4,20}")
_PHONE_NUMBER_TEXT = re.compile(r"\+?[0-9][0-9 ()-]{2,30}")
#: The range of watermark times accepted (2000-01-01 to 2100-01-01, Unix seconds).
WATERMARK_EARLIEST = 946_684_800
WATERMARK_LATEST = 4_102_444_800


class WeChatClient:
    """Calls WeChat's token, phone-number and login APIs.

    Example::

        client = WeChatClient("https://api.weixin.qq.com", timeout=(3.05, 5.0))
        token = client.fetch_stable_token(appid="wx123", secret=secret)
        info = client.get_phone_number(access_token=token.value, code=code)
    """

    def __init__(
        self,
        base_url: str,
        *,
        session: requests.Session | None = None,
        timeout: tuple[float, float] = DEFAULT_TIMEOUT_SECONDS,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self.timeout = timeout
        # requests' adapter default of zero retries is kept on purpose: a phone code is single
        # use, so retries belong to the caller, which knows whether a resend is safe.
        self.session = session if session is not None else requests.Session()

    def __repr__(self) -> str:
        return f"WeChatClient({self.base_url!r}, timeout={self.timeout!r})"

    def close(self) -> None:
        """Close pooled connections."""
        self.session.close()

    # -- tokens -------------------------------------------------------------------------------

    def fetch_classic_token(self, *, appid: str, secret: str) -> AccessToken:
        """GET /cgi-bin/token. Each call issues a new token and retires the previous one."""
        params = {"grant_type": "client_credential", "appid": appid, "secret": secret}
        body = self._request("GET", _CLASSIC_TOKEN_PATH, API_CLASSIC_TOKEN, params=params)
        return _parse_access_token(body, API_CLASSIC_TOKEN)

    def fetch_stable_token(self, *, appid: str, secret: str, force_refresh: bool = False) -> AccessToken:
        """POST /cgi-bin/stable_token. Normal mode returns the current token while it is valid."""
        payload = {
            "grant_type": "client_credential",
            "appid": appid,
            "secret": secret,
            "force_refresh": force_refresh,
        }
        body = self._request("POST", _STABLE_TOKEN_PATH, API_STABLE_TOKEN, json_body=payload)
        return _parse_access_token(body, API_STABLE_TOKEN)

    # -- business calls -----------------------------------------------------------------------

    def get_phone_number(self, *, access_token: str, code: str, openid: str | None = None) -> PhoneInfo:
        """POST /wxa/business/getuserphonenumber: exchange a one-time phone code."""
        payload: dict[str, str] = {"code": code}
        if openid:
            payload["openid"] = openid
        body = self._request(
            "POST",
            _PHONE_NUMBER_PATH,
            API_PHONE_NUMBER,
            params={"access_token": access_token},
            json_body=payload,
        )
        return _parse_phone_info(body)

    def code_to_session(self, *, appid: str, secret: str, js_code: str) -> LoginSession:
        """GET /sns/jscode2session: exchange a wx.login code for openid and session_key."""
        params = {
            "appid": appid,
            "secret": secret,
            "js_code": js_code,
            "grant_type": "authorization_code",
        }
        body = self._request("GET", _CODE_TO_SESSION_PATH, API_CODE_TO_SESSION, params=params)
        openid = _required_str(body, "openid", API_CODE_TO_SESSION)
        session_key = _required_str(body, "session_key", API_CODE_TO_SESSION)
        unionid = body.get("unionid")
        if unionid is not None and not isinstance(unionid, str):
            raise WeChatMalformedReplyError(api=API_CODE_TO_SESSION, detail="unionid not a string")
        return LoginSession(openid=openid, unionid=unionid or None, session_key=session_key)

    # -- plumbing -----------------------------------------------------------------------------

    def _request(
        self,
        method: str,
        path: str,
        api: str,
        *,
        params: Mapping[str, str] | None = None,
        json_body: Mapping[str, Any] | None = None,
    ) -> dict[str, Any]:
        """Send one request; return the decoded body of a successful reply or raise.

        Exceptions from requests carry the URL (with the secret or token in its query), so they
        are replaced, not chained: ``from None`` keeps them out of every traceback.
        """
        try:
            response = self.session.request(
                method,
                self.base_url + path,
                params=params,
                json=json_body,
                timeout=self.timeout,
                allow_redirects=False,
                stream=True,
            )
        except (requests.ConnectTimeout, requests.exceptions.InvalidURL):
            raise WeChatUnreachableError(api=api, detail="connect failed or timed out") from None
        except requests.ConnectionError as error:
            # A reset after the request went out is a lost reply; a refused connect is not.
            if _is_connect_failure(error):
                raise WeChatUnreachableError(api=api, detail="connection refused") from None
            raise WeChatReplyLostError(api=api, detail="connection dropped") from None
        except requests.Timeout:
            raise WeChatReplyLostError(api=api, detail="read timed out") from None
        except requests.RequestException:
            raise WeChatReplyLostError(api=api, detail="request failed") from None
        try:
            return self._decode(response, api)
        finally:
            response.close()

    def _decode(self, response: requests.Response, api: str) -> dict[str, Any]:
        status = response.status_code
        if status >= 500:
            raise WeChatReplyLostError(api=api, http_status=status)
        if status in _REFUSED_FOR_NOW_STATUSES:
            raise WeChatHttpRefusedError(api=api, http_status=status)
        if 300 <= status < 500:
            raise WeChatHttpStatusError(api=api, http_status=status)
        if status != 200:
            raise WeChatMalformedReplyError(api=api, http_status=status)
        try:
            raw = response.raw.read(MAX_REPLY_BYTES + 1, decode_content=True)
        except (requests.RequestException, OSError, ValueError):
            raise WeChatReplyLostError(api=api, detail="reply interrupted") from None
        except Exception:  # urllib3 errors (ProtocolError, ReadTimeoutError) are not re-exported
            raise WeChatReplyLostError(api=api, detail="reply interrupted") from None
        if len(raw) > MAX_REPLY_BYTES:
            raise WeChatMalformedReplyError(api=api, detail="reply too large")
        try:
            body = json.loads(raw)
        except (ValueError, UnicodeDecodeError, RecursionError):  # RecursionError: deeply nested arrays
            raise WeChatMalformedReplyError(api=api, detail="reply is not JSON") from None
        if not isinstance(body, dict):
            raise WeChatMalformedReplyError(api=api, detail="reply is not a JSON object")
        errcode = body.get("errcode", 0)  # a missing errcode means success
        if isinstance(errcode, str) and _INTEGER_TEXT.fullmatch(errcode):
            errcode = int(errcode)
        if not isinstance(errcode, int) or isinstance(errcode, bool):
            raise WeChatMalformedReplyError(api=api, detail="errcode is not an integer")
        if errcode != 0:
            raise error_for_errcode(errcode, api=api, rid=extract_rid(body.get("errmsg")))
        return body


def _is_connect_failure(error: requests.ConnectionError) -> bool:
    """True when the connection was never established (so nothing was sent)."""
    cause: BaseException | None = error
    seen = 0
    while cause is not None and seen < 8:
        if isinstance(cause, ConnectionRefusedError):
            return True
        name = type(cause).__name__
        if name in {"NewConnectionError", "NameResolutionError", "ConnectTimeoutError"}:
            return True
        if cause.args and isinstance(cause.args[0], BaseException):
            cause = cause.args[0]
        else:
            cause = getattr(cause, "reason", None) or cause.__cause__ or cause.__context__
        seen += 1
    return False


def _required_str(body: Mapping[str, Any], key: str, api: str) -> str:
    value = body.get(key)
    if not isinstance(value, str) or not value:
        raise WeChatMalformedReplyError(api=api, detail=f"{key} missing")
    return value


def _parse_access_token(body: Mapping[str, Any], api: str) -> AccessToken:
    token = _required_str(body, "access_token", api)
    expires_in = body.get("expires_in")
    if isinstance(expires_in, str) and _INTEGER_TEXT.fullmatch(expires_in):
        expires_in = int(expires_in)
    if not isinstance(expires_in, int) or isinstance(expires_in, bool) or expires_in <= 0:
        raise WeChatMalformedReplyError(api=api, detail="expires_in missing or not positive")
    return AccessToken(value=token, expires_in=expires_in)


def _parse_phone_info(body: Mapping[str, Any]) -> PhoneInfo:
    """The typed ``phone_info`` of a success reply; :class:`WeChatInvalidReplyError` when it is
    missing or holds what no phone number is (WeChat has consumed the code by then)."""
    api = API_PHONE_NUMBER
    info = body.get("phone_info")
    if not isinstance(info, dict):
        raise WeChatInvalidReplyError(api=api, detail="phone_info missing")
    phone_number = info.get("phoneNumber")
    if not isinstance(phone_number, str) or not _PHONE_NUMBER_TEXT.fullmatch(phone_number):
        raise WeChatInvalidReplyError(api=api, detail="phoneNumber missing or not a phone number")
    pure_phone_number = info.get("purePhoneNumber")
    if not isinstance(pure_phone_number, str) or not _PURE_PHONE_NUMBER_TEXT.fullmatch(pure_phone_number):
        raise WeChatInvalidReplyError(api=api, detail="purePhoneNumber missing or not 4-20 digits")
    country_code = info.get("countryCode")
    # Documented as a string, shown as a bare number in the official sample: accept both.
    if isinstance(country_code, int) and not isinstance(country_code, bool):
        country_code = str(country_code)
    if not isinstance(country_code, str) or not _COUNTRY_CODE_TEXT.fullmatch(country_code):
        raise WeChatInvalidReplyError(api=api, detail="countryCode missing or not 1-4 digits")
    watermark = info.get("watermark")
    if not isinstance(watermark, dict):
        raise WeChatInvalidReplyError(api=api, detail="watermark missing")
    watermark_appid = watermark.get("appid")
    if not isinstance(watermark_appid, str) or not watermark_appid:
        raise WeChatInvalidReplyError(api=api, detail="watermark appid missing")
    timestamp = watermark.get("timestamp")
    if (
        not isinstance(timestamp, int)
        or isinstance(timestamp, bool)
        or not WATERMARK_EARLIEST <= timestamp <= WATERMARK_LATEST
    ):
        raise WeChatInvalidReplyError(api=api, detail="watermark timestamp missing or out of range")
    return PhoneInfo(
        phone_number=phone_number,
        pure_phone_number=pure_phone_number,
        country_code=country_code.lstrip("+"),
        watermark_appid=watermark_appid,
        watermark_timestamp=timestamp,
    )
