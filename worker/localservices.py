"""Local PostgreSQL and Redis for the demo and the tests, never touching the machine's own servers.

Each service is found in this order:

1. a server that already answers: PostgreSQL on 127.0.0.1:5432 where user ``postgres`` logs in
   without a password, Redis on 127.0.0.1:6379 answering ``PING`` without a password;
2. else a private server of this checkout, started from the installed programs: a PostgreSQL
   cluster (``/usr/lib/postgresql/N/bin``: initdb, pg_ctl) on 127.0.0.1:55432 under
   ``<state>/postgres`` and a ``redis-server`` on 127.0.0.1:56379 under ``<state>/redis``;
3. else :class:`NotInstalledError`, whose message is exactly the command that installs the
   missing server (``sudo apt-get install -y postgresql`` / ``sudo apt-get install -y redis-server``).

Private servers outlive the process that started them (they run as daemons), so several commands
can share them; :func:`stop` ends one, and only ever a private one. A lock file in the state folder
keeps two commands starting at once from creating the same cluster twice.

Nothing here reads wxphone's settings: every location and override is a function argument (the
``wxphone services`` command passes them from its options).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import pwd
import shlex
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import psycopg
import redis
from redis.backoff import NoBackoff
from redis.retry import Retry
from sqlalchemy.engine import make_url

__all__ = [
    "INSTALL_POSTGRES",
    "INSTALL_REDIS",
    "LocalServices",
    "NotInstalledError",
    "PostgresInstance",
    "Programs",
    "RedisInstance",
    "ServiceError",
    "ServiceOptions",
    "ensure_postgres",
    "ensure_redis",
    "ensure_services",
    "find_private_postgres",
    "find_private_redis",
    "postgres_answers",
    "redis_answers",
    "status_lines",
    "stop",
]

#: The database superuser, in the machine's server and in a private cluster alike.
PG_USER = "postgres"
PG_PROBE_HOST = "127.0.0.1"
PG_PROBE_PORT = 5432
PG_PRIVATE_PORT = 55432
REDIS_PROBE_HOST = "127.0.0.1"
REDIS_PROBE_PORT = 6379
REDIS_PRIVATE_PORT = 56379

INSTALL_POSTGRES = "sudo apt-get install -y postgresql"
INSTALL_REDIS = "sudo apt-get install -y redis-server"

#: Where Debian and Ubuntu put the server programs, one folder per major version.
POSTGRES_LIB_DIR = Path("/usr/lib/postgresql")

PROBE_TIMEOUT_SECONDS = 3.0
LOCK_WAIT_SECONDS = 120.0
POSTGRES_START_TIMEOUT_SECONDS = 60
POSTGRES_STOP_TIMEOUT_SECONDS = 60
REDIS_START_TIMEOUT_SECONDS = 10.0
REDIS_STOP_TIMEOUT_SECONDS = 10.0
#: A Unix socket path holds at most 107 bytes; the cluster's socket is <dir>/run/.s.PGSQL.<port>.
MAX_POSTGRES_DIR_LENGTH = 80

Reporter = Callable[[str], None]


def _silent(_message: str) -> None:
    pass


class ServiceError(RuntimeError):
    """A service could not be reused or started; the message says why and what to do."""


class NotInstalledError(ServiceError):
    """No server answers and its programs are not installed. ``str()`` is the install command."""

    def __init__(self, service: str, install_command: str, reason: str) -> None:
        super().__init__(install_command)
        self.service = service
        self.install_command = install_command
        self.reason = reason


@dataclass(frozen=True)
class Programs:
    """Where server programs are looked for; tests point this at empty folders."""

    #: A PATH-style list of folders; ``None`` searches the process's PATH.
    search_path: str | None = None
    postgres_lib_dir: Path = POSTGRES_LIB_DIR

    def which(self, name: str) -> str | None:
        """The full path of program ``name``, or None."""
        return shutil.which(name, path=self.search_path)

    def postgres_bin_dir(self) -> Path | None:
        """The newest ``<lib>/N/bin`` holding initdb, pg_ctl and postgres, else their folder on the path."""
        candidates: list[tuple[tuple[int, ...], Path]] = []
        with contextlib.suppress(OSError):
            for version_dir in self.postgres_lib_dir.iterdir():
                bin_dir = version_dir / "bin"
                if all(os.access(bin_dir / name, os.X_OK) for name in ("initdb", "pg_ctl", "postgres")):
                    candidates.append((_version_key(version_dir.name), bin_dir))
        if candidates:
            return max(candidates)[1]
        initdb, pg_ctl = self.which("initdb"), self.which("pg_ctl")
        if initdb and pg_ctl and Path(initdb).parent == Path(pg_ctl).parent:
            return Path(initdb).parent
        return None

    def redis_server(self) -> str | None:
        """The ``redis-server`` program, or None."""
        return self.which("redis-server")


def _version_key(name: str) -> tuple[int, ...]:
    parts = [int(part) for part in name.split(".") if part.isdigit()]
    return tuple(parts) or (0,)


@dataclass(frozen=True)
class ServiceOptions:
    """Where to look for running servers and where private ones live (``wxphone services`` options)."""

    state_dir: Path = Path(".wxphone")
    pg_probe_host: str = PG_PROBE_HOST
    pg_probe_port: int = PG_PROBE_PORT
    pg_private_port: int = PG_PRIVATE_PORT
    redis_probe_host: str = REDIS_PROBE_HOST
    redis_probe_port: int = REDIS_PROBE_PORT
    redis_private_port: int = REDIS_PRIVATE_PORT
    programs: Programs = field(default_factory=Programs)


@dataclass(frozen=True)
class PostgresInstance:
    """A PostgreSQL server to use; ``started`` when this call started it (the caller stops it)."""

    #: SQLAlchemy URL of the maintenance database ``postgres``.
    admin_url: str
    started: bool = False
    #: The private cluster's folder (``data``, ``run``, logs); None for a server not ours.
    cluster_dir: Path | None = None
    bin_dir: Path | None = None

    @property
    def private(self) -> bool:
        return self.cluster_dir is not None

    @property
    def address(self) -> str:
        url = make_url(self.admin_url)
        return f"{url.host or 'localhost'}:{url.port or PG_PROBE_PORT}"

    def url(self, database: str) -> str:
        """SQLAlchemy URL of ``database`` on this server."""
        return make_url(self.admin_url).set(database=database).render_as_string(hide_password=False)


@dataclass(frozen=True)
class RedisInstance:
    """A Redis server to use; ``started`` when this call started it (the caller stops it)."""

    host: str
    port: int
    started: bool = False
    #: The private server's folder (pid file, log, append-only file); None for a server not ours.
    directory: Path | None = None

    @property
    def private(self) -> bool:
        return self.directory is not None

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    def url(self, db: int) -> str:
        """``redis://host:port/db``."""
        return f"redis://{self.host}:{self.port}/{db}"


@dataclass(frozen=True)
class LocalServices:
    """The services found or started, and the wxphone URLs that point at them."""

    postgres: PostgresInstance
    #: None when the broker and token-store URLs were given and used as they are.
    redis: RedisInstance | None
    test_postgres_url: str
    database_url: str
    broker_url: str
    redis_url: str

    @property
    def started(self) -> list[str]:
        """Names of the private servers this run had to start (``postgres``, ``redis``)."""
        names = ["postgres"] if self.postgres.started else []
        if self.redis is not None and self.redis.started:
            names.append("redis")
        return names

    def export_lines(self) -> list[str]:
        """``export NAME=value`` lines for a shell to eval (the contract of ``scripts/services``)."""
        values = {
            "WXPHONE_TEST_POSTGRES_URL": self.test_postgres_url,
            "WXPHONE_DATABASE_URL": self.database_url,
            "WXPHONE_BROKER_URL": self.broker_url,
            "WXPHONE_REDIS_URL": self.redis_url,
            "WXPHONE_SERVICES_STARTED": " ".join(self.started),
        }
        return [f"export {name}={shlex.quote(value)}" for name, value in values.items()]


# -- probes ------------------------------------------------------------------------------------


def tcp_open(host: str, port: int, *, timeout_seconds: float = PROBE_TIMEOUT_SECONDS) -> bool:
    """Whether something accepts TCP connections on ``host:port``."""
    try:
        with socket.create_connection((host, port), timeout=timeout_seconds):
            return True
    except OSError:
        return False


def redis_answers(host: str, port: int) -> bool:
    """Whether a Redis on ``host:port`` answers PING without a password."""
    if not tcp_open(host, port):
        return False
    client = redis.Redis(
        host=host,
        port=port,
        socket_timeout=PROBE_TIMEOUT_SECONDS,
        socket_connect_timeout=PROBE_TIMEOUT_SECONDS,
        # A probe asks once: redis-py would otherwise retry a refused connection for seconds.
        retry=Retry(NoBackoff(), 0),
    )
    try:
        return bool(client.ping())
    except redis.RedisError:
        return False
    finally:
        client.close()


def postgres_answers(admin_url: str) -> bool:
    """Whether the server of ``admin_url`` lets that user into that database."""
    url = make_url(admin_url)
    try:
        with psycopg.connect(
            url.set(drivername="postgresql").render_as_string(hide_password=False),
            connect_timeout=int(PROBE_TIMEOUT_SECONDS),
        ):
            return True
    except psycopg.Error:
        return False


def _pg_admin_url(host: str, port: int) -> str:
    return f"postgresql+psycopg://{PG_USER}@{host}:{port}/postgres"


# -- the lock ----------------------------------------------------------------------------------


@contextlib.contextmanager
def _state_lock(state_dir: Path) -> Iterator[None]:
    """Hold ``<state>/services.lock``, so two commands never create the same server twice."""
    state_dir.mkdir(parents=True, exist_ok=True)
    lock_path = state_dir / "services.lock"
    with open(lock_path, "w") as lock_file:
        deadline = time.monotonic() + LOCK_WAIT_SECONDS
        while True:
            try:
                fcntl.flock(lock_file, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    raise ServiceError(f"another command holds {lock_path}") from None
                time.sleep(0.1)
        try:
            yield
        finally:
            fcntl.flock(lock_file, fcntl.LOCK_UN)


# -- PostgreSQL --------------------------------------------------------------------------------


def _as_cluster_owner(argv: Sequence[str]) -> list[str]:
    """``argv`` run as the cluster's owner: initdb and pg_ctl refuse to run as root."""
    if os.geteuid() != 0:
        return list(argv)
    if shutil.which("runuser"):
        return ["runuser", "-u", PG_USER, "--", *argv]
    return ["su", PG_USER, "-s", "/bin/sh", "-c", shlex.join(argv)]


def _run_as_owner(argv: Sequence[str], *, log_path: Path | None = None, timeout_seconds: float = 120) -> bool:
    """Run ``argv`` as the cluster owner; True when it exits 0. Output goes to ``log_path``."""
    command = _as_cluster_owner(argv)
    # A daemon started by pg_ctl inherits our output: give it a file, never a pipe we would wait on.
    with open(log_path, "ab") if log_path else open(os.devnull, "wb") as output:
        try:
            completed = subprocess.run(
                command,
                stdin=subprocess.DEVNULL,
                stdout=output,
                stderr=subprocess.STDOUT,
                timeout=timeout_seconds,
                check=False,
            )
        except (OSError, subprocess.TimeoutExpired):
            return False
    return completed.returncode == 0


def _tail(path: Path, lines: int = 20) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


def _postgres_dir(state_dir: Path) -> Path:
    """Where the private cluster lives: ``<state>/postgres``, or the folder recorded instead."""
    location = state_dir / "postgres.location"
    if location.is_file():
        return Path(location.read_text().strip())
    return state_dir / "postgres"


def _choose_postgres_dir(state_dir: Path) -> Path:
    """The cluster folder: ``<state>/postgres`` unless the postgres user cannot reach it (a
    checkout under /root, say) or the socket path would be too long; then a per-checkout folder
    under the temp directory, recorded in ``<state>/postgres.location``."""
    directory = state_dir / "postgres"
    if (directory / "data").is_dir() or (state_dir / "postgres.location").is_file():
        return _postgres_dir(state_dir)
    reachable = _run_as_owner(["test", "-x", str(state_dir)]) if os.geteuid() == 0 else True
    if len(str(directory)) > MAX_POSTGRES_DIR_LENGTH or not reachable:
        digest = hashlib.sha256(str(state_dir).encode()).hexdigest()[:12]
        directory = Path(tempfile.gettempdir()) / f"wxphone-{digest}" / "postgres"
        (state_dir / "postgres.location").write_text(f"{directory}\n")
    return directory


def _postgres_port(cluster_dir: Path) -> int | None:
    """The port a running cluster listens on, from the fourth line of its postmaster.pid."""
    try:
        lines = (cluster_dir / "data" / "postmaster.pid").read_text().splitlines()
        return int(lines[3])
    except (OSError, IndexError, ValueError):
        return None


def _running_private_postgres(cluster_dir: Path, bin_dir: Path) -> PostgresInstance | None:
    if not (cluster_dir / "data" / "PG_VERSION").is_file():
        return None
    if not _run_as_owner([str(bin_dir / "pg_ctl"), "-D", str(cluster_dir / "data"), "status"]):
        return None
    port = _postgres_port(cluster_dir)
    if port is None:
        return None
    return PostgresInstance(_pg_admin_url("127.0.0.1", port), cluster_dir=cluster_dir, bin_dir=bin_dir)


def find_private_postgres(state_dir: Path, *, programs: Programs | None = None) -> PostgresInstance | None:
    """This checkout's private cluster, when it is running."""
    bin_dir = (programs or Programs()).postgres_bin_dir()
    if bin_dir is None:
        return None
    return _running_private_postgres(_postgres_dir(state_dir.absolute()), bin_dir)


def ensure_postgres(
    state_dir: Path,
    *,
    probe_host: str = PG_PROBE_HOST,
    probe_port: int = PG_PROBE_PORT,
    private_port: int = PG_PRIVATE_PORT,
    admin_url: str | None = None,
    programs: Programs | None = None,
    report: Reporter = _silent,
) -> PostgresInstance:
    """A PostgreSQL to use: ``admin_url`` as given, the server on the probe address, or a private one.

    Raises :class:`NotInstalledError` (message: the apt-get command) when nothing answers and the
    server programs are missing, and :class:`ServiceError` when a private cluster cannot start.
    """
    if admin_url is not None:
        report("postgres: using the given admin URL")
        return PostgresInstance(admin_url)
    probe_url = _pg_admin_url(probe_host, probe_port)
    if postgres_answers(probe_url):
        report(f"postgres: using the server on {probe_host}:{probe_port}")
        return PostgresInstance(probe_url)
    if tcp_open(probe_host, probe_port):
        report(
            f"postgres: {probe_host}:{probe_port} answers but user {PG_USER} cannot log in without a password"
        )
    bin_dir = (programs or Programs()).postgres_bin_dir()
    if bin_dir is None:
        raise NotInstalledError(
            "postgres",
            INSTALL_POSTGRES,
            f"no PostgreSQL answers on {probe_host}:{probe_port} and no PostgreSQL server is installed",
        )
    state_dir = state_dir.absolute()
    with _state_lock(state_dir):
        return _start_private_postgres(state_dir, bin_dir, private_port, report)


def _start_private_postgres(state_dir: Path, bin_dir: Path, port: int, report: Reporter) -> PostgresInstance:
    is_root = os.geteuid() == 0
    if is_root:
        try:
            owner = pwd.getpwnam(PG_USER)
        except KeyError:
            raise ServiceError(
                f"running as root, but there is no {PG_USER} user to own a private cluster"
            ) from None
    cluster_dir = _choose_postgres_dir(state_dir)
    running = _running_private_postgres(cluster_dir, bin_dir)
    if running is not None:
        report(f"postgres: private cluster already running on {running.address} ({cluster_dir})")
        return running
    if tcp_open("127.0.0.1", port):
        raise ServiceError(
            f"port {port} is taken by a server that is not this checkout's; choose another private port"
        )
    run_dir = cluster_dir / "run"
    run_dir.mkdir(parents=True, exist_ok=True)
    if is_root:
        for path in (cluster_dir, run_dir):
            os.chown(path, owner.pw_uid, owner.pw_gid)
    data_dir = cluster_dir / "data"
    if not (data_dir / "PG_VERSION").is_file():
        report(f"postgres: creating a private cluster in {cluster_dir}")
        shutil.rmtree(data_dir, ignore_errors=True)
        initdb_log = cluster_dir / "initdb.log"
        initdb = [str(bin_dir / "initdb"), "-D", str(data_dir), "-U", PG_USER, "--auth=trust", "-E", "UTF8"]
        if not _run_as_owner([*initdb, "--no-locale"], log_path=initdb_log):
            raise ServiceError(f"initdb failed:\n{_tail(initdb_log)}")
    log_path = cluster_dir / "postgres.log"
    report(f"postgres: starting the private cluster on 127.0.0.1:{port} (log: {log_path})")
    server_options = f"-p {port} -k {shlex.quote(str(run_dir))} -c listen_addresses=127.0.0.1"
    pg_ctl = [str(bin_dir / "pg_ctl"), "-D", str(data_dir), "-l", str(log_path), "-w", "-s"]
    started = _run_as_owner(
        [*pg_ctl, "-t", str(POSTGRES_START_TIMEOUT_SECONDS), "-o", server_options, "start"],
        log_path=cluster_dir / "pg_ctl.log",
        timeout_seconds=POSTGRES_START_TIMEOUT_SECONDS + 10,
    )
    if not started:
        raise ServiceError(f"the private PostgreSQL did not start:\n{_tail(log_path)}")
    return PostgresInstance(
        _pg_admin_url("127.0.0.1", port), started=True, cluster_dir=cluster_dir, bin_dir=bin_dir
    )


def _stop_postgres(instance: PostgresInstance, report: Reporter) -> None:
    assert instance.cluster_dir is not None and instance.bin_dir is not None
    data_dir = instance.cluster_dir / "data"
    stopped = _run_as_owner(
        [str(instance.bin_dir / "pg_ctl"), "-D", str(data_dir), "-m", "fast", "-w", "-s", "stop"],
        timeout_seconds=POSTGRES_STOP_TIMEOUT_SECONDS,
    )
    if not stopped and _running_private_postgres(instance.cluster_dir, instance.bin_dir) is not None:
        raise ServiceError(f"the private PostgreSQL in {instance.cluster_dir} did not stop")
    report(f"postgres: stopped the private cluster ({instance.cluster_dir})")


# -- Redis -------------------------------------------------------------------------------------


def _redis_private_pid(directory: Path, port: int) -> int | None:
    """The pid of the private redis-server recorded in ``directory``, if it runs on ``port``."""
    try:
        pid = int((directory / "redis.pid").read_text().strip())
        comm = Path(f"/proc/{pid}/comm").read_text()
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except (OSError, ValueError):
        return None
    # A stale pid file may name some other process by now: only a redis-server on our port counts.
    if not comm.startswith("redis-server"):
        return None
    if f":{port}" not in cmdline:
        return None
    return pid


def find_private_redis(state_dir: Path, *, port: int = REDIS_PRIVATE_PORT) -> RedisInstance | None:
    """This checkout's private redis-server, when it is running on ``port``."""
    directory = state_dir.absolute() / "redis"
    if _redis_private_pid(directory, port) is None:
        return None
    return RedisInstance("127.0.0.1", port, directory=directory)


def ensure_redis(
    state_dir: Path,
    *,
    probe_host: str = REDIS_PROBE_HOST,
    probe_port: int = REDIS_PROBE_PORT,
    private_port: int = REDIS_PRIVATE_PORT,
    programs: Programs | None = None,
    report: Reporter = _silent,
) -> RedisInstance:
    """A Redis to use: the server on the probe address, else a private one on ``private_port``.

    Raises :class:`NotInstalledError` (message: the apt-get command) when nothing answers and
    ``redis-server`` is missing, and :class:`ServiceError` when the private server cannot start.
    """
    if redis_answers(probe_host, probe_port):
        report(f"redis: using the server on {probe_host}:{probe_port}")
        return RedisInstance(probe_host, probe_port)
    binary = (programs or Programs()).redis_server()
    if binary is None:
        raise NotInstalledError(
            "redis",
            INSTALL_REDIS,
            f"no Redis answers on {probe_host}:{probe_port} and redis-server is not installed",
        )
    state_dir = state_dir.absolute()
    with _state_lock(state_dir):
        return _start_private_redis(state_dir / "redis", binary, private_port, report)


def _start_private_redis(directory: Path, binary: str, port: int, report: Reporter) -> RedisInstance:
    if _redis_private_pid(directory, port) is not None and redis_answers("127.0.0.1", port):
        report(f"redis: private server already running on 127.0.0.1:{port} ({directory})")
        return RedisInstance("127.0.0.1", port, directory=directory)
    if tcp_open("127.0.0.1", port):
        raise ServiceError(
            f"port {port} is taken by a server that is not this checkout's; choose another private port"
        )
    directory.mkdir(parents=True, exist_ok=True)
    log_path = directory / "redis.log"
    report(f"redis: starting a private server on 127.0.0.1:{port} (log: {log_path})")
    subprocess.run(
        [
            binary,
            "--daemonize", "yes",
            "--bind", "127.0.0.1",
            "--port", str(port),
            "--dir", str(directory),
            "--pidfile", str(directory / "redis.pid"),
            "--logfile", str(log_path),
            # Durable enough for a development queue, and never dropping a job to free memory.
            "--appendonly", "yes",
            "--appendfsync", "everysec",
            "--maxmemory-policy", "noeviction",
            "--save", "",
        ],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        check=False,
        timeout=REDIS_START_TIMEOUT_SECONDS,
    )  # fmt: skip
    deadline = time.monotonic() + REDIS_START_TIMEOUT_SECONDS
    while not redis_answers("127.0.0.1", port):
        if time.monotonic() >= deadline:
            raise ServiceError(
                f"the private redis-server did not answer within {REDIS_START_TIMEOUT_SECONDS:.0f} s:\n"
                f"{_tail(log_path)}"
            )
        time.sleep(0.1)
    return RedisInstance("127.0.0.1", port, started=True, directory=directory)


def _stop_redis(instance: RedisInstance, report: Reporter) -> None:
    assert instance.directory is not None
    pid = _redis_private_pid(instance.directory, instance.port)
    if pid is None:
        return
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + REDIS_STOP_TIMEOUT_SECONDS
    while _redis_private_pid(instance.directory, instance.port) == pid:
        if time.monotonic() >= deadline:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
            break
        time.sleep(0.05)
    report(f"redis: stopped the private server ({instance.directory})")


# -- both --------------------------------------------------------------------------------------


def stop(instance: PostgresInstance | RedisInstance, *, report: Reporter = _silent) -> None:
    """Stop a private server (its data stays). A server that is not ours is never stopped."""
    if not instance.private:
        raise ServiceError(f"{instance.address} is not a private server of this checkout; not stopping it")
    if isinstance(instance, PostgresInstance):
        _stop_postgres(instance, report)
    else:
        _stop_redis(instance, report)


def ensure_services(
    options: ServiceOptions,
    *,
    test_postgres_url: str | None = None,
    database_url: str | None = None,
    broker_url: str | None = None,
    redis_url: str | None = None,
    report: Reporter = _silent,
) -> LocalServices:
    """Find or start PostgreSQL and Redis; return the URLs the demo and the tests should use.

    ``test_postgres_url`` is used as the admin URL as it is (with ``database_url``, or database
    ``wxphone`` beside it). ``broker_url`` and ``redis_url`` are used as they are when both are given.
    A private server started here is stopped again when the other service cannot be had.
    """
    postgres = ensure_postgres(
        options.state_dir,
        probe_host=options.pg_probe_host,
        probe_port=options.pg_probe_port,
        private_port=options.pg_private_port,
        admin_url=test_postgres_url,
        programs=options.programs,
        report=report,
    )
    if test_postgres_url is not None and database_url is not None:
        app_database_url = database_url
    else:
        app_database_url = postgres.url("wxphone")
    if broker_url is not None and redis_url is not None:
        report("redis: using the given broker and token-store URLs")
        return LocalServices(postgres, None, postgres.admin_url, app_database_url, broker_url, redis_url)
    try:
        redis_instance = ensure_redis(
            options.state_dir,
            probe_host=options.redis_probe_host,
            probe_port=options.redis_probe_port,
            private_port=options.redis_private_port,
            programs=options.programs,
            report=report,
        )
    except ServiceError:
        if postgres.started:
            stop(postgres, report=report)
        raise
    return LocalServices(
        postgres,
        redis_instance,
        postgres.admin_url,
        app_database_url,
        redis_instance.url(0),
        redis_instance.url(1),
    )


def status_lines(options: ServiceOptions) -> list[str]:
    """What answers where: the probe addresses and this checkout's private servers."""
    lines: list[str] = []
    pg_probe = f"{options.pg_probe_host}:{options.pg_probe_port}"
    if postgres_answers(_pg_admin_url(options.pg_probe_host, options.pg_probe_port)):
        lines.append(f"postgres: {pg_probe} answers")
    elif tcp_open(options.pg_probe_host, options.pg_probe_port):
        lines.append(f"postgres: {pg_probe} answers, but user {PG_USER} cannot log in without a password")
    else:
        lines.append(f"postgres: nothing answers on {pg_probe}")
    private_pg = find_private_postgres(options.state_dir, programs=options.programs)
    if private_pg is not None:
        lines.append(f"postgres: private cluster running on {private_pg.address} ({private_pg.cluster_dir})")
    else:
        lines.append("postgres: no private cluster running")
    redis_probe = f"{options.redis_probe_host}:{options.redis_probe_port}"
    if redis_answers(options.redis_probe_host, options.redis_probe_port):
        lines.append(f"redis: {redis_probe} answers")
    else:
        lines.append(f"redis: nothing answers on {redis_probe}")
    private_redis = find_private_redis(options.state_dir, port=options.redis_private_port)
    if private_redis is not None:
        lines.append(f"redis: private server running on {private_redis.address} ({private_redis.directory})")
    else:
        lines.append("redis: no private server running")
    return lines
