"""Secrets in settings: encryption keys, the secrets file and the refusal of placeholders."""

from __future__ import annotations

import base64
import logging
import os
from pathlib import Path

import pytest

from worker.settings import (
    DEVELOPMENT_BLIND_INDEX_KEY,
    DEVELOPMENT_ENCRYPTION_KEYS,
    SettingsError,
    load_settings,
)

SANDBOX = "http://127.0.0.1:8780"
REAL_SECRET = "a1b2c3d4e5f6a7b8c9d0e1f2a3b4c5d6"
KEY_1 = base64.b64encode(os.urandom(32)).decode()
KEY_2 = base64.b64encode(os.urandom(32)).decode()
BLIND = "blind-index-key-0123456789abcdef"
FINGERPRINT = "fingerprint-key-0123456789abcdef"


@pytest.fixture(autouse=True)
def clean_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    for name in list(os.environ):
        if name.upper().startswith("WXPHONE_"):
            monkeypatch.delenv(name)
    monkeypatch.chdir(tmp_path)
    return tmp_path


def refused(monkeypatch: pytest.MonkeyPatch, **variables: str) -> str:
    for name, value in variables.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(SettingsError) as caught:
        load_settings().require_production_secrets()
    return str(caught.value)


def test_keys_parse_and_the_highest_version_is_current(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WXPHONE_ENCRYPTION_KEYS", f"v2:{KEY_2}, v10:{KEY_1}")
    settings = load_settings()
    keys, current = settings.field_encryption_keys()
    assert [key.version for key in keys] == ["v2", "v10"] and current == "v10"
    assert KEY_1 not in repr(settings) and KEY_2 not in repr(settings)
    monkeypatch.setenv("WXPHONE_ENCRYPTION_KEY_VERSION", "v2")
    assert load_settings().field_encryption_keys()[1] == "v2"


@pytest.mark.parametrize(
    "value",
    [f"v1{KEY_1}", f"v1:{KEY_1[:-8]}", "v1:not base64!", f"v1:{KEY_1},v1:{KEY_2}", f"v 1:{KEY_1}"],
)
def test_bad_keys_name_the_variable_never_the_value(monkeypatch: pytest.MonkeyPatch, value: str) -> None:
    monkeypatch.setenv("WXPHONE_ENCRYPTION_KEYS", value)
    with pytest.raises(SettingsError) as caught:
        load_settings()
    assert "WXPHONE_ENCRYPTION_KEYS" in str(caught.value)
    assert KEY_1 not in str(caught.value) and KEY_1[:-8] not in str(caught.value)


def test_unknown_current_version_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WXPHONE_ENCRYPTION_KEYS", f"v1:{KEY_1}")
    monkeypatch.setenv("WXPHONE_ENCRYPTION_KEY_VERSION", "v2")
    with pytest.raises(SettingsError, match="WXPHONE_ENCRYPTION_KEY_VERSION"):
        load_settings()


def test_sandbox_falls_back_to_development_keys_with_one_warning(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setenv("WXPHONE_WECHAT_API_BASE", SANDBOX)
    monkeypatch.setenv("WXPHONE_APPS", "wxa:secret")  # a sandbox may use any secret
    monkeypatch.setattr("worker.settings._development_warnings_given", set())
    settings = load_settings()
    with caplog.at_level(logging.WARNING, logger="worker.settings"):
        assert settings.field_encryption_keys()[1] == "dev"
        settings.field_encryption_keys()
        assert settings.field_blind_index_key() == DEVELOPMENT_BLIND_INDEX_KEY
    warnings = [record.getMessage() for record in caplog.records]
    assert len(warnings) == 2
    assert "WXPHONE_ENCRYPTION_KEYS" in warnings[0] and "DEVELOPMENT" in warnings[0]


@pytest.mark.parametrize(
    "secret", ["secret", "changeme", "xxx", "XXXXXXXX", "demo-secret-1", "<your secret>", "${APP_SECRET}"]
)
def test_placeholder_app_secrets_are_refused_against_real_wechat(
    monkeypatch: pytest.MonkeyPatch, secret: str
) -> None:
    monkeypatch.setenv("WXPHONE_APPS", f"wxa:{REAL_SECRET},wxb:{secret}")
    with pytest.raises(SettingsError) as caught:
        load_settings()
    assert "WXPHONE_APPS" in str(caught.value)
    assert secret not in str(caught.value).replace("WXPHONE_APPS", "")
    # The same value is fine against the sandbox.
    monkeypatch.setenv("WXPHONE_WECHAT_API_BASE", SANDBOX)
    load_settings()


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("WXPHONE_BLIND_INDEX_KEY", DEVELOPMENT_BLIND_INDEX_KEY),
        ("WXPHONE_BLIND_INDEX_KEY", "changeme-changeme"),
        ("WXPHONE_FINGERPRINT_KEY", "wxphone-development-fingerprint-key"),
        ("WXPHONE_FINGERPRINT_KEY", "xxxxxxxxxxxxxxxxxxxx"),
        ("WXPHONE_ENCRYPTION_KEYS", DEVELOPMENT_ENCRYPTION_KEYS),
        ("WXPHONE_ENCRYPTION_KEYS", "v1:" + base64.b64encode(bytes(32)).decode()),
    ],
)
def test_development_and_placeholder_keys_are_refused_against_real_wechat(
    monkeypatch: pytest.MonkeyPatch, name: str, value: str
) -> None:
    monkeypatch.setenv(name, value)
    with pytest.raises(SettingsError) as caught:
        load_settings()
    assert name in str(caught.value)
    assert value not in str(caught.value)


def test_serving_real_wechat_requires_every_key(monkeypatch: pytest.MonkeyPatch) -> None:
    message = refused(monkeypatch, WXPHONE_APPS=f"wxa:{REAL_SECRET}")
    for name in ("WXPHONE_ENCRYPTION_KEYS", "WXPHONE_BLIND_INDEX_KEY", "WXPHONE_FINGERPRINT_KEY"):
        assert name in message
    with pytest.raises(SettingsError):
        load_settings().field_encryption_keys()
    monkeypatch.setenv("WXPHONE_ENCRYPTION_KEYS", f"v1:{KEY_1}")
    monkeypatch.setenv("WXPHONE_BLIND_INDEX_KEY", BLIND)
    monkeypatch.setenv("WXPHONE_FINGERPRINT_KEY", FINGERPRINT)
    settings = load_settings()
    settings.require_production_secrets()
    assert settings.field_encryption_keys()[1] == "v1"


def write_secrets(path: Path, text: str, mode: int = 0o600) -> Path:
    path.write_text(text)
    path.chmod(mode)
    return path


def test_secrets_file_supplies_secrets(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    secrets = write_secrets(
        tmp_path / "wxphone.secrets",
        "# production secrets\n"
        f"WXPHONE_APPS=wxa:{REAL_SECRET}\n"
        f"WXPHONE_ENCRYPTION_KEYS='v1:{KEY_1}'\n"
        f'export WXPHONE_BLIND_INDEX_KEY="{BLIND}"\n'
        "\n"
        f"WXPHONE_FINGERPRINT_KEY={FINGERPRINT}\n",
    )
    monkeypatch.setenv("WXPHONE_SECRETS_FILE", str(secrets))
    settings = load_settings()
    settings.require_production_secrets()
    assert settings.apps_by_id["wxa"].secret == REAL_SECRET
    assert settings.blind_index_key == BLIND and settings.fingerprint_key == FINGERPRINT
    assert settings.field_encryption_keys()[1] == "v1"
    # The environment wins over the file.
    monkeypatch.setenv("WXPHONE_BLIND_INDEX_KEY", "from-the-environment-0123")
    assert load_settings().blind_index_key == "from-the-environment-0123"


def test_secrets_file_may_be_named_in_dotenv(clean_environment: Path) -> None:
    write_secrets(clean_environment / "s", f"WXPHONE_BLIND_INDEX_KEY={BLIND}\n")
    (clean_environment / ".env").write_text(f"WXPHONE_SECRETS_FILE={clean_environment / 's'}\n")
    assert load_settings().blind_index_key == BLIND


@pytest.mark.parametrize("mode", [0o640, 0o604, 0o660, 0o666, 0o620])
def test_secrets_file_readable_by_others_is_refused(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, mode: int
) -> None:
    secrets = write_secrets(tmp_path / "s", f"WXPHONE_BLIND_INDEX_KEY={BLIND}\n", mode)
    monkeypatch.setenv("WXPHONE_SECRETS_FILE", str(secrets))
    with pytest.raises(SettingsError) as caught:
        load_settings()
    assert "WXPHONE_SECRETS_FILE" in str(caught.value) and "chmod 600" in str(caught.value)
    assert BLIND not in str(caught.value)


@pytest.mark.parametrize(
    "text",
    [
        f"BLIND_INDEX_KEY={BLIND}\n",
        f"WXPHONE_NOT_A_SETTING={BLIND}\n",
        f"just the secret {BLIND}\n",
        f"WXPHONE_SECRETS_FILE={BLIND}\n",
    ],
)
def test_malformed_secrets_file_lines_name_the_line_not_the_value(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, text: str
) -> None:
    monkeypatch.setenv("WXPHONE_SECRETS_FILE", str(write_secrets(tmp_path / "s", text)))
    with pytest.raises(SettingsError) as caught:
        load_settings()
    assert "line 1" in str(caught.value) and BLIND not in str(caught.value)


def test_missing_secrets_file_is_refused(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("WXPHONE_SECRETS_FILE", str(tmp_path / "absent"))
    with pytest.raises(SettingsError, match="WXPHONE_SECRETS_FILE"):
        load_settings()


def test_secrets_file_owned_by_another_user_is_refused(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    secrets = write_secrets(tmp_path / "s", f"WXPHONE_BLIND_INDEX_KEY={BLIND}\n")
    monkeypatch.setenv("WXPHONE_SECRETS_FILE", str(secrets))
    monkeypatch.setattr(os, "getuid", lambda: os.stat(secrets).st_uid + 1)
    with pytest.raises(SettingsError, match="owned by the user"):
        load_settings()
