"""Backends for real: xla with PJRT_DEVICE=CPU (the stand-in for neuron), and a broken pool."""

from __future__ import annotations

import pytest
from conftest import job_uid_base, reachable_by_jobs, start_pool

from warm_pool import JobSpec, PoolConfig, WarmPool, errors

XLA_JOB = (
    "import os, torch, torch_xla\n"
    "d = torch_xla.device()\n"
    "x = torch.ones(64, 64, device=d)\n"
    "print(str(d).split(':')[0], (x @ x).sum().item())\n"
)


@pytest.fixture(scope="module")
def xla_pool(tmp_path_factory):
    handle = start_pool(tmp_path_factory.mktemp("xla"), backend="xla", pool_size=2)
    yield handle
    handle.pool.shutdown(grace=5)


def test_xla_template_preloads_torch_xla(xla_pool):
    stats = xla_pool.pool.stats().to_json()
    assert stats["backend"] == "xla"
    assert stats["preloaded"][:2] == ["torch", "torch_xla"]  # the backend's own, then the optional ones
    for worker in stats["workers"]:
        assert worker["preloaded"][:2] == ["torch", "torch_xla"]
        assert worker["device"].startswith("xla")


def test_two_xla_workers_run_device_ops_side_by_side(xla_pool):
    futures = [xla_pool.pool.submit(JobSpec(code=XLA_JOB + "import time; time.sleep(0.5)", job_id=f"x{i}"))
               for i in range(2)]
    results = [f.result(timeout=120) for f in futures]
    assert [r.stdout for r in results] == ["xla 262144.0\n"] * 2
    assert len({r.worker.pid for r in results}) == 2
    # They overlapped: each started before the other finished.
    assert results[0].started_at < results[1].finished_at and results[1].started_at < results[0].finished_at


def test_xla_worker_is_replaced_after_a_crash(xla_pool):
    crashed = xla_pool.run("import os; os._exit(3)")
    assert crashed.return_code == 3
    xla_pool.wait_full()
    assert xla_pool.run(XLA_JOB).stdout == "xla 262144.0\n"


def test_auto_picks_xla_when_torch_xla_imports(make_pool):
    pool = make_pool(backend="auto")
    assert pool.pool.stats().backend == "xla"


def test_template_import_failure_breaks_the_pool_at_once_and_it_retries_slowly(tmp_path):
    pool = WarmPool(PoolConfig(backend="cpu", pool_size=2, work_dir=reachable_by_jobs(tmp_path),
                               job_uid_base=job_uid_base(),
                               backend_preload=("torch", "no_such_module_anywhere"))).start()
    try:
        assert pool.wait_ready(60) is False
        stats = pool.stats().to_json()
        assert stats["state"] == "broken"
        assert "no_such_module_anywhere" in stats["broken_reason"]
        with pytest.raises(errors.PoolBroken):
            pool.submit(JobSpec(code="pass", job_id="x"))
        # The template is gone, no worker was spawned, and the next template starts only
        # after the broken pool's wait (seconds, not a respawn loop).
        assert stats["workers"] == [] and stats["template_pid"] is None
        assert stats["starts"]["failed_in_a_row"] == stats["starts"]["max_failures"]
        assert stats["starts"]["retry_in_s"] >= 2
    finally:
        pool.shutdown(grace=1)


def test_bad_settings_are_rejected_by_name(tmp_path):
    from warm_pool.config import ConfigError

    with pytest.raises(ConfigError, match="backend"):
        PoolConfig(backend="gpu", work_dir=tmp_path).validate()
    with pytest.raises(ConfigError, match="max_memory_mb"):
        PoolConfig(max_memory_mb=-1, work_dir=tmp_path).validate()
    with pytest.raises(ConfigError, match="default_timeout"):
        PoolConfig(default_timeout=float("nan"), work_dir=tmp_path).validate()


def test_submit_rejects_unsafe_job_ids(shared_pool):
    for bad in ("../escape", "a/b", "", "x" * 129, "..", ".", "job\n"):
        with pytest.raises(ValueError, match="job_id must match"):
            shared_pool.pool.submit(JobSpec(code="pass", job_id=bad))


def test_workers_failing_to_start_break_the_pool_after_backoff(tmp_path):
    pool = WarmPool(PoolConfig(backend="xla", pool_size=1, work_dir=reachable_by_jobs(tmp_path),
                               job_uid_base=job_uid_base(), max_start_failures=3,
                               extra_env=(("PJRT_DEVICE", "NO_SUCH_DEVICE"),))).start()
    try:
        assert pool.wait_ready(60) is False
        stats = pool.stats().to_json()
        assert stats["state"] == "broken"
        assert "starts failed in a row" in stats["broken_reason"]
        assert "NO_SUCH_DEVICE" in stats["broken_reason"]  # what the worker reported
        assert set(stats["respawns"]["by_reason"]) == {"start_failed"}
        assert stats["starts"]["failed_in_a_row"] >= 3 and stats["starts"]["killed_total"] == 0
    finally:
        pool.shutdown(grace=1)


def test_workers_share_the_cores_instead_of_oversubscribing_them(make_pool):
    import os

    pool = make_pool(pool_size=2, threads_per_worker=None)
    expected = max(1, (os.cpu_count() or 1) // 2)
    result = pool.run("import os, torch\nprint(torch.get_num_threads(), os.environ['OMP_NUM_THREADS'])")
    assert result.stdout.split() == [str(expected), str(expected)]


def test_threads_per_worker_zero_leaves_torch_default(make_pool):
    import os

    pool = make_pool(pool_size=2, threads_per_worker=0)
    result = pool.run("import torch\nprint(torch.get_num_threads())")
    assert int(result.stdout) == (os.cpu_count() or 1)
