"""The migrated schema enforces its invariants, and engines survive server restarts and forks."""

from __future__ import annotations

import os
import threading
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta

import psycopg
import pytest
from sqlalchemy import Engine, exc, insert, select, text
from sqlalchemy.dialects.postgresql import insert as pg_insert

from models import CodeClaim, CodeClaimStatus, PhoneJob, PhoneJobStatus, User
from tests.support.services import create_database, drop_database
from worker import db, runtime
from worker.settings import Settings


@pytest.fixture(scope="module")
def migrated_url() -> Iterator[str]:
    """A private database migrated to head, the way production gets its schema."""
    url = create_database("wxphone_db")
    db.upgrade_to_head(url)
    yield url
    drop_database(url)


@pytest.fixture
def engine(migrated_url: str) -> Iterator[Engine]:
    engine = db.make_engine(migrated_url)
    yield engine
    engine.dispose()


def unique(prefix: str) -> str:
    """Test data keys unique to one test, so tests sharing the database never collide."""
    return f"{prefix}-{uuid.uuid4().hex[:12]}"


def constraint_violated(error: exc.IntegrityError) -> str | None:
    assert isinstance(error.orig, psycopg.Error)
    return error.orig.diag.constraint_name


def phone_job_row(**overrides: object) -> dict[str, object]:
    row: dict[str, object] = {
        "job_id": unique("job"),
        "appid": "wx-app",
        "openid": unique("openid"),
        "code_fingerprint": unique("fp"),
        "code_expires_at": datetime.now(UTC) + timedelta(minutes=5),
    }
    row.update(overrides)
    return row


def test_one_user_row_per_app_and_openid(engine: Engine) -> None:
    openid = unique("openid")
    with engine.begin() as connection:
        connection.execute(insert(User).values(appid="wx-app-a", openid=openid))
        # The same person has a different openid in each app, but openids may coincide across apps.
        connection.execute(insert(User).values(appid="wx-app-b", openid=openid))

    with pytest.raises(exc.IntegrityError) as raised, engine.begin() as connection:
        connection.execute(insert(User).values(appid="wx-app-a", openid=openid))
    assert constraint_violated(raised.value) == "uq_users_appid_openid"


def test_user_upsert_keeps_created_at_and_moves_updated_at(engine: Engine) -> None:
    openid = unique("openid")
    with engine.begin() as connection:
        connection.execute(insert(User).values(appid="wx-app", openid=openid))
        before = connection.execute(select(User.created_at, User.updated_at).filter_by(openid=openid)).one()

    # The path a worker takes to store a number: an upsert, which never runs Python-side onupdate.
    upsert = pg_insert(User).values(appid="wx-app", openid=openid, country_code="86")
    upsert = upsert.on_conflict_do_update(
        index_elements=[User.appid, User.openid], set_={"country_code": upsert.excluded.country_code}
    )
    with engine.begin() as connection:
        connection.execute(upsert)
        after = connection.execute(
            select(User.created_at, User.updated_at, User.country_code).filter_by(openid=openid)
        ).one()

    assert after.created_at == before.created_at
    assert after.updated_at > before.updated_at
    assert after.country_code == "86"


@pytest.mark.parametrize("status", list(PhoneJobStatus))
def test_phone_jobs_accept_every_known_status(engine: Engine, status: PhoneJobStatus) -> None:
    with engine.begin() as connection:
        connection.execute(insert(PhoneJob).values(**phone_job_row(status=status.value)))


def test_phone_jobs_start_queued_with_no_attempts(engine: Engine) -> None:
    row = phone_job_row()
    with engine.begin() as connection:
        connection.execute(insert(PhoneJob).values(**row))
        job = connection.execute(
            select(PhoneJob.status, PhoneJob.attempts).filter_by(job_id=row["job_id"])
        ).one()
    assert (job.status, job.attempts) == ("queued", 0)


@pytest.mark.parametrize(
    ("table", "row", "constraint"),
    [
        (PhoneJob, phone_job_row(status="done"), "ck_phone_jobs_status"),
        (PhoneJob, phone_job_row(attempts=-1), "ck_phone_jobs_attempts_not_negative"),
        (
            CodeClaim,
            {"appid": "wx-app", "code_fingerprint": unique("fp"), "job_id": unique("job"), "status": "done"},
            "ck_code_claims_status",
        ),
    ],
)
def test_unknown_statuses_are_refused(
    engine: Engine, table: type[PhoneJob] | type[CodeClaim], row: dict[str, object], constraint: str
) -> None:
    with pytest.raises(exc.IntegrityError) as raised, engine.begin() as connection:
        connection.execute(insert(table).values(**row))
    assert constraint_violated(raised.value) == constraint


def claim_code(engine: Engine, *, appid: str, fingerprint: str, job_id: str) -> bool:
    """Try to become the owner of a code's exchange; True if this submission won."""
    statement = (
        pg_insert(CodeClaim)
        .values(appid=appid, code_fingerprint=fingerprint, job_id=job_id)
        .on_conflict_do_nothing(index_elements=[CodeClaim.appid, CodeClaim.code_fingerprint])
        .returning(CodeClaim.job_id)
    )
    with engine.begin() as connection:
        return connection.execute(statement).first() is not None


def test_only_the_first_submission_of_a_code_claims_it_even_when_racing(engine: Engine) -> None:
    fingerprint = unique("fp")
    racers = 8
    barrier = threading.Barrier(racers)
    winners: list[str] = []

    def submit(job_id: str) -> None:
        barrier.wait(timeout=10)
        if claim_code(engine, appid="wx-app", fingerprint=fingerprint, job_id=job_id):
            winners.append(job_id)

    threads = [threading.Thread(target=submit, args=(f"job-{n}",)) for n in range(racers)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)

    assert len(winners) == 1
    with engine.connect() as connection:
        claim = connection.execute(
            select(CodeClaim.job_id, CodeClaim.status).filter_by(code_fingerprint=fingerprint)
        ).one()
    assert claim.job_id == winners[0]
    assert claim.status == CodeClaimStatus.PENDING
    # The same code in another app is a different claim.
    assert claim_code(engine, appid="wx-other-app", fingerprint=fingerprint, job_id="job-other")


def backend_pid(engine: Engine) -> int:
    with engine.connect() as connection:
        return int(connection.execute(text("SELECT pg_backend_pid()")).scalar_one())


def test_engine_replaces_a_connection_the_server_dropped(engine: Engine, migrated_url: str) -> None:
    """After a PostgreSQL restart or failover the next checkout works instead of raising."""
    first = backend_pid(engine)  # now idle in the pool
    killer = db.make_engine(migrated_url)
    try:
        with killer.connect() as connection:
            assert connection.execute(text("SELECT pg_terminate_backend(:pid)"), {"pid": first}).scalar_one()
    finally:
        killer.dispose()

    assert backend_pid(engine) != first


def test_sessions_return_their_connection_and_leave_objects_readable(engine: Engine) -> None:
    openid = unique("openid")
    factory = db.session_factory(engine)
    with factory.begin() as session:
        user = User(appid="wx-app", openid=openid)
        session.add(user)

    assert engine.pool.checkedout() == 0  # type: ignore[attr-defined]
    # Reading after commit must not quietly start another transaction on a pooled connection.
    assert user.openid == openid
    assert engine.pool.checkedout() == 0  # type: ignore[attr-defined]


@pytest.mark.parametrize("disposes_after_fork", [True, False], ids=["worker_process_init", "no_signal"])
def test_forked_worker_process_opens_its_own_connection(
    migrated_url: str, disposes_after_fork: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """What Celery's prefork pool does: fork with a warm pool, then run tasks in the child.

    ``worker_process_init`` runs :func:`worker.runtime.reset_runtime`, which drops the inherited
    engine's pooled connections; without it the engine's own per-process check must still keep
    the child off the parent's connection.
    """
    # On loopback (a sandbox's base): the development keys stand in, as for any test worker.
    process_runtime = runtime.Runtime(
        Settings(database_url=migrated_url, wechat_api_base="http://127.0.0.1:9")
    )
    monkeypatch.setattr(runtime, "_runtime", process_runtime)
    engine = process_runtime.engine
    parent_backend = backend_pid(engine)  # leaves a connection idle in the inherited pool
    read_end, write_end = os.pipe()
    child = os.fork()
    if child == 0:  # pragma: no cover - runs in the child, reports through the pipe
        status = 1
        try:
            inherited = engine.pool.checkedin()  # type: ignore[attr-defined]
            if disposes_after_fork:
                runtime.reset_runtime()
                inherited = engine.pool.checkedin()  # type: ignore[attr-defined]
            os.write(write_end, f"{inherited} {backend_pid(engine)}".encode())
            status = 0
        finally:
            os._exit(status)
    os.close(write_end)
    with os.fdopen(read_end) as pipe:
        report = pipe.read().split()
    _, wait_status = os.waitpid(child, 0)

    assert os.waitstatus_to_exitcode(wait_status) == 0
    inherited, child_backend = (int(value) for value in report)
    assert inherited == (0 if disposes_after_fork else 1)
    assert child_backend != parent_backend
    # The parent's pooled connection was left intact by the child.
    assert backend_pid(engine) == parent_backend
    engine.dispose()
