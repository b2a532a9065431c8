"""A local HTTP server that plays WeChat with replies chosen by the test (for property tests).

Token endpoints answer with a valid token (unless ``script_tokens`` is set); the phone-number and
login endpoints, and then the token endpoints too, answer with whatever
:meth:`ScriptedWeChat.set_reply` set last (any status, any bytes).
"""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import urlsplit

TOKEN_BODY = json.dumps({"access_token": "SCRIPTED_TOKEN_" + "t" * 100, "expires_in": 7200}).encode()
TOKEN_PATHS = {"/cgi-bin/token", "/cgi-bin/stable_token"}


class ScriptedWeChat(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, *, script_tokens: bool = False) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.script_tokens = script_tokens
        self._lock = threading.Lock()
        self._reply: tuple[int, bytes] = (200, b"{}")
        self.business_calls = 0

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        return f"http://{host!s}:{port}"

    def set_reply(self, status: int, body: bytes) -> None:
        with self._lock:
            self._reply = (status, body)

    def reply_for(self, path: str) -> tuple[int, bytes]:
        if path in TOKEN_PATHS and not self.script_tokens:
            return 200, TOKEN_BODY
        with self._lock:
            self.business_calls += 1
            return self._reply

    def handle_error(self, request: Any, client_address: Any) -> None:
        """A client that gives up on a huge reply is expected."""


class _Handler(BaseHTTPRequestHandler):
    server: ScriptedWeChat
    protocol_version = "HTTP/1.1"

    def _serve(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        if length:
            self.rfile.read(length)
        status, body = self.server.reply_for(urlsplit(self.path).path)
        try:
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
        except OSError:
            self.close_connection = True

    do_GET = _serve
    do_POST = _serve

    def log_message(self, format: str, *args: Any) -> None:
        """Quiet."""


@contextmanager
def scripted_wechat(*, script_tokens: bool = False) -> Iterator[ScriptedWeChat]:
    server = ScriptedWeChat(script_tokens=script_tokens)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)
