"""The service's life: SIGTERM drains and leaves nothing behind; kill -9 loses nothing."""

from __future__ import annotations

import importlib.util
import json
import signal
import sqlite3
import threading
import time

import psutil
import pytest
from conftest import reachable_by_jobs, wait_until
from service_fixtures import Server

pytestmark = pytest.mark.timeout(150)


def _wait_running(srv: Server, job_id: str, timeout: float = 15) -> None:
    deadline = time.monotonic() + timeout
    while srv.get(f"/jobs/{job_id}").json["status"] != "running":
        assert time.monotonic() < deadline, f"job {job_id} never started"
        time.sleep(0.05)


def _statuses(work_dir) -> dict[str, str]:
    db = sqlite3.connect(str(work_dir / "jobs.sqlite3"))
    try:
        return dict(db.execute("SELECT paper_id, status FROM jobs"))
    finally:
        db.close()


def _alive(procs: list[psutil.Process]) -> list[psutil.Process]:
    out = []
    for p in procs:
        try:
            if p.is_running() and p.status() != psutil.STATUS_ZOMBIE:
                out.append(p)
        except psutil.NoSuchProcess:
            pass
    return out


def test_sigterm_drains_running_jobs_keeps_queued_and_leaves_no_process(tmp_path):
    work = reachable_by_jobs(tmp_path / "work")
    srv = Server(work).start()
    try:
        batch = [{"paper_id": "run1", "code": "import time; time.sleep(1.5); print('finished')"},
                 {"paper_id": "run2", "code": "import time; time.sleep(1.5); print('finished')"},
                 {"paper_id": "waits", "code": "print('after restart')"}]
        accepted = srv.post("/jobs", {"batch": batch}).json
        sync_result: dict = {}
        sync = threading.Thread(target=lambda: sync_result.update(
            srv.post("/execute", {"paper_id": "sync", "code": "print('sync')"}).json))
        _wait_running(srv, accepted["job_ids"]["run1"])
        _wait_running(srv, accepted["job_ids"]["run2"])
        sync.start()
        wait_until(lambda: "sync" in _statuses(work))  # accepted and stored
        procs = srv.descendants()
        assert len(procs) >= 3  # template + 2 workers
        started = time.monotonic()
        assert srv.stop(signal.SIGTERM, timeout=30) == 0
        assert time.monotonic() - started < 5 + 10  # grace (5 s) plus a margin
        psutil.wait_procs(procs, timeout=5)
        assert not _alive(procs), f"left behind: {_alive(procs)}"
        sync.join(10)
        statuses = _statuses(work)
        assert statuses["run1"] == statuses["run2"] == "completed"
        assert statuses["waits"] == "queued" and statuses["sync"] == "queued"
        assert "error" in sync_result  # told to fetch it later, not left hanging
        lines = [line for line in srv.read_log(tail=None).splitlines() if line.strip()]
        messages = [json.loads(line)["msg"] for line in lines]  # every line is one JSON object
        assert "shutting down" in messages and messages[-1] == "stopped"

        # Started again on the same work dir, the queued jobs run.
        srv2 = Server(work).start()
        try:
            done = srv2.wait_batch(accepted["batch_id"], timeout=30)
            assert done["results"]["run1"]["stdout"] == "finished\n"
            assert done["results"]["waits"]["stdout"] == "after restart\n"
        finally:
            srv2.close()
    finally:
        srv.kill_tree()


def test_kill_9_then_restart_loses_no_job(tmp_path):
    work = reachable_by_jobs(tmp_path / "work")
    srv = Server(work).start()
    try:
        before = srv.post("/jobs", {"code": "print('before')", "paper_id": "before"}).json
        srv.wait_batch(before["batch_id"])
        batch = [{"paper_id": "long1", "code": "import time; time.sleep(60)"},
                 {"paper_id": "long2", "code": "import time; time.sleep(60)"},
                 {"paper_id": "queued1", "code": "print('q1')"},
                 {"paper_id": "queued2", "code": "print('q2')"}]
        accepted = srv.post("/jobs", {"batch": batch}).json
        _wait_running(srv, accepted["job_ids"]["long1"])
        _wait_running(srv, accepted["job_ids"]["long2"])
        procs = srv.descendants()
        srv.proc.kill()
        srv.proc.wait(10)
        # The pool's processes notice their parent is gone (EOF on their pipe) and exit.
        gone, alive = psutil.wait_procs(procs, timeout=15)
        assert not _alive(alive), f"orphans after kill -9: {alive}"
    finally:
        srv.kill_tree()

    srv2 = Server(work).start()
    try:
        done = srv2.wait_batch(accepted["batch_id"], timeout=30)
        r = done["results"]
        assert r["long1"]["status"] == r["long2"]["status"] == "interrupted"
        assert r["long1"]["error_type"] == "interrupted"
        assert r["queued1"]["stdout"] == "q1\n" and r["queued2"]["stdout"] == "q2\n"
        old = srv2.get(f"/jobs/{before['job_ids']['before']}").json
        assert old["status"] == "completed" and old["stdout"] == "before\n"
    finally:
        srv2.close()


@pytest.mark.skipif(importlib.util.find_spec("torch_neuronx") is not None,
                    reason="needs a machine without torch_neuronx")
def test_health_is_503_with_the_reason_when_the_pool_is_broken(tmp_path):
    work = reachable_by_jobs(tmp_path / "work")
    srv = Server(work, args=["--backend", "neuron", "--pool-size", "1"]).start(wait=False)
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                resp = srv.get("/health?verbose=1")
            except OSError:
                resp = None
            if resp is not None:
                assert resp.status == 503
                assert resp.json["status"] == "unhealthy" and resp.json["neuron_available"] is False
                if resp.json["pool"]["state"] == "broken":
                    break
                assert "starting" in resp.json["reason"]
            assert time.monotonic() < deadline, "pool never declared itself broken"
            time.sleep(0.2)
        assert "torch_neuronx" in resp.json["reason"]
        public = srv.get("/health").json  # anyone sees that it is broken, not the traceback
        assert public["pool"]["state"] == "broken" and "verbose" in public["reason"]
        assert "torch_neuronx" not in public["reason"] and "Traceback" not in public["reason"]
        refused = srv.post("/execute", {"code": "print(1)"})
        assert refused.status == 503 and "pool is broken" in refused.json["error"]
        assert srv.post("/jobs", {"code": "print(1)"}).status == 503
    finally:
        srv.close()
