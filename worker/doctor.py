"""Pre-flight checks of a wxphone deployment (``wxphone doctor``).

Each check returns a :class:`Finding`; any ``fail`` makes the command exit non-zero.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, Literal

import redis
from kombu.connection import Connection
from sqlalchemy.exc import SQLAlchemyError

from worker.db import SchemaNotAtHeadError, check_schema_at_head, describe_database, make_engine
from worker.settings import Settings, SettingsError, is_wechat_url, url_host

__all__ = ["Finding", "run_checks"]

Verdict = Literal["ok", "warn", "fail"]


@dataclass(frozen=True)
class Finding:
    """The outcome of one check."""

    check: str
    verdict: Verdict
    detail: str


def _redis_location(url: str) -> str:
    connection = redis.Redis.from_url(url).connection_pool.connection_kwargs
    return f"{connection.get('host', 'localhost')}:{connection.get('port', 6379)}/{connection.get('db', 0)}"


#: What each Redis loses when it restarts without persistence, for the failure message.
BROKER_HOLDS = "queued and unacknowledged jobs"
TOKEN_STORE_HOLDS = "token fence counters, the force-refresh budget, 45009 circuits and the RedBeat lock"


def _check_redis(name: str, url: str, *, holds: str) -> Iterator[Finding]:
    """Reachable, ``maxmemory-policy noeviction`` and ``appendonly yes``: both Redis roles keep
    state that must survive a restart and must never be evicted."""
    where = _redis_location(url)
    try:
        with redis.Redis.from_url(url, socket_timeout=3, socket_connect_timeout=3) as conn:
            conn.ping()
            try:
                appendonly = conn.config_get("appendonly").get("appendonly")
                policy = conn.config_get("maxmemory-policy").get("maxmemory-policy")
            except redis.ResponseError:
                yield Finding(
                    f"{name} settings", "warn", f"{where}: CONFIG is disabled; check AOF and eviction by hand"
                )
                return
    except redis.RedisError as error:
        yield Finding(name, "fail", f"{where} unreachable ({type(error).__name__})")
        return
    yield Finding(name, "ok", f"{where} answers")
    if policy == "noeviction":
        yield Finding(f"{name} eviction", "ok", "maxmemory-policy noeviction")
    else:
        yield Finding(
            f"{name} eviction",
            "fail",
            f"maxmemory-policy is {policy}: Redis may evict {holds}; set noeviction",
        )
    if appendonly == "yes":
        yield Finding(f"{name} persistence", "ok", "appendonly yes (AOF)")
    else:
        yield Finding(
            f"{name} persistence",
            "fail",
            f"appendonly is no: {holds} are lost if Redis restarts; "
            "set appendonly yes and appendfsync everysec",
        )


#: The queues a RabbitMQ broker carries, declared as every Celery client declares a queue it sends
#: to by name (durable, no arguments: a classic queue).
RABBITMQ_QUEUES = ("wxphone", "wxphone.token")
RABBITMQ_TIMEOUT_SECONDS = 5.0


def _check_rabbitmq(url: str) -> Iterator[Finding]:
    """Reachable, and each wxphone queue that exists is one a plain Celery producer can declare
    (a durable classic queue without arguments): a quorum or non-durable queue of the same name
    makes every such producer's publish fail with PRECONDITION_FAILED."""
    connect: Any = Connection  # kombu is untyped
    connection: Any = connect(url, connect_timeout=RABBITMQ_TIMEOUT_SECONDS)
    with connection:
        where = connection.as_uri()  # password masked
        try:
            connection.ensure_connection(max_retries=1, timeout=RABBITMQ_TIMEOUT_SECONDS)
        except Exception as error:  # kombu raises the transport's own errors: report any
            yield Finding("broker", "fail", f"{where} unreachable ({type(error).__name__})")
            return
        version = connection.connection.server_properties.get("version", "?")
        yield Finding("broker", "ok", f"{where} answers (RabbitMQ {_text(version)})")
        for name in RABBITMQ_QUEUES:
            yield _check_rabbitmq_queue(connection, name)


#: AMQP reply codes the queue check tells apart.
AMQP_ACCESS_REFUSED = 403
AMQP_NOT_FOUND = 404
AMQP_PRECONDITION_FAILED = 406


def _check_rabbitmq_queue(connection: Any, name: str) -> Finding:
    check = f"broker queue {name}"
    channel = connection.channel()
    try:
        try:
            channel.queue_declare(queue=name, passive=True)
        except connection.channel_errors as error:  # the broker closes the channel
            if getattr(error, "reply_code", None) == AMQP_NOT_FOUND:
                return Finding(check, "ok", "not declared yet: the first worker declares it")
            return Finding(check, "fail", _queue_refusal(error))
        channel.close()
        channel = connection.channel()
        try:
            # Celery's own declaration: idempotent on an equivalent queue, refused otherwise.
            channel.queue_declare(queue=name, durable=True, exclusive=False, auto_delete=False)
        except connection.channel_errors as error:
            if getattr(error, "reply_code", None) == AMQP_PRECONDITION_FAILED:
                return Finding(
                    check,
                    "fail",
                    "exists with other arguments than a plain Celery client declares (PRECONDITION_FAILED): "
                    "it must be a durable classic queue without arguments; stop the front ends and "
                    "workers, delete it once empty, and let a worker declare it",
                )
            return Finding(check, "fail", _queue_refusal(error))
        return Finding(check, "ok", "durable classic queue")
    finally:
        channel.close()


def _queue_refusal(error: BaseException) -> str:
    """Why workers and producers cannot use the queue (no argument mismatch)."""
    code = getattr(error, "reply_code", None)
    if code == AMQP_ACCESS_REFUSED:
        return (
            "ACCESS_REFUSED: the broker user may not configure, write and read this queue "
            "(rabbitmqctl set_permissions)"
        )
    return f"unusable ({type(error).__name__}, reply code {code}): another client may hold it exclusively"


def _text(value: object) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _check_broker(settings: Settings) -> Iterator[Finding]:
    if settings.broker_is_rabbitmq:
        yield from _check_rabbitmq(settings.broker_url)
    else:
        yield from _check_redis("broker", settings.broker_url, holds=BROKER_HOLDS)


def _check_database(settings: Settings) -> Iterator[Finding]:
    where = describe_database(settings.database_url)
    engine = make_engine(settings.database_url, pool_size=1, max_overflow=0)
    try:
        check_schema_at_head(engine)
    except SchemaNotAtHeadError as error:
        yield Finding("database schema", "fail", str(error))
        return
    except SQLAlchemyError as error:
        yield Finding("database", "fail", f"{where} unreachable ({type(error).__name__})")
        return
    finally:
        engine.dispose()
    yield Finding("database", "ok", f"{where} at the latest schema revision")


def _check_apps(settings: Settings) -> Iterator[Finding]:
    if not settings.apps:
        yield Finding("apps", "fail", "WXPHONE_APPS is empty: no mini program to serve")
    else:
        yield Finding("apps", "ok", ", ".join(app.appid for app in settings.apps))


def _check_api_base(settings: Settings) -> Iterator[Finding]:
    host = url_host(settings.wechat_api_base)
    if settings.api_base_is_loopback:
        yield Finding("WeChat API", "warn", f"{host} is on loopback: the sandbox, not WeChat")
    elif settings.development_mode:
        yield Finding(
            "WeChat API",
            "warn",
            f"{host} with WXPHONE_DEVELOPMENT_MODE on: development keys and placeholder secrets "
            "are accepted; never with real users' data",
        )
    elif is_wechat_url(settings.wechat_api_base):
        yield Finding("WeChat API", "ok", f"{host} (WeChat)")
    else:
        yield Finding("WeChat API", "ok", f"{host} (a gateway or proxy: treated as the real WeChat)")


def _check_keys(settings: Settings) -> Iterator[Finding]:
    try:
        settings.require_production_secrets()
    except SettingsError as error:
        yield Finding("keys", "fail", str(error))
        return
    development = settings.unset_key_variables()
    if development:
        yield Finding(
            "keys", "warn", f"development keys stand in for {', '.join(development)}: they protect nothing"
        )
    else:
        yield Finding("keys", "ok", "encryption, blind-index and fingerprint keys set")


def _check_delivery(settings: Settings) -> Iterator[Finding]:
    if settings.broker_is_rabbitmq:
        yield Finding(
            "delivery",
            "ok",
            "RabbitMQ requeues a lost worker's messages at once; longest hold of a message "
            f"{max(settings.task_time_limit_seconds, settings.longest_retry_delay_seconds):.0f}s, far "
            "below RabbitMQ's consumer_timeout (30 min by default)",
        )
        return
    yield Finding(
        "delivery",
        "ok",
        f"visibility timeout {settings.visibility_timeout_seconds:.0f}s > hard limit "
        f"{settings.task_time_limit_seconds:.0f}s + longest retry "
        f"{settings.longest_retry_delay_seconds:.0f}s",
    )


def run_checks(settings: Settings) -> list[Finding]:
    """Every check, in a stable order."""
    checks: list[Callable[[], Iterator[Finding]]] = [
        lambda: _check_apps(settings),
        lambda: _check_api_base(settings),
        lambda: _check_keys(settings),
        lambda: _check_delivery(settings),
        lambda: _check_broker(settings),
        lambda: _check_redis("token store", settings.redis_url, holds=TOKEN_STORE_HOLDS),
        lambda: _check_database(settings),
    ]
    return [finding for check in checks for finding in check()]
