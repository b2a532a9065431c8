"""The shared token service against a real Redis and the WeChat sandbox."""

from __future__ import annotations

import multiprocessing
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import redis

from tests.conftest import RedisUrls
from tests.support.services import RedisServer
from worker.sandbox.admin import SandboxAdmin
from worker.settings import AppCredentials, TokenMode
from worker.tokens.errors import (
    ForceRefreshRefusedError,
    TokenRejectedAfterRefreshError,
    TokenStoreUnavailableError,
)
from worker.tokens.service import TokenService
from worker.tokens.store import TokenStore
from worker.wechat.client import WeChatClient

APPID = "wxtoken000000001"
SECRET = "token-test-secret-1"


def tokens_issued(sandbox: SandboxAdmin, endpoint: str) -> int:
    return int(sandbox.stats()["endpoints"].get(endpoint, {}).get("tokens_issued", 0))


def endpoint_calls(sandbox: SandboxAdmin, endpoint: str) -> int:
    return int(sandbox.stats()["endpoints"].get(endpoint, {}).get("calls", 0))


def build_service(
    redis_url: str, api_base: str, *, mode: TokenMode = "classic", **options: Any
) -> TokenService:
    client = redis.Redis.from_url(redis_url, socket_timeout=2, socket_connect_timeout=1)
    return TokenService(
        store=TokenStore(client, mode=mode),
        client=WeChatClient(api_base, timeout=(1.0, 5.0)),
        apps={APPID: AppCredentials(APPID, SECRET)},
        mode=mode,
        **options,
    )


@pytest.fixture
def sandbox_app(sandbox: SandboxAdmin) -> SandboxAdmin:
    sandbox.register_app(APPID, SECRET)
    return sandbox


@pytest.fixture
def make_service(redis_urls: RedisUrls, sandbox_app: SandboxAdmin) -> Iterator[Callable[..., TokenService]]:
    built: list[TokenService] = []

    def make(**options: Any) -> TokenService:
        service = build_service(redis_urls.redis_url, sandbox_app.base_url, **options)
        built.append(service)
        return service

    yield make
    for service in built:
        service.client.close()


def _read_token_in_process(redis_url: str, api_base: str, barrier: Any, results: Any) -> None:
    service = build_service(redis_url, api_base)
    barrier.wait(timeout=30)
    results.put(service.get_token(APPID).value)


def test_cold_start_twenty_concurrent_processes_cause_one_fetch(
    redis_urls: RedisUrls, sandbox_app: SandboxAdmin
) -> None:
    sandbox_app.configure(latency_ms={"token": 200})  # widen the race window
    context = multiprocessing.get_context("spawn")
    barrier = context.Barrier(20)
    results = context.Queue()
    readers = [
        context.Process(
            target=_read_token_in_process, args=(redis_urls.redis_url, sandbox_app.base_url, barrier, results)
        )
        for _ in range(20)
    ]
    for reader in readers:
        reader.start()
    # Spawning twenty interpreters is slow on a busy two-core machine; the bound is generous.
    values = [results.get(timeout=180) for _ in readers]
    for reader in readers:
        reader.join(timeout=30)
    assert all(reader.exitcode == 0 for reader in readers)
    assert len(set(values)) == 1
    assert tokens_issued(sandbox_app, "token") == 1


def test_readers_reuse_the_stored_token(
    make_service: Callable[..., TokenService], sandbox_app: SandboxAdmin
) -> None:
    service = make_service()
    first = service.get_token(APPID)
    assert all(service.get_token(APPID).value == first.value for _ in range(50))
    assert tokens_issued(sandbox_app, "token") == 1


def test_a_process_reuses_its_token_for_the_local_window_then_reads_the_store_again(
    make_service: Callable[..., TokenService], sandbox_app: SandboxAdmin
) -> None:
    now = [time.time()]
    worker = make_service(local_reuse_seconds=5.0, clock=lambda: now[0])
    beat = make_service()
    first = worker.get_token(APPID)
    replaced = beat.refresh(APPID)  # classic: a new token; the old one keeps working for a while
    assert replaced.value != first.value
    now[0] += 4.0
    assert worker.get_token(APPID).value == first.value  # inside the window: no store read
    now[0] += 1.5
    assert worker.get_token(APPID).value == replaced.value  # window over: the store's token
    assert tokens_issued(sandbox_app, "token") == 2


def test_a_reused_token_that_wechat_rejects_is_replaced_by_the_stored_one_without_a_fetch(
    make_service: Callable[..., TokenService], sandbox_app: SandboxAdmin
) -> None:
    worker = make_service(local_reuse_seconds=30.0)
    beat = make_service()
    stale = worker.get_token(APPID)
    sandbox_app.revoke_tokens(APPID)  # the worker's copy is dead from now on
    fresh = beat.refresh(APPID)
    code = sandbox_app.mint_phone_code(APPID)
    seen: list[str] = []

    def exchange(token: str) -> str:
        seen.append(token)
        return worker.client.get_phone_number(access_token=token, code=code).pure_phone_number

    assert worker.call_with_token(APPID, exchange)
    assert seen == [stale.value, fresh.value]  # one rejection, then the token beat stored
    assert tokens_issued(sandbox_app, "token") == 2  # no fetch of the worker's own
    assert worker.get_token(APPID).value == fresh.value  # and it reuses that one from now on


def test_a_stored_token_fetched_before_the_revocation_is_replaced_not_blamed_on_the_configuration(
    make_service: Callable[..., TokenService], sandbox_app: SandboxAdmin
) -> None:
    """A refresh that ran while the app's tokens were revoked stored a token revoked with the rest:
    it was not fetched after the rejection, so its rejection is not a configuration error (the
    demo met this under load: two jobs failed ``wechat_config_error``)."""
    worker = make_service(local_reuse_seconds=30.0)
    beat = make_service()
    stale = worker.get_token(APPID)
    raced = beat.refresh(APPID)  # fetched just before the revocation
    sandbox_app.revoke_tokens(APPID)  # both are dead from now on
    code = sandbox_app.mint_phone_code(APPID)
    seen: list[str] = []

    def exchange(token: str) -> str:
        seen.append(token)
        return worker.client.get_phone_number(access_token=token, code=code).pure_phone_number

    assert worker.call_with_token(APPID, exchange)
    assert seen[:2] == [stale.value, raced.value] and len(seen) == 3
    assert tokens_issued(sandbox_app, "token") == 3  # one fetch after the rejection, no more
    assert worker.get_token(APPID).value == seen[2]


def test_refresh_timing_follows_the_expires_in_wechat_returned(
    make_service: Callable[..., TokenService], sandbox_app: SandboxAdmin
) -> None:
    sandbox_app.configure(token_lifetime_seconds=3, grace_seconds=2)
    service = make_service(refresh_fraction=0.5)
    token = service.get_token(APPID)
    assert token.expires_in == 3
    assert token.refresh_at - token.fetched_at == pytest.approx(1.5)
    assert service.refresh_if_due(APPID).status == "fresh"
    time.sleep(max(0.0, token.refresh_at - time.time()) + 0.05)
    outcome = service.refresh_if_due(APPID)
    assert outcome.status == "refreshed"
    assert service.get_token(APPID).value != token.value
    assert tokens_issued(sandbox_app, "token") == 2


def test_an_older_refresh_finishing_late_cannot_overwrite_a_newer_token(
    make_service: Callable[..., TokenService], sandbox_app: SandboxAdmin
) -> None:
    slow = make_service(lease_seconds=0.3)
    fast = make_service(lease_seconds=10)
    sandbox_app.inject_fault("token", latency_ms=1500)  # only the first fetch (the slow one) waits
    outcome: dict[str, Any] = {}

    def slow_refresh() -> None:
        try:
            outcome["slow"] = slow.refresh(APPID)
        except Exception as error:  # the slow refresher may give up waiting; that is fine
            outcome["slow_error"] = error

    worker = threading.Thread(target=slow_refresh)
    worker.start()
    time.sleep(0.6)  # the slow refresher's lease has lapsed; it is still waiting on WeChat
    newer = fast.refresh(APPID)
    worker.join(timeout=20)
    assert not worker.is_alive()
    stored = fast.store.read(APPID)
    assert stored is not None
    assert stored.value == newer.value, "the late, older refresh overwrote the newer token"
    assert tokens_issued(sandbox_app, "token") == 2


def test_revoked_token_one_refresh_then_the_call_succeeds(
    make_service: Callable[..., TokenService], sandbox_app: SandboxAdmin
) -> None:
    services = [make_service() for _ in range(6)]
    services[0].get_token(APPID)
    sandbox_app.revoke_tokens(APPID)
    codes = [sandbox_app.mint_phone_code(APPID) for _ in services]
    barrier = threading.Barrier(len(services))
    phones: list[str] = []
    errors: list[BaseException] = []

    def call(service: TokenService, code: str) -> None:
        def exchange(token: str) -> str:
            return service.client.get_phone_number(access_token=token, code=code).pure_phone_number

        barrier.wait(timeout=10)
        try:
            phones.append(service.call_with_token(APPID, exchange))
        except BaseException as error:
            errors.append(error)

    threads = [threading.Thread(target=call, args=pair) for pair in zip(services, codes, strict=True)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
    assert errors == []
    assert len(phones) == len(services)
    assert tokens_issued(sandbox_app, "token") == 2  # the first token and exactly one refresh


def test_a_token_rejected_again_after_refresh_is_an_operator_error_not_a_loop(
    make_service: Callable[..., TokenService], sandbox_app: SandboxAdmin
) -> None:
    service = make_service()
    service.get_token(APPID)
    sandbox_app.inject_fault("phone", errcode=40001, times=5)
    code = sandbox_app.mint_phone_code(APPID)
    with pytest.raises(TokenRejectedAfterRefreshError):
        service.call_with_token(
            APPID, lambda token: service.client.get_phone_number(access_token=token, code=code)
        )
    assert endpoint_calls(sandbox_app, "phone") == 2  # the call and exactly one retry
    assert tokens_issued(sandbox_app, "token") == 2


def test_redis_down_means_no_token_fetch_and_recovery_without_restart(
    redis_server: RedisServer, make_service: Callable[..., TokenService], sandbox_app: SandboxAdmin
) -> None:
    service = make_service()
    redis_server.stop()
    try:
        for _ in range(3):
            with pytest.raises(TokenStoreUnavailableError):
                service.get_token(APPID)
        assert endpoint_calls(sandbox_app, "token") == 0
    finally:
        redis_server.start()
    assert service.get_token(APPID).value
    assert tokens_issued(sandbox_app, "token") == 1


def test_stable_mode_uses_normal_mode_and_shares_one_token(
    make_service: Callable[..., TokenService], sandbox_app: SandboxAdmin
) -> None:
    first = make_service(mode="stable")
    token = first.get_token(APPID)
    first.store.delete_if_current(APPID, token.value)
    again = make_service(mode="stable").get_token(APPID)
    assert again.value == token.value  # normal mode hands back the still-valid token
    assert tokens_issued(sandbox_app, "stable_token") == 1


def test_a_stable_token_is_refreshed_once_per_lifetime_inside_the_renewal_window(
    make_service: Callable[..., TokenService], sandbox_app: SandboxAdmin
) -> None:
    now = [time.time()]
    service = make_service(mode="stable", refresh_fraction=0.9, clock=lambda: now[0])
    token = service.get_token(APPID)
    assert token.expires_in == 7200
    # Not at 0.9 of the lifetime (a call then returns the same token): 4 minutes before expiry.
    assert token.refresh_at - token.fetched_at == pytest.approx(7200 - 240)

    def advance(seconds: float) -> None:
        now[0] += seconds
        sandbox_app.advance_clock(seconds)

    advance(6500)  # past 0.9 of the lifetime
    assert service.refresh_if_due(APPID).status == "fresh"
    advance(470)  # 230 s left: inside WeChat's last-5-minutes renewal window
    assert service.refresh_if_due(APPID).status == "refreshed"
    assert service.get_token(APPID).value != token.value
    assert endpoint_calls(sandbox_app, "stable_token") == 2  # the first token and one renewal


def test_force_refresh_respects_spacing_and_the_daily_budget(
    make_service: Callable[..., TokenService], sandbox_app: SandboxAdmin
) -> None:
    service = make_service(mode="stable")
    before = service.get_token(APPID)
    forced = service.refresh(APPID, force=True)
    assert forced.value != before.value
    with pytest.raises(ForceRefreshRefusedError, match="30s"):
        service.refresh(APPID, force=True)
    budget = service.store.force_budget(APPID)
    assert budget.used_today == 1
    assert budget.spacing_active
    # Spend the rest of today's budget by hand (20 a day), with the spacing window cleared.
    for _ in range(19):
        service.store._redis.delete(f"wxphone:token-force-last:{APPID}")
        assert service.store.spend_force_refresh(APPID, daily_limit=20, spacing_seconds=30) > 0
    service.store._redis.delete(f"wxphone:token-force-last:{APPID}")
    with pytest.raises(ForceRefreshRefusedError, match="20 force refreshes"):
        service.refresh(APPID, force=True)


def test_redis_keys_name_the_appid_but_never_the_secret_or_token(
    make_service: Callable[..., TokenService], redis_urls: RedisUrls
) -> None:
    service = make_service()
    token = service.get_token(APPID)
    with redis.Redis.from_url(redis_urls.redis_url, decode_responses=True) as conn:
        keys = [str(key) for key in conn.keys("*")]
    assert keys and all(APPID in key for key in keys)
    assert not any(SECRET in key or token.value in key for key in keys)
