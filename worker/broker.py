"""A worker says so in its log whenever it loses the broker connection it consumes on.

Two ways a Redis broker connection of a worker ends, and what each logs:

* The consumer restarts: a pending ``BRPOP`` or the pub/sub connection (remote control) fails.
  Celery logs ``consumer: Connection to broker lost. Trying to re-establish the connection...``
  (WARNING), reconnects and consumes again.
* kombu reconnects in place: the broker closed the consuming (``BRPOP``) connection while every
  pool slot was busy, so no ``BRPOP`` was pending. kombu drops the dead connection and opens a
  new one once a slot frees (``kombu/transport/redis.py`` ``MultiChannelPoller.on_readable``:
  "the server closed the idle connection. Reconnect once credit returns"), and logs nothing.

:class:`BrokerConnectionWatch` fills the second gap: a consumer bootstep that registers a
redis-py connect callback (``Connection.register_connect_callback``, called on every connect) on
the connection the worker consumes on, once that connection is up; each later connect is a
reconnect, and it logs one WARNING line starting with the same words as Celery's.

Why the pub/sub connection needs no watch of its own: its loss always restarts the consumer,
provided the broker transport options leave redis-py's command retry off (no
``retry_on_timeout``; see ``celeryconfig.py`` and docs/reliability.md).
"""

from __future__ import annotations

import logging
import weakref
from typing import Any

from celery import bootsteps

__all__ = ["CONNECTION_LOST_MESSAGE", "BrokerConnectionWatch"]

logger = logging.getLogger(__name__)

#: How often the step looks for a new consuming connection to watch (a few attribute reads).
WATCH_INTERVAL_SECONDS = 1.0
#: The words both Celery's line and ours start with: what an operator greps for.
CONNECTION_LOST_MESSAGE = "Connection to broker lost"


class BrokerConnectionWatch(bootsteps.StartStopStep):  # type: ignore[misc]  # Celery is untyped
    """Consumer bootstep: one WARNING line each time kombu re-opens the consuming connection."""

    requires = ("celery.worker.consumer.tasks:Tasks",)

    def __init__(self, c: Any, **kwargs: Any) -> None:
        super().__init__(c, **kwargs)
        self._watched: weakref.WeakSet[Any] = weakref.WeakSet()
        self._timer_entry: Any = None
        self._broker_uri = ""

    def start(self, c: Any) -> None:
        self._broker_uri = c.connection.as_uri()  # password masked
        self._timer_entry = c.timer.call_repeatedly(WATCH_INTERVAL_SECONDS, self._watch, (c,))

    def stop(self, c: Any) -> None:
        if self._timer_entry is not None:
            self._timer_entry.cancel()
            self._timer_entry = None

    def shutdown(self, c: Any) -> None:
        self.stop(c)

    def _watch(self, c: Any) -> None:
        # kombu opens the consuming connection lazily, at the first poll, and replaces the channel
        # (and so the connection) when the consumer restarts: look again each time. Only the
        # Redis transport has a ``client`` on its channel; with any other broker this does nothing.
        channel = getattr(c.task_consumer, "channel", None)
        connection = getattr(getattr(channel, "client", None), "connection", None)
        if connection is None or connection in self._watched:
            return
        # Registered after the connection is up, so every call of the callback is a reconnect.
        connection.register_connect_callback(self._on_reconnected)
        self._watched.add(connection)

    def _on_reconnected(self, connection: Any) -> None:
        logger.warning(
            "%s: the connection this worker consumes on (%s) was closed; reconnected, consuming again",
            CONNECTION_LOST_MESSAGE,
            self._broker_uri,
        )
