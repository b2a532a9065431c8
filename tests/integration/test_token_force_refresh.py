"""``wxphone token refresh --force``: a forced refresh is a force_refresh=true call made by this
command under the lease, or the command says it did not force and spends nothing."""

from __future__ import annotations

import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
import redis

from tests.conftest import RedisUrls
from tests.support.processes import WXPHONE, base_environment
from tests.support.waiting import wait_for
from worker.errors import WxphoneError
from worker.limits import CallGate
from worker.sandbox.admin import SandboxAdmin
from worker.settings import AppCredentials
from worker.tokens.service import TokenService
from worker.tokens.store import CachedToken, TokenStore
from worker.wechat.client import WeChatClient
from worker.wechat.errors import WeChatError

APPID = "wxforce000000001"
SECRET = "force-refresh-test-secret-1"


def forced_at_sandbox(sandbox: SandboxAdmin) -> int:
    return int(sandbox.stats()["endpoints"]["stable_token"]["force_refreshes"])


def token_errcode(client: WeChatClient, token: str) -> int:
    """Probe a token with an unknown code: the token is checked first, so 40029 means "accepted"."""
    try:
        client.get_phone_number(access_token=token, code="probe-code")
    except WeChatError as error:
        return error.errcode or 0
    return 0


@pytest.fixture
def sandbox_app(sandbox: SandboxAdmin) -> SandboxAdmin:
    sandbox.register_app(APPID, SECRET)
    return sandbox


@pytest.fixture
def make_service(redis_urls: RedisUrls, sandbox_app: SandboxAdmin) -> Iterator[Callable[..., TokenService]]:
    built: list[TokenService] = []

    def make(**options: Any) -> TokenService:
        client = redis.Redis.from_url(redis_urls.redis_url, socket_timeout=2, socket_connect_timeout=1)
        service = TokenService(
            store=TokenStore(client, mode="stable"),
            client=WeChatClient(sandbox_app.base_url, timeout=(1.0, 5.0)),
            apps={APPID: AppCredentials(APPID, SECRET)},
            mode="stable",
            **options,
        )
        built.append(service)
        return service

    yield make
    for service in built:
        service.client.close()


def test_a_force_refresh_racing_a_normal_refresh_forces_or_says_it_did_not(
    make_service: Callable[..., TokenService], sandbox_app: SandboxAdmin, redis_urls: RedisUrls
) -> None:
    normal = make_service()
    forcer = make_service()
    sandbox_app.inject_fault("stable_token", latency_ms=1500)  # only the normal (first) fetch is slow
    fetched: list[CachedToken] = []
    reader = threading.Thread(target=lambda: fetched.append(normal.get_token(APPID)))
    reader.start()
    with redis.Redis.from_url(redis_urls.redis_url) as conn:
        wait_for(
            lambda: conn.exists(TokenStore.lock_key(APPID)),
            timeout_seconds=10,
            what="the normal refresh's lease",
        )
    try:
        forced = forcer.refresh(APPID, force=True)
    except WxphoneError as error:
        # Saying so is allowed, if nothing was forced and nothing spent.
        reader.join(timeout=20)
        assert "not forced" in str(error).lower()
        assert forced_at_sandbox(sandbox_app) == 0
        assert forcer.store.force_budget(APPID).used_today == 0
        return
    reader.join(timeout=20)
    assert not reader.is_alive() and len(fetched) == 1
    # The command's own force_refresh=true call issued the token it reports ...
    assert forced_at_sandbox(sandbox_app) == 1
    assert forced.value != fetched[0].value
    assert forcer.store.force_budget(APPID).used_today == 1
    stored = forcer.store.read(APPID)
    assert stored is not None and stored.value == forced.value
    # ... and it revoked the token the normal refresh had fetched.
    assert token_errcode(forcer.client, fetched[0].value) == 40001
    assert token_errcode(forcer.client, forced.value) == 40029


def test_a_force_refresh_that_cannot_get_the_lease_says_so_and_spends_nothing(
    make_service: Callable[..., TokenService], sandbox_app: SandboxAdmin
) -> None:
    service = make_service(wait_seconds=1.0)
    before = service.get_token(APPID)
    # Another refresher holds the lease (for longer than the command waits).
    assert service.store.try_acquire_lease(APPID, "another-refresher", lease_seconds=30)
    started = time.monotonic()
    with pytest.raises(WxphoneError) as caught:
        service.refresh(APPID, force=True)
    assert time.monotonic() - started < 5
    assert "not forced" in str(caught.value).lower()
    assert forced_at_sandbox(sandbox_app) == 0
    assert service.store.force_budget(APPID).used_today == 0
    stored = service.store.read(APPID)
    assert stored is not None and stored.value == before.value


def test_a_force_refresh_wechat_did_not_perform_is_reported_and_not_counted(
    make_service: Callable[..., TokenService], sandbox_app: SandboxAdmin
) -> None:
    """Another system forced a refresh seconds ago; WeChat hands back that token to our force call."""
    service = make_service()
    other_system = WeChatClient(sandbox_app.base_url, timeout=(1.0, 5.0))
    other_system.fetch_stable_token(appid=APPID, secret=SECRET, force_refresh=True)
    other_system.close()
    stored = service.get_token(APPID)  # normal mode: the token the other system forced
    with pytest.raises(WxphoneError) as caught:
        service.refresh(APPID, force=True)
    assert "not forced" in str(caught.value).lower()
    assert forced_at_sandbox(sandbox_app) == 1  # the other system's only
    assert service.store.force_budget(APPID).used_today == 0
    current = service.store.read(APPID)
    assert current is not None and current.value == stored.value


def test_the_force_budget_counts_beijing_days(redis_urls: RedisUrls) -> None:
    """WeChat's daily quotas roll over at midnight Beijing time (16:00 UTC), not at midnight UTC."""
    day = datetime(2025, 3, 10, tzinfo=UTC)
    now = [0.0]
    client = redis.Redis.from_url(redis_urls.redis_url)
    store = TokenStore(client, mode="stable", clock=lambda: now[0])

    def spend_at(moment: datetime) -> int:
        now[0] = moment.timestamp()
        client.delete(f"wxphone:token-force-last:{APPID}")  # not testing the 30 s spacing here
        return store.spend_force_refresh(APPID, daily_limit=20, spacing_seconds=30)

    def used_at(moment: datetime) -> int:
        now[0] = moment.timestamp()
        return store.force_budget(APPID).used_today

    assert spend_at(day + timedelta(hours=15, minutes=30)) == 1  # 23:30 in Beijing, March 10
    # 16:30 UTC is 00:30 on March 11 in Beijing: a new day at WeChat, the same day in UTC.
    assert used_at(day + timedelta(hours=16, minutes=30)) == 0
    assert spend_at(day + timedelta(hours=16, minutes=30)) == 1
    assert spend_at(day + timedelta(hours=23, minutes=30)) == 2  # 07:30 March 11 in Beijing
    # 00:30 UTC on March 11 is 08:30 in Beijing: still March 11 at WeChat, a new day in UTC.
    assert used_at(day + timedelta(days=1, minutes=30)) == 2
    client.close()


def test_the_command_exits_non_zero_and_says_it_did_not_force(
    make_service: Callable[..., TokenService], sandbox_app: SandboxAdmin, redis_urls: RedisUrls
) -> None:
    service = make_service()
    service.get_token(APPID)
    env = base_environment(
        redis_url=redis_urls.redis_url,
        wechat_api_base=sandbox_app.base_url,
        apps=f"{APPID}:{SECRET}",
        token_wait_seconds=1,
    )
    assert service.store.try_acquire_lease(APPID, "another-refresher", lease_seconds=30)
    refused = subprocess.run(
        [*WXPHONE, "token", "refresh", "--appid", APPID, "--force"],
        env=env, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert refused.returncode != 0
    assert "not forced" in refused.stderr.lower(), refused.stderr
    assert forced_at_sandbox(sandbox_app) == 0

    service.store.release_lease(APPID, "another-refresher")
    done = subprocess.run(
        [*WXPHONE, "token", "refresh", "--appid", APPID, "--force"],
        env=env, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert "forced" in done.stdout
    assert forced_at_sandbox(sandbox_app) == 1


def test_a_45009_on_a_forced_call_spends_the_day_and_leaves_normal_fetches_alone(
    make_service: Callable[..., TokenService], sandbox_app: SandboxAdmin, redis_urls: RedisUrls
) -> None:
    """Another system used up today's force refreshes: WeChat answers our forced call with 45009."""
    sandbox_app.configure(force_refresh_daily_limit=1)
    other_system = WeChatClient(sandbox_app.base_url, timeout=(1.0, 5.0))
    other_system.fetch_stable_token(appid=APPID, secret=SECRET, force_refresh=True)
    other_system.close()
    gate = CallGate(redis.Redis.from_url(redis_urls.redis_url), limits_per_window={})
    service = make_service(gate=gate)
    stored = service.get_token(APPID)
    with pytest.raises(WxphoneError) as caught:
        service.refresh(APPID, force=True)
    assert "not forced" in str(caught.value).lower() and "45009" in str(caught.value)
    assert service.store.force_budget(APPID).used_today == 20  # refused here from now on, no call
    assert gate.circuit_open_seconds(APPID, "token") == 0  # normal fetches are not affected
    service.store.delete_if_current(APPID, stored.value)
    assert service.get_token(APPID).value == stored.value
