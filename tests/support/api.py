"""``wxphone api`` as a real process for tests, and a real HTTP client to talk to it."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import httpx
from sqlalchemy import text

from tests.support.pipeline import Pipeline
from tests.support.processes import WXPHONE, ManagedProcess, base_environment
from tests.support.services import free_port
from tests.support.waiting import wait_for

#: The session key of the tests' API processes (on loopback any key is allowed; this one is
#: explicit so tests can sign sessions of their own: expired ones, other users').
API_SESSION_KEY = "api-tests-session-key-5f1c2a9e7b3d4c6a"
#: Settings of the pipeline an API process does not take: a front end holds no AppSecret.
WORKER_ONLY_SETTINGS = ("apps", "fingerprint_key")


@dataclass
class RunningApi:
    """One ``wxphone api`` process and where it listens."""

    process: ManagedProcess
    base_url: str

    def client(self, **options: Any) -> httpx.Client:
        """A real HTTP client of this API (no proxies from the environment)."""
        return httpx.Client(base_url=self.base_url, timeout=30.0, trust_env=False, **options)

    def output(self) -> str:
        return self.process.output()


def api_settings(pipeline: Pipeline, **settings: Any) -> dict[str, Any]:
    """The pipeline's settings as a front end has them, plus ``settings``."""
    values = {key: value for key, value in pipeline.settings.items() if key not in WORKER_ONLY_SETTINGS}
    return {"api_session_key": API_SESSION_KEY, **values, **settings}


def start_api(pipeline: Pipeline, name: str = "api", **settings: Any) -> RunningApi:
    """Start ``wxphone api`` on a free port with the pipeline's settings (and ``settings``); it
    is stopped with the pipeline's other processes."""
    port = free_port()
    process = ManagedProcess(
        f"api:{name}",
        [*WXPHONE, "api", "--host", "127.0.0.1", "--port", str(port)],
        base_environment(**api_settings(pipeline, **settings)),
        pipeline.log_dir / f"{name}.log",
    ).start()
    pipeline.processes.append(process)
    api = RunningApi(process=process, base_url=f"http://127.0.0.1:{port}")

    def answers() -> bool:
        if not process.is_running():
            raise AssertionError(f"{process.name} exited early:\n{process.output()[-4000:]}")
        try:
            with api.client() as client:
                return client.get("/openapi.json").status_code == 200
        except httpx.TransportError:
            return False

    wait_for(answers, timeout_seconds=30, interval_seconds=0.1, what=f"{process.name} to answer")
    return api


def empty_login_jobs(pipeline: Pipeline) -> None:
    """Start from no login job (the pipeline empties the other job tables)."""
    with pipeline.engine.begin() as conn:
        conn.execute(text("TRUNCATE login_jobs"))


def job_counts(pipeline: Pipeline) -> tuple[int, int]:
    """How many phone jobs and login jobs are recorded."""
    return (
        pipeline.count("SELECT count(*) FROM phone_jobs"),
        pipeline.count("SELECT count(*) FROM login_jobs"),
    )


def bearer(session: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {session}"}


def log_in(api: RunningApi, pipeline: Pipeline, appid: str, openid: str, unionid: str | None = None) -> str:
    """Log ``openid`` in through the API with a sandbox login code; the session."""
    js_code, _ = pipeline.sandbox.mint_login_code(appid, openid=openid, unionid=unionid)
    with api.client() as client:
        reply = client.post("/v1/login", json={"appid": appid, "js_code": js_code})
    assert reply.status_code == 200, reply.text
    return str(reply.json()["session"])


__all__ = [
    "API_SESSION_KEY",
    "RunningApi",
    "api_settings",
    "bearer",
    "empty_login_jobs",
    "job_counts",
    "log_in",
    "start_api",
]
