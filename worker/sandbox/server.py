"""The sandbox's HTTP server: WeChat's four endpoints plus the ``/_sandbox/`` admin API.

Handlers read the request, then call :class:`~worker.sandbox.state.SandboxState` without awaiting
in between, so every emulated call is atomic on the single event loop. Only latency (configured or
injected) is awaited, before or after processing. There is no access log unless asked for, and
the opt-in one prints method, path and status only: query strings carry secrets, tokens and codes.

Emulated endpoints (every error is HTTP 200 ``{"errcode": N, "errmsg": "<text> rid: <rid>"}``)::

    GET  /cgi-bin/token?grant_type=client_credential&appid=&secret=
    POST /cgi-bin/stable_token                {grant_type, appid, secret, force_refresh}
    POST /wxa/business/getuserphonenumber?access_token=   {code, openid?}
    GET  /sns/jscode2session?appid=&secret=&js_code=&grant_type=authorization_code

Admin API (JSON in and out; invalid input is HTTP 400 ``{"error": ...}``)::

    GET    /_sandbox/health                  {"ok": true}
    GET    /_sandbox/apps                    {"apps": [appid, ...]}
    POST   /_sandbox/apps                    {appid, secret}
    POST   /_sandbox/apps/{appid}/revoke     every token of the app stops working now
    GET    /_sandbox/config                  the current settings
    POST   /_sandbox/config                  any of the settings of SandboxConfig
    POST   /_sandbox/phone_codes             {appid, count?, phone_number?, pure_phone_number?,
                                              country_code?, country_code_as_number?,
                                              watermark_appid?, lifetime_seconds?}
                                             -> {"codes": [...], "phones": [{code, phone_number, ...}]}
    POST   /_sandbox/login_codes             {appid, openid?, unionid?, high_risk?} -> {code, openid}
    GET    /_sandbox/faults                  queued faults
    POST   /_sandbox/faults                  {endpoint, errcode?, times?, latency_ms?, drop_connection?,
                                              http_status?, timing?: "before" | "after"}
    DELETE /_sandbox/faults                  drop every queued fault
    GET    /_sandbox/stats                   counters per endpoint and per app, codes_exchanged,
                                             code_presentations (histogram: times presented -> codes)
    POST   /_sandbox/reset                   {all?}: forget tokens, codes, faults, counters, clock offset;
                                             with all, also restore the start-up apps and settings
    POST   /_sandbox/clock                   {seconds}: move the sandbox's time forward
"""

from __future__ import annotations

import asyncio
import importlib
import importlib.util
import json
import logging
import signal
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

from aiohttp import web
from aiohttp.abc import AbstractAccessLogger
from aiohttp.web_request import BaseRequest

from worker.sandbox.state import Fault, Reply, SandboxInputError, SandboxState
from worker.wechat.errors import API_CLASSIC_TOKEN, API_CODE_TO_SESSION, API_PHONE_NUMBER, API_STABLE_TOKEN

__all__ = ["STATE_KEY", "create_app", "run_sandbox"]

STATE_KEY = web.AppKey("sandbox_state", SandboxState)
#: In-flight requests (some may be sleeping on injected latency) get this long at shutdown.
SHUTDOWN_TIMEOUT_SECONDS = 3.0
#: Benchmarks open many connections at once.
LISTEN_BACKLOG = 2048
#: Request bodies of the emulated endpoints are tiny; admin requests stay small too.
MAX_BODY_BYTES = 1024 * 1024

_logger = logging.getLogger(__name__)
_HTTP_REASONS = {502: "Bad Gateway", 503: "Service Unavailable", 504: "Gateway Timeout"}

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


# -- emulated WeChat endpoints ----------------------------------------------------------------


def _json_response(body: Mapping[str, Any], status: int = 200) -> web.Response:
    return web.Response(
        body=json.dumps(body, ensure_ascii=False, separators=(",", ":")).encode(),
        status=status,
        content_type="application/json",
        charset="utf-8",
    )


async def _read_json(request: web.Request) -> object:
    """The decoded JSON body, or ``None`` when it is missing or not JSON (WeChat answers 47001)."""
    raw = await request.read()
    if not raw:
        return None
    try:
        return json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        return None


async def _sleep_ms(milliseconds: float) -> None:
    if milliseconds > 0:
        await asyncio.sleep(milliseconds / 1000)


async def _emulate(
    request: web.Request, endpoint: str, appid: str | None, process: Callable[[], Reply]
) -> web.StreamResponse:
    """Run ``process`` (the state call) wrapped in the endpoint's latency and queued fault."""
    state = request.app[STATE_KEY]
    fault = state.take_fault(endpoint)
    reply: Reply | None = None
    if fault is not None and fault.timing == "before":
        await _sleep_ms(fault.latency_ms)
    if fault is None or fault.timing == "after" or not fault.replaces_reply:
        reply = process()
        if fault is not None and fault.timing == "after":
            await _sleep_ms(fault.latency_ms)
    await _sleep_ms(state.config.latency_ms.get(endpoint, 0.0))
    if fault is not None and fault.replaces_reply:
        return _faulty_reply(request, state, endpoint, appid, fault)
    assert reply is not None
    state.record(endpoint, appid, reply.get("errcode", 0), fault=fault is not None)
    return _json_response(reply)


def _faulty_reply(
    request: web.Request, state: SandboxState, endpoint: str, appid: str | None, fault: Fault
) -> web.StreamResponse:
    if fault.drop_connection:
        state.record(endpoint, appid, None, fault=True)
        _drop_connection(request)
        # Nothing can be sent any more; aiohttp drops the write on a closed transport.
        return web.Response(status=500)
    if fault.http_status is not None:
        state.record(endpoint, appid, None, fault=True)
        reason = _HTTP_REASONS.get(fault.http_status, "Sandbox Fault")
        return web.Response(
            status=fault.http_status,
            text=f"<html><body><h1>{fault.http_status} {reason}</h1></body></html>",
            content_type="text/html",
        )
    errcode = fault.errcode if fault.errcode is not None else -1
    state.record(endpoint, appid, errcode, fault=True)
    return _json_response(state.error(errcode))


def _drop_connection(request: web.Request) -> None:
    """Close the client's socket without sending a byte of the reply."""
    request.protocol.force_close()
    transport = request.transport
    if transport is not None:
        transport.abort()


async def _classic_token(request: web.Request) -> web.StreamResponse:
    state = request.app[STATE_KEY]
    query = request.query
    return await _emulate(
        request, API_CLASSIC_TOKEN, query.get("appid"), lambda: state.classic_token(request.method, query)
    )


async def _stable_token(request: web.Request) -> web.StreamResponse:
    state = request.app[STATE_KEY]
    payload = await _read_json(request)
    appid = payload.get("appid") if isinstance(payload, dict) else None
    return await _emulate(
        request,
        API_STABLE_TOKEN,
        appid if isinstance(appid, str) else None,
        lambda: state.stable_token(request.method, request.query, payload),
    )


async def _phone_number(request: web.Request) -> web.StreamResponse:
    state = request.app[STATE_KEY]
    payload = await _read_json(request)
    access_token = request.query.get("access_token")
    return await _emulate(
        request,
        API_PHONE_NUMBER,
        state.app_of_token(access_token),
        lambda: state.phone_number(request.method, access_token, payload),
    )


async def _code_to_session(request: web.Request) -> web.StreamResponse:
    state = request.app[STATE_KEY]
    query = request.query
    return await _emulate(
        request, API_CODE_TO_SESSION, query.get("appid"), lambda: state.code_to_session(request.method, query)
    )


# -- admin API --------------------------------------------------------------------------------


def _admin(handler: Callable[[web.Request, SandboxState], Awaitable[object]]) -> Handler:
    """Wrap an admin handler: JSON out, invalid input as HTTP 400 with ``{"error": ...}``."""

    async def wrapped(request: web.Request) -> web.StreamResponse:
        try:
            result = await handler(request, request.app[STATE_KEY])
        except SandboxInputError as error:
            return _json_response({"error": str(error)}, status=400)
        except KeyError as error:
            return _json_response({"error": f"unknown {error.args[0]!r}"}, status=404)
        if isinstance(result, web.StreamResponse):
            return result
        return _json_response(result if isinstance(result, Mapping) else {"result": result})

    return wrapped


async def _admin_payload(request: web.Request) -> dict[str, Any]:
    raw = await request.read()
    if not raw:
        return {}
    try:
        payload = json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        raise SandboxInputError("the body must be a JSON object") from None
    if not isinstance(payload, dict):
        raise SandboxInputError("the body must be a JSON object")
    return payload


async def _health(request: web.Request, state: SandboxState) -> object:
    return {"ok": True}


async def _register_app(request: web.Request, state: SandboxState) -> object:
    payload = await _admin_payload(request)
    state.register_app(payload.get("appid"), payload.get("secret"))
    return {"appid": payload["appid"], "registered": True}


async def _list_apps(request: web.Request, state: SandboxState) -> object:
    return {"apps": state.appids}


async def _revoke(request: web.Request, state: SandboxState) -> object:
    appid = request.match_info["appid"]
    return {"appid": appid, "revoked": state.revoke_tokens(appid)}


async def _get_config(request: web.Request, state: SandboxState) -> object:
    return state.config.as_dict()


async def _set_config(request: web.Request, state: SandboxState) -> object:
    state.config.update(await _admin_payload(request))
    return state.config.as_dict()


async def _phone_codes(request: web.Request, state: SandboxState) -> object:
    minted = state.mint_phone_codes(await _admin_payload(request))
    return {"codes": [item["code"] for item in minted], "phones": minted}


async def _login_codes(request: web.Request, state: SandboxState) -> object:
    return state.mint_login_code(await _admin_payload(request))


async def _add_fault(request: web.Request, state: SandboxState) -> object:
    fault, times = Fault.from_json(await _admin_payload(request))
    return {"endpoint": fault.endpoint, "queued": state.add_fault(fault, times)}


async def _list_faults(request: web.Request, state: SandboxState) -> object:
    return {"faults": state.pending_faults()}


async def _clear_faults(request: web.Request, state: SandboxState) -> object:
    state.clear_faults()
    return {"cleared": True}


async def _stats(request: web.Request, state: SandboxState) -> object:
    return state.stats()


async def _reset(request: web.Request, state: SandboxState) -> object:
    payload = await _admin_payload(request)
    everything = payload.get("all", False)
    if not isinstance(everything, bool):
        raise SandboxInputError("all must be true or false")
    state.reset(everything=everything)
    return {"reset": True, "all": everything}


async def _advance_clock(request: web.Request, state: SandboxState) -> object:
    payload = await _admin_payload(request)
    return {"offset_seconds": state.advance_clock(payload.get("seconds"))}


def create_app(state: SandboxState) -> web.Application:
    """The aiohttp application serving ``state``."""
    app = web.Application(client_max_size=MAX_BODY_BYTES)
    app[STATE_KEY] = state
    app.router.add_route("*", "/cgi-bin/token", _classic_token)
    app.router.add_route("*", "/cgi-bin/stable_token", _stable_token)
    app.router.add_route("*", "/wxa/business/getuserphonenumber", _phone_number)
    app.router.add_route("*", "/sns/jscode2session", _code_to_session)
    admin_routes: list[tuple[str, str, Callable[[web.Request, SandboxState], Awaitable[object]]]] = [
        ("GET", "/_sandbox/health", _health),
        ("GET", "/_sandbox/apps", _list_apps),
        ("POST", "/_sandbox/apps", _register_app),
        ("POST", "/_sandbox/apps/{appid}/revoke", _revoke),
        ("GET", "/_sandbox/config", _get_config),
        ("POST", "/_sandbox/config", _set_config),
        ("POST", "/_sandbox/phone_codes", _phone_codes),
        ("POST", "/_sandbox/login_codes", _login_codes),
        ("GET", "/_sandbox/faults", _list_faults),
        ("POST", "/_sandbox/faults", _add_fault),
        ("DELETE", "/_sandbox/faults", _clear_faults),
        ("GET", "/_sandbox/stats", _stats),
        ("POST", "/_sandbox/reset", _reset),
        ("POST", "/_sandbox/clock", _advance_clock),
    ]
    for method, path, handler in admin_routes:
        app.router.add_route(method, path, _admin(handler))
    return app


# -- running ----------------------------------------------------------------------------------


class PathOnlyAccessLogger(AbstractAccessLogger):
    """Logs method, path, status and duration; never the query string, headers or body."""

    def log(self, request: BaseRequest, response: web.StreamResponse, time: float) -> None:
        self.logger.info("%s %s %s %.1fms", request.method, request.path, response.status, time * 1000)


def _new_event_loop() -> asyncio.AbstractEventLoop:
    # uvloop is used when it happens to be installed; it is not a dependency.
    if importlib.util.find_spec("uvloop") is not None:
        uvloop = importlib.import_module("uvloop")
        loop: asyncio.AbstractEventLoop = uvloop.new_event_loop()
        return loop
    return asyncio.new_event_loop()


async def _serve(
    state: SandboxState, host: str, port: int, access_log: bool, on_ready: Callable[[str], None] | None
) -> None:
    runner = web.AppRunner(
        create_app(state),
        access_log=logging.getLogger("wxphone.sandbox.access") if access_log else None,
        access_log_class=PathOnlyAccessLogger,
        shutdown_timeout=SHUTDOWN_TIMEOUT_SECONDS,
    )
    await runner.setup()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    try:
        site = web.TCPSite(runner, host, port, backlog=LISTEN_BACKLOG, reuse_address=True)
        await site.start()
        bound_host, bound_port = runner.addresses[0][:2]
        url = f"http://{bound_host}:{bound_port}"
        _logger.info("sandbox listening on %s", url)
        if on_ready is not None:
            on_ready(url)
        await stop.wait()
    finally:
        for signum in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(signum)
        await runner.cleanup()


def run_sandbox(
    state: SandboxState,
    *,
    host: str = "127.0.0.1",
    port: int = 8780,
    access_log: bool = False,
    on_ready: Callable[[str], None] | None = None,
) -> None:
    """Serve ``state`` on ``host:port`` until SIGINT or SIGTERM; ``on_ready`` gets the base URL."""
    loop = _new_event_loop()
    try:
        loop.run_until_complete(_serve(state, host, port, access_log, on_ready))
    finally:
        loop.run_until_complete(loop.shutdown_asyncgens())
        loop.close()
