"""Waiting for jobs to end without polling: one ``LISTEN`` connection per process.

Why PostgreSQL ``LISTEN/NOTIFY`` rather than Redis pub/sub: the job's row is the truth, and the
notification is sent by a trigger inside the very transaction that ends the job
(:mod:`models.job_notify`). PostgreSQL delivers it exactly when that transaction commits, so a
waiter never wakes before the end it reads is visible, a rolled-back write wakes no one, and no
writer can end a job without notifying (a publish to Redis after the commit would be lost with a
worker that died between the two, and would be one more thing every writer must remember).

A :class:`JobDoneListener` keeps one connection listening on ``wxphone_job_done`` in a daemon
thread and wakes the waiters registered for the notified job id; waiters are callbacks, so a
thread blocks on a ``threading.Event`` and an asyncio task on an ``asyncio.Event`` (thousands of
them cost no thread each). A notification sent while the connection was down is lost, so every
time the listener (re)connects it wakes *every* waiter, and each reads its job once more: a job
that ended during the outage is seen then. The same rule covers a waiter registered before the
first connection was up. While it waits, the listener checks its connection every
:data:`LISTENER_PROBE_SECONDS` with a round trip that must answer within
:data:`PROBE_TIMEOUT_SECONDS` (a server that stopped answering would otherwise be waited on
forever) and reconnects with a capped backoff.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import psycopg

from models.job_notify import JOB_DONE_CHANNEL

__all__ = ["LISTENER_PROBE_SECONDS", "JobDoneListener", "Wake"]

log = logging.getLogger(__name__)

#: A waiter's callback: called from the listener's thread, so it must only hand over (set an
#: event, ``loop.call_soon_threadsafe``), never block.
Wake = Callable[[], None]

#: How often an idle listening connection is checked with a round trip.
LISTENER_PROBE_SECONDS = 5.0
#: How long the probe (and the LISTEN) may wait for PostgreSQL's answer before the connection is
#: cut and made again.
PROBE_TIMEOUT_SECONDS = 5.0
#: How soon a closed listener lets go of its connection.
CLOSE_CHECK_SECONDS = 0.5
#: Backoff between reconnection attempts while PostgreSQL is unreachable.
RECONNECT_FIRST_PAUSE_SECONDS = 0.1
RECONNECT_MAX_PAUSE_SECONDS = 2.0


class JobDoneListener:
    """Wakes the waiters of a job when PostgreSQL notifies its end (see the module docstring).

    ``connect`` opens a new autocommit psycopg connection. The thread starts with the first
    waiter and stays for the process's life (a daemon: it never holds the process at exit).
    """

    def __init__(self, connect: Callable[[], psycopg.Connection[tuple[object, ...]]]) -> None:
        self._connect = connect
        self._lock = threading.Lock()
        self._waiters: dict[str, list[Wake]] = {}
        self._thread_pid: int | None = None
        self._listening = threading.Event()
        self._closed = threading.Event()
        #: How many times the connection has been (re)established: tests and metrics.
        self.connections_made = 0

    @contextmanager
    def watching(self, job_id: str, wake: Wake) -> Iterator[None]:
        """Call ``wake`` whenever ``job_id`` is notified as ended, or the listener reconnects,
        until the block ends. Register before reading the job, so an end committed after that
        read always wakes the waiter."""
        with self._lock:
            self._waiters.setdefault(job_id, []).append(wake)
            self._ensure_thread()
        try:
            yield
        finally:
            with self._lock:
                wakes = self._waiters.get(job_id, [])
                if wake in wakes:
                    wakes.remove(wake)
                if not wakes:
                    self._waiters.pop(job_id, None)

    @property
    def waiter_count(self) -> int:
        """Waiters registered now."""
        with self._lock:
            return sum(len(wakes) for wakes in self._waiters.values())

    def wait_until_listening(self, timeout_seconds: float) -> bool:
        """True once the connection listens (starting the thread if needed); False at the timeout."""
        with self._lock:
            self._ensure_thread()
        return self._listening.wait(timeout_seconds)

    def close(self) -> None:
        """Stop listening: the thread closes its connection within :data:`CLOSE_CHECK_SECONDS`
        and waiters are no longer woken by notifications (their waits still end at their timeout)."""
        self._closed.set()

    def _ensure_thread(self) -> None:
        if self._closed.is_set():
            return
        # A process forked from one whose thread ran has the flag but not the thread.
        if self._thread_pid == os.getpid():
            return
        self._thread_pid = os.getpid()
        self._listening = threading.Event()
        threading.Thread(target=self._run, name="wxphone-job-listener", daemon=True).start()

    def _run(self) -> None:
        pause = RECONNECT_FIRST_PAUSE_SECONDS
        while not self._closed.is_set():
            try:
                with self._connect() as connection:
                    _execute_within(connection, f"LISTEN {JOB_DONE_CHANNEL}")
                    self.connections_made += 1
                    self._listening.set()
                    pause = RECONNECT_FIRST_PAUSE_SECONDS
                    # Anything that ended while no connection listened was not heard: every
                    # waiter reads its job again.
                    self._wake_all()
                    self._listen(connection)
            except psycopg.Error as error:
                if self._listening.is_set():
                    log.warning(
                        "the job-end listener lost its PostgreSQL connection (%s); reconnecting",
                        type(error).__name__,
                    )
                self._listening.clear()
            self._closed.wait(pause)
            pause = min(RECONNECT_MAX_PAUSE_SECONDS, pause * 2)

    def _listen(self, connection: psycopg.Connection[tuple[object, ...]]) -> None:
        probe_at = time.monotonic() + LISTENER_PROBE_SECONDS
        while not self._closed.is_set():
            for notify in connection.notifies(timeout=CLOSE_CHECK_SECONDS):
                self._wake(notify.payload)
            if time.monotonic() >= probe_at:
                _execute_within(connection, "SELECT 1")  # raises if the connection is gone
                probe_at = time.monotonic() + LISTENER_PROBE_SECONDS

    def _wake(self, job_id: str) -> None:
        with self._lock:
            wakes = list(self._waiters.get(job_id, ()))
        for wake in wakes:
            wake()

    def _wake_all(self) -> None:
        with self._lock:
            wakes = [wake for job_wakes in self._waiters.values() for wake in job_wakes]
        for wake in wakes:
            wake()


def _execute_within(connection: psycopg.Connection[tuple[object, ...]], statement: str) -> None:
    """Run ``statement``, cutting the connection if no answer comes within
    :data:`PROBE_TIMEOUT_SECONDS`: a server that stopped answering (a frozen process, a proxy
    that holds the flow) keeps TCP alive, so neither keepalives nor libpq end the wait; shutting
    the socket down makes it fail (``OperationalError``) and the listener reconnects."""
    timer = threading.Timer(PROBE_TIMEOUT_SECONDS, _cut, args=(connection.fileno(),))
    timer.daemon = True
    timer.start()
    try:
        connection.execute(statement)
    finally:
        timer.cancel()


def _cut(fileno: int) -> None:
    """Shut down the socket behind ``fileno`` (a blocked read on it then fails at once)."""
    with contextlib.suppress(OSError):
        cut = socket.socket(fileno=os.dup(fileno))
        try:
            cut.shutdown(socket.SHUT_RDWR)
        finally:
            cut.close()
