"""Values returned by the WeChat API client. Secrets and personal data never appear in a repr."""

from __future__ import annotations

from dataclasses import dataclass, field

__all__ = ["AccessToken", "LoginSession", "PhoneInfo", "mask_phone_number", "mask_secret"]


def mask_secret(value: str, *, keep: int = 4) -> str:
    """Show only the last ``keep`` characters of a secret (``****abcd``)."""
    if len(value) <= keep * 2:
        return "****"
    return "****" + value[-keep:]


def mask_phone_number(number: str) -> str:
    """Mask a phone number for display: ``13800138000`` -> ``138****8000``."""
    if len(number) < 7:
        return "****"
    return number[:3] + "****" + number[-4:]


@dataclass(frozen=True)
class AccessToken:
    """An access token as issued by WeChat, with the lifetime WeChat stated."""

    value: str = field(repr=False)
    expires_in: int

    def __str__(self) -> str:
        return f"AccessToken({mask_secret(self.value)}, expires_in={self.expires_in})"


@dataclass(frozen=True)
class PhoneInfo:
    """``phone_info`` from getuserphonenumber; ``country_code`` is always a string such as "86"."""

    phone_number: str = field(repr=False)
    pure_phone_number: str = field(repr=False)
    country_code: str
    watermark_appid: str
    watermark_timestamp: int

    def __str__(self) -> str:
        return f"PhoneInfo({mask_phone_number(self.pure_phone_number)}, +{self.country_code})"


@dataclass(frozen=True)
class LoginSession:
    """The result of code2Session. The session_key is a secret and stays out of every repr."""

    openid: str
    unionid: str | None
    session_key: str = field(repr=False)
