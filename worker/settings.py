"""The one settings object of wxphone.

Every value comes from the environment (prefix ``WXPHONE_``), from a ``.env`` file in the
working directory, or from the secrets file named by ``WXPHONE_SECRETS_FILE`` (``KEY=VALUE``
lines; it must belong to the current user and be unreadable by group and others). The
environment wins over ``.env``, which wins over the secrets file. No other module reads the
environment or that file: they take a :class:`Settings` (usually from :func:`get_settings`) or the
plain values it holds.

Development keys (:data:`DEVELOPMENT_ENCRYPTION_KEYS`, :data:`DEVELOPMENT_BLIND_INDEX_KEY`,
:data:`DEVELOPMENT_FINGERPRINT_KEY`, :data:`DEVELOPMENT_API_SESSION_KEY`) are public and protect
nothing. They, and placeholder secrets, are allowed only when ``WXPHONE_WECHAT_API_BASE`` is on
loopback (the sandbox: 127.0.0.0/8, ::1, localhost) or ``WXPHONE_DEVELOPMENT_MODE`` is on; a
development key in use is announced once at WARNING. Any other base may be the real WeChat (one
of its domains, a gateway, a proxy): placeholder secrets are refused when the settings load, and a
process that reads or writes personal data refuses to start without its own keys
(:meth:`Settings.require_production_secrets`).
See ``docs/security.md``.
"""

from __future__ import annotations

import base64
import binascii
import functools
import ipaddress
import logging
import os
import re
import stat
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit

from pydantic import Field, ValidationError, field_validator, model_validator
from pydantic.fields import FieldInfo
from pydantic_settings import (
    BaseSettings,
    NoDecode,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
)

log = logging.getLogger(__name__)

ENV_PREFIX = "WXPHONE_"
#: How much longer than the longest retry countdown the visibility timeout must be: a restore scan
#: every 5 s, and time for the countdown's timer to fire and the task to start.
VISIBILITY_MARGIN_SECONDS = 15.0
APPID_PATTERN = re.compile(r"^[A-Za-z0-9_-]{1,64}$")

#: URL schemes of a Redis server (broker, result backend, token store).
REDIS_URL_SCHEMES = ("redis://", "rediss://", "unix://")
#: URL schemes of a RabbitMQ broker (kombu's py-amqp transport).
RABBITMQ_URL_SCHEMES = ("amqp://", "amqps://", "pyamqp://")

#: The default WeChat API base (production).
DEFAULT_WECHAT_API_BASE = "https://api.weixin.qq.com"
#: WeChat's own API hosts (api, api2, sh.api, sz.api, hk.api, ...) are under this domain: always
#: real users' data, so development mode is refused against them.
WECHAT_API_DOMAIN = "weixin.qq.com"
#: Host names that always mean this machine (besides 127.0.0.0/8 and ::1).
LOOPBACK_HOST_NAMES = frozenset({"localhost", "localhost."})

#: Development-only keys, used when no key is configured and development keys are allowed (the
#: sandbox on loopback, or development mode). They are public (they are in this file), so they
#: protect nothing.
DEVELOPMENT_ENCRYPTION_KEY_VERSION = "dev"
DEVELOPMENT_ENCRYPTION_KEYS = "dev:d3hwaG9uZS1kZXZlbG9wbWVudC1rZXktbm90LXNlY3I="
DEVELOPMENT_BLIND_INDEX_KEY = "wxphone-development-blind-index-key"
DEVELOPMENT_FINGERPRINT_KEY = "wxphone-development-fingerprint-key"
#: Signs the sessions of ``wxphone api`` when ``WXPHONE_API_SESSION_KEY`` is unset (same rule).
DEVELOPMENT_API_SESSION_KEY = "wxphone-development-api-session-key"
#: An API session key shorter than this is refused: it is an HMAC key that must not be guessable.
MIN_API_SESSION_KEY_LENGTH = 32

#: Values that are never real secrets (compared case-insensitively, surrounding blanks ignored).
PLACEHOLDER_SECRETS = frozenset(
    {
        "",
        "secret",
        "appsecret",
        "app_secret",
        "app-secret",
        "your-secret",
        "your_secret",
        "yoursecret",
        "changeme",
        "change-me",
        "change_me",
        "password",
        "placeholder",
        "todo",
        "tbd",
        "test",
        "example",
        "none",
        "null",
        "demo-secret-1",
        "demo-secret-2",
        DEVELOPMENT_BLIND_INDEX_KEY,
        DEVELOPMENT_FINGERPRINT_KEY,
        DEVELOPMENT_ENCRYPTION_KEYS,
        DEVELOPMENT_API_SESSION_KEY,
    }
)
# "xxx", "****", "<your secret>", "${SECRET}", "demo-...", "dev-...", "...development...".
_PLACEHOLDER_PATTERN = re.compile(
    r"^(x+|\*+|0+|<.*>|\$\{.*\}|\{\{.*\}\}|demo[-_].*|dev[-_].*|.*development.*|.*placeholder.*|.*change[-_]?me.*)$",
    re.IGNORECASE,
)
ENCRYPTION_KEY_VERSION_PATTERN = re.compile(r"^[A-Za-z0-9_.-]{1,16}$")
ENCRYPTION_KEY_BYTES = 32

#: Variables a secrets file may set, each by its WXPHONE_* name.
SECRETS_FILE_VARIABLE = "WXPHONE_SECRETS_FILE"
#: Why secrets are checked strictly, for messages.
_REAL_DATA_REASON = (
    "WXPHONE_WECHAT_API_BASE is not on loopback (the sandbox) and WXPHONE_DEVELOPMENT_MODE is off"
)

TokenMode = Literal["stable", "classic"]
LogLevel = Literal["DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"]


class SettingsError(Exception):
    """Raised at start-up when a setting is missing or invalid; the message names the variable."""


def url_host(url: str) -> str | None:
    """The host of ``url``, lower case, without IPv6 brackets (None when it has none)."""
    return urlsplit(url).hostname or None


def is_loopback_url(url: str) -> bool:
    """True when ``url``'s host is this machine: 127.0.0.0/8, ::1 or ``localhost``.

    Only literal addresses and the name ``localhost`` count: any other name may resolve anywhere.
    """
    host = url_host(url)
    if host is None:
        return False
    if host in LOOPBACK_HOST_NAMES:
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def is_wechat_url(url: str) -> bool:
    """True when ``url``'s host is one of WeChat's own (``*.weixin.qq.com``)."""
    host = (url_host(url) or "").rstrip(".")
    return host == WECHAT_API_DOMAIN or host.endswith("." + WECHAT_API_DOMAIN)


@dataclass(frozen=True)
class AppCredentials:
    """One mini program served by the fleet. The secret never appears in a repr."""

    appid: str
    secret: str = field(repr=False)

    def __str__(self) -> str:
        return self.appid


def is_placeholder_secret(value: str) -> bool:
    """True for values such as ``""``, ``secret``, ``changeme``, ``xxx`` or a development key."""
    cleaned = value.strip()
    return cleaned.lower() in PLACEHOLDER_SECRETS or bool(_PLACEHOLDER_PATTERN.fullmatch(cleaned))


@dataclass(frozen=True)
class EncryptionKey:
    """One AES-256 key of the field cipher, named by its version. The key never appears in a repr."""

    version: str
    key: bytes = field(repr=False)


def parse_encryption_keys(raw: str) -> tuple[EncryptionKey, ...]:
    """Parse ``v1:<base64 of 32 bytes>,v2:<...>``; error messages never echo a key."""
    keys: list[EncryptionKey] = []
    for position, item in enumerate(part.strip() for part in raw.split(",")):
        if not item:
            continue
        version, sep, encoded = item.partition(":")
        version, encoded = version.strip(), encoded.strip()
        if not sep or not ENCRYPTION_KEY_VERSION_PATTERN.fullmatch(version):
            raise ValueError(
                f"entry {position + 1} must look like version:base64key (version: letters, digits, . _ -)"
            )
        try:
            key = base64.b64decode(encoded + "=" * (-len(encoded) % 4), altchars=b"-_", validate=False)
        except (binascii.Error, ValueError):
            raise ValueError(f"key {version} is not base64") from None
        if len(key) != ENCRYPTION_KEY_BYTES:
            raise ValueError(
                f"key {version} must be {ENCRYPTION_KEY_BYTES} bytes (base64 of 32 random bytes)"
            )
        if any(existing.version == version for existing in keys):
            raise ValueError(f"key version {version} is listed twice")
        keys.append(EncryptionKey(version=version, key=key))
    return tuple(keys)


def _version_sort_key(version: str) -> tuple[tuple[int, int | str], ...]:
    """Natural order: ``v2`` < ``v10``."""
    return tuple((0, int(part)) if part.isdigit() else (1, part) for part in re.findall(r"\d+|\D+", version))


class SecretsFileSource(PydanticBaseSettingsSource):
    """Settings from the ``KEY=VALUE`` file named by ``WXPHONE_SECRETS_FILE``.

    The file must be a regular file owned by the current user with no permission bits for group
    or others (``chmod 600``); anything else is refused before it is read. Blank lines and lines
    starting with ``#`` are skipped; every other line must be ``WXPHONE_NAME=value`` naming a
    known setting. Errors name the file and the line, never a value.
    """

    def __init__(self, settings_cls: type[BaseSettings]) -> None:
        super().__init__(settings_cls)

    def get_field_value(self, field: FieldInfo, field_name: str) -> tuple[Any, str, bool]:
        # Not used: __call__ reads the whole file at once.
        return None, field_name, False

    def __call__(self) -> dict[str, Any]:
        path_value = self.current_state.get("secrets_file")
        if not path_value:
            return {}
        return read_secrets_file(Path(str(path_value)), set(self.settings_cls.model_fields))


def read_secrets_file(path: Path, known_fields: set[str]) -> dict[str, str]:
    """Check the file's ownership and mode, then parse it (see :class:`SecretsFileSource`)."""
    name = SECRETS_FILE_VARIABLE
    try:
        info = path.stat()
    except OSError as error:
        raise SettingsError(f"{name}: cannot read {path}: {error.strerror}") from None
    if not stat.S_ISREG(info.st_mode):
        raise SettingsError(f"{name}: {path} is not a regular file")
    if hasattr(os, "getuid") and info.st_uid != os.getuid():
        raise SettingsError(f"{name}: {path} must be owned by the user running wxphone")
    if info.st_mode & 0o077:
        raise SettingsError(
            f"{name}: {path} is readable or writable by group or others (mode "
            f"{stat.S_IMODE(info.st_mode):o}); run `chmod 600 {path}`"
        )
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError):
        raise SettingsError(f"{name}: cannot read {path} as UTF-8 text") from None
    values: dict[str, str] = {}
    for number, line in enumerate(text.splitlines(), start=1):
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue
        key, sep, value = stripped.partition("=")
        key = key.strip()
        if key.startswith("export "):
            key = key[len("export ") :].strip()
        field_name = key[len(ENV_PREFIX) :].lower() if key.upper().startswith(ENV_PREFIX) else ""
        if not sep or not field_name:
            raise SettingsError(f"{name}: line {number} of {path} must look like WXPHONE_NAME=value")
        if field_name not in known_fields or field_name == "secrets_file":
            raise SettingsError(f"{name}: line {number} of {path} sets {key}, which is not a wxphone setting")
        value = value.strip()
        if len(value) >= 2 and value[0] == value[-1] and value[0] in "\"'":
            value = value[1:-1]
        values[field_name] = value
    return values


_development_warning_lock = threading.Lock()
_development_warnings_given: set[str] = set()


def _warn_once(name: str, message: str, *args: object) -> None:
    """Log ``message`` at WARNING once per process for ``name``.

    Only once logging is set up (workers, beat, a front end's own logging): a one-off command's
    output stays clean.
    """
    if not logging.getLogger().handlers:
        return
    with _development_warning_lock:
        if name in _development_warnings_given:
            return
        _development_warnings_given.add(name)
    log.warning(message, *args)


def _warn_development_key(name: str) -> None:
    """Say once per process and variable that a development key stands in for ``name``."""
    _warn_once(
        name,
        "%s is not set: using the built-in DEVELOPMENT key, fine against the sandbox, never for "
        "real data (see docs/security.md)",
        name,
    )


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
    wechat_api_base: str = DEFAULT_WECHAT_API_BASE
    #: Allow development keys and placeholder secrets against a WeChat API base that is not on
    #: loopback (a sandbox on another host). Refused against WeChat's own domains.
    development_mode: bool = False
    apps: Annotated[tuple[AppCredentials, ...], NoDecode] = ()
    token_mode: TokenMode = "stable"
    log_level: LogLevel = "INFO"

    # Token service tuning. Refresh timing is a fraction of the expires_in WeChat returned.
    token_check_interval_seconds: float = Field(default=60.0, gt=0)
    token_refresh_fraction: float = Field(default=0.9, gt=0, lt=1)
    token_lock_ttl_seconds: float = Field(default=60.0, gt=0)
    token_wait_seconds: float = Field(default=15.0, gt=0)
    #: How long a worker process reuses the shared token it read before reading Redis again.
    #: A replaced token keeps working for minutes, and a rejected one is re-read at once.
    token_local_reuse_seconds: float = Field(default=1.0, ge=0, le=30)

    # Outgoing HTTP to WeChat: (connect, read) timeouts on every request.
    http_connect_timeout_seconds: float = Field(default=3.05, gt=0)
    http_read_timeout_seconds: float = Field(default=5.0, gt=0)
    #: Proxy for every call to WeChat (``http://host:port``), for hosts that reach the internet
    #: only through one. The HTTP client never reads HTTP(S)_PROXY itself: settings are the one
    #: source of configuration (and requests would re-read the environment on every call).
    wechat_proxy_url: str | None = Field(default=None, repr=False)

    # Phone-code jobs.
    fingerprint_key: str = Field(default=DEVELOPMENT_FINGERPRINT_KEY, min_length=16, repr=False)
    code_lifetime_seconds: float = Field(default=300.0, gt=0)
    retry_backoff_base_seconds: float = Field(default=1.0, gt=0)
    retry_backoff_max_seconds: float = Field(default=30.0, gt=0)
    database_retry_max_seconds: float = Field(default=30.0, gt=0)

    # Delivery: one hard limit per task run, one visibility timeout everywhere (broker, results,
    # Celery). A dead worker's unacknowledged messages come back after the visibility timeout, so
    # it is short next to a code's 5-minute life; a message of a task still running that comes
    # back waits for that run (liveness leases). Every retry countdown is capped well below it
    # (checked below): a retry waiting for its countdown in a worker must not come back as a
    # second delivery.
    task_time_limit_seconds: float = Field(default=120.0, gt=0)
    task_soft_time_limit_seconds: float = Field(default=100.0, gt=0)
    visibility_timeout_seconds: float = Field(default=60.0, gt=0)
    #: The longest countdown a retry asks the broker for; a longer wait (a 45011 minute, a run
    #: elsewhere that may still end) is taken in several hops.
    retry_countdown_max_seconds: float = Field(default=30.0, gt=0)
    #: The longest a publish (a submission, a retry) waits for the broker: with RabbitMQ, for its
    #: publisher confirm, which never comes while a memory or disk alarm blocks publishers.
    publish_timeout_seconds: float = Field(default=10.0, gt=0, le=60)
    sweep_interval_seconds: float = Field(default=60.0, gt=0)
    #: Each worker process holds a liveness lease in Redis this long, renewed 8 times per period.
    #: A job running under a process whose lease lapsed may be taken over by another delivery;
    #: a process presents a code only while its lease outlasts the call (worker.liveness).
    runner_lease_seconds: float = Field(default=20.0, gt=0)

    # Fleet-wide outgoing limits per (appid, API) per window; 0 means no local limit. A 45011
    # from WeChat pauses that app's calls until the window ends.
    rate_limit_window_seconds: float = Field(default=60.0, gt=0)
    rate_limit_phone_per_window: int = Field(default=0, ge=0)
    rate_limit_login_per_window: int = Field(default=0, ge=0)
    #: For an API without a per-window limit, how long a worker process trusts that it found no
    #: 45011 pause and no 45009 circuit before asking Redis again.
    call_gate_reuse_seconds: float = Field(default=1.0, ge=0, le=10)

    # Connection pools per worker process: sized for the pool's concurrency, not one per thread
    # (transactions are short, so threads share connections).
    # Enough pooled connections for a threads pool of 100 (each job holds one for two short
    # statements) and no overflow: SQLAlchemy closes an overflow connection when it is returned,
    # so a steady load above the pool size opens a new PostgreSQL backend for many checkouts
    # (measured: ~30 new backends a second and a third less throughput, docs/performance.md).
    database_pool_size: int = Field(default=20, gt=0)
    database_max_overflow: int = Field(default=0, ge=0)
    database_statement_timeout_seconds: float = Field(default=15.0, gt=0)

    # Worker process shape used by ``wxphone worker``.
    worker_pool: Literal["prefork", "threads", "gevent", "solo"] = "prefork"
    worker_concurrency: int | None = Field(default=None, gt=0)

    # Personal data at rest (docs/security.md): AES-256-GCM keys by version, the version new
    # writes use (default: the highest listed), and the HMAC key of the phone-number blind index.
    encryption_keys: Annotated[tuple[EncryptionKey, ...], NoDecode] = Field(default=(), repr=False)
    encryption_key_version: str | None = None
    blind_index_key: str = Field(default="", repr=False)
    #: Optional ``KEY=VALUE`` file of secrets (mode 600, owned by the current user).
    secrets_file: str | None = None

    # The reference HTTP front end (``wxphone api``, docs/security.md "The HTTP API").
    #: The HMAC key that signs its sessions (at least 32 characters; same rule as the keys above).
    api_session_key: str = Field(default="", repr=False)
    #: How long a session lives from its login; the mini program logs in again after it.
    api_session_ttl_seconds: float = Field(default=7200.0, gt=0, le=30 * 86400)
    #: How long ``POST /v1/login`` waits for its login job before answering 202 with the job id.
    api_login_wait_seconds: float = Field(default=10.0, ge=0, le=60)
    #: The longest ``wait_seconds`` a phone request may ask for (a code dies 300 s after issue).
    api_max_wait_seconds: float = Field(default=30.0, ge=0, le=120)
    #: Requests one session may make per minute (a fixed window, counted fleet-wide in Redis).
    api_rate_limit_per_minute: int = Field(default=60, ge=1)

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # Earlier sources win; the secrets file sees (and so can be named by) the ones before it.
        return (
            init_settings,
            env_settings,
            dotenv_settings,
            SecretsFileSource(settings_cls),
            file_secret_settings,
        )

    @field_validator("encryption_keys", mode="before")
    @classmethod
    def _parse_encryption_keys(cls, value: object) -> object:
        if isinstance(value, str):
            return parse_encryption_keys(value)
        return value

    @field_validator("encryption_key_version")
    @classmethod
    def _check_key_version(cls, value: str | None) -> str | None:
        if value is not None and not ENCRYPTION_KEY_VERSION_PATTERN.fullmatch(value):
            raise ValueError("must be a key version such as v2 (letters, digits, . _ -)")
        return value

    @field_validator("blind_index_key")
    @classmethod
    def _check_blind_index_key(cls, value: str) -> str:
        if value and len(value) < 16:
            raise ValueError("must be at least 16 characters")
        return value

    @field_validator("api_session_key")
    @classmethod
    def _check_api_session_key(cls, value: str) -> str:
        if value and len(value) < MIN_API_SESSION_KEY_LENGTH:
            raise ValueError(f"must be at least {MIN_API_SESSION_KEY_LENGTH} characters")
        return value

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

    @field_validator("broker_url")
    @classmethod
    def _check_broker_url(cls, value: str) -> str:
        if not value.startswith(REDIS_URL_SCHEMES + RABBITMQ_URL_SCHEMES):
            raise ValueError("must be a redis://, rediss://, amqp:// or amqps:// URL")
        return value

    @field_validator("redis_url")
    @classmethod
    def _check_redis_url(cls, value: str) -> str:
        if not value.startswith(REDIS_URL_SCHEMES):
            raise ValueError("must be a redis:// or rediss:// URL")
        return value

    @field_validator("wechat_proxy_url")
    @classmethod
    def _check_proxy_url(cls, value: str | None) -> str | None:
        if value in (None, ""):
            return None
        if not value.startswith(("http://", "https://", "socks5://", "socks5h://")):
            raise ValueError("must be an http://, https:// or socks5:// URL")
        return value

    @field_validator("wechat_api_base")
    @classmethod
    def _check_api_base(cls, value: str) -> str:
        if "\\" in value:
            # urllib.parse reads the host after a "user\\@", requests (the WeChat client) reads
            # the one before: a loopback check on one parser's host says nothing of the other's.
            raise ValueError("must not contain a backslash")
        parts = urlsplit(value)
        try:
            _ = parts.port  # parsed on access: a port that is not a number raises
        except ValueError:
            raise ValueError("has an invalid port") from None
        if parts.scheme.lower() not in ("http", "https") or not parts.hostname:
            raise ValueError("must be an http:// or https:// URL with a host")
        return value.rstrip("/")

    @model_validator(mode="after")
    def _check_secrets(self) -> Settings:
        # Messages name the variable, never the value.
        versions = {key.version for key in self.encryption_keys}
        if (
            versions
            and self.encryption_key_version is not None
            and self.encryption_key_version not in versions
        ):
            raise ValueError(
                "WXPHONE_ENCRYPTION_KEY_VERSION names a version that WXPHONE_ENCRYPTION_KEYS does not list"
            )
        if self.development_mode and is_wechat_url(self.wechat_api_base):
            raise ValueError(
                f"WXPHONE_DEVELOPMENT_MODE cannot be on while WXPHONE_WECHAT_API_BASE is a WeChat "
                f"domain (*.{WECHAT_API_DOMAIN}): its replies are real users' data"
            )
        if not self.uses_real_wechat:
            return self
        why = _REAL_DATA_REASON
        if any(is_placeholder_secret(app.secret) for app in self.apps):
            raise ValueError(f"WXPHONE_APPS holds an empty or placeholder AppSecret ({why})")
        explicit = self.model_fields_set
        if "fingerprint_key" in explicit and is_placeholder_secret(self.fingerprint_key):
            raise ValueError(f"WXPHONE_FINGERPRINT_KEY is a placeholder or development key ({why})")
        if "blind_index_key" in explicit and is_placeholder_secret(self.blind_index_key):
            raise ValueError(f"WXPHONE_BLIND_INDEX_KEY is a placeholder or development key ({why})")
        if "api_session_key" in explicit and is_placeholder_secret(self.api_session_key):
            raise ValueError(f"WXPHONE_API_SESSION_KEY is a placeholder or development key ({why})")
        development = {key.key for key in parse_encryption_keys(DEVELOPMENT_ENCRYPTION_KEYS)}
        for key in self.encryption_keys:
            if key.key in development or len(set(key.key)) <= 2:
                raise ValueError(
                    f"WXPHONE_ENCRYPTION_KEYS key {key.version} is a development or trivial key ({why})"
                )
        return self

    @property
    def api_base_is_loopback(self) -> bool:
        """True when ``WXPHONE_WECHAT_API_BASE`` is on this machine (the sandbox)."""
        return is_loopback_url(self.wechat_api_base)

    @property
    def uses_real_wechat(self) -> bool:
        """True unless development keys are allowed: the API base is not on loopback, so it may be
        the real WeChat (its domains, a gateway, a proxy), and development mode is off.

        Placeholder secrets are then refused, and processes that read or write personal data
        require their own keys (:meth:`require_production_secrets`).
        """
        return not (self.api_base_is_loopback or self.development_mode)

    def warn_if_development_mode(self) -> None:
        """Log once per process, at WARNING, that development mode lets development keys and
        placeholder secrets through against a base that is not on loopback."""
        if self.development_mode and not self.api_base_is_loopback:
            _warn_once(
                "WXPHONE_DEVELOPMENT_MODE",
                "WXPHONE_DEVELOPMENT_MODE is on with a WeChat API base that is not on loopback: "
                "development keys and placeholder secrets are accepted; never run it with real "
                "users' data (see docs/security.md)",
            )

    def require_production_secrets(
        self, *, fingerprint_key: bool = True, api_session_key: bool = False
    ) -> None:
        """Raise :class:`SettingsError` naming the missing variables when development keys are
        not allowed (:attr:`uses_real_wechat`) and this process has no keys of its own.

        Called at start-up by every process that reads or writes personal data (workers, front
        ends' producers, the operator commands), whether or not it serves apps. Only workers
        fingerprint codes: front ends pass ``fingerprint_key=False``. Only ``wxphone api`` signs
        sessions: it passes ``api_session_key=True``.
        """
        if not self.uses_real_wechat:
            return
        missing = self.unset_key_variables(fingerprint_key=fingerprint_key, api_session_key=api_session_key)
        if missing:
            raise SettingsError(
                f"{', '.join(missing)} must be set: {_REAL_DATA_REASON}, so the public development "
                "keys may not protect the data (see docs/security.md)"
            )

    def unset_key_variables(
        self, *, fingerprint_key: bool = True, api_session_key: bool = False
    ) -> list[str]:
        """The key variables this process has no value for (development keys would stand in)."""
        return [
            name
            for name, unset in (
                ("WXPHONE_ENCRYPTION_KEYS", not self.encryption_keys),
                ("WXPHONE_BLIND_INDEX_KEY", not self.blind_index_key),
                (
                    "WXPHONE_FINGERPRINT_KEY",
                    fingerprint_key and "fingerprint_key" not in self.model_fields_set,
                ),
                ("WXPHONE_API_SESSION_KEY", api_session_key and not self.api_session_key),
            )
            if unset
        ]

    def field_encryption_keys(self) -> tuple[tuple[EncryptionKey, ...], str]:
        """The keys of the field cipher and the version new writes use.

        Without configured keys: the development key if development keys are allowed, else
        :class:`SettingsError`.
        """
        keys = self.encryption_keys
        if not keys:
            self.require_production_secrets()
            self.warn_if_development_mode()
            _warn_development_key("WXPHONE_ENCRYPTION_KEYS")
            keys = parse_encryption_keys(DEVELOPMENT_ENCRYPTION_KEYS)
        version = self.encryption_key_version
        if version is None or version not in {key.version for key in keys}:
            version = max((key.version for key in keys), key=_version_sort_key)
        return keys, version

    def field_blind_index_key(self) -> str:
        """The HMAC key of the phone-number blind index (development key as for encryption)."""
        if self.blind_index_key:
            return self.blind_index_key
        self.require_production_secrets()
        self.warn_if_development_mode()
        _warn_development_key("WXPHONE_BLIND_INDEX_KEY")
        return DEVELOPMENT_BLIND_INDEX_KEY

    def field_fingerprint_key(self) -> str:
        """The HMAC key of code fingerprints (development key as for encryption)."""
        if "fingerprint_key" in self.model_fields_set:
            return self.fingerprint_key
        self.require_production_secrets()
        self.warn_if_development_mode()
        _warn_development_key("WXPHONE_FINGERPRINT_KEY")
        return DEVELOPMENT_FINGERPRINT_KEY

    def field_api_session_key(self) -> str:
        """The HMAC key of ``wxphone api``'s sessions (development key as for encryption)."""
        if self.api_session_key:
            return self.api_session_key
        self.require_production_secrets(fingerprint_key=False, api_session_key=True)
        self.warn_if_development_mode()
        _warn_development_key("WXPHONE_API_SESSION_KEY")
        return DEVELOPMENT_API_SESSION_KEY

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
        if self.runner_lease_seconds - self.wechat_call_budget_seconds < self.runner_lease_seconds / 4:
            raise ValueError(
                "WXPHONE_RUNNER_LEASE_SECONDS must exceed the HTTP connect+read timeout plus 2 s by a "
                "quarter of the lease (two renewals), so that a live worker keeps presenting codes"
            )
        needed = self.retry_countdown_max_seconds + VISIBILITY_MARGIN_SECONDS
        if self.visibility_timeout_seconds < needed:
            raise ValueError(
                f"WXPHONE_VISIBILITY_TIMEOUT_SECONDS must be at least WXPHONE_RETRY_COUNTDOWN_MAX_SECONDS "
                f"+ {VISIBILITY_MARGIN_SECONDS:.0f} s ({needed:.0f}s): a retry waiting for its countdown "
                "in a worker would otherwise come back as a second delivery"
            )
        if self.visibility_timeout_seconds >= self.code_lifetime_seconds:
            raise ValueError(
                "WXPHONE_VISIBILITY_TIMEOUT_SECONDS must be below WXPHONE_CODE_LIFETIME_SECONDS: a dead "
                "worker's messages come back only after it, and a code dies with its life"
            )
        if self.api_max_wait_seconds >= self.code_lifetime_seconds:
            raise ValueError(
                "WXPHONE_API_MAX_WAIT_SECONDS must be below WXPHONE_CODE_LIFETIME_SECONDS: no phone job "
                "runs longer than its code lives"
            )
        return self

    @property
    def broker_is_rabbitmq(self) -> bool:
        """Whether the broker is RabbitMQ (it redelivers a lost consumer's messages at once) rather
        than Redis (a dead worker's messages come back after the visibility timeout)."""
        return not is_redis_url(self.broker_url)

    @property
    def result_backend_url(self) -> str:
        """Where Celery keeps task results (a login's openid): the broker's Redis, or with RabbitMQ
        the token store's Redis (RabbitMQ is no result store wxphone offers)."""
        return self.redis_url if self.broker_is_rabbitmq else self.broker_url

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
        """The longest countdown any wxphone task asks the broker for (every retry is capped)."""
        return self.retry_countdown_max_seconds

    @property
    def wechat_call_budget_seconds(self) -> float:
        """The longest one WeChat call may take, with a margin: a worker starts a call only while
        its liveness lease has at least this long to run."""
        return self.http_timeout_total_seconds + 2.0

    @property
    def http_timeout_total_seconds(self) -> float:
        """The longest one WeChat request may take."""
        return self.http_connect_timeout_seconds + self.http_read_timeout_seconds

    @property
    def apps_by_id(self) -> dict[str, AppCredentials]:
        """Configured apps keyed by appid."""
        return {app.appid: app for app in self.apps}


#: Settings whose value is a secret: ``config show`` says only whether each is set.
SECRET_SETTINGS = frozenset(
    {"apps", "encryption_keys", "blind_index_key", "fingerprint_key", "wechat_proxy_url", "api_session_key"}
)
#: Settings holding a URL whose password must not be shown.
URL_SETTINGS = frozenset({"database_url", "broker_url", "redis_url"})


def public_settings(settings: Settings) -> dict[str, object]:
    """The effective settings without any secret: what ``wxphone config show`` prints.

    Secrets appear as ``"set"`` or ``"unset"`` (apps as their appids, encryption keys as their
    versions; an unset key is a development key where those are allowed),
    passwords in URLs as ``***``; derived timings (the stale-claim window, the final-write retry
    budget, the longest retry delay) are included.
    """
    shown: dict[str, object] = {}
    for name in type(settings).model_fields:
        value = getattr(settings, name)
        if name == "apps":
            shown[name] = [app.appid for app in value]
        elif name == "encryption_keys":
            shown[name] = [key.version for key in value] if value else "unset"
        elif name == "fingerprint_key":
            shown[name] = "set" if name in settings.model_fields_set else "unset"
        elif name in SECRET_SETTINGS:
            shown[name] = "set" if value else "unset"
        elif name in URL_SETTINGS:
            shown[name] = mask_url_password(str(value))
        else:
            shown[name] = value
    shown["broker"] = "rabbitmq" if settings.broker_is_rabbitmq else "redis"
    shown["result_backend_url"] = mask_url_password(settings.result_backend_url)
    shown["development_keys_allowed"] = not settings.uses_real_wechat
    shown["stale_claim_seconds"] = settings.stale_claim_seconds
    shown["final_write_retry_seconds"] = settings.final_write_retry_seconds
    shown["longest_retry_delay_seconds"] = settings.longest_retry_delay_seconds
    shown["wechat_call_budget_seconds"] = settings.wechat_call_budget_seconds
    return shown


def is_redis_url(url: str) -> bool:
    """Whether ``url`` names a Redis server (the one test of which broker a URL is)."""
    return url.startswith(REDIS_URL_SCHEMES)


def mask_url_password(url: str) -> str:
    """``scheme://user:***@host/...``: the URL with any password replaced, in the credentials or
    as a ``password=`` query option (kombu reads one there too)."""
    url = re.sub(r"([?&;]password=)[^&;#]*", r"\1***", url, flags=re.IGNORECASE)
    scheme, separator, rest = url.partition("://")
    if not separator or "@" not in rest:
        return url
    credentials, _, location = rest.rpartition("@")
    user, has_password, _ = credentials.partition(":")
    return f"{scheme}://{user}{':***' if has_password else ''}@{location}"


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
