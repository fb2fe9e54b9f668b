"""SQS intake (--sqs-queue-url): a real service process taking jobs from a real
SQS-compatible server (moto's, on 127.0.0.1), reached through AWS_ENDPOINT_URL_SQS as a
deployment reaches SQS. The test itself uses boto3 as the callers' producer would.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
from aws_fixtures import MotoServer, moto, queue_counts  # noqa: F401 - moto: a fixture
from conftest import reachable_by_jobs, wait_until
from service_fixtures import REPO, Server, openapi  # noqa: F401

pytest.importorskip("boto3")
pytest.importorskip("moto")

pytestmark = pytest.mark.timeout(180)

SECRET = "sqs-callback-secret"


def new_queue(server: MotoServer, name: str) -> str:
    return server.client("sqs").create_queue(QueueName=name)["QueueUrl"]


def queue_service(tmp_path, server: MotoServer, url: str, *args: str, env: dict[str, str] | None = None,
                  work=None) -> Server:
    """A started service taking jobs from `url` (1 s receives, 3 s visibility)."""
    work = work or reachable_by_jobs(tmp_path / "work")
    srv = Server(work, args=["--sqs-queue-url", url, "--sqs-wait-time", "1", "--sqs-visibility-timeout", "3",
                             *args], env={**server.env(), **(env or {})})
    return srv.start()


def send(sqs, url: str, **body) -> str:
    return sqs.send_message(QueueUrl=url, MessageBody=json.dumps(body))["MessageId"]


def paper(srv: Server, paper_id: str) -> dict:
    resp = srv.get(f"/papers/{paper_id}")
    return resp.json if resp.status == 200 else {}


def finished(srv: Server, paper_id: str) -> dict | None:
    return (paper(srv, paper_id) or {}).get("latest_finished")


def metric(srv: Server, series: str) -> float:
    """A series' value in GET /metrics (0 when absent)."""
    for line in srv.get("/metrics").raw.decode().splitlines():
        name, _, value = line.rpartition(" ")
        if name == series:
            return float(value)
    return 0.0


def test_a_batch_through_the_queue_runs_each_paper_once_holding_no_more_than_the_free_slots(
        tmp_path, moto, receiver, openapi):  # noqa: F811
    sqs = moto.client("sqs")
    url = new_queue(moto, "batch")
    hook = receiver.route("/from-queue")
    srv = queue_service(tmp_path, moto, url, "--callback-hosts", "127.0.0.1",
                        env={"EXECUTOR_CALLBACK_SECRET": SECRET})
    try:
        papers = [f"q{i}" for i in range(5)]
        for i, pid in enumerate(papers):
            extra = {"callback_url": hook} if i == 0 else {}
            send(sqs, url, paper_id=pid, code=f"import time\ntime.sleep(1)\nprint('paper {i}')",
                 paper_title=f"Paper {i}", slack_thread_ts=f"1.{i}", **extra)
        most_held = 0
        deadline = time.monotonic() + 90
        while not all(finished(srv, p) for p in papers):
            assert time.monotonic() < deadline, srv.read_log()
            most_held = max(most_held, queue_counts(sqs, url)[1])
            time.sleep(0.1)
        assert 1 <= most_held <= 2  # the pool has 2 slots: never more messages held than it can start
        for i, pid in enumerate(papers):
            doc = paper(srv, pid)
            assert doc["jobs"] == 1
            result = doc["latest_finished"]
            assert result["status"] == "completed" and result["success"] is True
            assert result["stdout"] == f"paper {i}\n" and result["paper_title"] == f"Paper {i}"
            assert result["slack_thread_ts"] == f"1.{i}"
            assert srv.get(f"/jobs/{result['job_id']}").json["stdout"] == f"paper {i}\n"
        wait_until(lambda: queue_counts(sqs, url) == (0, 0), timeout=10)  # every message deleted
        health = srv.get("/health")
        openapi.validate("GET", "/health", health)
        queue = health.json["queue"]
        assert queue["taken"] == 5 and queue["in_flight"] == 0 and queue["failed"] == 0
        assert queue["duplicates"] == 0 and queue["polling"] is True
        assert metric(srv, 'executor_sqs_messages_total{outcome="taken"}') == 5
        assert metric(srv, "executor_sqs_in_flight") == 0
        wait_until(lambda: receiver.received("/from-queue"), timeout=30)
        [call] = receiver.received("/from-queue")
        assert call.signed_with(SECRET)
        assert call.json["paper_id"] == "q0" and call.json["stdout"] == "paper 0\n"
    finally:
        srv.close()


def test_bad_messages_are_recorded_and_deleted_and_never_block_the_queue(tmp_path, moto, openapi):  # noqa: F811
    sqs = moto.client("sqs")
    url = new_queue(moto, "bad")
    srv = queue_service(tmp_path, moto, url, "--max-body-bytes", "2048")
    try:
        bad = {
            "not json": "this is not json",
            "no code": json.dumps({"paper_id": "nocode"}),
            "bad paper_id": json.dumps({"paper_id": "../../etc", "code": "print(1)"}),
            "too large": json.dumps({"paper_id": "big", "code": "x = 1\n" * 600}),
            "a callback to a host not allowed": json.dumps({"paper_id": "cb", "code": "print(1)",
                                                            "callback_url": "http://169.254.169.254/"}),
        }
        ids = {sqs.send_message(QueueUrl=url, MessageBody=body)["MessageId"]: what
               for what, body in bad.items()}
        send(sqs, url, paper_id="good", code="print('fine')")
        wait_until(lambda: finished(srv, "good"), timeout=60)
        assert finished(srv, "good")["stdout"] == "fine\n"
        wait_until(lambda: queue_counts(sqs, url) == (0, 0), timeout=15)  # the bad ones are deleted too
        verbose = srv.get("/health?verbose=1")
        openapi.validate("GET", "/health", verbose)
        health = verbose.json["queue"]
        assert health["failed"] == len(bad) and health["taken"] == 1
        rejected = {r["message_id"]: r for r in health["rejected_recent"]}
        assert set(rejected) == set(ids)
        errors = {ids[m]: r["error"] for m, r in rejected.items()}
        assert "JSON" in errors["not json"] or "json" in errors["not json"]
        assert "code" in errors["no code"]
        assert "paper_id" in errors["bad paper_id"]
        assert "larger than max_body_bytes" in errors["too large"]
        assert "callback_url" in errors["a callback to a host not allowed"]
        assert all(r["body_bytes"] > 0 and len(r["body_sha256"]) == 64 for r in rejected.values())
        for pid in ("nocode", "big", "cb"):
            assert srv.get(f"/papers/{pid}").status == 404  # nothing of a bad message runs
        assert metric(srv, 'executor_sqs_messages_total{outcome="rejected"}') == len(bad)
    finally:
        srv.close()


def test_a_message_delivered_again_while_its_job_runs_is_not_run_again(tmp_path, moto):  # noqa: F811
    """The service is stopped (SIGSTOP) past the message's visibility timeout while its job
    runs, so it cannot renew it: SQS delivers the message again to its waiting receive."""
    sqs = moto.client("sqs")
    url = new_queue(moto, "again")
    srv = queue_service(tmp_path, moto, url, "--sqs-visibility-timeout", "2", "--sqs-wait-time", "20")
    try:
        send(sqs, url, paper_id="twice", code="import time\ntime.sleep(5)\nprint('once')")
        wait_until(lambda: (paper(srv, "twice").get("latest") or {}).get("status") == "running", timeout=30)
        srv.proc.send_signal(signal.SIGSTOP)
        try:
            time.sleep(4.5)
        finally:
            srv.proc.send_signal(signal.SIGCONT)
        wait_until(lambda: finished(srv, "twice"), timeout=60)
        wait_until(lambda: queue_counts(sqs, url) == (0, 0), timeout=15)
        doc = paper(srv, "twice")
        assert doc["jobs"] == 1 and doc["latest_finished"]["stdout"] == "once\n"
        queue = srv.get("/health").json["queue"]
        assert queue["duplicates"] >= 1 and queue["taken"] == 1, queue
        assert "message delivered again; not run again" in srv.read_log(None)
    finally:
        srv.close()


def test_after_a_sigkill_mid_job_and_a_restart_the_job_runs_once_and_only_once(
        tmp_path, moto):  # noqa: F811
    sqs = moto.client("sqs")
    url = new_queue(moto, "killed")
    work = reachable_by_jobs(tmp_path / "work")
    srv = queue_service(tmp_path, moto, url, work=work)
    try:
        send(sqs, url, paper_id="k1", code="import time\ntime.sleep(2)\nprint('ran')")
        wait_until(lambda: (paper(srv, "k1").get("latest") or {}).get("status") == "running", timeout=30)
    finally:
        srv.kill_tree()  # SIGKILL: no drain, no message returned
    assert queue_counts(sqs, url) == (0, 1)  # still held by the dead service

    again = queue_service(tmp_path, moto, url, work=work)
    try:
        wait_until(lambda: finished(again, "k1") and finished(again, "k1")["status"] == "completed",
                   timeout=60)
        wait_until(lambda: queue_counts(sqs, url) == (0, 0), timeout=15)
        time.sleep(4)  # past another visibility timeout: nothing comes back, nothing runs again
        jobs = again.get("/jobs?paper_id=k1").json["jobs"]
        assert [j["status"] for j in jobs] == ["completed", "interrupted"], jobs
        assert jobs[0]["success"] is True and finished(again, "k1")["stdout"] == "ran\n"
        assert jobs[1]["error_type"] == "interrupted"
        assert again.get("/health").json["queue"]["taken"] == 1
    finally:
        again.close()


def test_on_sigterm_an_unfinished_jobs_message_is_returned_at_once_and_runs_again_after_a_restart(
        tmp_path, moto):  # noqa: F811
    sqs = moto.client("sqs")
    url = new_queue(moto, "drained")
    work = reachable_by_jobs(tmp_path / "work")
    srv = queue_service(tmp_path, moto, url, "--sqs-visibility-timeout", "600", "--shutdown-grace", "0.5",
                        work=work)
    try:
        send(sqs, url, paper_id="d1", code="import time\ntime.sleep(60)")
        wait_until(lambda: (paper(srv, "d1").get("latest") or {}).get("status") == "running", timeout=30)
        assert srv.stop(signal.SIGTERM) == 0
    finally:
        srv.close()
    # Visible again at once, not after the 600 s visibility timeout.
    assert queue_counts(sqs, url) == (1, 0)
    assert "message returned to the queue" in srv.read_log(None)

    again = queue_service(tmp_path, moto, url, "--sqs-visibility-timeout", "600", work=work)
    try:
        wait_until(lambda: (paper(again, "d1").get("latest") or {}).get("status") == "running", timeout=30)
        jobs = again.get("/jobs?paper_id=d1").json["jobs"]
        assert [j["status"] for j in jobs] == ["running", "interrupted"]
    finally:
        again.close()


@pytest.mark.parametrize("url, env, message", [
    ("my-queue", {}, "must be the queue's URL"),
    ("http://127.0.0.1:9/123456789012/q", {}, "no AWS region; set AWS_REGION or AWS_DEFAULT_REGION"),
])
def test_a_queue_that_cannot_be_used_is_refused_at_start_with_the_setting_named(tmp_path, url, env, message):
    base = {k: v for k, v in os.environ.items() if not k.startswith(("EXECUTOR_", "AWS_"))}
    proc = subprocess.run([sys.executable, "-m", "executor_service", "serve", "--work-dir", str(tmp_path),
                           "--sqs-queue-url", url, "--backend", "cpu"], cwd=REPO, capture_output=True,
                          text=True, timeout=60,
                          env={**base, "PYTHONPATH": str(REPO), "AWS_CONFIG_FILE": "/nonexistent", **env})
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "sqs_queue_url (--sqs-queue-url / EXECUTOR_SQS_QUEUE_URL)" in proc.stderr
    assert message in proc.stderr
