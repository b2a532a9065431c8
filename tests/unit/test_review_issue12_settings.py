"""Adversarial review of issue 12: the production-key rule of ``WXPHONE_API_SESSION_KEY`` (and
the other keys) against WeChat API bases whose host two URL parsers read differently."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import requests

from worker.settings import SettingsError, load_settings

#: ``urllib.parse`` reads the host after the last ``@`` (127.0.0.1, loopback: development keys
#: allowed); requests/urllib3, which the WeChat client sends with, read ``\\`` as the end of the
#: authority, so the calls go to the host before it: the real WeChat, or a gateway to it.
SPLIT_HOST_BASES = [
    "https://api.weixin.qq.com\\@127.0.0.1",
    "https://wechat-gw.internal.example\\@localhost:8780",
    "http://10.0.0.5:8080\\\\@[::1]",
]


@pytest.fixture(autouse=True)
def clean_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    for name in list(os.environ):
        if name.upper().startswith("WXPHONE_"):
            monkeypatch.delenv(name)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr("worker.settings._development_warnings_given", set())


@pytest.mark.parametrize("base", SPLIT_HOST_BASES)
def test_a_base_whose_calls_leave_the_machine_never_allows_the_development_session_key(
    monkeypatch: pytest.MonkeyPatch, base: str
) -> None:
    """Development keys (the API's public session key among them) only against the sandbox on
    loopback: a base the WeChat client sends off the machine must either be refused as it loads
    or make ``wxphone api`` refuse to start without a session key of its own."""
    sent_to = requests.Request("GET", base + "/sns/jscode2session").prepare().url or ""
    assert not sent_to.startswith(("http://127.", "https://127.", "http://localhost", "http://[::1]"))
    monkeypatch.setenv("WXPHONE_WECHAT_API_BASE", base)
    try:
        settings = load_settings()
    except SettingsError:
        return  # refused as it loads: fine
    assert settings.uses_real_wechat, f"{base!r} counts as loopback, yet requests sends to {sent_to!r}"
    with pytest.raises(SettingsError, match="WXPHONE_API_SESSION_KEY"):
        settings.field_api_session_key()
