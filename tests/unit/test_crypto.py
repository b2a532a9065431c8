"""Field encryption, the blind index and masks (worker.crypto)."""

from __future__ import annotations

import base64
import os

import pytest

from worker.crypto import (
    BlindIndex,
    DecryptionError,
    FieldCipher,
    mask_phone_number,
    normalise_phone_number,
    users_context,
)
from worker.settings import EncryptionKey

V1 = EncryptionKey("v1", os.urandom(32))
V2 = EncryptionKey("v2", os.urandom(32))
CONTEXT = users_context("phone_number", "wxa", "oUser1")


def test_round_trip_and_stored_form() -> None:
    cipher = FieldCipher([V1], "v1")
    stored = cipher.encrypt("13800138000", context=CONTEXT)
    version, _, body = stored.partition(":")
    assert version == "v1"
    raw = base64.urlsafe_b64decode(body)
    assert len(raw) == 12 + len("13800138000") + 16  # nonce + ciphertext + tag
    assert "13800138000" not in stored
    assert cipher.decrypt(stored, context=CONTEXT) == "13800138000"
    # A fresh nonce every time: the same number never gives the same ciphertext.
    assert cipher.encrypt("13800138000", context=CONTEXT) != stored


@pytest.mark.parametrize(
    "other",
    [
        users_context("phone_number", "wxa", "oUser2"),  # another row
        users_context("phone_number", "wxb", "oUser1"),  # another app
        users_context("pure_phone_number", "wxa", "oUser1"),  # another column
    ],
)
def test_a_ciphertext_copied_elsewhere_does_not_decrypt(other: str) -> None:
    cipher = FieldCipher([V1], "v1")
    stored = cipher.encrypt("13800138000", context=CONTEXT)
    with pytest.raises(DecryptionError) as raised:
        cipher.decrypt(stored, context=other)
    assert "13800138000" not in str(raised.value)


def test_tampering_and_garbage_fail_cleanly() -> None:
    cipher = FieldCipher([V1], "v1")
    stored = cipher.encrypt("13800138000", context=CONTEXT)
    raw = bytearray(base64.urlsafe_b64decode(stored[3:]))
    raw[-1] ^= 1
    for bad in (
        "v1:" + base64.urlsafe_b64encode(bytes(raw)).decode(),
        "v9:" + stored[3:],
        "no-version",
        "v1:!!!",
        "v1:AAAA",
        "",
    ):
        with pytest.raises(DecryptionError):
            cipher.decrypt(bad, context=CONTEXT)


def test_rotation_reads_old_versions_and_writes_the_current_one() -> None:
    old = FieldCipher([V1], "v1")
    stored = old.encrypt("13800138000", context=CONTEXT)
    both = FieldCipher([V1, V2], "v2")
    assert both.decrypt(stored, context=CONTEXT) == "13800138000"
    again = both.reencrypt(stored, context=CONTEXT)
    assert FieldCipher.version_of(again) == "v2"
    assert FieldCipher([V2], "v2").decrypt(again, context=CONTEXT) == "13800138000"
    assert "key" not in repr(both).lower().replace("versions", "")


def test_cipher_refuses_bad_keys() -> None:
    with pytest.raises(ValueError):
        FieldCipher([EncryptionKey("v1", b"short")], "v1")
    with pytest.raises(ValueError):
        FieldCipher([V1], "v2")


@pytest.mark.parametrize(
    ("number", "country_code", "expected"),
    [
        ("13800138000", None, "8613800138000"),
        ("138 0013 8000", "86", "8613800138000"),
        ("+86 138-0013-8000", None, "8613800138000"),
        ("008613800138000", None, "8613800138000"),
        ("+85291234567", None, "85291234567"),
        ("91234567", "852", "85291234567"),
    ],
)
def test_normalisation(number: str, country_code: str | None, expected: str) -> None:
    assert normalise_phone_number(number, country_code=country_code) == expected


def test_blind_index_is_keyed_and_matches_every_spelling() -> None:
    index = BlindIndex("blind-index-key-for-unit-tests")
    value = index.of("13800138000")
    assert len(value) == 64 and int(value, 16) >= 0
    assert index.of("+86 138 0013 8000") == value
    assert index.of("13800138000", country_code="86") == value
    assert index.of("13800138001") != value
    assert BlindIndex("another-blind-index-key-000").of("13800138000") != value
    with pytest.raises(ValueError):
        index.of("no digits")
    with pytest.raises(ValueError):
        BlindIndex("short")


def test_masks() -> None:
    assert mask_phone_number("13800138000") == "138****8000"
    assert mask_phone_number("91234567") == "****4567"
    assert mask_phone_number("123") == "****"
