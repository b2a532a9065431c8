"""The wxphone processes the demo runs: each in its own process group, output in a log file.

A process group per command lets the demo stop a Celery worker together with its pool children,
and keeps the terminal's Ctrl-C away from them: the demo decides when and how they stop.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

__all__ = ["WXPHONE_COMMAND", "DemoProcess", "DemoProcessError", "child_environment", "group_alive"]

#: ``wxphone`` with this very interpreter, so the demo runs the code it was started from.
WXPHONE_COMMAND: tuple[str, ...] = (sys.executable, "-m", "worker.cli")
#: How long a process gets to stop after SIGTERM before its whole group is killed.
STOP_TIMEOUT_SECONDS = 15.0


class DemoProcessError(RuntimeError):
    """A demo process exited early or did not become ready in time."""


def child_environment(inherited: Mapping[str, str], settings: Mapping[str, str]) -> dict[str, str]:
    """``inherited`` plus ``settings`` as ``WXPHONE_<NAME>`` variables, which win.

    Settings the demo does not set (encryption keys, limits, timeouts) stay as the user has
    them, so the demo's processes and the demo itself agree on them.
    """
    env = dict(inherited)
    env["PYTHONUNBUFFERED"] = "1"
    env.update({f"WXPHONE_{name.upper()}": value for name, value in settings.items()})
    return env


def group_alive(pgid: int) -> bool:
    """Whether any process of group ``pgid`` still exists."""
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@dataclass
class DemoProcess:
    """One ``wxphone`` command running as the leader of its own process group."""

    name: str
    args: Sequence[str]
    env: Mapping[str, str]
    log_path: Path
    cwd: Path
    popen: subprocess.Popen[bytes] | None = field(default=None, init=False, repr=False)

    def start(self) -> DemoProcess:
        """Start it; output and errors go to ``log_path``."""
        with open(self.log_path, "ab") as log:
            self.popen = subprocess.Popen(
                [*WXPHONE_COMMAND, *self.args],
                env=dict(self.env),
                cwd=self.cwd,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        return self

    @property
    def pid(self) -> int:
        """The leader's pid, which is also the process group id."""
        if self.popen is None:
            raise DemoProcessError(f"the {self.name} was never started")
        return self.popen.pid

    def running(self) -> bool:
        return self.popen is not None and self.popen.poll() is None

    def output(self) -> str:
        """Everything it wrote so far."""
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def tail(self, lines: int = 30) -> str:
        return "\n".join(self.output().splitlines()[-lines:])

    def wait_for_output(self, text: str, *, timeout_seconds: float) -> str:
        """Wait until ``text`` appears in the log; return the line holding it."""
        deadline = time.monotonic() + timeout_seconds
        while True:
            for line in self.output().splitlines():
                if text in line:
                    return line
            if not self.running():
                raise DemoProcessError(f"the {self.name} exited early (status {self.returncode()})")
            if time.monotonic() >= deadline:
                raise DemoProcessError(f"the {self.name} did not say {text!r} within {timeout_seconds:.0f} s")
            time.sleep(0.05)

    def returncode(self) -> int | None:
        return None if self.popen is None else self.popen.poll()

    def stop(self, *, timeout_seconds: float = STOP_TIMEOUT_SECONDS) -> None:
        """SIGTERM the group (a warm shutdown), then SIGKILL whatever is left of it."""
        if self.popen is None:
            return
        pgid = self.popen.pid
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pgid, signal.SIGTERM)
        deadline = time.monotonic() + timeout_seconds
        while time.monotonic() < deadline:
            if self.popen.poll() is not None and not group_alive(pgid):
                return
            time.sleep(0.05)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pgid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.popen.wait(timeout=5)
