"""Real wxphone processes (sandbox, Celery workers, beat) started as subprocesses by tests.

Each runs in its own session so a test can signal the whole process group, writes its output to
a log file the test can read, and is stopped with bounded waits.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from tests.support.waiting import wait_for

WXPHONE = [sys.executable, "-m", "worker"]  # as the `wxphone` script: gevent patched first


def base_environment(**wxphone_settings: object) -> dict[str, str]:
    """The current environment minus any WXPHONE_* variable, plus the given settings.

    ``base_environment(redis_url="redis://...")`` sets ``WXPHONE_REDIS_URL``.
    """
    env = {key: value for key, value in os.environ.items() if not key.startswith("WXPHONE_")}
    env["PYTHONUNBUFFERED"] = "1"
    for key, value in wxphone_settings.items():
        if value is not None:
            env["WXPHONE_" + key.upper()] = str(value)
    return env


@dataclass
class ManagedProcess:
    """A subprocess in its own process group, with its combined output in ``log_path``."""

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
        assert self.process is not None, f"{self.name} is not running"
        return self.process.pid

    def output(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def wait(self, *, timeout: float) -> int:
        """Wait for the process to exit (bounded); its exit status."""
        assert self.process is not None, f"{self.name} was never started"
        return self.process.wait(timeout=timeout)

    def is_running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def wait_for_output(self, text: str, *, timeout_seconds: float = 30) -> None:
        def seen() -> bool:
            if not self.is_running() and text not in self.output():
                raise AssertionError(f"{self.name} exited early:\n{self.output()[-4000:]}")
            return text in self.output()

        wait_for(seen, timeout_seconds=timeout_seconds, what=f"{text!r} from {self.name}")

    def signal_group(self, signum: int) -> None:
        if self.process is not None and self.process.poll() is None:
            os.killpg(self.process.pid, signum)

    def stop(self, *, timeout_seconds: float = 20) -> None:
        """SIGTERM the group (a warm shutdown), then SIGKILL whatever is left."""
        if self.process is None:
            return
        try:
            self.signal_group(signal.SIGTERM)
            self.process.wait(timeout=timeout_seconds)
        except subprocess.TimeoutExpired:
            pass
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(timeout=10)

    def kill(self) -> None:
        """SIGKILL the whole group, as a host crash would."""
        self.signal_group(signal.SIGKILL)
        if self.process is not None:
            self.process.wait(timeout=10)


def sandbox_process(port: int, env: Mapping[str, str], log_dir: Path, *extra_args: str) -> ManagedProcess:
    """``wxphone sandbox`` on ``port``."""
    args = [*WXPHONE, "sandbox", "--port", str(port), *extra_args]
    return ManagedProcess(f"sandbox:{port}", args, env, log_dir / f"sandbox-{port}.log")


def worker_process(
    env: Mapping[str, str],
    log_dir: Path,
    *,
    name: str,
    concurrency: int = 2,
    pool: str = "prefork",
    queues: str | None = None,
    extra_args: Sequence[str] = (),
) -> ManagedProcess:
    """``wxphone worker`` with a unique node name; ready once it logs ``ready``."""
    args = [*WXPHONE, "worker", "--hostname", f"{name}@%h", "--concurrency", str(concurrency), "--pool", pool]
    if queues:
        args += ["--queues", queues]
    args += list(extra_args)
    return ManagedProcess(f"worker:{name}", args, env, log_dir / f"worker-{name}.log")


def beat_process(env: Mapping[str, str], log_dir: Path, *, name: str = "beat") -> ManagedProcess:
    """``wxphone beat``."""
    return ManagedProcess(name, [*WXPHONE, "beat"], env, log_dir / f"{name}.log")
