"""Job input checks and code fingerprints: what reaches WeChat, and what never leaks into a message."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from worker.jobs.validation import (
    MAX_CODE_LENGTH,
    MAX_OPENID_LENGTH,
    AppNotConfiguredInputError,
    InvalidInputError,
    ValidatedPhoneJob,
    code_fingerprint,
    display_identifier,
    validate_login,
    validate_phone_job,
)

APPID = "wxvalidation0001"
CONFIGURED = {APPID}
CODE = "0a1B2c3D4e5F6g7H8i9J0k1L2m3N4o5P"
OPENID = "oValidation_user-0001"


def phone_job(**changes: Any) -> ValidatedPhoneJob:
    arguments: dict[str, Any] = {"appid": APPID, "openid": OPENID, "code": CODE, **changes}
    return validate_phone_job(configured_appids=CONFIGURED, **arguments)


def test_good_input_passes_unchanged() -> None:
    assert phone_job() == ValidatedPhoneJob(appid=APPID, openid=OPENID, code=CODE)
    assert phone_job(code="x" * MAX_CODE_LENGTH).code == "x" * MAX_CODE_LENGTH
    assert phone_job(openid="o" * MAX_OPENID_LENGTH).openid == "o" * MAX_OPENID_LENGTH
    # Every printable ASCII character but the space can be part of a code.
    printable = "".join(chr(value) for value in range(0x21, 0x7F))
    assert phone_job(code=printable[:MAX_CODE_LENGTH]).code == printable[:MAX_CODE_LENGTH]


@pytest.mark.parametrize(
    ("what", "changes"),
    [
        ("appid None", {"appid": None}),
        ("appid empty", {"appid": ""}),
        ("appid with a space", {"appid": "wx app"}),
        ("appid too long", {"appid": "w" * 65}),
        ("appid an int", {"appid": 123}),
        ("openid None", {"openid": None}),
        ("openid empty", {"openid": ""}),
        ("openid too long", {"openid": "o" * (MAX_OPENID_LENGTH + 1)}),
        ("openid with a dot", {"openid": "o.user"}),
        ("openid with a newline", {"openid": "oUser\n"}),
        ("openid non-ASCII", {"openid": "用户"}),
        ("openid a list", {"openid": [OPENID]}),
        ("code None", {"code": None}),
        ("code empty", {"code": ""}),
        ("code too long", {"code": "x" * (MAX_CODE_LENGTH + 1)}),
        ("code 10 KB", {"code": "x" * 10_240}),
        ("code with a space", {"code": "abc def"}),
        ("code with a newline", {"code": CODE + "\n"}),
        ("code with a tab", {"code": "abc\tdef"}),
        ("code with NUL", {"code": "abc\x00def"}),
        ("code with DEL", {"code": "abc\x7f"}),
        ("code non-ASCII", {"code": "验证码"}),
        ("code an int", {"code": 123456}),
        ("code bytes", {"code": CODE.encode()}),
        ("code True", {"code": True}),
    ],
)
def test_malformed_input_is_invalid_input(what: str, changes: dict[str, Any]) -> None:
    with pytest.raises(InvalidInputError) as raised:
        phone_job(**changes)
    assert raised.value.error_code == "invalid_input", what
    code = changes.get("code", CODE)
    if isinstance(code, str) and code:
        assert code not in str(raised.value), what


def test_an_unknown_appid_is_app_not_configured_unless_only_the_form_is_checked() -> None:
    with pytest.raises(AppNotConfiguredInputError) as raised:
        phone_job(appid="wxunknown0000001")
    assert raised.value.error_code == "app_not_configured"
    # Front ends hold no app list: they check the form only.
    checked = validate_phone_job(appid="wxunknown0000001", openid=OPENID, code=CODE, configured_appids=None)
    assert checked.appid == "wxunknown0000001"
    # A malformed appid is malformed input even when it is not configured.
    with pytest.raises(InvalidInputError) as malformed:
        phone_job(appid="wx unknown")
    assert malformed.value.error_code == "invalid_input"


def test_validated_values_keep_the_code_out_of_their_repr() -> None:
    assert CODE not in repr(phone_job())
    login = validate_login(appid=APPID, js_code=CODE, configured_appids=CONFIGURED)
    assert (login.appid, login.js_code) == (APPID, CODE)
    assert CODE not in repr(login)


@pytest.mark.parametrize("js_code", [None, "", "x" * (MAX_CODE_LENGTH + 1), "abc def", "码", 7])
def test_login_codes_are_checked_like_phone_codes(js_code: object) -> None:
    with pytest.raises(InvalidInputError):
        validate_login(appid=APPID, js_code=js_code, configured_appids=CONFIGURED)
    with pytest.raises(AppNotConfiguredInputError):
        validate_login(appid="wxunknown0000001", js_code=CODE, configured_appids=CONFIGURED)


#: Anything a Celery producer could send in a JSON message, plus the good values.
ANY_JSON_VALUE = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.floats(),
    st.text(max_size=200),
    st.lists(st.text(max_size=5), max_size=3),
    st.dictionaries(st.text(max_size=5), st.integers(), max_size=2),
    st.sampled_from([APPID, OPENID, CODE]),
)


@given(appid=ANY_JSON_VALUE, openid=ANY_JSON_VALUE, code=ANY_JSON_VALUE)
def test_whatever_arrives_is_rejected_with_an_input_error_or_is_well_formed(
    appid: object, openid: object, code: object
) -> None:
    try:
        job = validate_phone_job(appid=appid, openid=openid, code=code, configured_appids=CONFIGURED)
    except (InvalidInputError, AppNotConfiguredInputError):
        return
    assert job.appid == APPID
    assert 1 <= len(job.openid) <= MAX_OPENID_LENGTH
    assert all(character.isascii() and (character.isalnum() or character in "_-") for character in job.openid)
    assert 1 <= len(job.code) <= MAX_CODE_LENGTH
    assert all(0x21 <= ord(character) <= 0x7E for character in job.code)


def test_fingerprints_are_keyed_per_app_and_never_contain_the_code() -> None:
    fingerprint = code_fingerprint("key-one-0000000000", APPID, CODE)
    assert fingerprint == code_fingerprint("key-one-0000000000", APPID, CODE)
    assert len(fingerprint) == 64 and int(fingerprint, 16) >= 0
    assert CODE not in fingerprint
    assert fingerprint != code_fingerprint("key-two-0000000000", APPID, CODE)
    assert fingerprint != code_fingerprint("key-one-0000000000", "wxother000000001", CODE)
    assert fingerprint != code_fingerprint("key-one-0000000000", APPID, CODE + "x")
    # The separator keeps (appid, code) pairs apart that would concatenate to the same text.
    assert code_fingerprint("k" * 16, "wxab", "c") != code_fingerprint("k" * 16, "wxa", "bc")


@pytest.mark.parametrize(
    ("value", "limit", "shown"),
    [
        ("oUser", 128, "oUser"),
        ("o" * 128, 128, "o" * 128),
        ("o" * 129, 128, ""),
        ("oUser\x00", 128, ""),
        ("oUser\n", 128, ""),
        (None, 128, ""),
        (12345, 128, ""),
        (["oUser"], 128, ""),
    ],
)
def test_display_identifier_keeps_only_short_printable_text(value: object, limit: int, shown: str) -> None:
    assert display_identifier(value, limit=limit) == shown
