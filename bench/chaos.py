"""``python -m bench.chaos``: thousands of phone jobs through real workers while everything breaks.

A randomized run (a script, not a timed test) that interleaves, over ``--jobs`` submissions:

* broker connection drops (``CLIENT KILL`` of every worker connection, what a Redis failover or a
  proxy reset does), whole-worker SIGKILLs (a supervisor starts a replacement at once) and
  prefork pool-child SIGKILLs;
* WeChat faults at the sandbox: busy bursts (-1), HTTP 5xx, dropped connections and replies held
  past the read timeout (before and after WeChat consumed the code), a 45011, a token revocation;
* users tapping the button several times (each tap a new code, the newest must win) and double
  taps (the same code submitted twice).

Then it waits until every job is terminal and checks the promises against PostgreSQL and the
sandbox:

1. every job is terminal, none ran more than its attempt cap;
2. no code was presented to WeChat twice except for counted lost replies (sandbox histogram
   against ``phone_jobs.lost_replies``), and every ``reply_lost`` code was really consumed;
3. every user row holds the number of that user's most recent successful verification (the
   newest code, by tap, among the user's codes that succeeded), or no number when none did;
4. the audit trail matches the jobs: one successful ``phone`` audit row per code that was
   exchanged by a job that succeeded with it, none for a failed job, and never more audit rows
   than WeChat saw calls.

Everything runs on private servers (a redis-server with AOF, a throwaway PostgreSQL database, the
sandbox) started here and removed at the end. Exit status 1 when any check fails.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import json
import os
import random
import shutil
import signal
import sys
import tempfile
import threading
import time
from collections import Counter, defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import redis
from celery import Celery
from sqlalchemy import Engine, text

from bench.load import APPS, services
from tests.support.faults import FAST_SETTINGS, pool_children
from tests.support.pipeline import DEVELOPMENT_PROTECTION
from tests.support.processes import ManagedProcess, base_environment, beat_process, worker_process
from worker.db import make_engine, session_factory
from worker.jobs.phone import JobPolicy
from worker.producer import Producer
from worker.sandbox.admin import MintedPhoneCode, SandboxAdmin
from worker.wechat.client import WeChatClient
from worker.wechat.errors import WeChatInvalidCodeError

FINGERPRINT_KEY = "chaos-run-fingerprint-key-0001"
PHONE_LATENCY_MS = 30
SUBMIT_THREADS = 6
TERMINAL = ("succeeded", "failed")
#: Delivery timings of the run: the fault suite's short ones (visibility 35 s), so a killed
#: worker's messages come back within the run.
TIMINGS: dict[str, Any] = {**FAST_SETTINGS, "http_read_timeout_seconds": 2}
MAX_ATTEMPTS = JobPolicy(fingerprint_key=FINGERPRINT_KEY).max_attempts


@dataclass
class Tap:
    """One submission: a user's tap (a fresh code) or a double tap (the same code again)."""

    appid: str
    openid: str
    minted: MintedPhoneCode
    #: Position of the code among the user's codes, by mint order (the newest tap is highest).
    sequence: int
    repeat: bool = False
    job_id: str = ""


@dataclass
class ChaosLog:
    """What the run did to the system, counted by kind."""

    injected: Counter[str] = field(default_factory=Counter)
    lines: list[str] = field(default_factory=list)

    def note(self, kind: str, detail: str = "") -> None:
        self.injected[kind] += 1
        self.lines.append(f"{time.strftime('%H:%M:%S')} {kind} {detail}".rstrip())


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.chaos", description=__doc__.split("\n\n")[0])
    parser.add_argument("--jobs", type=int, default=2400, help="submissions (default 2400)")
    parser.add_argument("--rate", type=float, default=25.0, help="submissions per second (default 25)")
    parser.add_argument("--fault-every", type=float, default=4.0, help="seconds between faults (default 4)")
    parser.add_argument("--seed", type=int, default=None, help="the same plan and faults each time")
    parser.add_argument("--json", type=Path, default=None, help="write the figures to this file")
    parser.add_argument("--keep-logs", action="store_true", help="keep the folder with process logs")
    return parser.parse_args(argv)


def plan_taps(admin: SandboxAdmin, jobs: int, rng: random.Random) -> list[Tap]:
    """About a third as many users as jobs, each tapping 1-5 times; ~10% double taps."""
    taps: list[Tap] = []
    per_user: dict[tuple[str, str], int] = defaultdict(int)
    users = [(appid, f"oChaos{appid[-1]}{index:05d}") for index in range(jobs // 3 + 1) for appid in APPS]
    while len(taps) < jobs:
        if taps and rng.random() < 0.1:
            earlier = rng.choice(taps[-200:])
            taps.append(Tap(earlier.appid, earlier.openid, earlier.minted, earlier.sequence, repeat=True))
            continue
        appid, openid = rng.choice(users)
        [minted] = admin.mint_phone_codes_detailed(appid, 1)
        per_user[(appid, openid)] += 1
        taps.append(Tap(appid, openid, minted, per_user[(appid, openid)]))
    return taps


class Fleet:
    """The workers and the beat, with a supervisor that replaces a killed worker at once."""

    def __init__(self, env: dict[str, str], directory: Path) -> None:
        self.env = env
        self.directory = directory
        self.workers: dict[str, ManagedProcess] = {}
        self.retired: list[ManagedProcess] = []
        self.started = 0
        self.beat = beat_process(env, directory, name="beat")

    def start(self) -> None:
        self.add("threads", pool="threads", concurrency=16)
        self.add("threads", pool="threads", concurrency=16)
        self.add("prefork", pool="prefork", concurrency=4)
        self.beat.start()

    def add(self, kind: str, *, pool: str, concurrency: int) -> ManagedProcess:
        self.started += 1
        name = f"{kind}{self.started}"
        process = worker_process(self.env, self.directory, name=name, concurrency=concurrency, pool=pool)
        process.start()
        process.wait_for_output("ready.", timeout_seconds=120)
        self.workers[name] = process
        return process

    def kill_worker(self, rng: random.Random) -> str:
        name = rng.choice(sorted(self.workers))
        process = self.workers.pop(name)
        process.kill()
        self.retired.append(process)
        kind = "prefork" if name.startswith("prefork") else "threads"
        self.add(kind, pool=kind, concurrency=4 if kind == "prefork" else 16)
        return name

    def kill_pool_child(self, rng: random.Random) -> str | None:
        prefork = [process for name, process in self.workers.items() if name.startswith("prefork")]
        children = [child for process in prefork for child in pool_children(process.pid)]
        if not children:
            return None
        child = rng.choice(children)
        with contextlib.suppress(ProcessLookupError):
            os.kill(child, signal.SIGKILL)
        return str(child)

    def logs(self) -> str:
        return "\n".join(process.output() for process in [*self.workers.values(), *self.retired])

    def stop(self) -> None:
        for process in [*self.workers.values(), self.beat]:
            process.stop()


def inject(kind: str, admin: SandboxAdmin, broker: redis.Redis, fleet: Fleet, rng: random.Random) -> str:
    if kind == "broker connections killed":
        killed = broker.execute_command("CLIENT", "KILL", "TYPE", "normal", "SKIPME", "yes")  # type: ignore[no-untyped-call]
        return f"{killed} connections"
    if kind == "worker killed":
        return fleet.kill_worker(rng)
    if kind == "pool child killed":
        return fleet.kill_pool_child(rng) or "(none running)"
    if kind == "busy burst":
        admin.inject_fault("phone", errcode=-1, times=rng.randint(3, 12))
    elif kind == "http 5xx":
        admin.inject_fault(
            "phone", http_status=rng.choice([500, 502, 503]), times=2, timing=rng.choice(["before", "after"])
        )
    elif kind == "dropped connection":
        admin.inject_fault("phone", drop_connection=True, times=2, timing=rng.choice(["before", "after"]))
    elif kind == "reply held past the timeout":
        admin.inject_fault("phone", latency_ms=3500, times=2, timing=rng.choice(["before", "after"]))
    elif kind == "45011":
        admin.inject_fault("phone", errcode=45011)
    elif kind == "token revoked":
        admin.revoke_tokens(rng.choice(sorted(APPS)))
    return ""


FAULTS = [
    ("broker connections killed", 3),
    ("worker killed", 2),
    ("pool child killed", 2),
    ("busy burst", 2),
    ("http 5xx", 1),
    ("dropped connection", 1),
    ("reply held past the timeout", 1),
    ("45011", 1),
    ("token revoked", 1),
]


def chaos(
    stop: threading.Event, args: argparse.Namespace, admin: SandboxAdmin, broker: redis.Redis, fleet: Fleet,
    log: ChaosLog, rng: random.Random,
) -> None:  # fmt: skip
    kinds, weights = zip(*FAULTS, strict=True)
    while not stop.wait(args.fault_every * rng.uniform(0.5, 1.5)):
        kind = rng.choices(kinds, weights)[0]
        try:
            log.note(kind, inject(kind, admin, broker, fleet, rng))
        except Exception as error:
            log.note("injection failed", f"{kind}: {type(error).__name__}")


def submit(producer: Producer, taps: list[Tap], rate: float) -> float:
    started = time.monotonic()

    def one(index: int) -> None:
        tap = taps[index]
        # Keep to the rate: each submission has its moment.
        time.sleep(max(0.0, started + index / rate - time.monotonic()))
        tap.job_id = producer.submit_phone_code(appid=tap.appid, openid=tap.openid, code=tap.minted.code)

    # A user's taps go in order: submissions of one user are never concurrent.
    by_user: dict[tuple[str, str], list[int]] = defaultdict(list)
    for index, tap in enumerate(taps):
        by_user[(tap.appid, tap.openid)].append(index)
    with concurrent.futures.ThreadPoolExecutor(SUBMIT_THREADS) as pool:

        def in_order(indexes: list[int]) -> None:
            for index in indexes:
                one(index)

        list(pool.map(in_order, by_user.values()))
    return time.monotonic() - started


def drain(engine: Engine, count: int, timeout_seconds: float) -> Counter[str]:
    deadline = time.monotonic() + timeout_seconds
    while True:
        with engine.connect() as conn:
            statuses = Counter(
                {
                    str(s): int(n)
                    for s, n in conn.execute(text("SELECT status, count(*) FROM phone_jobs GROUP BY 1"))
                }
            )
        if sum(statuses[s] for s in TERMINAL) >= count or time.monotonic() > deadline:
            return statuses
        time.sleep(1.0)


def check(
    engine: Engine, admin: SandboxAdmin, producer: Producer, taps: list[Tap]
) -> tuple[list[str], dict[str, Any]]:
    """The four promises; returns the problems found and the figures."""
    problems: list[str] = []
    with engine.connect() as conn:
        jobs = {
            str(row["job_id"]): dict(row)
            for row in conn.execute(
                text(
                    "SELECT j.*, c.job_id AS claim_job_id, c.status AS claim_status FROM phone_jobs j "
                    "LEFT JOIN code_claims c ON c.appid = j.appid AND c.code_fingerprint = j.code_fingerprint"
                )
            ).mappings()
        }
        audit = Counter(
            (str(job_id), str(outcome))
            for job_id, outcome in conn.execute(
                text("SELECT job_id, outcome FROM exchange_audit WHERE api = 'phone'")
            )
        )
        # Why each failed job failed, call by call (for the report; no personal data).
        calls_of_failed: dict[str, list[str]] = defaultdict(list)
        for job_id, outcome, error_code in conn.execute(
            text(
                "SELECT a.job_id, a.outcome, a.error_code FROM exchange_audit a JOIN phone_jobs j "
                "ON j.job_id = a.job_id WHERE j.status = 'failed' ORDER BY a.id"
            )
        ):
            calls_of_failed[str(job_id)].append(f"{outcome}/{error_code}" if error_code else str(outcome))
    statuses = Counter((row["status"], row["error_code"]) for row in jobs.values())
    # 1. terminal, bounded attempts
    for tap in taps:
        row = jobs.get(tap.job_id)
        if row is None:
            problems.append(f"{tap.job_id}: no job row")
        elif row["status"] not in TERMINAL:
            problems.append(f"{tap.job_id}: left {row['status']} after {row['attempts']} attempts")
        elif row["attempts"] > MAX_ATTEMPTS:
            problems.append(f"{tap.job_id}: ran {row['attempts']} times")
    # 2. presentations against lost replies; reply_lost codes really spent
    stats = admin.stats()
    histogram = {int(times): int(codes) for times, codes in stats["code_presentations"].items()}
    extra = sum((times - 1) * codes for times, codes in histogram.items() if times > 1)
    lost_replies = sum(int(row["lost_replies"]) for row in jobs.values())
    if extra > lost_replies:
        problems.append(
            f"{extra} extra presentations but only {lost_replies} lost replies counted: {histogram}"
        )
    client = WeChatClient(admin.base_url, timeout=(2.0, 10.0))
    tokens: dict[str, str] = {}
    unspent_reply_lost = 0
    try:
        for tap in taps:
            row = jobs.get(tap.job_id)
            if tap.repeat or row is None or row["error_code"] != "reply_lost":
                continue
            if tap.appid not in tokens:
                tokens[tap.appid] = client.fetch_stable_token(appid=tap.appid, secret=APPS[tap.appid]).value
            with contextlib.suppress(WeChatInvalidCodeError):
                client.get_phone_number(access_token=tokens[tap.appid], code=tap.minted.code)
                unspent_reply_lost += 1
    finally:
        client.close()
    if unspent_reply_lost:
        problems.append(f"{unspent_reply_lost} reply_lost jobs whose code WeChat never consumed")
    # 3. each user holds the number of their newest successful tap
    newest: dict[tuple[str, str], Tap | None] = {}
    for tap in taps:
        row = jobs.get(tap.job_id)
        key = (tap.appid, tap.openid)
        newest.setdefault(key, None)
        if tap.repeat or row is None or row["status"] != "succeeded":
            continue
        current = newest[key]
        if current is None or tap.sequence > current.sequence:
            newest[key] = tap
    wrong_numbers = 0
    for (appid, openid), newest_tap in newest.items():
        user = producer.get_user(appid=appid, openid=openid)
        stored = user.pure_phone_number if user is not None else None
        expected = newest_tap.minted.pure_phone_number if newest_tap is not None else None
        if stored != expected:
            wrong_numbers += 1
            if wrong_numbers <= 10:
                problems.append(f"user {appid}/{openid}: holds another number than its newest verification")
    if wrong_numbers > 10:
        problems.append(
            f"... {wrong_numbers} users in all hold another number than their newest verification"
        )
    # 4. audit trail against the jobs and WeChat's count
    audit_rows_of: Counter[str] = Counter()
    for (audited_job, _outcome), rows in audit.items():
        audit_rows_of[audited_job] += rows
    for job_id, row in jobs.items():
        succeeded_rows = audit[(job_id, "succeeded")]
        owns_exchange = row["claim_job_id"] == job_id
        if row["status"] == "succeeded" and owns_exchange and succeeded_rows != 1:
            problems.append(f"{job_id}: succeeded with {succeeded_rows} successful audit rows")
        if row["status"] == "failed" and succeeded_rows:
            problems.append(f"{job_id}: failed ({row['error_code']}) but the audit says WeChat answered")
        if not owns_exchange and audit_rows_of[job_id]:
            problems.append(f"{job_id}: a repeated submission has audit rows of its own")
    phone_calls = int(stats["endpoints"].get("phone", {}).get("calls", 0))
    if sum(audit.values()) > phone_calls:
        problems.append(f"{sum(audit.values())} audit rows but WeChat saw {phone_calls} calls")
    figures = {
        "jobs": len(taps),
        "repeats": sum(1 for tap in taps if tap.repeat),
        "users": len(newest),
        "statuses": {f"{s}/{e}" if e else s: n for (s, e), n in sorted(statuses.items(), key=str)},
        "lost_replies": lost_replies,
        "presentations": {str(k): v for k, v in sorted(histogram.items())},
        "codes_exchanged": int(stats["codes_exchanged"]),
        "phone_calls": phone_calls,
        "audit_rows": sum(audit.values()),
        "users_with_newest_number": len(newest) - wrong_numbers,
        "failed_jobs": [
            {
                "error_code": row["error_code"],
                "attempts": row["attempts"],
                "lost_replies": row["lost_replies"],
                "calls": calls_of_failed.get(job_id, []),
            }
            for job_id, row in jobs.items()
            if row["status"] == "failed"
        ][:30],
    }
    return problems, figures


def run(args: argparse.Namespace, directory: Path) -> tuple[list[str], dict[str, Any], ChaosLog]:
    rng = random.Random(args.seed)
    log = ChaosLog()
    with services(directory) as (redis_server, database_url, admin):
        admin.configure(latency_ms={"phone": PHONE_LATENCY_MS})
        env = base_environment(
            database_url=database_url,
            broker_url=redis_server.url(0),
            redis_url=redis_server.url(1),
            wechat_api_base=admin.base_url,
            apps=",".join(f"{appid}:{secret}" for appid, secret in APPS.items()),
            fingerprint_key=FINGERPRINT_KEY,
            log_level="INFO",
            **TIMINGS,
        )
        engine = make_engine(database_url, pool_size=SUBMIT_THREADS, max_overflow=0)
        celery = Celery("frontend", broker=redis_server.url(0))
        celery.conf.update(task_serializer="json", accept_content=["json"])
        broker = redis_server.client(0)
        fleet = Fleet(env, directory)
        stop = threading.Event()
        try:
            fleet.start()
            producer = Producer(
                sessions=session_factory(engine), celery_app=celery, protection=DEVELOPMENT_PROTECTION
            )
            taps = plan_taps(admin, args.jobs, rng)
            injector = threading.Thread(target=chaos, args=(stop, args, admin, broker, fleet, log, rng))
            injector.start()
            try:
                submit_seconds = submit(producer, taps, args.rate)
            finally:
                stop.set()
                injector.join()
            admin.clear_faults()
            drained_after = time.monotonic()
            # A killed worker's messages come back after the visibility timeout; a job whose
            # message is lost is closed by the sweep after its code's life and the stale window.
            statuses = drain(engine, len(taps), timeout_seconds=900)
            drain_seconds = time.monotonic() - drained_after
            time.sleep(4)  # replies still held at the sandbox land and are counted
            problems, figures = check(engine, admin, producer, taps)
            figures.update(
                submit_seconds=round(submit_seconds, 1),
                drain_seconds=round(drain_seconds, 1),
                injected=dict(log.injected),
                open_after_drain={s: n for s, n in statuses.items() if s not in TERMINAL},
            )
        finally:
            stop.set()
            fleet.stop()
            broker.close()
            celery.close()
            engine.dispose()
    return problems, figures, log


def render(problems: list[str], figures: dict[str, Any]) -> str:
    lines = [
        f"wxphone chaos: {figures['jobs']} submissions ({figures['repeats']} double taps) by "
        f"{figures['users']} users, submitted in {figures['submit_seconds']} s, drained "
        f"{figures['drain_seconds']} s later",
        "  faults injected   "
        + ", ".join(f"{kind} x{count}" for kind, count in sorted(figures["injected"].items())),
        f"  jobs              {figures['statuses']}",
        f"  WeChat            {figures['phone_calls']} phone calls, "
        f"{figures['codes_exchanged']} codes exchanged, presentations per code "
        f"{figures['presentations']}, lost replies counted {figures['lost_replies']}",
        f"  audit rows        {figures['audit_rows']}",
        *(
            f"  failed job        {job['error_code']} after {job['attempts']} attempts, "
            f"{job['lost_replies']} lost replies; calls: {', '.join(job['calls']) or 'none'}"
            for job in figures["failed_jobs"]
        ),
        f"  users             {figures['users_with_newest_number']} of {figures['users']} hold their newest "
        "verified number (or none when no tap succeeded)",
        "checks:",
    ]
    lines += [f"  FAIL {problem}" for problem in problems] or ["  ok   every promise held"]
    return "\n".join(lines)


def _stop_on_sigterm(signum: int, frame: object) -> None:
    raise KeyboardInterrupt  # so every process and server the run started is stopped


def main(argv: Sequence[str] | None = None) -> int:
    signal.signal(signal.SIGTERM, _stop_on_sigterm)
    args = parse_args(argv)
    directory = Path(tempfile.mkdtemp(prefix="wxphone-chaos-"))
    problems, figures, log = run(args, directory)
    print(render(problems, figures))  # noqa: T201 - the report is this script's output
    if args.json is not None:
        args.json.write_text(
            json.dumps({"figures": figures, "problems": problems, "faults": log.lines}, indent=2)
        )
    if args.keep_logs or problems:
        print(f"  process logs in {directory}")  # noqa: T201
    else:
        shutil.rmtree(directory, ignore_errors=True)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
