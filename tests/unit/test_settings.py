"""Settings come from WXPHONE_* variables or a .env file; bad ones stop start-up with a clear message."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from worker.settings import AppCredentials, Settings, SettingsError, load_settings

SECRET_A = "a1b2c3d4e5f6a7b8c9d0e1f2a3b4c5d6"
SECRET_B = "ffeeddccbbaa99887766554433221100"


@pytest.fixture(autouse=True)
def clean_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """No WXPHONE_* variable from the caller's shell, and a working directory without a .env."""
    for name in list(os.environ):
        if name.upper().startswith("WXPHONE_"):
            monkeypatch.delenv(name)
    monkeypatch.chdir(tmp_path)
    return tmp_path


def problem_with(monkeypatch: pytest.MonkeyPatch, name: str, value: str) -> str:
    monkeypatch.setenv(name, value)
    with pytest.raises(SettingsError) as caught:
        load_settings()
    return str(caught.value)


def test_defaults() -> None:
    settings = load_settings()

    assert settings.database_url == "postgresql+psycopg://postgres@127.0.0.1:5432/wxphone"
    assert settings.broker_url == "redis://127.0.0.1:6379/0"
    assert settings.redis_url == "redis://127.0.0.1:6379/1"
    assert settings.wechat_api_base == "https://api.weixin.qq.com"
    assert settings.apps == ()
    assert settings.token_mode == "stable"
    assert settings.log_level == "INFO"
    assert settings.http_timeout_total_seconds == pytest.approx(3.05 + 5.0)


def test_apps_are_parsed(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WXPHONE_APPS", f"wxa:{SECRET_A}, wxb:{SECRET_B}")

    settings = load_settings()

    assert settings.apps == (AppCredentials("wxa", SECRET_A), AppCredentials("wxb", SECRET_B))
    assert settings.apps_by_id["wxb"].secret == SECRET_B


def test_apps_tolerate_empty_entries_and_colons_in_secrets(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WXPHONE_APPS", "wxa:s:1,,")
    assert load_settings().apps == (AppCredentials("wxa", "s:1"),)


def test_variables_override_defaults(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WXPHONE_TOKEN_MODE", "classic")
    monkeypatch.setenv("WXPHONE_LOG_LEVEL", "debug")
    monkeypatch.setenv("WXPHONE_WECHAT_API_BASE", "http://127.0.0.1:8080/")
    monkeypatch.setenv("WXPHONE_DATABASE_URL", "postgresql://u@db:5432/x")

    settings = load_settings()

    assert settings.token_mode == "classic"
    assert settings.log_level == "DEBUG"
    assert settings.wechat_api_base == "http://127.0.0.1:8080"
    # psycopg 3 is what ships; a bare postgresql:// would make SQLAlchemy look for psycopg2.
    assert settings.database_url == "postgresql+psycopg://u@db:5432/x"


def test_dotenv_in_working_directory_is_read(clean_environment: Path) -> None:
    (clean_environment / ".env").write_text(f"WXPHONE_TOKEN_MODE=classic\nWXPHONE_APPS=wxa:{SECRET_A}\n")

    settings = load_settings()

    assert settings.token_mode == "classic"
    assert settings.apps == (AppCredentials("wxa", SECRET_A),)


def test_environment_wins_over_dotenv(clean_environment: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (clean_environment / ".env").write_text("WXPHONE_TOKEN_MODE=classic\n")
    monkeypatch.setenv("WXPHONE_TOKEN_MODE", "stable")

    assert load_settings().token_mode == "stable"


def test_invalid_value_in_dotenv_is_reported(clean_environment: Path) -> None:
    (clean_environment / ".env").write_text(f"WXPHONE_APPS=wxa:{SECRET_A},wxa:{SECRET_B}\n")

    with pytest.raises(SettingsError) as caught:
        load_settings()

    assert "WXPHONE_APPS" in str(caught.value)
    assert SECRET_A not in str(caught.value)
    assert SECRET_B not in str(caught.value)


def test_unknown_token_mode(monkeypatch: pytest.MonkeyPatch) -> None:
    message = problem_with(monkeypatch, "WXPHONE_TOKEN_MODE", "weird")
    assert "WXPHONE_TOKEN_MODE" in message


@pytest.mark.parametrize(
    "value",
    [
        pytest.param("wxa", id="no-secret"),
        pytest.param("wxa:", id="empty-secret"),
        pytest.param(f"wxa:{SECRET_A},wxb", id="second-without-secret"),
        pytest.param(f"wxa:{SECRET_A},wxa:{SECRET_B}", id="duplicate-appid"),
        pytest.param(f"wx a:{SECRET_A}", id="bad-appid"),
        pytest.param(f":{SECRET_A}", id="no-appid"),
    ],
)
def test_bad_apps_are_reported_without_the_secret(monkeypatch: pytest.MonkeyPatch, value: str) -> None:
    message = problem_with(monkeypatch, "WXPHONE_APPS", value)

    assert "WXPHONE_APPS" in message
    assert SECRET_A not in message
    assert SECRET_B not in message


def test_bad_database_url_is_reported_without_its_password(monkeypatch: pytest.MonkeyPatch) -> None:
    message = problem_with(monkeypatch, "WXPHONE_DATABASE_URL", "mysql://app:Pa55w0rdValue@db/wxphone")

    assert "WXPHONE_DATABASE_URL" in message
    assert "Pa55w0rdValue" not in message


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("WXPHONE_BROKER_URL", "kafka://localhost:9092"),
        ("WXPHONE_REDIS_URL", "memcached://localhost"),
        # The token store (and RedBeat) is Redis whatever the broker is.
        ("WXPHONE_REDIS_URL", "amqp://guest:guest@localhost//"),
        ("WXPHONE_WECHAT_API_BASE", "api.weixin.qq.com"),
        ("WXPHONE_LOG_LEVEL", "loud"),
        ("WXPHONE_HTTP_READ_TIMEOUT_SECONDS", "0"),
        ("WXPHONE_WORKER_POOL", "eventlet"),
    ],
)
def test_other_bad_values_name_their_variable(monkeypatch: pytest.MonkeyPatch, name: str, value: str) -> None:
    assert name in problem_with(monkeypatch, name, value)


def test_token_lock_must_outlive_two_requests(monkeypatch: pytest.MonkeyPatch) -> None:
    # A lock that can expire during the refresh's own WeChat call lets a second refresher in.
    message = problem_with(monkeypatch, "WXPHONE_TOKEN_LOCK_TTL_SECONDS", "10")
    assert "WXPHONE_TOKEN_LOCK_TTL_SECONDS" in message


def test_secrets_stay_out_of_settings_repr(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WXPHONE_APPS", f"wxa:{SECRET_A}")

    settings = load_settings()

    assert SECRET_A not in repr(settings)
    assert SECRET_A not in str(settings)
    assert isinstance(settings, Settings)


def test_the_shipped_delivery_defaults_fit_inside_a_codes_life() -> None:
    """A dead worker's messages come back after the visibility timeout plus a restore scan, and
    its claims are taken over once its lease has lapsed: with the defaults that is well inside the
    5-minute life of the code, with time left for the run and a retry or two."""
    settings = load_settings()
    restore_scan_seconds = 5
    comes_back_after = settings.visibility_timeout_seconds + restore_scan_seconds
    assert settings.runner_lease_seconds < settings.visibility_timeout_seconds
    assert comes_back_after <= 120 <= settings.code_lifetime_seconds / 2
    # No retry waits in a worker long enough to come back as a second delivery.
    assert settings.longest_retry_delay_seconds + 15 <= settings.visibility_timeout_seconds


@pytest.mark.parametrize(
    ("overrides", "variable"),
    [
        (
            {"visibility_timeout_seconds": 40, "retry_countdown_max_seconds": 30},
            "WXPHONE_VISIBILITY_TIMEOUT_SECONDS",
        ),
        ({"visibility_timeout_seconds": 300}, "WXPHONE_VISIBILITY_TIMEOUT_SECONDS"),
    ],
)
def test_delivery_timings_that_break_the_code_clock_are_refused(
    overrides: dict[str, float], variable: str
) -> None:
    with pytest.raises(SettingsError, match=variable):
        load_settings(**overrides)
