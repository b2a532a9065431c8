"""A private PostgreSQL cluster that a test may stop, kill and restart, like :class:`RedisServer`.

The cluster lives in its own folder under the system temp directory, listens on 127.0.0.1 on a
free port and keeps its Unix socket in that folder, so it never meets the machine's own server
(5432). ``initdb`` and ``pg_ctl`` refuse to run as root: when the tests run as root, every
server command runs as the ``postgres`` user (``runuser``), which then owns the folder.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import shlex
import shutil
import signal
import subprocess
import tempfile
from pathlib import Path

import psycopg

from tests.support.services import free_port
from tests.support.waiting import wait_for

__all__ = ["PostgresServer", "postgres_bin_dir"]

#: The cluster owner when the tests run as root (the Debian package's user).
OWNER = "postgres"
#: Where Debian and Ubuntu install the server programs, one folder per major version.
POSTGRES_LIB_DIR = Path("/usr/lib/postgresql")
START_TIMEOUT_SECONDS = 60
STOP_TIMEOUT_SECONDS = 60


def postgres_bin_dir() -> Path:
    """The newest installed ``/usr/lib/postgresql/N/bin`` (or the folder of ``pg_ctl`` on PATH)."""
    candidates: list[tuple[int, Path]] = []
    with contextlib.suppress(OSError):
        for version_dir in POSTGRES_LIB_DIR.iterdir():
            bin_dir = version_dir / "bin"
            if version_dir.name.isdigit() and (bin_dir / "pg_ctl").exists() and (bin_dir / "initdb").exists():
                candidates.append((int(version_dir.name), bin_dir))
    if candidates:
        return max(candidates)[1]
    pg_ctl = shutil.which("pg_ctl")
    if pg_ctl is None:
        raise RuntimeError("the PostgreSQL server is not installed (apt-get install postgresql)")
    return Path(pg_ctl).parent


class PostgresServer:
    """A PostgreSQL cluster of its own: ``start()``, ``stop()``, ``kill()``, ``restart()``.

    ``directory`` defaults to a fresh folder under the temp directory (pytest's ``tmp_path`` is
    private to root, so the ``postgres`` user could not enter it); :meth:`remove` deletes it.
    """

    def __init__(self, directory: Path | None = None, *, port: int | None = None) -> None:
        self.bin_dir = postgres_bin_dir()
        self.directory = directory or Path(tempfile.mkdtemp(prefix="wxpg-"))
        self.data_dir = self.directory / "data"
        self.run_dir = self.directory / "run"
        self.log_path = self.directory / "postgres.log"
        self.port = port or free_port()
        self._as_root = os.geteuid() == 0

    # -- addresses ----------------------------------------------------------------------------

    @property
    def admin_url(self) -> str:
        """SQLAlchemy URL of the maintenance database ``postgres``."""
        return self.url("postgres")

    def url(self, database: str) -> str:
        """SQLAlchemy URL of ``database`` on this cluster (user ``postgres``, trust auth)."""
        return f"postgresql+psycopg://postgres@127.0.0.1:{self.port}/{database}"

    def conninfo(self, database: str = "postgres") -> str:
        return f"host=127.0.0.1 port={self.port} user=postgres dbname={database} connect_timeout=3"

    # -- lifecycle ----------------------------------------------------------------------------

    def start(self) -> None:
        """Create the cluster on first use, then start it and wait until it accepts connections."""
        self._prepare_directory()
        if not (self.data_dir / "PG_VERSION").exists():
            self._run(
                [
                    str(self.bin_dir / "initdb"),
                    "-D", str(self.data_dir),
                    "-U", "postgres",
                    "--auth=trust",
                    "-E", "UTF8",
                    "--no-locale",
                ],
                what="initdb",
            )  # fmt: skip
        options = " ".join(
            [
                f"-p {self.port}",
                f"-k {shlex.quote(str(self.run_dir))}",
                "-c listen_addresses=127.0.0.1",
                # Test data need not survive a crash of the machine, only of the server.
                "-c fsync=off",
                "-c full_page_writes=off",
                "-c max_connections=200",
            ]
        )
        self._run(
            [
                str(self.bin_dir / "pg_ctl"),
                "-D", str(self.data_dir),
                "-l", str(self.log_path),
                "-w", "-t", str(START_TIMEOUT_SECONDS),
                "-o", options,
                "start",
            ],
            what="pg_ctl start",
            timeout_seconds=START_TIMEOUT_SECONDS + 10,
        )  # fmt: skip
        wait_for(self.answers, timeout_seconds=START_TIMEOUT_SECONDS, what=f"postgres on port {self.port}")

    def stop(self, mode: str = "fast") -> None:
        """``pg_ctl stop -m MODE`` (fast: disconnect every client, then shut down cleanly)."""
        if self.is_running():
            self._pg_ctl("stop", "-m", mode)

    def restart(self, mode: str = "fast") -> None:
        """``pg_ctl restart -m MODE``: every client connection is cut; the server is back at once."""
        self._pg_ctl("restart", "-m", mode)
        wait_for(self.answers, timeout_seconds=START_TIMEOUT_SECONDS, what=f"postgres on port {self.port}")

    def kill(self) -> None:
        """SIGKILL the postmaster, as a crash would (the next start runs crash recovery)."""
        pid = self.postmaster_pid()
        if pid is None:
            return
        backends = _children(pid)
        os.kill(pid, signal.SIGKILL)
        # Backends notice their postmaster's death and exit; a new server cannot start while
        # they still hold the old shared memory.
        for child in backends:
            with contextlib.suppress(ProcessLookupError):
                os.kill(child, signal.SIGKILL)
        wait_for(
            lambda: not any(Path(f"/proc/{each}").exists() for each in [pid, *backends]),
            timeout_seconds=20,
            what="the killed postgres processes to exit",
        )

    def remove(self) -> None:
        """Stop the server (if running) and delete its folder."""
        with contextlib.suppress(RuntimeError):
            self.stop(mode="immediate")
        shutil.rmtree(self.directory, ignore_errors=True)

    # -- queries ------------------------------------------------------------------------------

    def answers(self) -> bool:
        try:
            with psycopg.connect(self.conninfo(), autocommit=True) as conn:
                conn.execute("SELECT 1")
                return True
        except psycopg.Error:
            return False

    def is_running(self) -> bool:
        pid = self.postmaster_pid()
        if pid is None:
            return False
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        return True

    def postmaster_pid(self) -> int | None:
        try:
            return int((self.data_dir / "postmaster.pid").read_text().splitlines()[0])
        except (OSError, IndexError, ValueError):
            return None

    def create_database(self, name: str) -> str:
        """Create an empty database; return its SQLAlchemy URL."""
        with psycopg.connect(self.conninfo(), autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
        return self.url(name)

    # -- plumbing -----------------------------------------------------------------------------

    def _prepare_directory(self) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        self.run_dir.mkdir(exist_ok=True)
        if self._as_root:
            owner = pwd.getpwnam(OWNER)
            for path in (self.directory, self.run_dir):
                os.chown(path, owner.pw_uid, owner.pw_gid)

    def _pg_ctl(self, *args: str) -> None:
        command = [
            str(self.bin_dir / "pg_ctl"),
            "-D",
            str(self.data_dir),
            "-w",
            "-t",
            str(STOP_TIMEOUT_SECONDS),
        ]
        if args[0] == "restart":
            command += ["-l", str(self.log_path)]
        self._run([*command, *args], what=f"pg_ctl {args[0]}", timeout_seconds=STOP_TIMEOUT_SECONDS + 10)

    def _run(self, argv: list[str], *, what: str, timeout_seconds: float = 120) -> None:
        command = ["runuser", "-u", OWNER, "--", *argv] if self._as_root else argv
        # pg_ctl's server inherits our output: give it a file, never a pipe we would wait on.
        with open(self.directory / "commands.log", "ab") as output:
            completed = subprocess.run(
                command,
                stdin=subprocess.DEVNULL,
                stdout=output,
                stderr=subprocess.STDOUT,
                timeout=timeout_seconds,
                check=False,
            )
        if completed.returncode != 0:
            raise RuntimeError(f"{what} failed (exit {completed.returncode}):\n{self._tail()}")

    def _tail(self, lines: int = 30) -> str:
        text = ""
        for path in (self.directory / "commands.log", self.log_path):
            with contextlib.suppress(OSError):
                text += "\n".join(path.read_text(errors="replace").splitlines()[-lines:]) + "\n"
        return text


def _children(pid: int) -> list[int]:
    """Direct children of ``pid`` (from /proc; empty when it has none or is gone)."""
    children: list[int] = []
    with contextlib.suppress(OSError):
        for task in Path(f"/proc/{pid}/task").iterdir():
            children += [int(each) for each in (task / "children").read_text().split()]
    return children
