"""Waits against a database that stops answering without closing anything (a frozen server, a
stuck pooler or proxy): the listener cuts and remakes its connection, and an async wait ends near
its timeout instead of hanging the request. Found by review."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import threading
import time
import uuid
from datetime import timedelta

import psycopg
import pytest
from sqlalchemy import create_engine, text

from models import PhoneJob
from tests.support.pipeline import DEVELOPMENT_PROTECTION, plain_celery_client
from tests.support.waiting import wait_for
from worker.db import make_engine, session_factory
from worker.jobs.phone import utc_now
from worker.producer import JobReadTimeoutError, JobView, Producer, _listen_connector
from worker.waiting import JobDoneListener

APPID = "wxpipeline000001"

pytestmark = pytest.mark.faults


class FreezingProxy:
    """A TCP relay to ``target`` that can freeze: it stops moving bytes either way while its
    sockets stay open (a stuck pooler or proxy between a front end and PostgreSQL; the kernel
    still acknowledges, so TCP keepalives on the client's side keep succeeding)."""

    def __init__(self, target: tuple[str, int]) -> None:
        self.target = target
        self.flowing = threading.Event()
        self.flowing.set()
        self._server = socket.create_server(("127.0.0.1", 0))
        self.port = int(self._server.getsockname()[1])
        self._sockets: list[socket.socket] = [self._server]
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        with contextlib.suppress(OSError):
            while True:
                client, _ = self._server.accept()
                upstream = socket.create_connection(self.target, timeout=5)
                upstream.settimeout(None)
                self._sockets += [client, upstream]
                for source, sink in ((client, upstream), (upstream, client)):
                    threading.Thread(target=self._pump, args=(source, sink), daemon=True).start()

    def _pump(self, source: socket.socket, sink: socket.socket) -> None:
        with contextlib.suppress(OSError):
            while True:
                self.flowing.wait()
                data = source.recv(65536)
                if not data:
                    return
                self.flowing.wait()
                sink.sendall(data)

    def close(self) -> None:
        self.flowing.set()
        for sock in self._sockets:
            with contextlib.suppress(OSError):
                sock.close()


def test_a_listener_whose_peer_stops_answering_reconnects_and_its_waiters_wake(
    migrated_database_url: str,
) -> None:
    """Waits must survive a lost notification: a LISTEN connection whose peer stops answering
    (no FIN, no RST) must be given up within a bounded time, and the re-check on reconnect must
    wake a waiter whose job ended meanwhile. The listener's probe is a blocking ``SELECT 1``
    with no timeout of its own, so it waits for the answer forever."""
    engine = make_engine(migrated_database_url)
    sessions = session_factory(engine)
    with engine.begin() as conn:
        conn.execute(text("TRUNCATE users, phone_jobs, login_jobs, code_claims, key_checks"))
    direct = _listen_connector(engine)
    proxy = FreezingProxy((engine.url.host or "127.0.0.1", int(engine.url.port or 5432)))
    through_proxy = _listen_connector(create_engine(engine.url.set(host="127.0.0.1", port=proxy.port)))
    connections: list[str] = []

    def connect() -> psycopg.Connection[tuple[object, ...]]:
        # The first connection goes through the proxy; reconnections reach PostgreSQL directly.
        connections.append("proxy" if not connections else "direct")
        return through_proxy() if connections[-1] == "proxy" else direct()

    listener = JobDoneListener(connect)
    producer = Producer(
        sessions=sessions,
        celery_app=plain_celery_client("redis://127.0.0.1:1/0"),
        protection=DEVELOPMENT_PROTECTION,
        listener=listener,
    )
    job_id = str(uuid.uuid4())
    now = utc_now()
    with sessions.begin() as session:
        session.add(
            PhoneJob(
                job_id=job_id,
                appid=APPID,
                openid="oFrozenPeer001",
                status="queued",
                created_at=now,
                code_expires_at=now + timedelta(minutes=5),
            )
        )
    try:
        assert listener.wait_until_listening(10)
        results: list[JobView | None] = []
        wait_seconds = 75.0
        waiter = threading.Thread(target=lambda: results.append(producer.wait_for_job(job_id, wait_seconds)))
        waiter.start()
        wait_for(lambda: listener.waiter_count == 1, timeout_seconds=10, what="the waiter")

        proxy.flowing.clear()  # the peer stops answering
        with sessions.begin() as session:
            session.execute(
                text("UPDATE phone_jobs SET status = 'succeeded', finished_at = now() WHERE job_id = :id"),
                {"id": job_id},
            )
        ended = time.monotonic()
        waiter.join(timeout=wait_seconds + 10)
        woke_after = time.monotonic() - ended
        job = results[0] if results else None
        # Probe (5 s) + keepalives (10 s idle + 3 x 5 s) + backoff: the module's own budget is
        # well under a minute; a wait that runs out its 75 s heard nothing.
        assert job is not None and job.status == "succeeded", (job, woke_after, connections)
        # Probe every 5 s, answered within 5 s, then a reconnect: well inside 20 s.
        assert woke_after < 20, (woke_after, connections)
        assert connections == ["proxy", "direct"]
    finally:
        producer.close()
        proxy.close()
        engine.dispose()


def test_an_async_wait_ends_near_its_timeout_when_the_database_stops_answering(
    migrated_database_url: str,
) -> None:
    """``wait_for_job_async(job_id, timeout_seconds)``: the job at its end, or as it stands at
    the timeout. When the database stops answering mid-wait (a stuck pooler), the wait must still
    end near its timeout (with the view or an error the API answers 503 with), not hang the
    request; and, since one loop's reads are batched behind each other, one stuck read must not
    hold every other wait of the process past its timeout either."""
    direct_engine = make_engine(migrated_database_url)
    with direct_engine.begin() as conn:
        conn.execute(text("TRUNCATE users, phone_jobs, login_jobs, code_claims, key_checks"))
    proxy = FreezingProxy((direct_engine.url.host or "127.0.0.1", int(direct_engine.url.port or 5432)))
    proxied_engine = make_engine(
        direct_engine.url.set(host="127.0.0.1", port=proxy.port).render_as_string(hide_password=False)
    )
    producer = Producer(
        sessions=session_factory(proxied_engine),
        celery_app=plain_celery_client("redis://127.0.0.1:1/0"),
        protection=DEVELOPMENT_PROTECTION,
        listener=JobDoneListener(_listen_connector(direct_engine)),  # the listener is fine
    )
    job_ids = [str(uuid.uuid4()) for _ in range(3)]
    now = utc_now()
    with session_factory(direct_engine).begin() as session:
        session.add_all(
            PhoneJob(
                job_id=job_id,
                appid=APPID,
                openid="oStuckDb000001",
                status="queued",
                created_at=now,
                code_expires_at=now + timedelta(minutes=5),
            )
            for job_id in job_ids
        )
    try:
        assert producer.listener.wait_until_listening(10)
        assert producer.get_job(job_ids[0]) is not None  # the pooled connection works

        async def waits() -> list[str]:
            proxy.flowing.clear()  # the database stops answering this process's pool
            started = time.monotonic()
            outcomes = await asyncio.gather(
                *(asyncio.wait_for(producer.wait_for_job_async(job_id, 2.0), 20) for job_id in job_ids),
                return_exceptions=True,
            )
            elapsed = time.monotonic() - started
            # The database answers again, so the read stuck in the loop's executor ends and
            # asyncio.run can shut the executor down.
            proxy.flowing.set()
            return [f"{type(outcome).__name__} after {elapsed:.1f}s" for outcome in outcomes]

        outcomes = asyncio.run(waits())
        # 2 s asked (and 3 s of grace for the read): each wait gives up with the error the API
        # answers 503 with; the outer 20 s bound is never reached.
        assert all(outcome.startswith(JobReadTimeoutError.__name__) for outcome in outcomes), outcomes
        assert all(float(outcome.split()[-1].rstrip("s")) < 10 for outcome in outcomes), outcomes
    finally:
        proxy.close()
        producer.close()
        proxied_engine.dispose()
        direct_engine.dispose()
