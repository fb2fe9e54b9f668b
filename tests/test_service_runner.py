"""executor_service.jobs.JobRunner on a real pool and store, without HTTP."""

from __future__ import annotations

import time

import pytest

from executor_service.config import ServiceConfig
from executor_service.jobs import JobRunner
from executor_service.metrics import Metrics
from executor_service.store import JobStore
from executor_service.validation import Item, Request
from warm_pool import PoolConfig

pytestmark = pytest.mark.timeout(120)


@pytest.fixture
def runner(shared_pool, tmp_path):
    store = JobStore(tmp_path / "jobs.sqlite3")
    config = ServiceConfig(pool=PoolConfig(work_dir=tmp_path, backend="cpu"))
    runner = JobRunner(shared_pool.pool, store, config, Metrics(shared_pool.pool.stats, store.counts))
    yield runner
    runner.webhooks.shutdown(timeout=1)
    store.close()


def test_a_job_the_store_refuses_leaves_nothing_registered(runner):
    # Validation refuses such text with a 400; the runner must not rely on it.
    unstorable = Request(items=(Item(paper_id="p", code="print(1)", paper_title="\ud800"),),
                         timeout=10, is_batch=False)
    with pytest.raises(UnicodeEncodeError):
        runner.accept(unstorable, "async")
    assert runner._done_events == {} and runner.store.counts() == {}

    ok = Request(items=(Item(paper_id="p", code="print('stored')"),), timeout=10, is_batch=False)
    [job_id] = runner.accept(ok, "sync").job_ids
    assert runner.wait([job_id], timeout=60)
    assert runner.store.get_job(job_id).result["stdout"] == "stored\n"
    assert runner._done_events == {}


def _ended(runner, job_id: str) -> None:
    """Wait until the runner has done everything it does at the job's end."""
    assert runner.wait([job_id], timeout=60)
    deadline = time.monotonic() + 10
    while job_id in runner._submitted and time.monotonic() < deadline:
        time.sleep(0.01)


def test_a_jobs_end_wakes_the_dispatch_loop_and_the_deliverer_only_when_they_have_work(runner):
    # Their passes query the store (the deliverer's writes): at a job's end they would run
    # beside the request fetching the result. Nothing waits outside the pool here, and
    # only the second job has a callback.
    woken = runner.webhooks._wake
    [plain] = runner.accept(Request(items=(Item(paper_id="a", code="pass"),), timeout=10,
                                    is_batch=False), "async").job_ids
    woken.clear()
    _ended(runner, plain)
    assert not woken.is_set() and not runner._wake.is_set()
    hooked = Request(items=(Item(paper_id="b", code="pass", callback_url="http://127.0.0.1:9/cb"),),
                     timeout=10, is_batch=False)
    [job_id] = runner.accept(hooked, "async").job_ids
    woken.clear()
    _ended(runner, job_id)
    assert woken.is_set() and runner._callback_jobs == set()
