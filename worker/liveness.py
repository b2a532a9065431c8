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
retry later. A process whose lease lapsed anyway (paused for longer than a lease: a VM freeze, a
long stop) or whose key vanished takes a **new runner id** when it renews: its claims under the
old id belong to a runner that is gone, may be taken over, and none of its runs under the old id
may present a code any more.

Runner ids carry a random nonce of the worker (shared by a prefork worker and its pool
children, which inherit it), so a prefork worker releasing a dead child's lease by pid never
touches a process of another worker that has the same pid (another PID namespace, a container on
the host's network).

Tasks without a job row (logins) claim their runs in Redis the same way (:class:`RunClaims`).

Keys name random runner ids and task ids only::

    wxphone:runner:{host}/{worker nonce}/{pid}/{random}   str   present while the runner lives (PX)
    wxphone:run:{task id}                                  str   the runner running that task (PX)
    wxphone:run-ended:{job id}                             str   a claim whose run ended early (EX)
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

from worker.errors import RetryLaterError

__all__ = ["LivenessUnavailableError", "RunClaims", "RunnerLease", "release_dead_runners", "runner_prefix"]

log = logging.getLogger(__name__)

KEY_PREFIX = "wxphone:runner:"
RUN_KEY_PREFIX = "wxphone:run:"
RUN_ENDED_KEY_PREFIX = "wxphone:run-ended:"
#: How long the note of a run that ended without closing its job is kept (longer than any code).
RUN_ENDED_NOTE_SECONDS = 600
#: A lease is renewed this many times per lease period.
RENEWALS_PER_LEASE = 8
#: Chosen once per worker: a prefork worker's pool children inherit it when they are forked.
WORKER_NONCE = uuid.uuid4().hex[:8]

# Take a run claim from its holder only if the holder is still the one that was found gone.
_TAKE_OVER_RUN = """
local holder = redis.call('GET', KEYS[1])
if holder == false or holder == ARGV[2] then
  redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[3])
  return 1
end
return 0
"""
_RELEASE_RUN = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
"""


class LivenessUnavailableError(RetryLaterError):
    """Redis, which holds the run claims, cannot be reached: no call is made; retry later."""

    error_code = "liveness_unavailable"


def runner_prefix(pid: int) -> str:
    """The runner-id prefix of process ``pid`` of this worker on this host (its parent can find
    its lease, and only its)."""
    host = hashlib.sha256(socket.gethostname().encode()).hexdigest()[:12]
    return f"{host}/{WORKER_NONCE}/{pid}/"


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
        self.runner_id = self._new_runner_id()
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
        self._renew_lock = threading.Lock()
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

    @staticmethod
    def _new_runner_id() -> str:
        return runner_prefix(os.getpid()) + uuid.uuid4().hex[:16]

    def renew(self) -> bool:
        """Extend the lease once; False when Redis could not be reached.

        If the lease may have lapsed since the last renewal (it is older than a lease, or its key
        is gone), this process becomes a new runner first: whatever it claimed before may have
        been taken over.
        """
        sent_at = self._clock()  # before the command: the lease runs at least until sent_at + lease
        with self._renew_lock:
            renewed_at = self._renewed_at
            if renewed_at is not None and sent_at - renewed_at >= self.lease_seconds:
                self._rotate("it was not renewed for a whole lease")
            try:
                previous = self._redis.set(self.key, "1", px=int(self.lease_seconds * 1000), get=True)
                if previous is None and renewed_at is not None:
                    # The key vanished under a lease we held (Redis lost it, or it was released).
                    self._rotate("its key was gone")
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

    def _rotate(self, why: str) -> None:
        """Become a new runner: claims and runs under the old id may no longer present codes."""
        self.runner_id = self._new_runner_id()
        log.warning("liveness lease lapsed (%s): this process continues as a new runner", why)

    def _renew_forever(self) -> None:
        while not self._stopped.wait(self.renew_interval_seconds):
            self.renew()

    def may_call(self, runner_id: str) -> bool:
        """Whether a run that claimed as ``runner_id`` may start a WeChat call now: this process is
        still that runner (its lease never lapsed since) and the call ends while the lease surely
        holds."""
        renewed_at = self._renewed_at
        return (
            runner_id == self.runner_id
            and renewed_at is not None
            and self._clock() - renewed_at < self.call_window_seconds
        )

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

    def note_run_ended(self, job_id: str, claim: str) -> None:
        """Say that the run holding ``claim`` (``{runner}#{attempt}``) of ``job_id`` ended without
        closing the job or releasing its claim (its database was unreachable): another delivery
        may take the job over at once although this process lives on."""
        with suppress(redis.RedisError):  # then the claim goes stale by itself
            self._redis.set(RUN_ENDED_KEY_PREFIX + job_id, claim, ex=RUN_ENDED_NOTE_SECONDS)

    def ended_run(self, job_id: str) -> str | None:
        """The claim of ``job_id`` whose run was noted as ended early, if any."""
        try:
            raw = self._redis.get(RUN_ENDED_KEY_PREFIX + job_id)
        except redis.RedisError:
            return None
        return raw.decode() if isinstance(raw, bytes) else raw

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


class RunClaims:
    """A claim per task run in Redis, for tasks without a job row (logins): at most one run of a
    task may be at WeChat, whatever copies of its message are delivered, with the same takeover
    rule as phone jobs (the holder's lease lapsed, or the holder is this process with no run of
    the task active in it)."""

    def __init__(self, client: redis.Redis, lease: RunnerLease, *, ttl_seconds: float) -> None:
        self._redis = client
        self.lease = lease
        self.ttl_seconds = ttl_seconds
        self._take_over = client.register_script(_TAKE_OVER_RUN)
        self._release = client.register_script(_RELEASE_RUN)

    def claim(self, task_id: str, runner_id: str) -> float | None:
        """Claim the task for ``runner_id``: None when this run holds it now, else how long to wait
        before looking again (another live run holds it). :class:`LivenessUnavailableError` when
        Redis cannot be reached."""
        key = RUN_KEY_PREFIX + task_id
        ttl_ms = int(self.ttl_seconds * 1000)
        try:
            if self._redis.set(key, runner_id, nx=True, px=ttl_ms):
                return None
            raw = self._redis.get(key)
            holder = raw.decode() if isinstance(raw, bytes) else raw
            if holder is None or holder == runner_id and self.lease.runs_here(task_id) <= 1:
                gone = True
            elif holder == runner_id:
                return self.lease.lease_seconds / 2  # another run of it is active here
            else:
                lapses_in = self.lease.lapses_in_seconds(holder)
                if lapses_in is None:
                    raise redis.RedisError("lease unknown")
                gone = lapses_in == 0.0
                if not gone:
                    return lapses_in + 0.5
            if self._take_over(keys=[key], args=[runner_id, holder or "", ttl_ms]):
                return None
            return 1.0  # another copy took it first
        except redis.RedisError:
            raise LivenessUnavailableError("run claims (Redis) unreachable") from None

    def release(self, task_id: str, runner_id: str) -> None:
        """Give the claim up if this runner still holds it (the run is over)."""
        with suppress(redis.RedisError):  # otherwise it expires by itself
            self._release(keys=[RUN_KEY_PREFIX + task_id], args=[runner_id])
