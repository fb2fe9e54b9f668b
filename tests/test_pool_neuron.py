"""The neuron backend's code paths, with a fake torch_neuronx and a fake sysfs tree.

There is no Trainium here. The fake torch_neuronx (tests/neuron_fakes.py) is imported by
the template like the real one; it wraps torch_xla.device() so that each worker records
the environment its runtime would start with (NEURON_RT_VISIBLE_CORES, the tag, the
compile cache flags, the profiler's settings) and whether the XLA runtime had already
started, then runs on the CPU PJRT device. Started with the profiler's settings it writes
what the Neuron runtime writes; a fake `neuron-profile` on PATH converts that for Perfetto.
"""

from __future__ import annotations

import json
import os
import uuid

import psutil
import pytest
from conftest import wait_until
from neuron_fakes import FAKE_TORCH_NEURONX, build_fake_libnrt, install_fake_neuron_profile

from warm_pool import JobSpec, neuron


def _counter_dir(sysfs, core):
    return neuron.core_sysfs_dir(core, sysfs, 2) / "stats" / "memory_usage" / "device_mem"


def start_neuron_pool(make_pool, tmp_path, **kw):
    """A neuron pool on the fakes (two cores unless `kw` says otherwise)."""
    site = tmp_path / "site"
    (site / "torch_neuronx").mkdir(parents=True)
    (site / "torch_neuronx" / "__init__.py").write_text(FAKE_TORCH_NEURONX)
    has_libnrt = build_fake_libnrt(site)
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
    kw = {"pool_size": 2, "neuron_cores": (0, 1), **kw}
    pool = make_pool(
        backend="neuron", neuron_sysfs_root=sysfs, neuron_cache_dir=cache, neuron_cache_max_mb=123,
        # The fake first; then what the suite runs on (this checkout, not an installed copy).
        extra_env=(("PYTHONPATH", os.pathsep.join(filter(None, [str(site), os.environ.get("PYTHONPATH")]))),
                   ("FAKE_NEURON_RECORD_DIR", str(records)), ("NEURON_RT_NUM_CORES", "2")), **kw)
    pool.records, pool.sysfs, pool.cache, pool.has_libnrt = records, sysfs, cache, has_libnrt
    return pool


@pytest.fixture
def neuron_pool(make_pool, tmp_path):
    return start_neuron_pool(make_pool, tmp_path)


def _records(pool):
    return {int(p.stem): json.loads(p.read_text()) for p in pool.records.glob("*.json")}


def test_each_worker_owns_one_core_set_before_its_runtime_starts(neuron_pool):
    stats = neuron_pool.pool.stats().to_json()
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
        assert record["NEURON_RT_INSPECT_ENABLE"] is None  # no job asked for a profile


def test_stale_compile_locks_are_cleared_and_cache_reported(neuron_pool):
    assert not list(neuron_pool.cache.rglob("*.lock"))
    cache = neuron_pool.pool.stats().detail["neuron"]["compile_cache"]
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
    wait_until(lambda: victim not in [w["pid"] for w in neuron_pool.pool.stats().workers])
    neuron_pool.wait_full()
    replacement = next(w for w in neuron_pool.pool.stats().workers if w["core"] == core)
    record = _records(neuron_pool)[replacement["pid"]]
    assert record["NEURON_RT_VISIBLE_CORES"] == str(core)
    assert record["same_uid_processes"] == []  # nothing of the last holder when its runtime started
    assert not os.path.exists(f"/proc/{grandchild}") or "Z" in open(f"/proc/{grandchild}/stat").read()


# --- a Neuron profile per job (issue 20) --------------------------------------------------

# Runs on its NeuronCore and prints the profiler's variables it sees.
USES_THE_CORE = (
    "import os, torch, torch_xla\n"
    "print((torch.ones(2, device=torch_xla.device()) * 2).sum().item())\n"
    "print(sorted(k for k in os.environ if k.startswith('NEURON_RT_INSPECT')))\n")


@pytest.fixture
def one_core(make_pool, tmp_path, monkeypatch):
    """A neuron pool of one core (every job on the same slot), the fake neuron-profile on
    PATH, and the service's environment holding a token and the profiler's switch (neither
    may reach a job or the tool)."""
    bin_dir = tmp_path / "bin"
    install_fake_neuron_profile(bin_dir)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("EXECUTOR_API_TOKEN", "service-secret")
    monkeypatch.setenv("NEURON_RT_INSPECT_ENABLE", "1")
    pool = start_neuron_pool(make_pool, tmp_path, pool_size=1, neuron_cores=(0,),
                             neuron_profile_convert_timeout=3)
    pool.bin = bin_dir
    return pool


def _run(handle, code: str, profile: bool):
    spec = JobSpec(code=code, job_id=f"p-{uuid.uuid4().hex[:12]}", timeout=60, profile=profile)
    return handle.pool.submit(spec).result(timeout=120)


def test_a_profiled_job_gets_a_runtime_started_for_it_and_its_profile_as_artifacts(one_core):
    result = _run(one_core, USES_THE_CORE, profile=True)
    assert result.success, result.stderr
    assert result.stdout.splitlines() == ["4.0", str(sorted(
        ["NEURON_RT_INSPECT_DEVICE_PROFILE", "NEURON_RT_INSPECT_ENABLE", "NEURON_RT_INSPECT_OUTPUT_DIR"]))]
    job_dir = one_core.pool.config.jobs_dir / result.job_id
    record = _records(one_core)[result.worker.pid]
    assert record["NEURON_RT_INSPECT_OUTPUT_DIR"] == str(job_dir / "neuron-profile")
    assert record["NEURON_RT_INSPECT_ENABLE"] == record["NEURON_RT_INSPECT_DEVICE_PROFILE"] == "1"
    assert record["NEURON_RT_VISIBLE_CORES"] == "0" and record["runtime_started_before"] is False
    assert record["same_uid_processes"] == []  # the spare that held the core was gone first
    assert result.profile == "captured", result.profile_detail
    assert result.to_dict()["profile"] == "captured"
    run = f"neuron-profile/i-0fake_pid_{result.worker.pid}"
    traces = "neuron-profile/perfetto"
    expected = {f"{run}/neff_4242.neff", f"{run}/4242_instid_0_vnc_0.ntff",
                f"{traces}/device_profile_model_4242.pftrace"}
    if one_core.has_libnrt:  # the system profile, written by the runtime's close after the job
        expected |= {f"{run}/ntrace.pb", f"{run}/trace_info.pb", f"{traces}/system_profile.pftrace"}
    assert {a.name for a in result.artifacts} == expected
    kept = one_core.pool.config.artifacts_dir / result.job_id
    assert (kept / run / "4242_instid_0_vnc_0.ntff").read_bytes() == b"fake ntff of core 0"
    assert (kept / traces / "device_profile_model_4242.pftrace").read_text() == "perfetto: neff_4242\n"
    assert f"converted for Perfetto: {traces}/" in result.profile_detail
    # The tool ran on the service's copy, in a directory of its own, without the service's environment.
    cwd, argv = (one_core.bin / "neuron-profile.calls").read_text().splitlines()[-1].split("|")
    assert argv == f"view -d {kept / 'neuron-profile'} --output-format perfetto"
    assert not os.path.exists(cwd)
    assert "service-secret" not in (one_core.bin / "neuron-profile.env").read_text()
    # What it cost: the ready spare holding the core was retired for the job.
    assert one_core.pool.stats().respawns_by_reason["profiling"] >= 1


def test_an_unprofiled_job_right_after_on_the_same_core_has_no_profile_nor_the_profilers_settings(one_core):
    profiled = _run(one_core, USES_THE_CORE, profile=True)
    plain = _run(one_core, USES_THE_CORE, profile=False)
    assert profiled.profile == "captured", profiled.profile_detail
    assert plain.worker.core == profiled.worker.core == 0 and plain.worker.pid != profiled.worker.pid
    assert plain.success and plain.stdout.splitlines() == ["4.0", "[]"]
    record = _records(one_core)[plain.worker.pid]
    assert record["NEURON_RT_INSPECT_ENABLE"] is None and record["NEURON_RT_INSPECT_OUTPUT_DIR"] is None
    assert plain.profile is None and plain.profile_detail is None
    assert plain.artifacts == []
    assert not (one_core.pool.config.artifacts_dir / plain.job_id).exists()
    # Nor did the spares opened since the profiled job (the service's own switch is not theirs).
    started_after = [r for pid, r in _records(one_core).items() if pid != profiled.worker.pid]
    assert started_after and all(r["NEURON_RT_INSPECT_ENABLE"] is None for r in started_after)


def test_neuron_profile_failing_hanging_or_missing_is_reported_and_the_profile_kept(one_core, monkeypatch):
    (one_core.bin / "neuron-profile.mode").write_text("fail")
    failed = _run(one_core, USES_THE_CORE, profile=True)
    assert failed.success and failed.profile == "captured"
    assert ("not converted for Perfetto: neuron-profile view exited with status 3: "
            "ERRO[0000] cannot read the profile: bad magic") in failed.profile_detail
    assert not [a for a in failed.artifacts if a.name.endswith(".pftrace")]

    (one_core.bin / "neuron-profile.mode").write_text("hang")
    hung = _run(one_core, USES_THE_CORE, profile=True)
    assert hung.success and hung.profile == "captured"
    assert "neuron-profile view was stopped after 3 s (neuron_profile_convert_timeout)" in hung.profile_detail
    child = psutil.Process(int((one_core.bin / "neuron-profile.child").read_text()))  # what the tool started
    wait_until(lambda: not child.is_running() or child.status() == psutil.STATUS_ZOMBIE, timeout=10)

    monkeypatch.setenv("PATH", os.environ["PATH"].split(os.pathsep, 1)[1])
    missing = _run(one_core, USES_THE_CORE, profile=True)
    assert missing.profile == "captured"
    assert "not converted for Perfetto: neuron-profile is not installed" in missing.profile_detail
    assert any(a.name.endswith("4242_instid_0_vnc_0.ntff") for a in missing.artifacts)


def test_a_runtime_that_will_not_start_with_the_profiler_lets_the_job_run_without_it(one_core):
    (one_core.records / "refuse-profiler").write_text("")
    result = _run(one_core, USES_THE_CORE, profile=True)
    assert result.success and result.stdout.splitlines() == ["4.0", "[]"]
    assert result.profile == "unavailable"
    assert result.profile_detail.startswith(
        "its Neuron runtime did not start with the profiler on (2 processes tried")
    stats = one_core.pool.stats().to_json()
    assert stats["state"] == "ready" and stats["respawns"]["by_reason"]["start_failed"] == 2
    (one_core.records / "refuse-profiler").unlink()
    assert _run(one_core, USES_THE_CORE, profile=True).profile == "captured"
