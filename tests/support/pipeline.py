"""A running wxphone for integration tests: migrated database, sandbox, real worker processes.

Producers in tests use a plain Celery client (no wxphone task imports), exactly as a web front
end in another codebase would.
"""

from __future__ import annotations

import subprocess
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from celery import Celery
from sqlalchemy import Engine, text
from sqlalchemy.orm import Session, sessionmaker

from tests.support.processes import WXPHONE, ManagedProcess, base_environment, beat_process, worker_process
from tests.support.waiting import wait_for
from worker.crypto import BlindIndex, DataProtection, FieldCipher
from worker.db import make_engine, session_factory
from worker.producer import JobView, Producer
from worker.sandbox.admin import SandboxAdmin
from worker.settings import (
    DEVELOPMENT_BLIND_INDEX_KEY,
    DEVELOPMENT_ENCRYPTION_KEY_VERSION,
    DEVELOPMENT_ENCRYPTION_KEYS,
    RABBITMQ_URL_SCHEMES,
    parse_encryption_keys,
)

APPS: dict[str, str] = {"wxpipeline000001": "pipeline-secret-1", "wxpipeline000002": "pipeline-secret-2"}
FINGERPRINT_KEY = "pipeline-test-fingerprint-key"
#: The keys of the tests' workers: they run against the sandbox on loopback without keys of their
#: own, so they use the development keys. The test process reads their rows with the same ones
#: (its own settings point at the real WeChat, where development keys are refused).
DEVELOPMENT_PROTECTION = DataProtection(
    cipher=FieldCipher(
        parse_encryption_keys(DEVELOPMENT_ENCRYPTION_KEYS), DEVELOPMENT_ENCRYPTION_KEY_VERSION
    ),
    blind_index=BlindIndex(DEVELOPMENT_BLIND_INDEX_KEY),
)
TERMINAL = {"succeeded", "failed"}
#: The brokers wxphone supports; a test runs on each with
#: ``@pytest.mark.parametrize("broker", BROKERS)`` (the ``pipeline`` fixture follows it).
BROKERS = ("redis", "rabbitmq")


def plain_celery_client(broker_url: str, backend_url: str | None = None) -> Celery:
    """A Celery client that knows wxphone only by task names (results in ``backend_url``, by
    default the broker: a RabbitMQ broker needs the token store's Redis given instead)."""
    client = Celery("frontend", broker=broker_url, backend=backend_url or broker_url)
    client.conf.update(task_serializer="json", accept_content=["json"], result_serializer="json")
    return client


@dataclass
class Pipeline:
    """Handles on one running wxphone: settings, database, sandbox and its processes."""

    database_url: str
    broker_url: str
    redis_url: str
    sandbox: SandboxAdmin
    log_dir: Path
    settings: dict[str, Any]
    engine: Engine
    sessions: sessionmaker[Session]
    celery: Celery
    producer: Producer
    processes: list[ManagedProcess] = field(default_factory=list)

    @property
    def env(self) -> dict[str, str]:
        return base_environment(**self.settings)

    def start_worker(self, name: str = "w1", *, concurrency: int = 2, **options: Any) -> ManagedProcess:
        process = self.start_worker_process(name, concurrency=concurrency, **options)
        process.wait_for_output("ready.", timeout_seconds=60)
        return process

    def start_worker_process(self, name: str, *, concurrency: int = 2, **options: Any) -> ManagedProcess:
        """Start a worker without waiting for it to be ready (it may be meant to refuse)."""
        process = worker_process(
            self.env, self.log_dir, name=name, concurrency=concurrency, **options
        ).start()
        self.processes.append(process)
        return process

    def start_beat(self, name: str = "beat") -> ManagedProcess:
        process = beat_process(self.env, self.log_dir, name=name).start()
        self.processes.append(process)
        return process

    def stop_all(self) -> None:
        for process in reversed(self.processes):
            process.stop()
        self.processes.clear()

    def submit(self, appid: str, openid: str, code: str) -> str:
        return self.producer.submit_phone_code(appid=appid, openid=openid, code=code)

    def send_by_name(self, name: str, **kwargs: Any) -> str:
        result = self.celery.send_task(name, kwargs=kwargs, queue="wxphone")
        return str(result.id)

    def wait_for_job(self, job_id: str, *, timeout_seconds: float = 60) -> JobView:
        def finished() -> JobView | None:
            job = self.producer.get_job(job_id)
            return job if job is not None and job.status in TERMINAL else None

        job = wait_for(finished, timeout_seconds=timeout_seconds, interval_seconds=0.1, what=f"job {job_id}")
        assert job is not None
        return job

    def wait_for_jobs(self, job_ids: list[str], *, timeout_seconds: float = 120) -> list[JobView]:
        return [self.wait_for_job(job_id, timeout_seconds=timeout_seconds) for job_id in job_ids]

    def sandbox_endpoint(self, endpoint: str) -> Mapping[str, Any]:
        stats: Mapping[str, Any] = self.sandbox.stats()["endpoints"].get(endpoint, {})
        return stats

    def count(self, sql: str, **params: Any) -> int:
        with self.engine.connect() as conn:
            return int(conn.execute(text(sql), params).scalar_one())


def result_backend_for(broker_url: str, redis_url: str) -> str:
    """Where wxphone keeps task results with this broker (``Settings.result_backend_url``)."""
    return redis_url if broker_url.startswith(RABBITMQ_URL_SCHEMES) else broker_url


@contextmanager
def running_pipeline(
    *,
    database_url: str,
    broker_url: str,
    redis_url: str,
    sandbox: SandboxAdmin,
    log_dir: Path,
    **settings: Any,
) -> Iterator[Pipeline]:
    """Register the apps in the sandbox and yield a :class:`Pipeline` (no processes started yet)."""
    for appid, secret in APPS.items():
        sandbox.register_app(appid, secret)
    engine = make_engine(database_url)
    with engine.begin() as conn:
        conn.execute(text("TRUNCATE users, phone_jobs, login_jobs, code_claims, key_checks"))
    all_settings: dict[str, Any] = {
        "database_url": database_url,
        "broker_url": broker_url,
        "redis_url": redis_url,
        "wechat_api_base": sandbox.base_url,
        "apps": ",".join(f"{appid}:{secret}" for appid, secret in APPS.items()),
        "fingerprint_key": FINGERPRINT_KEY,
        "log_level": "INFO",
        **settings,
    }
    sessions = session_factory(engine)
    celery = plain_celery_client(broker_url, result_backend_for(broker_url, redis_url))
    pipeline = Pipeline(
        database_url=database_url,
        broker_url=broker_url,
        redis_url=redis_url,
        sandbox=sandbox,
        log_dir=log_dir,
        settings=all_settings,
        engine=engine,
        sessions=sessions,
        celery=celery,
        producer=Producer(sessions=sessions, celery_app=celery, protection=DEVELOPMENT_PROTECTION),
    )
    try:
        yield pipeline
    finally:
        pipeline.stop_all()
        pipeline.producer.close()
        celery.close()
        engine.dispose()


# -- helpers for pipeline tests ---------------------------------------------------------------

#: Worker settings that make retry backoff short enough for tests (seconds).
FAST_RETRY_SETTINGS: dict[str, Any] = {"retry_backoff_base_seconds": 0.2, "retry_backoff_max_seconds": 0.5}


@dataclass(frozen=True)
class EndpointCounts:
    """One sandbox endpoint's counters: requests, errcodes received (keys as strings), tokens."""

    calls: int
    errcodes: dict[str, int]
    tokens_issued: int


def endpoint_counts(sandbox: SandboxAdmin, endpoint: str) -> EndpointCounts:
    stats = sandbox.stats()["endpoints"].get(endpoint, {})
    return EndpointCounts(
        calls=int(stats.get("calls", 0)),
        errcodes={str(key): int(value) for key, value in stats.get("errcodes", {}).items()},
        tokens_issued=int(stats.get("tokens_issued", 0)),
    )


def phone_job_row(pipeline: Pipeline, job_id: str) -> dict[str, Any] | None:
    """Every column of one ``phone_jobs`` row, or None."""
    with pipeline.engine.connect() as conn:
        row = (
            conn.execute(text("SELECT * FROM phone_jobs WHERE job_id = :job_id"), {"job_id": job_id})
            .mappings()
            .one_or_none()
        )
    return dict(row) if row is not None else None


def user_row(pipeline: Pipeline, appid: str, openid: str) -> dict[str, Any] | None:
    """Every column of one ``users`` row, or None."""
    with pipeline.engine.connect() as conn:
        row = (
            conn.execute(
                text("SELECT * FROM users WHERE appid = :appid AND openid = :openid"),
                {"appid": appid, "openid": openid},
            )
            .mappings()
            .one_or_none()
        )
    return dict(row) if row is not None else None


def producer_with_policy(pipeline: Pipeline, *, code_lifetime_seconds: float) -> Producer:
    """A producer on the pipeline's database and broker with its own code lifetime: a job's code
    expiry is fixed by whoever records it first."""
    return Producer(
        sessions=pipeline.sessions,
        celery_app=pipeline.celery,
        code_lifetime_seconds=code_lifetime_seconds,
        protection=DEVELOPMENT_PROTECTION,
    )


def run_cli(pipeline: Pipeline, *args: str, timeout_seconds: float = 60) -> subprocess.CompletedProcess[str]:
    """Run ``wxphone ARGS...`` as a subprocess with the pipeline's settings."""
    return subprocess.run(
        [*WXPHONE, *args],
        env=pipeline.env,
        capture_output=True,
        text=True,
        timeout=timeout_seconds,
        check=False,
    )
