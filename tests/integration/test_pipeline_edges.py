"""The phone path at its edges, with real worker processes, PostgreSQL, Redis and the sandbox:

* a reply that lands after its job was closed changes nothing, and an older verification that
  finishes last never replaces a newer number;
* a publish that raised after the broker stored the message does not fail a job a worker took up;
* a repeated submission waiting for a held-up first one backs off;
* a message or a WeChat reply that no row can hold ends its job at once, without looping;
* a message reusing another user's job id changes nothing of that job;
* a failure whose commit is lost keeps its audit row when its write is sent again.
"""

from __future__ import annotations

import contextlib
import re
import socket
import threading
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import redis
from sqlalchemy import text
from sqlalchemy.engine import make_url

from tests.support.pipeline import Pipeline, endpoint_counts, phone_job_row, user_row
from tests.support.services import free_port
from tests.support.waiting import wait_for
from worker.producer import Producer

APPID = "wxpipeline000001"
RESOLVE_PHONE = "wxphone.resolve_phone"
LOGIN = "wxphone.login"


def _job_status(pipeline: Pipeline, job_id: str) -> str | None:
    row = phone_job_row(pipeline, job_id)
    return None if row is None else str(row["status"])


# -- a late reply, an older verification -------------------------------------------------------


def test_a_reply_landing_after_its_job_was_closed_writes_no_number(pipeline: Pipeline) -> None:
    pipeline.start_worker(concurrency=2, pool="threads")
    pipeline.sandbox.inject_fault("phone", latency_ms=3000, timing="after")
    code = pipeline.sandbox.mint_phone_code(APPID, pure_phone_number="13611112222")
    job_id = pipeline.submit(APPID, "oLateReply0001", code)
    wait_for(lambda: pipeline.sandbox.pending_faults() == [], timeout_seconds=30, what="the held reply")
    # While WeChat's reply is on its way, the job is closed (as the sweep closes a job it believes
    # lost, or another run records its failure).
    with pipeline.engine.begin() as conn:
        conn.execute(
            text("UPDATE phone_jobs SET status = 'failed', error_code = 'worker_lost', finished_at = now() "
                 "WHERE job_id = :job_id"),
            {"job_id": job_id},
        )  # fmt: skip
    wait_for(
        lambda: pipeline.count("SELECT count(*) FROM exchange_audit WHERE job_id = :j", j=job_id) == 1,
        timeout_seconds=30,
        what="the late reply to be recorded in the audit trail",
    )

    job = pipeline.producer.get_job(job_id)
    assert job is not None and (job.status, job.error_code) == ("failed", "worker_lost")
    assert user_row(pipeline, APPID, "oLateReply0001") is None  # the number stays with WeChat's reply
    assert pipeline.count("SELECT count(*) FROM code_claims WHERE status = 'succeeded'") == 0


def test_an_older_verification_finishing_last_keeps_the_newer_number(pipeline: Pipeline) -> None:
    # One thread: the jobs run in submission order. The first (older) tap meets "system busy" and
    # retries; the second (newer) tap succeeds meanwhile; then the older one succeeds too.
    process = pipeline.start_worker(concurrency=1, pool="threads")
    openid = "oTwoTaps000001"
    older, newer = "13800000001", "13900000002"
    older_code = pipeline.sandbox.mint_phone_code(APPID, phone_number=older, pure_phone_number=older)
    newer_code = pipeline.sandbox.mint_phone_code(APPID, phone_number=newer, pure_phone_number=newer)
    pipeline.sandbox.inject_fault("phone", errcode=-1, times=1)
    older_job = pipeline.submit(APPID, openid, older_code)
    newer_job = pipeline.submit(APPID, openid, newer_code)

    jobs = pipeline.wait_for_jobs([older_job, newer_job], timeout_seconds=60)
    assert [(job.status, job.attempts) for job in jobs] == [("succeeded", 2), ("succeeded", 1)]
    assert jobs[0].finished_at is not None and jobs[1].finished_at is not None
    assert jobs[0].finished_at > jobs[1].finished_at  # the older verification finished last
    user = pipeline.producer.get_user(appid=APPID, openid=openid)
    assert user is not None and user.pure_phone_number == newer
    assert "a newer verification of this user is stored" in process.output()
    assert older not in process.output() and newer not in process.output()


# -- the enqueue-failure path --------------------------------------------------------------------


class _PublishThenRaise:
    """A Celery client whose publish reaches the broker and then raises (a lost publisher
    confirm, a connection dropped after the write), once the worker has finished the job."""

    def __init__(self, pipeline: Pipeline) -> None:
        self.pipeline = pipeline
        self.conf = pipeline.celery.conf  # the producer reads the broker URL and its options

    def send_task(self, name: str, **options: Any) -> Any:
        self.pipeline.celery.send_task(name, **options)
        job_id = options["task_id"]
        wait_for(
            lambda: _job_status(self.pipeline, job_id) == "succeeded",
            timeout_seconds=30,
            what="the worker to finish the published job",
        )
        raise ConnectionResetError("connection reset after the message was stored")


def test_a_publish_that_raised_after_the_message_landed_does_not_fail_the_finished_job(
    pipeline: Pipeline,
) -> None:
    pipeline.start_worker(concurrency=2, pool="threads")
    producer = Producer(
        sessions=pipeline.sessions,
        celery_app=_PublishThenRaise(pipeline),
        protection=pipeline.producer.protection,
    )
    code = pipeline.sandbox.mint_phone_code(APPID, pure_phone_number="13622223333")
    job_id = producer.submit_phone_code(appid=APPID, openid="oPublished0001", code=code)

    job = pipeline.producer.get_job(job_id)
    assert job is not None and (job.status, job.error_code) == ("succeeded", None)
    user = pipeline.producer.get_user(appid=APPID, openid="oPublished0001")
    assert user is not None and user.pure_phone_number == "13622223333"


# -- a repeated submission backs off -------------------------------------------------------------


def test_a_repeated_submission_backs_off_while_the_first_is_held_up(pipeline: Pipeline) -> None:
    # The first submission meets "system busy" again and again (retry backoff 1, 2, 4, 8 s), and
    # its repeat waits for it all that time.
    process = pipeline.start_worker(concurrency=2, pool="threads")
    pipeline.sandbox.inject_fault("phone", errcode=-1, times=5)
    code = pipeline.sandbox.mint_phone_code(APPID, pure_phone_number="13633334444")
    first = pipeline.submit(APPID, "oHeldUp000001", code)
    wait_for(lambda: pipeline.sandbox.pending_faults() != [] and _job_status(pipeline, first) == "retrying",
             timeout_seconds=30, what="the first submission to be held up")  # fmt: skip
    repeat = pipeline.submit(APPID, "oHeldUp000001", code)

    jobs = pipeline.wait_for_jobs([first, repeat], timeout_seconds=90)
    assert [(job.status, job.error_code) for job in jobs] == [("succeeded", None)] * 2
    waited = (jobs[0].finished_at - jobs[1].created_at).total_seconds()  # type: ignore[operator]
    runs = len(re.findall(rf"wxphone\.resolve_phone\[{repeat}\] received", process.output()))
    # At 0.25 s a look it would run ~4 times a second; backing off 1.5x to 8 s it runs about a
    # dozen times in the ~10-15 s the first one takes.
    assert waited > 4, f"the first submission was not held up long enough ({waited:.1f}s)"
    assert runs <= 6 + waited / 2, f"the repeat ran {runs} times in {waited:.1f}s"
    assert endpoint_counts(pipeline.sandbox, "phone").calls == 6  # 5 busy replies, 1 exchange


# -- what no row can hold ---------------------------------------------------------------------


def test_a_task_id_no_job_row_can_hold_ends_at_once(pipeline: Pipeline) -> None:
    process = pipeline.start_worker(concurrency=2, pool="threads")
    code = pipeline.sandbox.mint_phone_code(APPID, pure_phone_number="13644445555")
    kwargs = {"appid": APPID, "openid": "oLongTaskId001", "code": code}
    for task_id in ("x" * 65, "nul\x00inside"):
        result = pipeline.celery.send_task(RESOLVE_PHONE, kwargs=kwargs, task_id=task_id, queue="wxphone")
        assert result.get(timeout=30)["error_code"] == "invalid_job_id"
    login_code, _ = pipeline.sandbox.mint_login_code(APPID)
    login = pipeline.celery.send_task(
        LOGIN, kwargs={"appid": APPID, "js_code": login_code}, task_id="y" * 65, queue="wxphone"
    )
    assert login.get(timeout=30) == {"status": "failed", "error_code": "invalid_job_id"}

    assert "database error" not in process.output()  # refused before any SQL, never retried
    assert pipeline.count("SELECT count(*) FROM phone_jobs") == 0
    assert endpoint_counts(pipeline.sandbox, "phone").calls == 0
    assert endpoint_counts(pipeline.sandbox, "login").calls == 0  # the login code is not spent
    # The code itself is fine: submitted properly, it succeeds.
    job = pipeline.wait_for_job(pipeline.submit(**kwargs), timeout_seconds=30)
    assert job.status == "succeeded"


def test_a_wechat_reply_with_a_country_code_no_column_holds_ends_the_job(pipeline: Pipeline) -> None:
    process = pipeline.start_worker(concurrency=2, pool="threads")
    code = pipeline.sandbox.mint_phone_code(APPID, pure_phone_number="13655556666", country_code="123456789")
    job = pipeline.wait_for_job(pipeline.submit(APPID, "oLongCountry001", code), timeout_seconds=30)

    assert (job.status, job.error_code, job.attempts) == ("failed", "invalid_reply", 1)
    assert endpoint_counts(pipeline.sandbox, "phone").calls == 1  # not presented again
    assert user_row(pipeline, APPID, "oLongCountry001") is None
    assert "database error" not in process.output()
    assert "13655556666" not in process.output()


def test_a_permanent_database_error_ends_the_job_instead_of_looping(pipeline: Pipeline) -> None:
    # PostgreSQL refuses to record a running claim of this job for a reason that will not go away.
    job_id = str(uuid.uuid4())
    with pipeline.engine.begin() as conn:
        conn.execute(
            text(
                "CREATE FUNCTION test_refuse_claim() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN "
                f"IF NEW.job_id = '{job_id}' AND NEW.status = 'running' THEN "
                "RAISE EXCEPTION USING ERRCODE = 'check_violation'; END IF; RETURN NEW; END $$"
            )
        )
        conn.execute(
            text(
                "CREATE TRIGGER test_refuse_claim BEFORE INSERT OR UPDATE ON phone_jobs "
                "FOR EACH ROW EXECUTE FUNCTION test_refuse_claim()"
            )
        )
    try:
        process = pipeline.start_worker(concurrency=2, pool="threads")
        code = pipeline.sandbox.mint_phone_code(APPID, pure_phone_number="13666667777")
        kwargs = {"appid": APPID, "openid": "oRefused000001", "code": code}
        result = pipeline.celery.send_task(RESOLVE_PHONE, kwargs=kwargs, task_id=job_id, queue="wxphone")
        assert result.get(timeout=30)["error_code"] == "database_rejected"
        assert "database error, job retries" not in process.output()
        assert endpoint_counts(pipeline.sandbox, "phone").calls == 0  # the code stays unspent
    finally:
        with pipeline.engine.begin() as conn:
            conn.execute(text("DROP TRIGGER test_refuse_claim ON phone_jobs"))
            conn.execute(text("DROP FUNCTION test_refuse_claim()"))


# -- a job id reused by another message; a failure whose commit is lost ------------------------


def test_a_message_whose_kwargs_do_not_match_its_job_row_does_not_close_that_job(pipeline: Pipeline) -> None:
    """The task id is the job id, and any Celery-protocol producer may send the task by name. A
    message that reuses the id of a recorded job (a front end retrying a publish with its own
    idempotency key, a bug, a hostile sender) but names another user and code fails
    ``job_id_reused`` without touching that job or presenting its code; the job's own message
    then resolves it."""
    code_a = pipeline.sandbox.mint_phone_code(APPID, pure_phone_number="13600000001")
    code_b = pipeline.sandbox.mint_phone_code(APPID, pure_phone_number="13600000002")
    job_id = pipeline.submit(APPID, "oRowOwner00001", code_a)
    # Another message with the same task id, for another user and code, ahead of the first.
    with redis.Redis.from_url(pipeline.broker_url, socket_timeout=5) as client:
        [raw] = client.lrange("wxphone", 0, -1)
        client.delete("wxphone")
    reused = pipeline.celery.send_task(
        RESOLVE_PHONE, kwargs={"appid": APPID, "openid": "oOtherUser0001", "code": code_b},
        task_id=job_id, queue="wxphone",
    )  # fmt: skip
    with redis.Redis.from_url(pipeline.broker_url, socket_timeout=5) as client:
        client.lpush("wxphone", raw)  # the job's own message, after the other one
    pipeline.start_worker(concurrency=1, pool="threads")
    wait_for(
        lambda: (phone_job_row(pipeline, job_id) or {}).get("status") in {"succeeded", "failed"},
        timeout_seconds=30,
        what="the job",
    )
    row = phone_job_row(pipeline, job_id)
    assert row is not None and (row["status"], row["openid"], row["attempts"]) == (
        "succeeded",
        "oRowOwner00001",
        1,
    )
    owner = pipeline.producer.get_user(appid=APPID, openid="oRowOwner00001")
    assert owner is not None and owner.pure_phone_number == "13600000001"
    assert user_row(pipeline, APPID, "oOtherUser0001") is None
    assert endpoint_counts(pipeline.sandbox, "phone").calls == 1  # code_b never presented
    # The reusing message stored no result: the task id's result is the job's own.
    assert reused.get(timeout=30) == {"job_id": job_id, "status": "succeeded", "error_code": None}


class CommitCuttingProxy:
    """A TCP proxy in front of PostgreSQL that drops the connection once, at the first COMMIT a
    client sends after inserting audit rows in the same connection: the server never sees the
    COMMIT (it rolls the transaction back), the client sees its connection lost at commit. What a
    network cut, a failover or a proxy restart at that moment does."""

    def __init__(self, upstream_host: str, upstream_port: int) -> None:
        self.upstream = (upstream_host, upstream_port)
        self.port = free_port()
        self.cuts = 0
        self._armed = True
        self._lock = threading.Lock()
        self._listener = socket.create_server(("127.0.0.1", self.port))
        self._stopped = threading.Event()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while not self._stopped.is_set():
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            server = socket.create_connection(self.upstream)
            seen = {"audit": False}
            threading.Thread(target=self._pump, args=(client, server, seen, True), daemon=True).start()
            threading.Thread(target=self._pump, args=(server, client, seen, False), daemon=True).start()

    def _pump(
        self, source: socket.socket, target: socket.socket, seen: dict[str, bool], upstream: bool
    ) -> None:
        try:
            while data := source.recv(65536):
                if upstream:
                    if b"INSERT INTO exchange_audit" in data:
                        seen["audit"] = True
                    if seen["audit"] and b"COMMIT" in data:
                        with self._lock:
                            cut, self._armed = self._armed, False
                        if cut:
                            self.cuts += 1
                            raise OSError("cut")
                target.sendall(data)
        except OSError:
            pass
        for each in (source, target):
            with contextlib.suppress(OSError):
                each.shutdown(socket.SHUT_RDWR)
            each.close()

    def close(self) -> None:
        self._stopped.set()
        self._listener.close()


@contextmanager
def commit_cutting_proxy(database_url: str) -> Iterator[tuple[CommitCuttingProxy, str]]:
    url = make_url(database_url)
    proxy = CommitCuttingProxy(url.host or "127.0.0.1", url.port or 5432)
    try:
        yield proxy, url.set(host="127.0.0.1", port=proxy.port).render_as_string(hide_password=False)
    finally:
        proxy.close()


def test_a_failed_exchange_whose_commit_is_retried_keeps_its_audit_row(pipeline: Pipeline) -> None:
    """The outcome of an exchange is written with a retry while PostgreSQL is unreachable (the
    code is spent), and its audit rows are idempotent (``call_id``): when the commit is lost, the
    retried write records the failure with the call's audit row, once."""
    with commit_cutting_proxy(pipeline.settings["database_url"]) as (proxy, proxied_url):
        pipeline.settings.update(database_url=proxied_url)
        pipeline.start_worker(concurrency=1, pool="threads")
        # A code WeChat refuses (40029): the job fails after one call, written in one transaction.
        job_id = pipeline.submit(APPID, "oAuditCommit01", "never-issued-code-0123456789abcdef")
        wait_for(
            lambda: (phone_job_row(pipeline, job_id) or {}).get("status") == "failed",
            timeout_seconds=30,
            what="the job",
        )
        assert proxy.cuts == 1, "the commit was not cut"
    assert endpoint_counts(pipeline.sandbox, "phone").calls == 1
    rows = pipeline.count("SELECT count(*) FROM exchange_audit WHERE job_id = :j", j=job_id)
    assert rows == 1, f"one WeChat call, {rows} audit rows for it"
