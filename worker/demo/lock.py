"""One demo at a time per Redis database: two runs sharing a broker would run each other's jobs.

The lock is a key in the demo's broker database naming the host and the processes that hold it.
A running demo renews its expiry; ``--keep-running`` makes it permanent, naming the sandbox,
worker and beat, so a later run can tell a live holder from a dead one. On the same host, a lock
whose processes are all gone is taken over.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import threading

import redis

__all__ = ["DemoLock", "DemoLockHeldError"]

#: Outside the patterns the demo deletes (``wxphone*``), so clearing keys never drops the lock.
LOCK_KEY = "demo-lock:wxphone"
LOCK_TTL_MS = 30_000
RENEW_EVERY_SECONDS = 5.0

# Renew or delete the lock only while it is still ours.
_RENEW = (
    "if redis.call('get', KEYS[1]) == ARGV[1] then "
    "return redis.call('pexpire', KEYS[1], ARGV[2]) end return 0"
)
_RELEASE = "if redis.call('get', KEYS[1]) == ARGV[1] then return redis.call('del', KEYS[1]) end return 0"
_KEEP = (
    "if redis.call('get', KEYS[1]) == ARGV[1] then redis.call('set', KEYS[1], ARGV[2]) return 1 end return 0"
)


class DemoLockHeldError(RuntimeError):
    """Another demo uses the same Redis database."""


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class DemoLock:
    """The lock of one demo run on ``client``'s database."""

    def __init__(self, client: redis.Redis) -> None:
        self.client = client
        self.host = socket.gethostname()
        self.value = self._encode([os.getpid()])
        self._stop = threading.Event()
        self._renewer: threading.Thread | None = None

    def _encode(self, pids: list[int]) -> str:
        return json.dumps({"host": self.host, "pids": pids}, sort_keys=True)

    def acquire(self) -> None:
        """Take the lock, or take over one whose holders are gone; else :class:`DemoLockHeldError`."""
        if self.client.set(LOCK_KEY, self.value, nx=True, px=LOCK_TTL_MS):
            self._start_renewing()
            return
        raw = self.client.get(LOCK_KEY)
        holder = json.loads(raw) if raw else None
        if holder is not None and holder.get("host") == self.host:
            pids = [int(pid) for pid in holder.get("pids", [])]
            if not any(_pid_alive(pid) for pid in pids):
                self.client.set(LOCK_KEY, self.value, px=LOCK_TTL_MS)
                self._start_renewing()
                return
            groups = " ".join(f"-{pid}" for pid in pids)
            raise DemoLockHeldError(
                f"another demo on this host uses these Redis databases (pids {', '.join(map(str, pids))}); "
                f"wait for it to end, or stop it: kill -TERM -- {groups}"
            )
        if holder is None:  # expired between our two calls
            self.acquire()
            return
        raise DemoLockHeldError(f"a demo on host {holder.get('host')} uses these Redis databases")

    def _start_renewing(self) -> None:
        self._renewer = threading.Thread(target=self._renew, name="demo-lock", daemon=True)
        self._renewer.start()

    def _renew(self) -> None:
        while not self._stop.wait(RENEW_EVERY_SECONDS):
            with contextlib.suppress(redis.RedisError):
                self.client.eval(_RENEW, 1, LOCK_KEY, self.value, LOCK_TTL_MS)

    def _stop_renewing(self) -> None:
        self._stop.set()
        if self._renewer is not None:
            self._renewer.join(timeout=2)

    def keep_for(self, pids: list[int]) -> None:
        """Hold the lock without expiry for processes left running (``--keep-running``)."""
        self._stop_renewing()
        with contextlib.suppress(redis.RedisError):
            self.client.eval(_KEEP, 1, LOCK_KEY, self.value, self._encode(pids))

    def release(self) -> None:
        self._stop_renewing()
        with contextlib.suppress(redis.RedisError):
            self.client.eval(_RELEASE, 1, LOCK_KEY, self.value)
