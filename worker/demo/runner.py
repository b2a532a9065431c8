"""``wxphone demo``: the whole system on this machine, played by simulated front ends.

One run: find or start PostgreSQL and Redis, recreate the demo database, start the WeChat
sandbox, a Celery worker and beat, let front-end threads log users in and submit phone codes
while faults are injected into the sandbox, then read everything back, check it and report.
Whatever the run started is stopped at the end, on errors and on Ctrl-C (``--keep-running``
leaves it up).

The demo never touches a user's data: it uses its own database (``wxphone_demo``, dropped and
recreated each run) and Redis databases 2 (broker) and 3 (token store) of the configured server,
where it deletes only wxphone's and Celery's keys.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import click
import psycopg
import redis
from celery import Celery
from psycopg import sql
from redis.backoff import NoBackoff
from redis.retry import Retry
from sqlalchemy import Engine
from sqlalchemy.engine import make_url

from worker.crypto import DataProtection
from worker.db import make_engine, session_factory, upgrade_to_head
from worker.demo.frontends import FrontEnds
from worker.demo.lock import DemoLock, DemoLockHeldError
from worker.demo.processes import DemoProcess, DemoProcessError, child_environment
from worker.demo.report import (
    count_terminal_jobs,
    read_jobs,
    read_phone_numbers,
    read_user_rows,
    render_summary,
    render_table,
    summarise,
)
from worker.demo.scenario import DEMO_APPS, FaultStep, build_plan, fault_schedule
from worker.errors import WxphoneError
from worker.localservices import (
    NotInstalledError,
    PostgresInstance,
    RedisInstance,
    ServiceError,
    ServiceOptions,
    ensure_postgres,
    ensure_redis,
    postgres_answers,
    stop,
)
from worker.producer import Producer
from worker.sandbox.admin import SandboxAdmin
from worker.settings import Settings
from worker.tokens.store import TokenStore

__all__ = ["DemoError", "DemoOptions", "run_demo"]

#: Redis database numbers the demo uses on the configured (or private) server.
BROKER_DB = 2
TOKEN_STORE_DB = 3
#: Short classic tokens, so refreshes happen during a run of a few seconds; beat looks every 2 s
#: and renews a token at half its life, well before business calls stop using it (at 90%).
TOKEN_LIFETIME_SECONDS = 8.0
TOKEN_CHECK_INTERVAL_SECONDS = 2.0
TOKEN_REFRESH_FRACTION = 0.5
#: The revocation goes in when the token has at least this long until its renewal, and waits
#: for that at most the second figure (see FaultInjector).
REVOKE_BEFORE_RENEWAL_SECONDS = 2.0
REVOKE_WAIT_MAX_SECONDS = TOKEN_LIFETIME_SECONDS
#: Retries after a fault come quickly, so the run stays short.
RETRY_BACKOFF_BASE_SECONDS = 0.5
RETRY_BACKOFF_MAX_SECONDS = 4.0
#: Codes are fingerprinted with this key by the demo's producer and worker alike.
DEMO_FINGERPRINT_KEY = "wxphone-demo-fingerprint-key"
WORKER_POOL = "prefork"
WORKER_CONCURRENCY = 4
#: Start-up bounds.
SANDBOX_START_SECONDS = 20.0
WORKER_START_SECONDS = 60.0
API_START_SECONDS = 30.0
PROGRESS_INTERVAL_SECONDS = 0.2
PLAIN_PROGRESS_EVERY_SECONDS = 2.0
BAR_WIDTH = 30
LOG_TAIL_LINES = 30
#: Keys the demo may delete in its two Redis databases: wxphone's own and Celery's.
DEMO_KEY_PATTERNS = ("wxphone*", "_kombu.binding*.wxphone*", "celery-task-meta-*", "unacked*")


class DemoError(Exception):
    """The demo could not run to the end; the message says what went wrong."""


@dataclass(frozen=True)
class DemoOptions:
    """What ``wxphone demo`` was asked to do."""

    jobs: int = 300
    keep_running: bool = False
    timeout_seconds: float = 120.0
    database: str = "wxphone_demo"
    front_ends: int = 6
    services: ServiceOptions = field(default_factory=ServiceOptions)
    summary_json: Path | None = None
    seed: int | None = None


def say(message: str) -> None:
    click.echo(f"demo: {message}")


# -- backing services ------------------------------------------------------------------------


@dataclass(frozen=True)
class Backing:
    """Where the demo's data goes."""

    admin_url: str
    database_url: str
    broker_url: str
    redis_url: str
    postgres_note: str
    redis_note: str
    #: Private servers this run started (``postgres``, ``redis``).
    started: tuple[str, ...] = ()


def _redis_url_with_db(url: str, db: int) -> str:
    parts = urlsplit(url)
    if parts.scheme == "unix":
        query = dict(parse_qsl(parts.query))
        query["db"] = str(db)
        return urlunsplit(parts._replace(query=urlencode(query)))
    return urlunsplit(parts._replace(path=f"/{db}"))


def _redis_client(url: str) -> redis.Redis:
    return redis.Redis.from_url(url, socket_timeout=3, socket_connect_timeout=3, retry=Retry(NoBackoff(), 0))


def _redis_url_answers(url: str) -> bool:
    client = _redis_client(url)
    try:
        return bool(client.ping())
    except redis.RedisError:
        return False
    finally:
        client.close()


def _display_url(url: str) -> str:
    """``host:port`` of a URL, for messages: never a password."""
    parts = urlsplit(url)
    return f"{parts.hostname}:{parts.port}" if parts.hostname else parts.path


def resolve_backing(
    options: DemoOptions, settings: Settings, stack: contextlib.ExitStack, report: Callable[[str], None]
) -> Backing:
    """Use the configured PostgreSQL and Redis if they answer; else find or start local ones.

    A private server started here is stopped when ``stack`` closes.
    """
    configured_admin = make_url(settings.database_url).set(database="postgres")
    admin_url = configured_admin.render_as_string(hide_password=False)
    if postgres_answers(admin_url):
        postgres = PostgresInstance(admin_url)
    else:
        report(f"PostgreSQL at {_display_url(admin_url)} does not answer; looking for another")
        postgres = ensure_postgres(
            options.services.state_dir,
            probe_host=options.services.pg_probe_host,
            probe_port=options.services.pg_probe_port,
            private_port=options.services.pg_private_port,
            programs=options.services.programs,
            report=report,
        )
        if postgres.started:
            stack.callback(_stop_service, postgres)
    started = ["postgres"] if postgres.started else []
    if _redis_url_answers(settings.broker_url) and _redis_url_answers(settings.redis_url):
        broker_url = _redis_url_with_db(settings.broker_url, BROKER_DB)
        redis_url = _redis_url_with_db(settings.redis_url, TOKEN_STORE_DB)
    else:
        report(f"Redis at {_display_url(settings.broker_url)} does not answer; looking for another")
        instance = ensure_redis(
            options.services.state_dir,
            probe_host=options.services.redis_probe_host,
            probe_port=options.services.redis_probe_port,
            private_port=options.services.redis_private_port,
            programs=options.services.programs,
            report=report,
        )
        if instance.started:
            stack.callback(_stop_service, instance)
            started.append("redis")
        broker_url, redis_url = instance.url(BROKER_DB), instance.url(TOKEN_STORE_DB)
    private_pg = " (private, started by this run)" if postgres.started else ""
    private_redis = " (private, started by this run)" if "redis" in started else ""
    return Backing(
        admin_url=postgres.admin_url,
        database_url=postgres.url(options.database),
        broker_url=broker_url,
        redis_url=redis_url,
        postgres_note=f"PostgreSQL {postgres.address}{private_pg}, database {options.database} (recreated)",
        redis_note=f"Redis {_display_url(broker_url)}{private_redis}, broker db {BROKER_DB}, "
        f"token store db {TOKEN_STORE_DB}",
        started=tuple(started),
    )


def _stop_service(instance: PostgresInstance | RedisInstance) -> None:
    stop(instance, report=say)


def recreate_database(admin_url: str, database_url: str) -> None:
    """Drop the demo database (disconnecting whoever is in it), create it and migrate it."""
    name = make_url(database_url).database
    assert name
    conninfo = make_url(admin_url).set(drivername="postgresql").render_as_string(hide_password=False)
    with psycopg.connect(conninfo, autocommit=True, connect_timeout=5) as connection:
        # pg_terminate_backend rather than DROP ... WITH (FORCE), which PostgreSQL 12 lacks.
        connection.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
            " WHERE datname = %s AND pid <> pg_backend_pid()",
            (name,),
        )
        connection.execute(sql.SQL("DROP DATABASE IF EXISTS {}").format(sql.Identifier(name)))
        connection.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    upgrade_to_head(database_url)


def clear_demo_keys(*urls: str) -> None:
    """Delete wxphone's and Celery's keys in the demo's Redis databases (nothing else)."""
    for url in urls:
        client = _redis_client(url)
        try:
            for pattern in DEMO_KEY_PATTERNS:
                keys = list(client.scan_iter(match=pattern, count=500))
                for start in range(0, len(keys), 500):
                    client.delete(*keys[start : start + 500])
        finally:
            client.close()


# -- processes -------------------------------------------------------------------------------


def _child_settings(backing: Backing, sandbox_url: str) -> dict[str, str]:
    """The wxphone settings of the demo's sandbox, worker and beat, as variable values."""
    return {
        "database_url": backing.database_url,
        "broker_url": backing.broker_url,
        "redis_url": backing.redis_url,
        "wechat_api_base": sandbox_url,
        "apps": ",".join(f"{appid}:{secret}" for appid, secret in DEMO_APPS),
        "token_mode": "classic",
        "token_check_interval_seconds": str(TOKEN_CHECK_INTERVAL_SECONDS),
        # Renew at half-life, so with beat's 2 s ticks a token is always renewed before it expires.
        "token_refresh_fraction": str(TOKEN_REFRESH_FRACTION),
        "retry_backoff_base_seconds": str(RETRY_BACKOFF_BASE_SECONDS),
        "retry_backoff_max_seconds": str(RETRY_BACKOFF_MAX_SECONDS),
        "fingerprint_key": DEMO_FINGERPRINT_KEY,
        "log_level": "INFO",
    }


_LISTENING = re.compile(r"listening on (http://\S+)")
_API_LISTENING = re.compile(r"Uvicorn running on (http://\S+)")
#: Settings the API process does not get: a front end holds no AppSecret and fingerprints nothing.
_WORKER_ONLY_SETTINGS = ("apps", "fingerprint_key")


@dataclass
class Processes:
    """The demo's sandbox, worker, beat and HTTP API."""

    sandbox: DemoProcess
    worker: DemoProcess
    beat: DemoProcess
    api: DemoProcess
    sandbox_url: str
    api_url: str

    def all(self) -> list[DemoProcess]:
        return [self.sandbox, self.worker, self.beat, self.api]

    def check_alive(self) -> None:
        for process in self.all():
            if not process.running():
                raise DemoError(f"the {process.name} exited (status {process.returncode()})")


def start_processes(
    backing: Backing,
    inherited_env: Mapping[str, str],
    log_dir: Path,
    stack: contextlib.ExitStack,
    *,
    while_sandbox_starts: Callable[[], None],
) -> Processes:
    """Start sandbox, worker, beat and ``wxphone api``; each is stopped when ``stack`` closes.

    ``while_sandbox_starts`` runs while the sandbox boots (the worker starts after it: it needs
    the sandbox's address and a migrated database). The processes run in the demo's working
    directory, so a ``.env`` file there applies to them as it does to the demo.
    """
    workdir = Path.cwd()
    sandbox_env = child_environment(inherited_env, _child_settings(backing, "http://127.0.0.1:1"))
    sandbox = DemoProcess(
        "sandbox",
        ["sandbox", "--port", "0", "--token-lifetime-seconds", str(TOKEN_LIFETIME_SECONDS)],
        sandbox_env,
        log_dir / "sandbox.log",
        workdir,
    ).start()
    stack.callback(sandbox.stop)
    while_sandbox_starts()
    line = sandbox.wait_for_output("listening on", timeout_seconds=SANDBOX_START_SECONDS)
    match = _LISTENING.search(line)
    if match is None:
        raise DemoError("the sandbox did not say where it listens")
    sandbox_url = match.group(1)
    SandboxAdmin(sandbox_url).wait_until_ready(timeout_seconds=SANDBOX_START_SECONDS)

    env = child_environment(inherited_env, _child_settings(backing, sandbox_url))
    worker = DemoProcess(
        "worker",
        [
            "worker",
            "--hostname",
            f"demo-{os.getpid()}@%h",
            "--pool",
            WORKER_POOL,
            "--concurrency",
            str(WORKER_CONCURRENCY),
        ],
        env,
        log_dir / "worker.log",
        workdir,
    ).start()
    stack.callback(worker.stop)
    beat = DemoProcess("beat", ["beat"], env, log_dir / "beat.log", workdir).start()
    stack.callback(beat.stop)
    front_end_settings = {
        key: value
        for key, value in _child_settings(backing, sandbox_url).items()
        if key not in _WORKER_ONLY_SETTINGS
    }
    api = DemoProcess(
        "api",
        ["api", "--host", "127.0.0.1", "--port", "0"],
        child_environment(inherited_env, front_end_settings),
        log_dir / "api.log",
        workdir,
    ).start()
    stack.callback(api.stop)
    worker.wait_for_output("ready.", timeout_seconds=WORKER_START_SECONDS)
    api_match = _API_LISTENING.search(
        api.wait_for_output("Uvicorn running on", timeout_seconds=API_START_SECONDS)
    )
    if api_match is None:
        raise DemoError("the API did not say where it listens")
    return Processes(sandbox, worker, beat, api, sandbox_url, api_match.group(1))


# -- progress --------------------------------------------------------------------------------


class Progress:
    """A progress bar on a terminal; a plain line every few seconds otherwise."""

    def __init__(self, total: int, *, interactive: bool) -> None:
        self.total = total
        self.interactive = interactive
        self.started = time.monotonic()
        self._last_plain_at = 0.0
        self._last_plain: tuple[int, int] | None = None
        self._drawn = False

    def update(self, finished: int, submitted: int, *, force: bool = False) -> None:
        elapsed = time.monotonic() - self.started
        text = f"{finished}/{self.total} jobs finished, {submitted} submitted, {elapsed:4.1f} s"
        if self.interactive:
            filled = int(BAR_WIDTH * finished / self.total) if self.total else BAR_WIDTH
            bar = "#" * filled + "-" * (BAR_WIDTH - filled)
            click.echo(f"\r  [{bar}] {text}", nl=False)
            self._drawn = True
            return
        due = elapsed - self._last_plain_at >= PLAIN_PROGRESS_EVERY_SECONDS
        if (force or due) and self._last_plain != (finished, submitted):
            say(text)
            self._last_plain_at, self._last_plain = elapsed, (finished, submitted)

    def event(self, message: str) -> None:
        """A line of its own, above the bar."""
        if self.interactive and self._drawn:
            click.echo("\r\x1b[K", nl=False)
        say(message)

    def finish(self) -> None:
        if self.interactive and self._drawn:
            click.echo()
            self._drawn = False


class FaultInjector:
    """Injects the scheduled faults into the sandbox as the submissions reach each one's share.

    The revocation waits while that app's token is about to be renewed: beat's renewal would
    replace the revoked token before any job met a 40001, and the run would show nothing of the
    recovery. So it goes in when the stored token has a few seconds left before its renewal.
    """

    def __init__(
        self, admin: SandboxAdmin, tokens: TokenStore, appids: tuple[str, ...], total_jobs: int
    ) -> None:
        self.admin = admin
        self.tokens = tokens
        self.appids = appids
        self.total_jobs = total_jobs
        self.pending = fault_schedule(appids)
        self.injected: list[str] = []
        self._revoke_due_at: float | None = None

    def poll(self, submitted: int, announce: Callable[[str], None]) -> None:
        """Inject every fault that is due now."""
        while self.pending and submitted >= self.pending[0].at_share * self.total_jobs:
            step = self.pending[0]
            if step.kind == "revoke" and not self._revoke_shows(time.monotonic()):
                return
            self._inject(step)
            self.injected.append(self.pending.pop(0).kind)
            announce(f"fault injected after {submitted} jobs: {step.description}")

    def _revoke_shows(self, now: float) -> bool:
        """Whether a revocation now would be met by jobs before a renewal repairs it."""
        if self._revoke_due_at is None:
            self._revoke_due_at = now
        if now - self._revoke_due_at >= REVOKE_WAIT_MAX_SECONDS:
            return True
        try:
            token = self.tokens.read(self.appids[0])
        except WxphoneError:
            return False
        return token is not None and token.refresh_at - time.time() >= REVOKE_BEFORE_RENEWAL_SECONDS

    def _inject(self, step: FaultStep) -> None:
        if step.kind == "busy":
            self.admin.inject_fault("phone", errcode=-1, times=step.times)
        elif step.kind == "http_502":
            self.admin.inject_fault("phone", http_status=502, times=step.times)
        elif step.kind == "drop":
            self.admin.inject_fault("phone", drop_connection=True, times=step.times)
        else:
            self.admin.revoke_tokens(self.appids[0])


# -- the run ---------------------------------------------------------------------------------


@dataclass
class RunState:
    """What a run has set up so far, for the clean-up (or --keep-running) at its end."""

    backing: Backing | None = None
    processes: Processes | None = None
    lock: DemoLock | None = None
    #: The run reached its report (whatever the checks said).
    finished: bool = False


@contextlib.contextmanager
def _interrupt_on_signals() -> Iterator[None]:
    """Turn SIGINT, SIGTERM and SIGHUP into KeyboardInterrupt, so each cleans up like Ctrl-C.

    SIGINT is set explicitly because a shell starts background jobs with it ignored.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def interrupt(signum: int, frame: FrameType | None) -> None:
        raise KeyboardInterrupt

    signums = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
    previous = {signum: signal.signal(signum, interrupt) for signum in signums}
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


@contextlib.contextmanager
def _signals_ignored() -> Iterator[None]:
    """Let clean-up finish: a second Ctrl-C must not leave processes behind."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    signums = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
    previous = {signum: signal.signal(signum, signal.SIG_IGN) for signum in signums}
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def run_demo(
    options: DemoOptions, settings: Settings, *, inherited_env: Mapping[str, str], interactive: bool
) -> int:
    """Run the demo; return the exit status (0: every job ended as expected).

    ``inherited_env`` is the environment the child processes start from; the demo sets the
    WXPHONE_* variables of its own (URLs, apps, token mode and timing) on top of it.
    """
    started_at = time.monotonic()
    stack = contextlib.ExitStack()
    log_dir = Path(tempfile.mkdtemp(prefix="wxphone-demo-"))
    interrupted = False
    state = RunState()
    status = 1
    with _interrupt_on_signals():
        try:
            status = _run(options, settings, inherited_env, interactive, log_dir, stack, state)
        except KeyboardInterrupt:
            interrupted = True
            status = 130
        except NotInstalledError as error:
            say(f"{error.reason}. Install it with:")
            click.echo(error.install_command)
        except (DemoError, DemoProcessError, ServiceError) as error:
            say(f"FAILED: {error}")
        except Exception as error:
            say(f"FAILED: {type(error).__name__}: {error}")
        finally:
            # First thing: from here on a second Ctrl-C must not cut the clean-up short.
            with _signals_ignored():
                _finish(options, state, stack, log_dir, status=status, interrupted=interrupted)
                say(f"total time {time.monotonic() - started_at:.1f} s")
    return status


def _finish(
    options: DemoOptions,
    state: RunState,
    stack: contextlib.ExitStack,
    log_dir: Path,
    *,
    status: int,
    interrupted: bool,
) -> None:
    """Stop what the run started, or with --keep-running say how to stop it."""
    if interrupted:
        click.echo()
        say("interrupted")
    elif status != 0:
        _show_worker_log(log_dir)
    if options.keep_running and state.finished and state.processes is not None:
        stack.pop_all()
        if state.lock is not None:
            state.lock.keep_for([process.pid for process in state.processes.all()])
        _explain_still_running(state.processes, state.backing, options)
    else:
        say("cleaning up: stopping what the demo started")
        stack.close()
    say(f"logs: {log_dir}")


def _run(
    options: DemoOptions,
    settings: Settings,
    inherited_env: Mapping[str, str],
    interactive: bool,
    log_dir: Path,
    stack: contextlib.ExitStack,
    state: RunState,
) -> int:
    appids = tuple(appid for appid, _ in DEMO_APPS)
    backing = state.backing = resolve_backing(options, settings, stack, say)
    say(backing.postgres_note)
    say(backing.redis_note)
    lock_client = _redis_client(backing.broker_url)
    stack.callback(lock_client.close)
    state.lock = DemoLock(lock_client)
    try:
        state.lock.acquire()
    except DemoLockHeldError as error:
        raise DemoError(str(error)) from None
    stack.callback(state.lock.release)
    stack.callback(clear_demo_keys, backing.broker_url, backing.redis_url)

    def prepare_data() -> None:
        recreate_database(backing.admin_url, backing.database_url)
        clear_demo_keys(backing.broker_url, backing.redis_url)

    processes = state.processes = start_processes(
        backing, inherited_env, log_dir, stack, while_sandbox_starts=prepare_data
    )
    say(
        f"WeChat sandbox {processes.sandbox_url} (pid {processes.sandbox.pid}; apps {', '.join(appids)}; "
        f"classic tokens live {TOKEN_LIFETIME_SECONDS:.0f} s)"
    )
    say(
        f"worker (pid {processes.worker.pid}, {WORKER_POOL} x {WORKER_CONCURRENCY}) and beat "
        f"(pid {processes.beat.pid}, token check every {TOKEN_CHECK_INTERVAL_SECONDS:.0f} s) started"
    )
    say(
        f"HTTP API {processes.api_url} (pid {processes.api.pid}): "
        "the front ends log in and submit codes through it"
    )

    engine = make_engine(backing.database_url)
    stack.callback(engine.dispose)
    celery_app = Celery("wxphone-demo-frontend", broker=backing.broker_url, backend=backing.broker_url)
    celery_app.conf.update(task_serializer="json", accept_content=["json"], result_serializer="json")
    stack.callback(celery_app.close)
    # The demo reads numbers back with its processes' keys: the user's settings against the
    # sandbox on loopback (development keys unless the user set keys of their own).
    against_sandbox = settings.model_copy(update={"wechat_api_base": processes.sandbox_url})
    producer = Producer(
        sessions=session_factory(engine),
        celery_app=celery_app,
        protection=DataProtection.from_settings(against_sandbox),
    )

    plan = build_plan(options.jobs, appids, seed=options.seed)
    total_jobs = sum(user.jobs for user in plan)
    say(
        f"{options.front_ends} front ends play {len(plan)} users submitting {total_jobs} phone codes "
        "(with repeats, never-issued codes and injected WeChat faults)"
    )
    front_ends = FrontEnds(
        plan,
        api_url=processes.api_url,
        sandbox_url=processes.sandbox_url,
        threads=options.front_ends,
        seed=options.seed,
    )
    stack.callback(front_ends.stop)
    admin = SandboxAdmin(processes.sandbox_url)
    token_client = _redis_client(backing.redis_url)
    stack.callback(token_client.close)
    faults = FaultInjector(admin, TokenStore(token_client, mode="classic"), appids, total_jobs)
    _play(front_ends, processes, faults, engine, total_jobs, options, interactive)

    submissions = front_ends.submissions()
    rows, total_users = read_user_rows(engine, producer)
    summary = summarise(
        jobs_planned=total_jobs,
        users_planned=len(plan),
        submissions=submissions,
        jobs=read_jobs(engine),
        phone_numbers=read_phone_numbers(producer, submissions),
        users=total_users,
        logins_succeeded=front_ends.logins_succeeded,
        login_failures=front_ends.login_failures(),
        front_end_errors=front_ends.errors(),
        api_answers=front_ends.answers(),
        sandbox_stats=admin.stats(),
        appids=appids,
        faults_injected=faults.injected,
    )
    click.echo()
    for line in render_table(rows, total_users):
        click.echo(line)
    click.echo()
    for line in render_summary(summary, token_lifetime_seconds=TOKEN_LIFETIME_SECONDS):
        click.echo(line)
    click.echo()
    if options.summary_json is not None:
        options.summary_json.write_text(json.dumps(_json_ready(summary.as_dict()), indent=2) + "\n")
    if summary.ok:
        say("every job ended as expected")
    else:
        say("FAILED: some jobs did not end as expected (see Checks)")
    state.finished = True
    return 0 if summary.ok else 1


def _json_ready(value: Any) -> Any:
    return json.loads(json.dumps(value, default=str))


def _play(
    front_ends: FrontEnds,
    processes: Processes,
    faults: FaultInjector,
    engine: Engine,
    total_jobs: int,
    options: DemoOptions,
    interactive: bool,
) -> None:
    """Run the front ends, inject the faults on schedule and draw progress until all jobs end."""
    progress = Progress(total_jobs, interactive=interactive)
    deadline = time.monotonic() + options.timeout_seconds
    front_ends.start()
    try:
        while True:
            processes.check_alive()
            submitted = front_ends.submitted
            faults.poll(submitted, progress.event)
            finished = count_terminal_jobs(engine)
            progress.update(finished, submitted)
            if not front_ends.running() and finished >= front_ends.submitted:
                progress.update(finished, front_ends.submitted, force=True)
                break
            if time.monotonic() >= deadline:
                raise DemoError(
                    f"{finished} of {front_ends.submitted} jobs finished within "
                    f"{options.timeout_seconds:.0f} s"
                )
            time.sleep(PROGRESS_INTERVAL_SECONDS)
    finally:
        progress.finish()


def _show_worker_log(log_dir: Path) -> None:
    path = log_dir / "worker.log"
    try:
        lines = path.read_text(errors="replace").splitlines()[-LOG_TAIL_LINES:]
    except OSError:
        return
    if lines:
        say(f"the last lines of {path}:")
        for line in lines:
            click.echo(f"  {line}")


def _explain_still_running(processes: Processes, backing: Backing | None, options: DemoOptions) -> None:
    say("--keep-running: still running")
    for process in processes.all():
        say(f"  {process.name:8} pid {process.pid} (process group {process.pid}), log {process.log_path}")
    say(f"  WeChat sandbox at {processes.sandbox_url} (admin API under /_sandbox/)")
    groups = " ".join(f"-{process.pid}" for process in processes.all())
    say(f"stop them with: kill -TERM -- {groups}")
    if backing is not None and backing.started:
        say(
            f"private {' and '.join(backing.started)} started by the demo stay up too: stop them with "
            f"`wxphone services down --state-dir {options.services.state_dir}`"
        )
