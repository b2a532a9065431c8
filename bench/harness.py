"""The benchmark harness: one sandbox, one Redis, one database; three systems run in turn.

Every run of a system starts from a clean state (sandbox reset, its Redis databases flushed, the
tables truncated), starts that system's worker processes as real subprocesses (each in its own
process group), pushes a workload through, waits until every job is terminal or the drain stalls,
and measures:

* throughput: the drain rate of a pre-filled queue (the queue is filled before the workers start,
  so the producer does not compete with them for the two cores), between the 10th and 90th
  percentile of commit times;
* latency: enqueue to commit, with submissions paced at a fixed rate (for the comparison: half of
  the system's own measured peak); enqueue time is the producer's clock just before it records the
  job, commit time is the database's ``clock_timestamp()`` (raw, baseline) or wxphone's
  ``phone_jobs.finished_at``, stamped in the committing transaction;
* wxphone's submit to answer (:mod:`bench.answer`): what a front end's caller waits, from calling
  ``submit_phone_code`` until the wait for the job's end returns it, paced at half of its peak,
  split into the stages the time went to;
* WeChat cost from the sandbox's counters (token endpoint calls, phone calls, errcodes, how often
  each code was presented);
* worker CPU seconds and RSS from ``/proc`` (every worker process and its children).
"""

from __future__ import annotations

import concurrent.futures
import json
import logging
import os
import random
import subprocess
import sys
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Protocol

import requests
from celery import Celery
from sqlalchemy import Engine, create_engine, text
from sqlalchemy.orm import sessionmaker

from bench import common as names
from bench.answer import PacedAnswers, paced_answers, stage_samples, stage_summaries
from bench.common import BENCH_SCHEMA
from bench.report import PhaseResult, latency_summary, windowed_rate
from bench.services import (
    ManagedProcess,
    ProcessSampler,
    RedisServer,
    create_database,
    drop_database,
    free_port,
    wait_for,
)
from worker.sandbox.admin import SandboxAdmin

__all__ = ["Bench", "BenchConfig", "PhaseSpec"]

log = logging.getLogger("bench")

REPO_ROOT = Path(__file__).resolve().parent.parent
PYTHON = sys.executable
FINGERPRINT_KEY = "wxphone-benchmark-fingerprint-key"
#: PostgreSQL's default max_connections is 100; the worker pools of all processes stay below 80.
DATABASE_CONNECTION_BUDGET = 80
#: wxphone's default pool shape, for all three systems: no overflow, because SQLAlchemy closes an
#: overflow connection on return and a busy pool then opens new backends all the time.
DEFAULT_POOL_SIZE = 20
DEFAULT_MAX_OVERFLOW = 0


@dataclass(frozen=True)
class PhaseSpec:
    """One workload: a pre-filled queue (``drain``), submissions at a fixed rate (``paced``), or
    submissions at a fixed rate whose callers each wait for their answer (``answer``, wxphone)."""

    mode: str
    jobs: int = 0
    rate: float = 0.0
    seconds: float = 0.0
    #: For paced phases after a drain: offer this fraction of the drain's measured rate.
    rate_of_drain: float | None = None
    duplicate_fraction: float = 0.0


@dataclass
class BenchConfig:
    """Everything a benchmark run is shaped by; ``python -m bench --help`` documents each."""

    latency_ms: float = 50.0
    processes: int = 2
    concurrency: int = 100
    pool: str = "threads"
    jobs: int = 5000
    paced_seconds: float = 12.0
    systems: tuple[str, ...] = ("raw", "baseline", "wxphone")
    duplicates: bool = True
    duplicate_fraction: float = 0.1
    duplicate_seconds: float = 15.0
    rotation: bool = True
    rotation_lifetime_seconds: float = 20.0
    rotation_grace_seconds: float = 5.0
    rotation_seconds: float = 60.0
    #: WXPHONE_TOKEN_REFRESH_FRACTION in the rotation run; None: the product's default.
    refresh_fraction: float | None = None
    fixed_rate: float | None = None
    scaling: bool = False
    concurrency_levels: tuple[int, ...] = (1, 10, 50, 100, 200)
    process_levels: tuple[int, ...] = (1, 2, 4)
    scaling_systems: tuple[str, ...] = ("raw", "wxphone")
    backlog: bool = False
    backlog_sizes: tuple[int, ...] = (1000, 10000, 50000)
    backlog_systems: tuple[str, ...] = ("wxphone",)
    postgres_url: str = "postgresql+psycopg://postgres@127.0.0.1:5432/postgres"
    stall_seconds: float = 45.0
    output: Path = REPO_ROOT / "bench" / "results" / "latest.json"
    log_dir: Path | None = None
    quick: bool = False
    #: wxphone's submit-to-answer phase after its comparison run (``bench.answer``).
    answer: bool = True
    answer_seconds: float = 20.0
    answer_waiters: str = "asyncio"
    answer_timeout_seconds: float = 30.0
    #: The answer phase's rate as a fraction of wxphone's drain rate (the target's: 0.5).
    answer_fraction: float = 0.5


# -- systems ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class JobRow:
    enqueued_at: float
    committed_at: float | None
    status: str
    error_code: str | None
    #: wxphone: when a worker started the task (``phone_jobs.started_at``).
    started_at: float | None = None


class Submitter(Protocol):
    def submit(self, appid: str, openid: str, code: str) -> str: ...


class BenchSubmitter:
    """Raw and baseline: record the job row, then publish by task name (as wxphone's Producer does)."""

    def __init__(self, engine: Engine, celery: Celery, task_name: str, queue: str) -> None:
        self.engine = engine
        self.celery = celery
        self.task_name = task_name
        self.queue = queue

    def submit(self, appid: str, openid: str, code: str) -> str:
        job_id = str(uuid.uuid4())
        with self.engine.begin() as connection:
            connection.execute(
                text(
                    "INSERT INTO bench_jobs (job_id, appid, openid, enqueued_at) "
                    "VALUES (:job_id, :appid, :openid, :enqueued_at)"
                ),
                {"job_id": job_id, "appid": appid, "openid": openid, "enqueued_at": datetime.now(UTC)},
            )
        self.celery.send_task(
            self.task_name,
            kwargs={"appid": appid, "openid": openid, "code": code},
            task_id=job_id,
            queue=self.queue,
        )
        return job_id


class WxphoneSubmitter:
    """wxphone: its own front-end API, :meth:`worker.producer.Producer.submit_phone_code`."""

    def __init__(self, engine: Engine, celery: Celery, code_lifetime_seconds: float, api_base: str) -> None:
        from worker.crypto import DataProtection
        from worker.producer import Producer
        from worker.settings import Settings

        self.engine = engine
        self.producer = Producer(
            sessions=sessionmaker(bind=engine, expire_on_commit=False),
            celery_app=celery,
            code_lifetime_seconds=code_lifetime_seconds,
            # The keys of a process against the bench's sandbox, like its workers (the bench
            # process's own settings point at the real WeChat, where keys are required).
            protection=DataProtection.from_settings(Settings(wechat_api_base=api_base)),
        )

    def submit(self, appid: str, openid: str, code: str) -> str:
        return self.producer.submit_phone_code(appid=appid, openid=openid, code=code)

    def close(self) -> None:
        self.producer.close()  # its job-end listener, opened by the first wait


@dataclass
class System:
    """How to run, feed and read one of the three systems."""

    name: str
    appid: str
    secret: str
    broker_db: int
    redis_db: int | None = None

    def worker_args(self, index: int, pool: str, concurrency: int) -> list[str]:
        if self.name == "wxphone":
            # ``python -m worker`` (what the ``wxphone`` script runs) patches for gevent before
            # anything is imported; ``python -m worker.cli`` would be too late and refuses gevent.
            # The ``celery`` command below patches first the same way (maybe_patch_concurrency).
            return [
                PYTHON, "-m", "worker", "worker", "--pool", pool, "--concurrency", str(concurrency),
                "--queues", "wxphone,wxphone.token", "--hostname", f"wxphone{index}@%h",
            ]  # fmt: skip
        module, queue = (
            ("bench.raw_app", names.RAW_QUEUE)
            if self.name == "raw"
            else ("bench.baseline_app", names.BASELINE_QUEUE)
        )
        return [
            PYTHON, "-m", "celery", "-A", module, "worker", "--pool", pool, "--concurrency", str(concurrency),
            "--queues", queue, "--hostname", f"{self.name}{index}@%h", "--loglevel", "WARNING",
            "--without-mingle", "--without-gossip",
        ]  # fmt: skip

    @property
    def task_name(self) -> str:
        return names.RAW_TASK if self.name == "raw" else names.BASELINE_TASK

    @property
    def queue(self) -> str:
        return names.RAW_QUEUE if self.name == "raw" else names.BASELINE_QUEUE


SYSTEMS: dict[str, System] = {
    "raw": System("raw", "wxbenchraw000001", "bench-raw-secret", broker_db=0),
    "baseline": System("baseline", "wxbenchbase00001", "bench-baseline-secret", broker_db=1),
    "wxphone": System("wxphone", "wxbenchwxp000001", "bench-wxphone-secret", broker_db=2, redis_db=3),
}


def _plain_celery(broker_url: str) -> Celery:
    client = Celery("bench-frontend", broker=broker_url, backend=broker_url)
    client.conf.update(task_serializer="json", accept_content=["json"], result_serializer="json")
    return client


def _epoch(value: datetime | None) -> float | None:
    return value.timestamp() if value is not None else None


# -- the run context --------------------------------------------------------------------------


@dataclass
class RunSettings:
    """What differs between runs of one system."""

    scenario: str
    processes: int
    concurrency: int
    sandbox: dict[str, Any]
    wxphone: dict[str, Any] = field(default_factory=dict)
    code_lifetime_seconds: float = 300.0


class Bench:
    """Owns the shared servers of one benchmark invocation; use as a context manager."""

    def __init__(self, config: BenchConfig) -> None:
        self.config = config
        stamp = time.strftime("%Y%m%d-%H%M%S")
        self.log_dir = config.log_dir or Path("/tmp") / f"wxphone-bench-{stamp}-{os.getpid()}"
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self.redis = RedisServer(self.log_dir / "redis")
        self.database_url = ""
        self.engine: Engine | None = None
        self.sandbox_process: ManagedProcess | None = None
        self.sandbox: SandboxAdmin | None = None
        self.processes: list[ManagedProcess] = []
        self.results: list[PhaseResult] = []

    # -- lifecycle ----------------------------------------------------------------------------

    def __enter__(self) -> Bench:
        try:
            self._start()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    def _start(self) -> None:
        log.info("logs in %s", self.log_dir)
        self.redis.start()
        self.database_url = create_database(self.config.postgres_url)
        env = self._base_env()
        env["WXPHONE_DATABASE_URL"] = self.database_url
        subprocess.run(
            [PYTHON, "-m", "worker.cli", "db", "upgrade"],
            env=env,
            cwd=self.log_dir,
            check=True,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.STDOUT,
        )
        self.engine = create_engine(self.database_url, pool_size=16, max_overflow=8)
        with self.engine.begin() as connection:
            for statement in BENCH_SCHEMA.split(";"):
                if statement.strip():
                    connection.execute(text(statement))
        port = free_port()
        args = [PYTHON, "-m", "worker.cli", "sandbox", "--port", str(port)]
        for system in SYSTEMS.values():
            args += ["--app", f"{system.appid}:{system.secret}"]
        self.sandbox_process = ManagedProcess(
            "sandbox", args, self._base_env(), self.log_dir / "sandbox.log", cwd=self.log_dir
        ).start()
        self.sandbox = SandboxAdmin(f"http://127.0.0.1:{port}", session=requests.Session())
        self.sandbox.wait_until_ready(timeout_seconds=30)

    def close(self) -> None:
        for process in reversed(self.processes):
            process.stop(timeout_seconds=5)
        self.processes.clear()
        if self.sandbox_process is not None:
            self.sandbox_process.stop(timeout_seconds=5)
            self.sandbox_process = None
        if self.engine is not None:
            self.engine.dispose()
            self.engine = None
        if self.database_url:
            try:
                drop_database(self.config.postgres_url, self.database_url)
            except Exception as error:  # never mask the original failure
                log.warning("could not drop the benchmark database: %s", error)
            self.database_url = ""
        self.redis.stop()

    def _base_env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("WXPHONE_", "BENCH_"))}
        env["PYTHONUNBUFFERED"] = "1"
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
        return env

    # -- systems ------------------------------------------------------------------------------

    def _pool_shape(self, processes: int) -> tuple[int, int]:
        per_process = max(2, DATABASE_CONNECTION_BUDGET // processes)
        size = min(DEFAULT_POOL_SIZE, per_process)
        return size, max(0, min(DEFAULT_MAX_OVERFLOW, per_process - size))

    def _worker_env(self, system: System, run: RunSettings, access_token: str) -> dict[str, str]:
        env = self._base_env()
        assert self.sandbox is not None
        pool_size, overflow = self._pool_shape(run.processes)
        if system.name == "wxphone":
            assert system.redis_db is not None
            settings: dict[str, Any] = {
                "database_url": self.database_url,
                "broker_url": self.redis.url(system.broker_db),
                "redis_url": self.redis.url(system.redis_db),
                "wechat_api_base": self.sandbox.base_url,
                "apps": f"{system.appid}:{system.secret}",
                "log_level": "WARNING",
                "fingerprint_key": FINGERPRINT_KEY,
                "code_lifetime_seconds": run.code_lifetime_seconds,
                "database_pool_size": pool_size,
                "database_max_overflow": overflow,
                **run.wxphone,
            }
            env.update({"WXPHONE_" + key.upper(): str(value) for key, value in settings.items()})
        else:
            env.update(
                {
                    "BENCH_BROKER_URL": self.redis.url(system.broker_db),
                    "BENCH_DATABASE_URL": self.database_url,
                    "BENCH_API_BASE": self.sandbox.base_url,
                    "BENCH_APPID": system.appid,
                    "BENCH_SECRET": system.secret,
                    "BENCH_ACCESS_TOKEN": access_token,
                    "BENCH_DB_POOL_SIZE": str(pool_size),
                    "BENCH_DB_MAX_OVERFLOW": str(overflow),
                }
            )
        return env

    def _reset(self, system: System, run: RunSettings) -> None:
        assert self.sandbox is not None and self.engine is not None
        self.sandbox.reset()
        self.sandbox.configure(**run.sandbox)
        dbs = [system.broker_db] + ([system.redis_db] if system.redis_db is not None else [])
        self.redis.flush(*dbs)
        with self.engine.begin() as connection:
            tables = "users, phone_jobs, login_jobs, code_claims, key_checks, bench_jobs, bench_users"
            connection.execute(text(f"TRUNCATE {tables}"))

    def _fetch_raw_token(self, system: System) -> str:
        """The raw ceiling's one token, fetched by the harness (counted like any other fetch)."""
        assert self.sandbox is not None
        reply = requests.post(
            self.sandbox.base_url + "/cgi-bin/stable_token",
            json={"grant_type": "client_credential", "appid": system.appid, "secret": system.secret},
            timeout=(3.05, 10),
        ).json()
        return str(reply["access_token"])

    def _submitter(self, system: System, run: RunSettings) -> tuple[Submitter, Celery]:
        assert self.engine is not None and self.sandbox is not None
        celery = _plain_celery(self.redis.url(system.broker_db))
        if system.name == "wxphone":
            submitter = WxphoneSubmitter(
                self.engine, celery, run.code_lifetime_seconds, self.sandbox.base_url
            )
            return submitter, celery
        return BenchSubmitter(self.engine, celery, system.task_name, system.queue), celery

    def _rows(self, system: System) -> dict[str, JobRow]:
        assert self.engine is not None
        if system.name == "wxphone":
            sql = "SELECT job_id, created_at, finished_at, status, error_code, started_at FROM phone_jobs"
        else:
            sql = "SELECT job_id, enqueued_at, committed_at, status, error_code, NULL FROM bench_jobs"
        with self.engine.connect() as connection:
            rows = connection.execute(text(sql)).all()
        return {
            row[0]: JobRow(_epoch(row[1]) or 0.0, _epoch(row[2]), row[3], row[4], _epoch(row[5]))
            for row in rows
        }

    def _exchange_ms(self, job_ids: Sequence[str]) -> dict[str, float]:
        """wxphone: how long its phone-number calls took, as the worker timed them, per job."""
        assert self.engine is not None
        with self.engine.connect() as connection:
            rows = connection.execute(
                text(
                    "SELECT job_id, sum(latency_ms) FROM exchange_audit "
                    "WHERE api = 'phone' AND job_id = ANY(:job_ids) GROUP BY job_id"
                ),
                {"job_ids": list(job_ids)},
            ).all()
        return {str(row[0]): float(row[1]) for row in rows}

    def _terminal_count(self, system: System) -> int:
        assert self.engine is not None
        table = "phone_jobs" if system.name == "wxphone" else "bench_jobs"
        with self.engine.connect() as connection:
            return int(
                connection.execute(
                    text(f"SELECT count(*) FROM {table} WHERE status IN ('succeeded', 'failed')")
                ).scalar_one()
            )

    # -- running ------------------------------------------------------------------------------

    def run_system(
        self, system_name: str, run: RunSettings, phases: Sequence[PhaseSpec]
    ) -> list[PhaseResult]:
        """One fresh run of one system through ``phases``; returns one result per phase."""
        system = SYSTEMS[system_name]
        assert self.sandbox is not None
        self._reset(system, run)
        stats_before = self.sandbox.stats()
        token = self._fetch_raw_token(system) if system.name == "raw" else ""
        submitter, celery = self._submitter(system, run)
        workers: list[ManagedProcess] = []
        sampler = ProcessSampler(lambda: [w.pid for w in workers if w.process is not None])
        results: list[PhaseResult] = []
        submitted_total = 0
        try:
            for index, phase in enumerate(phases):
                answers: PacedAnswers | None = None
                if phase.mode == "drain":
                    rate = None
                    items = self._mint(system, phase.jobs, phase.duplicate_fraction)
                    job_ids = self._preload(submitter, system.appid, items)
                    phase_start = time.time()
                    if not workers:
                        workers.extend(self._start_workers(system, run, token))
                        sampler.start()
                else:
                    if not workers:
                        workers.extend(self._start_workers(system, run, token))
                        sampler.start()
                        self._wait_ready(celery, run.processes)
                    rate = phase.rate
                    if phase.rate_of_drain is not None:
                        peak = next((r.jobs_per_second for r in results if r.mode == "drain"), None)
                        rate = max(1.0, (peak or phase.rate) * phase.rate_of_drain)
                    count = max(1, int(rate * phase.seconds))
                    items = self._mint(system, count, phase.duplicate_fraction)
                    phase_start = time.time()
                    if phase.mode == "answer":
                        if not isinstance(submitter, WxphoneSubmitter):
                            raise ValueError("the answer phase measures wxphone's producer only")
                        answers = paced_answers(
                            submitter.producer,
                            submitter.engine,
                            system.appid,
                            items,
                            rate,
                            waiters=self.config.answer_waiters,
                            timeout_seconds=self.config.answer_timeout_seconds,
                        )
                        job_ids = [sample.job_id for sample in answers.samples]
                    else:
                        job_ids = self._paced(submitter, system.appid, items, rate)
                submitted_total += len(job_ids)
                self._wait_terminal(system, submitted_total, workers)
                stats_after = self.sandbox.stats()
                sampler.sample()
                rows = self._rows(system)
                result = self._measure(
                    system,
                    run,
                    phase,
                    rate,
                    job_ids,
                    items,
                    rows,
                    stats_before,
                    stats_after,
                    sampler,
                    phase_start,
                )
                if answers is not None:
                    self._measure_answers(result, run, answers, rows)
                    drained = any(r.mode == "drain" for r in results)
                    result.peak_fraction = phase.rate_of_drain if drained else None
                if index == 0 and workers:
                    result.notes = "includes worker start-up (cold token)"
                results.append(result)
                log.info("%s", _one_line(result))
                stats_before = stats_after
        finally:
            for worker in reversed(workers):
                worker.stop()
                if worker in self.processes:
                    self.processes.remove(worker)
            if workers:
                sampler.stop()
            if isinstance(submitter, WxphoneSubmitter):
                submitter.close()
            celery.close()
        self.results.extend(results)
        return results

    def _start_workers(self, system: System, run: RunSettings, token: str) -> list[ManagedProcess]:
        env = self._worker_env(system, run, token)
        started: list[ManagedProcess] = []
        for index in range(run.processes):
            process = ManagedProcess(
                f"{system.name}-{run.scenario}-w{index}",
                system.worker_args(index, self.config.pool, run.concurrency),
                env,
                self.log_dir
                / f"{system.name}-{run.scenario}-p{run.processes}-c{run.concurrency}-w{index}.log",
                cwd=self.log_dir,
            ).start()
            started.append(process)
            self.processes.append(process)
        if system.name == "wxphone":
            beat = ManagedProcess(
                f"wxphone-{run.scenario}-beat",
                [PYTHON, "-m", "worker.cli", "beat"],
                env,
                self.log_dir / f"wxphone-{run.scenario}-beat.log",
                cwd=self.log_dir,
            ).start()
            # Beat is not a worker: it is stopped with them but not sampled for CPU or RSS.
            self.processes.append(beat)
        return started

    def _wait_ready(self, celery: Celery, processes: int) -> None:
        def all_answer() -> bool:
            replies = celery.control.ping(timeout=0.5)
            return len(replies) >= processes

        wait_for(all_answer, timeout_seconds=60, what=f"{processes} worker(s) to answer a ping", interval=0.2)

    def _mint(self, system: System, count: int, duplicate_fraction: float) -> list[tuple[str, str]]:
        """``count`` submissions (openid, code); a ``duplicate_fraction`` of them repeat a recent one."""
        assert self.sandbox is not None
        duplicates = int(round(count * duplicate_fraction))
        codes: list[str] = []
        remaining = count - duplicates
        while remaining > 0:
            batch = min(remaining, 50_000)
            codes.extend(self.sandbox.mint_phone_codes(system.appid, batch))
            remaining -= batch
        items = [(f"oBench{uuid.uuid4().hex[:20]}", code) for code in codes]
        if duplicates:
            rng = random.Random(20240601)
            # A double tap or a front-end retry: the same (openid, code) again, shortly after.
            positions = sorted(rng.sample(range(1, len(items) + duplicates), duplicates))
            for position in positions:
                position = min(position, len(items))
                source = items[max(0, position - rng.randint(1, 50)) : position]
                items.insert(position, rng.choice(source) if source else items[0])
        return items

    def _preload(self, submitter: Submitter, appid: str, items: Sequence[tuple[str, str]]) -> list[str]:
        with concurrent.futures.ThreadPoolExecutor(max_workers=8) as executor:
            return list(executor.map(lambda item: submitter.submit(appid, item[0], item[1]), items))

    def _paced(
        self, submitter: Submitter, appid: str, items: Sequence[tuple[str, str]], rate: float
    ) -> list[str]:
        """Submit item i at start + i / rate, from a few threads so one slow submit stalls no other."""
        threads = 4
        job_ids: list[str] = [""] * len(items)
        start = time.monotonic() + 0.2

        def lane(lane_index: int) -> None:
            for index in range(lane_index, len(items), threads):
                delay = start + index / rate - time.monotonic()
                if delay > 0:
                    time.sleep(delay)
                openid, code = items[index]
                job_ids[index] = submitter.submit(appid, openid, code)

        with concurrent.futures.ThreadPoolExecutor(max_workers=threads) as executor:
            for future in [executor.submit(lane, n) for n in range(threads)]:
                future.result()
        return job_ids

    def _measure_answers(
        self, result: PhaseResult, run: RunSettings, answers: PacedAnswers, rows: dict[str, JobRow]
    ) -> None:
        exchange_ms = self._exchange_ms([sample.job_id for sample in answers.samples])
        latency = run.sandbox.get("latency_ms")
        _answer_figures(
            result,
            answers,
            rows,
            exchange_ms,
            float(latency) if latency is not None else None,
            self.config.answer_waiters,
        )

    def _wait_terminal(self, system: System, expected: int, workers: Sequence[ManagedProcess]) -> None:
        """Until every submitted job is terminal, or no job finished for ``stall_seconds``."""
        last_count = -1
        last_change = time.monotonic()
        while True:
            count = self._terminal_count(system)
            if count >= expected:
                return
            now = time.monotonic()
            if count != last_count:
                last_count, last_change = count, now
            elif now - last_change >= self.config.stall_seconds:
                log.warning(
                    "%s: %d of %d jobs not terminal; counted as lost", system.name, expected - count, expected
                )
                return
            dead = [w for w in workers if not w.is_running()]
            if dead:
                raise RuntimeError(f"{dead[0].name} exited early:\n{dead[0].output_tail()}")
            time.sleep(0.2)

    def _measure(
        self,
        system: System,
        run: RunSettings,
        phase: PhaseSpec,
        rate: float | None,
        job_ids: Sequence[str],
        items: Sequence[tuple[str, str]],
        rows: dict[str, JobRow],
        stats_before: dict[str, Any],
        stats_after: dict[str, Any],
        sampler: ProcessSampler,
        phase_start: float,
    ) -> PhaseResult:
        mine = [rows[job_id] for job_id in job_ids if job_id in rows]
        terminal = [
            row for row in mine if row.status in ("succeeded", "failed") and row.committed_at is not None
        ]
        succeeded = [row for row in terminal if row.status == "succeeded"]
        failed = [row for row in terminal if row.status == "failed"]
        commit_times = [row.committed_at for row in terminal if row.committed_at is not None]
        latencies = [
            (row.committed_at - row.enqueued_at) * 1000 for row in succeeded if row.committed_at is not None
        ]
        phone = _endpoint_delta(stats_before, stats_after, "phone")
        token_calls = (
            _endpoint_delta(stats_before, stats_after, "token")["calls"]
            + _endpoint_delta(stats_before, stats_after, "stable_token")["calls"]
        )
        result = PhaseResult(
            scenario=run.scenario,
            system=system.name,
            mode=phase.mode,
            processes=run.processes,
            concurrency=run.concurrency,
            submitted=len(job_ids),
            distinct_codes=len({code for _, code in items}),
            succeeded=len(succeeded),
            failed=len(failed),
            lost=len(job_ids) - len(terminal),
            offered_rate=rate,
            latency_ms=latency_summary(latencies),
            token_fetches=int(token_calls),
            phone_calls=int(phone["calls"]),
            phone_errcodes=dict(phone["errcodes"]),
            max_presentations_per_code=_max_presentations(stats_before, stats_after),
            failure_reasons=dict(Counter(row.error_code or "unknown" for row in failed)),
        )
        if not commit_times:
            return result
        first_enqueue = min(row.enqueued_at for row in mine)
        if phase.mode == "drain":
            result.jobs_per_second = windowed_rate(commit_times)
            ordered = sorted(commit_times)
            low = ordered[int(round((len(ordered) - 1) * 0.1))]
            high = ordered[int(round((len(ordered) - 1) * 0.9))]
            in_window = sum(1 for moment in ordered if low <= moment <= high)
            cpu = sampler.cpu_between(low, high)
            result.elapsed_seconds = max(commit_times) - phase_start
        else:
            result.jobs_per_second = len(terminal) / max(1e-6, max(commit_times) - first_enqueue)
            in_window = len(terminal)
            low, high = first_enqueue, max(commit_times)
            cpu = sampler.cpu_between(first_enqueue, max(commit_times))
            result.elapsed_seconds = max(commit_times) - first_enqueue
        if cpu is not None and in_window:
            result.cpu_ms_per_job = cpu * 1000 / in_window
        load = (
            sampler.machine_load_between(low, high)
            if phase.mode == "drain"
            else sampler.machine_load_between(first_enqueue, max(commit_times))
        )
        if load is not None:
            result.machine_busy_cores, result.outside_busy_cores = load
        result.steal_cores = (
            sampler.steal_between(low, high)
            if phase.mode == "drain"
            else sampler.steal_between(first_enqueue, max(commit_times))
        )
        result.max_rss_mb = sampler.max_rss_mb(phase_start)
        return result


def _answer_figures(
    result: PhaseResult,
    answers: PacedAnswers,
    rows: dict[str, JobRow],
    exchange_ms: dict[str, float],
    exchange_latency_ms: float | None,
    waiters: str,
) -> None:
    """Fill the answer fields of ``result`` from the callers' samples and the jobs' own times."""
    answered = [sample for sample in answers.samples if sample.status == "succeeded"]
    result.waiters = waiters
    result.exchange_latency_ms = exchange_latency_ms
    result.answered = len(answered)
    result.unanswered = len(answers.samples) - len(answered)
    result.answer_ms = latency_summary([sample.answer_ms for sample in answered])
    result.answer_lag_ms = latency_summary([sample.lag_ms for sample in answers.samples])
    result.most_waiting = answers.most_in_flight
    if answered:
        result.caller_cpu_ms_per_job = answers.caller_cpu_seconds * 1000 / len(answered)
    result.notify_probe_ms = latency_summary(answers.notify_probe_ms)
    stages = stage_samples(
        answered,
        {job_id: row.started_at for job_id, row in rows.items()},
        {job_id: row.committed_at for job_id, row in rows.items()},
        exchange_ms,
    )
    result.answer_stages_ms = stage_summaries(stages)
    split = len(stages["submit"])
    if split < len(answered) or answers.listener_reconnects:
        result.notes = (
            f"{split} of {len(answered)} answers split into stages; "
            f"listener reconnects during the phase: {answers.listener_reconnects}"
        )


def _endpoint_delta(before: dict[str, Any], after: dict[str, Any], endpoint: str) -> dict[str, Any]:
    old = before["endpoints"].get(endpoint, {})
    new = after["endpoints"].get(endpoint, {})
    errcodes = Counter({str(k): int(v) for k, v in new.get("errcodes", {}).items()})
    errcodes.subtract({str(k): int(v) for k, v in old.get("errcodes", {}).items()})
    return {
        "calls": int(new.get("calls", 0)) - int(old.get("calls", 0)),
        "errcodes": {code: count for code, count in sorted(errcodes.items()) if count},
    }


def _max_presentations(before: dict[str, Any], after: dict[str, Any]) -> int:
    """The most times any code minted since ``before`` reached WeChat's code check."""
    old = Counter({int(k): int(v) for k, v in before.get("code_presentations", {}).items()})
    new = Counter({int(k): int(v) for k, v in after.get("code_presentations", {}).items()})
    grown = [times for times in new if new[times] > old.get(times, 0) and times > 0]
    return max(grown, default=0)


def _one_line(result: PhaseResult) -> str:
    p99 = result.latency_ms.get("p99")
    answer = ""
    if result.mode == "answer":
        p50_answer, p99_answer = result.answer_ms.get("p50") or 0.0, result.answer_ms.get("p99") or 0.0
        answer = (
            f"answer p50={p50_answer:.1f}ms p99={p99_answer:.1f}ms "
            f"(exchange {result.exchange_latency_ms or 0:.0f}ms) answered={result.answered} "
            f"unanswered={result.unanswered} "
        )
    return answer + (
        f"{result.scenario:<20} {result.system:<8} {result.mode:<5} "
        f"p={result.processes} c={result.concurrency} "
        f"jobs={result.submitted} ok={result.succeeded} failed={result.failed} lost={result.lost} "
        f"jobs/s={result.jobs_per_second or 0:.0f} p99={p99 or 0:.0f}ms tokens={result.token_fetches} "
        f"phone={result.phone_calls} errcodes={json.dumps(result.phone_errcodes)} "
        f"cpu/job={result.cpu_ms_per_job or 0:.2f}ms rss={result.max_rss_mb or 0:.0f}MB "
        f"busy={result.machine_busy_cores or 0:.2f} other={result.outside_busy_cores or 0:.2f} "
        f"steal={result.steal_cores or 0:.2f} cores"
    )


# -- scenarios --------------------------------------------------------------------------------


def base_sandbox(config: BenchConfig, **overrides: Any) -> dict[str, Any]:
    settings: dict[str, Any] = {
        "latency_ms": config.latency_ms,
        "token_lifetime_seconds": 7200.0,
        "grace_seconds": 300.0,
        "code_lifetime_seconds": 300.0,
    }
    settings.update(overrides)
    return settings


def scenario_runs(config: BenchConfig) -> Iterator[tuple[str, Callable[[Bench], None]]]:
    """The scenarios of this configuration in order, each a callable on a running :class:`Bench`."""
    peaks: dict[str, float] = {}

    def common_rate() -> float:
        if config.fixed_rate:
            return config.fixed_rate
        if peaks:
            return max(10.0, 0.5 * min(peaks.values()))
        return 100.0

    def comparison(bench: Bench) -> None:
        for name in config.systems:
            run = RunSettings("comparison", config.processes, config.concurrency, base_sandbox(config))
            phases = [
                PhaseSpec("drain", jobs=config.jobs),
                PhaseSpec("paced", rate=100.0, seconds=config.paced_seconds, rate_of_drain=0.5),
            ]
            if name == "wxphone" and config.answer:
                # What a front end's caller waits at the same rate: submit, then wait for the end.
                phases.append(
                    PhaseSpec(
                        "answer",
                        rate=100.0,
                        seconds=config.answer_seconds,
                        rate_of_drain=config.answer_fraction,
                    )
                )
            results = bench.run_system(name, run, phases)
            if results[0].jobs_per_second:
                peaks[name] = results[0].jobs_per_second

    yield "comparison", comparison

    if config.duplicates:

        def duplicates(bench: Bench) -> None:
            rate = common_rate()
            for name in config.systems:
                run = RunSettings("duplicates", config.processes, config.concurrency, base_sandbox(config))
                phase = PhaseSpec(
                    "paced",
                    rate=rate,
                    seconds=config.duplicate_seconds,
                    duplicate_fraction=config.duplicate_fraction,
                )
                bench.run_system(name, run, [phase])

        yield "duplicates", duplicates

    if config.rotation:

        def rotation(bench: Bench) -> None:
            rate = common_rate()
            sandbox = base_sandbox(
                config,
                token_lifetime_seconds=config.rotation_lifetime_seconds,
                grace_seconds=config.rotation_grace_seconds,
            )
            wx: dict[str, Any] = {"token_mode": "classic", "token_check_interval_seconds": 1.0}
            if config.refresh_fraction is not None:
                wx["token_refresh_fraction"] = config.refresh_fraction
            for name in [n for n in config.systems if n != "raw"]:
                run = RunSettings(
                    "rotation", max(2, config.processes), config.concurrency, sandbox, wxphone=wx
                )
                bench.run_system(name, run, [PhaseSpec("paced", rate=rate, seconds=config.rotation_seconds)])

        yield "rotation", rotation

    if config.scaling:

        def scaling_concurrency(bench: Bench) -> None:
            for name in [n for n in config.scaling_systems if n in config.systems]:
                for level in config.concurrency_levels:
                    jobs = _scaled_jobs(level, config)
                    run = RunSettings("scaling-concurrency", 1, level, base_sandbox(config))
                    bench.run_system(name, run, [PhaseSpec("drain", jobs=jobs)])

        def scaling_processes(bench: Bench) -> None:
            for name in config.systems:
                for processes in config.process_levels:
                    run = RunSettings(
                        "scaling-processes", processes, config.concurrency, base_sandbox(config)
                    )
                    bench.run_system(name, run, [PhaseSpec("drain", jobs=config.jobs)])

        yield "scaling-concurrency", scaling_concurrency
        yield "scaling-processes", scaling_processes

    if config.backlog:

        def backlog(bench: Bench) -> None:
            sandbox = base_sandbox(config, code_lifetime_seconds=3600.0)
            for name in [n for n in config.backlog_systems if n in config.systems]:
                for size in config.backlog_sizes:
                    run = RunSettings(
                        "backlog", config.processes, config.concurrency, sandbox, code_lifetime_seconds=3600.0
                    )
                    bench.run_system(name, run, [PhaseSpec("drain", jobs=size)])

        yield "backlog", backlog


def _scaled_jobs(concurrency: int, config: BenchConfig) -> int:
    """Enough jobs for several seconds at that concurrency without making c=1 take minutes."""
    per_slot = 20 if config.quick else 30
    return max(150, min(config.jobs, 3000, concurrency * per_slot))
