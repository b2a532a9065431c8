"""Request and response bodies of ``wxphone api`` (their JSON Schemas are in ``/openapi.json``).

Request models are strict and closed: a field of the wrong JSON type, an unknown field (an
``openid`` in a phone request: the openid comes from the session) or a value out of range is
refused with 400 before anything is recorded or enqueued. Codes are checked exactly as the
workers check them (:mod:`worker.jobs.validation`): 1 to 128 printable ASCII characters.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from worker.jobs.validation import MAX_CODE_LENGTH

__all__ = [
    "APPID_SCHEMA_PATTERN",
    "CODE_SCHEMA_PATTERN",
    "JOB_ID_SCHEMA_PATTERN",
    "ErrorBody",
    "HealthBody",
    "JobErrorBody",
    "LoginBody",
    "LoginRequest",
    "MaskedPhone",
    "PendingJobBody",
    "PendingStatus",
    "PhoneBody",
    "phone_request_model",
]

# Patterns are anchored with ^ and $: pydantic's regex engine (and JSON Schema) search, and its
# "$" matches only at the very end (no newline before it). Lengths are bounded separately.
#: ``worker.settings.APPID_PATTERN``.
APPID_SCHEMA_PATTERN = r"^[A-Za-z0-9_-]{1,64}$"
#: Printable ASCII without blanks: what a WeChat code (login or phone) may hold.
CODE_SCHEMA_PATTERN = r"^[!-~]+$"
#: Job ids the API hands out are UUIDs; other producers' ids are at most 64 such characters.
JOB_ID_SCHEMA_PATTERN = r"^[A-Za-z0-9_-]{1,64}$"
#: A phone request waits this long unless it says otherwise (bounded by the configured maximum).
DEFAULT_PHONE_WAIT_SECONDS = 10.0

PendingStatus = Literal["queued", "running", "retrying"]
HealthVerdict = Literal["ok", "unreachable"]


class _Request(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid", frozen=True)


class LoginRequest(_Request):
    """``POST /v1/login``: the appid and the code ``wx.login`` gave the mini program."""

    appid: str = Field(min_length=1, max_length=64, pattern=APPID_SCHEMA_PATTERN)
    js_code: str = Field(min_length=1, max_length=MAX_CODE_LENGTH, pattern=CODE_SCHEMA_PATTERN, repr=False)


class PhoneRequestBase(_Request):
    """``POST /v1/phone``: the code of the phone-number button, and how long to wait for it."""

    code: str = Field(min_length=1, max_length=MAX_CODE_LENGTH, pattern=CODE_SCHEMA_PATTERN, repr=False)
    wait_seconds: float


def phone_request_model(max_wait_seconds: float) -> type[PhoneRequestBase]:
    """The phone request with ``wait_seconds`` bounded by ``WXPHONE_API_MAX_WAIT_SECONDS``, so
    the schema states the bound the service applies."""

    class PhoneRequest(PhoneRequestBase):
        __doc__ = PhoneRequestBase.__doc__

        wait_seconds: float = Field(
            default=min(DEFAULT_PHONE_WAIT_SECONDS, max_wait_seconds),
            ge=0,
            le=max_wait_seconds,
            allow_inf_nan=False,
            description="How long to wait for the job before answering 202 (seconds).",
        )

    return PhoneRequest


class LoginBody(BaseModel):
    """A session for the logged-in user; send it as ``Authorization: Bearer <session>``."""

    session: str
    openid: str
    unionid: str | None
    expires_in_seconds: int


class PendingJobBody(BaseModel):
    """The job has not ended yet: ask again with ``GET`` on its id."""

    job_id: str
    status: PendingStatus


class MaskedPhone(BaseModel):
    """The session owner's verified number, masked (``138****8000``)."""

    masked: str
    country_code: str | None


class PhoneBody(BaseModel):
    """The phone job succeeded: the owner's masked number."""

    job_id: str
    status: Literal["succeeded"]
    phone: MaskedPhone


class ErrorBody(BaseModel):
    """Why the request failed: a stable ``error_code`` and a message for people."""

    error_code: str
    message: str


class JobErrorBody(BaseModel):
    """The phone job failed: its stored ``error_code`` and a message for people."""

    job_id: str
    error_code: str
    message: str


class HealthBody(BaseModel):
    """Whether each dependency answers from this process."""

    status: Literal["ok", "unavailable"]
    checks: dict[str, HealthVerdict]
