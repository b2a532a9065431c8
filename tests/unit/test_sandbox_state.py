"""The sandbox's emulation logic, driven with a fake clock (no HTTP, no sleeping)."""

from __future__ import annotations

import re
from typing import Any

import pytest

from worker.sandbox import state as state_module
from worker.sandbox.state import Fault, SandboxConfig, SandboxInputError, SandboxState

APP = "wxapp_a"
SECRET = "secret-a"
OTHER_APP = "wxapp_b"
OTHER_SECRET = "secret-b"
RID_PATTERN = re.compile(r" rid: [0-9a-f]{8}-[0-9a-f]{8}-[0-9a-f]{8}$")
#: 2024-03-01 12:00:00 China time.
START = 1_709_265_600.0


class FakeClock:
    def __init__(self, now: float = START) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def sandbox(clock: FakeClock) -> SandboxState:
    return SandboxState(SandboxConfig(), {APP: SECRET, OTHER_APP: OTHER_SECRET}, clock=clock)


def classic(sandbox: SandboxState, appid: str = APP, secret: str = SECRET) -> dict[str, Any]:
    return sandbox.classic_token("GET", {"grant_type": "client_credential", "appid": appid, "secret": secret})


def stable(
    sandbox: SandboxState, appid: str = APP, secret: str = SECRET, *, force: bool = False
) -> dict[str, Any]:
    payload = {"grant_type": "client_credential", "appid": appid, "secret": secret, "force_refresh": force}
    return sandbox.stable_token("POST", {}, payload)


def phone(sandbox: SandboxState, token: str | None, code: str) -> dict[str, Any]:
    return sandbox.phone_number("POST", token, {"code": code})


def login(sandbox: SandboxState, code: str, appid: str = APP, secret: str = SECRET) -> dict[str, Any]:
    query = {"appid": appid, "secret": secret, "js_code": code, "grant_type": "authorization_code"}
    return sandbox.code_to_session("GET", query)


def mint(sandbox: SandboxState, appid: str = APP, **options: object) -> str:
    return sandbox.mint_phone_codes({"appid": appid, **options})[0]["code"]


def errcode(reply: dict[str, Any]) -> int:
    code = reply.get("errcode", 0)
    assert isinstance(code, int)
    return code


# -- classic token ----------------------------------------------------------------------------


def test_classic_token_success_shape(sandbox: SandboxState) -> None:
    reply = classic(sandbox)
    assert set(reply) == {"access_token", "expires_in"}
    assert reply["expires_in"] == 7200
    assert len(reply["access_token"]) > 100


def test_each_classic_fetch_issues_a_new_token_and_the_old_one_dies_after_the_grace(
    sandbox: SandboxState, clock: FakeClock
) -> None:
    sandbox.config.update({"grace_seconds": 300})
    first = classic(sandbox)["access_token"]
    clock.advance(10)
    second = classic(sandbox)["access_token"]
    assert first != second
    code = mint(sandbox)
    clock.advance(299)
    assert errcode(phone(sandbox, first, code)) == 0
    clock.advance(1)
    assert errcode(phone(sandbox, first, mint(sandbox))) == 40001
    assert errcode(phone(sandbox, second, mint(sandbox))) == 0


def test_every_superseded_classic_token_gets_its_own_grace(sandbox: SandboxState, clock: FakeClock) -> None:
    sandbox.config.update({"grace_seconds": 100})
    first = classic(sandbox)["access_token"]
    clock.advance(50)
    second = classic(sandbox)["access_token"]
    third = classic(sandbox)["access_token"]
    clock.advance(60)  # first superseded 60 s ago, second 60 s ago
    assert errcode(phone(sandbox, first, mint(sandbox))) == 0
    clock.advance(40)
    assert errcode(phone(sandbox, first, mint(sandbox))) == 40001
    assert errcode(phone(sandbox, second, mint(sandbox))) == 40001
    assert errcode(phone(sandbox, third, mint(sandbox))) == 0


def test_expired_token_gets_42001(sandbox: SandboxState, clock: FakeClock) -> None:
    sandbox.config.update({"token_lifetime_seconds": 4})
    token = classic(sandbox)
    assert token["expires_in"] == 4
    clock.advance(3.9)
    assert errcode(phone(sandbox, token["access_token"], mint(sandbox))) == 0
    clock.advance(0.1)
    assert errcode(phone(sandbox, token["access_token"], mint(sandbox))) == 42001


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        ({"appid": ""}, 41002),
        ({"secret": ""}, 41004),
        ({"grant_type": "password"}, 40002),
        ({"appid": "wxunknown"}, 40013),
        ({"secret": "wrong"}, 40125),
    ],
)
def test_classic_token_errors(sandbox: SandboxState, overrides: dict[str, str], expected: int) -> None:
    query = {"grant_type": "client_credential", "appid": APP, "secret": SECRET, **overrides}
    reply = sandbox.classic_token("GET", {key: value for key, value in query.items() if value})
    assert errcode(reply) == expected
    assert RID_PATTERN.search(reply["errmsg"])


def test_classic_token_requires_get(sandbox: SandboxState) -> None:
    query = {"grant_type": "client_credential", "appid": APP, "secret": SECRET}
    assert errcode(sandbox.classic_token("POST", query)) == 43001


def test_classic_daily_limit_resets_at_china_midnight(sandbox: SandboxState, clock: FakeClock) -> None:
    sandbox.config.update({"classic_token_daily_limit": 3})
    assert [errcode(classic(sandbox)) for _ in range(4)] == [0, 0, 0, 45009]
    assert errcode(classic(sandbox, OTHER_APP, OTHER_SECRET)) == 0  # quotas are per app
    clock.advance(11 * 3600)  # 23:00 China time
    assert errcode(classic(sandbox)) == 45009
    clock.advance(3600)  # midnight China time
    assert errcode(classic(sandbox)) == 0


def test_rejected_classic_fetch_does_not_rotate(sandbox: SandboxState, clock: FakeClock) -> None:
    sandbox.config.update({"classic_token_daily_limit": 1, "grace_seconds": 0})
    token = classic(sandbox)["access_token"]
    assert errcode(classic(sandbox)) == 45009
    assert errcode(classic(sandbox, secret="wrong")) == 40125
    assert errcode(phone(sandbox, token, mint(sandbox))) == 0


# -- stable token -----------------------------------------------------------------------------


def test_stable_token_is_the_same_while_valid_with_remaining_lifetime(
    sandbox: SandboxState, clock: FakeClock
) -> None:
    first = stable(sandbox)
    assert first["expires_in"] == 7200
    clock.advance(1000.5)
    again = stable(sandbox)
    assert again["access_token"] == first["access_token"]
    assert again["expires_in"] == 6199


def test_stable_token_rolls_over_in_its_last_window(sandbox: SandboxState, clock: FakeClock) -> None:
    sandbox.config.update({"stable_rollover_seconds": 300})
    first = stable(sandbox)["access_token"]
    clock.advance(7200 - 301)
    assert stable(sandbox)["access_token"] == first
    clock.advance(2)  # 299 s left: inside the rollover window
    rolled = stable(sandbox)
    assert rolled["access_token"] != first
    assert rolled["expires_in"] == 7200
    assert stable(sandbox)["access_token"] == rolled["access_token"]
    # The old token keeps working until its own expiry.
    assert errcode(phone(sandbox, first, mint(sandbox))) == 0
    clock.advance(299)
    assert errcode(phone(sandbox, first, mint(sandbox))) == 42001
    assert errcode(phone(sandbox, rolled["access_token"], mint(sandbox))) == 0


def test_force_refresh_kills_the_previous_stable_token_at_once(
    sandbox: SandboxState, clock: FakeClock
) -> None:
    first = stable(sandbox)["access_token"]
    forced = stable(sandbox, force=True)["access_token"]
    assert forced != first
    assert errcode(phone(sandbox, first, mint(sandbox))) == 40001
    assert errcode(phone(sandbox, forced, mint(sandbox))) == 0
    assert stable(sandbox)["access_token"] == forced


def test_too_early_force_refresh_returns_the_current_token_without_counting(
    sandbox: SandboxState, clock: FakeClock
) -> None:
    sandbox.config.update({"force_refresh_spacing_seconds": 30, "force_refresh_daily_limit": 2})
    forced = stable(sandbox, force=True)["access_token"]
    clock.advance(29)
    assert stable(sandbox, force=True)["access_token"] == forced
    clock.advance(1)
    second = stable(sandbox, force=True)["access_token"]
    assert second != forced
    clock.advance(30)
    assert errcode(stable(sandbox, force=True)) == 45009
    assert stable(sandbox)["access_token"] == second
    assert sandbox.stats()["stable_token"]["force_refreshes"] == 2


def test_force_refresh_limit_resets_next_day(sandbox: SandboxState, clock: FakeClock) -> None:
    sandbox.config.update({"force_refresh_daily_limit": 1})
    assert errcode(stable(sandbox, force=True)) == 0
    clock.advance(60)
    assert errcode(stable(sandbox, force=True)) == 45009
    clock.advance(86400)
    assert errcode(stable(sandbox, force=True)) == 0


def test_classic_and_stable_tokens_are_independent(sandbox: SandboxState, clock: FakeClock) -> None:
    sandbox.config.update({"grace_seconds": 0})
    stable_token = stable(sandbox)["access_token"]
    classic_token = classic(sandbox)["access_token"]
    classic(sandbox)
    assert stable(sandbox)["access_token"] == stable_token
    assert errcode(phone(sandbox, stable_token, mint(sandbox))) == 0
    stable(sandbox, force=True)
    assert errcode(phone(sandbox, classic_token, mint(sandbox))) == 40001  # retired by classic only
    latest_classic = classic(sandbox)["access_token"]
    clock.advance(31)
    stable(sandbox, force=True)
    assert errcode(phone(sandbox, latest_classic, mint(sandbox))) == 0


def test_stable_token_is_post_json_only(sandbox: SandboxState) -> None:
    payload = {"grant_type": "client_credential", "appid": APP, "secret": SECRET}
    assert errcode(sandbox.stable_token("GET", {}, payload)) == 43002
    assert errcode(sandbox.stable_token("POST", {"appid": APP, "secret": SECRET}, None)) == 43002
    assert errcode(sandbox.stable_token("POST", {}, None)) == 47001
    assert errcode(sandbox.stable_token("POST", {}, {**payload, "secret": "bad"})) == 40125
    assert errcode(sandbox.stable_token("POST", {}, {**payload, "appid": "wxnope"})) == 40013
    assert errcode(sandbox.stable_token("POST", {}, {"appid": APP, "secret": SECRET})) == 40002


def test_revoke_invalidates_every_token_of_the_app_only(sandbox: SandboxState) -> None:
    classic_token = classic(sandbox)["access_token"]
    stable_token = stable(sandbox)["access_token"]
    other = stable(sandbox, OTHER_APP, OTHER_SECRET)["access_token"]
    assert sandbox.revoke_tokens(APP) == 2
    assert errcode(phone(sandbox, classic_token, mint(sandbox))) == 40001
    assert errcode(phone(sandbox, stable_token, mint(sandbox))) == 40001
    assert errcode(phone(sandbox, other, mint(sandbox, OTHER_APP))) == 0
    fresh = stable(sandbox)["access_token"]
    assert fresh != stable_token
    assert errcode(phone(sandbox, fresh, mint(sandbox))) == 0
    with pytest.raises(KeyError):
        sandbox.revoke_tokens("wxnope")


# -- phone number -----------------------------------------------------------------------------


def test_phone_number_success_body_is_exactly_wechats(sandbox: SandboxState, clock: FakeClock) -> None:
    token = stable(sandbox)["access_token"]
    code = mint(sandbox, pure_phone_number="13912345678")
    clock.advance(5)
    assert phone(sandbox, token, code) == {
        "errcode": 0,
        "errmsg": "ok",
        "phone_info": {
            "phoneNumber": "13912345678",
            "purePhoneNumber": "13912345678",
            "countryCode": "86",
            "watermark": {"timestamp": int(START), "appid": APP},
        },
    }


def test_phone_code_is_single_use(sandbox: SandboxState) -> None:
    token = stable(sandbox)["access_token"]
    code = mint(sandbox)
    assert errcode(phone(sandbox, token, code)) == 0
    assert errcode(phone(sandbox, token, code)) == 40029


def test_phone_code_expires(sandbox: SandboxState, clock: FakeClock) -> None:
    token = stable(sandbox)["access_token"]
    default_code = mint(sandbox)
    short_code = mint(sandbox, lifetime_seconds=10)
    clock.advance(10)
    assert errcode(phone(sandbox, token, short_code)) == 40029
    clock.advance(289)
    assert errcode(phone(sandbox, token, default_code)) == 0
    late_code = mint(sandbox)
    clock.advance(300)
    assert errcode(phone(sandbox, token, late_code)) == 40029


def test_phone_code_of_another_app_is_40013_and_not_consumed(sandbox: SandboxState) -> None:
    token_a = stable(sandbox)["access_token"]
    token_b = stable(sandbox, OTHER_APP, OTHER_SECRET)["access_token"]
    code = mint(sandbox, OTHER_APP)
    assert errcode(phone(sandbox, token_a, code)) == 40013
    assert errcode(phone(sandbox, token_b, code)) == 0


def test_phone_token_checks_come_before_the_code(sandbox: SandboxState) -> None:
    code = mint(sandbox)
    assert errcode(sandbox.phone_number("POST", None, {"code": code})) == 41001
    assert errcode(phone(sandbox, "not-a-token", code)) == 40001
    assert errcode(phone(sandbox, "not-a-token", "not-a-code")) == 40001
    token = stable(sandbox)["access_token"]
    assert errcode(phone(sandbox, token, "not-a-code")) == 40029
    assert errcode(sandbox.phone_number("POST", token, {})) == 41008
    assert errcode(sandbox.phone_number("POST", token, None)) == 47001
    assert errcode(sandbox.phone_number("GET", token, {"code": code})) == 43002
    assert errcode(phone(sandbox, token, code)) == 0


def test_phone_code_options(sandbox: SandboxState) -> None:
    token = stable(sandbox)["access_token"]
    numeric = mint(sandbox, country_code_as_number=True, watermark_appid="wxcrossed")
    info = phone(sandbox, token, numeric)["phone_info"]
    assert info["countryCode"] == 86
    assert info["watermark"]["appid"] == "wxcrossed"
    foreign = mint(sandbox, country_code="852", pure_phone_number="61234567")
    info = phone(sandbox, token, foreign)["phone_info"]
    assert (info["phoneNumber"], info["purePhoneNumber"], info["countryCode"]) == (
        "+85261234567",
        "61234567",
        "852",
    )
    given = mint(sandbox, country_code="1", phone_number="+12025550123")
    assert phone(sandbox, token, given)["phone_info"]["purePhoneNumber"] == "2025550123"


def test_bulk_minted_codes_are_unique_and_look_like_wechats(sandbox: SandboxState) -> None:
    minted = sandbox.mint_phone_codes({"appid": APP, "count": 500})
    codes = {item["code"] for item in minted}
    numbers = {item["pure_phone_number"] for item in minted}
    assert len(codes) == len(numbers) == 500
    assert all(re.fullmatch(r"[A-Za-z0-9_-]{32}", code) for code in codes)
    assert all(re.fullmatch(r"138\d{8}", number) for number in numbers)


@pytest.mark.parametrize(
    "payload",
    [
        {"appid": "wxnope"},
        {"appid": APP, "count": 0},
        {"appid": APP, "count": True},
        {"appid": APP, "country_code": "+86"},
        {"appid": APP, "phone_number": ""},
        {"appid": APP, "lifetime_seconds": -1},
        {"appid": APP, "country_code_as_number": "yes"},
    ],
)
def test_mint_phone_codes_rejects_bad_input(sandbox: SandboxState, payload: dict[str, object]) -> None:
    with pytest.raises(SandboxInputError):
        sandbox.mint_phone_codes(payload)


# -- login ------------------------------------------------------------------------------------


def test_login_success_has_no_errcode_and_unionid_only_when_minted(sandbox: SandboxState) -> None:
    plain = sandbox.mint_login_code({"appid": APP})
    reply = login(sandbox, plain["code"])
    assert set(reply) == {"openid", "session_key"}
    assert reply["openid"] == plain["openid"]
    assert re.fullmatch(r"o[A-Za-z0-9_-]{27}", reply["openid"])
    with_union = sandbox.mint_login_code({"appid": APP, "openid": "o-fixed", "unionid": "u-1"})
    assert with_union == {"code": with_union["code"], "openid": "o-fixed", "unionid": "u-1"}
    reply = login(sandbox, with_union["code"])
    assert (reply["openid"], reply["unionid"]) == ("o-fixed", "u-1")


def test_login_code_errors(sandbox: SandboxState, clock: FakeClock) -> None:
    code = sandbox.mint_login_code({"appid": APP})["code"]
    assert errcode(login(sandbox, code, secret="wrong")) == 40125
    assert errcode(login(sandbox, code, appid="wxnope")) == 40013
    assert errcode(login(sandbox, code, OTHER_APP, OTHER_SECRET)) == 40029
    assert errcode(login(sandbox, "")) == 41008
    assert errcode(login(sandbox, code)) == 0
    assert errcode(login(sandbox, code)) == 40029
    risky = sandbox.mint_login_code({"appid": APP, "high_risk": True})["code"]
    assert errcode(login(sandbox, risky)) == 40226
    stale = sandbox.mint_login_code({"appid": APP})["code"]
    clock.advance(300)
    assert errcode(login(sandbox, stale)) == 40029
    assert errcode(sandbox.code_to_session("POST", {})) == 43001


# -- replies, config, faults, stats -----------------------------------------------------------


def test_rids_are_wechat_shaped_and_unique(sandbox: SandboxState) -> None:
    messages = [sandbox.error(40029)["errmsg"] for _ in range(1000)]
    assert all(message.startswith("invalid code rid: ") for message in messages)
    assert all(RID_PATTERN.search(message) for message in messages)
    assert len(set(messages)) == 1000
    assert sandbox.error(12345)["errcode"] == 12345


def test_config_updates_are_validated_and_atomic(sandbox: SandboxState) -> None:
    sandbox.config.update({"grace_seconds": 1, "latency_ms": 5})
    assert sandbox.config.latency_ms == {"token": 5, "stable_token": 5, "phone": 5, "login": 5}
    sandbox.config.update({"latency_ms": {"phone": 20}})
    assert sandbox.config.latency_ms["phone"] == 20
    assert sandbox.config.latency_ms["login"] == 5
    for bad in (
        {"nope": 1},
        {"grace_seconds": -1},
        {"token_lifetime_seconds": 0},
        {"classic_token_daily_limit": 1.5},
        {"latency_ms": {"admin": 3}},
        {"grace_seconds": "5"},
        {"grace_seconds": 7, "force_refresh_daily_limit": -1},
    ):
        with pytest.raises(SandboxInputError):
            sandbox.config.update(bad)
    assert sandbox.config.grace_seconds == 1


def test_fault_parsing() -> None:
    fault, times = Fault.from_json({"endpoint": "phone"})
    assert (fault.errcode, fault.timing, times) == (-1, "before", 1)
    fault, times = Fault.from_json({"endpoint": "token", "latency_ms": 50, "times": 3})
    assert (fault.errcode, fault.replaces_reply, times) == (None, False, 3)
    fault, _ = Fault.from_json({"endpoint": "login", "drop_connection": True, "timing": "after"})
    assert fault.replaces_reply and fault.errcode is None
    for bad in (
        {"endpoint": "admin"},
        {"endpoint": "phone", "times": 0},
        {"endpoint": "phone", "errcode": "40001"},
        {"endpoint": "phone", "http_status": 99},
        {"endpoint": "phone", "timing": "during"},
        {"endpoint": "phone", "drop_connection": 1},
    ):
        with pytest.raises(SandboxInputError):
            Fault.from_json(bad)


def test_faults_queue_per_endpoint_and_are_consumed_in_order(sandbox: SandboxState) -> None:
    busy, _ = Fault.from_json({"endpoint": "phone"})
    dropped, _ = Fault.from_json({"endpoint": "phone", "drop_connection": True})
    assert sandbox.add_fault(busy, 2) == 2
    assert sandbox.add_fault(dropped) == 3
    assert sandbox.take_fault("token") is None
    assert [sandbox.take_fault("phone") for _ in range(4)] == [busy, busy, dropped, None]
    sandbox.add_fault(busy, 5)
    assert sandbox.pending_faults()[0]["times"] == 5
    sandbox.clear_faults()
    assert sandbox.take_fault("phone") is None


def test_stats_count_calls_errcodes_and_code_presentations(sandbox: SandboxState) -> None:
    token = stable(sandbox)["access_token"]
    sandbox.record("stable_token", APP, 0)
    codes = [mint(sandbox) for _ in range(3)]
    for code in [codes[0], codes[1], codes[1], "unknown-code"]:
        sandbox.record("phone", sandbox.app_of_token(token), errcode(phone(sandbox, token, code)))
    sandbox.record("phone", None, None, fault=True)
    sandbox.record("token", "wxnope", 40013)
    stats = sandbox.stats()
    assert stats["phone"] == {"calls": 5, "errcodes": {"0": 2, "40029": 2}, "faults_applied": 1}
    assert stats["endpoints"]["phone"] == stats["phone"]
    assert stats["stable_token"]["tokens_issued"] == 1
    assert stats["token"] == {"calls": 1, "errcodes": {"40013": 1}, "faults_applied": 0, "tokens_issued": 0}
    assert stats["apps"][APP]["phone"]["calls"] == 4
    assert "wxnope" not in stats["apps"]
    assert stats["codes_exchanged"] == 2
    assert stats["code_presentations"] == {"0": 1, "1": 1, "2": 1}
    assert stats["unknown_code_presentations"] == 1


def test_reset_keeps_apps_and_config_unless_everything(clock: FakeClock) -> None:
    sandbox = SandboxState(SandboxConfig(grace_seconds=7), {APP: SECRET}, clock=clock)
    token = stable(sandbox)["access_token"]
    sandbox.register_app(OTHER_APP, OTHER_SECRET)
    sandbox.config.update({"grace_seconds": 1})
    sandbox.advance_clock(100)
    sandbox.reset()
    assert errcode(phone(sandbox, token, mint(sandbox))) == 40001
    assert sandbox.appids == [APP, OTHER_APP]
    assert sandbox.config.grace_seconds == 1
    assert sandbox.now() == START
    assert sandbox.stats()["stable_token"]["calls"] == 0
    sandbox.reset(everything=True)
    assert sandbox.appids == [APP]
    assert sandbox.config.grace_seconds == 7


def test_advance_clock_moves_expiry(sandbox: SandboxState) -> None:
    token = stable(sandbox)["access_token"]
    assert sandbox.advance_clock(7200) == 7200
    assert errcode(phone(sandbox, token, mint(sandbox))) == 42001
    with pytest.raises(SandboxInputError):
        sandbox.advance_clock(-1)


def test_register_app_validates(sandbox: SandboxState) -> None:
    with pytest.raises(SandboxInputError):
        sandbox.register_app("bad appid!", "s")
    with pytest.raises(SandboxInputError):
        sandbox.register_app("wxok", "")
    sandbox.register_app(APP, "rotated")
    assert errcode(classic(sandbox)) == 40125
    assert errcode(classic(sandbox, secret="rotated")) == 0


def test_long_runs_forget_dead_records_but_keep_the_histogram(
    sandbox: SandboxState, clock: FakeClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(state_module, "_SWEEP_MIN_SIZE", 8)
    sandbox.config.update({"grace_seconds": 0, "classic_token_daily_limit": 10_000})
    expired = stable(sandbox)["access_token"]
    clock.advance(7200)
    token = stable(sandbox)["access_token"]
    assert errcode(phone(sandbox, expired, "x")) == 42001
    first_code = mint(sandbox)
    assert errcode(phone(sandbox, token, first_code)) == 0
    clock.advance(2 * state_module.EXPIRED_TOKEN_MEMORY_SECONDS)
    token = stable(sandbox)["access_token"]
    for _ in range(50):
        classic(sandbox)
        mint(sandbox)
    # Long-expired tokens are forgotten: now indistinguishable from unknown ones.
    assert errcode(phone(sandbox, expired, "x")) == 40001
    assert errcode(phone(sandbox, token, first_code)) == 40029
    stats = sandbox.stats()
    assert stats["code_presentations"]["1"] == 1
    assert stats["token"]["tokens_issued"] == 50
