"""What every fault-injection test checks once the fault is over.

The promise under test: every submitted phone code ends in a terminal state that matches the
truth; no code is presented to WeChat twice unless an earlier exchange's reply was lost (and that
loss is counted in ``phone_jobs.lost_replies``); no user record is written twice or half-written.

* :func:`assert_all_terminal_and_correct` reads PostgreSQL: job states, user rows (their phone
  fields against the numbers the sandbox minted; ``updated_at == created_at`` proves a row was
  written in one statement and never again), code claims.
* :func:`assert_wechat_calls_accounted` reads the sandbox: how often each code was presented
  (its histogram) and how many were exchanged, against the lost replies the jobs counted.
* :func:`assert_codes_match_outcomes` then asks the sandbox, code by code, whether each failed
  job's code was really spent (``reply_lost``) or really not (``quota_exhausted``,
  ``code_expired``). It presents codes itself, so it runs last.
"""

from __future__ import annotations

import contextlib
import json
import re
import time
from collections import Counter
from collections.abc import Collection, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import redis
import requests
from sqlalchemy import text

from tests.support.pipeline import APPS, Pipeline, plain_celery_client, result_backend_for
from worker.producer import Producer
from worker.wechat.client import WeChatClient
from worker.wechat.errors import WeChatInvalidCodeError

__all__ = [
    "ACK_ERROR_PATTERN",
    "FAST_SETTINGS",
    "Outcome",
    "SubmittedJob",
    "ack_error_lines",
    "assert_all_terminal_and_correct",
    "assert_codes_match_outcomes",
    "assert_wechat_calls_accounted",
    "broker_task_ids",
    "count_in",
    "jobs_without_message",
    "pool_children",
    "print_recovery",
    "private_broker",
    "queued_message",
    "redeliver",
    "submit_jobs",
    "wait_until_terminal",
]

TERMINAL = ("succeeded", "failed")
#: Failures whose code never reached WeChat: the code must still be unspent.
NEVER_EXCHANGED = frozenset({"quota_exhausted", "code_expired"})
#: Failures whose code reached WeChat and was consumed there, its number lost in transit.
SPENT_AND_LOST = frozenset({"reply_lost"})
#: Failures whose code may or may not have reached WeChat (a worker died mid-exchange).
MAYBE_SPENT = frozenset({"worker_lost"})

#: Short timings for fault tests (seconds); every start-up invariant of the settings holds:
#: soft > HTTP connect + read + token wait; visibility >= the longest retry countdown + 15 s.
FAST_SETTINGS: dict[str, Any] = {
    "http_connect_timeout_seconds": 1,
    "http_read_timeout_seconds": 3,
    "token_wait_seconds": 3,
    "token_lock_ttl_seconds": 9,
    "task_soft_time_limit_seconds": 8,
    "task_time_limit_seconds": 9,
    "retry_backoff_base_seconds": 0.2,
    "retry_backoff_max_seconds": 1,
    "rate_limit_window_seconds": 5,
    "database_retry_max_seconds": 2,
    "visibility_timeout_seconds": 35,
    "retry_countdown_max_seconds": 15,
    "sweep_interval_seconds": 5,
}

#: Worker log lines that mean a message could not be acknowledged (it then comes back only after
#: the visibility timeout) or that unacknowledged messages were pushed back to the queue.
ACK_ERROR_PATTERN = re.compile(r"Couldn't ack|MaxConnectionsError|Restoring \d+ unacknowledged")


@dataclass(frozen=True)
class SubmittedJob:
    """One submitted phone code and the number the sandbox will give for it."""

    job_id: str
    appid: str
    openid: str
    code: str = field(repr=False)
    phone_number: str = field(repr=False)
    pure_phone_number: str = field(repr=False)
    country_code: str


@dataclass
class Outcome:
    """What PostgreSQL says about a set of jobs once all of them are terminal."""

    by_result: Counter[tuple[str, str | None]]
    lost_replies: int
    attempts: int
    rows: dict[str, dict[str, Any]]

    @property
    def succeeded(self) -> int:
        return self.by_result[("succeeded", None)]

    def failed(self, error_code: str) -> int:
        return self.by_result[("failed", error_code)]

    def summary(self) -> str:
        parts = [f"{status}/{code}" if code else status for status, code in sorted(self.by_result, key=str)]
        counts = [self.by_result[key] for key in sorted(self.by_result, key=str)]
        return ", ".join(f"{part}={count}" for part, count in zip(parts, counts, strict=True))


# -- submitting and waiting -------------------------------------------------------------------


def submit_jobs(
    pipeline: Pipeline, appid: str, count: int, *, label: str, producer: Producer | None = None
) -> list[SubmittedJob]:
    """Mint ``count`` codes for ``appid`` (each a different number) and submit one job per code,
    each for a new user ``o<label><n>``."""
    minted = pipeline.sandbox.mint_phone_codes_detailed(appid, count)
    submitter = producer or pipeline.producer
    jobs: list[SubmittedJob] = []
    for index, phone in enumerate(minted):
        openid = f"o{label}{appid[-2:]}{index:05d}"
        job_id = submitter.submit_phone_code(appid=appid, openid=openid, code=phone.code)
        jobs.append(
            SubmittedJob(
                job_id=job_id,
                appid=appid,
                openid=openid,
                code=phone.code,
                phone_number=phone.phone_number,
                pure_phone_number=phone.pure_phone_number,
                country_code=phone.country_code,
            )
        )
    return jobs


def _statuses(pipeline: Pipeline, job_ids: Sequence[str]) -> Counter[str]:
    with pipeline.engine.connect() as conn:
        rows = conn.execute(
            text("SELECT status, count(*) FROM phone_jobs WHERE job_id = ANY(:ids) GROUP BY status"),
            {"ids": list(job_ids)},
        ).all()
    return Counter({str(status): int(count) for status, count in rows})


def count_in(pipeline: Pipeline, jobs: Sequence[SubmittedJob], *statuses: str) -> int:
    """How many of ``jobs`` are in one of ``statuses`` (default: terminal)."""
    return sum(_statuses(pipeline, [job.job_id for job in jobs])[status] for status in statuses or TERMINAL)


def wait_until_terminal(
    pipeline: Pipeline,
    jobs: Sequence[SubmittedJob],
    *,
    timeout_seconds: float,
    since: float | None = None,
    why: str = "",
) -> float:
    """Wait until every job is succeeded or failed, at most ``timeout_seconds`` after ``since`` (a
    ``time.monotonic()`` reading; default: now); return the seconds since then. ``why`` explains
    the deadline in the failure message."""
    started = time.monotonic() if since is None else since
    deadline = started + timeout_seconds
    job_ids = [job.job_id for job in jobs]
    statuses: Counter[str] = Counter()
    while time.monotonic() < deadline:
        with contextlib.suppress(Exception):  # the database itself may be the fault under test
            statuses = _statuses(pipeline, job_ids)
            if sum(statuses[status] for status in TERMINAL) == len(job_ids):
                return time.monotonic() - started
        time.sleep(0.2)
    raise AssertionError(
        f"after {timeout_seconds:.0f}s not every job is terminal: {dict(statuses)} of {len(job_ids)}"
        + (f" ({why})" if why else "")
    )


def print_recovery(scenario: str, seconds: float, detail: str = "") -> None:
    """One line per scenario, collected by ``pytest -s`` or shown with the test's output."""
    print(f"\n[recovery] {scenario}: {seconds:.1f}s{'; ' + detail if detail else ''}")


# -- the broker: where each job's message is --------------------------------------------------

#: The job queue and kombu's Redis keys for unacknowledged messages (``kombu.transport.redis``
#: defaults, which wxphone keeps).
JOB_QUEUE_KEY = "wxphone"
UNACKED_KEY = "unacked"


def _task_id(message: dict[str, Any]) -> str:
    return str(message["headers"]["id"])


def broker_task_ids(broker_url: str) -> set[str]:
    """Task ids of the messages Redis holds for the job queue: waiting in it, or delivered and not
    yet acknowledged (which kombu restores after the visibility timeout). A phone job's task id
    is its job id."""
    with redis.Redis.from_url(broker_url) as broker:
        waiting = broker.lrange(JOB_QUEUE_KEY, 0, -1)
        unacked = broker.hvals(UNACKED_KEY)
    # A queued message is its JSON; an unacknowledged one is stored as [message, exchange, routing key].
    return {_task_id(json.loads(raw)) for raw in waiting} | {_task_id(json.loads(raw)[0]) for raw in unacked}


def jobs_without_message(pipeline: Pipeline, jobs: Sequence[SubmittedJob]) -> list[SubmittedJob]:
    """Open jobs whose message Redis no longer holds anywhere: taken off the queue by a worker's
    ``BRPOP`` that died before recording it as unacknowledged. Nothing can redeliver those; the
    sweep closes them once their code has expired."""
    held = broker_task_ids(pipeline.broker_url)
    open_ids = {job.job_id for job in jobs} - _terminal_ids(pipeline, [job.job_id for job in jobs])
    return [job for job in jobs if job.job_id in open_ids and job.job_id not in held]


def _terminal_ids(pipeline: Pipeline, job_ids: Sequence[str]) -> set[str]:
    with pipeline.engine.connect() as conn:
        rows = conn.execute(
            text("SELECT job_id FROM phone_jobs WHERE job_id = ANY(:ids) AND status = ANY(:terminal)"),
            {"ids": list(job_ids), "terminal": list(TERMINAL)},
        ).all()
    return {str(job_id) for (job_id,) in rows}


# -- PostgreSQL: terminal, correct, written once ----------------------------------------------


def assert_all_terminal_and_correct(
    pipeline: Pipeline, jobs: Sequence[SubmittedJob], *, allowed_errors: Collection[str] = ()
) -> Outcome:
    """Every job terminal; each success wrote exactly the minted number once; each failure wrote
    nothing and carries an expected error; every code claim agrees with its job."""
    assert len({job.code for job in jobs}) == len(jobs), "the checks assume one job per code"
    job_ids = [job.job_id for job in jobs]
    with pipeline.engine.connect() as conn:
        rows = {
            str(row["job_id"]): dict(row)
            for row in conn.execute(
                text(
                    "SELECT j.*, c.job_id AS claim_job_id, c.status AS claim_status, "
                    "c.error_code AS claim_error_code "
                    "FROM phone_jobs j LEFT JOIN code_claims c "
                    "ON c.appid = j.appid AND c.code_fingerprint = j.code_fingerprint "
                    "WHERE j.job_id = ANY(:ids)"
                ),
                {"ids": job_ids},
            ).mappings()
        }
        users = {
            (str(row["appid"]), str(row["openid"])): dict(row)
            for row in conn.execute(
                text("SELECT * FROM users WHERE openid = ANY(:openids)"),
                {"openids": [job.openid for job in jobs]},
            ).mappings()
        }
    problems: list[str] = []
    by_result: Counter[tuple[str, str | None]] = Counter()
    for job in jobs:
        row = rows.get(job.job_id)
        if row is None:
            problems.append(f"{job.job_id}: no job row")
            continue
        status, error_code = str(row["status"]), row["error_code"]
        by_result[(status, error_code)] += 1
        user = users.get((job.appid, job.openid))
        if status not in TERMINAL:
            problems.append(f"{job.job_id}: left {status} after {row['attempts']} attempts")
        elif status == "succeeded":
            problems += _check_user(pipeline, job, user)
        else:
            if error_code not in allowed_errors:
                problems.append(f"{job.job_id}: failed with unexpected {error_code}")
            if user is not None:
                problems.append(f"{job.job_id}: failed but wrote a user row")
            if row["finished_at"] is None:
                problems.append(f"{job.job_id}: failed without finished_at")
        claim = (row["claim_job_id"], row["claim_status"], row["claim_error_code"])
        # A job whose code expired before it was claimed never took the code's claim.
        unclaimed_ok = error_code == "code_expired" and claim == (None, None, None)
        if status in TERMINAL and claim != (job.job_id, status, error_code) and not unclaimed_ok:
            problems.append(
                f"{job.job_id}: code claim ({row['claim_status']}, {row['claim_error_code']}) "
                f"disagrees with the job ({status}, {error_code})"
            )
        if status == "succeeded" and int(row["attempts"]) < 1:
            problems.append(f"{job.job_id}: succeeded without a single attempt")
    stray = set(users) - {(job.appid, job.openid) for job in jobs}
    if stray:
        problems.append(f"user rows nobody asked for: {sorted(stray)}")
    assert not problems, f"{len(problems)} problem(s):\n" + "\n".join(problems[:40])
    return Outcome(
        by_result=by_result,
        lost_replies=sum(int(row["lost_replies"]) for row in rows.values()),
        attempts=sum(int(row["attempts"]) for row in rows.values()),
        rows=rows,
    )


#: Columns a user row holds once its number is verified: written together or not at all.
PHONE_COLUMNS = (
    "phone_number_encrypted",
    "pure_phone_number_encrypted",
    "phone_blind_index",
    "phone_masked",
    "encryption_key_version",
    "country_code",
    "phone_verified_at",
)


def _check_user(pipeline: Pipeline, job: SubmittedJob, user: dict[str, Any] | None) -> list[str]:
    if user is None:
        return [f"{job.job_id}: succeeded but no user row"]
    problems = []
    missing = [column for column in PHONE_COLUMNS if user[column] is None]
    if missing:
        problems.append(f"{job.job_id}: user row half-written (no {', '.join(missing)})")
    # The numbers are encrypted at rest: read them back the way front ends do.
    view = pipeline.producer.get_user(appid=job.appid, openid=job.openid)
    written = (view.phone_number, view.pure_phone_number, view.country_code) if view else None
    if written != (job.phone_number, job.pure_phone_number, job.country_code):
        problems.append(f"{job.job_id}: user row holds another number than the one minted")
    # The touch trigger sets updated_at=now() on every UPDATE: a row written once, by one INSERT,
    # keeps updated_at == created_at.
    if user["updated_at"] != user["created_at"]:
        problems.append(f"{job.job_id}: user row written more than once")
    return problems


# -- the sandbox: presentations and exchanges -------------------------------------------------


def assert_wechat_calls_accounted(
    pipeline: Pipeline, jobs: Sequence[SubmittedJob], outcome: Outcome
) -> dict[str, Any]:
    """Codes presented more than once are covered by counted lost replies, and the codes WeChat
    exchanged are exactly those of the successes and of the ``reply_lost`` failures (plus, at
    most, failures that counted a lost reply and whose fate is unknown, such as ``worker_lost``).
    Prints the calls-per-code histogram; returns the sandbox stats."""
    stats = pipeline.sandbox.stats()
    histogram = {int(times): int(codes) for times, codes in stats["code_presentations"].items()}
    assert sum(histogram.values()) == len(jobs), f"the sandbox knows other codes: {histogram}"
    extra = sum((times - 1) * codes for times, codes in histogram.items() if times > 1)
    assert extra <= outcome.lost_replies, (
        f"{extra} extra presentation(s) to WeChat but only {outcome.lost_replies} lost repl(y/ies) "
        f"counted: calls per code {histogram}"
    )
    spent_and_lost = sum(outcome.failed(code) for code in SPENT_AND_LOST)
    unknown_fate = sum(
        1
        for row in outcome.rows.values()
        if row["status"] == "failed"
        and (
            row["error_code"] in MAYBE_SPENT
            or (row["error_code"] not in SPENT_AND_LOST | NEVER_EXCHANGED and int(row["lost_replies"]) > 0)
        )
    )
    exchanged = int(stats["codes_exchanged"])
    low = outcome.succeeded + spent_and_lost
    assert low <= exchanged <= low + unknown_fate, (
        f"WeChat exchanged {exchanged} codes; jobs account for {low} (+{unknown_fate} of unknown fate)"
    )
    assert stats["unknown_code_presentations"] == 0
    print(
        f"\n[wechat] calls per code (presentations -> codes): {histogram}; codes exchanged {exchanged}; "
        f"lost replies counted {outcome.lost_replies}; jobs: {outcome.summary()}"
    )
    return stats


def assert_codes_match_outcomes(pipeline: Pipeline, jobs: Sequence[SubmittedJob], outcome: Outcome) -> None:
    """Ask WeChat (the sandbox) about each failed job's code: ``reply_lost`` codes must be spent,
    ``quota_exhausted``/``code_expired`` codes must not be. Presents codes, so call it last."""
    pipeline.sandbox.clear_faults()
    failed = [job for job in jobs if outcome.rows[job.job_id]["status"] == "failed"]
    client = WeChatClient(pipeline.sandbox.base_url, session=requests.Session(), timeout=(2.0, 10.0))
    tokens: dict[str, str] = {}
    problems: list[str] = []
    try:
        for job in failed:
            error_code = outcome.rows[job.job_id]["error_code"]
            if error_code not in SPENT_AND_LOST | NEVER_EXCHANGED:
                continue
            if job.appid not in tokens:
                # Normal-mode stable tokens: WeChat hands back the fleet's current token.
                tokens[job.appid] = client.fetch_stable_token(appid=job.appid, secret=APPS[job.appid]).value
            try:
                client.get_phone_number(access_token=tokens[job.appid], code=job.code)
                spent = False
            except WeChatInvalidCodeError:
                spent = True
            if error_code in SPENT_AND_LOST and not spent:
                problems.append(f"{job.job_id}: {error_code} but WeChat never consumed its code")
            if error_code in NEVER_EXCHANGED and spent:
                problems.append(f"{job.job_id}: {error_code} but WeChat consumed its code")
    finally:
        client.close()
    assert not problems, "\n".join(problems)


# -- messages as kombu stores them ------------------------------------------------------------

JOB_QUEUE = "wxphone"


def queued_message(broker_url: str) -> str:
    """The one message waiting in the job queue, as kombu stored it in Redis."""
    with redis.Redis.from_url(broker_url, socket_timeout=5) as client:
        [raw] = client.lrange(JOB_QUEUE, 0, -1)
    return bytes(raw).decode()


def redeliver(broker_url: str, raw_message: str) -> None:
    """Put a copy of a message back on the queue exactly as kombu's restore of unacknowledged
    messages does (``redelivered`` set in headers and delivery info)."""
    payload = json.loads(raw_message)
    payload["headers"]["redelivered"] = True
    payload["properties"]["delivery_info"]["redelivered"] = True
    with redis.Redis.from_url(broker_url, socket_timeout=5) as client:
        client.lpush(JOB_QUEUE, json.dumps(payload))


# -- processes and logs -----------------------------------------------------------------------


def ack_error_lines(*logs: str) -> list[str]:
    """Lines of worker output showing failed acks or restored unacknowledged messages."""
    return [line for log in logs for line in log.splitlines() if ACK_ERROR_PATTERN.search(line)]


def pool_children(pid: int) -> list[int]:
    """Direct children of process ``pid`` (a prefork worker's pool processes)."""
    children: list[int] = []
    with contextlib.suppress(OSError):
        for task in Path(f"/proc/{pid}/task").iterdir():
            children += [int(each) for each in (task / "children").read_text().split()]
    return children


@contextlib.contextmanager
def private_broker(pipeline: Pipeline, broker_url: str, redis_url: str) -> Iterator[None]:
    """Point the pipeline (worker settings, producer) at another Redis for broker and token store."""
    original = (pipeline.broker_url, pipeline.redis_url, pipeline.celery, pipeline.producer)
    celery = plain_celery_client(broker_url, result_backend_for(broker_url, redis_url))
    pipeline.settings.update(broker_url=broker_url, redis_url=redis_url)
    pipeline.broker_url, pipeline.redis_url, pipeline.celery = broker_url, redis_url, celery
    pipeline.producer = Producer(
        sessions=pipeline.sessions,
        celery_app=celery,
        protection=original[3].protection,
    )
    try:
        yield
    finally:
        pipeline.stop_all()
        celery.close()
        pipeline.broker_url, pipeline.redis_url, pipeline.celery, pipeline.producer = original
