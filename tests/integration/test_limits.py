"""The fleet-wide call gate in Redis: rate limit per window, 45011 pause, 45009 circuit."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import redis

from tests.conftest import RedisUrls
from worker.limits import (
    API_LOGIN,
    API_PHONE,
    CallGate,
    CircuitOpenError,
    LimitsUnavailableError,
    LocallyRateLimitedError,
)

APPID = "wxlimits00000001"
OTHER_APPID = "wxlimits00000002"
WINDOW_SECONDS = 60.0


class FrozenClock:
    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def client(redis_urls: RedisUrls) -> Iterator[redis.Redis]:
    with redis.Redis.from_url(redis_urls.redis_url) as conn:
        yield conn


def make_gate(
    client: redis.Redis, clock: FrozenClock, *, phone_limit: int = 0, open_reuse_seconds: float = 0.0
) -> CallGate:
    return CallGate(
        client,
        limits_per_window={API_PHONE: phone_limit},
        window_seconds=WINDOW_SECONDS,
        open_reuse_seconds=open_reuse_seconds,
        clock=clock,
    )


def test_the_limit_is_shared_by_every_gate_and_resets_with_the_window(client: redis.Redis) -> None:
    clock = FrozenClock(1_800_000_000.0 + 10)  # 10 s into a window
    workers = [make_gate(client, clock, phone_limit=5) for _ in range(3)]
    for index in range(5):
        workers[index % 3].acquire(APPID, API_PHONE)
    with pytest.raises(LocallyRateLimitedError) as held:
        workers[1].acquire(APPID, API_PHONE)
    assert held.value.wait_seconds == pytest.approx(WINDOW_SECONDS - 10, abs=0.01)
    workers[0].acquire(OTHER_APPID, API_PHONE)  # each app has its own budget
    workers[0].acquire(APPID, API_LOGIN)  # and each API (no login limit configured)
    clock.now += WINDOW_SECONDS  # the next window
    workers[2].acquire(APPID, API_PHONE)
    assert workers[2].state(APPID, API_PHONE).used_this_window == 1


def test_a_45011_pauses_the_app_for_the_whole_fleet_until_the_window_ends(client: redis.Redis) -> None:
    clock = FrozenClock(1_800_000_000.0 + 45)
    first, second = make_gate(client, clock), make_gate(client, clock)
    waited = first.pause_until_window_end(APPID, API_PHONE)
    assert waited == pytest.approx(15, abs=0.01)
    with pytest.raises(LocallyRateLimitedError) as held:
        second.acquire(APPID, API_PHONE)
    assert 0 < held.value.wait_seconds <= 15.01
    second.acquire(OTHER_APPID, API_PHONE)
    assert second.state(APPID, API_PHONE).paused_for_seconds > 0


def test_a_45009_opens_the_circuit_once_until_an_operator_closes_it(client: redis.Redis) -> None:
    clock = FrozenClock(1_800_000_000.0)
    first, second = make_gate(client, clock), make_gate(client, clock)
    assert first.open_circuit(APPID, API_PHONE) is True
    assert second.open_circuit(APPID, API_PHONE) is False  # only one opener raises the alert
    with pytest.raises(CircuitOpenError) as refused:
        second.acquire(APPID, API_PHONE)
    assert refused.value.error_code == "quota_exhausted"
    state = second.state(APPID, API_PHONE)
    assert 0 < state.circuit_open_for_seconds <= 24 * 3600  # until midnight Beijing time
    second.acquire(OTHER_APPID, API_PHONE)
    assert first.close_circuit(APPID, API_PHONE) is True
    second.acquire(APPID, API_PHONE)


def test_an_open_gate_is_trusted_for_the_reuse_window_by_other_processes_only(client: redis.Redis) -> None:
    clock = FrozenClock(1_800_000_000.0 + 10)
    first = make_gate(client, clock, open_reuse_seconds=1.0)
    second = make_gate(client, clock, open_reuse_seconds=1.0)
    second.acquire(APPID, API_PHONE)  # second found the gate open
    first.open_circuit(APPID, API_PHONE)
    with pytest.raises(CircuitOpenError):
        first.acquire(APPID, API_PHONE)  # the process that opened it stops at once
    clock.now += 0.5
    second.acquire(APPID, API_PHONE)  # still inside second's window: no Redis check
    clock.now += 0.6
    with pytest.raises(CircuitOpenError):
        second.acquire(APPID, API_PHONE)  # the window is over: it sees the circuit
    first.close_circuit(APPID, API_PHONE)
    first.acquire(APPID, API_PHONE)
    first.pause_until_window_end(APPID, API_PHONE)  # its own pause, too, applies at once
    with pytest.raises(LocallyRateLimitedError):
        first.acquire(APPID, API_PHONE)


def test_a_counted_limit_is_never_served_from_the_reuse_window(client: redis.Redis) -> None:
    clock = FrozenClock(1_800_000_000.0 + 10)
    gate = make_gate(client, clock, phone_limit=3, open_reuse_seconds=5.0)
    for _ in range(3):
        gate.acquire(APPID, API_PHONE)
    with pytest.raises(LocallyRateLimitedError):
        gate.acquire(APPID, API_PHONE)
    assert gate.state(APPID, API_PHONE).used_this_window == 4  # every call was counted


def test_gate_keys_name_only_appid_and_api(client: redis.Redis) -> None:
    gate = make_gate(client, FrozenClock(1_800_000_000.0), phone_limit=3)
    gate.acquire(APPID, API_PHONE)
    gate.pause_until_window_end(APPID, API_LOGIN)
    gate.open_circuit(OTHER_APPID, API_PHONE)
    keys = sorted(key.decode() if isinstance(key, bytes) else key for key in client.keys("wxphone:*"))
    assert keys == [
        f"wxphone:circuit:{OTHER_APPID}:phone",
        f"wxphone:limit:{APPID}:phone:{int(1_800_000_000.0 // WINDOW_SECONDS)}",
        f"wxphone:pause:{APPID}:login",
    ]


def test_an_unreachable_gate_means_retry_later() -> None:
    with redis.Redis(port=1, socket_connect_timeout=0.5) as unreachable:
        gate = make_gate(unreachable, FrozenClock(1_800_000_000.0))
        with pytest.raises(LimitsUnavailableError):
            gate.acquire(APPID, API_PHONE)
