"""executor_service.client (stdlib only) and the CLI, against a real server."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest
from service_fixtures import REPO, openapi, start_server  # noqa: F401

from executor_service.client import ExecutorClient, ExecutorError, ExecutorTimeout

pytestmark = pytest.mark.timeout(120)


@pytest.fixture(scope="module")
def small_queue(tmp_path_factory):
    """A server whose queue holds two jobs, to see 503s."""
    srv = start_server(tmp_path_factory, "client", args=["--max-queue", "2"])
    yield srv
    srv.close()


def _fill(srv) -> dict:
    """Both workers busy for ~2.5 s and two jobs queued: the queue is full."""
    batch = [{"paper_id": f"busy{i}", "code": "import time; time.sleep(2.5)"} for i in range(2)]
    first = srv.post("/jobs", {"batch": batch}).json
    for job_id in first["job_ids"].values():
        deadline = time.monotonic() + 10
        while srv.get(f"/jobs/{job_id}").json["status"] != "running":
            assert time.monotonic() < deadline
            time.sleep(0.05)
    queued = [{"paper_id": f"q{i}", "code": "print(1)"} for i in range(2)]
    assert srv.post("/jobs", {"batch": queued}).status == 202
    return first


def test_client_module_imports_only_the_standard_library():
    path = REPO / "executor_service" / "client.py"
    code = ("import importlib.util, sys\n"
            f"spec = importlib.util.spec_from_file_location('client', {str(path)!r})\n"
            "m = importlib.util.module_from_spec(spec); spec.loader.exec_module(m)\n"
            "print(m.ExecutorClient.__name__)\n")
    out = subprocess.run([sys.executable, "-I", "-S", "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ExecutorClient"


def test_run_batch_returns_the_original_batch_shape(small_queue):
    client = ExecutorClient(small_queue.url, poll_initial=0.1)
    batch = [{"paper_id": "p1", "code": "print('METRICS: {\"training_loss\": 0.5}')"},
             {"paper_id": "p2", "code": "raise SystemExit(1)"}]
    result = client.run_batch(batch, timeout=60, deadline_s=60)
    assert set(result) == {"success", "batch_size", "successful", "failed", "results"}
    assert (result["batch_size"], result["successful"], result["failed"]) == (2, 1, 1)
    assert result["results"]["p1"]["training_loss"] == 0.5


def test_wait_batch_past_its_deadline_raises_with_the_partial_batch(small_queue):
    client = ExecutorClient(small_queue.url, poll_initial=0.1)
    sub = client.submit_batch([{"paper_id": "slow", "code": "import time; time.sleep(1.5)"}])
    with pytest.raises(ExecutorTimeout) as info:
        client.wait_batch(sub["batch_id"], deadline_s=0.5)
    assert info.value.batch_id == sub["batch_id"]
    assert info.value.partial["status"] in ("queued", "running")
    assert client.wait_batch(sub["batch_id"], deadline_s=30)["successful"] == 1


def test_cancel_through_the_client(small_queue):
    client = ExecutorClient(small_queue.url, poll_initial=0.1)
    sub = client.submit_batch([{"paper_id": "sleepy", "code": "import time; time.sleep(30)"}])
    job_id = sub["job_ids"]["sleepy"]
    assert client.cancel_job(job_id)["status"] == "cancelled"
    assert client.cancel_job(job_id)["status"] == "cancelled"  # 409 turned into the job


def test_full_queue_answers_503_with_retry_after(small_queue, openapi):  # noqa: F811
    first = _fill(small_queue)
    resp = small_queue.post("/jobs", {"code": "print(1)"})
    assert resp.status == 503 and "queue is full" in resp.json["error"]
    assert int(resp.headers["retry-after"]) > 0
    openapi.validate("POST", "/jobs", resp)
    assert small_queue.get("/health").status == 200
    small_queue.wait_batch(first["batch_id"], timeout=30)


def test_client_retries_503_honouring_retry_after(small_queue):
    first = _fill(small_queue)
    client = ExecutorClient(small_queue.url, poll_initial=0.1)
    start = time.monotonic()
    result = client.run_batch([{"paper_id": "late", "code": "print('got in')"}], deadline_s=60)
    assert time.monotonic() - start >= 4  # waited the Retry-After (5 s) at least once
    assert result["results"]["late"]["stdout"] == "got in\n"
    small_queue.wait_batch(first["batch_id"], timeout=30)


def test_client_errors_carry_status_and_message(small_queue):
    client = ExecutorClient(small_queue.url)
    with pytest.raises(ExecutorError) as info:
        client.submit_batch([{"paper_id": "../x", "code": "x"}])
    assert info.value.status == 400 and "paper_id" in info.value.message


def test_unreachable_service_fails_after_retries():
    client = ExecutorClient("http://127.0.0.1:9", max_retries=1, request_timeout=1)
    with pytest.raises(ExecutorError):
        client.status()


def _cli(*args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("EXECUTOR_")}
    env["PYTHONPATH"] = str(REPO)
    return subprocess.run([sys.executable, "-m", "executor_service", *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=60)


def test_cli_submit_health_and_status(small_queue, tmp_path):
    script = tmp_path / "my script.py"
    script.write_text("print('from the cli')\n")
    out = _cli("submit", "--url", small_queue.url, str(script))
    assert out.returncode == 0, out.stderr
    body = json.loads(out.stdout)
    assert body["results"]["my_script"]["stdout"] == "from the cli\n"
    health = _cli("health", "--url", small_queue.url)
    assert health.returncode == 0 and json.loads(health.stdout)["status"] == "healthy"
    status = _cli("status", "--url", small_queue.url)
    assert status.returncode == 0 and json.loads(status.stdout)["capacity"] == 2


def test_fire_and_forget_then_find_the_result_by_paper(small_queue):
    client = ExecutorClient(small_queue.url, poll_initial=0.1)
    assert client.paper("cl-paper") is None
    sub = client.submit("print('by paper')", "cl-paper", timeout=3600, slack_thread_ts="1.5")
    again = client.submit("print('by paper')", "cl-paper", timeout=3600, slack_thread_ts="1.5")
    assert again["deduplicated"] == (again["job_id"] == sub["job_id"])  # joined unless already done
    client.wait_batch(sub["batch_id"], deadline_s=30)
    client.wait_batch(again["batch_id"], deadline_s=30)
    found = client.paper("cl-paper")["latest_finished"]
    assert found["stdout"] == "by paper\n" and found["slack_thread_ts"] == "1.5"
    listed = client.list_jobs(paper_id="cl-paper", status="completed", limit=1)
    assert listed["jobs"][0]["paper_id"] == "cl-paper"
