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

:class:`Consumer` (``worker_consumer`` in ``celeryconfig.py``) puts back on the queue, once it
is connected again, two kinds of message a lost Redis connection left in this worker's hands
alone (RabbitMQ needs none of this: it requeues a closed connection's unacknowledged messages
itself, the moment the connection closes):

* **Retries waiting for their countdown.** A worker takes a retry's message off the queue at once
  and holds it, unacknowledged, until its countdown ends (a timer entry in the event loop). When
  the event loop fails on a lost connection, Celery 5.6.3 clears every timer entry
  (``celery/worker/loops.py`` ``asynloop``: ``hub.timer.clear()``, celery/celery#10218), those
  too; nothing runs or acknowledges those messages any more. kombu puts a closed channel's
  unacknowledged messages back on the queue (``Channel.close``), but only if Redis answers at that
  moment: not after a crash or a failover, nor when a ``BRPOP`` was pending on the dead connection
  (``kombu/transport/redis.py`` ``Channel.close`` reads it first, and that read raises). Those
  messages came back only after the visibility timeout (600 s by default: past the code's life).
* **A message Redis handed over and the worker could not record.** kombu takes a message in two
  steps: ``BRPOP`` removes it from the queue, then the worker records it as unacknowledged
  (``Channel._brpop_read``, then ``QoS.append``; kombu #305). When Redis goes away between the
  two (a crash right after it answered the ``BRPOP``), the record fails and the message, in
  neither place, was lost: its job waited, its code never presented, until the sweep closed it
  ``code_expired``. The consumer keeps such a message and records and requeues it once
  reconnected, as kombu requeues a message no consumer wants
  (``kombu/transport/virtual/base.py`` ``Transport._reject_inbound_message``).
"""

from __future__ import annotations

import logging
import weakref
from contextlib import suppress
from typing import Any

from celery import bootsteps, signals
from celery.exceptions import NotRegistered
from celery.worker.consumer import Consumer as CeleryConsumer
from celery.worker.request import Request

from worker.settings import is_redis_url

__all__ = ["CONNECTION_LOST_MESSAGE", "BrokerConnectionWatch", "Consumer", "UnackedRestore"]

logger = logging.getLogger(__name__)

#: How often the step looks for a new consuming connection to watch (a few attribute reads). A
#: reconnect before the step has seen the connection goes unlogged: with 1 s, a cut in the first
#: second after the worker started consuming did (seen in CI); now only one in the first 0.1 s.
WATCH_INTERVAL_SECONDS = 0.1
#: The words both Celery's line and ours start with: what an operator greps for.
CONNECTION_LOST_MESSAGE = "Connection to broker lost"


class UnackedRestore(bootsteps.StartStopStep):  # type: ignore[misc]  # Celery is untyped
    """Consumer bootstep: a worker without an event loop (the gevent and solo pools) puts a dead
    worker's unacknowledged messages back on the queue every few seconds, as the event loop's
    timer does for the others.

    kombu scans for them (``QoS.restore_visible``) on a timer of the event loop; without one it
    scans only when a poll of the broker finds nothing at all, which a gevent worker's polls
    rarely do: a dead worker's messages then stayed unacknowledged well past the visibility
    timeout (measured: 100 s after a kill with a 60 s timeout, still there)."""

    requires = ("celery.worker.consumer.tasks:Tasks",)

    def __init__(self, c: Any, **kwargs: Any) -> None:
        super().__init__(c, **kwargs)
        self._timer_entry: Any = None

    def start(self, c: Any) -> None:
        if c.hub is not None:
            return  # the event loop's timer scans already (unacked_restore_interval)
        channel: Any = getattr(c.task_consumer, "channel", None)
        if not hasattr(getattr(channel, "qos", None), "restore_visible"):
            return  # not the Redis transport: the broker redelivers by itself
        interval = float(channel.unacked_restore_interval)
        self._timer_entry = c.timer.call_repeatedly(interval, self._restore, (c,))

    def stop(self, c: Any) -> None:
        if self._timer_entry is not None:
            self._timer_entry.cancel()
            self._timer_entry = None

    def shutdown(self, c: Any) -> None:
        self.stop(c)

    def _restore(self, c: Any) -> None:
        channel = c.task_consumer.channel
        with suppress(*c.connection_errors):  # the consumer reconnects; the next scan tries again
            channel.qos.restore_visible(num=channel.unacked_restore_limit, interval=1)


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


class Consumer(CeleryConsumer):  # type: ignore[misc]  # Celery is untyped
    """Celery's consumer, which puts back on the queue, once reconnected, the retries waiting for
    their countdown and the messages it could not record when the broker connection was lost (see
    the module docstring)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        #: Requests received with a countdown whose timer has not fired yet.
        self._waiting_for_countdown: set[Request] = set()
        #: Size at which requests rejected instead of scheduled (an ETA the strategy cannot
        #: convert) are dropped from the set above; doubles, so pruning stays cheap.
        self._prune_waiting_at = 1024
        #: Messages (kombu's raw form) taken off the queue that could not be recorded.
        self._unrecorded: list[dict[str, Any]] = []
        #: Only a Redis broker leaves such messages behind: RabbitMQ requeues every unacknowledged
        #: message of a closed connection by itself, countdown retries included.
        self._redis_broker = is_redis_url(str(self.app.conf.broker_url or ""))
        signals.task_received.connect(self._on_task_received, sender=self, weak=False)

    def _on_task_received(self, sender: Any = None, request: Request | None = None, **_: Any) -> None:
        # The strategy schedules a request with an ETA on the timer (``apply_eta_task``), unless a
        # rate limit applies (wxphone sets none): those wait in a token bucket instead.
        if (
            self._redis_broker
            and request is not None
            and request.eta
            and (self.disable_rate_limits or not self.task_buckets[request.task.name])
        ):
            self._waiting_for_countdown.add(request)
            if len(self._waiting_for_countdown) >= self._prune_waiting_at:
                self._waiting_for_countdown = {
                    each for each in self._waiting_for_countdown if not each.acknowledged
                }
                self._prune_waiting_at = max(1024, 2 * len(self._waiting_for_countdown))

    def create_task_handler(self, *args: Any, **kwargs: Any) -> Any:
        """Celery's handler of each delivered message, which also drops a message it cannot turn
        into a task request, as it drops one of an unknown task or content type.

        Celery catches only the errors it expects while building a request; anything else (a
        protocol-1 body naming a task but without an ``id``: ``KeyError``) escapes into kombu,
        the consumer restarts (kombu's Redis transport counts ``KeyError`` among its connection
        errors), the unacknowledged message is restored, and the worker crashed on it again in
        a loop that consumed nothing else."""
        handle = super().create_task_handler(*args, **kwargs)
        # Acks and rejects inside the handler log their own connection errors; one that still
        # escapes means the connection is gone. A KeyError never does: it is the message's.
        connection_errors = tuple(each for each in self.connection_errors if each is not KeyError)

        def on_task_received(message: Any) -> Any:
            try:
                return handle(message)
            except connection_errors:
                raise  # the consumer reconnects; the message is redelivered
            except Exception as error:  # a body no request can be made of: drop it, once
                return self.on_invalid_task(None, message, error)

        return on_task_received

    def on_invalid_task(self, body: Any, message: Any, exc: BaseException) -> None:
        """Drop a message no request can be made of, logging what it was but not its body:
        Celery logs up to 1 KB of the raw body, which may hold a code where redaction cannot
        find it (a positional argument, a truncated value)."""
        logger.error("dropped a message no task can be made of (%s): %s", type(exc).__name__, _about(message))
        message.reject_log_error(logger, self.connection_errors)
        signals.task_rejected.send(sender=self, message=message, exc=exc)

    def on_unknown_message(self, body: Any, message: Any) -> None:
        """Drop a message that is no task message at all, logging it without its body."""
        logger.warning("dropped a message that is no task message: %s", _about(message))
        message.reject_log_error(logger, self.connection_errors)
        signals.task_rejected.send(sender=self, message=message, exc=None)

    def on_unknown_task(self, body: Any, message: Any, exc: BaseException) -> None:
        """Drop a message for a task this worker does not run, logging it without its body, and
        store the failure as Celery does (a sender waiting for the result learns of it)."""
        logger.error("dropped a message for a task this worker does not run: %s", _about(message))
        message.reject_log_error(logger, self.connection_errors)
        headers = message.headers if isinstance(message.headers, dict) else {}
        task_id, name = headers.get("id"), headers.get("task")
        if isinstance(task_id, str) and isinstance(name, str):
            with suppress(Exception):  # the result store is a courtesy here; the drop is done
                self.app.backend.mark_as_failure(task_id, NotRegistered(name), request=None)
        signals.task_rejected.send(sender=self, message=message, exc=exc)

    def apply_eta_task(self, task: Request) -> None:
        self._waiting_for_countdown.discard(task)
        super().apply_eta_task(task)

    def on_ready(self) -> None:
        # Called each time the event loop starts, once the task consumer consumes (``asynloop``):
        # kombu has registered a delivery callback per queue on the new channel.
        super().on_ready()
        if not self._redis_broker:
            return
        channel = self.task_consumer.channel
        # kombu's virtual transports (Redis) deliver through ``Transport._callbacks``, one callback
        # per queue, which records the message and hands it to Celery. kombu is pinned to the
        # minor version this is written against (pyproject.toml).
        callbacks = getattr(channel.connection, "_callbacks", None)
        if callbacks is None:
            return
        for queue in self.task_consumer.queues:
            deliver = callbacks.get(queue.name)
            if deliver is not None and not isinstance(deliver, _KeepUnrecorded):
                callbacks[queue.name] = _KeepUnrecorded(deliver, channel, self._unrecorded)

    def on_connection_error_after_connected(self, exc: BaseException) -> None:
        super().on_connection_error_after_connected(exc)  # closes the lost channel
        if not self._redis_broker:
            return
        scheduled = {id(arg) for item in self.timer.queue for arg in item.entry.args}
        waiting, self._waiting_for_countdown = self._waiting_for_countdown, set()
        forgotten: list[Request] = []
        for request in waiting:
            if id(request) in scheduled:  # its timer survived: it runs as planned
                self._waiting_for_countdown.add(request)
            elif not request.acknowledged and _still_unacknowledged(request):
                forgotten.append(request)
        for request in forgotten:
            # Deferred to the event loop (``call_soon``), which runs again once reconnected.
            request.reject(requeue=True)
        if forgotten:
            logger.warning(
                "%s: %d task(s) waiting for their countdown go back on the queue once reconnected",
                CONNECTION_LOST_MESSAGE,
                len(forgotten),
            )
        if self._unrecorded:
            logger.warning(
                "%s: %d message(s) taken off the queue but not recorded go back on the queue once "
                "reconnected",
                CONNECTION_LOST_MESSAGE,
                len(self._unrecorded),
            )
            self.call_soon(self._put_back_unrecorded)

    def _put_back_unrecorded(self) -> None:
        """Record each kept message as unacknowledged on the current channel, then requeue it."""
        channel = self.task_consumer.channel
        while self._unrecorded:
            message = channel.Message(self._unrecorded[0], channel=channel)
            try:
                channel.qos.append(message, message.delivery_tag)
            except self.connection_errors:
                return  # lost again: the next reconnect tries again
            del self._unrecorded[0]
            # Recorded: a requeue that fails now leaves it to come back after the visibility timeout.
            message.reject_log_error(logger, self.connection_errors, requeue=True)


class _KeepUnrecorded:
    """kombu's delivery callback for one queue, keeping the message when recording it as
    unacknowledged fails on a lost connection (the error still propagates: the consumer restarts)."""

    def __init__(self, deliver: Any, channel: Any, kept: list[dict[str, Any]]) -> None:
        self._deliver = deliver
        self._channel = channel
        self._kept = kept

    def __call__(self, raw_message: dict[str, Any]) -> Any:
        try:
            return self._deliver(raw_message)
        except self._channel.connection_errors:
            try:
                self._channel.qos.get(raw_message["properties"]["delivery_tag"])
            except KeyError:  # not recorded: Redis no longer holds it anywhere
                self._kept.append(raw_message)
            raise


def _about(message: Any) -> str:
    """What a dropped message was, without its body: task name, id and size."""
    headers = message.headers if isinstance(getattr(message, "headers", None), dict) else {}
    size = len(message.body or b"")
    return (
        f"task {str(headers.get('task', '?'))[:64]!r}, id {str(headers.get('id', '?'))[:64]!r}, {size} bytes"
    )


def _still_unacknowledged(request: Request) -> bool:
    """Whether kombu still holds ``request``'s message as delivered to this worker: closing the
    channel did not put it back on the queue (it cannot while Redis is unreachable)."""
    message = request.message
    try:
        message.channel.qos.get(message.delivery_tag)
    except KeyError:
        return False
    return True
