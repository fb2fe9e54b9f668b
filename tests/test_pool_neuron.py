"""The neuron backend's code paths, with a fake torch_neuronx and a fake sysfs tree.

There is no Trainium here. The fake torch_neuronx is imported by the template like the
real one; it wraps torch_xla.device() so that each worker records the environment its
runtime would start with (NEURON_RT_VISIBLE_CORES, the tag, the compile cache flags)
and whether the XLA runtime had already started, then runs on the CPU PJRT device.
"""

from __future__ import annotations

import json
import os
import textwrap

import pytest
from conftest import wait_until

from warm_pool import neuron

FAKE_TORCH_NEURONX = textwrap.dedent('''
    """Fake torch_neuronx: records what each worker's runtime start would see."""
    import json, os
    import torch_xla
    import torch_xla.runtime

    RECORD_DIR = os.environ["FAKE_NEURON_RECORD_DIR"]
    _real_device = torch_xla.device
    __version__ = "2.9.0.2.0+fake"

    def _device(*args, **kwargs):
        path = os.path.join(RECORD_DIR, f"{os.getpid()}.json")
        if not os.path.exists(path):  # the first call: the one that starts the runtime
            record = {name: os.environ.get(name) for name in (
                "NEURON_RT_VISIBLE_CORES", "NEURON_PROCESS_TAG", "NEURON_RT_LOG_LEVEL",
                "NEURON_COMPILE_CACHE_URL", "NEURON_CC_FLAGS", "PJRT_DEVICE", "NEURON_RT_NUM_CORES")}
            record["runtime_started_before"] = bool(torch_xla._XLAC._xla_runtime_is_initialized())
            # What else of this worker's uid runs as its runtime starts (the core must be free).
            me = os.getuid()
            record["same_uid_processes"] = [
                int(p) for p in os.listdir("/proc") if p.isdigit() and int(p) != os.getpid()
                and os.stat(f"/proc/{p}").st_uid == me
                and "Z" not in open(f"/proc/{p}/stat").read().split()[2]]
            with open(path, "w") as f:
                json.dump(record, f)
        os.environ["PJRT_DEVICE"] = "CPU"  # the stand-in for the NeuronCore
        return _real_device(*args, **kwargs)

    torch_xla.device = _device
''')


def _counter_dir(sysfs, core):
    return neuron.core_sysfs_dir(core, sysfs, 2) / "stats" / "memory_usage" / "device_mem"


@pytest.fixture
def neuron_pool(make_pool, tmp_path):
    site = tmp_path / "site"
    (site / "torch_neuronx").mkdir(parents=True)
    (site / "torch_neuronx" / "__init__.py").write_text(FAKE_TORCH_NEURONX)
    # Where the fake runtime writes: workers are confined to the pool's jobs dir (the
    # pool's first work dir is tmp_path/pool0).
    records = tmp_path / "pool0" / "jobs" / "fake-neuron-records"
    records.mkdir(parents=True)
    records.chmod(0o1777)
    sysfs = tmp_path / "sys"
    for core in (0, 1):
        counters = _counter_dir(sysfs, core)
        counters.mkdir(parents=True)
        for name in ("peak", "present", "total"):
            (counters / name).write_text("0\n")
    cache = tmp_path / "cache"
    stale = cache / "neuronxcc-2.0" / "MODULE_1"
    stale.mkdir(parents=True)
    (stale / "model.hlo_module.pb.lock").write_text("")
    pool = make_pool(
        backend="neuron", pool_size=2, neuron_cores=(0, 1), neuron_sysfs_root=sysfs, neuron_cache_dir=cache,
        neuron_cache_max_mb=123,
        # The fake first; then what the suite runs on (this checkout, not an installed copy).
        extra_env=(("PYTHONPATH", os.pathsep.join(filter(None, [str(site), os.environ.get("PYTHONPATH")]))),
                   ("FAKE_NEURON_RECORD_DIR", str(records)), ("NEURON_RT_NUM_CORES", "2")))
    pool.records, pool.sysfs, pool.cache = records, sysfs, cache
    return pool


def _records(pool):
    return {int(p.stem): json.loads(p.read_text()) for p in pool.records.glob("*.json")}


def test_each_worker_owns_one_core_set_before_its_runtime_starts(neuron_pool):
    stats = neuron_pool.pool.stats()
    assert stats["backend"] == "neuron"
    assert stats["preloaded"][:3] == ["torch", "torch_xla", "torch_neuronx"]
    records = _records(neuron_pool)
    # A core serves one process at a time: each slot's other spares wait, parked, without it.
    by_pid = {w["pid"]: w for w in stats["workers"] if w["state"] in ("idle", "busy")}
    assert {w["state"] for w in stats["workers"]} <= {"idle", "busy", "parked"}
    assert set(records) == set(by_pid)
    assert sorted(r["NEURON_RT_VISIBLE_CORES"] for r in records.values()) == ["0", "1"]
    for pid, record in records.items():
        assert record["NEURON_RT_VISIBLE_CORES"] == str(by_pid[pid]["core"])
        assert record["runtime_started_before"] is False
        assert record["PJRT_DEVICE"] == "NEURON"
        assert record["NEURON_RT_NUM_CORES"] is None  # would contradict the visible core
        assert record["NEURON_PROCESS_TAG"].startswith("trainium-executor-w")
        assert record["NEURON_COMPILE_CACHE_URL"] == str(neuron_pool.cache)
        assert "--retry_failed_compilation" in record["NEURON_CC_FLAGS"]


def test_stale_compile_locks_are_cleared_and_cache_reported(neuron_pool):
    assert not list(neuron_pool.cache.rglob("*.lock"))
    cache = neuron_pool.pool.stats()["neuron"]["compile_cache"]
    assert cache["dir"] == str(neuron_pool.cache)
    assert cache["max_mb"] == 123 and cache["size_mb"] >= 0
    assert (neuron_pool.cache / "neuronxcc-2.0" / "MODULE_1").is_dir()  # the entry stays, its lock went


def test_job_reports_its_cores_device_memory_peak(neuron_pool):
    def device_in_use(job_id, worker):  # the driver's counters while the job runs
        for name in ("peak", "present"):
            (_counter_dir(neuron_pool.sysfs, worker.core) / name).write_text(str(300 * 1024 * 1024))

    code = "import os\nprint(os.environ['NEURON_RT_VISIBLE_CORES'])\n"
    result = neuron_pool.run(code, on_start=device_in_use)
    assert result.stdout.strip() == str(result.worker.core)
    assert result.peak_device_memory_mb == pytest.approx(300)
    assert result.to_dict()["peak_device_memory_mb"] == pytest.approx(300)


def test_a_replacement_takes_the_same_core_only_after_every_process_of_the_last_is_gone(neuron_pool):
    # A job on core 1 leaves a grandchild in a session of its own (still holding the core
    # on a real instance); then its worker dies.
    leftover = neuron_pool.run(
        "import os, subprocess\n"
        "p = subprocess.Popen(['sleep', '300'], start_new_session=True)\n"
        "print(p.pid, os.environ['NEURON_RT_VISIBLE_CORES'], flush=True)\n"
        "os.kill(os.getpid(), 9)\n")  # the worker dies with it
    grandchild, core = (int(x) for x in leftover.stdout.split())
    victim = leftover.worker.pid
    wait_until(lambda: victim not in [w["pid"] for w in neuron_pool.pool.stats()["workers"]])
    neuron_pool.wait_full()
    replacement = next(w for w in neuron_pool.pool.stats()["workers"] if w["core"] == core)
    record = _records(neuron_pool)[replacement["pid"]]
    assert record["NEURON_RT_VISIBLE_CORES"] == str(core)
    assert record["same_uid_processes"] == []  # nothing of the last holder when its runtime started
    assert not os.path.exists(f"/proc/{grandchild}") or "Z" in open(f"/proc/{grandchild}/stat").read()
