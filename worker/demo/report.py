"""The end of a demo run: what PostgreSQL and the sandbox say happened, checked against the plan.

Everything shown is read back, not remembered: job outcomes and users from PostgreSQL, WeChat
traffic from the sandbox's counters. Phone numbers appear masked (``138****8000``) only.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from datetime import datetime
from typing import Any

from sqlalchemy import Engine, text

from worker.demo.frontends import Submission
from worker.producer import Producer
from worker.wechat.errors import API_CLASSIC_TOKEN, API_CODE_TO_SESSION, API_PHONE_NUMBER

__all__ = [
    "Check",
    "JobRecord",
    "Summary",
    "UserRow",
    "check_outcomes",
    "count_terminal_jobs",
    "read_jobs",
    "read_user_rows",
    "render_summary",
    "render_table",
    "summarise",
]

TERMINAL = ("succeeded", "failed")
#: Rows of the table: the first users, then every user whose latest job failed (up to a few).
TABLE_FIRST_USERS = 12
TABLE_FAILED_USERS = 4
#: WeChat's answers to a rejected access token on a business call.
TOKEN_REJECTED_ERRCODES = ("40001", "40014", "42001")


@dataclass(frozen=True)
class JobRecord:
    """A phone job as stored."""

    job_id: str
    appid: str
    openid: str
    status: str
    error_code: str | None
    attempts: int
    #: Exchanges whose reply never arrived (an injected dropped connection, say).
    lost_replies: int
    canonical_job_id: str | None
    created_at: datetime
    finished_at: datetime | None


@dataclass(frozen=True)
class UserRow:
    """One line of the table: a user with the latest of their phone jobs."""

    user_id: int
    appid: str
    openid: str
    masked_phone: str | None
    jobs: int
    status: str | None
    error_code: str | None
    attempts: int | None


def count_terminal_jobs(engine: Engine) -> int:
    """How many phone jobs have finished, either way."""
    with engine.connect() as connection:
        return int(
            connection.execute(
                text("SELECT count(*) FROM phone_jobs WHERE status IN ('succeeded', 'failed')")
            ).scalar_one()
        )


def read_jobs(engine: Engine) -> dict[str, JobRecord]:
    """Every phone job, by job id."""
    query = text(
        "SELECT job_id, appid, openid, status, error_code, attempts, lost_replies, canonical_job_id,"
        " created_at, finished_at FROM phone_jobs"
    )
    with engine.connect() as connection:
        return {row.job_id: JobRecord(**row._asdict()) for row in connection.execute(query)}


def read_phone_numbers(
    producer: Producer, submissions: Sequence[Submission]
) -> dict[tuple[str, str], str | None]:
    """Each submitting user's verified pure phone number, through the producer API (as a front end
    reads it), for checking only: never shown unmasked."""
    numbers: dict[tuple[str, str], str | None] = {}
    for each in submissions:
        key = (each.appid, each.openid)
        if key not in numbers:
            user = producer.get_user(appid=each.appid, openid=each.openid)
            numbers[key] = user.pure_phone_number if user is not None else None
    return numbers


def read_user_rows(engine: Engine, producer: Producer) -> tuple[list[UserRow], int]:
    """The table's rows and the number of users in all.

    Users and jobs come straight from the tables; the masked number comes through the producer
    API, which knows how numbers are stored.
    """
    query = text(
        """
        WITH latest AS (
            SELECT DISTINCT ON (appid, openid) appid, openid, status, error_code, attempts
            FROM phone_jobs ORDER BY appid, openid, created_at DESC, job_id
        ), counts AS (
            SELECT appid, openid, count(*) AS jobs FROM phone_jobs GROUP BY appid, openid
        )
        SELECT u.id, u.appid, u.openid, coalesce(c.jobs, 0) AS jobs, l.status, l.error_code, l.attempts
        FROM users u
        LEFT JOIN latest l ON l.appid = u.appid AND l.openid = u.openid
        LEFT JOIN counts c ON c.appid = u.appid AND c.openid = u.openid
        ORDER BY u.id
        """
    )
    with engine.connect() as connection:
        found = list(connection.execute(query))
    chosen = found[:TABLE_FIRST_USERS]
    chosen += [row for row in found[TABLE_FIRST_USERS:] if row.status == "failed"][:TABLE_FAILED_USERS]
    rows = []
    for row in chosen:
        user = producer.get_user(appid=row.appid, openid=row.openid)
        rows.append(
            UserRow(
                user_id=row.id,
                appid=row.appid,
                openid=row.openid,
                masked_phone=user.masked_phone_number if user is not None else None,
                jobs=int(row.jobs),
                status=row.status,
                error_code=row.error_code,
                attempts=row.attempts,
            )
        )
    return rows, len(found)


def render_table(rows: Sequence[UserRow], total_users: int) -> list[str]:
    """The users table as aligned text lines."""
    header = ("user", "appid", "openid", "phone", "jobs", "status", "error", "attempts")
    cells = [
        (
            str(row.user_id),
            row.appid,
            _shorten(row.openid, 14),
            row.masked_phone or "-",
            str(row.jobs),
            row.status or "-",
            row.error_code or "-",
            "-" if row.attempts is None else str(row.attempts),
        )
        for row in rows
    ]
    widths = [max(len(line[i]) for line in [header, *cells]) for i in range(len(header))]
    lines = [f"Users and their latest phone job, read back from PostgreSQL ({len(rows)} of {total_users}):"]
    for line in [header, *cells]:
        cells_text = "  ".join(value.ljust(width) for value, width in zip(line, widths, strict=True))
        lines.append(f"  {cells_text}".rstrip())
    return lines


def _count(number: int, noun: str) -> str:
    return f"{number} {noun}{'' if number == 1 else 's'}"


def _shorten(value: str, width: int) -> str:
    return value if len(value) <= width else value[: width - 2] + ".."


@dataclass(frozen=True)
class Check:
    """One expectation about the run and whether it held."""

    ok: bool
    description: str


@dataclass(frozen=True)
class Summary:
    """The figures of one run (also written as JSON with ``--summary-json``)."""

    jobs_planned: int
    jobs_submitted: int
    first_submissions: int
    repeats: int
    never_issued_codes: int
    terminal: int
    succeeded: int
    failed_by_reason: dict[str, int]
    repeats_mirrored: int
    jobs_retried: int
    users: int
    logins_succeeded: int
    login_failures: dict[str, int]
    front_end_errors: dict[str, int]
    token_fetches: dict[str, int]
    phone_calls: int
    phone_calls_by_app: dict[str, int]
    phone_faults_applied: int
    token_rejections: int
    errcode_40001: int
    codes_exchanged: int
    codes_presented_more_than_once: int
    unknown_code_presentations: int
    login_calls: int
    elapsed_seconds: float
    jobs_per_second: float
    checks: list[Check] = field(default_factory=list)
    #: The kinds of the faults that were injected (a short run may end before the last ones).
    faults_injected: list[str] = field(default_factory=list)
    #: Phone submissions by the API's answer: ``succeeded``/``failed`` in the same request,
    #: ``pending`` when the job was still running at the end of the request's wait (202).
    api_answers: dict[str, int] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return all(check.ok for check in self.checks)

    def as_dict(self) -> dict[str, Any]:
        result = asdict(self)
        result["ok"] = self.ok
        return result


def check_outcomes(
    submissions: Sequence[Submission],
    jobs: Mapping[str, JobRecord],
    phone_numbers: Mapping[tuple[str, str], str | None],
) -> list[Check]:
    """Compare every submission's stored outcome with what the plan says it must be."""
    firsts = [each for each in submissions if each.kind == "first"]
    invalid = [each for each in submissions if each.kind == "invalid"]
    repeats = [each for each in submissions if each.kind == "repeat"]
    missing = [each for each in submissions if each.job_id not in jobs]
    unfinished = [
        each for each in submissions if each.job_id in jobs and jobs[each.job_id].status not in TERMINAL
    ]
    firsts_ok = [
        each
        for each in firsts
        if each.job_id in jobs
        and jobs[each.job_id].status == "succeeded"
        and phone_numbers.get((each.appid, each.openid)) == each.expected_pure_phone_number
    ]
    invalid_ok = [each for each in invalid if _failed_as_invalid(jobs.get(each.job_id))]
    mirrored = _mirrored(repeats, jobs)
    return [
        Check(not missing, f"every submitted job is in PostgreSQL ({len(missing)} missing)"),
        Check(not unfinished, f"every job finished ({len(unfinished)} still open)"),
        Check(
            len(firsts_ok) == len(firsts),
            f"valid codes succeeded with the number WeChat issued: {len(firsts_ok)} of {len(firsts)}",
        ),
        Check(
            len(invalid_ok) == len(invalid),
            f"never-issued codes failed with invalid_code (reply_lost after a lost reply): "
            f"{len(invalid_ok)} of {len(invalid)}",
        ),
        Check(
            len(mirrored) == len(repeats),
            f"repeated submissions ended like the first one: {len(mirrored)} of {len(repeats)}",
        ),
    ]


def _failed_as_invalid(job: JobRecord | None) -> bool:
    """A never-issued code's job failed as it must: ``invalid_code``, or ``reply_lost`` when an
    earlier exchange lost its reply, after which wxphone cannot tell a bad code from a spent one."""
    if job is None or job.status != "failed":
        return False
    return job.error_code == "invalid_code" or (job.error_code == "reply_lost" and job.lost_replies > 0)


def _mirrored(repeats: Sequence[Submission], jobs: Mapping[str, JobRecord]) -> list[Submission]:
    result = []
    for each in repeats:
        mine, first = jobs.get(each.job_id), jobs.get(each.first_job_id or "")
        if mine is None or first is None:
            continue
        if (mine.status, mine.error_code) == (first.status, first.error_code) and mine.status in TERMINAL:
            result.append(each)
    return result


def summarise(
    *,
    jobs_planned: int,
    users_planned: int,
    submissions: Sequence[Submission],
    jobs: Mapping[str, JobRecord],
    phone_numbers: Mapping[tuple[str, str], str | None],
    users: int,
    logins_succeeded: int,
    login_failures: Mapping[str, int],
    front_end_errors: Mapping[str, int],
    sandbox_stats: Mapping[str, Any],
    appids: Sequence[str],
    faults_injected: Sequence[str] = (),
    api_answers: Mapping[str, int] | None = None,
) -> Summary:
    """Figures and checks of one run, from the stored jobs and the sandbox's counters."""
    stored = [jobs[each.job_id] for each in submissions if each.job_id in jobs]
    statuses = Counter(job.status for job in stored)
    failed_by_reason = Counter(job.error_code or "unknown" for job in stored if job.status == "failed")
    finished = [job.finished_at for job in stored if job.finished_at is not None]
    elapsed = (max(finished) - min(job.created_at for job in stored)).total_seconds() if finished else 0.0
    terminal = sum(statuses[status] for status in TERMINAL)
    phone = sandbox_stats["endpoints"][API_PHONE_NUMBER]
    per_app = sandbox_stats.get("apps", {})
    presentations: Mapping[str, int] = sandbox_stats.get("code_presentations", {})
    repeats = [each for each in submissions if each.kind == "repeat"]

    checks = check_outcomes(submissions, jobs, phone_numbers)
    firsts = sum(1 for each in submissions if each.kind == "first")
    never_issued = sum(1 for each in submissions if each.kind == "invalid")
    presented_twice = sum(count for times, count in presentations.items() if int(times) > 1)
    checks += [
        Check(
            len(submissions) == jobs_planned,
            f"jobs submitted as planned: {len(submissions)} of {jobs_planned}",
        ),
        Check(
            logins_succeeded == users_planned and not login_failures,
            f"logins succeeded: {logins_succeeded} of {users_planned}",
        ),
        Check(not front_end_errors, f"front ends ran without errors ({sum(front_end_errors.values())})"),
        Check(
            sandbox_stats.get("codes_exchanged") == firsts and presented_twice == 0,
            f"WeChat exchanged each valid code once: {sandbox_stats.get('codes_exchanged')} exchanges for "
            f"{firsts} codes, {presented_twice} presented twice",
        ),
    ]
    return Summary(
        jobs_planned=jobs_planned,
        jobs_submitted=len(submissions),
        first_submissions=firsts,
        repeats=len(repeats),
        never_issued_codes=never_issued,
        terminal=terminal,
        succeeded=statuses["succeeded"],
        failed_by_reason=dict(failed_by_reason.most_common()),
        repeats_mirrored=len(_mirrored(repeats, jobs)),
        jobs_retried=sum(1 for job in stored if job.attempts > 1),
        users=users,
        logins_succeeded=logins_succeeded,
        login_failures=dict(login_failures),
        front_end_errors=dict(front_end_errors),
        api_answers=dict(api_answers or {}),
        token_fetches={
            appid: int(per_app.get(appid, {}).get(API_CLASSIC_TOKEN, {}).get("tokens_issued", 0))
            for appid in appids
        },
        phone_calls=int(phone["calls"]),
        phone_calls_by_app={
            appid: int(per_app.get(appid, {}).get(API_PHONE_NUMBER, {}).get("calls", 0)) for appid in appids
        },
        phone_faults_applied=int(phone["faults_applied"]),
        token_rejections=sum(int(phone["errcodes"].get(code, 0)) for code in TOKEN_REJECTED_ERRCODES),
        errcode_40001=int(phone["errcodes"].get("40001", 0)),
        codes_exchanged=int(sandbox_stats.get("codes_exchanged", 0)),
        codes_presented_more_than_once=presented_twice,
        unknown_code_presentations=int(sandbox_stats.get("unknown_code_presentations", 0)),
        login_calls=int(sandbox_stats["endpoints"][API_CODE_TO_SESSION]["calls"]),
        elapsed_seconds=round(elapsed, 2),
        jobs_per_second=round(terminal / elapsed, 1) if elapsed > 0 else 0.0,
        checks=checks,
        faults_injected=list(faults_injected),
    )


def render_summary(summary: Summary, *, token_lifetime_seconds: float) -> list[str]:
    """The summary as aligned text lines."""
    failed = sum(summary.failed_by_reason.values())
    reasons = ", ".join(f"{reason} {count}" for reason, count in summary.failed_by_reason.items())
    tokens = ", ".join(f"{appid} {count}" for appid, count in summary.token_fetches.items())
    distinct_codes = summary.first_submissions + summary.never_issued_codes
    rows = [
        (
            "jobs",
            f"{summary.jobs_submitted} submitted: {_count(summary.first_submissions, 'valid code')}, "
            f"{_count(summary.repeats, 'repeated submission')} of them, "
            f"{_count(summary.never_issued_codes, 'code')} WeChat never issued",
        ),
        ("succeeded", str(summary.succeeded)),
        ("failed", f"{failed}" + (f" ({reasons})" if reasons else "")),
        (
            "duplicates",
            f"{summary.repeats_mirrored} of {summary.repeats} repeats ended like their first submission, "
            "without a WeChat call of their own",
        ),
        ("retried", f"{summary.jobs_retried} jobs needed more than one attempt"),
        ("logins", f"{summary.logins_succeeded} wxphone.login jobs succeeded ({summary.users} users)"),
        ("HTTP answers", _api_answers(summary.api_answers)),
        (
            "token fetches",
            f"{tokens} (classic tokens live {token_lifetime_seconds:.0f} s; beat renews them at half-life)",
        ),
        (
            "phone API calls",
            f"{summary.phone_calls} for {distinct_codes} distinct codes: {summary.codes_exchanged} "
            f"exchanged once each, {summary.unknown_code_presentations} unknown, "
            f"{summary.phone_faults_applied} injected faults, {summary.token_rejections} rejected tokens",
        ),
        (
            "40001s seen",
            f"{summary.errcode_40001} (after the revoke: one shared token refresh, then one retry per job)",
        ),
        (
            "jobs per second",
            f"{summary.jobs_per_second} ({summary.terminal} jobs finished in "
            f"{summary.elapsed_seconds:.1f} s, first submission to last result)",
        ),
    ]
    width = max(len(name) for name, _ in rows)
    lines = ["Summary:"]
    lines += [f"  {name.ljust(width)}  {value}" for name, value in rows]
    lines.append("Checks:")
    lines += [f"  {'ok  ' if check.ok else 'FAIL'}  {check.description}" for check in summary.checks]
    return lines


def _api_answers(answers: Mapping[str, int]) -> str:
    """``POST /v1/phone``'s answers: how many ended within their request."""
    in_request = answers.get("succeeded", 0) + answers.get("failed", 0)
    return (
        f"{in_request} phone submissions answered in the same request "
        f"({answers.get('succeeded', 0)} with the masked number), "
        f"{answers.get('pending', 0)} answered 202 and followed up"
    )
