"""What the two comparison Celery apps (raw ceiling and hand-rolled baseline) share.

Both are configured only through ``BENCH_*`` environment variables set by the harness, use the
same delivery settings as wxphone (copied from :mod:`celeryconfig`, so the comparison follows
any change there), the same HTTP connection pool shape as wxphone's runtime, and record their
outcome with the same single SQL statement, which stamps ``committed_at`` with the database's
clock in the committing transaction.

Tables (created by the harness in the benchmark database, next to wxphone's schema)::

    bench_jobs   job_id, appid, openid, enqueued_at, status, error_code, committed_at
    bench_users  (appid, openid) -> phone fields, like wxphone's users table
"""

from __future__ import annotations

import os
import threading
from dataclasses import dataclass
from typing import Any

import requests
from celery import Celery
from requests.adapters import HTTPAdapter
from sqlalchemy import Engine, create_engine, text

__all__ = [
    "BENCH_SCHEMA",
    "PHONE_PATH",
    "BenchEnv",
    "PhoneReply",
    "bench_env",
    "call_phone_api",
    "http_session",
    "make_celery_app",
    "record_failure",
    "record_success",
    "shared_engine",
]

RAW_TASK = "bench.raw_phone"
RAW_QUEUE = "bench.raw"
BASELINE_TASK = "bench.baseline_phone"
BASELINE_QUEUE = "bench.baseline"

PHONE_PATH = "/wxa/business/getuserphonenumber"
CLASSIC_TOKEN_PATH = "/cgi-bin/token"
#: The same (connect, read) timeouts and pool size as wxphone's WeChat client.
HTTP_TIMEOUT_SECONDS: tuple[float, float] = (3.05, 5.0)
HTTP_POOL_SIZE = 128

BENCH_SCHEMA = """
CREATE TABLE IF NOT EXISTS bench_jobs (
    job_id       varchar(64) PRIMARY KEY,
    appid        varchar(64) NOT NULL,
    openid       varchar(128) NOT NULL,
    enqueued_at  timestamptz NOT NULL,
    status       varchar(16) NOT NULL DEFAULT 'queued',
    error_code   varchar(64),
    committed_at timestamptz
);
CREATE TABLE IF NOT EXISTS bench_users (
    appid             varchar(64) NOT NULL,
    openid            varchar(128) NOT NULL,
    phone_number      varchar(32),
    pure_phone_number varchar(32),
    country_code      varchar(8),
    phone_verified_at timestamptz,
    PRIMARY KEY (appid, openid)
);
"""

#: One statement, one round trip: upsert the user and mark the job, stamped by the database.
_SUCCESS_SQL = text(
    """
    WITH upsert AS (
        INSERT INTO bench_users (appid, openid, phone_number, pure_phone_number, country_code,
                                 phone_verified_at)
        VALUES (:appid, :openid, :phone_number, :pure_phone_number, :country_code, clock_timestamp())
        ON CONFLICT (appid, openid) DO UPDATE SET
            phone_number = EXCLUDED.phone_number,
            pure_phone_number = EXCLUDED.pure_phone_number,
            country_code = EXCLUDED.country_code,
            phone_verified_at = EXCLUDED.phone_verified_at
        RETURNING 1
    )
    UPDATE bench_jobs SET status = 'succeeded', committed_at = clock_timestamp()
    WHERE job_id = :job_id
    """
)
_FAILURE_SQL = text(
    "UPDATE bench_jobs SET status = 'failed', error_code = :error_code, committed_at = clock_timestamp() "
    "WHERE job_id = :job_id"
)

#: Delivery settings mirrored from wxphone's celeryconfig (same broker behaviour for all three).
MIRRORED_CELERY_SETTINGS = (
    "task_serializer",
    "result_serializer",
    "accept_content",
    "result_accept_content",
    "result_expires",
    "task_acks_late",
    "task_reject_on_worker_lost",
    "task_time_limit",
    "task_soft_time_limit",
    "task_track_started",
    "worker_prefetch_multiplier",
    "worker_send_task_events",
    "worker_cancel_long_running_tasks_on_connection_loss",
    "broker_connection_retry_on_startup",
    "broker_pool_limit",
    "redis_max_connections",
    "broker_transport_options",
    "result_backend_transport_options",
    "visibility_timeout",
)


@dataclass(frozen=True)
class BenchEnv:
    """The ``BENCH_*`` variables a comparison worker reads."""

    broker_url: str
    database_url: str
    api_base: str
    appid: str
    secret: str
    access_token: str
    db_pool_size: int
    db_max_overflow: int


def bench_env() -> BenchEnv:
    """Read the ``BENCH_*`` variables (defaults suit an import without a harness, e.g. mypy)."""
    return BenchEnv(
        broker_url=os.environ.get("BENCH_BROKER_URL", "redis://127.0.0.1:6379/0"),
        database_url=os.environ.get("BENCH_DATABASE_URL", "postgresql+psycopg://postgres@127.0.0.1/bench"),
        api_base=os.environ.get("BENCH_API_BASE", "http://127.0.0.1:8780").rstrip("/"),
        appid=os.environ.get("BENCH_APPID", ""),
        secret=os.environ.get("BENCH_SECRET", ""),
        access_token=os.environ.get("BENCH_ACCESS_TOKEN", ""),
        db_pool_size=int(os.environ.get("BENCH_DB_POOL_SIZE", "10")),
        db_max_overflow=int(os.environ.get("BENCH_DB_MAX_OVERFLOW", "20")),
    )


def make_celery_app(name: str, broker_url: str) -> Celery:
    """A Celery app with wxphone's delivery settings; results go to the broker, as in wxphone."""
    import celeryconfig

    app = Celery(name, broker=broker_url, backend=broker_url)
    app.conf.update({key: getattr(celeryconfig, key) for key in MIRRORED_CELERY_SETTINGS})
    return app


def http_session() -> requests.Session:
    """A pooled keep-alive session shaped like wxphone's (no adapter retries)."""
    session = requests.Session()
    session.trust_env = False  # as wxphone's: no environment scan on every call
    adapter = HTTPAdapter(pool_connections=4, pool_maxsize=HTTP_POOL_SIZE, max_retries=0)
    session.mount("http://", adapter)
    return session


_engine_lock = threading.Lock()
_engines: dict[str, Engine] = {}


def shared_engine(env: BenchEnv) -> Engine:
    """The process-wide engine: same pool size as wxphone's defaults, no pre-ping."""
    with _engine_lock:
        engine = _engines.get(env.database_url)
        if engine is None:
            engine = _engines[env.database_url] = create_engine(
                env.database_url,
                pool_size=env.db_pool_size,
                max_overflow=env.db_max_overflow,
                pool_timeout=10,
                connect_args={"application_name": "wxphone-bench"},
            )
        return engine


@dataclass(frozen=True)
class PhoneReply:
    """The decoded reply of one phone-number call: ``errcode`` 0 carries the phone fields."""

    errcode: int
    phone_number: str = ""
    pure_phone_number: str = ""
    country_code: str = ""


def call_phone_api(
    session: requests.Session, api_base: str, *, access_token: str, code: str, openid: str
) -> PhoneReply:
    """POST getuserphonenumber once; raises ``requests.RequestException`` on transport errors."""
    response = session.post(
        api_base + PHONE_PATH,
        params={"access_token": access_token},
        json={"code": code, "openid": openid},
        timeout=HTTP_TIMEOUT_SECONDS,
    )
    body: dict[str, Any] = response.json()
    errcode = int(body.get("errcode", 0))
    if errcode != 0:
        return PhoneReply(errcode)
    info = body["phone_info"]
    return PhoneReply(0, info["phoneNumber"], info["purePhoneNumber"], str(info["countryCode"]))


def record_success(engine: Engine, *, job_id: str, appid: str, openid: str, reply: PhoneReply) -> None:
    """Upsert the user and mark the job succeeded, in one statement and one transaction."""
    with engine.begin() as connection:
        connection.execute(
            _SUCCESS_SQL,
            {
                "job_id": job_id,
                "appid": appid,
                "openid": openid,
                "phone_number": reply.phone_number,
                "pure_phone_number": reply.pure_phone_number,
                "country_code": reply.country_code,
            },
        )


def record_failure(engine: Engine, *, job_id: str, error_code: str) -> None:
    """Mark the job failed (terminal), stamped by the database."""
    with engine.begin() as connection:
        connection.execute(_FAILURE_SQL, {"job_id": job_id, "error_code": error_code})
