"""Celery settings for wxphone. Values come from :mod:`worker.settings`; nothing here reads the environment.

Queues: ``wxphone`` carries phone and login jobs; ``wxphone.token`` carries token refreshes and
the stuck-job sweep, so neither waits behind a backlog of jobs.

Delivery is at-least-once: late acks, requeue when a pool child dies, one message reserved per
pool slot. The broker is Redis (one visibility timeout applied to the broker, the result backend
and Celery) or RabbitMQ (which requeues a lost consumer's messages at once); see
docs/reliability.md, "Choosing a broker".
"""

from __future__ import annotations

from typing import Any

from worker.settings import get_settings

_settings = get_settings()

JOB_QUEUE = "wxphone"
TOKEN_QUEUE = "wxphone.token"
REFRESH_TASK_NAME = "wxphone.refresh_access_token"

SWEEP_TASK_NAME = "wxphone.sweep_stuck_jobs"

#: Hard and soft limits of one task run (enforced by the prefork pool; with the threads pool every
#: blocking call carries its own timeout instead). WeChat calls time out far sooner.
TASK_TIME_LIMIT_SECONDS = _settings.task_time_limit_seconds
TASK_SOFT_TIME_LIMIT_SECONDS = _settings.task_soft_time_limit_seconds
#: Unacked messages come back after this long. Settings validation guarantees it exceeds the
#: hard limit plus the longest retry countdown, so a running task is never delivered twice.
VISIBILITY_TIMEOUT_SECONDS = _settings.visibility_timeout_seconds

broker_url = _settings.broker_url
result_expires = 24 * 3600
result_extended = False

task_serializer = "json"
result_serializer = "json"
accept_content = ["json"]
result_accept_content = ["json"]

task_default_queue = JOB_QUEUE
task_routes: dict[str, dict[str, str]] = {
    REFRESH_TASK_NAME: {"queue": TOKEN_QUEUE},
    SWEEP_TASK_NAME: {"queue": TOKEN_QUEUE},
}
task_acks_late = True
task_reject_on_worker_lost = True
task_time_limit = TASK_TIME_LIMIT_SECONDS
task_soft_time_limit = TASK_SOFT_TIME_LIMIT_SECONDS
task_track_started = False
worker_prefetch_multiplier = 1
worker_hijack_root_logger = False
worker_send_task_events = False
worker_cancel_long_running_tasks_on_connection_loss = False
#: Celery's consumer, which also puts back on the queue what a lost broker connection leaves in a
#: worker's hands alone: retries waiting for their countdown (Celery forgets them) and a message
#: Redis handed over just before it went away (kombu could not record it). See worker/broker.py.
worker_consumer = "worker.broker:Consumer"
broker_connection_retry_on_startup = True
broker_connection_max_retries = None

#: Broker connections a worker process may open. Every pool slot may ack, publish a retry and
#: read at once; kombu's default of 10 makes acks fail with MaxConnectionsError at high
#: concurrency (those messages come back only after the visibility timeout).
BROKER_MAX_CONNECTIONS = 512
broker_pool_limit = BROKER_MAX_CONNECTIONS
redis_max_connections = BROKER_MAX_CONNECTIONS

#: Workers look for unacknowledged messages older than the visibility timeout every this often
#: (kombu's default scans every 10 s x 10 = 100 s).
UNACKED_RESTORE_INTERVAL_SECONDS = 5
#: The restore scan runs under a lock in Redis that expires after this long. A worker killed
#: mid-scan leaves the lock behind, and no worker restores anything until it expires: kombu's
#: 300 s would hold a dead worker's messages back for up to 5 minutes, a code's whole life. Two
#: overlapping scans are harmless (each message is restored in a WATCH transaction, once), so
#: the lock only needs to outlast an ordinary scan (milliseconds).
UNACKED_MUTEX_EXPIRE_SECONDS = 10

#: No ``retry_on_timeout`` (nor any other redis-py command retry) on broker connections: with it,
#: redis-py retries a failed read of kombu's pub/sub connection on a fresh connection that kombu
#: never re-subscribed (kombu ``MultiChannelPoller._client_registered`` bypasses redis-py's
#: re-subscribe callback), and since redis-py 8.0.1 (redis/redis-py#4119) that blocking read has
#: no timeout: a worker whose connections were cut waited there for ever, consuming nothing and
#: logging nothing. Without a retry the read raises, and Celery restarts the consumer (and says
#: so). docs/reliability.md, "Broker connection loss".
REDIS_BROKER_TRANSPORT_OPTIONS: dict[str, Any] = {
    "max_connections": BROKER_MAX_CONNECTIONS,
    "visibility_timeout": VISIBILITY_TIMEOUT_SECONDS,
    "unacked_restore_interval": UNACKED_RESTORE_INTERVAL_SECONDS,
    "unacked_restore_throttle": 1,
    "unacked_mutex_expire": UNACKED_MUTEX_EXPIRE_SECONDS,
    "socket_timeout": 10,
    "socket_connect_timeout": 5,
    "socket_keepalive": True,
    "health_check_interval": 25,
}

#: RabbitMQ (docs/reliability.md, "Choosing a broker"). The queues are RabbitMQ's classic durable
#: queues, declared without arguments, exactly as any Celery client declares a queue it sends to
#: by name: a quorum queue (``x-queue-type``) would make such a producer's declaration fail with
#: PRECONDITION_FAILED. Messages are persistent (Celery's default delivery mode).
#:
#: * Publisher confirms: a publish (a submission, a retry) returns only once RabbitMQ has taken
#:   the message, so a connection lost mid-publish raises instead of losing the job silently.
#: * Heartbeats every 20 s: RabbitMQ closes the connection of a worker whose host vanished without
#:   closing its sockets (power loss, a network partition) after about two missed heartbeats, and
#:   requeues its unacknowledged messages then; Celery's default (120 s) would hold them for
#:   minutes of the code's life. A killed process's sockets close at once.
#: * ``consumer_timeout`` (RabbitMQ's, 30 minutes by default) closes the channel of a consumer that
#:   holds a message unacknowledged longer: wxphone holds one at most for the hard time limit
#:   (a run) or the longest retry countdown (a retry waiting in the worker), far below it.
RABBITMQ_BROKER_TRANSPORT_OPTIONS: dict[str, Any] = {
    "confirm_publish": True,
    "connect_timeout": 5,
}
RABBITMQ_HEARTBEAT_SECONDS = 20

if _settings.broker_is_rabbitmq:
    broker_transport_options: dict[str, Any] = RABBITMQ_BROKER_TRANSPORT_OPTIONS
    broker_heartbeat = RABBITMQ_HEARTBEAT_SECONDS
    # After a reconnect with tasks still running, Celery lowers the prefetch count and raises it
    # again from each ack's callback with a synchronous basic.qos on the consuming connection.
    # Measured: after a RabbitMQ restart the worker then stopped reading that connection (no
    # deliveries, no heartbeats) until RabbitMQ closed it for missed heartbeats, 60 s later, in 3
    # of 7 runs. Without the reduction a reconnected worker may reserve one message per task
    # still running, for as long as those finish (at most the hard time limit).
    worker_enable_prefetch_count_reduction = False
else:
    broker_transport_options = REDIS_BROKER_TRANSPORT_OPTIONS
#: Results (a login's openid and unionid) live in Redis: the broker's, or with RabbitMQ the token
#: store's. Results are kept for a day; nothing waits on them but the front end that asked.
result_backend = _settings.result_backend_url
result_backend_transport_options: dict[str, Any] = {"visibility_timeout": VISIBILITY_TIMEOUT_SECONDS}
visibility_timeout = VISIBILITY_TIMEOUT_SECONDS

# One beat schedules at a time: RedBeat holds a lock in Redis; a standby beat takes over.
beat_scheduler = "redbeat.RedBeatScheduler"
redbeat_redis_url = _settings.redis_url
redbeat_key_prefix = "wxphone:redbeat"
beat_max_loop_interval = 5
beat_schedule: dict[str, dict[str, Any]] = {
    "refresh-access-tokens": {
        "task": REFRESH_TASK_NAME,
        "schedule": _settings.token_check_interval_seconds,
        "options": {"queue": TOKEN_QUEUE, "expires": _settings.token_check_interval_seconds},
    },
    "sweep-stuck-jobs": {
        "task": SWEEP_TASK_NAME,
        "schedule": _settings.sweep_interval_seconds,
        "options": {"queue": TOKEN_QUEUE, "expires": _settings.sweep_interval_seconds},
    },
}
