"""Simulated web front ends: threads that play users logging in and submitting phone codes.

Each user does what a mini program's back end would: exchange a ``wx.login`` code through the
``wxphone.login`` job and wait for its end for the openid, then submit the phone code the user's
tap produced with :meth:`worker.producer.Producer.submit_phone_code`. Codes come from the
sandbox's admin API, as if WeChat had issued them; a few are made up and were never issued.
Some users submit their code twice, at once (a double tap) or a little later (a page reload).
"""

from __future__ import annotations

import heapq
import queue
import random
import secrets
import threading
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

import requests
from celery import Celery

from worker.demo.scenario import LATER_REPEAT_DELAY_SECONDS, UserPlan
from worker.producer import Producer
from worker.sandbox.admin import SandboxAdmin

__all__ = ["FrontEnds", "Submission"]

#: How long a front end waits for a login result before giving up on that user.
LOGIN_WAIT_SECONDS = 30.0
#: How the demo's submissions are labelled in the exchange audit trail.
CALLER = "wxphone-demo"

SubmissionKind = Literal["first", "repeat", "invalid"]


@dataclass(frozen=True)
class Submission:
    """One phone job a front end submitted, and what it should end as."""

    user: int
    appid: str
    openid: str
    job_id: str
    kind: SubmissionKind
    #: For a repeat: the job of the first submission of the same code.
    first_job_id: str | None = None
    #: The number the sandbox will return for a valid code (kept out of every repr).
    expected_pure_phone_number: str | None = field(default=None, repr=False)


@dataclass(frozen=True)
class _PendingRepeat:
    due_at: float
    appid: str
    openid: str
    code: str = field(repr=False)
    user: int
    first_job_id: str

    def __lt__(self, other: _PendingRepeat) -> bool:
        return self.due_at < other.due_at


class FrontEnds:
    """A few threads working through the planned users; thread-safe counters for the progress bar."""

    def __init__(
        self,
        users: Sequence[UserPlan],
        *,
        producer: Producer,
        celery_app: Celery,
        sandbox_url: str,
        threads: int,
        seed: int | None = None,
    ) -> None:
        self.producer = producer
        self.celery_app = celery_app
        self.sandbox_url = sandbox_url
        self.thread_count = threads
        self.stop_event = threading.Event()
        self._users: queue.Queue[UserPlan] = queue.Queue()
        for user in users:
            self._users.put(user)
        self._rng = random.Random(seed)
        self._lock = threading.Lock()
        self._submissions: list[Submission] = []
        self._logins_succeeded = 0
        self._login_failures: Counter[str] = Counter()
        self._errors: Counter[str] = Counter()
        self._threads: list[threading.Thread] = []

    # -- observation (any thread) ---------------------------------------------------------

    @property
    def submitted(self) -> int:
        """Phone jobs submitted so far."""
        with self._lock:
            return len(self._submissions)

    def submissions(self) -> list[Submission]:
        with self._lock:
            return list(self._submissions)

    @property
    def logins_succeeded(self) -> int:
        with self._lock:
            return self._logins_succeeded

    def login_failures(self) -> Counter[str]:
        with self._lock:
            return Counter(self._login_failures)

    def errors(self) -> Counter[str]:
        """Unexpected exceptions by type name (never their text, which could hold a code)."""
        with self._lock:
            return Counter(self._errors)

    def running(self) -> bool:
        return any(thread.is_alive() for thread in self._threads)

    # -- control ----------------------------------------------------------------------------

    def start(self) -> None:
        for number in range(self.thread_count):
            thread = threading.Thread(target=self._work, name=f"front-end-{number + 1}", daemon=True)
            self._threads.append(thread)
            thread.start()

    def stop(self, *, timeout_seconds: float = 5.0) -> None:
        """Ask every thread to finish its current step and wait a bounded time for them."""
        self.stop_event.set()
        deadline = time.monotonic() + timeout_seconds
        for thread in self._threads:
            thread.join(timeout=max(0.0, deadline - time.monotonic()))

    # -- one front end ----------------------------------------------------------------------

    def _work(self) -> None:
        with requests.Session() as http:
            admin = SandboxAdmin(self.sandbox_url, session=http)
            repeats: list[_PendingRepeat] = []
            while not self.stop_event.is_set():
                self._submit_due_repeats(repeats, until=time.monotonic())
                try:
                    user = self._users.get_nowait()
                except queue.Empty:
                    break
                try:
                    self._play(user, admin, repeats)
                except Exception as error:  # one user's failure must not end the front end
                    with self._lock:
                        self._errors[type(error).__name__] += 1
            while repeats and not self.stop_event.is_set():
                self.stop_event.wait(max(0.0, repeats[0].due_at - time.monotonic()))
                self._submit_due_repeats(repeats, until=time.monotonic())

    def _play(self, user: UserPlan, admin: SandboxAdmin, repeats: list[_PendingRepeat]) -> None:
        js_code, _ = admin.mint_login_code(user.appid)
        openid = self._login(user.appid, js_code)
        if openid is None:
            return
        if user.invalid_code:
            code, expected = f"demo-never-issued-{secrets.token_hex(16)}", None
        else:
            minted = admin.mint_phone_codes_detailed(user.appid, 1)[0]
            code, expected = minted.code, minted.pure_phone_number
        job_id = self.producer.submit_phone_code(appid=user.appid, openid=openid, code=code, caller=CALLER)
        kind: SubmissionKind = "invalid" if user.invalid_code else "first"
        self._record(Submission(user.index, user.appid, openid, job_id, kind, None, expected))
        if user.repeat == "immediate":
            repeat_id = self.producer.submit_phone_code(
                appid=user.appid, openid=openid, code=code, caller=CALLER
            )
            self._record(Submission(user.index, user.appid, openid, repeat_id, "repeat", job_id))
        elif user.repeat == "later":
            delay = self._rng.uniform(*LATER_REPEAT_DELAY_SECONDS)
            heapq.heappush(
                repeats,
                _PendingRepeat(time.monotonic() + delay, user.appid, openid, code, user.index, job_id),
            )

    def _submit_due_repeats(self, repeats: list[_PendingRepeat], *, until: float) -> None:
        while repeats and repeats[0].due_at <= until:
            pending = heapq.heappop(repeats)
            try:
                job_id = self.producer.submit_phone_code(
                    appid=pending.appid, openid=pending.openid, code=pending.code, caller=CALLER
                )
            except Exception as error:
                with self._lock:
                    self._errors[type(error).__name__] += 1
                continue
            self._record(
                Submission(
                    pending.user, pending.appid, pending.openid, job_id, "repeat", pending.first_job_id
                )
            )

    def _login(self, appid: str, js_code: str) -> str | None:
        """Submit a login job and wait for its end; the openid, or None on failure."""
        job_id = self.producer.submit_login(appid=appid, js_code=js_code, caller=CALLER)
        job = self.producer.wait_for_job(job_id, LOGIN_WAIT_SECONDS)
        if job is None or not job.is_terminal:
            self._login_failed("timeout")
            return None
        if job.status != "succeeded" or not job.openid:
            self._login_failed(job.error_code or "unexpected_result")
            return None
        with self._lock:
            self._logins_succeeded += 1
        return job.openid

    def _login_failed(self, reason: str) -> None:
        with self._lock:
            self._login_failures[reason] += 1

    def _record(self, submission: Submission) -> None:
        with self._lock:
            self._submissions.append(submission)
