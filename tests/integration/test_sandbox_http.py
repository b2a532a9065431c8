"""The WeChat sandbox over real HTTP, driven by ``SandboxAdmin`` and the real ``WeChatClient``.

Most tests share the session's ``wxphone sandbox`` subprocess (the ``sandbox`` fixture resets it);
the CLI tests start their own with specific flags.
"""

from __future__ import annotations

import re
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests

from tests.support.processes import base_environment, sandbox_process
from tests.support.services import free_port
from tests.support.waiting import wait_for
from worker.errors import OperatorActionRequiredError, RetryLaterError
from worker.sandbox.admin import SandboxAdmin, SandboxAdminError
from worker.wechat.client import WeChatClient
from worker.wechat.errors import (
    WeChatBusyError,
    WeChatConfigurationError,
    WeChatError,
    WeChatHighRiskUserError,
    WeChatInvalidCodeError,
    WeChatQuotaExhaustedError,
    WeChatRateLimitedError,
    WeChatReplyLostError,
    WeChatTokenRejectedError,
)

APP = "wxsandbox_a"
SECRET = "sandbox-secret-a"
OTHER_APP = "wxsandbox_b"
OTHER_SECRET = "sandbox-secret-b"
RID = re.compile(r" rid: ([0-9a-f]{8}-[0-9a-f]{8}-[0-9a-f]{8})$")


@pytest.fixture
def admin(sandbox: SandboxAdmin) -> SandboxAdmin:
    """The shared sandbox, reset, with two apps registered."""
    sandbox.register_app(APP, SECRET)
    sandbox.register_app(OTHER_APP, OTHER_SECRET)
    return sandbox


@pytest.fixture
def client(admin: SandboxAdmin) -> Iterator[WeChatClient]:
    wechat = WeChatClient(admin.base_url, timeout=(2.0, 5.0))
    yield wechat
    wechat.close()


def token_errcode(client: WeChatClient, token: str) -> int:
    """Probe a token with an unknown code: token checks run first, so 40029 means "token accepted"."""
    try:
        client.get_phone_number(access_token=token, code="probe-code")
    except WeChatError as error:
        assert error.errcode is not None
        return error.errcode
    raise AssertionError("an unknown code was accepted")


# -- tokens -----------------------------------------------------------------------------------


def test_classic_rotation_grace_and_expiry_in_real_time(admin: SandboxAdmin, client: WeChatClient) -> None:
    admin.configure(token_lifetime_seconds=3, grace_seconds=0.5)
    first = client.fetch_classic_token(appid=APP, secret=SECRET)
    assert first.expires_in == 3
    second = client.fetch_classic_token(appid=APP, secret=SECRET)
    assert second.value != first.value
    assert token_errcode(client, first.value) == 40029  # still inside its grace period
    wait_for(lambda: token_errcode(client, first.value) == 40001, timeout_seconds=3, what="grace to end")
    with pytest.raises(WeChatTokenRejectedError) as rejected:
        client.get_phone_number(access_token=first.value, code=admin.mint_phone_code(APP))
    assert rejected.value.errcode == 40001
    assert rejected.value.rid
    assert token_errcode(client, second.value) == 40029
    wait_for(lambda: token_errcode(client, second.value) == 42001, timeout_seconds=5, what="expiry")
    with pytest.raises(WeChatTokenRejectedError):
        client.get_phone_number(access_token=second.value, code=admin.mint_phone_code(APP))


def test_expiry_with_the_clock_moved_forward(admin: SandboxAdmin, client: WeChatClient) -> None:
    token = client.fetch_classic_token(appid=APP, secret=SECRET)
    assert token.expires_in == 7200
    admin.advance_clock(7199)
    assert token_errcode(client, token.value) == 40029
    admin.advance_clock(1)
    assert token_errcode(client, token.value) == 42001


def test_stable_token_same_until_force_refresh(admin: SandboxAdmin, client: WeChatClient) -> None:
    first = client.fetch_stable_token(appid=APP, secret=SECRET)
    admin.advance_clock(100)
    again = client.fetch_stable_token(appid=APP, secret=SECRET)
    assert again.value == first.value
    assert 7099 <= again.expires_in <= 7100
    classic = client.fetch_classic_token(appid=APP, secret=SECRET)
    forced = client.fetch_stable_token(appid=APP, secret=SECRET, force_refresh=True)
    assert forced.value != first.value
    assert token_errcode(client, first.value) == 40001
    assert token_errcode(client, forced.value) == 40029
    assert token_errcode(client, classic.value) == 40029  # classic and stable are independent
    # A second force within 30 s does nothing.
    assert client.fetch_stable_token(appid=APP, secret=SECRET, force_refresh=True).value == forced.value
    stats = admin.stats()
    assert stats["endpoints"]["stable_token"]["tokens_issued"] == 2
    assert stats["apps"][APP]["stable_token"]["force_refreshes"] == 1


def test_stable_token_rollover_window(admin: SandboxAdmin, client: WeChatClient) -> None:
    admin.configure(token_lifetime_seconds=600, stable_rollover_seconds=300)
    first = client.fetch_stable_token(appid=APP, secret=SECRET)
    admin.advance_clock(301)
    rolled = client.fetch_stable_token(appid=APP, secret=SECRET)
    assert rolled.value != first.value
    assert rolled.expires_in == 600
    assert token_errcode(client, first.value) == 40029  # valid until its own expiry


def test_token_endpoint_errors_are_configuration_errors(admin: SandboxAdmin, client: WeChatClient) -> None:
    with pytest.raises(WeChatConfigurationError) as wrong_secret:
        client.fetch_classic_token(appid=APP, secret="wrong")
    assert wrong_secret.value.errcode == 40125
    with pytest.raises(WeChatConfigurationError) as unknown:
        client.fetch_stable_token(appid="wxnobody", secret=SECRET)
    assert unknown.value.errcode == 40013
    admin.configure(classic_token_daily_limit=1)
    client.fetch_classic_token(appid=APP, secret=SECRET)
    with pytest.raises(WeChatQuotaExhaustedError):
        client.fetch_classic_token(appid=APP, secret=SECRET)


def test_revoke_kills_every_token_of_the_app(admin: SandboxAdmin, client: WeChatClient) -> None:
    classic = client.fetch_classic_token(appid=APP, secret=SECRET)
    stable = client.fetch_stable_token(appid=APP, secret=SECRET)
    other = client.fetch_stable_token(appid=OTHER_APP, secret=OTHER_SECRET)
    assert admin.revoke_tokens(APP) == 2
    assert token_errcode(client, classic.value) == 40001
    assert token_errcode(client, stable.value) == 40001
    assert token_errcode(client, other.value) == 40029
    with pytest.raises(SandboxAdminError, match="404"):
        admin.revoke_tokens("wxnobody")


# -- phone numbers ----------------------------------------------------------------------------


def test_phone_number_exchange_is_single_use(admin: SandboxAdmin, client: WeChatClient) -> None:
    token = client.fetch_stable_token(appid=APP, secret=SECRET).value
    code = admin.mint_phone_code(APP, pure_phone_number="13912345678")
    info = client.get_phone_number(access_token=token, code=code, openid="o-someone")
    assert (info.phone_number, info.pure_phone_number, info.country_code) == (
        "13912345678",
        "13912345678",
        "86",
    )
    assert info.watermark_appid == APP
    assert abs(info.watermark_timestamp - time.time()) < 60
    with pytest.raises(WeChatInvalidCodeError) as reused:
        client.get_phone_number(access_token=token, code=code)
    assert reused.value.errcode == 40029
    stats = admin.stats()
    assert stats["codes_exchanged"] == 1
    assert stats["code_presentations"] == {"2": 1}


def test_phone_code_of_another_app(admin: SandboxAdmin, client: WeChatClient) -> None:
    token = client.fetch_stable_token(appid=APP, secret=SECRET).value
    code = admin.mint_phone_code(OTHER_APP)
    with pytest.raises(WeChatConfigurationError) as crossed:
        client.get_phone_number(access_token=token, code=code)
    assert crossed.value.errcode == 40013
    other_token = client.fetch_stable_token(appid=OTHER_APP, secret=OTHER_SECRET).value
    assert client.get_phone_number(access_token=other_token, code=code).watermark_appid == OTHER_APP


def test_numeric_country_code_and_crossed_watermark(admin: SandboxAdmin, client: WeChatClient) -> None:
    token = client.fetch_stable_token(appid=APP, secret=SECRET).value
    code = admin.mint_phone_code(APP, country_code_as_number=True, watermark_appid=OTHER_APP)
    raw = requests.post(
        f"{admin.base_url}/wxa/business/getuserphonenumber",
        params={"access_token": token},
        json={"code": code},
        timeout=5,
    ).json()
    assert raw["phone_info"]["countryCode"] == 86
    code = admin.mint_phone_code(APP, country_code_as_number=True, watermark_appid=OTHER_APP)
    info = client.get_phone_number(access_token=token, code=code)
    assert info.country_code == "86"
    assert info.watermark_appid == OTHER_APP


def test_expired_phone_code(admin: SandboxAdmin, client: WeChatClient) -> None:
    token = client.fetch_stable_token(appid=APP, secret=SECRET).value
    code = admin.mint_phone_code(APP, lifetime_seconds=60)
    admin.advance_clock(60)
    with pytest.raises(WeChatInvalidCodeError):
        client.get_phone_number(access_token=token, code=code)


def test_bulk_minted_codes_resolve_to_distinct_numbers(admin: SandboxAdmin, client: WeChatClient) -> None:
    minted = admin.mint_phone_codes_detailed(APP, 20)
    assert len({item.code for item in minted}) == len({item.pure_phone_number for item in minted}) == 20
    token = client.fetch_stable_token(appid=APP, secret=SECRET).value
    for item in minted[:3]:
        assert client.get_phone_number(access_token=token, code=item.code).phone_number == item.phone_number
    assert len(admin.mint_phone_codes(APP, 5)) == 5


# -- login ------------------------------------------------------------------------------------


def test_login_with_and_without_unionid(admin: SandboxAdmin, client: WeChatClient) -> None:
    code, openid = admin.mint_login_code(APP)
    session = client.code_to_session(appid=APP, secret=SECRET, js_code=code)
    assert (session.openid, session.unionid) == (openid, None)
    assert len(session.session_key) == 24
    code, openid = admin.mint_login_code(APP, openid="o-fixed-openid", unionid="u-fixed")
    session = client.code_to_session(appid=APP, secret=SECRET, js_code=code)
    assert (session.openid, session.unionid) == ("o-fixed-openid", "u-fixed")
    with pytest.raises(WeChatInvalidCodeError):
        client.code_to_session(appid=APP, secret=SECRET, js_code=code)


def test_login_rejections(admin: SandboxAdmin, client: WeChatClient) -> None:
    code, _ = admin.mint_login_code(APP, high_risk=True)
    with pytest.raises(WeChatConfigurationError) as wrong_secret:
        client.code_to_session(appid=APP, secret="wrong", js_code=code)
    assert wrong_secret.value.errcode == 40125
    with pytest.raises(WeChatHighRiskUserError) as blocked:
        client.code_to_session(appid=APP, secret=SECRET, js_code=code)
    assert blocked.value.errcode == 40226


# -- wire format ------------------------------------------------------------------------------


def test_errors_are_http_200_with_unique_rids(admin: SandboxAdmin) -> None:
    rids = set()
    with requests.Session() as http:
        for _ in range(5):
            response = http.post(
                f"{admin.base_url}/wxa/business/getuserphonenumber", json={"code": "x"}, timeout=5
            )
            assert response.status_code == 200
            body = response.json()
            assert body["errcode"] == 41001
            match = RID.search(body["errmsg"])
            assert match is not None
            rids.add(match.group(1))
        assert len(rids) == 5
        wrong_method = http.get(
            f"{admin.base_url}/cgi-bin/stable_token",
            params={"grant_type": "client_credential", "appid": APP, "secret": SECRET},
            timeout=5,
        ).json()
        assert wrong_method["errcode"] == 43002
        success = http.get(
            f"{admin.base_url}/sns/jscode2session",
            params={
                "appid": APP,
                "secret": SECRET,
                "js_code": admin.mint_login_code(APP)[0],
                "grant_type": "authorization_code",
            },
            timeout=5,
        ).json()
        assert "errcode" not in success


# -- faults -----------------------------------------------------------------------------------


def test_injected_errcodes_are_consumed_in_order(admin: SandboxAdmin, client: WeChatClient) -> None:
    token = client.fetch_stable_token(appid=APP, secret=SECRET).value
    code = admin.mint_phone_code(APP)
    admin.inject_fault("phone", times=2)
    assert admin.inject_fault("phone", errcode=45011) == 3
    for expected in (WeChatBusyError, WeChatBusyError, WeChatRateLimitedError):
        with pytest.raises(expected):
            client.get_phone_number(access_token=token, code=code)
    assert client.get_phone_number(access_token=token, code=code).country_code == "86"
    admin.inject_fault("token", errcode=40001)
    with pytest.raises(WeChatConfigurationError):  # 40001 on the token endpoint: a wrong secret
        client.fetch_classic_token(appid=APP, secret=SECRET)
    admin.inject_fault("phone", errcode=40001)
    with pytest.raises(WeChatTokenRejectedError):
        client.get_phone_number(access_token=token, code=admin.mint_phone_code(APP))
    stats = admin.stats()
    assert stats["phone"]["faults_applied"] == 4
    assert stats["phone"]["errcodes"] == {"-1": 2, "0": 1, "40001": 1, "45011": 1}
    assert stats["token"]["tokens_issued"] == 0


def test_dropped_connection_before_processing_keeps_the_code(
    admin: SandboxAdmin, client: WeChatClient
) -> None:
    token = client.fetch_stable_token(appid=APP, secret=SECRET).value
    code = admin.mint_phone_code(APP)
    admin.inject_fault("phone", drop_connection=True)
    with pytest.raises(WeChatReplyLostError):
        client.get_phone_number(access_token=token, code=code)
    assert client.get_phone_number(access_token=token, code=code).watermark_appid == APP


def test_lost_reply_after_processing_consumes_the_code(admin: SandboxAdmin, client: WeChatClient) -> None:
    token = client.fetch_stable_token(appid=APP, secret=SECRET).value
    code = admin.mint_phone_code(APP)
    admin.inject_fault("phone", drop_connection=True, timing="after")
    with pytest.raises(WeChatReplyLostError):
        client.get_phone_number(access_token=token, code=code)
    with pytest.raises(WeChatInvalidCodeError):
        client.get_phone_number(access_token=token, code=code)
    stats = admin.stats()
    assert stats["codes_exchanged"] == 1
    assert stats["code_presentations"] == {"2": 1}


def test_http_502_is_a_lost_reply(admin: SandboxAdmin, client: WeChatClient) -> None:
    admin.inject_fault("stable_token", http_status=502)
    with pytest.raises(WeChatReplyLostError, match="502"):
        client.fetch_stable_token(appid=APP, secret=SECRET)
    admin.inject_fault("login", http_status=503, timing="after")
    code, _ = admin.mint_login_code(APP)
    with pytest.raises(WeChatReplyLostError):
        client.code_to_session(appid=APP, secret=SECRET, js_code=code)
    with pytest.raises(WeChatInvalidCodeError):  # processed before the 503
        client.code_to_session(appid=APP, secret=SECRET, js_code=code)


@pytest.mark.parametrize("status", [403, 404])
def test_http_4xx_is_a_configuration_error_and_the_code_survives(
    admin: SandboxAdmin, client: WeChatClient, status: int
) -> None:
    """A gateway's 403 or a wrong base URL's 404: the same answer every time, so never retried."""
    admin.inject_fault("stable_token", http_status=status)
    with pytest.raises(WeChatConfigurationError) as caught:
        client.fetch_stable_token(appid=APP, secret=SECRET)
    assert isinstance(caught.value, OperatorActionRequiredError)
    assert not isinstance(caught.value, RetryLaterError)
    assert caught.value.http_status == status
    token = client.fetch_stable_token(appid=APP, secret=SECRET).value
    code = admin.mint_phone_code(APP)
    admin.inject_fault("phone", http_status=status)
    with pytest.raises(WeChatConfigurationError, match=f"HTTP {status}"):
        client.get_phone_number(access_token=token, code=code)
    assert client.get_phone_number(access_token=token, code=code).watermark_appid == APP


@pytest.mark.parametrize("status", [408, 429])
def test_http_408_and_429_are_retried_later_and_the_code_survives(
    admin: SandboxAdmin, client: WeChatClient, status: int
) -> None:
    token = client.fetch_stable_token(appid=APP, secret=SECRET).value
    code = admin.mint_phone_code(APP)
    admin.inject_fault("phone", http_status=status)
    with pytest.raises(RetryLaterError) as caught:
        client.get_phone_number(access_token=token, code=code)
    assert not isinstance(caught.value, OperatorActionRequiredError)
    assert caught.value.maybe_processed is False  # type: ignore[attr-defined]
    assert client.get_phone_number(access_token=token, code=code).watermark_appid == APP


def test_latency_faults_and_read_timeouts(admin: SandboxAdmin, client: WeChatClient) -> None:
    token = client.fetch_stable_token(appid=APP, secret=SECRET).value
    admin.inject_fault("phone", latency_ms=300)
    started = time.monotonic()
    client.get_phone_number(access_token=token, code=admin.mint_phone_code(APP))
    assert time.monotonic() - started >= 0.3
    impatient = WeChatClient(admin.base_url, timeout=(2.0, 0.2))
    try:
        code = admin.mint_phone_code(APP)
        admin.inject_fault("phone", latency_ms=600, timing="after")
        with pytest.raises(WeChatReplyLostError, match="timed out"):
            impatient.get_phone_number(access_token=token, code=code)
    finally:
        impatient.close()
    with pytest.raises(WeChatInvalidCodeError):
        client.get_phone_number(access_token=token, code=code)


def test_configured_latency(admin: SandboxAdmin, client: WeChatClient) -> None:
    config = admin.configure(latency_ms={"token": 250})
    assert config["latency_ms"]["token"] == 250
    assert config["latency_ms"]["phone"] == 0
    started = time.monotonic()
    client.fetch_classic_token(appid=APP, secret=SECRET)
    assert time.monotonic() - started >= 0.25


def test_fault_queue_administration(admin: SandboxAdmin) -> None:
    admin.inject_fault("login", errcode=-1, times=3)
    admin.inject_fault("token", drop_connection=True)
    pending = admin.pending_faults()
    assert [(fault["endpoint"], fault["times"]) for fault in pending] == [("token", 1), ("login", 3)]
    admin.clear_faults()
    assert admin.pending_faults() == []
    with pytest.raises(SandboxAdminError, match="400"):
        admin.inject_fault("admin")  # type: ignore[arg-type]


# -- admin API --------------------------------------------------------------------------------


def test_admin_validation_and_reset(admin: SandboxAdmin, client: WeChatClient) -> None:
    assert admin.health()
    with pytest.raises(SandboxAdminError, match="grace_seconds"):
        admin.configure(grace_seconds=-1)
    with pytest.raises(SandboxAdminError, match="unknown setting"):
        admin.configure(bogus=1)
    with pytest.raises(SandboxAdminError, match="appid"):
        admin.mint_phone_code("wxnobody")
    admin.configure(grace_seconds=12)
    token = client.fetch_stable_token(appid=APP, secret=SECRET).value
    admin.reset()
    assert token_errcode(client, token) == 40001
    assert admin.get_config()["grace_seconds"] == 12
    assert set(admin.apps()) == {APP, OTHER_APP}
    stats = admin.stats()
    assert (stats["stable_token"]["calls"], stats["phone"]["calls"]) == (0, 1)  # counted since the reset
    admin.reset(all=True)
    assert admin.apps() == []
    assert admin.get_config()["grace_seconds"] == 300


def test_admin_reports_an_unreachable_sandbox() -> None:
    dead = SandboxAdmin(f"http://127.0.0.1:{free_port()}", timeout=(0.5, 0.5))
    assert not dead.health()
    with pytest.raises(SandboxAdminError, match="not ready"):
        dead.wait_until_ready(timeout_seconds=0.2)


# -- the command line -------------------------------------------------------------------------


def test_sandbox_command_flags_and_quiet_logs(log_dir: Path) -> None:
    port = free_port()
    process = sandbox_process(
        port,
        base_environment(),
        log_dir,
        "--app", "wxcli_app:cli-secret-value",
        "--token-lifetime-seconds", "4",
        "--grace-seconds", "1",
        "--latency-ms", "phone=5",
        "--latency-ms", "login=7",
        "--access-log",
    ).start()  # fmt: skip
    try:
        process.wait_for_output("listening on", timeout_seconds=20)
        admin = SandboxAdmin(f"http://127.0.0.1:{port}")
        admin.wait_until_ready(timeout_seconds=10)
        assert admin.apps() == ["wxcli_app"]
        config = admin.get_config()
        assert (config["token_lifetime_seconds"], config["grace_seconds"]) == (4, 1)
        assert config["latency_ms"] == {"token": 0, "stable_token": 0, "phone": 5, "login": 7}
        client = WeChatClient(admin.base_url)
        try:
            token = client.fetch_classic_token(appid="wxcli_app", secret="cli-secret-value")
            assert token.expires_in == 4
            code = admin.mint_phone_code("wxcli_app")
            client.get_phone_number(access_token=token.value, code=code)
        finally:
            client.close()
        wait_for(lambda: "/wxa/business/getuserphonenumber" in process.output(), timeout_seconds=5)
    finally:
        process.stop()
    output = process.output()
    assert "GET /cgi-bin/token 200" in output
    for secret in ("cli-secret-value", token.value, code):
        assert secret not in output


def test_sandbox_command_takes_apps_from_settings(log_dir: Path) -> None:
    port = free_port()
    env = base_environment(apps="wxenv_one:env-secret-1,wxenv_two:env-secret-2")
    process = sandbox_process(port, env, log_dir).start()
    try:
        admin = SandboxAdmin(f"http://127.0.0.1:{port}")
        admin.wait_until_ready(timeout_seconds=20)
        assert admin.apps() == ["wxenv_one", "wxenv_two"]
        client = WeChatClient(admin.base_url)
        try:
            assert client.fetch_stable_token(appid="wxenv_two", secret="env-secret-2").expires_in == 7200
        finally:
            client.close()
    finally:
        process.stop()
    assert "env-secret" not in process.output()


def test_sandbox_command_rejects_bad_flags(log_dir: Path) -> None:
    process = sandbox_process(free_port(), base_environment(), log_dir, "--latency-ms", "admin=5").start()
    assert process.process is not None
    assert process.process.wait(timeout=20) == 2
    assert "--latency-ms" in process.output()
