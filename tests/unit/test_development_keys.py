"""Development keys protect nothing: they are allowed only against the sandbox on loopback, or
when development mode is declared. Any other WeChat API base may be the real WeChat (one of its
domains, a gateway, a proxy), so every process that reads or writes personal data refuses to
start without its own keys."""

from __future__ import annotations

import base64
import logging
import os
from pathlib import Path

import pytest
from celery import Celery
from sqlalchemy.orm import sessionmaker

from worker.crypto import DataProtection, default_protection
from worker.producer import Producer
from worker.runtime import Runtime
from worker.settings import DEVELOPMENT_ENCRYPTION_KEYS, SettingsError, load_settings

KEY_VARIABLES = ("WXPHONE_ENCRYPTION_KEYS", "WXPHONE_BLIND_INDEX_KEY", "WXPHONE_FINGERPRINT_KEY")
REAL_SECRET = "a1b2c3d4e5f6a7b8c9d0e1f2a3b4c5d6"

#: The sandbox: development keys and placeholder secrets are fine.
LOOPBACK_BASES = [
    "http://127.0.0.1:8780",
    "http://localhost:9000",
    "http://[::1]:8000",
    "http://127.3.2.1:8780",
    "HTTP://LOCALHOST:9000/",
]
WECHAT_BASES = [
    "https://api.weixin.qq.com",
    "https://api2.weixin.qq.com",
    "https://sh.api.weixin.qq.com",
    "https://sz.api.weixin.qq.com",
    "https://hk.api.weixin.qq.com",
    "https://api.weixin.qq.com/",
    "https://API.WEIXIN.QQ.COM",
    "https://api.weixin.qq.com:443",
]
#: Anything else may reach the real WeChat: a gateway, a proxy, another host's sandbox.
OTHER_BASES = [
    "https://wechat-gw.internal.example",
    "http://10.0.0.5:8080",
    "http://127.0.0.1.nip.io:8780",
    "http://localhost.example.com",
    "http://127.0.0.1@wechat-gw.internal.example",
    "http://0.0.0.0:8780",
    "http://[::ffff:127.0.0.1]:8780",
]
NOT_LOOPBACK_BASES = WECHAT_BASES + OTHER_BASES


@pytest.fixture(autouse=True)
def clean_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    for name in list(os.environ):
        if name.upper().startswith("WXPHONE_"):
            monkeypatch.delenv(name)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr("worker.settings._development_warnings_given", set())


def unconnected_producer(protection: DataProtection | None = None) -> Producer:
    """A front end's producer; building it connects to nothing."""
    return Producer(
        sessions=sessionmaker(),
        celery_app=Celery("frontend", broker="memory://"),
        protection=protection,
    )


@pytest.mark.parametrize("apps", ["wxa:" + REAL_SECRET, None], ids=["worker", "front-end"])
@pytest.mark.parametrize("base", NOT_LOOPBACK_BASES)
def test_off_loopback_missing_keys_stop_every_process_that_uses_them(
    monkeypatch: pytest.MonkeyPatch, base: str, apps: str | None
) -> None:
    monkeypatch.setenv("WXPHONE_WECHAT_API_BASE", base)
    if apps is not None:
        monkeypatch.setenv("WXPHONE_APPS", apps)
    settings = load_settings()
    assert settings.uses_real_wechat
    for start in (
        settings.require_production_secrets,
        lambda: Runtime(settings),  # workers, beat's tasks, every CLI command that reads data
        lambda: DataProtection.from_settings(settings),
        settings.field_encryption_keys,
        settings.field_blind_index_key,
        settings.field_fingerprint_key,
    ):
        with pytest.raises(SettingsError) as refused:
            start()
        assert all(
            name in str(refused.value) for name in ("WXPHONE_ENCRYPTION_KEYS", "WXPHONE_BLIND_INDEX_KEY")
        )
        assert "WXPHONE_WECHAT_API_BASE" in str(refused.value)
    with pytest.raises(SettingsError, match="WXPHONE_FINGERPRINT_KEY"):
        settings.require_production_secrets()


def test_a_front_end_needs_no_fingerprint_key(monkeypatch: pytest.MonkeyPatch) -> None:
    """Workers alone fingerprint codes: a front end's runtime and producer need the encryption
    and blind-index keys only, while a worker's job policy needs the fingerprint key too."""
    monkeypatch.setenv("WXPHONE_WECHAT_API_BASE", "https://wechat-gw.internal.example")
    monkeypatch.setenv("WXPHONE_ENCRYPTION_KEYS", "v1:" + base64.b64encode(os.urandom(32)).decode())
    monkeypatch.setenv("WXPHONE_BLIND_INDEX_KEY", "blind-index-key-0123456789abcdef")
    settings = load_settings()
    runtime = Runtime(settings)
    unconnected_producer(runtime.protection)
    with pytest.raises(SettingsError, match="WXPHONE_FINGERPRINT_KEY"):
        runtime.job_policy  # noqa: B018  # building it is the check
    with pytest.raises(SettingsError, match="WXPHONE_FINGERPRINT_KEY"):
        settings.require_production_secrets()


def test_a_front_end_refuses_to_build_its_producer_without_keys(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WXPHONE_WECHAT_API_BASE", "https://wechat-gw.internal.example")
    # The producer reads numbers with the process's keys: it must not fall back to the public ones.
    monkeypatch.setattr("worker.crypto.get_settings", load_settings)
    default_protection.cache_clear()
    try:
        with pytest.raises(SettingsError, match="WXPHONE_ENCRYPTION_KEYS"):
            unconnected_producer()
    finally:
        default_protection.cache_clear()


@pytest.mark.parametrize("base", NOT_LOOPBACK_BASES)
def test_off_loopback_every_key_set_is_enough(monkeypatch: pytest.MonkeyPatch, base: str) -> None:
    monkeypatch.setenv("WXPHONE_WECHAT_API_BASE", base)
    monkeypatch.setenv("WXPHONE_APPS", "wxa:" + REAL_SECRET)
    monkeypatch.setenv("WXPHONE_ENCRYPTION_KEYS", "v1:" + base64.b64encode(os.urandom(32)).decode())
    monkeypatch.setenv("WXPHONE_BLIND_INDEX_KEY", "blind-index-key-0123456789abcdef")
    monkeypatch.setenv("WXPHONE_FINGERPRINT_KEY", "fingerprint-key-0123456789abcdef")
    settings = load_settings()
    Runtime(settings)
    assert settings.field_encryption_keys()[1] == "v1"


@pytest.mark.parametrize("base", NOT_LOOPBACK_BASES)
@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("WXPHONE_APPS", "wxa:secret"),
        ("WXPHONE_APPS", "wxa:demo-secret-1"),
        ("WXPHONE_ENCRYPTION_KEYS", DEVELOPMENT_ENCRYPTION_KEYS),
        ("WXPHONE_BLIND_INDEX_KEY", "wxphone-development-blind-index-key"),
        ("WXPHONE_FINGERPRINT_KEY", "changeme-changeme-changeme"),
    ],
)
def test_off_loopback_placeholder_secrets_are_refused_at_start_up(
    monkeypatch: pytest.MonkeyPatch, base: str, name: str, value: str
) -> None:
    monkeypatch.setenv("WXPHONE_WECHAT_API_BASE", base)
    monkeypatch.setenv(name, value)
    with pytest.raises(SettingsError) as refused:
        load_settings()
    assert name in str(refused.value)
    assert value not in str(refused.value).replace(name, "")


@pytest.mark.parametrize("base", LOOPBACK_BASES)
def test_on_loopback_the_sandbox_may_use_development_keys_and_placeholder_secrets(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture, base: str
) -> None:
    monkeypatch.setenv("WXPHONE_WECHAT_API_BASE", base)
    monkeypatch.setenv("WXPHONE_APPS", "wxa:secret")
    settings = load_settings()
    assert not settings.uses_real_wechat
    with caplog.at_level(logging.WARNING):
        Runtime(settings)
        assert settings.field_encryption_keys()[1] == "dev"
        unconnected_producer(DataProtection.from_settings(settings))
    # Only the known development-key notices: development mode is not involved.
    assert not [record for record in caplog.records if "WXPHONE_DEVELOPMENT_MODE" in record.getMessage()]


@pytest.mark.parametrize("base", OTHER_BASES)
def test_development_mode_allows_development_keys_off_loopback_and_says_so(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture, base: str
) -> None:
    """For a sandbox on another host (a container's name, a shared test machine)."""
    monkeypatch.setenv("WXPHONE_WECHAT_API_BASE", base)
    monkeypatch.setenv("WXPHONE_DEVELOPMENT_MODE", "true")
    monkeypatch.setenv("WXPHONE_APPS", "wxa:secret")
    settings = load_settings()
    assert not settings.uses_real_wechat
    with caplog.at_level(logging.WARNING):
        Runtime(settings)
        assert settings.field_encryption_keys()[1] == "dev"
        Runtime(settings)
    warnings = [record for record in caplog.records if "WXPHONE_DEVELOPMENT_MODE" in record.getMessage()]
    assert len(warnings) == 1  # once per process
    assert warnings[0].levelno == logging.WARNING


@pytest.mark.parametrize("base", WECHAT_BASES)
def test_development_mode_is_refused_against_wechat_itself(
    monkeypatch: pytest.MonkeyPatch, base: str
) -> None:
    monkeypatch.setenv("WXPHONE_WECHAT_API_BASE", base)
    monkeypatch.setenv("WXPHONE_DEVELOPMENT_MODE", "true")
    with pytest.raises(SettingsError, match="WXPHONE_DEVELOPMENT_MODE"):
        load_settings()


@pytest.mark.parametrize(
    "base",
    ["api.weixin.qq.com", "ftp://api.weixin.qq.com", "https://", "http://:8780", "http://127.0.0.1:port"],
)
def test_api_base_without_a_usable_host_is_refused(monkeypatch: pytest.MonkeyPatch, base: str) -> None:
    monkeypatch.setenv("WXPHONE_WECHAT_API_BASE", base)
    with pytest.raises(SettingsError, match="WXPHONE_WECHAT_API_BASE"):
        load_settings()
