"""The ``wxphone`` console script: patch for gevent first, then run the command line.

A worker on the gevent pool needs the standard library's sockets, ``select`` and threads patched
before anything else imports them: psycopg picks its gevent-friendly wait function when it is
imported, redis-py and requests create sockets from the patched module, and Celery's own ``celery``
command patches before its imports for the same reason (``maybe_patch_concurrency``). So this
module imports nothing of wxphone before it has decided: ``wxphone worker --pool gevent`` (or
``-P gevent``), or a ``worker`` command whose pool comes from ``WXPHONE_WORKER_POOL`` (read through
the settings, which import no networking module).
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

__all__ = ["main", "wants_gevent"]

_POOL_OPTIONS = ("--pool", "-P")
#: Modules that must not be imported before gevent patches the standard library.
_PATCH_FIRST = ("psycopg", "redis", "requests", "celery", "kombu", "sqlalchemy")


def wants_gevent(argv: Sequence[str], default_pool: str | None) -> bool:
    """Whether ``argv`` (without the program name) runs a worker on the gevent pool."""
    if not argv or argv[0] != "worker":
        return False
    pool = None
    arguments = list(argv[1:])
    for index, argument in enumerate(arguments):
        if argument == "--":
            break
        if argument in _POOL_OPTIONS and index + 1 < len(arguments):
            pool = arguments[index + 1]
        elif argument.startswith("--pool="):
            pool = argument.removeprefix("--pool=")
        elif argument.startswith("-P") and len(argument) > 2:
            pool = argument[2:]
    return (pool or default_pool) == "gevent"


def _settings_pool(argv: Sequence[str]) -> str | None:
    if not argv or argv[0] != "worker":
        return None
    from worker.settings import SettingsError, get_settings

    try:
        return get_settings().worker_pool
    except SettingsError:
        return None  # the command reports it once it runs


def main() -> None:
    """Console-script entry point."""
    argv = sys.argv[1:]
    if wants_gevent(argv, _settings_pool(argv)):
        late = sorted(name for name in _PATCH_FIRST if name in sys.modules)
        if late:
            # Patching now would leave these with the blocking originals: greenlets would block
            # each other (a worker that takes jobs and runs none).
            sys.exit(
                f"wxphone worker: the gevent pool must be patched before {', '.join(late)} is imported; "
                "start it with `wxphone worker` or `python -m worker worker`"
            )
        try:
            from gevent import monkey
        except ImportError:
            sys.exit(
                "wxphone worker: the gevent pool needs gevent; install wxphone with the gevent extra: "
                "pip install 'wxphone[gevent]'"
            )
        monkey.patch_all()
    from worker.cli import main as run_cli

    run_cli()
