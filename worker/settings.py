"""The one settings object of wxphone.

Every value comes from the environment (prefix ``WXPHONE_``) or from a ``.env`` file in the
working directory. No other module reads the environment: they take a :class:`Settings`
(usually from :func:`get_settings`) or the plain values it holds.
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass, field
from typing import Annotated, Literal

from pydantic import Field, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

ENV_PREFIX = "WXPHONE_"
APPID_PATTERN = re.compile(r"^[A-Za-z0-9_-]{1,64}$")

TokenMode = Literal["stable", "classic"]
LogLevel = Literal["DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"]


class SettingsError(Exception):
    """Raised at start-up when a setting is missing or invalid; the message names the variable."""


@dataclass(frozen=True)
class AppCredentials:
    """One mini program served by the fleet. The secret never appears in a repr."""

    appid: str
    secret: str = field(repr=False)

    def __str__(self) -> str:
        return self.appid


def parse_apps(raw: str) -> tuple[AppCredentials, ...]:
    """Parse ``appid:secret,appid:secret`` into credentials; error messages never echo a secret."""
    apps: list[AppCredentials] = []
    seen: set[str] = set()
    for position, item in enumerate(part.strip() for part in raw.split(",")):
        if not item:
            continue
        appid, sep, secret = item.partition(":")
        appid, secret = appid.strip(), secret.strip()
        if not sep or not secret:
            raise ValueError(f"entry {position + 1} must look like appid:secret")
        if not APPID_PATTERN.fullmatch(appid):
            raise ValueError(f"entry {position + 1} has an invalid appid (letters, digits, _ and -)")
        if appid in seen:
            raise ValueError(f"appid {appid} is listed twice")
        seen.add(appid)
        apps.append(AppCredentials(appid=appid, secret=secret))
    return tuple(apps)


class Settings(BaseSettings):
    """wxphone configuration; see the README's configuration table for every variable."""

    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX,
        env_file=".env",
        env_file_encoding="utf-8",
        extra="ignore",
        frozen=True,
        hide_input_in_errors=True,
    )

    database_url: str = "postgresql+psycopg://postgres@127.0.0.1:5432/wxphone"
    broker_url: str = "redis://127.0.0.1:6379/0"
    redis_url: str = "redis://127.0.0.1:6379/1"
    wechat_api_base: str = "https://api.weixin.qq.com"
    apps: Annotated[tuple[AppCredentials, ...], NoDecode] = ()
    token_mode: TokenMode = "stable"
    log_level: LogLevel = "INFO"

    # Token service tuning. Refresh timing is a fraction of the expires_in WeChat returned.
    token_check_interval_seconds: float = Field(default=60.0, gt=0)
    token_refresh_fraction: float = Field(default=0.5, gt=0, lt=1)
    token_lock_ttl_seconds: float = Field(default=60.0, gt=0)
    token_wait_seconds: float = Field(default=15.0, gt=0)

    # Outgoing HTTP to WeChat: (connect, read) timeouts on every request.
    http_connect_timeout_seconds: float = Field(default=3.05, gt=0)
    http_read_timeout_seconds: float = Field(default=5.0, gt=0)

    # Phone-code jobs.
    fingerprint_key: str = Field(default="wxphone-development-fingerprint-key", min_length=16)
    code_lifetime_seconds: float = Field(default=300.0, gt=0)
    retry_backoff_base_seconds: float = Field(default=1.0, gt=0)
    retry_backoff_max_seconds: float = Field(default=30.0, gt=0)
    database_retry_max_seconds: float = Field(default=30.0, gt=0)

    # Delivery: one hard limit per task run, one visibility timeout everywhere (broker, results,
    # Celery). Checked below: visibility > hard limit + the longest retry countdown.
    task_time_limit_seconds: float = Field(default=120.0, gt=0)
    task_soft_time_limit_seconds: float = Field(default=100.0, gt=0)
    visibility_timeout_seconds: float = Field(default=600.0, gt=0)
    sweep_interval_seconds: float = Field(default=60.0, gt=0)

    # Fleet-wide outgoing limits per (appid, API) per window; 0 means no local limit. A 45011
    # from WeChat pauses that app's calls until the window ends.
    rate_limit_window_seconds: float = Field(default=60.0, gt=0)
    rate_limit_phone_per_window: int = Field(default=0, ge=0)
    rate_limit_login_per_window: int = Field(default=0, ge=0)

    # Connection pools per worker process: sized for the pool's concurrency, not one per thread
    # (transactions are short, so threads share connections).
    database_pool_size: int = Field(default=10, gt=0)
    database_max_overflow: int = Field(default=20, ge=0)
    database_statement_timeout_seconds: float = Field(default=15.0, gt=0)

    # Worker process shape used by ``wxphone worker``.
    worker_pool: Literal["prefork", "threads", "gevent", "solo"] = "prefork"
    worker_concurrency: int | None = Field(default=None, gt=0)

    @field_validator("apps", mode="before")
    @classmethod
    def _parse_apps(cls, value: object) -> object:
        if isinstance(value, str):
            return parse_apps(value)
        return value

    @field_validator("log_level", mode="before")
    @classmethod
    def _upper_log_level(cls, value: object) -> object:
        return value.upper() if isinstance(value, str) else value

    @field_validator("database_url")
    @classmethod
    def _check_database_url(cls, value: str) -> str:
        if not value.startswith(("postgresql+psycopg://", "postgresql://")):
            raise ValueError("must be a postgresql+psycopg:// URL")
        # SQLAlchemy would pick psycopg2 for a bare postgresql:// URL; we ship psycopg 3.
        return value.replace("postgresql://", "postgresql+psycopg://", 1)

    @field_validator("broker_url", "redis_url")
    @classmethod
    def _check_redis_url(cls, value: str) -> str:
        if not value.startswith(("redis://", "rediss://", "unix://")):
            raise ValueError("must be a redis:// or rediss:// URL")
        return value

    @field_validator("wechat_api_base")
    @classmethod
    def _check_api_base(cls, value: str) -> str:
        if not value.startswith(("http://", "https://")):
            raise ValueError("must be an http:// or https:// URL")
        return value.rstrip("/")

    @model_validator(mode="after")
    def _check_timeouts(self) -> Settings:
        # Each rule names the variables to change; the values themselves are not secret.
        if self.token_lock_ttl_seconds <= 2 * self.http_timeout_total_seconds:
            raise ValueError("WXPHONE_TOKEN_LOCK_TTL_SECONDS must exceed twice the HTTP connect+read timeout")
        if self.task_soft_time_limit_seconds >= self.task_time_limit_seconds:
            raise ValueError(
                "WXPHONE_TASK_SOFT_TIME_LIMIT_SECONDS must be below WXPHONE_TASK_TIME_LIMIT_SECONDS"
            )
        if self.http_timeout_total_seconds + self.token_wait_seconds >= self.task_soft_time_limit_seconds:
            raise ValueError(
                "WXPHONE_TASK_SOFT_TIME_LIMIT_SECONDS must exceed the HTTP connect+read timeout "
                "plus WXPHONE_TOKEN_WAIT_SECONDS"
            )
        needed = self.task_time_limit_seconds + self.longest_retry_delay_seconds
        if self.visibility_timeout_seconds <= needed:
            raise ValueError(
                f"WXPHONE_VISIBILITY_TIMEOUT_SECONDS must exceed the task time limit plus the "
                f"longest retry delay ({needed:.0f}s), or running tasks are delivered twice"
            )
        return self

    @property
    def stale_claim_seconds(self) -> float:
        """A job claimed longer ago than this has lost its worker (no run outlives the hard limit)."""
        return self.task_time_limit_seconds + 15.0

    @property
    def final_write_retry_seconds(self) -> float:
        """How long a worker keeps retrying the commit of an exchanged phone number.

        The code is spent by then, so the number exists nowhere else: ride out a database outage
        for as long as the soft limit allows after the WeChat call and the token wait.
        """
        budget = self.task_soft_time_limit_seconds - self.http_timeout_total_seconds - self.token_wait_seconds
        return max(5.0, budget - 5.0)

    @property
    def longest_retry_delay_seconds(self) -> float:
        """The longest countdown any wxphone task asks for when it retries."""
        return max(
            self.retry_backoff_max_seconds,
            self.rate_limit_window_seconds + 2.0,  # waiting out a 45011 or a local limit
            self.stale_claim_seconds,  # waiting for another delivery's claim to go stale
            self.database_retry_max_seconds,  # backoff while PostgreSQL is unreachable
        )

    @property
    def http_timeout_total_seconds(self) -> float:
        """The longest one WeChat request may take."""
        return self.http_connect_timeout_seconds + self.http_read_timeout_seconds

    @property
    def apps_by_id(self) -> dict[str, AppCredentials]:
        """Configured apps keyed by appid."""
        return {app.appid: app for app in self.apps}


def _variable_name(loc: tuple[int | str, ...]) -> str:
    return ENV_PREFIX + str(loc[0]).upper() if loc else "WXPHONE_* settings"


def load_settings(**overrides: object) -> Settings:
    """Build settings from the environment, turning validation errors into a :class:`SettingsError`.

    The message names each bad variable and never includes the value (it may hold a secret).
    """
    try:
        return Settings(**overrides)  # type: ignore[arg-type]
    except ValidationError as error:
        problems = [f"{_variable_name(detail['loc'])}: {detail['msg']}" for detail in error.errors()]
        raise SettingsError("invalid configuration: " + "; ".join(problems)) from None


@functools.cache
def get_settings() -> Settings:
    """The process-wide settings, loaded once."""
    return load_settings()
