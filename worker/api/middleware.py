"""ASGI middleware of ``wxphone api``: a request body limit and an access log without URLs.

The access log names the route's template (``GET /v1/login/{job_id}``), never the path as
requested: a login job id in a URL mints a session, so it must not land in a log. Run uvicorn with
its own access log off (``wxphone api`` does): that one prints the requested path.
"""

from __future__ import annotations

import json
import logging
import time
from typing import Any

from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

__all__ = ["ACCESS_LOGGER", "AccessLogMiddleware", "BodyLimitMiddleware", "BodyTooLargeError"]

ACCESS_LOGGER = "wxphone.api.access"
_access_log = logging.getLogger(ACCESS_LOGGER)


class BodyTooLargeError(HTTPException):
    """Raised from ``receive`` when a streamed body passes the limit. An HTTPException, because
    FastAPI turns any other error while it reads a body into a 400."""

    def __init__(self) -> None:
        super().__init__(status_code=413)


class BodyLimitMiddleware:
    """Answers 413 to a request whose body exceeds ``max_body_bytes``, by its Content-Length or,
    streamed without one, as soon as more arrives: no request body is ever read whole first."""

    def __init__(self, app: ASGIApp, *, max_body_bytes: int, error_body: dict[str, str]) -> None:
        self.app = app
        self.max_body_bytes = max_body_bytes
        self._error = json.dumps(error_body).encode()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = _header(scope, b"content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > self.max_body_bytes):
            await self._refuse(send)
            return
        received = 0
        started = False

        async def limited_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_body_bytes:
                    raise BodyTooLargeError
            return message

        async def tracking_send(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, limited_receive, tracking_send)
        except BodyTooLargeError:
            if not started:
                await self._refuse(send)

    async def _refuse(self, send: Send) -> None:
        await send(
            {
                "type": "http.response.start",
                "status": 413,
                "headers": [(b"content-type", b"application/json"), (b"connection", b"close")],
            }
        )
        await send({"type": "http.response.body", "body": self._error})


class AccessLogMiddleware:
    """One INFO line per request: method, route template, status and duration."""

    def __init__(self, app: ASGIApp, *, fixed_paths: frozenset[str] = frozenset()) -> None:
        self.app = app
        #: Paths without parameters that routes outside FastAPI's own (the schema) serve: logged
        #: as they are, since the route object is not in the scope for them.
        self.fixed_paths = fixed_paths

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.monotonic()
        status = 500

        async def recording_send(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])
            await send(message)

        try:
            await self.app(scope, receive, recording_send)
        finally:
            _access_log.info(
                "%s %s %d %.0fms",
                scope.get("method", "?"),
                _route_template(scope, self.fixed_paths),
                status,
                (time.monotonic() - started) * 1000,
            )


def _route_template(scope: Scope, fixed_paths: frozenset[str]) -> str:
    """The matched route's path template; ``(unmatched)`` for a path no route serves (the path
    itself could be anything a client sent, a capability included)."""
    route: Any = scope.get("route")
    template = getattr(route, "path", None)
    if isinstance(template, str):
        return template
    path = scope.get("path")
    return path if path in fixed_paths else "(unmatched)"


def _header(scope: Scope, name: bytes) -> str | None:
    for key, value in scope.get("headers", []):
        if key.lower() == name:
            return bytes(value).decode("latin-1").strip()
    return None
