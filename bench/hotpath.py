"""``python -m bench.hotpath``: CPU per job of wxphone's domain function against raw's, no Celery.

One process calls :func:`worker.jobs.phone.resolve_phone_job` for fresh codes one after the
other (each job recorded beforehand, as the producer does), then does what the raw ceiling's task
does (one phone call with a fixed token, one upsert) for as many codes, and prints the process
CPU time per job of each, and the CPU time PostgreSQL's processes spent per job meanwhile (the
server shares the machine's cores with the workers, so its work per job costs throughput too).
Celery's own cost (receive, ack, result) is the same for both and left out, so the figures
isolate wxphone's own work; they are steadier than the drain benchmark's because nothing runs
concurrently in the measuring process.
``--profile FILE`` writes a cProfile of the wxphone rounds (CPU time) for ``python -m pstats``.

Starts a private redis-server, a throwaway database and the sandbox (no added latency), like
``python -m bench``.
"""

from __future__ import annotations

import argparse
import cProfile
import os
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

import requests
from sqlalchemy import Engine, create_engine, text

from bench.common import BENCH_SCHEMA, call_phone_api, http_session, record_success
from bench.harness import FINGERPRINT_KEY, PYTHON, REPO_ROOT
from bench.services import (
    ManagedProcess,
    RedisServer,
    cpu_seconds,
    create_database,
    drop_database,
    free_port,
)
from worker.sandbox.admin import SandboxAdmin

APPID = "wxbenchhotpath01"
SECRET = "bench-hotpath-secret-0001"


def postgres_cpu_seconds() -> float:
    """CPU seconds of every running ``postgres`` process (server, backends, background workers)."""
    total = 0.0
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/comm") as handle:
                if handle.read().strip() != "postgres":
                    continue
        except OSError:
            continue
        total += cpu_seconds(int(entry.name))
    return total


Round = Callable[[int], tuple[float, float]]


def _wxphone_round(admin: SandboxAdmin, database_url: str, redis_url: str) -> Round:
    from worker.jobs.phone import record_submission, resolve_phone_job
    from worker.runtime import Runtime
    from worker.settings import Settings

    runtime = Runtime(
        Settings(
            database_url=database_url,
            redis_url=redis_url,
            broker_url=redis_url,
            wechat_api_base=admin.base_url,
            apps=f"{APPID}:{SECRET}",  # type: ignore[arg-type]  # parsed by the settings
            fingerprint_key=FINGERPRINT_KEY,
            log_level="WARNING",
        )
    )

    def run(jobs: int) -> tuple[float, float]:
        codes = admin.mint_phone_codes(APPID, jobs)
        job_ids = [str(uuid.uuid4()) for _ in codes]
        openids = [f"ohotpath{index:06d}{job_id[:8]}" for index, job_id in enumerate(job_ids)]
        with runtime.sessions.begin() as session:  # the producer's rows, not measured
            for job_id, openid in zip(job_ids, openids, strict=True):
                record_submission(
                    session,
                    job_id=job_id,
                    appid=APPID,
                    openid=openid,
                    fingerprint=None,  # front ends leave it to the worker
                    now=datetime.now(UTC),
                    code_lifetime_seconds=300.0,
                )
        spent = 0.0
        postgres_began = postgres_cpu_seconds()
        for job_id, openid, code in zip(job_ids, openids, codes, strict=True):
            began = time.process_time()
            outcome = resolve_phone_job(
                job_id=job_id,
                appid=APPID,
                openid=openid,
                code=code,
                engine=runtime.engine,
                token_service=runtime.token_service,
                client=runtime.wechat_client,
                policy=runtime.job_policy,
                gate=runtime.gate,
                lease=runtime.lease,
                protection=runtime.protection,
            )
            spent += time.process_time() - began
            if outcome.status != "succeeded":
                raise RuntimeError(f"job ended {outcome.status} ({outcome.error_code})")
        return spent / jobs * 1000, (postgres_cpu_seconds() - postgres_began) / jobs * 1000

    return run


def _raw_round(admin: SandboxAdmin, engine: Engine) -> Round:
    session = http_session()
    token = requests.post(
        admin.base_url + "/cgi-bin/stable_token",
        json={"grant_type": "client_credential", "appid": APPID, "secret": SECRET},
        timeout=10,
    ).json()["access_token"]

    def run(jobs: int) -> tuple[float, float]:
        codes = admin.mint_phone_codes(APPID, jobs)
        rows = [(str(uuid.uuid4()), f"orawpath{index:06d}") for index in range(len(codes))]
        with engine.begin() as connection:  # the producer's rows, not measured
            connection.execute(
                text(
                    "INSERT INTO bench_jobs (job_id, appid, openid, enqueued_at) "
                    "VALUES (:job_id, :appid, :openid, now())"
                ),
                [{"job_id": job_id, "appid": APPID, "openid": openid} for job_id, openid in rows],
            )
        spent = 0.0
        postgres_began = postgres_cpu_seconds()
        for (job_id, openid), code in zip(rows, codes, strict=True):
            began = time.process_time()
            reply = call_phone_api(session, admin.base_url, access_token=token, code=code, openid=openid)
            record_success(engine, job_id=job_id, appid=APPID, openid=openid, reply=reply)
            spent += time.process_time() - began
            if reply.errcode != 0:
                raise RuntimeError(f"raw call failed with {reply.errcode}")
        return spent / jobs * 1000, (postgres_cpu_seconds() - postgres_began) / jobs * 1000

    return run


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.hotpath", description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=2000, help="jobs per round [2000]")
    parser.add_argument("--rounds", type=int, default=3, help="measured rounds of each [3]")
    parser.add_argument(
        "--postgres-url",
        default=os.environ.get(
            "WXPHONE_TEST_POSTGRES_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/postgres"
        ),
    )
    parser.add_argument("--profile", type=Path, default=None, help="write a cProfile of one wxphone round")
    parser.add_argument(
        "--setup-sql", default=None, help="SQL run after the migrations (to try a schema change)"
    )
    args = parser.parse_args(argv)

    work_dir = Path(tempfile.mkdtemp(prefix="wxphone-hotpath-"))
    redis_server = RedisServer(work_dir)
    database_url = ""
    sandbox: ManagedProcess | None = None
    engine: Engine | None = None
    try:
        redis_server.start()
        database_url = create_database(args.postgres_url)
        env = {key: value for key, value in os.environ.items() if not key.startswith("WXPHONE_")}
        env["WXPHONE_DATABASE_URL"] = database_url
        migrate = [PYTHON, "-m", "worker.cli", "db", "upgrade"]
        subprocess.run(migrate, env=env, cwd=REPO_ROOT, check=True, capture_output=True)
        engine = create_engine(database_url)
        with engine.begin() as connection:
            for statement in BENCH_SCHEMA.split(";") + (args.setup_sql or "").split(";"):
                if statement.strip():
                    connection.execute(text(statement))
        port = free_port()
        sandbox = ManagedProcess(
            "sandbox",
            [PYTHON, "-m", "worker.cli", "sandbox", "--port", str(port), "--app", f"{APPID}:{SECRET}"],
            env,
            work_dir / "sandbox.log",
            cwd=work_dir,
        ).start()
        admin = SandboxAdmin(f"http://127.0.0.1:{port}", session=requests.Session())
        admin.wait_until_ready(timeout_seconds=30)

        wxphone = _wxphone_round(admin, database_url, redis_server.url(1))
        raw = _raw_round(admin, engine)
        wxphone(200), raw(200)  # warm up: connections, prepared statements, token
        print(f"CPU ms per job, {args.jobs} jobs per round, no Celery")  # noqa: T201
        print("        ------- client -------   ----- PostgreSQL -----")  # noqa: T201
        print("round  wxphone    raw  ratio     wxphone    raw  ratio")  # noqa: T201
        for round_number in range(1, args.rounds + 1):
            (mine, mine_pg), (ceiling, ceiling_pg) = wxphone(args.jobs), raw(args.jobs)
            line = (
                f"{round_number:5d}  {mine:7.3f}  {ceiling:5.3f}  {mine / ceiling:5.2f}"
                f"     {mine_pg:7.3f}  {ceiling_pg:5.3f}  {mine_pg / max(ceiling_pg, 1e-9):5.2f}"
            )
            print(line, flush=True)  # noqa: T201
        if args.profile is not None:
            profiler = cProfile.Profile(time.process_time)
            profiler.runcall(wxphone, args.jobs)
            profiler.dump_stats(args.profile)
            print(f"profile of one wxphone round: {args.profile}")  # noqa: T201
    finally:
        if sandbox is not None:
            sandbox.stop(timeout_seconds=5)
        if engine is not None:
            engine.dispose()
        if database_url:
            drop_database(args.postgres_url, database_url)
        redis_server.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
