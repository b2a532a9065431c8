"""Without RabbitMQ installed, its tests are skipped with the install command, and fail in CI."""

from __future__ import annotations

import pytest

from tests import conftest
from tests.support.rabbitmq import RabbitMQBinaries, RabbitMQNotInstalled


def _not_installed() -> RabbitMQBinaries:
    raise RabbitMQNotInstalled(
        "RabbitMQ is not installed; install it with: sudo apt-get install -y rabbitmq-server"
    )


def test_missing_rabbitmq_skips_with_the_install_command(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(conftest, "find_rabbitmq", _not_installed)
    monkeypatch.delenv("CI", raising=False)

    with pytest.raises(pytest.skip.Exception, match="sudo apt-get install -y rabbitmq-server"):
        conftest.require_rabbitmq()


def test_missing_rabbitmq_fails_in_ci(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(conftest, "find_rabbitmq", _not_installed)
    monkeypatch.setenv("CI", "true")

    with pytest.raises(pytest.fail.Exception, match="sudo apt-get install -y rabbitmq-server"):
        conftest.require_rabbitmq()
