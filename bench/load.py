"""``python -m bench.load``: push thousands of phone jobs through real workers and count what was lost.

Starts everything it needs and stops it at the end: a private ``redis-server`` with the
append-only file on (broker and token store, as ``wxphone doctor`` requires), a throwaway
PostgreSQL database (on ``WXPHONE_TEST_POSTGRES_URL``, default the local server; dropped at the
end), the WeChat sandbox with 50 ms latency on the phone endpoint, and ``--workers`` real
``wxphone worker --pool threads --concurrency N`` processes. It submits ``--jobs`` jobs over two
apps through the producer API as fast as it can, waits until every job is terminal (or progress
stops), and prints:

* throughput (jobs/s, end to end and while the workers were busy);
* lost: jobs not terminal after the drain; left running: jobs still ``running``; failed;
* ack errors: worker log lines with ``Couldn't ack``, ``MaxConnectionsError`` or ``Restoring``
  (a failed ack brings the message back only after the visibility timeout);
* WeChat calls per code, and the peak RSS (VmHWM) of each worker process.

Exit status 1 when anything was lost, left running or failed to ack; 0 otherwise.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import re
import shutil
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from celery import Celery
from sqlalchemy import Engine, text

from tests.support.pipeline import DEVELOPMENT_PROTECTION
from tests.support.processes import ManagedProcess, base_environment, sandbox_process, worker_process
from tests.support.services import RedisServer, create_database, drop_database, free_port
from worker.db import make_engine, session_factory, upgrade_to_head
from worker.producer import Producer
from worker.sandbox.admin import SandboxAdmin

APPS = {"wxload0000000001": "load-secret-0001", "wxload0000000002": "load-secret-0002"}
FINGERPRINT_KEY = "load-test-fingerprint-key-0001"
PHONE_LATENCY_MS = 50
SUBMIT_THREADS = 8
ACK_ERROR = re.compile(r"Couldn't ack|MaxConnectionsError|Restoring \d+ unacknowledged")
TERMINAL = ("succeeded", "failed")


@dataclass(frozen=True)
class Figures:
    jobs: int
    workers: int
    concurrency: int
    submit_seconds: float
    drain_seconds: float
    busy_seconds: float
    statuses: Counter[str]
    errors: Counter[str]
    ack_errors: list[str]
    presentations: dict[str, int]
    codes_exchanged: int
    peak_rss_mb: list[float]

    @property
    def lost(self) -> int:
        return self.jobs - sum(self.statuses[status] for status in TERMINAL)

    @property
    def left_running(self) -> int:
        return self.statuses["running"]

    @property
    def failed(self) -> int:
        return self.statuses["failed"]

    def render(self) -> str:
        total = self.workers * self.concurrency
        rate = self.jobs / max(self.busy_seconds, 0.001)
        lines = [
            f"wxphone load: {self.jobs} jobs, {self.workers} workers x --pool threads "
            f"--concurrency {self.concurrency} (= {total} concurrent), sandbox {PHONE_LATENCY_MS} ms",
            f"  submitted in       {self.submit_seconds:8.1f} s"
            f"  ({self.jobs / self.submit_seconds:.0f} jobs/s)",
            f"  all terminal after {self.drain_seconds:8.1f} s"
            f"  ({self.jobs / self.drain_seconds:.0f} jobs/s end to end)",
            f"  workers busy for   {self.busy_seconds:8.1f} s"
            f"  ({rate:.0f} jobs/s, first start to last finish)",
            f"  succeeded          {self.statuses['succeeded']:8d}",
            f"  failed             {self.failed:8d}  {dict(self.errors) if self.errors else ''}",
            f"  lost               {self.lost:8d}  (not terminal after the drain)",
            f"  left running       {self.left_running:8d}",
            f"  ack errors         {len(self.ack_errors):8d}"
            "  (Couldn't ack / MaxConnectionsError / Restoring)",
            f"  WeChat calls/code  {self.presentations}  (presentations -> codes); "
            f"codes exchanged {self.codes_exchanged}",
            "  peak RSS / worker  " + ", ".join(f"{value:.0f} MB" for value in self.peak_rss_mb),
        ]
        lines += [f"    {line}" for line in self.ack_errors[:10]]
        return "\n".join(lines)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.load", description=__doc__.split("\n\n")[0])
    parser.add_argument("--jobs", type=int, default=5000, help="jobs to submit (default 5000)")
    parser.add_argument("--concurrency", type=int, default=100, help="threads per worker (default 100)")
    parser.add_argument("--workers", type=int, default=2, help="worker processes (default 2)")
    parser.add_argument(
        "--stall-seconds",
        type=float,
        default=90,
        help="give up when no job finishes for this long (default 90)",
    )
    parser.add_argument("--keep-logs", action="store_true", help="keep the folder with worker logs")
    return parser.parse_args(argv)


def peak_rss_mb(pid: int) -> float:
    """VmHWM (peak resident set) of one process, in MB."""
    with contextlib.suppress(OSError):
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return 0.0


@contextlib.contextmanager
def services(directory: Path) -> Iterator[tuple[RedisServer, str, SandboxAdmin]]:
    """A private Redis (AOF on), a migrated throwaway database and a sandbox; all removed after."""
    redis_server = RedisServer(directory / "redis", appendonly=True)
    redis_server.start()
    sandbox: ManagedProcess | None = None
    database_url: str | None = None
    try:
        database_url = create_database("wxphone_load")
        upgrade_to_head(database_url)
        port = free_port()
        sandbox = sandbox_process(port, base_environment(), directory).start()
        admin = SandboxAdmin(f"http://127.0.0.1:{port}", timeout=(2.0, 120.0))
        admin.wait_until_ready(timeout_seconds=30)
        for appid, secret in APPS.items():
            admin.register_app(appid, secret)
        admin.configure(latency_ms={"phone": PHONE_LATENCY_MS})
        yield redis_server, database_url, admin
    finally:
        if sandbox is not None:
            sandbox.stop()
        if database_url is not None:
            drop_database(database_url)
        redis_server.stop()


def run(args: argparse.Namespace, directory: Path) -> Figures:
    with services(directory) as (redis_server, database_url, admin):
        env = base_environment(
            database_url=database_url,
            broker_url=redis_server.url(0),
            redis_url=redis_server.url(1),
            wechat_api_base=admin.base_url,
            apps=",".join(f"{appid}:{secret}" for appid, secret in APPS.items()),
            fingerprint_key=FINGERPRINT_KEY,
            log_level="INFO",
        )
        workers = [
            worker_process(env, directory, name=f"load{index}", concurrency=args.concurrency, pool="threads")
            for index in range(args.workers)
        ]
        engine = make_engine(database_url, pool_size=SUBMIT_THREADS, max_overflow=0)
        celery = Celery("frontend", broker=redis_server.url(0))
        celery.conf.update(task_serializer="json", accept_content=["json"])
        try:
            for worker in workers:
                worker.start()
            for worker in workers:
                worker.wait_for_output("ready.", timeout_seconds=120)
            producer = Producer(
                sessions=session_factory(engine),
                celery_app=celery,
                # The workers' keys: against the sandbox on loopback, without keys of their own.
                protection=DEVELOPMENT_PROTECTION,
            )
            per_app = [
                args.jobs // len(APPS) + (1 if index < args.jobs % len(APPS) else 0) for index in range(2)
            ]
            work = [
                (appid, minted.code)
                for appid, count in zip(APPS, per_app, strict=True)
                for minted in admin.mint_phone_codes_detailed(appid, count)
            ]
            started = time.monotonic()
            with concurrent.futures.ThreadPoolExecutor(SUBMIT_THREADS) as pool:
                list(
                    pool.map(
                        lambda item: producer.submit_phone_code(
                            appid=item[1][0], openid=f"oLoad{item[0]:06d}", code=item[1][1]
                        ),
                        enumerate(work),
                    )
                )
            submit_seconds = time.monotonic() - started
            statuses = drain(engine, args.jobs, args.stall_seconds)
            drain_seconds = time.monotonic() - started
            failed_sql = "SELECT error_code, count(*) FROM phone_jobs WHERE status = 'failed' GROUP BY 1"
            with engine.connect() as conn:
                busy = conn.execute(
                    text("SELECT extract(epoch FROM max(finished_at) - min(started_at)) FROM phone_jobs")
                ).scalar_one()
                errors = Counter({str(code): int(count) for code, count in conn.execute(text(failed_sql))})
            # Read logs and memory before stopping: a warm shutdown logs its own restores.
            ack_errors = [
                line for worker in workers for line in worker.output().splitlines() if ACK_ERROR.search(line)
            ]
            rss = [peak_rss_mb(worker.pid) for worker in workers]
            stats = admin.stats()
        finally:
            for worker in workers:
                worker.stop()
            celery.close()
            engine.dispose()
    return Figures(
        jobs=args.jobs,
        workers=args.workers,
        concurrency=args.concurrency,
        submit_seconds=submit_seconds,
        drain_seconds=drain_seconds,
        busy_seconds=float(busy or 0.0),
        statuses=statuses,
        errors=errors,
        ack_errors=ack_errors,
        presentations=dict(stats["code_presentations"]),
        codes_exchanged=int(stats["codes_exchanged"]),
        peak_rss_mb=rss,
    )


def drain(engine: Engine, jobs: int, stall_seconds: float) -> Counter[str]:
    """Wait until every job is terminal, or until none has finished for ``stall_seconds``."""
    last_progress, last_done = time.monotonic(), -1
    while True:
        with engine.connect() as conn:
            statuses = Counter(
                {
                    str(status): int(count)
                    for status, count in conn.execute(
                        text("SELECT status, count(*) FROM phone_jobs GROUP BY 1")
                    )
                }
            )
        done = sum(statuses[status] for status in TERMINAL)
        if done >= jobs:
            return statuses
        if done != last_done:
            last_progress, last_done = time.monotonic(), done
        elif time.monotonic() - last_progress > stall_seconds:
            return statuses
        time.sleep(0.5)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    directory = Path(tempfile.mkdtemp(prefix="wxphone-load-"))
    figures = run(args, directory)
    print(figures.render())  # noqa: T201 - the report is this script's output
    if args.keep_logs:
        print(f"  worker logs in {directory}")  # noqa: T201
    else:
        shutil.rmtree(directory, ignore_errors=True)
    bad = figures.lost or figures.left_running or figures.ack_errors
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
