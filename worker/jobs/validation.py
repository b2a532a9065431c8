"""Checks applied to job input before any WeChat call, and the keyed fingerprint of a code.

Input arrives from any Celery producer, so nothing about its type or content is assumed.
"""

from __future__ import annotations

import hashlib
import hmac
import re
from collections.abc import Collection
from dataclasses import dataclass

from worker.errors import RequestRejectedError
from worker.settings import APPID_PATTERN

__all__ = [
    "MAX_CODE_LENGTH",
    "MAX_OPENID_LENGTH",
    "MAX_TASK_ID_LENGTH",
    "AppNotConfiguredInputError",
    "InvalidInputError",
    "ValidatedLogin",
    "ValidatedPhoneJob",
    "code_fingerprint",
    "display_identifier",
    "is_valid_task_id",
    "validate_login",
    "validate_phone_job",
]

#: WeChat phone and login codes are 32-64 characters; anything past this is not a code.
MAX_CODE_LENGTH = 128
#: openids are 28 characters, unionids 29; leave room without accepting junk.
MAX_OPENID_LENGTH = 64
_CODE_PATTERN = re.compile(r"[\x21-\x7e]+")
_OPENID_PATTERN = re.compile(r"[A-Za-z0-9_-]+")


class InvalidInputError(RequestRejectedError):
    """A job argument is missing, of the wrong type, too long or not printable."""

    error_code = "invalid_input"


class AppNotConfiguredInputError(RequestRejectedError):
    """The job names an appid that this fleet does not serve."""

    error_code = "app_not_configured"


@dataclass(frozen=True)
class ValidatedPhoneJob:
    """The arguments of a ``resolve_phone`` job after validation."""

    appid: str
    openid: str
    code: str

    def __repr__(self) -> str:
        return f"ValidatedPhoneJob(appid={self.appid!r}, openid={self.openid!r})"


@dataclass(frozen=True)
class ValidatedLogin:
    """The arguments of a ``login`` job after validation."""

    appid: str
    js_code: str

    def __repr__(self) -> str:
        return f"ValidatedLogin(appid={self.appid!r})"


def _check_appid(appid: object, configured: Collection[str] | None) -> str:
    if not isinstance(appid, str) or not APPID_PATTERN.fullmatch(appid):
        raise InvalidInputError("appid is missing or malformed")
    if configured is not None and appid not in configured:
        raise AppNotConfiguredInputError(f"appid {appid} is not configured")
    return appid


def _check_code(code: object, name: str) -> str:
    if not isinstance(code, str) or not code:
        raise InvalidInputError(f"{name} is missing or not a string")
    if len(code) > MAX_CODE_LENGTH:
        raise InvalidInputError(f"{name} is longer than {MAX_CODE_LENGTH} characters")
    if not _CODE_PATTERN.fullmatch(code):
        raise InvalidInputError(f"{name} has characters a WeChat code never has")
    return code


def validate_phone_job(
    *, appid: object, openid: object, code: object, configured_appids: Collection[str] | None
) -> ValidatedPhoneJob:
    """Validate ``resolve_phone`` arguments; raise :class:`InvalidInputError` or
    :class:`AppNotConfiguredInputError`. Messages never include the code.

    ``configured_appids=None`` checks the form only (front ends hold no app configuration).
    """
    checked_appid = _check_appid(appid, configured_appids)
    if not isinstance(openid, str) or not openid:
        raise InvalidInputError("openid is missing or not a string")
    if len(openid) > MAX_OPENID_LENGTH or not _OPENID_PATTERN.fullmatch(openid):
        raise InvalidInputError("openid is too long or has characters an openid never has")
    return ValidatedPhoneJob(appid=checked_appid, openid=openid, code=_check_code(code, "code"))


def validate_login(
    *, appid: object, js_code: object, configured_appids: Collection[str] | None
) -> ValidatedLogin:
    """Validate ``login`` arguments, like :func:`validate_phone_job` (``None``: the form only)."""
    checked_appid = _check_appid(appid, configured_appids)
    return ValidatedLogin(appid=checked_appid, js_code=_check_code(js_code, "js_code"))


#: Job ids are Celery task ids (a UUID by default), stored in ``phone_jobs.job_id``.
MAX_TASK_ID_LENGTH = 64


def is_valid_task_id(task_id: object) -> bool:
    """Whether a task id can be a job id: printable text of 1 to 64 characters (no NUL, which
    PostgreSQL text cannot hold). A message with any other id can never be recorded."""
    return isinstance(task_id, str) and 0 < len(task_id) <= MAX_TASK_ID_LENGTH and task_id.isprintable()


def code_fingerprint(key: str, appid: str, code: str) -> str:
    """A keyed HMAC-SHA256 of (appid, code): finds duplicates without storing the code."""
    message = f"{appid}\x00{code}".encode()
    return hmac.new(key.encode(), message, hashlib.sha256).hexdigest()


def display_identifier(value: object, *, limit: int) -> str:
    """A value safe to store in an identifier column of a job that failed validation."""
    if isinstance(value, str) and value.isprintable() and len(value) <= limit:
        return value
    return ""
