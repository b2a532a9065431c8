"""Processes and servers the benchmark starts: subprocesses in their own process groups, a
private redis-server, a throwaway PostgreSQL database, and /proc sampling of worker processes.

Nothing here touches a server it did not start, except the PostgreSQL it creates (and later
drops) one database on.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import threading
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import psycopg
import redis
from sqlalchemy.engine import make_url

__all__ = [
    "ManagedProcess",
    "ProcessSampler",
    "RedisServer",
    "create_database",
    "drop_database",
    "free_port",
    "wait_for",
]

_CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
_PAGE_KB = 1


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_for(
    predicate: Callable[[], object], *, timeout_seconds: float, what: str, interval: float = 0.05
) -> None:
    """Poll ``predicate`` until truthy; raise ``TimeoutError`` naming ``what`` after the deadline."""
    deadline = time.monotonic() + timeout_seconds
    while not predicate():
        if time.monotonic() >= deadline:
            raise TimeoutError(f"timed out after {timeout_seconds:.0f}s waiting for {what}")
        time.sleep(interval)


@dataclass
class ManagedProcess:
    """A subprocess in its own session (process group), output appended to ``log_path``."""

    name: str
    args: Sequence[str]
    env: Mapping[str, str]
    log_path: Path
    cwd: Path | None = None
    process: subprocess.Popen[bytes] | None = field(default=None, init=False)

    def start(self) -> ManagedProcess:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(
                list(self.args),
                env=dict(self.env),
                cwd=self.cwd,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
            )
        return self

    @property
    def pid(self) -> int:
        assert self.process is not None, f"{self.name} was never started"
        return self.process.pid

    def is_running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def output_tail(self, characters: int = 3000) -> str:
        if not self.log_path.exists():
            return ""
        return self.log_path.read_text(errors="replace")[-characters:]

    def stop(self, *, timeout_seconds: float = 15.0) -> None:
        """SIGTERM the group (Celery's warm shutdown), then SIGKILL what is left."""
        if self.process is None:
            return
        try:
            if self.process.poll() is None:
                os.killpg(self.process.pid, signal.SIGTERM)
            self.process.wait(timeout=timeout_seconds)
        except (subprocess.TimeoutExpired, ProcessLookupError):
            pass
        finally:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.process.pid, signal.SIGKILL)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.process.wait(timeout=10)


class RedisServer:
    """A redis-server on its own port, without persistence; stopped by :meth:`stop`."""

    def __init__(self, directory: Path) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            raise RuntimeError("redis-server is not installed (sudo apt-get install -y redis-server)")
        self.binary = binary
        self.directory = directory
        self.port = free_port()
        self.process: subprocess.Popen[bytes] | None = None

    def url(self, db: int = 0) -> str:
        return f"redis://127.0.0.1:{self.port}/{db}"

    def client(self, db: int = 0) -> redis.Redis:
        return redis.Redis.from_url(self.url(db), socket_timeout=10)

    def start(self) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        args = [
            self.binary,
            "--port", str(self.port),
            "--bind", "127.0.0.1",
            "--dir", str(self.directory),
            "--save", "",
            "--appendonly", "no",
            "--databases", "16",
            "--maxclients", "10000",
            "--logfile", str(self.directory / "redis.log"),
        ]  # fmt: skip
        self.process = subprocess.Popen(args, start_new_session=True, stdin=subprocess.DEVNULL)
        wait_for(self._answers, timeout_seconds=10, what=f"redis on port {self.port}")

    def _answers(self) -> bool:
        try:
            with self.client() as conn:
                return bool(conn.ping())
        except redis.RedisError:
            return False

    def flush(self, *dbs: int) -> None:
        for db in dbs:
            with self.client(db) as conn:
                conn.flushdb()

    def stop(self) -> None:
        if self.process is None:
            return
        self.process.terminate()
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(timeout=10)
        self.process = None


def _conninfo(admin_url: str, database: str | None = None) -> str:
    url = make_url(admin_url).set(drivername="postgresql")
    if database is not None:
        url = url.set(database=database)
    return url.render_as_string(hide_password=False)


def create_database(admin_url: str, prefix: str = "wxphone_bench") -> str:
    """Create an empty database with a unique name; return its psycopg 3 SQLAlchemy URL."""
    name = f"{prefix}_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(_conninfo(admin_url), autocommit=True, connect_timeout=5) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    url = make_url(admin_url).set(drivername="postgresql+psycopg", database=name)
    return url.render_as_string(hide_password=False)


def drop_database(admin_url: str, database_url: str) -> None:
    """Drop a database made by :func:`create_database`, disconnecting whoever is still in it."""
    name = make_url(database_url).database
    with psycopg.connect(_conninfo(admin_url), autocommit=True, connect_timeout=5) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


# -- /proc sampling ---------------------------------------------------------------------------


def _children_map() -> dict[int, list[int]]:
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as handle:
                stat = handle.read()
        except OSError:
            continue
        # The command name may contain spaces; fields after the last ')' are fixed.
        fields = stat[stat.rfind(b")") + 2 :].split()
        children.setdefault(int(fields[1]), []).append(int(entry))
    return children


def process_tree(roots: Sequence[int]) -> list[int]:
    """The given pids and all their descendants that are still alive."""
    children = _children_map()
    found: list[int] = []
    pending = list(roots)
    while pending:
        pid = pending.pop()
        if os.path.exists(f"/proc/{pid}"):
            found.append(pid)
        pending.extend(children.get(pid, []))
    return found


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of one process (all its threads), 0 when it is gone."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as handle:
            stat = handle.read()
    except OSError:
        return 0.0
    fields = stat[stat.rfind(b")") + 2 :].split()
    return (int(fields[11]) + int(fields[12])) / _CLOCK_TICKS


def rss_mb(pid: int) -> float | None:
    """VmRSS of one process in MB (10^6 bytes), ``None`` when it is gone."""
    try:
        with open(f"/proc/{pid}/status") as handle:
            for line in handle:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024 / 1_000_000
    except OSError:
        return None
    return None


def machine_busy_seconds() -> float:
    """CPU seconds all cores of the machine spent not idle since boot (from /proc/stat)."""
    with open("/proc/stat") as handle:
        values = [int(value) for value in handle.readline().split()[1:]]
    idle = values[3] + (values[4] if len(values) > 4 else 0)  # idle + iowait
    steal_and_guests = sum(values[7:]) if len(values) > 7 else 0
    return (sum(values) - idle - steal_and_guests) / _CLOCK_TICKS


def machine_steal_seconds() -> float:
    """CPU seconds the hypervisor ran something else while this machine's vCPUs wanted to run
    (``steal`` in /proc/stat; 0 on bare metal)."""
    with open("/proc/stat") as handle:
        values = [int(value) for value in handle.readline().split()[1:]]
    return (values[7] if len(values) > 7 else 0) / _CLOCK_TICKS


@dataclass(frozen=True)
class Sample:
    at: float  # time.time()
    cpu_seconds: float  # summed over the worker process trees
    rss_mb: dict[int, float]
    machine_busy_seconds: float = 0.0
    own_cpu_seconds: float = 0.0  # the harness and everything it started (workers, sandbox, redis)
    machine_steal_seconds: float = 0.0


class ProcessSampler:
    """Samples CPU time and RSS of worker process trees in a background thread."""

    def __init__(self, roots: Callable[[], Sequence[int]], interval_seconds: float = 0.25) -> None:
        self._roots = roots
        self.interval_seconds = interval_seconds
        self.samples: list[Sample] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="bench-sampler", daemon=True)
        # CPU of processes that have exited is kept so sums never go backwards.
        self._last_cpu: dict[int, float] = {}
        self._own_max = 0.0

    def start(self) -> ProcessSampler:
        self.sample()
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        self.sample()

    def _run(self) -> None:
        while not self._stop.wait(self.interval_seconds):
            self.sample()

    def sample(self) -> None:
        pids = process_tree(list(self._roots()))
        rss: dict[int, float] = {}
        for pid in pids:
            self._last_cpu[pid] = max(self._last_cpu.get(pid, 0.0), cpu_seconds(pid))
            value = rss_mb(pid)
            if value is not None:
                rss[pid] = value
        own = sum(cpu_seconds(pid) for pid in process_tree([os.getpid()]))
        self._own_max = max(self._own_max, own)
        self.samples.append(
            Sample(
                time.time(),
                sum(self._last_cpu.values()),
                rss,
                machine_busy_seconds(),
                self._own_max,
                machine_steal_seconds(),
            )
        )

    def cpu_between(self, start: float, end: float) -> float | None:
        """Worker CPU seconds spent between two wall-clock times (linear between samples)."""
        if len(self.samples) < 2 or end <= start:
            return None
        return self._cpu_at(end) - self._cpu_at(start)

    def machine_load_between(self, start: float, end: float) -> tuple[float, float] | None:
        """(busy cores of the whole machine, busy cores outside this benchmark's processes).

        "Outside" includes PostgreSQL, which the benchmark does not start; anything far above
        what PostgreSQL needs means other work shared the machine during the measurement.
        """
        if len(self.samples) < 2 or end <= start:
            return None
        busy = self._value_at(end, "machine_busy_seconds") - self._value_at(start, "machine_busy_seconds")
        own = self._value_at(end, "own_cpu_seconds") - self._value_at(start, "own_cpu_seconds")
        span = end - start
        return busy / span, max(0.0, busy - own) / span

    def steal_between(self, start: float, end: float) -> float | None:
        """Cores' worth of CPU time the hypervisor withheld between two wall-clock times."""
        if len(self.samples) < 2 or end <= start:
            return None
        stolen = self._value_at(end, "machine_steal_seconds") - self._value_at(start, "machine_steal_seconds")
        return stolen / (end - start)

    def _cpu_at(self, moment: float) -> float:
        return self._value_at(moment, "cpu_seconds")

    def _value_at(self, moment: float, name: str) -> float:
        samples = self.samples
        if moment <= samples[0].at:
            return float(getattr(samples[0], name))
        for before, after in zip(samples, samples[1:], strict=False):
            if before.at <= moment <= after.at:
                span = after.at - before.at
                weight = (moment - before.at) / span if span > 0 else 1.0
                low, high = float(getattr(before, name)), float(getattr(after, name))
                return low + (high - low) * weight
        return float(getattr(samples[-1], name))

    def max_rss_mb(self, start: float | None = None) -> float | None:
        """The largest RSS any one worker process had (since ``start``)."""
        values = [
            value
            for sample in self.samples
            if start is None or sample.at >= start
            for value in sample.rss_mb.values()
        ]
        return max(values) if values else None
