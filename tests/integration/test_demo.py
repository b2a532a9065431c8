"""``wxphone demo`` end to end: a small run against the test session's PostgreSQL and Redis.

The demo runs as a subprocess, exactly as a user runs it; the test checks its exit status, the
figures of its JSON summary, and that no process it started is left behind.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import uuid
from pathlib import Path

import pytest
from sqlalchemy.engine import make_url

from tests.support.processes import WXPHONE, base_environment
from tests.support.services import RedisServer, drop_database
from worker.demo.processes import group_alive

pytestmark = pytest.mark.slow

JOBS = 60


def _processes_with_marker(marker: str) -> list[int]:
    """Pids of processes whose environment mentions ``marker`` (the demo's unique database)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            environ = (entry / "environ").read_bytes()
        except OSError:
            continue
        if marker.encode() in environ:
            found.append(int(entry.name))
    return found


def test_the_demo_runs_every_job_to_the_expected_end_and_leaves_nothing_running(
    tmp_path: Path, database_url: str, redis_server: RedisServer
) -> None:
    if not redis_server.process:
        redis_server.start()
    demo_database = f"wxphone_demo_test_{uuid.uuid4().hex[:10]}"
    summary_path = tmp_path / "summary.json"
    env = base_environment(
        database_url=database_url, broker_url=redis_server.url(0), redis_url=redis_server.url(1)
    )
    command = [
        *WXPHONE,
        "demo",
        "--jobs",
        str(JOBS),
        "--database",
        demo_database,
        "--state-dir",
        str(tmp_path / "state"),
        "--summary-json",
        str(summary_path),
        "--seconds-timeout",
        "150",
        "--seed",
        "7",
    ]
    output = ""
    try:
        completed = subprocess.run(
            command, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=240, check=False
        )
        output = completed.stdout + completed.stderr
        assert completed.returncode == 0, output[-6000:]

        summary = json.loads(summary_path.read_text())
        assert summary["ok"], output[-6000:]
        assert summary["jobs_submitted"] == JOBS == summary["terminal"]
        firsts, repeats, never_issued = (
            summary["first_submissions"],
            summary["repeats"],
            summary["never_issued_codes"],
        )
        assert firsts + repeats + never_issued == JOBS
        assert repeats >= 1 and never_issued >= 1
        # Every valid code and every repeat of one succeeded; never-issued codes failed as such.
        assert summary["succeeded"] == firsts + repeats
        assert sum(summary["failed_by_reason"].values()) == never_issued
        assert set(summary["failed_by_reason"]) <= {"invalid_code", "reply_lost"}
        assert summary["repeats_mirrored"] == repeats
        # WeChat saw each distinct code once; every other phone call is an injected fault or a
        # rejected (revoked) token followed by one retry.
        assert summary["codes_exchanged"] == firsts
        assert summary["codes_presented_more_than_once"] == 0
        assert summary["unknown_code_presentations"] == never_issued
        assert summary["phone_calls"] == (
            firsts + never_issued + summary["phone_faults_applied"] + summary["token_rejections"]
        )
        assert "busy" in summary["faults_injected"] and summary["phone_faults_applied"] >= 1
        # A revoked token costs one rejected call per job that met it, each followed by a retry.
        assert summary["errcode_40001"] <= summary["token_rejections"]
        assert all(count >= 1 for count in summary["token_fetches"].values())
        assert summary["logins_succeeded"] == summary["users"]
        # The front ends went through wxphone api: every submission got an HTTP answer.
        assert sum(summary["api_answers"].values()) == summary["jobs_submitted"]
        assert summary["api_answers"].get("succeeded", 0) >= 1
        assert summary["jobs_per_second"] > 0

        assert "Users and their latest phone job" in output
        assert re.search(r"\d{3}\*{4}\d{4}", output), "phone numbers are shown masked"
        assert not re.search(r"(?<![\d*])1\d{10}(?!\d)", output), "no unmasked mobile number"
        assert "demo-secret" not in output

        pids = {int(pid) for pid in re.findall(r"\bpid (\d+)", output)}
        assert len(pids) == 4, output[-3000:]  # sandbox, worker, beat, API
        assert not [pid for pid in pids if group_alive(pid)], "a process group of the demo survived"
        assert _processes_with_marker(demo_database) == [], "a process started by the demo survived"
    finally:
        drop_database(
            make_url(database_url).set(database=demo_database).render_as_string(hide_password=False)
        )
        # The demo keeps its process logs for the curious; a test run has no use for them.
        for log_dir in re.findall(r"^demo: logs: (\S+)$", output, flags=re.MULTILINE):
            shutil.rmtree(log_dir, ignore_errors=True)
