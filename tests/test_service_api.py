"""The HTTP API end to end: a real server on 127.0.0.1 with a real pool (cpu, 2 workers).

Every response a test receives is also checked against executor_service/openapi.yaml.
"""

from __future__ import annotations

import json
import re
import time

import pytest
from conftest import wait_until
from service_fixtures import openapi, server  # noqa: F401

from warm_pool import ERROR_TYPES

pytestmark = pytest.mark.timeout(120)

SEED_BATCH_ITEM = {
    "paper_id": "paper_123",
    "paper_title": "ResNet Paper",
    "code": "import torch\n# PyTorch code here...",
    "s3_code_key": "paper_123/code.py",
}
TRAINING_SCRIPT = """
import json
import torch
model = torch.nn.Linear(4, 1)
opt = torch.optim.SGD(model.parameters(), lr=0.1)
x, y = torch.randn(32, 4), torch.randn(32, 1)
for epoch in range(5):
    opt.zero_grad()
    loss = torch.nn.functional.mse_loss(model(x), y)
    loss.backward()
    opt.step()
    print(f"epoch {epoch} loss: {loss.item():.4f}")
print(f"METRICS: {json.dumps({'training_loss': 0.023, 'validation_accuracy': 0.945})}")
"""


# --- the seed README's examples -------------------------------------------------------

def test_health_has_every_original_field_and_only_the_pool_counts(server, openapi):  # noqa: F811
    resp = server.get("/health")
    assert resp.status == 200
    body = resp.json
    assert set(body) == {"status", "timestamp", "neuron_available", "working_dir", "max_execution_time",
                         "pool"}
    assert body["status"] == "healthy"
    assert body["neuron_available"] is False  # cpu backend: no NeuronCore proven
    assert body["working_dir"] == str(server.work_dir)
    assert body["pool"] == {"size": 2, "idle": 2, "busy": 0, "state": "ready"}
    openapi.validate("GET", "/health", resp)


def test_verbose_health_shows_the_whole_pool(server, openapi):  # noqa: F811
    resp = server.get("/health?verbose=1")
    assert resp.status == 200
    pool = resp.json["pool"]
    assert pool["backend"] == "cpu" and pool["size"] == 2
    assert "torch" in pool["preloaded"]
    assert {w["pid"] for w in pool["workers"]} and "respawns" in pool
    openapi.validate("GET", "/health", resp)
    assert server.get("/health?verbose=0").json["pool"] == {"size": 2, "idle": 2, "busy": 0,
                                                            "state": "ready"}
    bad = server.get("/health?verbose=maybe")
    assert bad.status == 400 and "verbose" in bad.json["error"]


def test_one_instance_never_loads_ray(server):  # noqa: F811
    """Without --ray-address the service is one instance's own, as before: Ray (when it
    is installed at all) is never imported into it."""
    with open(f"/proc/{server.proc.pid}/maps") as maps:
        assert "_raylet" not in maps.read()


def test_execute_seed_example(server, openapi):  # noqa: F811
    code = 'import torch\nprint("Hello from Trainium")\nprint(torch.__version__)'
    resp = server.post("/execute", {"paper_id": "test_123", "code": code})
    assert resp.status == 200
    body = resp.json
    assert body["success"] is True and body["return_code"] == 0
    assert body["stdout"].startswith("Hello from Trainium\n")
    assert body["paper_id"] == "test_123"
    assert body["lines_of_code"] == 3 and body["has_training_loop"] is False
    openapi.validate("POST", "/execute", resp)


def test_execute_batch_seed_example_and_metrics(server, openapi):  # noqa: F811
    batch = [SEED_BATCH_ITEM, {"paper_id": "trainer", "code": TRAINING_SCRIPT}]
    resp = server.post("/execute_batch", {"batch": batch, "timeout": 600})
    assert resp.status == 200
    body = resp.json
    assert (body["success"], body["batch_size"], body["successful"], body["failed"]) == (True, 2, 2, 0)
    assert set(body["results"]) == {"paper_123", "trainer"}
    trainer = body["results"]["trainer"]
    assert trainer["has_training_loop"] is True
    assert trainer["training_loss"] == 0.023 and trainer["validation_accuracy"] == 0.945
    assert trainer["detailed_metrics"] == {"training_loss": 0.023, "validation_accuracy": 0.945}
    assert trainer["peak_memory_mb"] > 0
    openapi.validate("POST", "/execute_batch", resp)


def test_synchronous_results_are_also_kept_in_the_store(server, openapi):  # noqa: F811
    body = server.post("/execute", {"code": "print('kept')", "paper_id": "kept"}).json
    again = server.get(f"/jobs/{body['job_id']}")
    assert again.status == 200 and again.json["stdout"] == "kept\n"
    assert again.json["batch_id"] == body["batch_id"]
    openapi.validate("GET", "/jobs/{job_id}", again)


def test_batch_item_failure_does_not_break_the_others(server, openapi):  # noqa: F811
    batch = [
        {"paper_id": "ok", "code": "print('fine')"},
        {"paper_id": "raises", "code": "raise ValueError('boom')"},
        {"paper_id": "syntax", "code": "def f(:\n"},
        {"paper_id": "exits", "code": "import sys; sys.exit(4)"},
    ]
    resp = server.post("/execute_batch", {"batch": batch})
    body = resp.json
    assert (body["successful"], body["failed"]) == (1, 3)
    r = body["results"]
    assert r["ok"]["success"] is True
    assert r["raises"]["error_type"] == "exception" and "boom" in r["raises"]["stderr"]
    assert r["syntax"]["error_type"] == "syntax_error"
    assert r["exits"]["return_code"] == 4 and r["exits"]["error_type"] == "exit"
    openapi.validate("POST", "/execute_batch", resp)


def test_batch_runs_in_parallel_across_workers(server):  # noqa: F811
    batch = [{"paper_id": f"sleep{i}", "code": "import time; time.sleep(1)"} for i in range(2)]
    start = time.monotonic()
    body = server.post("/execute_batch", {"batch": batch}).json
    elapsed = time.monotonic() - start
    assert body["successful"] == 2
    assert elapsed < 1.9, f"two 1-s scripts took {elapsed:.2f}s: not parallel"
    workers = {r["worker"]["pid"] for r in body["results"].values()}
    assert len(workers) == 2


def test_job_timeout_is_reported(server):  # noqa: F811
    body = server.post("/execute", {"code": "import time; time.sleep(30)", "timeout": 1}).json
    assert body["timeout"] is True and body["error_type"] == "timeout" and body["success"] is False


def test_memory_limit_flag_reaches_the_pool(server):  # noqa: F811
    code = "blob = b'x' * (1536 << 20)\nprint('survived')"
    body = server.post("/execute", {"code": code, "paper_id": "hog"}).json
    assert body["error_type"] == "memory_limit" and body["success"] is False
    assert "survived" not in body["stdout"]
    after = server.post("/execute", {"code": "print('next job fine')"}).json
    assert after["success"] is True


# --- async jobs ------------------------------------------------------------------------

def test_async_batch_submit_then_poll(server, openapi):  # noqa: F811
    batch = [{"paper_id": "a1", "code": "print('one')"}, {"paper_id": "a2", "code": "print('two')"}]
    resp = server.post("/jobs", {"batch": batch})
    assert resp.status == 202
    openapi.validate("POST", "/jobs", resp)
    accepted = resp.json
    assert set(accepted["job_ids"]) == {"a1", "a2"}
    assert resp.headers["location"] == f"/batches/{accepted['batch_id']}"
    done = server.wait_batch(accepted["batch_id"])
    assert done["successful"] == 2
    assert done["results"]["a2"]["stdout"] == "two\n"
    assert done["results"]["a1"]["status"] == "completed"
    job = server.get(f"/jobs/{accepted['job_ids']['a1']}")
    assert job.json["stdout"] == "one\n" and job.json["batch_id"] == accepted["batch_id"]
    openapi.validate("GET", "/jobs/{job_id}", job)
    openapi.validate("GET", "/batches/{batch_id}", server.get(f"/batches/{accepted['batch_id']}"))


def test_idempotency_key_returns_the_first_batch(server):  # noqa: F811
    body = {"batch": [{"paper_id": "once", "code": "print('once')"}]}
    first = server.post("/jobs", body, headers={"Idempotency-Key": "key-123"})
    second = server.post("/jobs", body, headers={"Idempotency-Key": "key-123"})
    assert first.status == second.status == 202
    assert first.json["batch_id"] == second.json["batch_id"]
    assert first.json["job_ids"] == second.json["job_ids"]
    bad = server.post("/jobs", body, headers={"Idempotency-Key": "has space"})
    assert bad.status == 400 and "Idempotency-Key" in bad.json["error"]
    server.wait_batch(first.json["batch_id"])


def test_async_single_script(server):  # noqa: F811
    resp = server.post("/jobs", {"code": "print(6 * 7)", "paper_id": "single"})
    assert resp.status == 202
    done = server.wait_batch(resp.json["batch_id"])
    assert done["results"]["single"]["stdout"] == "42\n"


def test_cancel_running_and_queued_jobs(server, openapi):  # noqa: F811
    sleeper = "import time; time.sleep(60)"
    batch = [{"paper_id": f"c{i}", "code": sleeper} for i in range(3)]  # 2 workers: c2 waits
    ids = server.post("/jobs", {"batch": batch}).json
    wait_until(lambda: server.get(f"/jobs/{ids['job_ids']['c0']}").json["status"] == "running")
    for pid in ("c0", "c1", "c2"):
        resp = server.request("DELETE", f"/jobs/{ids['job_ids'][pid]}")
        assert resp.status == 200, resp.json
        openapi.validate("DELETE", "/jobs/{job_id}", resp)
    done = server.wait_batch(ids["batch_id"], timeout=20)
    for pid in ("c0", "c1", "c2"):
        r = done["results"][pid]
        assert r["status"] == "cancelled" and r["error_type"] == "cancelled", r
    again = server.request("DELETE", f"/jobs/{ids['job_ids']['c0']}")
    assert again.status == 409 and "already finished" in again.json["error"]


def test_unknown_job_and_batch_are_json_404(server, openapi):  # noqa: F811
    for path in ("/jobs/nope", "/batches/nope"):
        resp = server.get(path)
        assert resp.status == 404 and "error" in resp.json
    resp = server.request("DELETE", "/jobs/nope")
    assert resp.status == 404
    openapi.validate("GET", "/jobs/{job_id}", server.get("/jobs/nope"))


# --- status and metrics -------------------------------------------------------------------

def test_status_reports_capacity_and_idle_since(server, openapi):  # noqa: F811
    resp = server.get("/status")
    assert resp.status == 200
    body = resp.json
    assert body["capacity"] == 2
    assert body["running_executions"] == 0 and body["queued"] == 0
    assert body["idle_since"] is not None
    openapi.validate("GET", "/status", resp)


def test_status_while_busy(server):  # noqa: F811
    ids = server.post("/jobs", {"code": "import time; time.sleep(1.5)", "paper_id": "busy"}).json
    job_id = ids["job_ids"]["busy"]
    wait_until(lambda: server.get(f"/jobs/{job_id}").json["status"] == "running")
    body = server.get("/status").json
    assert body["running_executions"] == 1 and body["idle_since"] is None
    server.wait_batch(ids["batch_id"])


def test_metrics_are_prometheus_text(server):  # noqa: F811
    from prometheus_client.parser import text_string_to_metric_families

    server.post("/execute", {"code": "print(1)"})
    resp = server.get("/metrics")
    assert resp.status == 200 and resp.headers["content-type"].startswith("text/plain")
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
               for family in text_string_to_metric_families(resp.raw.decode()) for s in family.samples}
    assert samples[("executor_jobs_finished_total", (("outcome", "success"),))] >= 1
    assert samples[("executor_job_duration_seconds_count", ())] >= 1
    assert samples[("executor_pool_size", ())] == 2
    workers = sum(samples[("executor_pool_workers", (("state", st),))] for st in ("idle", "busy", "starting"))
    assert workers == 2
    assert samples[("executor_queue_depth", ())] >= 0


# --- errors and validation ----------------------------------------------------------------

LONG_ID = "x" * 129
ELEVEN = [{"paper_id": f"p{i}", "code": "x"} for i in range(11)]


@pytest.mark.parametrize("path,raw,fragment", [
    ("/execute", b"{not json", "not valid JSON"),
    ("/execute", b"", "empty"),
    ("/execute", b"\xff\xfe{}", "UTF-8"),
    ("/execute", b"[1, 2]", "JSON object"),
    ("/execute", b'"code"', "JSON object"),
    ("/execute", b'{"code": NaN}', "not valid JSON"),
    ("/execute", b"{}", "code is missing"),
    ("/execute", b'{"code": ""}', "code is empty"),
    ("/execute", b'{"code": "   \\n"}', "code is empty"),
    ("/execute", b'{"code": 5}', "code must be a string"),
    ("/execute", b'{"code": "x=1", "paper_id": 7}', "paper_id must be a string"),
    ("/execute", b'{"code": "x=1", "paper_id": "../etc"}', "invalid"),
    ("/execute", b'{"code": "x=1", "paper_id": ".."}', "invalid"),
    ("/execute", b'{"code": "x=1", "paper_id": "a/b"}', "invalid"),
    ("/execute", b'{"code": "x=1", "paper_id": ""}', "invalid"),
    ("/execute", json.dumps({"code": "x=1", "paper_id": LONG_ID}).encode(), "invalid"),
    ("/execute", b'{"code": "x=1", "timeout": 0}', "positive"),
    ("/execute", b'{"code": "x=1", "timeout": -5}', "positive"),
    ("/execute", b'{"code": "x=1", "timeout": 1e999}', "positive finite"),
    ("/execute", b'{"code": "x=1", "timeout": "10"}', "timeout must be a number"),
    ("/execute", b'{"code": "x=1", "timeout": true}', "timeout must be a number"),
    ("/execute_batch", b'{"code": "x=1"}', "batch is missing"),
    ("/execute_batch", b'{"batch": {}}', "batch must be an array"),
    ("/execute_batch", b'{"batch": []}', "batch is empty"),
    ("/execute_batch", b'{"batch": [5]}', "batch[0].must be a JSON object"),
    ("/execute_batch", b'{"batch": [{"code": "x=1"}]}', "batch[0].paper_id is missing"),
    ("/execute_batch", b'{"batch": [{"paper_id": "a", "code": "x"}, {"paper_id": "a", "code": "y"}]}',
     "duplicate paper_id"),
    ("/execute_batch", json.dumps({"batch": ELEVEN}).encode(), "maximum is 10"),
    ("/jobs", b'{"batch": [{"paper_id": "a b", "code": "x"}]}', "invalid"),
    ("/jobs", b'{"code": ""}', "code is empty"),
    ("/execute", b'{"code": "print(1)", "code": "print(2)"}', "key 'code' twice"),
    ("/execute_batch", b'{"batch": [{"paper_id": "a", "paper_id": "b", "code": "x"}]}',
     "key 'paper_id' twice"),
    ("/jobs", b'{"batch": [], "batch": [{"paper_id": "a", "code": "x"}]}', "key 'batch' twice"),
    ("/execute", b'{"code": "print(1)\\ud800"}', "code contains U+D800"),
    ("/execute", b'{"code": "print(1)", "paper_title": "\\udfff title"}', "paper_title contains U+DFFF"),
    ("/execute_batch", b'{"batch": [{"paper_id": "a", "code": "x\\udc80"}]}',
     "batch[0].code contains U+DC80"),
    ("/jobs", b'{"batch": [{"paper_id": "a", "code": "x", "paper_title": "\\ud83d"}]}',
     "batch[0].paper_title contains U+D83D"),
    ("/jobs", b'{"code": "x", "s3_code_key": "k\\ud800"}', "s3_code_key contains U+D800"),
])
def test_bad_requests_get_a_clear_json_400(server, openapi, path, raw, fragment):  # noqa: F811
    resp = server.post(path, raw=raw)
    assert resp.status == 400, resp.raw
    assert fragment in resp.json["error"]
    openapi.validate("POST", path, resp)


def test_text_that_cannot_be_stored_leaves_nothing_behind(server):  # noqa: F811
    before = server.get("/status").json
    for raw in (b'{"code": "\\ud800"}', b'{"code": "x", "paper_title": "\\udc00"}'):
        for path in ("/execute", "/jobs"):
            assert server.post(path, raw=raw).status == 400
    after = server.get("/status").json
    assert (after["queued"], after["running_executions"]) == (before["queued"], before["running_executions"])
    assert server.post("/execute", {"code": "print('fine')", "paper_title": "caf\u00e9 \U0001f600"}).json[
        "success"] is True


def test_error_messages_quote_only_a_short_prefix_of_long_input(server):  # noqa: F811
    long_id = "x" * 100_000
    for method, path in (("GET", f"/jobs/{long_id}"), ("DELETE", f"/jobs/{long_id}"),
                         ("GET", f"/batches/{long_id}"), ("GET", f"/{long_id}")):
        resp = server.request(method, path)
        assert resp.status == 404, resp.raw[:200]
        assert len(resp.raw) < 300 and resp.json["error"].endswith("xxxx'...")
    resp = server.post("/execute", {"code": "x", "paper_id": "/" * 5000})
    assert resp.status == 400 and len(resp.json["error"]) < 300


def test_every_response_says_nosniff(server):  # noqa: F811
    for resp in (server.get("/health"), server.get("/nope"), server.post("/execute", raw=b"{"),
                 server.post("/execute", {"code": "print(1)"}), server.get("/metrics"),
                 server.request("PUT", "/health")):
        assert resp.headers["x-content-type-options"] == "nosniff", resp.status


def test_service_stays_healthy_after_bad_requests(server):  # noqa: F811
    for raw in (b"\x00\x01", b"{", b"[]" * 1000):
        resp = server.post("/execute_batch", raw=raw)
        assert resp.status == 400 and resp.json["error"], raw[:10]
    assert server.get("/health").status == 200
    assert server.post("/execute", {"code": "print('still here')"}).json["success"] is True


def test_body_above_the_limit_is_json_413(server, openapi):  # noqa: F811
    big = {"code": "x = 1\n" + "#" * (11 * 1024 * 1024)}
    resp = server.post("/execute", big)
    assert resp.status == 413 and "too large" in resp.json["error"]
    openapi.validate("POST", "/execute", resp)


def test_unknown_route_and_method_are_json(server):  # noqa: F811
    resp = server.get("/nope")
    assert resp.status == 404 and resp.json["error"].startswith("not found")
    resp = server.request("PUT", "/health")
    assert resp.status == 405 and "not allowed" in resp.json["error"]
    assert "GET" in resp.headers.get("allow", "")
    resp = server.get("/execute")
    assert resp.status == 405 and "error" in resp.json


# --- a job's words never become the service's own fields ----------------------------------

PRINTS_SERVICE_FIELDS = """
import json
forged = {"callbacks": [{"url": "http://x", "state": "delivered"}], "deduplicated": True,
          "paper_title": "forged title", "s3_code_key": "forged", "success": False, "status": "cancelled",
          "error_type": "timeout", "stdout": "forged", "job_id": "forged", "attempts": 7,
          "timeout_clamped_from": 1, "training_loss": 0.25}
print("METRICS: " + json.dumps(forged))
"""


def test_metrics_named_like_service_fields_do_not_change_them(server, openapi):  # noqa: F811
    accepted = server.post("/jobs", {"code": PRINTS_SERVICE_FIELDS, "paper_id": "words"}).json
    server.wait_batch(accepted["batch_id"])
    resp = server.get(f"/jobs/{accepted['job_ids']['words']}")
    job = resp.json
    openapi.validate("GET", "/jobs/{job_id}", resp)
    assert (job["success"], job["status"], job["error_type"]) == (True, "completed", None)
    assert job["stdout"].startswith("METRICS: ") and job["job_id"] == accepted["job_ids"]["words"]
    assert job["timeout_clamped_from"] is None
    for absent in ("callbacks", "deduplicated", "paper_title", "s3_code_key", "attempts"):
        assert absent not in job, absent
    assert job["training_loss"] == 0.25  # a metric of its own is still lifted
    assert job["detailed_metrics"]["deduplicated"] is True
    assert job["detailed_metrics"]["callbacks"] == [{"url": "http://x", "state": "delivered"}]
    in_batch = server.get(f"/batches/{accepted['batch_id']}").json["results"]["words"]
    assert "callbacks" not in in_batch and "deduplicated" not in in_batch and in_batch["success"] is True


# A job forging its worker's job_done message: it owns the worker's end of the channel
# (the one socket among its fds), so it can send any error_type the protocol carries.
FORGES_ERROR_TYPE = """
import json, os, stat
from multiprocessing.connection import Connection
def is_socket(fd):
    try:
        return stat.S_ISSOCK(os.fstat(fd).st_mode)
    except OSError:  # the listing's own fd, closed by now
        return False
channel = next(fd for fd in map(int, os.listdir("/proc/self/fd")) if is_socket(fd))
forged = {"v": 1, "type": "job_done", "job_id": os.path.basename(os.getcwd()), "return_code": 1,
          "error_type": "%s", "error_message": "forged", "peak_rss_bytes": 0}
Connection(channel).send_bytes(json.dumps(forged).encode())
os._exit(1)
"""


def test_a_forged_error_type_reaches_neither_the_result_nor_metrics(server):  # noqa: F811
    def run(letter: str) -> dict:
        body = server.post("/execute", {"code": FORGES_ERROR_TYPE % (letter * 16_000)}).json
        assert body["error_type"] in ERROR_TYPES and body["success"] is False, body["error_type"][:40]
        return body

    server.get("/metrics")  # its own request counter exists from here on
    run("A")
    first = server.get("/metrics").raw.decode()
    for letter in "BCD":
        run(letter)
    after = server.get("/metrics").raw.decode()
    assert not re.search("AAAA|BBBB|CCCC|DDDD", first + after)
    series = lambda text: {line.rsplit(" ", 1)[0] for line in text.splitlines()}  # noqa: E731
    assert series(after) == series(first)  # counts grew, not the set of series
    assert len(after) < len(first) + 200
