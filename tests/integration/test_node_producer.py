"""A Node.js front end that knows nothing of wxphone: celery-node sends ``wxphone.resolve_phone`` by
name, and a real worker resolves the job against the sandbox.

celery-node is installed from npm once (into the pytest cache, reused while the pinned version is
there). Its client needs one option: the queue, the third argument of ``createClient`` (its
default is ``celery``). It sends Celery message protocol 2 by default, with only the ``lang``,
``task`` and ``id`` headers; the worker also takes its protocol 1 (``TASK_PROTOCOL = 1``).
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.support.pipeline import BROKERS, FAST_RETRY_SETTINGS, Pipeline, endpoint_counts, phone_job_row

CELERY_NODE_VERSION = "0.5.9"
NPM_INSTALL_TIMEOUT_SECONDS = 180
NODE_INSTALL_HINT = "sudo apt-get install -y nodejs npm"
RESOLVE_PHONE = "wxphone.resolve_phone"
APPID = "wxpipeline000001"
#: How long the Node script waits for the task's result, and the test for the script.
RESULT_TIMEOUT_SECONDS = 60


#: The front end's whole script. celery-node's ``applyAsync`` returns before the message is
#: published and exposes no promise for the publish: a client disconnected right after it loses
#: the message (silently, or with an unhandled "Connection is closed" rejection). So the script
#: keeps the client until the result is in, as celery-node's own README example does.
SEND_RESOLVE_PHONE_JS = """\
"use strict";
const celery = require("celery-node");

async function main() {
  const env = process.env;
  // The third argument is the queue: celery-node's default is "celery", wxphone's is "wxphone".
  const client = celery.createClient(env.BROKER_URL, env.RESULT_BACKEND_URL, "wxphone");
  client.conf.TASK_PROTOCOL = Number(env.TASK_PROTOCOL); // celery-node's default is 2
  const task = client.createTask("wxphone.resolve_phone");
  // Keyword arguments only (positional ones are invalid input); the job id is the task id.
  const result = task.applyAsync([], JSON.parse(env.TASK_KWARGS));
  console.log(JSON.stringify({ task_id: result.taskId }));
  const outcome = await result.get(Number(env.RESULT_TIMEOUT_MS));
  console.log(JSON.stringify({ task_id: result.taskId, result: outcome }));
  await client.disconnect();
}

main().catch((error) => {
  console.error(error);
  process.exit(1);
});
"""


@dataclass(frozen=True)
class NodeProducer:
    """celery-node installed in ``directory``, with the front end's script beside it."""

    node: str
    directory: Path
    script: Path

    def send_resolve_phone(
        self, *, broker_url: str, result_backend_url: str, protocol: int, **kwargs: Any
    ) -> tuple[str, dict[str, Any]]:
        """Send one ``wxphone.resolve_phone`` job from Node; its task id and the task's result."""
        env = {
            **os.environ,
            "BROKER_URL": broker_url,
            "RESULT_BACKEND_URL": result_backend_url,
            "TASK_PROTOCOL": str(protocol),
            "TASK_KWARGS": json.dumps(kwargs),
            "RESULT_TIMEOUT_MS": str(RESULT_TIMEOUT_SECONDS * 1000),
        }
        finished = subprocess.run(
            [self.node, str(self.script)],
            cwd=self.directory,
            env=env,
            capture_output=True,
            text=True,
            timeout=RESULT_TIMEOUT_SECONDS + 30,
            check=False,
        )
        assert finished.returncode == 0, f"node exited {finished.returncode}:\n{finished.stderr[-4000:]}"
        lines = [json.loads(line) for line in finished.stdout.splitlines() if line.strip()]
        assert len(lines) == 2 and lines[0]["task_id"] == lines[1]["task_id"], finished.stdout
        return str(lines[1]["task_id"]), dict(lines[1]["result"])


def install_celery_node(directory: Path, npm: str) -> None:
    """``npm install`` the pinned celery-node into ``directory`` unless it is already there."""
    installed = directory / "node_modules" / "celery-node" / "package.json"
    if installed.exists() and json.loads(installed.read_text())["version"] == CELERY_NODE_VERSION:
        return
    # A package.json of its own keeps npm from installing into a project further up the tree.
    (directory / "package.json").write_text(
        json.dumps({"name": "wxphone-node-producer-test", "private": True})
    )
    try:
        finished = subprocess.run(
            [npm, "install", "--no-audit", "--no-fund", f"celery-node@{CELERY_NODE_VERSION}"],
            cwd=directory,
            capture_output=True,
            text=True,
            timeout=NPM_INSTALL_TIMEOUT_SECONDS,
            check=False,
        )
    except subprocess.TimeoutExpired:
        pytest.fail(f"npm install celery-node@{CELERY_NODE_VERSION} took over {NPM_INSTALL_TIMEOUT_SECONDS}s")
    if finished.returncode != 0:
        pytest.fail(f"npm install celery-node@{CELERY_NODE_VERSION} failed:\n{finished.stderr[-4000:]}")
    assert json.loads(installed.read_text())["version"] == CELERY_NODE_VERSION


@pytest.fixture(scope="session")
def node_producer(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> NodeProducer:
    """celery-node, installed once (kept in the pytest cache across sessions when there is one)."""
    node, npm = shutil.which("node"), shutil.which("npm")
    if node is None or npm is None:
        message = f"the Node.js producer test needs node and npm: {NODE_INSTALL_HINT}"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    cache = getattr(request.config, "cache", None)
    name = f"celery-node-{CELERY_NODE_VERSION}"
    directory = cache.mkdir(name) if cache is not None else tmp_path_factory.mktemp(name)
    with open(directory / ".install.lock", "w") as lock:  # another session may be installing too
        fcntl.flock(lock, fcntl.LOCK_EX)
        install_celery_node(directory, npm)
    script = directory / "send_resolve_phone.js"
    script.write_text(SEND_RESOLVE_PHONE_JS)
    return NodeProducer(node=node, directory=directory, script=script)


@pytest.mark.parametrize("broker", BROKERS)
def test_celery_node_producer_resolves_a_phone_code(node_producer: NodeProducer, pipeline: Pipeline) -> None:
    pipeline.settings.update(FAST_RETRY_SETTINGS)
    process = pipeline.start_worker()
    result_backend_url = str(pipeline.celery.conf.result_backend)

    def send(protocol: int, openid: str, code: str) -> str:
        task_id, result = node_producer.send_resolve_phone(
            broker_url=pipeline.broker_url,
            result_backend_url=result_backend_url,
            protocol=protocol,
            appid=APPID,
            openid=openid,
            code=code,
            caller="node-frontend",
        )
        assert result == {"job_id": task_id, "status": "succeeded", "error_code": None}, protocol
        return task_id

    phone_calls = 0
    # Protocol 2 (celery-node's default) and protocol 1; then protocol 2 again through a retry:
    # WeChat busy once, so the worker republishes the task itself (the message celery-node sent
    # has no ``retries`` header; Celery counts from 0).
    for protocol, openid, number, busy_once in [
        (2, "oNodeProducer01", "13700001111", False),
        (1, "oNodeProducer02", "13700002222", False),
        (2, "oNodeProducer03", "13700003333", True),
    ]:
        what = f"protocol {protocol}" + (", WeChat busy once" if busy_once else "")
        code = pipeline.sandbox.mint_phone_code(APPID, phone_number=number, pure_phone_number=number)
        if busy_once:
            pipeline.sandbox.inject_fault("phone", errcode=-1)
        task_id = send(protocol, openid, code)

        # celery-node wrote no job row: the worker recorded the job under the task id it chose.
        job = pipeline.wait_for_job(task_id, timeout_seconds=30)
        assert (job.job_id, job.appid, job.openid) == (task_id, APPID, openid), what
        assert (job.status, job.error_code) == ("succeeded", None), what
        row = phone_job_row(pipeline, task_id)
        assert row is not None and row["code_fingerprint"] is not None, what
        user = pipeline.producer.get_user(appid=APPID, openid=openid)
        assert user is not None and user.phone_number == number, what
        # The optional ``caller`` label reached the audit trail of every exchange.
        assert pipeline.count(
            "SELECT count(*) FROM exchange_audit WHERE job_id = :job_id AND caller = 'node-frontend'",
            job_id=task_id,
        ) == (2 if busy_once else 1), what
        phone_calls += 2 if busy_once else 1
        assert endpoint_counts(pipeline.sandbox, "phone").calls == phone_calls, what

    assert process.is_running()
    output = process.output()
    assert "Received unregistered task" not in output and "InvalidTaskError" not in output
