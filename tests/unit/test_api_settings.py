"""``WXPHONE_API_SESSION_KEY`` follows the rule of every other key: the public development key
only against the sandbox on loopback or in development mode, placeholders refused, and otherwise
``wxphone api`` refuses to start, naming the variable. Also the bounds of the API's settings."""

from __future__ import annotations

import base64
import logging
import os
from pathlib import Path

import pytest
import redis
from celery import Celery
from fastapi import FastAPI
from sqlalchemy import create_engine
from sqlalchemy.orm import sessionmaker

from tests.support.pipeline import DEVELOPMENT_PROTECTION
from tests.unit.test_development_keys import LOOPBACK_BASES, NOT_LOOPBACK_BASES, OTHER_BASES
from worker.api import create_app
from worker.producer import Producer
from worker.settings import (
    DEVELOPMENT_API_SESSION_KEY,
    Settings,
    SettingsError,
    load_settings,
    public_settings,
)

SESSION_KEY = "k3Jd9sLq0Zx8Vb7Nm6Qw5Er4Ty3Ui2Op1As0Df9Gh8"


@pytest.fixture(autouse=True)
def clean_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    for name in list(os.environ):
        if name.upper().startswith("WXPHONE_"):
            monkeypatch.delenv(name)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr("worker.settings._development_warnings_given", set())


def with_data_keys(monkeypatch: pytest.MonkeyPatch, base: str) -> None:
    """A front end's keys that read numbers, against ``base``: all but the session key."""
    monkeypatch.setenv("WXPHONE_WECHAT_API_BASE", base)
    monkeypatch.setenv("WXPHONE_ENCRYPTION_KEYS", "v1:" + base64.b64encode(os.urandom(32)).decode())
    monkeypatch.setenv("WXPHONE_BLIND_INDEX_KEY", "blind-index-key-0123456789abcdef")


def build_app(settings: Settings) -> FastAPI:
    """The API on collaborators that connect to nothing until used."""
    engine = create_engine("postgresql+psycopg://nobody@127.0.0.1:1/nothing")
    producer = Producer(
        sessions=sessionmaker(bind=engine),
        celery_app=Celery("frontend", broker="memory://"),
        protection=DEVELOPMENT_PROTECTION,
    )
    return create_app(producer=producer, redis=redis.Redis(port=1), settings=settings)


@pytest.mark.parametrize("base", NOT_LOOPBACK_BASES)
def test_off_loopback_the_api_refuses_to_start_without_a_session_key(
    monkeypatch: pytest.MonkeyPatch, base: str
) -> None:
    with_data_keys(monkeypatch, base)
    settings = load_settings()
    # Other front ends and the workers do not sign sessions: this key is not theirs to need.
    settings.require_production_secrets(fingerprint_key=False)
    for start in (
        lambda: settings.require_production_secrets(fingerprint_key=False, api_session_key=True),
        settings.field_api_session_key,
        lambda: build_app(settings),
    ):
        with pytest.raises(SettingsError) as refused:
            start()
        assert "WXPHONE_API_SESSION_KEY" in str(refused.value)
        assert "WXPHONE_WECHAT_API_BASE" in str(refused.value)
        assert "WXPHONE_ENCRYPTION_KEYS" not in str(refused.value)


@pytest.mark.parametrize("base", NOT_LOOPBACK_BASES)
def test_off_loopback_a_session_key_of_its_own_is_enough(monkeypatch: pytest.MonkeyPatch, base: str) -> None:
    with_data_keys(monkeypatch, base)
    monkeypatch.setenv("WXPHONE_API_SESSION_KEY", SESSION_KEY)
    settings = load_settings()
    settings.require_production_secrets(fingerprint_key=False, api_session_key=True)
    assert settings.field_api_session_key() == SESSION_KEY
    build_app(settings)


@pytest.mark.parametrize("base", NOT_LOOPBACK_BASES)
@pytest.mark.parametrize(
    "value",
    [
        DEVELOPMENT_API_SESSION_KEY,
        "changeme-changeme-changeme-changeme",
        "x" * 40,
        "${WXPHONE_API_SESSION_KEY_FROM_THE_VAULT}",
        "dev-session-key-0123456789abcdef0123",
        "placeholder-placeholder-placeholder",
    ],
)
def test_off_loopback_placeholder_session_keys_are_refused_at_start_up(
    monkeypatch: pytest.MonkeyPatch, base: str, value: str
) -> None:
    monkeypatch.setenv("WXPHONE_WECHAT_API_BASE", base)
    monkeypatch.setenv("WXPHONE_API_SESSION_KEY", value)
    with pytest.raises(SettingsError) as refused:
        load_settings()
    assert "WXPHONE_API_SESSION_KEY" in str(refused.value)
    assert value not in str(refused.value).replace("WXPHONE_API_SESSION_KEY", "")


@pytest.mark.parametrize("base", LOOPBACK_BASES + OTHER_BASES)
def test_a_short_session_key_is_refused_everywhere(monkeypatch: pytest.MonkeyPatch, base: str) -> None:
    monkeypatch.setenv("WXPHONE_WECHAT_API_BASE", base)
    monkeypatch.setenv("WXPHONE_DEVELOPMENT_MODE", "true")
    monkeypatch.setenv("WXPHONE_API_SESSION_KEY", SESSION_KEY[:31])
    with pytest.raises(SettingsError, match="WXPHONE_API_SESSION_KEY: .*at least 32 characters") as refused:
        load_settings()
    assert SESSION_KEY[:31] not in str(refused.value)


@pytest.mark.parametrize("base", LOOPBACK_BASES)
def test_on_loopback_the_sandbox_may_use_the_development_session_key(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture, base: str
) -> None:
    monkeypatch.setenv("WXPHONE_WECHAT_API_BASE", base)
    monkeypatch.setenv("WXPHONE_API_SESSION_KEY", "changeme-changeme-changeme-changeme")
    assert load_settings().field_api_session_key() == "changeme-changeme-changeme-changeme"
    monkeypatch.delenv("WXPHONE_API_SESSION_KEY")
    settings = load_settings()
    with caplog.at_level(logging.WARNING):
        assert settings.field_api_session_key() == DEVELOPMENT_API_SESSION_KEY
        build_app(settings)
    notices = [record for record in caplog.records if "WXPHONE_API_SESSION_KEY" in record.getMessage()]
    assert len(notices) == 1  # once per process
    assert "DEVELOPMENT" in notices[0].getMessage()


@pytest.mark.parametrize("base", OTHER_BASES)
def test_development_mode_allows_the_development_session_key_off_loopback(
    monkeypatch: pytest.MonkeyPatch, base: str
) -> None:
    monkeypatch.setenv("WXPHONE_WECHAT_API_BASE", base)
    monkeypatch.setenv("WXPHONE_DEVELOPMENT_MODE", "true")
    settings = load_settings()
    assert settings.field_api_session_key() == DEVELOPMENT_API_SESSION_KEY
    build_app(settings)


def test_config_show_tells_only_whether_the_session_key_is_set(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WXPHONE_WECHAT_API_BASE", "http://127.0.0.1:8780")
    assert public_settings(load_settings())["api_session_key"] == "unset"
    monkeypatch.setenv("WXPHONE_API_SESSION_KEY", SESSION_KEY)
    shown = public_settings(load_settings())
    assert shown["api_session_key"] == "set"
    assert SESSION_KEY not in repr(shown) and SESSION_KEY not in repr(load_settings())


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("WXPHONE_API_MAX_WAIT_SECONDS", "-1"),
        ("WXPHONE_API_MAX_WAIT_SECONDS", "600"),
        ("WXPHONE_API_LOGIN_WAIT_SECONDS", "-0.5"),
        ("WXPHONE_API_SESSION_TTL_SECONDS", "0"),
        ("WXPHONE_API_RATE_LIMIT_PER_MINUTE", "0"),
    ],
)
def test_api_settings_out_of_bounds_are_refused(
    monkeypatch: pytest.MonkeyPatch, name: str, value: str
) -> None:
    monkeypatch.setenv("WXPHONE_WECHAT_API_BASE", "http://127.0.0.1:8780")
    monkeypatch.setenv(name, value)
    with pytest.raises(SettingsError, match=name):
        load_settings()


def test_a_wait_must_end_before_the_code_does(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WXPHONE_WECHAT_API_BASE", "http://127.0.0.1:8780")
    monkeypatch.setenv("WXPHONE_CODE_LIFETIME_SECONDS", "100")
    monkeypatch.setenv("WXPHONE_VISIBILITY_TIMEOUT_SECONDS", "50")
    monkeypatch.setenv("WXPHONE_API_MAX_WAIT_SECONDS", "100")
    with pytest.raises(
        SettingsError, match="WXPHONE_API_MAX_WAIT_SECONDS must be below WXPHONE_CODE_LIFETIME"
    ):
        load_settings()
