"""Webhooks end to end: a real server, a real pool, a real HTTP receiver on 127.0.0.1.

A job (or batch) with `callback_url` is POSTed there when it ends, signed with
`X-Signature: sha256=<hex HMAC-SHA256 of the body>`, retried with backoff, from threads
that are neither the pool's nor a request's, with its delivery state in the job and in
the store (so a restart loses none). Only hosts on --callback-hosts may be named.
"""

from __future__ import annotations

import argparse
import time

import pytest
from conftest import wait_until
from service_fixtures import Server, openapi, start_server  # noqa: F401

from executor_service import validation
from executor_service.config import ConfigError, add_arguments, from_sources
from executor_service.webhooks import sign

pytestmark = pytest.mark.timeout(150)

SECRET = "whsec-test-0123456789"
HOOK_ARGS = ["--callback-hosts", "127.0.0.1", "--callback-backoff", "0.3", "--callback-attempts", "3",
             "--callback-timeout", "2"]


@pytest.fixture(scope="module")
def hooked(tmp_path_factory):
    srv = start_server(tmp_path_factory, "hooks", args=HOOK_ARGS, env={"EXECUTOR_CALLBACK_SECRET": SECRET})
    yield srv
    srv.close()


def _callbacks(srv, job_id: str) -> list[dict]:
    return srv.get(f"/jobs/{job_id}").json.get("callbacks", [])


def _delivered(srv, job_id: str, timeout: float = 30) -> dict:
    ended = ("delivered", "failed")
    return wait_until(lambda: next((c for c in _callbacks(srv, job_id) if c["state"] in ended), None),
                      timeout=timeout, interval=0.05)


def test_a_finished_job_is_posted_signed_to_its_callback(hooked, receiver, openapi):  # noqa: F811
    url = receiver.route("/job-done")
    resp = hooked.post("/execute", {"paper_id": "hook1", "code": "print('hi')", "timeout": 3600,
                                    "slack_thread_ts": "1.2", "callback_url": url},
                       headers={"Prefer": "respond-async"})
    assert resp.status == 202, resp.json
    job_id = resp.json["job_id"]
    waiting = hooked.get(f"/jobs/{job_id}")
    assert waiting.json["callbacks"][0]["state"] in ("waiting", "pending", "delivered")
    state = _delivered(hooked, job_id)
    assert state["state"] == "delivered" and state["attempts"] == 1 and state["last_status"] == 200
    [got] = receiver.received("/job-done")
    assert got.signed_with(SECRET) and got.headers["x-signature"] == sign(SECRET, got.body)
    assert not got.signed_with("another secret")
    assert got.headers["content-type"] == "application/json"
    assert got.headers["x-executor-event"] == "job.finished" and got.headers["x-delivery-attempt"] == "1"
    body = got.json
    job = hooked.get(f"/jobs/{job_id}")
    openapi.validate("GET", "/jobs/{job_id}", job)
    expected = dict(job.json)
    expected.pop("callbacks")
    assert body == expected
    assert body["stdout"] == "hi\n" and body["slack_thread_ts"] == "1.2" and body["paper_id"] == "hook1"


def test_failed_deliveries_are_retried_with_backoff_and_visible(hooked, receiver):
    url = receiver.route("/flaky", statuses=[500, 503, 200])
    job = {"paper_id": "flaky", "code": "print(1)", "callback_url": url}
    job_id = hooked.post("/jobs", job).json["job_id"]
    pending = wait_until(lambda: next((c for c in _callbacks(hooked, job_id) if c["attempts"] >= 1
                                       and c["state"] == "pending"), None), timeout=30, interval=0.02)
    assert pending["last_status"] in (500, 503) and pending["next_attempt_at"] is not None
    assert "HTTP 5" in pending["last_error"]
    state = _delivered(hooked, job_id)
    assert state["state"] == "delivered" and state["attempts"] == 3 and state["last_error"] is None
    times = [r.at for r in receiver.received("/flaky")]
    assert len(times) == 3
    assert times[1] - times[0] >= 0.3 and times[2] - times[1] >= 0.6  # 0.3 s, doubled


def test_a_callback_that_always_fails_is_given_up_after_its_attempts(hooked, receiver):
    url = receiver.route("/down", statuses=[500])
    job = {"paper_id": "down", "code": "print(1)", "callback_url": url}
    job_id = hooked.post("/jobs", job).json["job_id"]
    state = _delivered(hooked, job_id)
    assert state["state"] == "failed" and state["attempts"] == 3 and state["last_status"] == 500
    time.sleep(1.5)
    assert len(receiver.received("/down")) == 3


def test_a_batch_callback_gets_the_whole_batch_once_every_job_ended(hooked, receiver, openapi):  # noqa: F811
    url = receiver.route("/batch-done")
    item_url = receiver.route("/item-done")
    batch = [{"paper_id": "b1", "code": "import time; time.sleep(1); print('b1')"},
             {"paper_id": "b2", "code": "print('b2')", "callback_url": item_url}]
    resp = hooked.post("/execute_batch", {"batch": batch, "callback_url": url, "async": True})
    assert resp.status == 202
    done = hooked.wait_batch(resp.json["batch_id"])
    wait_until(lambda: receiver.received("/batch-done"), timeout=15)
    [got] = receiver.received("/batch-done")
    assert got.signed_with(SECRET) and got.headers["x-executor-event"] == "batch.finished"
    assert got.json["status"] == "completed" and set(got.json["results"]) == {"b1", "b2"}
    assert got.json["results"]["b1"]["stdout"] == "b1\n"
    [item] = receiver.received("/item-done")  # the item's own callback: its job only
    assert item.json["paper_id"] == "b2" and item.at < got.at
    batch_view = wait_until(lambda: (lambda b: b if b["callbacks"][0]["state"] == "delivered" else None)(
        hooked.get(f"/batches/{done['batch_id']}").json), timeout=10)
    assert batch_view["callbacks"][0]["url"] == url
    openapi.validate("GET", "/batches/{batch_id}", hooked.get(f"/batches/{done['batch_id']}"))


def test_a_receiver_that_hangs_blocks_no_worker_and_no_request(hooked, receiver):
    url = receiver.route("/hangs", delay=5)
    hooked.post("/jobs", {"paper_id": "slowhook", "code": "print(1)", "callback_url": url})
    wait_until(lambda: receiver.received("/hangs"), timeout=15)
    start = time.monotonic()
    for i in range(3):
        assert hooked.post("/execute", {"paper_id": f"meanwhile{i}", "code": "print(1)"}).json["success"]
    assert time.monotonic() - start < 5


@pytest.mark.parametrize("url,fragment", [
    ("http://10.0.0.1/hook", "not on this service's callback allow-list"),
    ("http://169.254.169.254/latest/meta-data/", "not on this service's callback allow-list"),
    ("http://127.0.0.1@evil.example/hook", "not on this service's callback allow-list"),
    ("http://127.0.0.1.evil.example/hook", "not on this service's callback allow-list"),
    ("ftp://127.0.0.1/hook", "http:// or https://"),
    ("file:///etc/passwd", "http:// or https://"),
    ("http://127.0.0.1:99999/x", "not a valid URL"),
    ("http://127.0.0.1/a b", "without spaces"),
    (5, "must be a string"),
])
def test_callback_urls_off_the_allow_list_are_refused(hooked, openapi, url, fragment):  # noqa: F811
    for path, body in (("/execute", {"code": "print(1)", "callback_url": url}),
                       ("/jobs", {"batch": [{"paper_id": "a", "code": "x"}], "callback_url": url}),
                       ("/execute_batch", {"batch": [{"paper_id": "a", "code": "x", "callback_url": url}]})):
        resp = hooked.post(path, body)
        assert resp.status == 400 and fragment in resp.json["error"], (path, resp.json)
        openapi.validate("POST", path, resp)


def test_allow_list_entries_match_hosts_ports_and_subdomains():
    allowed = ("hooks.example.com", "*.internal.example", "10.0.0.7:8080", "[::1]")
    assert validation.host_allowed("HOOKS.example.com", 443, allowed)
    assert validation.host_allowed("a.b.internal.example", 80, allowed)
    assert not validation.host_allowed("internal.example", 80, allowed)
    assert not validation.host_allowed("evilinternal.example", 80, allowed)
    assert validation.host_allowed("10.0.0.7", 8080, allowed)
    assert not validation.host_allowed("10.0.0.7", 80, allowed)
    assert validation.host_allowed("::1", 80, allowed)


def _config(env: dict[str, str], argv: list[str] | None = None):
    parser = argparse.ArgumentParser(allow_abbrev=False)
    add_arguments(parser)
    return from_sources(parser.parse_args(argv or []), env)


def test_callbacks_need_a_secret_which_is_never_a_flag_nor_shown(tmp_path):
    with pytest.raises(ConfigError, match="EXECUTOR_CALLBACK_SECRET"):
        _config({"EXECUTOR_CALLBACK_HOSTS": "hooks.example.com"})
    with pytest.raises(SystemExit):
        _config({}, ["--callback-secret", "x"])
    secret_file = tmp_path / "secret"
    secret_file.write_text("from-a-file\n")
    config = _config({"EXECUTOR_CALLBACK_HOSTS": "hooks.example.com",
                      "EXECUTOR_CALLBACK_SECRET_FILE": str(secret_file)})
    assert config.callback_secret == "from-a-file" and "from-a-file" not in repr(config)
    with pytest.raises(ConfigError, match="callback_hosts"):
        _config({"EXECUTOR_CALLBACK_HOSTS": "http://x/y", "EXECUTOR_CALLBACK_SECRET": "s"})


def test_job_code_never_sees_the_callback_secret(hooked):
    code = ("import os, pathlib\nprint(sorted(os.environ.items()))\n"
            "print(pathlib.Path('/proc/self/environ').read_bytes())\n")
    body = hooked.post("/execute", {"code": code}).json
    assert body["success"], body["stderr"]
    assert SECRET not in body["stdout"] and "CALLBACK" not in body["stdout"]


def test_undelivered_callbacks_survive_a_restart(tmp_path, receiver):
    from conftest import reachable_by_jobs

    work = reachable_by_jobs(tmp_path / "work")
    args = ["--callback-hosts", "127.0.0.1", "--callback-backoff", "0.2", "--callback-attempts", "50"]
    env = {"EXECUTOR_CALLBACK_SECRET": SECRET}
    url = receiver.route("/after-restart", statuses=[503])
    srv = Server(work, args=args, env=env).start()
    try:
        job_id = srv.post("/jobs", {"paper_id": "restart", "code": "print('kept')",
                                    "callback_url": url}).json["job_id"]
        wait_until(lambda: any(c["attempts"] >= 2 for c in _callbacks(srv, job_id)), timeout=30)
        assert srv.stop() == 0
    finally:
        srv.kill_tree()
    receiver.route("/after-restart", statuses=[200])
    srv2 = Server(work, args=args, env=env).start()
    try:
        state = _delivered(srv2, job_id)
        assert state["state"] == "delivered" and state["attempts"] >= 3
        last = receiver.received("/after-restart")[-1]
        assert last.signed_with(SECRET) and last.json["stdout"] == "kept\n"
    finally:
        srv2.close()


def test_a_server_without_callback_hosts_refuses_any_callback_url(other_server):
    resp = other_server.post("/execute", {"code": "print(1)", "callback_url": "http://127.0.0.1/x"})
    assert resp.status == 400 and "sends no callbacks" in resp.json["error"]


@pytest.fixture(scope="module")
def other_server(tmp_path_factory):
    srv = start_server(tmp_path_factory, "nohooks")
    yield srv
    srv.close()
