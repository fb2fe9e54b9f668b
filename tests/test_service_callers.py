"""The callers as they really are (issue 13), against a real server with a real pool.

Their scheduling Lambda sends `POST /execute` with {"paper_id", "code", "timeout": 3600,
"paper_title", "slack_thread_ts"} and gives up after 30 s, treating the call as
accepted. These tests send exactly that, and check that nothing is lost or run twice.
Every response is checked against executor_service/openapi.yaml.
"""

from __future__ import annotations

import http.client
import json
import socket

import pytest
from conftest import wait_until
from service_fixtures import openapi, server, start_server  # noqa: F401

pytestmark = pytest.mark.timeout(120)

CALLERS_REQUEST = {"paper_id": "paper_2401_00001", "code": "import torch\nprint('trained')",
                   "timeout": 3600, "paper_title": "Attention Is All You Need",
                   "slack_thread_ts": "1712345678.123456"}


@pytest.fixture(scope="module")
def other(tmp_path_factory):
    """A server capped at 1 s per job, with de-duplication turned off."""
    srv = start_server(tmp_path_factory, "capped", args=["--max-timeout", "1", "--default-timeout", "1",
                                                         "--no-deduplicate"])
    yield srv
    srv.close()


def _finished(srv, job_id: str, timeout: float = 30) -> dict:
    return wait_until(lambda: (lambda j: j if j["status"] not in ("queued", "running") else None)(
        srv.get(f"/jobs/{job_id}").json), timeout=timeout, interval=0.05)


def _running(srv, job_id: str) -> None:
    wait_until(lambda: srv.get(f"/jobs/{job_id}").json["status"] == "running", timeout=15, interval=0.05)


# --- 0. the callers' own request is accepted ---------------------------------------------

def test_the_callers_own_request_runs_with_its_hour_timeout(server, openapi):  # noqa: F811
    resp = server.post("/execute", CALLERS_REQUEST)
    assert resp.status == 200, resp.json
    body = resp.json
    assert body["success"] is True and body["stdout"] == "trained\n"
    assert body["timeout_clamped_from"] is None
    assert body["paper_title"] == "Attention Is All You Need"
    assert body["slack_thread_ts"] == "1712345678.123456"
    openapi.validate("POST", "/execute", resp)


def test_a_timeout_above_the_cap_runs_with_the_cap_and_says_so(other, openapi):  # noqa: F811
    resp = other.post("/execute", {**CALLERS_REQUEST, "code": "import time; time.sleep(5)"})
    assert resp.status == 200, resp.json
    body = resp.json
    assert body["timeout_clamped_from"] == 3600
    assert body["error_type"] == "timeout" and body["execution_time"] < 4
    openapi.validate("POST", "/execute", resp)
    queued = other.post("/jobs", {"code": "print(1)", "timeout": 7200})
    assert queued.status == 202 and queued.json["timeout_clamped_from"] == 7200
    assert _finished(other, queued.json["job_id"])["timeout_clamped_from"] == 7200
    assert other.post("/execute", {"code": "print(1)", "timeout": 0.5}).json["timeout_clamped_from"] is None


@pytest.mark.parametrize("timeout", [-1, 0, "3600", None, 1e999])
def test_only_malformed_timeouts_are_refused(other, timeout):
    raw = (b'{"code": "print(1)", "timeout": %s}' % json.dumps(timeout).encode() if timeout != 1e999
           else b'{"code": "print(1)", "timeout": 1e999}')
    resp = other.post("/execute", raw=raw)
    if timeout is None:  # null: the default
        assert resp.status == 200
    else:
        assert resp.status == 400 and "timeout" in resp.json["error"]
    assert other.post("/execute", raw=b'{"code": "print(1)", "timeout": NaN}').status == 400


# --- 1. async on request, on the original endpoints ---------------------------------------

def test_prefer_respond_async_makes_execute_answer_202_like_post_jobs(server, openapi):  # noqa: F811
    resp = server.post("/execute", {**CALLERS_REQUEST, "paper_id": "prefer", "code": "print('later')"},
                       headers={"Prefer": "wait=5, respond-async"})
    assert resp.status == 202, resp.json
    openapi.validate("POST", "/execute", resp)
    body = resp.json
    assert resp.headers["location"] == f"/batches/{body['batch_id']}" == body["batch_url"]
    assert resp.headers["preference-applied"] == "respond-async"
    assert body["job_ids"] == {"prefer": body["job_id"]} and body["deduplicated"] is False
    done = server.wait_batch(body["batch_id"])
    assert done["results"]["prefer"]["stdout"] == "later\n"
    assert _finished(server, body["job_id"])["slack_thread_ts"] == CALLERS_REQUEST["slack_thread_ts"]


def test_async_true_in_the_body_makes_execute_batch_answer_202(server, openapi):  # noqa: F811
    batch = [{"paper_id": "ab1", "code": "print(1)"}, {"paper_id": "ab2", "code": "print(2)"}]
    resp = server.post("/execute_batch", {"batch": batch, "async": True, "timeout": 3600})
    assert resp.status == 202 and "preference-applied" not in resp.headers
    openapi.validate("POST", "/execute_batch", resp)
    assert set(resp.json["job_ids"]) == {"ab1", "ab2"}
    assert server.wait_batch(resp.json["batch_id"])["successful"] == 2


def test_without_either_they_stay_synchronous_and_the_body_wins_over_prefer(server):  # noqa: F811
    resp = server.post("/execute", {"code": "print('sync')", "async": False},
                       headers={"Prefer": "respond-async"})
    assert resp.status == 200 and resp.json["stdout"] == "sync\n"
    bad = server.post("/execute", {"code": "print(1)", "async": "yes"})
    assert bad.status == 400 and "async must be true or false" in bad.json["error"]


# --- 2. a caller that stops waiting loses nothing -------------------------------------------

def test_a_client_that_hangs_up_after_1_s_loses_nothing(server):  # noqa: F811
    code = "import time\ntime.sleep(4)\nprint('finished anyway')"
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=1)
    conn.request("POST", "/execute", body=json.dumps({**CALLERS_REQUEST, "paper_id": "hangup", "code": code}),
                 headers={"Content-Type": "application/json"})
    with pytest.raises((socket.timeout, TimeoutError)):
        conn.getresponse()
    conn.close()
    # The request's thread stops waiting as soon as the hang-up is seen, while the job runs on.
    wait_until(lambda: "client hung up; its jobs run on" in server.read_log(tail=20000), timeout=5)
    assert server.get("/papers/hangup").json["latest"]["status"] == "running"
    done = wait_until(lambda: server.get("/papers/hangup").json["latest_finished"], timeout=30)
    assert done["success"] is True and done["stdout"] == "finished anyway\n"
    assert done["slack_thread_ts"] == CALLERS_REQUEST["slack_thread_ts"]
    assert server.get("/papers/hangup").json["jobs"] == 1


# --- 3. results by paper ----------------------------------------------------------------------

def test_jobs_of_a_paper_newest_first_paged_and_filtered_by_status(server, openapi):  # noqa: F811
    ids = [server.post("/execute", {"paper_id": "pager", "code": f"print({i})"}).json["job_id"]
           for i in range(3)]
    sleeper = server.post("/jobs", {"paper_id": "pager", "code": "import time; time.sleep(30)"}).json
    assert server.request("DELETE", f"/jobs/{sleeper['job_id']}").status == 200
    first = server.get("/jobs?paper_id=pager&limit=2")
    assert first.status == 200
    openapi.validate("GET", "/jobs", first)
    assert [j["job_id"] for j in first.json["jobs"]] == [sleeper["job_id"], ids[2]]
    second = server.get(first.json["next"]).json
    assert [j["job_id"] for j in second["jobs"]] == [ids[1], ids[0]] and second["next"] is None
    assert second["jobs"][0]["success"] is True and "stdout" not in second["jobs"][0]
    cancelled = server.get("/jobs?paper_id=pager&status=cancelled").json["jobs"]
    assert [j["job_id"] for j in cancelled] == [sleeper["job_id"]]
    both = server.get("/jobs?paper_id=pager&status=completed,cancelled&limit=10").json["jobs"]
    assert len(both) == 4
    for query in ("status=done", "limit=0", "limit=x", "cursor=abc", "paper_id=a/b"):
        bad = server.get(f"/jobs?{query}")
        assert bad.status == 400, query
        openapi.validate("GET", "/jobs", bad)


def test_a_paper_shows_its_latest_job_and_latest_result(server, openapi):  # noqa: F811
    server.post("/execute", {"paper_id": "latest", "code": "print('first result')"})
    running = server.post("/jobs", {"paper_id": "latest", "code": "import time; time.sleep(1.5)"}).json
    _running(server, running["job_id"])
    resp = server.get("/papers/latest")
    openapi.validate("GET", "/papers/{paper_id}", resp)
    paper = resp.json
    assert paper["jobs"] == 2 and paper["jobs_url"] == "/jobs?paper_id=latest"
    assert paper["latest"]["job_id"] == running["job_id"] and paper["latest"]["status"] == "running"
    assert paper["latest_finished"]["stdout"] == "first result\n"
    _finished(server, running["job_id"])
    assert server.get("/papers/latest").json["latest_finished"]["job_id"] == running["job_id"]
    missing = server.get("/papers/never-seen")
    assert missing.status == 404 and "never-seen" in missing.json["error"]
    openapi.validate("GET", "/papers/{paper_id}", missing)
    assert server.get("/papers/..").status in (400, 404)


# --- 4. no accidental duplicates ---------------------------------------------------------------

def test_identical_code_already_running_is_joined_not_run_again(server, openapi):  # noqa: F811
    request = {"paper_id": "dup", "code": "import time; time.sleep(1.5); print('once')", "timeout": 3600}
    first = server.post("/execute", request, headers={"Prefer": "respond-async"}).json
    again = server.post("/execute", request, headers={"Prefer": "respond-async"})
    assert again.status == 202 and again.json["deduplicated"] is True
    assert again.json["job_id"] == first["job_id"] and again.json["deduplicated_papers"] == ["dup"]
    openapi.validate("POST", "/execute", again)
    sync = server.post("/execute", request)  # the caller's synchronous retry
    assert sync.status == 200 and sync.json["deduplicated"] is True
    assert sync.json["job_id"] == first["job_id"] and sync.json["stdout"] == "once\n"
    openapi.validate("POST", "/execute", sync)
    assert server.get("/papers/dup").json["jobs"] == 1
    # Finished: the same code runs again; different code always runs.
    assert server.post("/execute", request, headers={"Prefer": "respond-async"}).json["deduplicated"] is False
    changed = server.post("/execute", {**request, "code": "print('v2')"}, headers={"Prefer": "respond-async"})
    assert changed.json["deduplicated"] is False and server.wait_batch(changed.json["batch_id"])


def test_a_batch_joins_only_its_identical_items(server, openapi):  # noqa: F811
    slow = {"paper_id": "bdup", "code": "import time; time.sleep(1.5); print('slow')"}
    first = server.post("/jobs", slow).json
    resp = server.post("/execute_batch", {"batch": [slow, {"paper_id": "bnew", "code": "print('new')"}]})
    assert resp.status == 200
    openapi.validate("POST", "/execute_batch", resp)
    results = resp.json["results"]
    assert results["bdup"]["job_id"] == first["job_id"] and results["bdup"]["deduplicated"] is True
    assert results["bdup"]["stdout"] == "slow\n" and "deduplicated" not in results["bnew"]
    assert resp.json["successful"] == 2


def test_idempotency_key_works_on_execute_too(server):  # noqa: F811
    body = {"paper_id": "idem", "code": "print('idem')", "async": True}
    first = server.post("/execute", body, headers={"Idempotency-Key": "lambda-run-42"}).json
    second = server.post("/execute", {**body, "code": "print('other')"},
                         headers={"Idempotency-Key": "lambda-run-42"}).json
    assert first["batch_id"] == second["batch_id"] and first["job_id"] == second["job_id"]
    server.wait_batch(first["batch_id"])


def test_deduplication_can_be_turned_off(other):
    request = {"paper_id": "nodup", "code": "import time; time.sleep(0.5)", "async": True}
    a, b = other.post("/execute", request).json, other.post("/execute", request).json
    assert a["job_id"] != b["job_id"] and b["deduplicated"] is False
    other.wait_batch(a["batch_id"])
    other.wait_batch(b["batch_id"])


# --- 7. the callers' extra fields ---------------------------------------------------------------

def test_the_callers_fields_are_kept_and_returned_never_an_error(server, openapi):  # noqa: F811
    batch = {"slack_thread_ts": "1700000000.000100", "timeout": 3600, "batch": [
        {"paper_id": "f1", "code": "print(1)", "paper_title": "One", "s3_code_key": "f1/code.py"},
        {"paper_id": "f2", "code": "print(2)", "slack_thread_ts": 1700000001.5}]}
    resp = server.post("/execute_batch", batch)
    assert resp.status == 200
    openapi.validate("POST", "/execute_batch", resp)
    r = resp.json["results"]
    assert (r["f1"]["paper_title"], r["f1"]["s3_code_key"], r["f1"]["slack_thread_ts"]) == (
        "One", "f1/code.py", "1700000000.000100")
    assert r["f2"]["slack_thread_ts"] == 1700000001.5 and "paper_title" not in r["f2"]
    listed = server.get("/jobs?paper_id=f1").json["jobs"][0]
    assert listed["s3_code_key"] == "f1/code.py" and listed["paper_title"] == "One"
    bad = server.post("/execute", {"code": "print(1)", "slack_thread_ts": {"ts": 1}})
    assert bad.status == 400 and "slack_thread_ts must be a string or a number" in bad.json["error"]


def test_a_script_cannot_overwrite_the_callers_fields_with_metrics(server):  # noqa: F811
    code = 'print(\'METRICS: {"paper_title": "forged", "timeout_clamped_from": 1, "loss": 0.5}\')'
    body = server.post("/execute", {"code": code, "paper_title": "real"}).json
    assert body["paper_title"] == "real" and body["timeout_clamped_from"] is None
    assert body["loss"] == 0.5 and body["detailed_metrics"]["paper_title"] == "forged"
