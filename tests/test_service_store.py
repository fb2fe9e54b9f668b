"""executor_service.store: the SQLite job store on its own (no server, no pool)."""

from __future__ import annotations

import sqlite3
import threading
import time

from executor_service.store import JobStore


def _job(job_id: str, paper_id: str) -> dict:
    return {"job_id": job_id, "paper_id": paper_id, "code": "print(1)", "timeout": 5.0}


def test_store_uses_wal_and_keeps_jobs_across_reopen(tmp_path):
    path = tmp_path / "jobs.sqlite3"
    store = JobStore(path)
    store.add_batch("b1", "async", [_job("j1", "p1"), _job("j2", "p2")])
    store.close()
    assert sqlite3.connect(path).execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    again = JobStore(path)
    assert [r.paper_id for r in again.get_batch("b1")] == ["p1", "p2"]
    assert again.counts() == {"queued": 2}


def test_an_unsynced_batch_is_committed_and_sync_needs_no_store_lock(tmp_path):
    # The runner commits a batch, starts its jobs, then syncs: the pool's updates (running,
    # finished) must not wait behind that fsync.
    path = tmp_path / "jobs.sqlite3"
    store = JobStore(path)
    store.add_batch("b", "async", [_job("j", "p")], synced=False)
    assert sqlite3.connect(path).execute("SELECT status FROM jobs").fetchall() == [("queued",)]
    synced = threading.Event()
    with store._lock:  # another thread's statement in progress
        threading.Thread(target=lambda: (store.sync(), synced.set()), daemon=True).start()
        assert synced.wait(10)


def test_lifecycle_queued_running_completed(tmp_path):
    store = JobStore(tmp_path / "s.db")
    store.add_batch("b", "async", [_job("j", "p")])
    store.mark_running("j", {"id": 1, "pid": 42, "core": None})
    assert store.get_job("j").status == "running"
    assert store.finish("j", "completed", {"success": True})
    assert not store.finish("j", "cancelled", {})  # a terminal job stays as it is
    row = store.get_job("j")
    assert row.status == "completed" and row.to_public()["success"] is True


def test_recover_interrupts_running_and_keeps_queued(tmp_path):
    store = JobStore(tmp_path / "s.db")
    store.add_batch("b", "async", [_job("run", "a"), _job("wait", "b")])
    store.mark_running("run", None)
    interrupted, queued = store.recover(lambda row: {"error_type": "interrupted"})
    assert (interrupted, queued) == (1, 1)
    assert store.get_job("run").status == "interrupted"
    assert [r.job_id for r in store.queued()] == ["wait"]


def test_cancel_queued_only_touches_queued_jobs(tmp_path):
    store = JobStore(tmp_path / "s.db")
    store.add_batch("b", "async", [_job("q", "a"), _job("r", "b")])
    store.mark_running("r", None)
    assert store.cancel_queued("q", {"error_type": "cancelled"})
    assert not store.cancel_queued("r", {})
    assert store.get_job("q").status == "cancelled"


def test_prune_removes_only_old_finished_batches(tmp_path):
    store = JobStore(tmp_path / "s.db")
    store.add_batch("done", "async", [_job("d", "a")])
    store.finish("d", "completed", {})
    store.add_batch("pending", "async", [_job("p", "a")])
    time.sleep(0.05)
    assert store.prune(older_than_s=3600) == 0
    assert store.prune(older_than_s=0.01) == 1
    assert store.get_batch("done") is None and store.get_job("d") is None
    assert store.get_batch("pending") is not None


def test_a_store_from_before_the_migrations_is_upgraded_in_place(tmp_path):
    path = tmp_path / "old.sqlite3"
    from executor_service.store import _MIGRATIONS, _SCHEMA

    old = sqlite3.connect(path)
    old.executescript(_SCHEMA)  # the first release's schema, user_version 0
    old.execute("INSERT INTO batches VALUES ('b', 1.0, 'async', NULL)")
    old.execute("INSERT INTO jobs(job_id, batch_id, paper_id, paper_title, code, timeout, status, created_at)"
                " VALUES ('j', 'b', 'p', 'Old title', 'print(1)', 5, 'queued', 1.0)")
    old.commit()
    old.close()
    store = JobStore(path)
    [row] = store.get_batch("b")
    assert (row.job_id, row.fields, row.timeout_clamped_from) == ("j", {"paper_title": "Old title"}, None)
    assert row.profile is False
    assert sqlite3.connect(path).execute("PRAGMA user_version").fetchone()[0] == len(_MIGRATIONS)
    store.close()
    JobStore(path).close()  # opening again applies nothing twice


def test_a_job_keeps_whether_it_is_profiled_and_a_profiled_request_joins_only_a_profiled_job(tmp_path):
    store = JobStore(tmp_path / "s.db")
    store.add_batch("plain", "async", [_job("j", "p")])
    assert store.get_job("j").profile is False
    assert store.active_job("p", "print(1)", profile=True) is None
    store.add_batch("profiled", "async", [{**_job("k", "p"), "profile": True}])
    assert store.get_job("k").profile is True
    assert store.queued()[1].profile is True
    assert store.active_job("p", "print(1)", profile=True).job_id == "k"
    assert store.active_job("p", "print(1)").job_id == "k"  # the newest; a profile does no harm
    store.close()


def test_a_batch_can_join_another_batchs_job_and_pruning_waits_for_both(tmp_path):
    store = JobStore(tmp_path / "s.db")
    store.add_batch("first", "async", [_job("j", "p")])
    assert store.active_job("p", "print(1)").job_id == "j"
    assert store.active_job("p", "print(2)") is None
    store.add_batch("second", "async", [{"job_id": "j", "paper_id": "p", "deduplicated": True},
                                        _job("k", "q")])
    assert [(r.job_id, r.deduplicated) for r in store.get_batch("second")] == [("j", True), ("k", False)]
    store.finish("j", "completed", {})
    assert store.active_job("p", "print(1)") is None
    time.sleep(0.05)
    assert store.prune(older_than_s=0.01) == 0  # "second" still waits for k, and "first" for it
    store.finish("k", "completed", {})
    time.sleep(0.05)
    assert store.prune(older_than_s=0.01) == 2


def test_what_each_request_asks_reads_the_active_jobs_not_the_history(tmp_path):
    # active_job and count run on every accepted request; a paper's (or the store's) history
    # must not make them slower.
    store = JobStore(tmp_path / "s.db")
    for i in range(3):
        store.add_batch(f"old{i}", "async", [_job(f"old{i}", "p")])
        store.finish(f"old{i}", "completed", {})
    store.add_batch("now", "async", [_job("now", "p")])
    assert store.active_job("p", "print(1)").job_id == "now"
    assert (store.count("queued"), store.count("completed")) == (1, 3)
    asked: list[str] = []
    store._db.set_trace_callback(asked.append)  # the statements as run, values bound
    store.active_job("p", "print(1)")
    store.count("queued")
    store._db.set_trace_callback(None)
    db = sqlite3.connect(tmp_path / "s.db")
    assert len(asked) == 2
    for sql in asked:
        plan = " ".join(r[3] for r in db.execute("EXPLAIN QUERY PLAN " + sql))
        assert "jobs_by_status (status=?)" in plan, plan
    store.close()


def test_callback_jobs_are_the_jobs_waiting_callbacks_wait_for(tmp_path):
    # What a restarted runner watches: a job's callback waits for that job, a batch's for
    # every job of the batch (a joined one too); a callback already due waits for nothing.
    store = JobStore(tmp_path / "s.db")
    store.add_batch("one", "async", [_job("j", "p"), _job("k", "q")], callbacks=[("j", "http://h/1")])
    store.add_batch("all", "async", [{"job_id": "k", "paper_id": "q", "deduplicated": True}, _job("m", "r")],
                    callbacks=[(None, "http://h/2")])
    store.add_batch("done", "async", [_job("n", "s")], callbacks=[("n", "http://h/3")])
    store.finish("n", "completed", {})
    store.promote_callbacks(time.time())
    assert store.callback_jobs() == {"j", "k", "m"}
    store.close()
