"""Private RabbitMQ brokers for tests, which a test may stop, kill and restart like :class:`RedisServer`.

Tests never touch the machine's shared RabbitMQ (AMQP 5672, distribution 25672, epmd 4369). A
:class:`RabbitMQServer` is a ``rabbitmq-server`` started from the installed scripts with
everything of its own: node name, AMQP port, distribution port, management port, Erlang cookie
(in a private ``HOME``), database folder, logs, and its own ``epmd`` on a private port. Its
processes run in their own session, and :meth:`RabbitMQServer.remove` ends every one of them.

``rabbitmqctl`` boots an Erlang VM for every call (about a second), so the queries tests make
often go over AMQP (kombu) instead: :meth:`~RabbitMQServer.queue_depth` and the deletions of
:meth:`~RabbitMQServer.reset`. Listing what to delete needs the management plugin (HTTP, a few
milliseconds) or ``rabbitmqctl export_definitions`` (a second): ``management=True`` enables the
plugin, at a price of five seconds on every graceful stop (measured: the broker waits that long
after stopping the plugin's statistics), so it suits the session's broker, which is emptied
before every test and never stopped gracefully, and not a fault test's broker, which restarts.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import secrets
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import quote

import amqp.exceptions
import requests
from kombu.connection import Connection
from kombu.exceptions import OperationalError

from tests.support.services import free_port
from tests.support.waiting import wait_for

#: How long a restart waits for its fixed AMQP port to be released by the node it replaces.
PORT_RELEASE_TIMEOUT_SECONDS = 20.0

__all__ = [
    "INSTALL_COMMAND",
    "MakeRabbitMQServer",
    "QueueCounts",
    "RabbitMQBinaries",
    "RabbitMQNotInstalled",
    "RabbitMQServer",
    "find_rabbitmq",
]

#: What to run when the tests cannot find RabbitMQ (printed in the skip or failure message).
INSTALL_COMMAND = "sudo apt-get install -y rabbitmq-server"
#: Where the Debian/Ubuntu package keeps the real scripts. /usr/sbin/rabbitmq-server is a wrapper
#: that switches to the ``rabbitmq`` user and the shared node's environment: never use it.
DEBIAN_BIN_DIR = Path("/usr/lib/rabbitmq/bin")
#: Where the Erlang packages keep epmd when it is not on PATH.
ERLANG_LIB_DIR = Path("/usr/lib/erlang")

START_TIMEOUT_SECONDS = 60
STOP_TIMEOUT_SECONDS = 30
CTL_TIMEOUT_SECONDS = 60
#: A start that fails because a port was taken (between our check and the broker's bind) is
#: tried this many times, on fresh ports: the AMQP port too until it has been used once.
START_ATTEMPTS = 3
#: Ports the machine's RabbitMQ and its CLI use: the shared node's AMQP, management and
#: distribution ports, epmd, and the range every ``rabbitmqctl`` run listens on for distribution.
RESERVED_PORTS = frozenset({4369, 5671, 5672, 15672, 25672, *range(35672, 35683)})
#: Private ports come from here, below the kernel's ephemeral range: a broker restarted on the
#: same port must not find it taken by some client connection's ephemeral source port.
PRIVATE_PORT_FLOOR = 20000

_ports_handed_out: set[int] = set()


class RabbitMQNotInstalled(RuntimeError):
    """The RabbitMQ server scripts (or Erlang's epmd) are missing; the message says how to install them."""


@dataclass(frozen=True)
class RabbitMQBinaries:
    """The programs a private broker needs."""

    server: Path
    ctl: Path
    epmd: Path


@dataclass(frozen=True)
class QueueCounts:
    """One queue's exact counts, as ``rabbitmqctl list_queues`` reports them."""

    ready: int
    unacknowledged: int
    consumers: int


class MakeRabbitMQServer(Protocol):
    """The ``make_rabbitmq_server`` fixture: a broker of the test's own, removed when it ends."""

    def __call__(
        self, *, management: bool = False, port: int | None = None, start: bool = True
    ) -> RabbitMQServer: ...


def find_rabbitmq() -> RabbitMQBinaries:
    """The installed ``rabbitmq-server``, ``rabbitmqctl`` and ``epmd``.

    Raises :class:`RabbitMQNotInstalled` (its message is the install command) when one is missing.
    """
    bin_dir: Path | None = None
    if (DEBIAN_BIN_DIR / "rabbitmq-server").exists():
        bin_dir = DEBIAN_BIN_DIR
    else:
        found = shutil.which("rabbitmq-server")
        # A generic-unix install puts the real script on PATH; the Debian wrapper would switch user.
        if found is not None and Path(found).resolve().name == "rabbitmq-server":
            bin_dir = Path(found).resolve().parent
    epmd = shutil.which("epmd") or next(iter(sorted(ERLANG_LIB_DIR.glob("erts-*/bin/epmd"))), None)
    if bin_dir is None or not (bin_dir / "rabbitmqctl").exists() or epmd is None:
        raise RabbitMQNotInstalled(
            "RabbitMQ is not installed (rabbitmq-server, rabbitmqctl, epmd). "
            f"Install it with: {INSTALL_COMMAND}"
        )
    return RabbitMQBinaries(server=bin_dir / "rabbitmq-server", ctl=bin_dir / "rabbitmqctl", epmd=Path(epmd))


def private_port() -> int:
    """A TCP port on 127.0.0.1 that is free now, below the ephemeral range and not RabbitMQ's own.

    Never the same port twice in one test session, so two brokers set up in turn cannot pick the
    same port before either has bound it.
    """
    ephemeral_floor = _ephemeral_port_floor()
    if ephemeral_floor - PRIVATE_PORT_FLOOR < 1000:
        # An unusual kernel setting: fall back to the ephemeral ports free_port() hands out.
        return _unused(free_port)
    return _unused(lambda: random.randrange(PRIVATE_PORT_FLOOR, ephemeral_floor))


def _unused(candidate: Callable[[], int]) -> int:
    for _ in range(200):
        port = candidate()
        if port in RESERVED_PORTS or port in _ports_handed_out or not _bindable(port):
            continue
        _ports_handed_out.add(port)
        return port
    raise RuntimeError("found no free TCP port for a private RabbitMQ")


def _bindable(port: int, *, reuse: bool = False) -> bool:
    """True when a listener could bind ``port`` on 127.0.0.1 now.

    ``reuse`` binds as the broker does (SO_REUSEADDR), so connections of a broker that just
    stopped, still in TIME_WAIT on its port, do not count as taking it.
    """
    with socket.socket() as sock:
        if reuse:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _ephemeral_port_floor() -> int:
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, IndexError, ValueError):
        return 32768


class _StartFailed(RuntimeError):
    """The broker process exited during start-up (``log`` holds the end of its output)."""

    def __init__(self, message: str, log: str) -> None:
        super().__init__(f"{message}\n{log}")
        self.log = log


class RabbitMQServer:
    """A rabbitmq-server of its own: ``start()``, ``stop()``, ``kill()``, ``restart()``, ``remove()``.

    ``directory`` defaults to a fresh folder under the temp directory (pass pytest's ``tmp_path``
    for a test's own broker). The node name and database folder stay the same for the server's
    whole life, so a restart finds its durable queues and persistent messages again. The AMQP
    port stays the same from the first successful start on (``port`` fixes it from the outset);
    before that, a start that fails on a taken port tries again on fresh ports.
    ``management`` enables the management plugin (see the module docstring for its cost).
    """

    def __init__(
        self, directory: Path | None = None, *, port: int | None = None, management: bool = False
    ) -> None:
        self.binaries = find_rabbitmq()
        self.directory = directory or Path(tempfile.mkdtemp(prefix="wxrabbit-"))
        self._owns_directory = directory is None
        # A unique short name: the database folder is named after it, and epmd knows it by it.
        self.node = f"wxrabbit-{uuid.uuid4().hex[:10]}@localhost"
        self._port_pinned = port is not None
        self.port = port or private_port()
        self.dist_port = private_port()
        self.management = management
        self.management_port = private_port() if management else None
        self.epmd_port = private_port()
        self.process: subprocess.Popen[bytes] | None = None
        self.epmd: subprocess.Popen[bytes] | None = None
        self.home = self.directory / "home"
        self.log_path = self.directory / "server.log"

    # -- addresses ----------------------------------------------------------------------------

    def url(self, vhost: str = "/") -> str:
        """AMQP URL of ``vhost`` as user guest: ``amqp://guest:guest@127.0.0.1:PORT//`` for ``/``."""
        # kombu reads the path after the first slash as the vhost: "//" is vhost "/".
        path = "/" if vhost == "/" else quote(vhost, safe="")
        return f"amqp://guest:guest@127.0.0.1:{self.port}/{path}"

    @property
    def management_url(self) -> str:
        """Base URL of the management HTTP API (user guest, password guest); needs ``management=True``."""
        if self.management_port is None:
            raise RuntimeError(f"{self.node} runs without the management plugin (management=True)")
        return f"http://127.0.0.1:{self.management_port}/api"

    def connection(self, vhost: str = "/", **options: Any) -> Any:
        """A kombu ``Connection`` to ``vhost``, not yet connected; ``options`` go to its constructor.

        Typed ``Any``: kombu declares itself typed but leaves ``Connection`` unannotated.
        """
        options.setdefault("connect_timeout", 3)
        return Connection(self.url(vhost), **options)  # type: ignore[no-untyped-call]

    # -- lifecycle ----------------------------------------------------------------------------

    def start(self) -> None:
        """Start the broker and wait until it accepts AMQP connections (bounded).

        When the broker dies during start-up because a port was taken, it is tried again on fresh
        ports (the AMQP port only before its first start); any other failure raises with its log.
        """
        if self.is_running():
            return
        for attempt in range(1, START_ATTEMPTS + 1):
            self._check_ports()
            self._prepare_directory()
            self._ensure_epmd()
            try:
                self._start_once()
                # Clients hold the URL from now on: later starts (restarts) keep the port.
                self._port_pinned = True
                return
            except _StartFailed as failure:
                if attempt == START_ATTEMPTS or "eaddrinuse" not in failure.log:
                    raise
                self._pick_fresh_ports()

    def stop(self) -> None:
        """Shut the broker down cleanly (SIGTERM: it closes connections and syncs its queues)."""
        if self.process is None:
            return
        descendants = _descendants(self.process.pid)
        # The start script forwards SIGTERM to the Erlang VM and waits for it to exit.
        with contextlib.suppress(ProcessLookupError):
            self.process.terminate()
        try:
            self.process.wait(timeout=STOP_TIMEOUT_SECONDS)
        except subprocess.TimeoutExpired:
            self.kill()
            return
        self._reap(descendants)
        self.process = None

    def kill(self) -> None:
        """SIGKILL the broker's processes, as a crash would (epmd, like the machine's, lives on)."""
        if self.process is None:
            return
        descendants = _descendants(self.process.pid)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, signal.SIGKILL)
        # The VM's helpers (erl_child_setup, inet_gethost, the disk monitor) run in sessions of
        # their own: the group kill misses them, and they would outlive a crash for a moment.
        for pid in descendants:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        self.process.wait(timeout=STOP_TIMEOUT_SECONDS)
        self._reap(descendants)
        self.process = None

    def restart(self, *, kill: bool = False, down_seconds: float = 0.0) -> None:
        """Stop (or with ``kill=True`` crash) the broker, stay down ``down_seconds``, start it again.

        Same node, ports and database folder: durable queues come back with their persistent
        messages (after a kill, those the broker had confirmed or synced).
        """
        if kill:
            self.kill()
        else:
            self.stop()
        time.sleep(down_seconds)
        self.start()

    def remove(self) -> None:
        """End every process of this broker (epmd included) and delete its folder if it made it."""
        self.kill()
        self._stop_epmd()
        if self._owns_directory:
            shutil.rmtree(self.directory, ignore_errors=True)

    # -- faults -------------------------------------------------------------------------------

    def close_all_connections(self, reason: str = "test") -> None:
        """Close every client connection from the broker's side, as a network reset or proxy would."""
        self.rabbitmqctl("close_all_connections", reason)

    # -- queries ------------------------------------------------------------------------------

    def is_running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def answers(self) -> bool:
        """True when this broker (not some other on the port) accepts an AMQP connection now."""
        conn = self.connection(connect_timeout=1)
        try:
            conn.ensure_connection(max_retries=0)
            properties: dict[str, Any] = conn.connection.server_properties
            return bool(properties.get("cluster_name") == self.node)
        except (OperationalError, *conn.connection_errors, OSError):
            return False
        finally:
            conn.release()

    def queue_depth(self, queue_name: str, vhost: str = "/") -> int:
        """Messages ready for delivery in ``queue_name``, exact (:class:`LookupError` if it is missing)."""
        with self._channel(vhost) as channel:
            try:
                declared = channel.queue_declare(queue=queue_name, passive=True)
            except amqp.exceptions.NotFound as missing:
                raise LookupError(f"no queue {queue_name!r} in vhost {vhost!r}") from missing
            return int(declared.message_count)

    def queue_counts(self, vhost: str = "/") -> dict[str, QueueCounts]:
        """Every queue of ``vhost`` with its exact ready and unacknowledged counts (``rabbitmqctl``, ~1 s)."""
        output = self.rabbitmqctl(
            "list_queues", "-p", vhost, "--formatter", "json",
            "name", "messages_ready", "messages_unacknowledged", "consumers",
        )  # fmt: skip
        return {
            row["name"]: QueueCounts(
                ready=int(row["messages_ready"]),
                unacknowledged=int(row["messages_unacknowledged"]),
                consumers=int(row["consumers"]),
            )
            for row in json.loads(output)
        }

    def unacknowledged(self, queue_name: str, vhost: str = "/") -> int:
        """Messages of ``queue_name`` delivered to a consumer and not yet acknowledged (~1 s)."""
        counts = self.queue_counts(vhost)
        if queue_name not in counts:
            raise LookupError(f"no queue {queue_name!r} in vhost {vhost!r}")
        return counts[queue_name].unacknowledged

    def definitions(self) -> dict[str, Any]:
        """The broker's definitions: vhosts, queues, exchanges, bindings, users, ...

        From the management API when enabled (milliseconds), else ``rabbitmqctl`` (about a second).
        """
        if self.management:
            response = requests.get(f"{self.management_url}/definitions", auth=("guest", "guest"), timeout=10)
            response.raise_for_status()
            definitions: dict[str, Any] = response.json()
        else:
            definitions = json.loads(self.rabbitmqctl("export_definitions", "-"))
        return definitions

    # -- emptying -----------------------------------------------------------------------------

    def purge(self, *queue_names: str, vhost: str = "/") -> None:
        """Drop the ready messages of existing queues (queues that do not exist are skipped)."""
        for name in queue_names:
            with self._channel(vhost) as channel, contextlib.suppress(amqp.exceptions.NotFound):
                channel.queue_purge(queue=name)

    def delete_queues(self, *queue_names: str, vhost: str = "/") -> None:
        """Delete queues with their messages (deleting a missing queue is not an error)."""
        with self._channel(vhost) as channel:
            for name in queue_names:
                channel.queue_delete(queue=name)

    def reset(self) -> None:
        """Delete every queue and every exchange the tests declared, in every vhost.

        About 30 ms with the management plugin, a second without (see :meth:`definitions`).

        Client connections stay open: a queue that is exclusive to a connection still open (a
        process the previous test left running) cannot be deleted, and that raises.
        """
        definitions = self.definitions()
        by_vhost: dict[str, tuple[list[str], list[str]]] = {}
        for queue in definitions.get("queues", []):
            by_vhost.setdefault(queue["vhost"], ([], []))[0].append(queue["name"])
        for exchange in definitions.get("exchanges", []):
            name = exchange["name"]
            if name and not name.startswith("amq."):  # the default and amq.* exchanges stay
                by_vhost.setdefault(exchange["vhost"], ([], []))[1].append(name)
        for vhost, (queues, exchanges) in by_vhost.items():
            with self._channel(vhost) as channel:
                for name in queues:
                    try:
                        channel.queue_delete(queue=name)
                    except amqp.exceptions.ResourceLocked as locked:
                        raise RuntimeError(
                            f"queue {name!r} is exclusive to a connection still open: "
                            "stop the previous test's clients, or call close_all_connections()"
                        ) from locked
                for name in exchanges:
                    channel.exchange_delete(exchange=name)

    # -- plumbing -----------------------------------------------------------------------------

    def rabbitmqctl(self, *args: str, timeout_seconds: float = CTL_TIMEOUT_SECONDS) -> str:
        """Run ``rabbitmqctl -n NODE ARGS`` against this broker; its standard output."""
        if self.epmd is None or self.epmd.poll() is not None:
            # Without our epmd the CLI would start a daemon epmd of its own, which nothing stops.
            raise RuntimeError(f"{self.node} is not running (its epmd is down)")
        completed = subprocess.run(
            [str(self.binaries.ctl), "-n", self.node, "--quiet", *args],
            env=self._environment(),
            stdin=subprocess.DEVNULL,
            capture_output=True,
            timeout=timeout_seconds,
            check=False,
        )
        if completed.returncode != 0:
            raise RuntimeError(
                f"rabbitmqctl {' '.join(args)} failed (exit {completed.returncode}):\n"
                f"{completed.stdout.decode(errors='replace')}{completed.stderr.decode(errors='replace')}"
            )
        return completed.stdout.decode()

    @contextlib.contextmanager
    def _channel(self, vhost: str) -> Iterator[Any]:
        with self.connection(vhost) as conn:
            conn.ensure_connection(max_retries=0)
            yield conn.default_channel

    def _start_once(self) -> None:
        with open(self.log_path, "ab") as log:
            process = subprocess.Popen(
                [str(self.binaries.server)],
                env=self._environment(),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        self.process = process

        def ready() -> bool:
            if process.poll() is not None:
                raise _StartFailed(
                    f"rabbitmq-server {self.node} exited during start-up (exit {process.returncode})",
                    self._tail(),
                )
            return self.answers()

        try:
            wait_for(ready, timeout_seconds=START_TIMEOUT_SECONDS, interval_seconds=0.1, what=self.node)
        except BaseException:
            self.kill()
            raise

    def _environment(self) -> dict[str, str]:
        """The server's and the CLI's environment: everything private, nothing of the shared node."""
        env = {
            key: value
            for key, value in os.environ.items()
            # A RABBITMQ_* or ERL_* variable meant for the machine's broker must not reach ours.
            if not key.startswith(("RABBITMQ_", "ERL_"))
        }
        env.update(
            # The CLI authenticates with the cookie in $HOME; both sides read the same file.
            HOME=str(self.home),
            LC_ALL="C.UTF-8",
            LANG="C.UTF-8",
            RABBITMQ_NODENAME=self.node,
            RABBITMQ_NODE_IP_ADDRESS="127.0.0.1",
            # The AMQP port is set here only: with listeners.tcp.default in the config as well,
            # the broker failed to start (eaddrinuse).
            RABBITMQ_NODE_PORT=str(self.port),
            RABBITMQ_DIST_PORT=str(self.dist_port),
            RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS="-kernel inet_dist_use_interface {127,0,0,1}",
            RABBITMQ_MNESIA_BASE=str(self.directory / "mnesia"),
            RABBITMQ_LOG_BASE=str(self.directory / "log"),
            RABBITMQ_ENABLED_PLUGINS_FILE=str(self.directory / "enabled_plugins"),
            RABBITMQ_CONFIG_FILE=str(self.directory / "rabbitmq"),  # the server adds ".conf"
            RABBITMQ_PID_FILE=str(self.directory / "rabbitmq.pid"),
            # An empty env file: /etc/rabbitmq/rabbitmq-env.conf names the shared node.
            RABBITMQ_CONF_ENV_FILE=str(self.directory / "rabbitmq-env.conf"),
            ERL_EPMD_PORT=str(self.epmd_port),
            ERL_EPMD_ADDRESS="127.0.0.1",
        )
        return env

    def _prepare_directory(self) -> None:
        for path in (self.directory, self.home, self.directory / "mnesia", self.directory / "log"):
            path.mkdir(parents=True, exist_ok=True)
        cookie = self.home / ".erlang.cookie"
        if not cookie.exists():
            # Written before anything runs: the server and a CLI started at the same moment would
            # each create a different cookie and never authenticate.
            cookie.write_text(secrets.token_hex(16).upper())
            cookie.chmod(0o400)
        (self.directory / "rabbitmq-env.conf").write_text("")
        config = [
            "loopback_users = none",
            # answers() checks this, so a start never mistakes another broker for ours.
            f"cluster_name = {self.node}",
        ]
        if self.management:
            config += [f"management.tcp.port = {self.management_port}", "management.tcp.ip = 127.0.0.1"]
        (self.directory / "rabbitmq.conf").write_text("\n".join([*config, ""]))
        plugins = "rabbitmq_management" if self.management else ""
        (self.directory / "enabled_plugins").write_text(f"[{plugins}].\n")

    def _ensure_epmd(self) -> None:
        """Start this broker's own epmd (in the foreground, so we hold its pid) unless it runs."""
        if self.epmd is not None and self.epmd.poll() is None:
            return
        for _ in range(START_ATTEMPTS):
            with open(self.directory / "epmd.log", "ab") as log:
                epmd = subprocess.Popen(
                    [str(self.binaries.epmd), "-port", str(self.epmd_port), "-address", "127.0.0.1"],
                    env=self._environment(),
                    stdin=subprocess.DEVNULL,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,
                )
            port = self.epmd_port
            wait_for(
                lambda: epmd.poll() is not None or _accepts(port),  # noqa: B023 (used at once)
                timeout_seconds=10,
                what=f"epmd on port {port}",
            )
            if epmd.poll() is None:
                self.epmd = epmd
                return
            self.epmd_port = private_port()  # taken since we picked it
        raise RuntimeError(f"epmd did not start:\n{self._tail(self.directory / 'epmd.log')}")

    def _stop_epmd(self) -> None:
        if self.epmd is not None:
            self.epmd.kill()
            self.epmd.wait(timeout=STOP_TIMEOUT_SECONDS)
            self.epmd = None

    def _check_ports(self) -> None:
        """Fail at once when the AMQP port is taken and may not change; re-pick any other taken port.

        A broker only finds out at the end of its start-up (seconds) that it cannot listen.
        """
        if not _bindable(self.port, reuse=True):
            if self._port_pinned:
                # Just after a kill the port can stay taken for a moment (the dead node's sockets
                # are still being torn down); anything longer is another process's.
                try:
                    wait_for(
                        lambda: _bindable(self.port, reuse=True),
                        timeout_seconds=PORT_RELEASE_TIMEOUT_SECONDS,
                        interval_seconds=0.2,
                    )
                except AssertionError:
                    query = ["ss", "-tanpe", f"( sport = :{self.port} )"]
                    holders = subprocess.run(query, capture_output=True, text=True, check=False).stdout
                    raise RuntimeError(
                        f"cannot start {self.node}: port {self.port} on 127.0.0.1 is taken:\n{holders}"
                    ) from None
            else:
                self.port = private_port()
        if not _bindable(self.dist_port, reuse=True):
            self.dist_port = private_port()
        if self.management_port is not None and not _bindable(self.management_port, reuse=True):
            self.management_port = private_port()

    def _pick_fresh_ports(self) -> None:
        if not self._port_pinned:
            self.port = private_port()
        self.dist_port = private_port()
        if self.management:
            self.management_port = private_port()

    def _reap(self, pids: list[int]) -> None:
        wait_for(
            lambda: not any(_alive(pid) for pid in pids),
            timeout_seconds=STOP_TIMEOUT_SECONDS,
            what=f"the processes of {self.node} to exit",
        )

    def _tail(self, path: Path | None = None, lines: int = 40) -> str:
        try:
            text = (path or self.log_path).read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])


def _accepts(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1):
            return True
    except OSError:
        return False


def _alive(pid: int) -> bool:
    """True while ``pid`` exists and is not a zombie (an exited child not yet reaped)."""
    try:
        status = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return status.rsplit(")", 1)[-1].split()[0] != "Z"


def _descendants(pid: int) -> list[int]:
    """Every process below ``pid`` (from /proc; empty when it has none or is gone)."""
    found: list[int] = []
    pending = [pid]
    while pending:
        parent = pending.pop()
        with contextlib.suppress(OSError):
            for task in Path(f"/proc/{parent}/task").iterdir():
                children = [int(each) for each in (task / "children").read_text().split()]
                found += children
                pending += children
    return found
