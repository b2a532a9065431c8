"""Which worker processes are alive: one renewable lease per process (a *runner*) in Redis.

A phone job in ``running`` names the runner that claimed it (``phone_jobs.claimed_by``). Another
delivery of the same job must not present the code while that run may still be going: kombu puts
every unacknowledged message of a dropped broker channel back on the queue, marked
``redelivered``, even while its task still runs, so ``redelivered`` only means "delivered
before". A delivery that finds its job running takes it over only when the claiming run is
provably over:

* the claiming runner's lease has lapsed (the process died, or lost Redis for longer than a
  lease), or a prefork worker saw the pool child running it die and released its lease; or
* the claim is this very process's, and no run of the job is active in it (an earlier run here
  ended after its claim, e.g. on a database error); or
* the claim is older than any run can last (``stale_claim_seconds``), the rule that applies
  when liveness is unknown.

Self-fencing keeps the first rule safe when a live process loses Redis: a runner presents a code
only while its last renewal is recent enough that the call ends before its lease could lapse
(:meth:`RunnerLease.may_call`). A runner that cannot renew stops presenting codes, and its jobs
retry later.

Keys name a random runner id only::

    wxphone:runner:{host}/{pid}/{random}   str   present while the runner lives (PX expiry)
"""

from __future__ import annotations

import hashlib
import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress

import redis

__all__ = ["RunnerLease", "release_dead_runners", "runner_prefix"]

log = logging.getLogger(__name__)

KEY_PREFIX = "wxphone:runner:"
#: A lease is renewed this many times per lease period.
RENEWALS_PER_LEASE = 8


def runner_prefix(pid: int) -> str:
    """The runner-id prefix of process ``pid`` on this host (its parent can find its lease)."""
    host = hashlib.sha256(socket.gethostname().encode()).hexdigest()[:12]
    return f"{host}/{pid}/"


class RunnerLease:
    """The liveness lease of this process, and the set of jobs running in it.

    ``call_budget_seconds`` is the longest one WeChat call may take (connect + read timeout, plus
    a margin): a call may start only while the lease has at least that long to run.
    """

    def __init__(
        self,
        client: redis.Redis,
        *,
        lease_seconds: float,
        call_budget_seconds: float,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if lease_seconds - call_budget_seconds < 2 * lease_seconds / RENEWALS_PER_LEASE:
            raise ValueError("the lease must outlast a WeChat call by two renewal intervals")
        self.runner_id = runner_prefix(os.getpid()) + uuid.uuid4().hex[:16]
        self.lease_seconds = lease_seconds
        self.renew_interval_seconds = lease_seconds / RENEWALS_PER_LEASE
        #: How long after its last renewal a runner may still start a WeChat call.
        self.call_window_seconds = lease_seconds - call_budget_seconds
        self._redis = client
        self._clock = clock
        self._renewed_at: float | None = None
        #: job id -> runs of that job active in this process right now.
        self._active: dict[str, int] = {}
        self._lock = threading.Lock()
        self._start_lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._stopped = threading.Event()
        self._renewal_failing = False

    @property
    def key(self) -> str:
        return KEY_PREFIX + self.runner_id

    def start(self) -> None:
        """Take the lease (first renewal) and keep renewing it from a daemon thread; idempotent.

        Returns only after the first renewal was attempted, so no claim of this process ever
        names a runner that has not tried to take its lease.
        """
        with self._start_lock:
            if self._thread is not None:
                return
            self.renew()
            thread = threading.Thread(target=self._renew_forever, name="wxphone-lease", daemon=True)
            thread.start()
            self._thread = thread

    def stop(self) -> None:
        """Stop renewing and give the lease up (a clean shutdown: no run of this process is left)."""
        self._stopped.set()
        with suppress(redis.RedisError):  # otherwise it lapses by itself
            self._redis.delete(self.key)

    def renew(self) -> bool:
        """Extend the lease once; False when Redis could not be reached."""
        sent_at = self._clock()  # before the command: the lease runs at least until sent_at + lease
        try:
            self._redis.set(self.key, "1", px=int(self.lease_seconds * 1000))
        except redis.RedisError:
            if not self._renewal_failing:
                log.warning("cannot renew this worker's liveness lease (Redis unreachable)")
            self._renewal_failing = True
            return False
        if self._renewal_failing:
            log.warning("liveness lease renewed again")
        self._renewal_failing = False
        self._renewed_at = sent_at
        return True

    def _renew_forever(self) -> None:
        while not self._stopped.wait(self.renew_interval_seconds):
            self.renew()

    def may_call(self) -> bool:
        """Whether a WeChat call started now ends while this process's lease surely holds."""
        renewed_at = self._renewed_at
        return renewed_at is not None and self._clock() - renewed_at < self.call_window_seconds

    def lapses_in_seconds(self, runner_id: str) -> float | None:
        """Seconds until ``runner_id``'s lease lapses unless renewed: 0 when it has lapsed (the
        runner is gone); None when Redis cannot say (treat the runner as alive)."""
        try:
            milliseconds = int(self._redis.pttl(KEY_PREFIX + runner_id))
        except redis.RedisError:
            return None
        if milliseconds == -2:  # no such key
            return 0.0
        if milliseconds < 0:  # no expiry: never set by a runner; trust it as alive
            return self.lease_seconds
        return milliseconds / 1000

    @contextmanager
    def running(self, job_id: str) -> Iterator[None]:
        """Count a run of ``job_id`` as active in this process for the block."""
        with self._lock:
            self._active[job_id] = self._active.get(job_id, 0) + 1
        try:
            yield
        finally:
            with self._lock:
                remaining = self._active[job_id] - 1
                if remaining:
                    self._active[job_id] = remaining
                else:
                    del self._active[job_id]

    def runs_here(self, job_id: str) -> int:
        """How many runs of ``job_id`` are active in this process (the asking one included)."""
        with self._lock:
            return self._active.get(job_id, 0)


def release_dead_runners(client: redis.Redis, pid: int) -> int:
    """Drop the leases of process ``pid`` on this host, which its parent saw die (a prefork pool
    child killed mid-task): its jobs may be taken over at once. Returns how many were dropped."""
    dropped = 0
    for key in client.scan_iter(match=KEY_PREFIX + runner_prefix(pid) + "*", count=1000):
        dropped += int(client.delete(key))
    return dropped
