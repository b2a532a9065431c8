"""The collaborators one process shares: Redis client, WeChat client, token service.

Tasks and commands get them from :func:`get_runtime`; domain functions take them as keyword
arguments, so tests build their own. After a fork, :func:`reset_runtime` drops inherited
connections so a child never shares a socket with its parent.
"""

from __future__ import annotations

import threading
from functools import cached_property
from typing import TYPE_CHECKING

import redis
import requests
from requests.adapters import HTTPAdapter
from sqlalchemy import Engine
from sqlalchemy.orm import Session, sessionmaker

from worker.crypto import DataProtection
from worker.db import make_engine, session_factory
from worker.jobs.phone import JobPolicy
from worker.limits import API_LOGIN, API_PHONE, CallGate
from worker.liveness import RunClaims, RunnerLease
from worker.settings import Settings, get_settings
from worker.tokens.service import TokenService
from worker.tokens.store import TokenStore
from worker.wechat.client import WeChatClient

if TYPE_CHECKING:
    from worker.producer import Producer

__all__ = ["Runtime", "current_runtime", "get_runtime", "reset_runtime"]

#: Enough pooled HTTP connections and Redis connections for a threaded or gevent pool.
CONNECTION_POOL_SIZE = 128
REDIS_SOCKET_TIMEOUT_SECONDS = 5.0
REDIS_CONNECT_TIMEOUT_SECONDS = 3.0
#: A login's run claim expires by itself after this long (its code died long before).
RUN_CLAIM_TTL_SECONDS = 600.0


class Runtime:
    """Lazily built, process-wide collaborators for one :class:`Settings`."""

    def __init__(self, settings: Settings) -> None:
        # Unless the WeChat API base is on loopback (the sandbox) or development mode is on, a
        # process refuses to start without its own encryption and blind-index keys (SettingsError
        # names the variables): the public development keys protect nothing. Workers also need
        # the fingerprint key (checked where they start and where the job policy is built).
        settings.require_production_secrets(fingerprint_key=False)
        settings.warn_if_development_mode()
        self.settings = settings

    @cached_property
    def protection(self) -> DataProtection:
        """Field cipher and blind index of the configured keys (docs/security.md)."""
        return DataProtection.from_settings(self.settings)

    @cached_property
    def redis(self) -> redis.Redis:
        """Client of the token store / locks / limits Redis (``WXPHONE_REDIS_URL``)."""
        return redis.Redis.from_url(
            self.settings.redis_url,
            socket_timeout=REDIS_SOCKET_TIMEOUT_SECONDS,
            socket_connect_timeout=REDIS_CONNECT_TIMEOUT_SECONDS,
            health_check_interval=25,
            max_connections=CONNECTION_POOL_SIZE,
        )

    @cached_property
    def wechat_client(self) -> WeChatClient:
        """The WeChat API client with pooled keep-alive connections."""
        session = requests.Session()
        # Proxies come from the settings only; with trust_env on, requests would also scan the
        # environment (proxies, netrc, CA bundle variables) on every single call.
        session.trust_env = False
        proxy = self.settings.wechat_proxy_url
        if proxy:
            session.proxies = {"http": proxy, "https": proxy}
        adapter = HTTPAdapter(pool_connections=4, pool_maxsize=CONNECTION_POOL_SIZE, max_retries=0)
        session.mount("http://", adapter)
        session.mount("https://", adapter)
        timeout = (self.settings.http_connect_timeout_seconds, self.settings.http_read_timeout_seconds)
        return WeChatClient(self.settings.wechat_api_base, session=session, timeout=timeout)

    @cached_property
    def token_store(self) -> TokenStore:
        return TokenStore(self.redis, mode=self.settings.token_mode)

    @cached_property
    def token_service(self) -> TokenService:
        return TokenService(
            store=self.token_store,
            client=self.wechat_client,
            apps=self.settings.apps_by_id,
            mode=self.settings.token_mode,
            refresh_fraction=self.settings.token_refresh_fraction,
            lease_seconds=self.settings.token_lock_ttl_seconds,
            wait_seconds=self.settings.token_wait_seconds,
            local_reuse_seconds=self.settings.token_local_reuse_seconds,
            gate=self.gate,
        )

    @cached_property
    def gate(self) -> CallGate:
        """Fleet-wide limits on WeChat calls (same Redis as the token store)."""
        return CallGate(
            self.redis,
            limits_per_window={
                API_PHONE: self.settings.rate_limit_phone_per_window,
                API_LOGIN: self.settings.rate_limit_login_per_window,
            },
            window_seconds=self.settings.rate_limit_window_seconds,
            open_reuse_seconds=self.settings.call_gate_reuse_seconds,
        )

    @cached_property
    def lease(self) -> RunnerLease:
        """This process's liveness lease (same Redis as the token store); renewed once started."""
        return RunnerLease(
            self.redis,
            lease_seconds=self.settings.runner_lease_seconds,
            call_budget_seconds=self.settings.wechat_call_budget_seconds,
        )

    @cached_property
    def run_claims(self) -> RunClaims:
        """Claims of running logins (same Redis as the token store)."""
        return RunClaims(self.redis, self.lease, ttl_seconds=RUN_CLAIM_TTL_SECONDS)

    @cached_property
    def engine(self) -> Engine:
        """The PostgreSQL engine of this process (pre-ping on), sized by the settings."""
        timeout_ms = int(self.settings.database_statement_timeout_seconds * 1000)
        return make_engine(
            self.settings.database_url,
            pool_size=self.settings.database_pool_size,
            max_overflow=self.settings.database_max_overflow,
            connect_args={
                "connect_timeout": 5,
                "application_name": "wxphone",
                # No statement may hang a worker thread: every query is bounded.
                "options": f"-c statement_timeout={timeout_ms}",
            },
        )

    @cached_property
    def sessions(self) -> sessionmaker[Session]:
        return session_factory(self.engine)

    @cached_property
    def job_policy(self) -> JobPolicy:
        return JobPolicy(
            fingerprint_key=self.settings.field_fingerprint_key(),
            code_lifetime_seconds=self.settings.code_lifetime_seconds,
            retry_backoff_base_seconds=self.settings.retry_backoff_base_seconds,
            retry_backoff_max_seconds=self.settings.retry_backoff_max_seconds,
            stale_claim_seconds=self.settings.stale_claim_seconds,
            final_write_retry_seconds=self.settings.final_write_retry_seconds,
            rate_limit_window_seconds=self.settings.rate_limit_window_seconds,
        )

    @cached_property
    def producer(self) -> Producer:
        """The front-end API bound to this process's broker and database."""
        from worker.app import app
        from worker.producer import Producer

        return Producer(
            sessions=self.sessions,
            celery_app=app,
            code_lifetime_seconds=self.settings.code_lifetime_seconds,
            protection=self.protection,
            publish_timeout_seconds=self.settings.publish_timeout_seconds,
        )

    def close(self) -> None:
        """Give up the liveness lease and close pooled connections that were opened."""
        if "lease" in self.__dict__:
            self.lease.stop()
        if "engine" in self.__dict__:
            self.engine.dispose()
        if "wechat_client" in self.__dict__:
            self.wechat_client.close()
        if "redis" in self.__dict__:
            self.redis.close()


_lock = threading.Lock()
_runtime: Runtime | None = None


def get_runtime() -> Runtime:
    """The process-wide runtime built from :func:`worker.settings.get_settings`."""
    global _runtime
    with _lock:
        if _runtime is None:
            _runtime = Runtime(get_settings())
        return _runtime


def current_runtime() -> Runtime | None:
    """The process-wide runtime if one was built (never builds one)."""
    with _lock:
        return _runtime


def reset_runtime() -> None:
    """Forget the runtime (in a forked child: without closing the parent's sockets)."""
    global _runtime
    with _lock:
        if _runtime is not None and "engine" in _runtime.__dict__:
            # Drop the inherited pooled connections without closing them: they are the parent's
            # sockets (SQLAlchemy's advice for forked processes).
            _runtime.engine.dispose(close=False)
        _runtime = None
