"""Simulated mini programs: threads that play users logging in and submitting phone codes.

Each user does what a mini program page does against ``wxphone api`` (docs/integration.md): post
its ``wx.login`` code to ``POST /v1/login`` for a session, then post the phone code its tap
produced to ``POST /v1/phone`` with that session, and get the verified (masked) number in the
same request, or a job id to follow. Codes come from the sandbox's admin API, as if WeChat had
issued them; a few are made up and were never issued. Some users submit their code twice, at
once (a double tap) or a little later (a page reload).
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
from typing import Any, Literal

import requests

from worker.demo.scenario import LATER_REPEAT_DELAY_SECONDS, UserPlan
from worker.sandbox.admin import SandboxAdmin

__all__ = ["FrontEnds", "Submission"]

#: How long a front end waits for a login before giving up on that user.
LOGIN_WAIT_SECONDS = 30.0
#: The wait a phone submission asks the API for (the answer comes sooner when the job ends).
PHONE_WAIT_SECONDS = 5.0
#: The HTTP client's own bound on a request: the longest wait plus room.
REQUEST_TIMEOUT_SECONDS = LOGIN_WAIT_SECONDS + 10.0
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
    session: str = field(repr=False)
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
        api_url: str,
        sandbox_url: str,
        threads: int,
        seed: int | None = None,
    ) -> None:
        self.api_url = api_url.rstrip("/")
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
        #: Phone submissions by how the API answered: in the same request or to follow up.
        self._answers: Counter[str] = Counter()
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

    def answers(self) -> Counter[str]:
        """Phone submissions by the API's answer: ``succeeded``/``failed`` in the same request,
        ``pending`` (202, the job still running when the wait ended)."""
        with self._lock:
            return Counter(self._answers)

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
                self._submit_due_repeats(http, repeats, until=time.monotonic())
                try:
                    user = self._users.get_nowait()
                except queue.Empty:
                    break
                try:
                    self._play(http, user, admin, repeats)
                except Exception as error:  # one user's failure must not end the front end
                    with self._lock:
                        self._errors[type(error).__name__] += 1
            while repeats and not self.stop_event.is_set():
                self.stop_event.wait(max(0.0, repeats[0].due_at - time.monotonic()))
                self._submit_due_repeats(http, repeats, until=time.monotonic())

    def _play(
        self, http: requests.Session, user: UserPlan, admin: SandboxAdmin, repeats: list[_PendingRepeat]
    ) -> None:
        js_code, _ = admin.mint_login_code(user.appid)
        login = self._login(http, user.appid, js_code)
        if login is None:
            return
        session, openid = login
        if user.invalid_code:
            code, expected = f"demo-never-issued-{secrets.token_hex(16)}", None
        else:
            minted = admin.mint_phone_codes_detailed(user.appid, 1)[0]
            code, expected = minted.code, minted.pure_phone_number
        # A double tap sends the second request while the first is still in flight: the first
        # asks for no wait.
        wait_seconds = 0.0 if user.repeat == "immediate" else PHONE_WAIT_SECONDS
        job_id = self._submit(http, session, code, wait_seconds)
        if job_id is None:
            return
        kind: SubmissionKind = "invalid" if user.invalid_code else "first"
        self._record(Submission(user.index, user.appid, openid, job_id, kind, None, expected))
        if user.repeat == "immediate":
            repeat_id = self._submit(http, session, code, PHONE_WAIT_SECONDS)
            if repeat_id is not None:
                self._record(Submission(user.index, user.appid, openid, repeat_id, "repeat", job_id))
        elif user.repeat == "later":
            delay = self._rng.uniform(*LATER_REPEAT_DELAY_SECONDS)
            heapq.heappush(
                repeats,
                _PendingRepeat(
                    time.monotonic() + delay, user.appid, openid, session, code, user.index, job_id
                ),
            )

    def _submit_due_repeats(
        self, http: requests.Session, repeats: list[_PendingRepeat], *, until: float
    ) -> None:
        while repeats and repeats[0].due_at <= until:
            pending = heapq.heappop(repeats)
            try:
                job_id = self._submit(http, pending.session, pending.code, PHONE_WAIT_SECONDS)
            except Exception as error:
                with self._lock:
                    self._errors[type(error).__name__] += 1
                continue
            if job_id is not None:
                self._record(
                    Submission(
                        pending.user, pending.appid, pending.openid, job_id, "repeat", pending.first_job_id
                    )
                )

    def _submit(self, http: requests.Session, session: str, code: str, wait_seconds: float) -> str | None:
        """``POST /v1/phone``; the job id the API answered with (200, 202, or a failed job's 4xx/5xx),
        or None when no job was made (counted as a front-end error by status)."""
        reply = http.post(
            f"{self.api_url}/v1/phone",
            json={"code": code, "wait_seconds": wait_seconds},
            headers={"Authorization": f"Bearer {session}"},
            timeout=REQUEST_TIMEOUT_SECONDS,
        )
        body = _json_object(reply)
        job_id = body.get("job_id")
        if not isinstance(job_id, str):
            with self._lock:
                self._errors[f"HTTP {reply.status_code}"] += 1
            return None
        answer = "pending" if reply.status_code == 202 else str(body.get("status") or "failed")
        with self._lock:
            self._answers[answer] += 1
        return job_id

    def _login(self, http: requests.Session, appid: str, js_code: str) -> tuple[str, str] | None:
        """``POST /v1/login`` (following a 202 with ``GET /v1/login/{job_id}``); the session and
        the openid, or None on failure."""
        reply = http.post(
            f"{self.api_url}/v1/login",
            json={"appid": appid, "js_code": js_code},
            timeout=REQUEST_TIMEOUT_SECONDS,
        )
        body = _json_object(reply)
        if reply.status_code == 202 and isinstance(body.get("job_id"), str):
            reply = http.get(
                f"{self.api_url}/v1/login/{body['job_id']}",
                params={"wait_seconds": LOGIN_WAIT_SECONDS},
                timeout=REQUEST_TIMEOUT_SECONDS,
            )
            body = _json_object(reply)
        session, openid = body.get("session"), body.get("openid")
        if reply.status_code != 200 or not isinstance(session, str) or not isinstance(openid, str):
            self._login_failed(
                str(body.get("error_code") or ("timeout" if reply.status_code == 202 else reply.status_code))
            )
            return None
        with self._lock:
            self._logins_succeeded += 1
        return session, openid

    def _login_failed(self, reason: str) -> None:
        with self._lock:
            self._login_failures[reason] += 1

    def _record(self, submission: Submission) -> None:
        with self._lock:
            self._submissions.append(submission)


def _json_object(reply: requests.Response) -> dict[str, Any]:
    """The reply's JSON object, or an empty one."""
    try:
        body = reply.json()
    except ValueError:
        return {}
    return body if isinstance(body, dict) else {}
