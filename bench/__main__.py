"""``python -m bench``: wxphone against a raw Celery ceiling and a hand-rolled baseline.

Starts its own redis-server, a throwaway PostgreSQL database and the wxphone sandbox, runs the
scenarios, prints the tables and writes ``bench/results/latest.json``. Everything it starts is
stopped (and the database dropped) when it ends, also on Ctrl-C.
"""

from __future__ import annotations

import argparse
import logging
import os
import platform
import signal
import subprocess
import sys
import time
from dataclasses import asdict
from pathlib import Path
from types import FrameType
from typing import Any

from bench.answer import WAITER_KINDS
from bench.harness import REPO_ROOT, Bench, BenchConfig, scenario_runs
from bench.report import evaluate_targets, load_results, render_report, write_json

log = logging.getLogger("bench")

SYSTEM_NAMES = ("raw", "baseline", "wxphone")
#: Pools the bench runs every system on: wxphone starts with ``python -m worker worker`` and raw
#: and baseline with ``python -m celery``, both of which patch for gevent before importing anything.
POOLS = ("threads", "gevent")


def _csv_ints(value: str) -> tuple[int, ...]:
    try:
        return tuple(int(part) for part in value.split(",") if part.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {value!r}") from None


def _systems(value: str) -> tuple[str, ...]:
    names = tuple(part.strip() for part in value.split(",") if part.strip())
    unknown = [name for name in names if name not in SYSTEM_NAMES]
    if unknown or not names:
        raise argparse.ArgumentTypeError(f"choose from {', '.join(SYSTEM_NAMES)}")
    return tuple(name for name in SYSTEM_NAMES if name in names)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m bench",
        description="Benchmark wxphone against a raw Celery ceiling and a hand-rolled SDK-style baseline.",
    )
    parser.add_argument("--quick", action="store_true", help="small numbers; finishes in under 3 minutes")
    parser.add_argument("--full", action="store_true", help="also the scaling curves and the backlog runs")
    parser.add_argument("--scaling", action="store_true", help="throughput vs threads and vs processes")
    parser.add_argument("--backlog", action="store_true", help="drain backlogs of 1k/10k/50k jobs")
    parser.add_argument("--latency-ms", type=float, default=50.0, help="sandbox latency per call [50]")
    parser.add_argument(
        "--concurrency", "-c", type=int, default=100, help="threads (or greenlets) per worker process [100]"
    )
    parser.add_argument("--processes", "-p", type=int, default=2, help="worker processes per system [2]")
    parser.add_argument(
        "--pool", default="threads", choices=POOLS, help="Celery pool of all three systems [threads]"
    )
    parser.add_argument("--jobs", type=int, default=None, help="jobs in each drain [5000; quick 1000]")
    parser.add_argument("--only", type=_systems, default=SYSTEM_NAMES, help="systems: raw,baseline,wxphone")
    parser.add_argument("--no-duplicates", action="store_true", help="skip the 10%% duplicate run")
    parser.add_argument("--no-rotation", action="store_true", help="skip the rotating classic token run")
    parser.add_argument("--rate", type=float, default=None, help="jobs/s of the duplicate and rotation runs")
    parser.add_argument(
        "--no-answer", action="store_true", help="skip wxphone's submit-to-answer phase (bench/answer.py)"
    )
    parser.add_argument(
        "--answer-waiters",
        default="asyncio",
        choices=WAITER_KINDS,
        help="how the bench's callers wait for their answer: wait_for_job_async on one event loop, "
        "or wait_for_job in caller threads [asyncio]",
    )
    parser.add_argument(
        "--answer-seconds",
        type=float,
        default=None,
        help="length of the submit-to-answer phase [20; quick 8]",
    )
    parser.add_argument(
        "--answer-fraction",
        type=float,
        default=0.5,
        help="rate of the submit-to-answer phase as a fraction of wxphone's drain rate; the target "
        "is judged only at 0.5 [0.5]",
    )
    parser.add_argument(
        "--refresh-fraction",
        type=float,
        default=None,
        help="WXPHONE_TOKEN_REFRESH_FRACTION in the rotation run [the product default]",
    )
    parser.add_argument("--concurrency-levels", type=_csv_ints, default=None, help="[1,10,50,100,200]")
    parser.add_argument("--process-levels", type=_csv_ints, default=None, help="[1,2,4]")
    parser.add_argument("--backlog-sizes", type=_csv_ints, default=None, help="[1000,10000,50000]")
    parser.add_argument("--scaling-systems", type=_systems, default=("raw", "wxphone"), help="[raw,wxphone]")
    parser.add_argument("--backlog-systems", type=_systems, default=("wxphone",), help="[wxphone]")
    parser.add_argument(
        "--postgres-url",
        default=os.environ.get(
            "WXPHONE_TEST_POSTGRES_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/postgres"
        ),
        help="an existing database to connect to for CREATE/DROP DATABASE [$WXPHONE_TEST_POSTGRES_URL]",
    )
    parser.add_argument("--output", type=Path, default=REPO_ROOT / "bench" / "results" / "latest.json")
    parser.add_argument("--log-dir", type=Path, default=None, help="worker logs [/tmp/wxphone-bench-*]")
    parser.add_argument(
        "--report",
        type=Path,
        default=None,
        metavar="JSON",
        help="print the tables of an earlier run and exit",
    )
    return parser


def config_from(args: argparse.Namespace) -> BenchConfig:
    quick = bool(args.quick)
    config = BenchConfig(
        latency_ms=args.latency_ms,
        processes=args.processes,
        concurrency=args.concurrency,
        pool=args.pool,
        jobs=args.jobs or (1000 if quick else 5000),
        paced_seconds=4.0 if quick else 12.0,
        systems=args.only,
        duplicates=not args.no_duplicates,
        duplicate_seconds=4.0 if quick else 15.0,
        rotation=not args.no_rotation,
        rotation_lifetime_seconds=6.0 if quick else 20.0,
        rotation_grace_seconds=2.0 if quick else 5.0,
        rotation_seconds=15.0 if quick else 60.0,
        refresh_fraction=args.refresh_fraction,
        fixed_rate=args.rate,
        scaling=args.scaling or args.full,
        backlog=args.backlog or args.full,
        scaling_systems=args.scaling_systems,
        backlog_systems=args.backlog_systems,
        postgres_url=args.postgres_url,
        output=args.output,
        log_dir=args.log_dir,
        quick=quick,
        stall_seconds=20.0 if quick else 45.0,
        answer=not args.no_answer,
        answer_seconds=args.answer_seconds or (8.0 if quick else 20.0),
        answer_waiters=args.answer_waiters,
        answer_fraction=args.answer_fraction,
    )
    if quick:
        config.concurrency_levels = (1, 10, 100)
        config.process_levels = (1, 2)
        config.backlog_sizes = (500, 2000)
    if args.concurrency_levels:
        config.concurrency_levels = args.concurrency_levels
    if args.process_levels:
        config.process_levels = args.process_levels
    if args.backlog_sizes:
        config.backlog_sizes = args.backlog_sizes
    return config


def _meta(config: BenchConfig, started: float) -> dict[str, Any]:
    return {
        "started_at": time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(started)),
        "duration_seconds": round(time.time() - started, 1),
        "command": " ".join(["python -m bench", *sys.argv[1:]]),
        "latency_ms": config.latency_ms,
        "pool": config.pool,
        "processes": config.processes,
        "concurrency": config.concurrency,
        "source_commit": _source_commit(),
        "machine": {
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "platform": platform.platform(),
        },
        "config": {
            key: str(value) if isinstance(value, Path) else value for key, value in asdict(config).items()
        },
    }


def _source_commit() -> str | None:
    """The commit measured: ``git rev-parse HEAD`` (``+dirty`` with local changes) or $BENCH_SOURCE_COMMIT."""
    try:
        head = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=REPO_ROOT, capture_output=True, text=True, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=REPO_ROOT,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return os.environ.get("BENCH_SOURCE_COMMIT")
    return head + ("+dirty" if dirty else "")


def _raise_interrupt(signum: int, _frame: FrameType | None) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.report is not None:
        results, targets, meta = load_results(args.report)
        print(render_report(results, targets, meta))  # noqa: T201
        return 0
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    config = config_from(args)
    signal.signal(signal.SIGTERM, _raise_interrupt)
    # Ctrl-C stops the run cleanly even when started from a shell that ignores SIGINT for it.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    started = time.time()
    data: dict[str, Any] = {}
    try:
        with Bench(config) as bench:
            log.info("worker logs in %s", bench.log_dir)
            for name, scenario in scenario_runs(config):
                log.info("-- %s", name)
                scenario(bench)
                targets = evaluate_targets(
                    bench.results, rotation_lifetime_seconds=config.rotation_lifetime_seconds
                )
                data = {
                    "meta": _meta(config, started),
                    "results": [result.as_dict() for result in bench.results],
                    "targets": [target.as_dict() for target in targets],
                }
                write_json(config.output, data)
            print()  # noqa: T201
            print(render_report(bench.results, targets, data["meta"]))  # noqa: T201
            print(f"\nJSON: {config.output}")  # noqa: T201
    except KeyboardInterrupt:
        log.warning("interrupted; everything started was stopped")
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
