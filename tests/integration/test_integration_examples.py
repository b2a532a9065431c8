"""The front ends of docs/integration.md, run for real.

The Flask and FastAPI examples (docs/examples/) answer through their test clients (Flask's test
client; FastAPI through httpx's ASGI transport), on the pipeline's
producer, with real worker processes, PostgreSQL, Redis and the WeChat sandbox. The mini-program
page (docs/examples/miniprogram/phone.js) runs in Node.js with ``wx`` played by a stand-in whose
``wx.request`` reaches the Flask example over HTTP.
"""

from __future__ import annotations

import asyncio
import importlib.util
import json
import logging
import os
import shutil
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any, Protocol

import httpx
import pytest
from sqlalchemy import text
from werkzeug.serving import make_server

from tests.support.pipeline import Pipeline, endpoint_counts
from tests.support.processes import ManagedProcess
from tests.support.services import free_port

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES_DIR = ROOT / "docs" / "examples"
PAGE_JS = EXAMPLES_DIR / "miniprogram" / "phone.js"
APPID = "wxpipeline000001"
SECRET_KEY = "integration-examples-session-signing-key"
#: A well-formed phone code WeChat never issued (the sandbox answers 40029).
NEVER_ISSUED_CODE = "0a1B2c3D4e5F6g7H8i9J0k1L2m3N4o5P"
NODE_INSTALL_HINT = "sudo apt-get install -y nodejs"
NODE_TIMEOUT_SECONDS = 90


def load_example(name: str) -> ModuleType:
    """docs/examples/NAME.py as a module (docs/ is not a package)."""
    spec = importlib.util.spec_from_file_location(f"docs_examples_{name}", EXAMPLES_DIR / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


flask_app = load_example("flask_app")
fastapi_app = load_example("fastapi_app")


@dataclass(frozen=True)
class Reply:
    status: int
    body: Any
    text: str


@dataclass
class ExampleClient:
    """One example app behind its framework's test client, making the calls a mini program makes.

    Every answer's text is kept, to check that none holds a code or a full number."""

    name: str
    send: Callable[[str, str, Any, dict[str, str]], Reply]
    texts: list[str] = field(default_factory=list)

    def post(self, path: str, body: Any, session: str | None = None) -> Reply:
        return self._call("POST", path, body, session)

    def get(self, path: str, session: str | None = None) -> Reply:
        return self._call("GET", path, None, session)

    def _call(self, method: str, path: str, body: Any, session: str | None) -> Reply:
        headers = {"Authorization": f"Bearer {session}"} if session is not None else {}
        reply = self.send(method, path, body, headers)
        self.texts.append(reply.text)
        return reply

    def log_in(self, pipeline: Pipeline, openid: str) -> str:
        js_code, _ = pipeline.sandbox.mint_login_code(APPID, openid=openid, unionid=f"u{openid}")
        reply = self.post("/v1/login", {"appid": APPID, "js_code": js_code})
        assert reply.status == 200, reply
        assert (reply.body["openid"], reply.body["unionid"]) == (openid, f"u{openid}")
        return str(reply.body["session"])


class MakeExample(Protocol):
    def __call__(self, *, max_wait_seconds: float = ...) -> ExampleClient: ...


@contextmanager
def flask_client(pipeline: Pipeline, **options: Any) -> Iterator[ExampleClient]:
    app = flask_app.create_app(pipeline.producer, appids=[APPID], secret_key=SECRET_KEY, **options)
    client = app.test_client()

    def send(method: str, path: str, body: Any, headers: dict[str, str]) -> Reply:
        response = client.open(path, method=method, json=body, headers=headers)
        return Reply(response.status_code, response.get_json(silent=True), response.get_data(as_text=True))

    yield ExampleClient("flask", send)


@contextmanager
def fastapi_client(pipeline: Pipeline, **options: Any) -> Iterator[ExampleClient]:
    """Through httpx's ASGI transport, on one event loop kept for the test."""
    app = fastapi_app.create_app(pipeline.producer, appids=[APPID], secret_key=SECRET_KEY, **options)
    with asyncio.Runner() as runner:
        client = httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://example")

        def send(method: str, path: str, body: Any, headers: dict[str, str]) -> Reply:
            response = runner.run(client.request(method, path, json=body, headers=headers))
            return Reply(response.status_code, response.json(), response.text)

        try:
            yield ExampleClient("fastapi", send)
        finally:
            runner.run(client.aclose())


@pytest.fixture(params=["flask", "fastapi"])
def make_example(request: pytest.FixtureRequest, pipeline: Pipeline) -> Iterator[MakeExample]:
    """Builds the example app of this parameter on the pipeline's producer."""
    factory = flask_client if request.param == "flask" else fastapi_client
    with ExitStack() as clients:

        def make(**options: Any) -> ExampleClient:
            return clients.enter_context(factory(pipeline, **options))

        yield make


def assert_nothing_secret(texts: list[str], *secrets: str) -> None:
    for answer in texts:
        for secret in secrets:
            assert secret not in answer


def mint_phone(pipeline: Pipeline, number: str) -> str:
    return pipeline.sandbox.mint_phone_code(APPID, phone_number=number, pure_phone_number=number)


def test_a_user_logs_in_and_gets_the_masked_number_in_the_same_request(
    pipeline: Pipeline, make_example: MakeExample, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    pipeline.start_worker(concurrency=2)
    example = make_example()
    js_code, _ = pipeline.sandbox.mint_login_code(APPID, openid="oExample0001", unionid="uExample0001")
    login = example.post("/v1/login", {"appid": APPID, "js_code": js_code})
    assert login.status == 200
    assert set(login.body) == {"session", "openid", "unionid"}
    assert (login.body["openid"], login.body["unionid"]) == ("oExample0001", "uExample0001")
    # The login is a durable job like any other.
    assert pipeline.count("SELECT count(*) FROM login_jobs WHERE status = 'succeeded'") == 1

    number = "13912345678"
    code = mint_phone(pipeline, number)
    reply = example.post("/v1/phone", {"code": code, "wait_seconds": 10}, session=login.body["session"])
    assert reply.status == 200, reply
    job_id = reply.body["job_id"]
    assert reply.body == {
        "job_id": job_id,
        "status": "succeeded",
        "phone": {"masked": "139****5678", "country_code": "86"},
    }
    # The number landed on the session's user, not on anyone named in a body.
    job = pipeline.producer.get_job(job_id)
    assert job is not None
    assert (job.kind, job.appid, job.openid, job.status) == ("phone", APPID, "oExample0001", "succeeded")
    user = pipeline.producer.get_user(appid=APPID, openid="oExample0001")
    assert user is not None and user.phone_number == number

    # Following the job answers the same, at once.
    again = example.get(f"/v1/phone/{job_id}?wait_seconds=5", session=login.body["session"])
    assert (again.status, again.body) == (200, reply.body)
    assert endpoint_counts(pipeline.sandbox, "phone").calls == 1

    assert_nothing_secret([*example.texts, caplog.text], number, code, js_code)


def test_a_slow_exchange_answers_202_and_the_follow_up_waits_for_the_end(
    pipeline: Pipeline, make_example: MakeExample
) -> None:
    pipeline.start_worker(concurrency=2)
    example = make_example()
    session = example.log_in(pipeline, "oExample0002")
    other_session = example.log_in(pipeline, "oExample0003")
    pipeline.sandbox.configure(latency_ms={"phone": 1500})
    code = mint_phone(pipeline, "13800002222")

    reply = example.post("/v1/phone", {"code": code, "wait_seconds": 0.2}, session=session)
    assert reply.status == 202, reply
    job_id = reply.body["job_id"]
    assert set(reply.body) == {"job_id", "status"}
    assert reply.body["status"] in {"queued", "running"}

    # Another user's session, no session, a forged one: the job is not theirs to see.
    assert example.get(f"/v1/phone/{job_id}?wait_seconds=5", session=other_session).status == 404
    assert example.get(f"/v1/phone/{job_id}").status == 401
    assert example.get(f"/v1/phone/{job_id}", session=session + "x").status == 401
    assert example.get(f"/v1/phone/{job_id}?wait_seconds=-1", session=session).status == 400

    followed = example.get(f"/v1/phone/{job_id}?wait_seconds=10", session=session)
    assert followed.status == 200, followed
    assert followed.body["phone"] == {"masked": "138****2222", "country_code": "86"}


def test_the_wait_is_capped_by_the_front_end(pipeline: Pipeline, make_example: MakeExample) -> None:
    pipeline.start_worker(concurrency=1)
    example = make_example(max_wait_seconds=0.5)
    session = example.log_in(pipeline, "oExample0004")
    pipeline.sandbox.configure(latency_ms={"phone": 2500})
    code = mint_phone(pipeline, "13800004444")
    reply = example.post("/v1/phone", {"code": code, "wait_seconds": 60}, session=session)
    assert reply.status == 202, reply
    # Capped again on the follow-up; it ends as the job ends.
    replies = [reply]
    while replies[-1].status == 202 and len(replies) < 120:
        replies.append(example.get(f"/v1/phone/{reply.body['job_id']}?wait_seconds=60", session=session))
    assert replies[-1].status == 200 and len(replies) > 2


def test_failed_jobs_bad_input_and_bad_sessions_are_answered_without_echoing_the_code(
    pipeline: Pipeline, make_example: MakeExample, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    pipeline.start_worker(concurrency=2)
    example = make_example()
    session = example.log_in(pipeline, "oExample0005")

    failed = example.post("/v1/phone", {"code": NEVER_ISSUED_CODE, "wait_seconds": 10}, session=session)
    assert failed.status == 422, failed
    assert set(failed.body) == {"job_id", "error_code", "message"}
    assert failed.body["error_code"] == "invalid_code"
    jobs = pipeline.count("SELECT count(*) FROM phone_jobs")

    good_code = mint_phone(pipeline, "13800005555")
    refused = [
        example.post("/v1/phone", {"code": good_code, "wait_seconds": 1}),  # no session
        example.post("/v1/phone", {"code": good_code}, session="not-a-session"),
        example.post("/v1/phone", {"code": "has a space", "wait_seconds": 1}, session=session),
        example.post("/v1/phone", {"code": good_code + "\n", "wait_seconds": 1}, session=session),
        example.post("/v1/phone", {"code": good_code, "wait_seconds": -1}, session=session),
        example.post("/v1/phone", {"code": good_code, "wait_seconds": "soon"}, session=session),
        example.post("/v1/phone", {"code": good_code, "wait_seconds": 10**400}, session=session),
        example.post("/v1/phone", {"code": 12345678, "wait_seconds": 1}, session=session),
        example.post("/v1/phone", {"wait_seconds": 1}, session=session),
        example.post("/v1/phone", [good_code], session=session),
    ]
    assert [reply.status for reply in refused] == [401, 401] + [400] * 8
    for reply in refused:
        assert set(reply.body) == {"error_code", "message"}
    # Nothing was recorded or queued for any of them.
    assert pipeline.count("SELECT count(*) FROM phone_jobs") == jobs

    # Logins: an app not served here, a spent js_code, a user WeChat blocks.
    spent, _ = pipeline.sandbox.mint_login_code(APPID)
    assert example.post("/v1/login", {"appid": APPID, "js_code": spent}).status == 200
    high_risk, _ = pipeline.sandbox.mint_login_code(APPID, high_risk=True)
    logins = [
        example.post("/v1/login", {"appid": "wxpipeline000002", "js_code": spent}),
        example.post("/v1/login", {"appid": APPID, "js_code": spent}),
        example.post("/v1/login", {"appid": APPID, "js_code": high_risk}),
        example.post("/v1/login", {"appid": APPID}),
        example.post("/v1/login", {"appid": [APPID], "js_code": spent}),
    ]
    assert [(reply.status, reply.body["error_code"]) for reply in logins] == [
        (400, "invalid_input"),
        (422, "invalid_code"),
        (422, "high_risk_user"),
        (400, "invalid_input"),
        (400, "invalid_input"),
    ]
    # A login job's id is no phone job of anyone's.
    login_job = pipeline.count("SELECT count(*) FROM login_jobs")
    assert login_job >= 1
    with pipeline.engine.connect() as conn:
        login_id = conn.execute(text("SELECT job_id FROM login_jobs LIMIT 1")).scalar_one()
    assert example.get(f"/v1/phone/{login_id}", session=session).status == 404

    assert_nothing_secret([*example.texts, caplog.text], good_code, NEVER_ISSUED_CODE, spent, high_risk)


def test_fastapi_keeps_many_waiting_requests_on_one_event_loop(pipeline: Pipeline) -> None:
    """Twenty users tap at once: every request waits on the producer's one listener (no thread
    each) and gets its own masked number in the same request."""
    users = 20
    pipeline.start_worker(concurrency=4)
    app = fastapi_app.create_app(
        pipeline.producer, appids=[APPID], secret_key=SECRET_KEY, max_wait_seconds=60
    )
    pipeline.sandbox.configure(latency_ms={"phone": 800})
    numbers = [f"1370000{index:04d}" for index in range(users)]
    js_codes = [
        pipeline.sandbox.mint_login_code(APPID, openid=f"oMany{index:04d}")[0] for index in range(users)
    ]
    codes = [mint_phone(pipeline, number) for number in numbers]
    waiting_at_once = 0

    async def watch_waiters(done: asyncio.Event) -> None:
        nonlocal waiting_at_once
        while not done.is_set():
            waiting_at_once = max(waiting_at_once, pipeline.producer.listener.waiter_count)
            await asyncio.sleep(0.02)

    async def log_in(client: httpx.AsyncClient, index: int) -> dict[str, str]:
        login = await client.post("/v1/login", json={"appid": APPID, "js_code": js_codes[index]})
        assert login.status_code == 200, login.text
        return {"Authorization": f"Bearer {login.json()['session']}"}

    async def tap(client: httpx.AsyncClient, index: int, headers: dict[str, str]) -> httpx.Response:
        return await client.post(
            "/v1/phone", json={"code": codes[index], "wait_seconds": 60}, headers=headers
        )

    async def main() -> list[httpx.Response]:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://example") as client:
            sessions = await asyncio.gather(*(log_in(client, index) for index in range(users)))
            done = asyncio.Event()
            watcher = asyncio.create_task(watch_waiters(done))
            try:
                return await asyncio.gather(*(tap(client, index, sessions[index]) for index in range(users)))
            finally:
                done.set()
                await watcher

    replies = asyncio.run(main())
    for number, reply in zip(numbers, replies, strict=True):
        assert reply.status_code == 200, reply.text
        assert reply.json()["phone"] == {"masked": f"{number[:3]}****{number[-4:]}", "country_code": "86"}
        assert number not in reply.text
    assert waiting_at_once >= users // 2, waiting_at_once


#: How each example's docstring says to serve it (from docs/examples), and what it prints when it
#: is ready.
SERVE_COMMANDS = {
    "flask": (["flask", "--app", "flask_app:from_environment()", "run", "--port", "{port}"], "Running on"),
    "fastapi": (["uvicorn", "--factory", "fastapi_app:from_environment", "--port", "{port}"], "running on"),
}


@pytest.mark.parametrize("framework", sorted(SERVE_COMMANDS))
def test_each_example_serves_as_its_docstring_says(pipeline: Pipeline, framework: str) -> None:
    """``from_environment`` builds the app from wxphone's settings (the process's own producer)."""
    pipeline.start_worker(concurrency=1)
    command, ready = SERVE_COMMANDS[framework]
    port = free_port()
    program = Path(sys.executable).parent / command[0]
    env = {**pipeline.env, "EXAMPLE_APPIDS": APPID, "EXAMPLE_SECRET_KEY": SECRET_KEY}
    args = [str(program), *(arg.format(port=port) for arg in command[1:])]
    server = ManagedProcess(framework, args, env, pipeline.log_dir / f"{framework}.log", cwd=EXAMPLES_DIR)
    pipeline.processes.append(server.start())
    server.wait_for_output(ready, timeout_seconds=30)

    js_code, openid = pipeline.sandbox.mint_login_code(APPID)
    code = mint_phone(pipeline, "13600006666")
    with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=30) as client:
        login = client.post("/v1/login", json={"appid": APPID, "js_code": js_code})
        assert login.status_code == 200, login.text
        assert login.json()["openid"] == openid
        headers = {"Authorization": f"Bearer {login.json()['session']}"}
        reply = client.post("/v1/phone", json={"code": code, "wait_seconds": 10}, headers=headers)
    assert reply.status_code == 200, reply.text
    assert reply.json()["phone"] == {"masked": "136****6666", "country_code": "86"}
    assert_nothing_secret([login.text, reply.text, server.output()], "13600006666", code, js_code)


# -- the mini-program page, in Node.js ----------------------------------------------------------

#: Plays WeChat's ``wx`` and ``Page`` for docs/examples/miniprogram/phone.js: ``wx.request`` goes
#: to the real back end (the page's API_BASE is replaced by the test server's address), and every
#: request the page makes is recorded. Prints the page's data and the requests as JSON.
PAGE_HARNESS_JS = r"""
"use strict";
const config = JSON.parse(process.env.HARNESS);
const API_BASE = "https://api.example.com";
const requests = [];
const loginCodes = config.login_codes.slice();
let definition = null;
let sessionsSpoiled = 0;
global.Page = (page) => { definition = page; };
global.wx = {
  login({ success, fail }) {
    const code = loginCodes.shift();
    setTimeout(() => (code ? success({ code, errMsg: "login:ok" }) : fail({ errMsg: "login:fail" })), 0);
  },
  getAccountInfoSync() {
    return { miniProgram: { appId: config.appid } };
  },
  request({ url, method, data, header, success, fail }) {
    const path = url.slice(API_BASE.length);
    const headers = Object.assign({ "Content-Type": "application/json" }, header);
    if (config.spoil_sessions > sessionsSpoiled && path === "/v1/phone" && headers.Authorization) {
      sessionsSpoiled += 1; // as if the session had expired
      headers.Authorization += "-expired";
    }
    requests.push({ method, path, data: data === undefined ? null : data });
    const body = method === "GET" ? undefined : JSON.stringify(data);
    fetch(config.base_url + path, { method, headers, body })
      .then(async (res) => success({ statusCode: res.status, data: await res.json(), header: {} }))
      .catch((error) => fail({ errMsg: "request:fail " + error.message }));
  },
};
require(config.page);

async function main() {
  const page = Object.assign({}, definition, { data: Object.assign({}, definition.data) });
  page.setData = function (changes) { Object.assign(this.data, changes); };
  page.onLoad();
  await page.onGetPhoneNumber({ type: "getphonenumber", detail: config.detail });
  // Reported once nothing is left to run (the page's login may still be on its way).
  process.once("beforeExit", () => console.log(JSON.stringify({ data: page.data, requests })));
}
main().catch((error) => { console.error(error); process.exit(1); });
"""


@dataclass
class PageRun:
    data: dict[str, Any]
    requests: list[dict[str, Any]]

    def paths(self) -> list[str]:
        """``METHOD path`` of each request, a job id in a path as ``{job_id}``."""
        paths = [request["path"].split("?")[0] for request in self.requests]
        return [
            f"{request['method']} {'/v1/phone/{job_id}' if path.startswith('/v1/phone/') else path}"
            for request, path in zip(self.requests, paths, strict=True)
        ]


@pytest.fixture
def node(tmp_path: Path) -> Callable[..., PageRun]:
    """Runs the page once per call: a fresh page, a fresh module (no session yet)."""
    executable = shutil.which("node")
    if executable is None:
        message = f"the mini-program page test needs Node.js: {NODE_INSTALL_HINT}"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    harness = tmp_path / "harness.js"
    harness.write_text(PAGE_HARNESS_JS)

    def run(**config: Any) -> PageRun:
        finished = subprocess.run(
            [executable, str(harness)],
            env={**os.environ, "HARNESS": json.dumps({"page": str(PAGE_JS), **config})},
            capture_output=True,
            text=True,
            timeout=NODE_TIMEOUT_SECONDS,
            check=False,
        )
        assert finished.returncode == 0, f"node exited {finished.returncode}:\n{finished.stderr[-4000:]}"
        result = json.loads(finished.stdout.strip().splitlines()[-1])
        return PageRun(data=result["data"], requests=result["requests"])

    return run


@pytest.fixture
def flask_server(pipeline: Pipeline) -> Iterator[str]:
    """The Flask example on a real HTTP port (waits capped at 1 s, so the page meets 202s)."""
    app = flask_app.create_app(pipeline.producer, appids=[APPID], secret_key=SECRET_KEY, max_wait_seconds=1.0)
    server = make_server("127.0.0.1", 0, app, threaded=True)
    thread = threading.Thread(target=server.serve_forever, name="flask-example", daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.port}"
    finally:
        server.shutdown()
        thread.join(timeout=10)


def test_the_mini_program_page_against_the_flask_example(
    pipeline: Pipeline,
    flask_server: str,
    node: Callable[..., PageRun],
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)
    pipeline.start_worker(concurrency=2)

    def login_code(openid: str) -> str:
        return pipeline.sandbox.mint_login_code(APPID, openid=openid)[0]

    def page(detail: dict[str, Any], *login_codes: str, **config: Any) -> PageRun:
        return node(base_url=flask_server, appid=APPID, login_codes=login_codes, detail=detail, **config)

    # The tap: one code, sent once, and the masked number on the page.
    code = mint_phone(pipeline, "13955550001")
    run = page({"code": code, "errMsg": "getPhoneNumber:ok"}, login_code("oPage0001"))
    assert run.data == {"state": "verified", "masked": "139****0001", "message": ""}
    assert run.paths()[:2] == ["POST /v1/login", "POST /v1/phone"]
    assert [r for r in run.requests if r["path"] == "/v1/phone"] == [
        {"method": "POST", "path": "/v1/phone", "data": {"code": code, "wait_seconds": 8}}
    ]

    # A slow exchange: 202 (the example waits at most 1 s), then GETs that wait, never the code again.
    pipeline.sandbox.configure(latency_ms={"phone": 2500})
    slow_code = mint_phone(pipeline, "13955550002")
    run = page({"code": slow_code, "errMsg": "getPhoneNumber:ok"}, login_code("oPage0002"))
    pipeline.sandbox.configure(latency_ms={"phone": 0})
    assert run.data["state"] == "verified" and run.data["masked"] == "139****0002"
    assert run.paths()[:2] == ["POST /v1/login", "POST /v1/phone"]
    assert set(run.paths()[2:]) == {"GET /v1/phone/{job_id}"}
    assert all(r["data"] is None for r in run.requests if r["method"] == "GET")

    # An expired session: a 401 before anything is recorded, a new login, the same code once more.
    jobs = pipeline.count("SELECT count(*) FROM phone_jobs")
    expired_code = mint_phone(pipeline, "13955550003")
    run = page(
        {"code": expired_code, "errMsg": "getPhoneNumber:ok"},
        login_code("oPage0003"),
        login_code("oPage0003"),
        spoil_sessions=1,
    )
    assert run.data["state"] == "verified" and run.data["masked"] == "139****0003"
    assert run.paths()[:4] == ["POST /v1/login", "POST /v1/phone", "POST /v1/login", "POST /v1/phone"]
    assert set(run.paths()[4:]) <= {"GET /v1/phone/{job_id}"}
    assert pipeline.count("SELECT count(*) FROM phone_jobs") == jobs + 1

    # The quota is used up (errno 1400001), the user declines, WeChat fails otherwise: no code, and
    # the back end hears nothing but the page's login.
    phone_calls = endpoint_counts(pipeline.sandbox, "phone").calls
    quota = page({"errno": 1400001, "errMsg": "getPhoneNumber:fail"}, login_code("oPage0004"))
    assert quota.data["state"] == "unavailable"
    deny = page({"errMsg": "getPhoneNumber:fail user deny"}, login_code("oPage0004"))
    assert deny.data["state"] == "idle" and "later" in deny.data["message"]
    other = page({"errno": 1, "errMsg": "getPhoneNumber:fail"}, login_code("oPage0004"))  # any other
    assert other.data["state"] == "idle" and "try again" in other.data["message"]
    for run in (quota, deny, other):
        assert run.paths() == ["POST /v1/login"]
    assert endpoint_counts(pipeline.sandbox, "phone").calls == phone_calls

    # A code WeChat refuses: the page asks for a new tap.
    run = page({"code": NEVER_ISSUED_CODE, "errMsg": "getPhoneNumber:ok"}, login_code("oPage0005"))
    assert run.data["state"] == "idle" and "tap again" in run.data["message"]

    # The server's request log has job ids and paths, never a code or a number.
    assert_nothing_secret([caplog.text], code, slow_code, expired_code, "13955550001")
