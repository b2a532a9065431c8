"""A failing token endpoint costs the fleet one token call per backoff interval, not one per reader.

Outages (-1, timeouts) are damped by a backoff shared in Redis; configuration errors (a wrong
AppSecret, an IP whitelist, an HTTP 4xx from the base URL) raise one operator alert and stop
fetching until the configuration changes; a 45009 opens the token API's circuit. Real Redis
(the session's private server) and the real sandbox; several processes where it matters.
"""

from __future__ import annotations

import logging
import math
import multiprocessing
import re
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import redis

from tests.conftest import RedisUrls
from tests.support.processes import WXPHONE, base_environment
from tests.support.waiting import wait_for
from worker.errors import OperatorActionRequiredError, RetryLaterError, WxphoneError
from worker.limits import CallGate
from worker.sandbox.admin import SandboxAdmin
from worker.settings import AppCredentials
from worker.tokens.service import TokenService
from worker.tokens.store import TokenStore
from worker.wechat.client import WeChatClient
from worker.wechat.errors import WeChatQuotaExhaustedError

APPID = "wxfetchfail00001"
SECRET = "fetch-failure-test-secret-1"
WRONG_SECRET = "fetch-failure-wrong-secret-9"
READERS = 20
ALERT = "OPERATOR ALERT"


def stable_calls(sandbox: SandboxAdmin) -> dict[str, Any]:
    return dict(sandbox.stats()["endpoints"]["stable_token"])


def build(redis_url: str, api_base: str, *, secret: str = SECRET, **options: Any) -> TokenService:
    client = redis.Redis.from_url(redis_url, socket_timeout=2, socket_connect_timeout=1)
    return TokenService(
        store=TokenStore(client, mode="stable"),
        client=WeChatClient(api_base, timeout=(1.0, 5.0)),
        apps={APPID: AppCredentials(APPID, secret)},
        mode="stable",
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
        service = build(redis_urls.redis_url, sandbox_app.base_url, **options)
        built.append(service)
        return service

    yield make
    for service in built:
        service.client.close()


def alerts(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [
        record.getMessage()
        for record in caplog.records
        if record.levelno >= logging.ERROR and ALERT in record.getMessage()
    ]


def redis_contents(redis_url: str) -> str:
    """Every key and value in the token store, as one text."""
    parts: list[str] = []
    with redis.Redis.from_url(redis_url, decode_responses=True) as conn:
        for key in conn.keys("*"):
            kind = conn.type(key)
            value: object = (
                conn.hgetall(key) if kind == "hash" else conn.get(key) if kind == "string" else kind
            )
            parts.append(f"{key}={value}")
    return " ".join(parts)


def read_concurrently(services: list[TokenService]) -> list[tuple[object, float]]:
    """Every service reads the token at once; each result (token or error) with its duration."""
    barrier = threading.Barrier(len(services))
    results: list[tuple[object, float]] = []
    lock = threading.Lock()

    def read(service: TokenService) -> None:
        barrier.wait(timeout=10)
        started = time.monotonic()
        try:
            outcome: object = service.get_token(APPID)
        except Exception as error:
            outcome = error
        with lock:
            results.append((outcome, time.monotonic() - started))

    threads = [threading.Thread(target=read, args=(service,)) for service in services]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
    assert not any(thread.is_alive() for thread in threads)
    return results


def max_calls_within(elapsed_seconds: float, *, base_seconds: float = 1.0) -> int:
    """Most fetches a backoff of base, 2 x base, 4 x base ... allows within ``elapsed_seconds``:
    the k-th retry may come (2^k - 1) x base after the first call."""
    return int(math.floor(math.log2(elapsed_seconds / base_seconds + 1))) + 1


# -- outages: -1 and friends ------------------------------------------------------------------


def test_twenty_readers_during_an_outage_cause_one_token_call_and_fail_at_once(
    make_service: Callable[..., TokenService], sandbox_app: SandboxAdmin
) -> None:
    sandbox_app.inject_fault("stable_token", errcode=-1, times=1000)
    results = read_concurrently([make_service() for _ in range(READERS)])

    assert stable_calls(sandbox_app)["calls"] == 1, "each waiting reader fetched again"
    errors = [outcome for outcome, _ in results]
    assert all(isinstance(error, RetryLaterError) for error in errors), errors
    # Readers that met the recorded failure did not wait out the token wait (15 s) or call WeChat.
    assert max(duration for _, duration in results) < 5.0

    # Readers arriving later, within the backoff, fail at once without a call too.
    later = make_service()
    started = time.monotonic()
    with pytest.raises(RetryLaterError) as caught:
        later.get_token(APPID)
    assert time.monotonic() - started < 0.5
    assert caught.value.error_code == "token_unavailable"
    assert stable_calls(sandbox_app)["calls"] == 1

    # The outage ends: once the backoff runs out, one fetch serves everyone and clears it.
    sandbox_app.clear_faults()
    token = wait_for(lambda: _token_or_none(later), timeout_seconds=10, what="a token after the outage")
    assert all(make_service().get_token(APPID).value == token for _ in range(3))
    assert stable_calls(sandbox_app)["tokens_issued"] == 1


def _token_or_none(service: TokenService) -> str | None:
    try:
        return service.get_token(APPID).value
    except RetryLaterError:
        return None


def _read_for(redis_url: str, api_base: str, threads: int, start: float, until: float, results: Any) -> None:
    """One process of readers: from ``start`` to ``until`` (wall clock) ``threads`` threads call
    get_token again and again, as job retries do, and report what they got."""
    services = [build(redis_url, api_base) for _ in range(threads)]
    time.sleep(max(0.0, start - time.time()))
    outcomes: list[str] = []
    lock = threading.Lock()

    def loop(service: TokenService) -> None:
        while time.time() < until:
            try:
                service.get_token(APPID)
                outcome = "token"
            except WxphoneError as error:
                outcome = f"{type(error).__name__}:{isinstance(error, RetryLaterError)}"
            with lock:
                outcomes.append(outcome)
            time.sleep(0.05)

    workers = [threading.Thread(target=loop, args=(service,)) for service in services]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(timeout=60)
    results.put(outcomes)


def test_an_outage_costs_the_fleet_one_token_call_per_backoff_interval(
    redis_urls: RedisUrls, sandbox_app: SandboxAdmin
) -> None:
    """Four processes of five readers each keep asking for a token while WeChat answers -1."""
    sandbox_app.inject_fault("stable_token", errcode=-1, times=10_000)
    context = multiprocessing.get_context("spawn")
    results = context.Queue()
    # Spawning interpreters is slow on a busy machine: everyone starts reading at one wall time.
    start = time.time() + 8.0
    duration = 4.0
    processes = [
        context.Process(
            target=_read_for,
            args=(redis_urls.redis_url, sandbox_app.base_url, READERS // 4, start, start + duration, results),
        )
        for _ in range(4)
    ]
    for process in processes:
        process.start()
    outcomes = [outcome for _ in processes for outcome in results.get(timeout=120)]
    for process in processes:
        process.join(timeout=30)
    assert all(process.exitcode == 0 for process in processes)

    calls = stable_calls(sandbox_app)["calls"]
    reads = len(outcomes)
    # Every read happened between `start` and `start + duration` (a process that came up late
    # simply read for less of it).
    allowed = max_calls_within(duration)
    print(f"\n{reads} reads by {READERS} readers in 4 processes: {calls} token calls (allowed {allowed})")
    assert calls <= allowed, "readers fetched during the backoff"
    assert calls >= 2, "nobody tried again after the backoff ran out"
    assert reads > 10 * READERS
    assert set(outcomes) <= {"TokenFetchBackoffError:True"}, set(outcomes)


# -- configuration errors ---------------------------------------------------------------------


def test_a_wrong_secret_costs_one_token_call_and_one_alert_until_the_secret_changes(
    make_service: Callable[..., TokenService],
    sandbox_app: SandboxAdmin,
    redis_urls: RedisUrls,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING)
    results = read_concurrently([make_service(secret=WRONG_SECRET) for _ in range(READERS)])

    calls = stable_calls(sandbox_app)
    assert (calls["calls"], calls["errcodes"]) == (1, {"40125": 1})
    errors = [outcome for outcome, _ in results]
    assert all(isinstance(error, OperatorActionRequiredError) for error in errors), errors
    assert {error.error_code for error in errors if isinstance(error, WxphoneError)} == {
        "wechat_config_error"
    }
    assert len(alerts(caplog)) == 1, alerts(caplog)
    assert "40125" in alerts(caplog)[0] and APPID in alerts(caplog)[0]

    # Every later read, from any process, fails at once without a call while the secret is the same,
    # and raises no second alert.
    for _ in range(5):
        with pytest.raises(OperatorActionRequiredError):
            make_service(secret=WRONG_SECRET).get_token(APPID)
    assert stable_calls(sandbox_app)["calls"] == 1
    assert len(alerts(caplog)) == 1

    # Neither secret reached Redis, in a key or a value.
    stored = redis_contents(redis_urls.redis_url)
    assert SECRET not in stored and WRONG_SECRET not in stored

    # The configuration is fixed (the right secret is deployed): fetching resumes at once.
    fixed = make_service(secret=SECRET)
    assert fixed.get_token(APPID).value
    calls = stable_calls(sandbox_app)
    assert (calls["calls"], calls["tokens_issued"]) == (2, 1)
    assert len(alerts(caplog)) == 1


def test_an_http_4xx_from_the_token_endpoint_is_a_configuration_error_with_one_alert(
    make_service: Callable[..., TokenService], sandbox_app: SandboxAdmin, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING)
    sandbox_app.inject_fault("stable_token", http_status=403, times=1000)  # a gateway refusing us
    results = read_concurrently([make_service() for _ in range(5)])

    assert stable_calls(sandbox_app)["calls"] == 1
    errors = [outcome for outcome, _ in results]
    assert all(isinstance(error, OperatorActionRequiredError) for error in errors), errors
    assert {error.error_code for error in errors if isinstance(error, WxphoneError)} == {
        "wechat_config_error"
    }
    assert len(alerts(caplog)) == 1
    assert "403" in alerts(caplog)[0]


def test_after_the_retry_interval_a_configuration_error_is_tried_again(
    make_service: Callable[..., TokenService], sandbox_app: SandboxAdmin, caplog: pytest.LogCaptureFixture
) -> None:
    """A whitelist fixed in WeChat's console changes nothing here: the record lapses on its own."""
    caplog.set_level(logging.WARNING)
    sandbox_app.inject_fault("stable_token", errcode=40164)  # IP not whitelisted, once
    service = make_service(config_error_retry_seconds=1.0)
    with pytest.raises(OperatorActionRequiredError):
        service.get_token(APPID)
    with pytest.raises(OperatorActionRequiredError):
        service.get_token(APPID)
    assert stable_calls(sandbox_app)["calls"] == 1

    def fetched() -> bool:
        try:
            return bool(service.get_token(APPID).value)
        except OperatorActionRequiredError:
            return False  # still recorded: no call was made

    wait_for(fetched, timeout_seconds=5, what="a fetch once the record lapsed")
    assert stable_calls(sandbox_app)["calls"] == 2
    assert len(alerts(caplog)) == 1


def test_wxphone_token_clear_error_lets_fetching_resume(
    make_service: Callable[..., TokenService], sandbox_app: SandboxAdmin, redis_urls: RedisUrls
) -> None:
    sandbox_app.inject_fault("stable_token", errcode=40164)
    service = make_service()
    with pytest.raises(OperatorActionRequiredError):
        service.get_token(APPID)
    env = base_environment(
        redis_url=redis_urls.redis_url,
        wechat_api_base=sandbox_app.base_url,
        apps=f"{APPID}:{SECRET}",
    )
    shown = subprocess.run(
        [*WXPHONE, "token", "show", "--appid", APPID], env=env, capture_output=True, text=True, timeout=60
    )
    assert shown.returncode == 0, shown.stderr
    assert "40164" in shown.stdout
    cleared = subprocess.run(
        [*WXPHONE, "token", "clear-error", APPID], env=env, capture_output=True, text=True, timeout=60
    )
    assert cleared.returncode == 0, cleared.stderr
    assert SECRET not in cleared.stdout + cleared.stderr
    assert service.get_token(APPID).value
    assert stable_calls(sandbox_app)["calls"] == 2


# -- 45009 on the token endpoint --------------------------------------------------------------


def test_45009_on_the_token_endpoint_opens_the_token_circuit_not_the_phone_one(
    make_service: Callable[..., TokenService],
    sandbox_app: SandboxAdmin,
    redis_urls: RedisUrls,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING)
    gate = CallGate(redis.Redis.from_url(redis_urls.redis_url), limits_per_window={})
    sandbox_app.inject_fault("stable_token", errcode=45009, times=1000)
    results = read_concurrently([make_service(gate=gate) for _ in range(10)])

    assert stable_calls(sandbox_app)["calls"] == 1
    errors = [outcome for outcome, _ in results]
    assert all(isinstance(error, OperatorActionRequiredError) for error in errors), errors
    assert {error.error_code for error in errors if isinstance(error, WxphoneError)} == {"quota_exhausted"}
    # Not the business API's quota error: a phone job meeting it must not close phone calls.
    assert not any(isinstance(error, WeChatQuotaExhaustedError) for error in errors)
    assert gate.state(APPID, "token").circuit_open_for_seconds > 0
    assert gate.state(APPID, "phone").circuit_open_for_seconds == 0
    assert len(alerts(caplog)) == 1
    assert re.search(r"\btoken API\b", alerts(caplog)[0])
    assert not re.search(r"\bphone\b", alerts(caplog)[0])

    # Readers meeting the open circuit fail fast without calling WeChat; closing it resumes fetching.
    with pytest.raises(OperatorActionRequiredError):
        make_service(gate=gate).get_token(APPID)
    assert stable_calls(sandbox_app)["calls"] == 1
    sandbox_app.clear_faults()
    assert gate.close_circuit(APPID, "token")
    assert make_service(gate=gate).get_token(APPID).value
    assert stable_calls(sandbox_app)["calls"] == 2
    assert len(alerts(caplog)) == 1
