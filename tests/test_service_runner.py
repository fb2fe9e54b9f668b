"""executor_service.jobs.JobRunner on a real pool and store, without HTTP."""

from __future__ import annotations

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
