"""Protection of personal data at rest: field encryption, a blind index and display masks.

* :class:`FieldCipher` encrypts one column value with AES-256-GCM under a versioned key. The
  stored form is ``"<version>:" + urlsafe_base64(nonce || ciphertext+tag)`` with a random 96-bit
  nonce. The associated data names the row and column (:func:`users_context`), so a ciphertext
  copied into another row or column fails authentication instead of decrypting.
* :class:`BlindIndex` is a keyed HMAC-SHA256 of the normalised number (digits only, country code
  first): exact lookups by phone number without storing the number or an unkeyed hash of it
  (an unkeyed hash of an 11-digit number is reversed by brute force in minutes).
* :func:`mask_phone_number` gives the display form (``138****8000``).

Keys come from :mod:`worker.settings` (``WXPHONE_ENCRYPTION_KEYS``, ``WXPHONE_ENCRYPTION_KEY_VERSION``,
``WXPHONE_BLIND_INDEX_KEY``); see ``docs/security.md``. No message raised here carries a key,
a plaintext or a ciphertext.
"""

from __future__ import annotations

import base64
import binascii
import functools
import hashlib
import hmac
import os
import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from sqlalchemy import Case, ColumnElement, case, func
from sqlalchemy.orm import QueryableAttribute

from models.user import User
from worker.keychecks import key_matches
from worker.settings import EncryptionKey, Settings, get_settings
from worker.wechat.types import mask_phone_number as _mask_mainland_style

__all__ = [
    "BlindIndex",
    "DataProtection",
    "DecryptionError",
    "FieldCipher",
    "default_protection",
    "mask_phone_number",
    "normalise_phone_number",
    "row_key_version",
    "users_context",
]

NONCE_BYTES = 12
KEY_BYTES = 32
#: Country code assumed for a number given without one (``13800138000``): mainland China.
DEFAULT_COUNTRY_CODE = "86"
_DIGITS = re.compile(r"\d+")


class DecryptionError(Exception):
    """A stored value could not be decrypted: unknown key version, tampering, or the wrong row."""


def users_context(column: str, appid: str, openid: str) -> str:
    """Associated data of a ``users`` column value: binds the ciphertext to its row and column."""
    return f"users.{column}|{appid}|{openid}"


class FieldCipher:
    """AES-256-GCM over text values, with versioned keys.

    New values are encrypted under ``current_version``; values under any configured version
    decrypt, so keys can be rotated (``wxphone keys rotate``) while workers run.
    """

    def __init__(self, keys: Iterable[EncryptionKey], current_version: str) -> None:
        self._keys: dict[str, AESGCM] = {}
        for key in keys:
            if len(key.key) != KEY_BYTES:
                raise ValueError(f"encryption key {key.version} must be {KEY_BYTES} bytes")
            if ":" in key.version:
                raise ValueError("a key version may not contain ':'")
            self._keys[key.version] = AESGCM(key.key)
        if current_version not in self._keys:
            raise ValueError(f"no encryption key of version {current_version}")
        self.current_version = current_version

    @classmethod
    def from_settings(cls, settings: Settings) -> FieldCipher:
        keys, version = settings.field_encryption_keys()
        return cls(keys, version)

    def __repr__(self) -> str:
        return f"FieldCipher(versions={sorted(self._keys)!r}, current={self.current_version!r})"

    @property
    def versions(self) -> list[str]:
        """Every key version this cipher can decrypt."""
        return sorted(self._keys)

    def encrypt(self, plaintext: str, *, context: str) -> str:
        """Encrypt ``plaintext`` under the current key, bound to ``context`` (see :func:`users_context`)."""
        nonce = os.urandom(NONCE_BYTES)
        sealed = self._keys[self.current_version].encrypt(nonce, plaintext.encode("utf-8"), context.encode())
        return f"{self.current_version}:" + base64.urlsafe_b64encode(nonce + sealed).decode("ascii")

    def decrypt(self, stored: str, *, context: str) -> str:
        """Decrypt a value :meth:`encrypt` produced for the same ``context``."""
        version, sep, encoded = stored.partition(":")
        aead = self._keys.get(version)
        if not sep or aead is None:
            raise DecryptionError(f"no key for the stored value's version {version[:16]!r}")
        try:
            blob = base64.urlsafe_b64decode(encoded.encode("ascii"))
        except (binascii.Error, ValueError, UnicodeEncodeError):
            raise DecryptionError("stored value is not base64") from None
        if len(blob) < NONCE_BYTES + 16:
            raise DecryptionError("stored value is too short")
        try:
            plaintext = aead.decrypt(blob[:NONCE_BYTES], blob[NONCE_BYTES:], context.encode())
        except InvalidTag:
            raise DecryptionError("stored value failed authentication (wrong key, row or column)") from None
        return plaintext.decode("utf-8")

    @staticmethod
    def version_of(stored: str) -> str:
        """The key version a stored value was encrypted under."""
        return stored.partition(":")[0]

    def reencrypt(self, stored: str, *, context: str) -> str:
        """Decrypt and encrypt again under the current key (a fresh nonce every time)."""
        return self.encrypt(self.decrypt(stored, context=context), context=context)


def normalise_phone_number(number: str, *, country_code: str | None = None) -> str:
    """Digits only, country code first: ``+86 138-0013-8000`` and ``13800138000`` -> ``8613800138000``.

    A number written with ``+`` or ``00`` already carries its country code; any other number is
    national and gets ``country_code`` (default ``86``) in front. Raises ``ValueError`` for a
    value without digits.
    """
    text = number.strip()
    digits = "".join(_DIGITS.findall(text))
    if not digits:
        raise ValueError("not a phone number")
    if text.startswith("+"):
        return digits
    if text.startswith("00"):
        return digits[2:]
    prefix = "".join(_DIGITS.findall(country_code or DEFAULT_COUNTRY_CODE))
    return prefix + digits


class BlindIndex:
    """A keyed HMAC-SHA256 of the normalised phone number, as 64 hex characters."""

    def __init__(self, key: str | bytes) -> None:
        raw = key.encode() if isinstance(key, str) else key
        if len(raw) < 16:
            raise ValueError("the blind-index key must be at least 16 bytes")
        self._key = raw

    @classmethod
    def from_settings(cls, settings: Settings) -> BlindIndex:
        return cls(settings.field_blind_index_key())

    def __repr__(self) -> str:
        return "BlindIndex()"

    def matches_check(self, stored: str) -> bool:
        """Whether the fleet's recorded check value was made with this key (:mod:`worker.keychecks`)."""
        return key_matches(self._key, stored)

    def of(self, number: str, *, country_code: str | None = None) -> str:
        """The index of ``number`` (see :func:`normalise_phone_number` for the accepted forms)."""
        normalised = normalise_phone_number(number, country_code=country_code)
        return hmac.new(self._key, normalised.encode("ascii"), hashlib.sha256).hexdigest()


def mask_phone_number(number: str) -> str:
    """The display form: ``13800138000`` -> ``138****8000``; shorter numbers show only their last 4."""
    digits = "".join(_DIGITS.findall(number))
    if len(digits) >= 11:
        return _mask_mainland_style(digits)
    if len(digits) >= 6:
        return "****" + digits[-4:]
    return "****"


@dataclass(frozen=True)
class DataProtection:
    """The field cipher and blind index one process uses, as one collaborator."""

    cipher: FieldCipher
    blind_index: BlindIndex

    @classmethod
    def from_settings(cls, settings: Settings) -> DataProtection:
        return cls(cipher=FieldCipher.from_settings(settings), blind_index=BlindIndex.from_settings(settings))


@functools.cache
def default_protection() -> DataProtection:
    """The protection built from the process-wide settings (for callers given none)."""
    return DataProtection.from_settings(get_settings())


def row_key_version(
    other_ciphertext: ColumnElement[Any] | QueryableAttribute[Any], new_version: ColumnElement[Any]
) -> Case[Any]:
    """SQL for ``users.encryption_key_version`` after an upsert that writes some ciphertexts.

    A row's version is that of its oldest ciphertext, so ``wxphone keys rotate`` (which selects
    rows by version) still finds a row whose other ciphertext (``other_ciphertext``, the column
    the upsert leaves alone) was written under an older key.
    """
    return case(
        (
            (other_ciphertext.is_(None)) | (func.split_part(other_ciphertext, ":", 1) == new_version),
            new_version,
        ),
        else_=User.__table__.c.encryption_key_version,
    )
