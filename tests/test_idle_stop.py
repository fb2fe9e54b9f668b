"""`trainium-executor idle-stop`: the real CLI on real job stores, with a harmless command.

The command is `touch <marker>`: the marker's existence says whether it acted. One test
runs it beside a real server while a job runs and after it ended.
"""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys
import time

import pytest
from conftest import reachable_by_jobs
from service_fixtures import REPO, Server

from executor_service.store import JobStore

pytestmark = pytest.mark.timeout(120)


def idle_stop(work_dir, after_min: float, marker, *extra: str,
              env_extra: dict[str, str] | None = None) -> tuple[subprocess.CompletedProcess, dict]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("EXECUTOR_")}
    env["PYTHONPATH"] = str(REPO)
    env.update(env_extra or {})
    proc = subprocess.run([sys.executable, "-m", "executor_service", "idle-stop", "--after", str(after_min),
                           "--work-dir", str(work_dir), "--command", f"touch {marker}", *extra],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=60)
    lines = [json.loads(line) for line in proc.stderr.splitlines() if line.startswith("{")]
    lines = [line for line in lines if line["logger"] == "executor_service.idle"]  # not botocore's
    assert lines, proc.stderr
    return proc, lines[0]


def store_with(tmp_path, status: str, age_s: float):
    """A job store holding one job in `status`, last touched `age_s` ago."""
    work = tmp_path / "work"
    store = JobStore(work / "jobs.sqlite3")
    store.add_batch("b", "async", [{"job_id": "j", "paper_id": "p", "code": "print(1)", "timeout": 5}])
    store.close()
    at = time.time() - age_s
    db = sqlite3.connect(work / "jobs.sqlite3")
    db.execute("UPDATE jobs SET status=?, created_at=?, started_at=?, finished_at=?",
               (status, at, at if status != "queued" else None,
                at if status not in ("queued", "running") else None))
    db.commit()
    db.close()
    return work


def test_acts_when_nothing_ran_for_longer_than_after(tmp_path):
    work = store_with(tmp_path, "completed", age_s=3600)
    marker = tmp_path / "stopped"
    proc, line = idle_stop(work, 30, marker)
    assert proc.returncode == 0 and marker.exists()
    assert line["action"] == "command" and line["command"] == f"touch {marker}"
    assert line["idle_for_s"] >= 1800 and "idle for" in line["reason"]


@pytest.mark.parametrize("status", ["queued", "running"])
def test_does_nothing_while_a_job_waits_or_runs_however_old(tmp_path, status):
    work = store_with(tmp_path, status, age_s=10 * 3600)
    marker = tmp_path / "stopped"
    proc, line = idle_stop(work, 1, marker)
    assert proc.returncode == 0 and not marker.exists()
    assert line["action"] == "none" and line[status] == 1 and line["reason"].startswith("busy")


def test_does_nothing_when_the_last_job_is_recent(tmp_path):
    work = store_with(tmp_path, "completed", age_s=60)
    marker = tmp_path / "stopped"
    proc, line = idle_stop(work, 30, marker)
    assert proc.returncode == 0 and not marker.exists()
    assert line["action"] == "none" and 55 <= line["idle_for_s"] < 1800


def test_a_fresh_instance_counts_from_its_boot(tmp_path):
    import psutil

    uptime = time.time() - psutil.boot_time()
    marker = tmp_path / "stopped"
    proc, line = idle_stop(tmp_path / "no-store-yet", uptime / 60 + 10, marker)
    assert not marker.exists() and "since boot" in line["reason"]
    proc, line = idle_stop(tmp_path / "no-store-yet", 0.001, marker, "--dry-run")
    assert not marker.exists() and line["action"] == "dry-run"
    proc, line = idle_stop(tmp_path / "no-store-yet", 0.001, marker)
    assert marker.exists()


def test_a_failing_command_is_logged_with_its_status(tmp_path):
    work = store_with(tmp_path, "completed", age_s=3600)
    proc, line = idle_stop(work, 1, tmp_path / "no-such-dir" / "marker")
    assert proc.returncode == 1
    ended = [json.loads(x) for x in proc.stderr.splitlines() if x.startswith("{")][-1]
    assert ended["exit_status"] == 1 and ended["level"] == "ERROR"


def test_beside_a_real_service_it_waits_for_the_job_then_acts(tmp_path):
    work = reachable_by_jobs(tmp_path / "work")
    marker = tmp_path / "stopped"
    srv = Server(work).start()
    try:
        accepted = srv.post("/jobs", {"paper_id": "busy", "code": "import time; time.sleep(2)"}).json
        _, line = idle_stop(work, 0.005, marker)  # 0.3 s
        assert line["action"] == "none" and line["queued"] + line["running"] == 1
        srv.wait_batch(accepted["batch_id"])
        time.sleep(0.5)
        proc, line = idle_stop(work, 0.005, marker)
        assert proc.returncode == 0 and marker.exists() and line["action"] == "command"
        assert srv.get("/health").status == 200  # it only read the store
    finally:
        srv.close()


def test_visible_queue_messages_are_work_and_an_unreadable_queue_stops_nothing(tmp_path):
    pytest.importorskip("moto")
    from aws_fixtures import MotoServer

    moto = MotoServer(tmp_path / "moto.log")
    try:
        sqs = moto.client("sqs")
        url = sqs.create_queue(QueueName="idle")["QueueUrl"]
        sqs.send_message(QueueUrl=url, MessageBody='{"paper_id": "waiting", "code": "print(1)"}')
        work = store_with(tmp_path, "completed", age_s=3600)
        marker = tmp_path / "stopped"
        env = {**moto.env(), "EXECUTOR_SQS_QUEUE_URL": url}  # as the service's environment file sets it
        proc, line = idle_stop(work, 30, marker, env_extra=env)
        assert proc.returncode == 0 and not marker.exists()
        assert line["action"] == "none" and line["waiting_in_queue"] == 1 and "1 waiting" in line["reason"]

        [message] = sqs.receive_message(QueueUrl=url, MaxNumberOfMessages=1)["Messages"]
        sqs.delete_message(QueueUrl=url, ReceiptHandle=message["ReceiptHandle"])
        proc, line = idle_stop(work, 30, marker, env_extra=env)
        assert proc.returncode == 0 and marker.exists() and line["waiting_in_queue"] == 0
        marker.unlink()

        proc, line = idle_stop(work, 30, marker, "--sqs-queue-url", url + "-gone", env_extra=env)
        assert proc.returncode == 1 and not marker.exists() and "cannot read the queue" in line["msg"]
    finally:
        moto.close()
