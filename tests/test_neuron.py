"""warm_pool.neuron against realistic fakes: a neuron-ls script, /dev, sysfs, a compile cache,
a profile capture and a neuron-profile script.

The neuron-ls output is the documented ``--json-output`` shape as captured on a
trn1.2xlarge (one device, two NeuronCores); the sysfs tree follows the Neuron Sysfs User
Guide; the cache layout follows the Neuron Persistent Cache guide; the capture and
neuron-profile's Perfetto output follow the Neuron Profiler 2.0 guide.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import psutil
import pytest
from conftest import wait_until
from neuron_fakes import install_fake_neuron_profile

from warm_pool import ConfigError, job_env, neuron
from warm_pool.neuron import profile

TRN1_2XLARGE = [{
    "neuron_device": 0,
    "bdf": "0000:00:1e.0",
    "cpu_affinity": "0-7",
    "numa_node": "-1",
    "connected_to": None,
    "nc_count": 2,
    "memory_size": 34359738368,
    "neuroncore_ids": [0, 1],
    "neuron_processes": [],
}]


def write_fake_neuron_ls(bin_dir: Path, output: str, *, exit_code: int = 0,
                         only_new_flag: bool = False) -> Path:
    """A neuron-ls on PATH that prints ``output`` for --json-output and logs its argv."""
    bin_dir.mkdir(parents=True, exist_ok=True)
    out_file = bin_dir / "neuron-ls.out"
    out_file.write_text(output)
    accepted = '"$1" = "--output-format"' if only_new_flag else '"$1" = "--json-output"'
    script = bin_dir / "neuron-ls"
    script.write_text(
        "#!/bin/sh\n"
        f'echo "$*" >> "{bin_dir}/neuron-ls.calls"\n'
        f"if [ {accepted} ]; then cat \"{out_file}\"; exit {exit_code}; fi\n"
        'echo "neuron-ls: unrecognized option" >&2; exit 2\n'
    )
    script.chmod(0o755)
    return script


@pytest.fixture
def fake_path(tmp_path, monkeypatch):
    """A bin dir put first on PATH."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    return bin_dir


def make_dev(tmp_path: Path, count: int) -> Path:
    dev = tmp_path / "dev"
    dev.mkdir()
    for i in range(count):
        (dev / f"neuron{i}").touch()
    (dev / "null").touch()
    (dev / "neuron_extra").touch()
    return dev


def make_core_counters(sysfs: Path, device: int, core: int, *, present: int, total: int, peak: int) -> Path:
    base = (sysfs / "devices/virtual/neuron_device" / f"neuron{device}" / f"neuron_core{core}"
            / "stats/memory_usage/device_mem")
    base.mkdir(parents=True)
    for name, value in (("present", present), ("total", total), ("peak", peak)):
        (base / name).write_text(f"{value}\n")
    (base / "tensors").mkdir()
    (base / "tensors" / "present").write_text("0\n")
    return base


# --- device nodes and neuron-ls -------------------------------------------------------

def test_device_paths_lists_neuron_nodes_in_index_order(tmp_path):
    dev = make_dev(tmp_path, 12)
    paths = neuron.device_paths(dev)
    assert paths == [str(dev / f"neuron{i}") for i in range(12)]


def test_device_paths_of_a_missing_dev_root_is_empty(tmp_path):
    assert neuron.device_paths(tmp_path / "nope") == []


def test_neuron_ls_parses_the_documented_json(fake_path):
    write_fake_neuron_ls(fake_path, json.dumps(TRN1_2XLARGE, indent=4))
    devices = neuron.neuron_ls()
    assert devices == TRN1_2XLARGE
    assert (fake_path / "neuron-ls.calls").read_text().split("\n")[0] == "--json-output"


def test_neuron_ls_falls_back_to_the_new_output_format_flag(fake_path):
    wrapped = {"instance_type": "trn1.2xlarge", "neuron_devices": TRN1_2XLARGE}
    write_fake_neuron_ls(fake_path, json.dumps(wrapped), only_new_flag=True)
    assert neuron.neuron_ls() == TRN1_2XLARGE


def test_neuron_ls_missing_returns_none(fake_path, monkeypatch):
    monkeypatch.setattr(neuron.devices, "NEURON_BIN_DIR", str(fake_path / "absent"))
    assert neuron.neuron_ls("neuron-ls-not-installed") is None


def test_neuron_ls_garbage_returns_none(fake_path):
    write_fake_neuron_ls(fake_path, "not json at all")
    assert neuron.neuron_ls() is None


def test_neuron_ls_failing_returns_none(fake_path):
    write_fake_neuron_ls(fake_path, json.dumps(TRN1_2XLARGE), exit_code=1)
    assert neuron.neuron_ls() is None


def test_neuron_ls_is_found_in_opt_aws_neuron_bin_when_not_on_path(tmp_path, monkeypatch):
    opt_bin = tmp_path / "opt/aws/neuron/bin"
    write_fake_neuron_ls(opt_bin, json.dumps(TRN1_2XLARGE))
    monkeypatch.setattr(neuron.devices, "NEURON_BIN_DIR", str(opt_bin))
    monkeypatch.setenv("PATH", f"{tmp_path / 'empty'}{os.pathsep}/usr/bin{os.pathsep}/bin")
    assert neuron.neuron_ls() == TRN1_2XLARGE


# --- detect ---------------------------------------------------------------------------

def test_detect_trn1_2xlarge(tmp_path, fake_path):
    write_fake_neuron_ls(fake_path, json.dumps(TRN1_2XLARGE))
    info = neuron.detect(dev_root=make_dev(tmp_path, 1))
    assert info == neuron.NeuronInfo(True, 1, 2, 2, "1 Neuron device(s), 2 NeuronCore(s)")


def test_detect_trn1_32xlarge_counts_every_device(tmp_path, fake_path):
    devices = [dict(TRN1_2XLARGE[0], neuron_device=i, neuroncore_ids=[2 * i, 2 * i + 1]) for i in range(16)]
    write_fake_neuron_ls(fake_path, json.dumps(devices))
    info = neuron.detect(dev_root=make_dev(tmp_path, 16))
    assert (info.available, info.device_count, info.core_count, info.cores_per_device) == (True, 16, 32, 2)


def test_detect_without_device_nodes_is_unavailable_even_if_neuron_ls_answers(tmp_path, fake_path):
    write_fake_neuron_ls(fake_path, json.dumps(TRN1_2XLARGE))
    info = neuron.detect(dev_root=make_dev(tmp_path, 0))
    assert not info.available and info.core_count == 0
    assert "no Neuron device nodes" in info.reason


def test_detect_with_nodes_but_no_neuron_ls_is_unavailable(tmp_path, fake_path, monkeypatch):
    monkeypatch.setattr(neuron.devices, "NEURON_BIN_DIR", str(tmp_path / "absent"))
    info = neuron.detect(dev_root=make_dev(tmp_path, 1), executable="neuron-ls-absent")
    assert not info.available and info.device_count == 1
    assert "could not be run" in info.reason


def test_detect_with_zero_cores_is_unavailable(tmp_path, fake_path):
    write_fake_neuron_ls(fake_path, json.dumps([dict(TRN1_2XLARGE[0], nc_count=0, neuroncore_ids=[])]))
    info = neuron.detect(dev_root=make_dev(tmp_path, 1))
    assert not info.available and "no NeuronCores" in info.reason


def test_device_core_count_falls_back_to_core_ids():
    assert neuron.device_core_count({"neuroncore_ids": [0, 1, 2, 3]}) == 4
    assert neuron.device_core_count({}) == 0


# --- environment ----------------------------------------------------------------------

def test_worker_env_pins_one_core_and_tags_the_process():
    env = neuron.worker_env(1, tag="trainium-executor-worker-1", environ={})
    assert env["NEURON_RT_VISIBLE_CORES"] == "1"
    assert env["NEURON_PROCESS_TAG"] == "trainium-executor-worker-1"
    assert env["NEURON_RT_LOG_LEVEL"] == "ERROR"


def test_worker_env_log_level_argument_beats_inherited_value():
    inherited = {"NEURON_RT_LOG_LEVEL": "DEBUG"}
    assert neuron.worker_env(0, "t", "info", environ=inherited)["NEURON_RT_LOG_LEVEL"] == "INFO"
    assert neuron.worker_env(0, "t", environ=inherited)["NEURON_RT_LOG_LEVEL"] == "DEBUG"


def test_worker_env_cuts_the_tag_to_32_characters():
    assert len(neuron.worker_env(0, "x" * 50, environ={})["NEURON_PROCESS_TAG"]) == 32


@pytest.mark.parametrize("core,level", [(-1, None), (0, "LOUD")])
def test_worker_env_rejects_bad_values(core, level):
    with pytest.raises(ValueError):
        neuron.worker_env(core, "t", level, environ={})


def test_compile_cache_env_sets_url_and_retry_flag(tmp_path):
    env = neuron.compile_cache_env(tmp_path / "cache")
    assert env == {"NEURON_COMPILE_CACHE_URL": str(tmp_path / "cache"),
                   "NEURON_CC_FLAGS": "--retry_failed_compilation"}


def test_compile_cache_env_appends_the_flag_once_and_keeps_others(tmp_path):
    flags = "--model-type transformer --retry_failed_compilation"
    env = neuron.compile_cache_env(tmp_path, existing_flags=flags)
    assert env["NEURON_CC_FLAGS"] == "--model-type transformer --retry_failed_compilation"
    env = neuron.compile_cache_env(tmp_path, existing_flags="-O1 --log_level=INFO")
    assert env["NEURON_CC_FLAGS"] == "-O1 --log_level=INFO --retry_failed_compilation"


def test_compile_cache_env_without_retry(tmp_path):
    env = neuron.compile_cache_env(tmp_path, retry_failed=False, existing_flags="-O1")
    assert env["NEURON_CC_FLAGS"] == "-O1"


# --- compile cache ----------------------------------------------------------------------

def make_entry(cache: Path, name: str, size: int, age_s: float, *, lock: bool = False,
               version: str = "neuronxcc-2.21.18209.0+043b1bf7") -> Path:
    """One compiled-module entry as the Neuron cache writes it, ``age_s`` seconds old."""
    entry = cache / version / f"MODULE_{name}+4fddc5c8"
    entry.mkdir(parents=True)
    (entry / "model.neff").write_bytes(b"\0" * size)
    (entry / "compile_flags.txt").write_text("--target=trn1")
    (entry / "model.done").touch()
    if lock:
        (entry / "model.hlo_module.pb.lock").touch()
    when = time.time() - age_s
    for p in (*entry.iterdir(), entry):
        os.utime(p, (when, when))
    return entry


def test_cache_size_counts_every_file(tmp_path):
    cache = tmp_path / "cache"
    make_entry(cache, "1", 1000, 10)
    make_entry(cache, "2", 500, 5)
    overhead = 2 * len("--target=trn1")
    assert neuron.cache_size_bytes(cache) == 1500 + overhead
    assert neuron.cache_size_bytes(tmp_path / "absent") == 0


def test_clear_stale_locks_removes_only_lock_files(tmp_path):
    cache = tmp_path / "cache"
    locked = make_entry(cache, "1", 10, 10, lock=True)
    (cache / "neuronxcc-2.21.18209.0+043b1bf7" / "registry.lock").touch()
    assert neuron.clear_stale_locks(cache) == 2
    assert sorted(p.name for p in locked.iterdir()) == ["compile_flags.txt", "model.done", "model.neff"]
    assert neuron.clear_stale_locks(cache) == 0


def test_prune_removes_oldest_entries_first_until_under_the_cap(tmp_path):
    cache = tmp_path / "cache"
    oldest = make_entry(cache, "old", 1000, 300)
    middle = make_entry(cache, "mid", 1000, 200, version="neuronxcc-2.22.0.0+abc")
    newest = make_entry(cache, "new", 1000, 100)
    freed = neuron.prune_cache(cache, max_bytes=2100)
    assert not oldest.exists() and middle.exists() and newest.exists()
    assert freed == 1000 + len("--target=trn1")
    assert neuron.cache_size_bytes(cache) <= 2100


def test_prune_skips_entries_being_compiled(tmp_path):
    cache = tmp_path / "cache"
    locked_old = make_entry(cache, "old", 1000, 300, lock=True)
    newer = make_entry(cache, "new", 1000, 100)
    neuron.prune_cache(cache, max_bytes=1500)
    assert locked_old.exists() and not newer.exists()


def test_prune_uses_the_newest_file_in_an_entry_as_its_age(tmp_path):
    cache = tmp_path / "cache"
    rewritten = make_entry(cache, "a", 1000, 300)
    untouched = make_entry(cache, "b", 1000, 200)
    now = time.time()
    os.utime(rewritten / "model.neff", (now, now))
    neuron.prune_cache(cache, max_bytes=1500)
    assert rewritten.exists() and not untouched.exists()


def test_prune_under_the_cap_or_without_a_cap_does_nothing(tmp_path):
    cache = tmp_path / "cache"
    entry = make_entry(cache, "a", 1000, 300)
    assert neuron.prune_cache(cache, max_bytes=10**9) == 0
    assert neuron.prune_cache(cache, max_bytes=0) == 0
    assert entry.exists()


# --- per-core device memory -----------------------------------------------------------

def test_core_memory_reads_the_cores_counters(tmp_path):
    make_core_counters(tmp_path, 0, 1, present=300 << 20, total=900 << 20, peak=512 << 20)
    mem = neuron.core_memory(1, sysfs_root=tmp_path)
    assert mem == neuron.CoreMemory(core=1, used_bytes=300 << 20, peak_bytes=512 << 20)


def test_core_memory_maps_global_core_index_to_device_and_local_core(tmp_path):
    make_core_counters(tmp_path, 3, 1, present=7, total=7, peak=9)
    assert neuron.core_sysfs_dir(7, tmp_path).parts[-2:] == ("neuron3", "neuron_core1")
    assert neuron.core_memory(7, sysfs_root=tmp_path).peak_bytes == 9


def test_core_memory_absent_counters_give_none(tmp_path):
    assert neuron.core_memory(0, sysfs_root=tmp_path) is None


def test_reset_core_peak_writes_zero(tmp_path):
    base = make_core_counters(tmp_path, 0, 0, present=10, total=10, peak=99)
    assert neuron.reset_core_peak(0, sysfs_root=tmp_path)
    assert (base / "peak").read_text().strip() == "0"


def test_reset_core_peak_on_a_read_only_counter_is_refused(tmp_path):
    base = make_core_counters(tmp_path, 0, 0, present=10, total=10, peak=99)
    (base / "peak").unlink()
    (base / "peak").mkdir()  # opening a directory for writing fails even for root
    assert not neuron.reset_core_peak(0, sysfs_root=tmp_path)


def test_peak_tracker_with_reset_reports_the_jobs_own_peak(tmp_path):
    base = make_core_counters(tmp_path, 0, 0, present=100, total=100, peak=5000)
    tracker = neuron.PeakTracker(0, sysfs_root=tmp_path)
    tracker.start()
    assert tracker.was_reset
    (base / "present").write_text("800\n")
    (base / "peak").write_text("800\n")
    tracker.sample()
    (base / "present").write_text("120\n")
    assert tracker.finish() == 800


def test_peak_tracker_without_reset_uses_a_new_high_water_mark(tmp_path):
    base = make_core_counters(tmp_path, 0, 0, present=100, total=100, peak=1000)
    tracker = neuron.PeakTracker(0, sysfs_root=tmp_path, reset=lambda *a: False)
    tracker.start()
    (base / "peak").write_text("4000\n")
    assert tracker.finish() == 4000


def test_peak_tracker_without_reset_falls_back_to_sampled_usage(tmp_path):
    base = make_core_counters(tmp_path, 0, 0, present=100, total=100, peak=9000)
    tracker = neuron.PeakTracker(0, sysfs_root=tmp_path, reset=lambda *a: False)
    tracker.start()
    (base / "present").write_text("700\n")
    tracker.sample()
    (base / "present").write_text("150\n")
    tracker.sample()
    assert tracker.finish() == 700


def test_peak_tracker_without_counters_reports_none(tmp_path):
    tracker = neuron.PeakTracker(0, sysfs_root=tmp_path)
    tracker.start()
    tracker.sample()
    assert tracker.finish() is None


def test_idle_growth_flags_memory_that_keeps_growing():
    growth = neuron.IdleGrowth(jobs=3, min_growth_bytes=100)
    assert [growth.observe(v) for v in (1000, 1050, 1100, 1150)] == [False, False, False, True]


def test_idle_growth_resets_when_memory_drops():
    growth = neuron.IdleGrowth(jobs=2, min_growth_bytes=10)
    assert [growth.observe(v) for v in (100, 200, 50, 60, 70)] == [False, False, False, False, True]


def test_idle_growth_ignores_small_growth():
    growth = neuron.IdleGrowth(jobs=2, min_growth_bytes=1000)
    assert not any(growth.observe(v) for v in (100, 101, 102, 103))


def test_the_neuron_helpers_never_import_torch():
    sources = list(Path(neuron.__file__).parent.glob("*.py"))
    assert len(sources) == 6
    for source in sources:
        assert "import torch" not in source.read_text(), source.name


# --- a job's profile (neuron/profile.py) ---------------------------------------------------

def test_the_profilers_settings_turn_it_on_into_the_jobs_dir():
    assert profile.capture_env("/w/jobs/j1/neuron-profile") == {
        "NEURON_RT_INSPECT_ENABLE": "1", "NEURON_RT_INSPECT_OUTPUT_DIR": "/w/jobs/j1/neuron-profile",
        "NEURON_RT_INSPECT_DEVICE_PROFILE": "1"}
    assert "NEURON_RT_INSPECT_DEVICE_PROFILE" not in profile.capture_env("/x", device=False)


def test_a_profile_is_unavailable_off_neuron_and_in_the_reuse_mode_with_why():
    assert "backend is cpu" in profile.unavailable("cpu", one_job=True)
    assert "backend is xla" in profile.unavailable("xla", one_job=True)
    assert "reuse mode" in profile.unavailable("neuron", one_job=False)
    assert profile.unavailable("neuron", one_job=True) is None


def test_jobs_environment_may_not_set_the_profilers_variables():
    with pytest.raises(ConfigError, match="NEURON_RT_INSPECT_ENABLE is set by the pool.*\"profile\": true"):
        job_env.parse(("NEURON_RT_INSPECT_ENABLE=1",))
    with pytest.raises(ConfigError, match="NEURON_RT_INSPECT_OUTPUT_DIR"):
        job_env.parse(("NEURON_RT_INSPECT_OUTPUT_DIR=/tmp/x",))


def make_capture(root: Path) -> Path:
    """What the runtime leaves in a profiled job's neuron-profile/ (one process, one core)."""
    run = root / "neuron-profile" / "i-0abc_pid_77"
    run.mkdir(parents=True)
    for name, size in (("ntrace.pb", 300), ("trace_info.pb", 40), ("cpu_util.pb", 20), ("host_mem.pb", 20),
                       ("neff_9.neff", 500), ("9_instid_0_vnc_0.ntff", 700), ("trace.json", 10)):
        (run / name).write_bytes(b"x" * size)
    (run / "notes.md").write_text("not a profile file")
    (run / "evil.pb").symlink_to("/etc/passwd")
    return root / "neuron-profile"


def _keep(tmp_path, cap=1 << 20, timeout=10.0):
    source = make_capture(tmp_path / "job")
    dest = tmp_path / "artifacts" / "j1" / "neuron-profile"
    return profile.keep(str(source), str(dest), os.geteuid(), cap, timeout), dest


def test_keep_copies_the_capture_and_adds_its_perfetto_traces(tmp_path, fake_path, monkeypatch):
    install_fake_neuron_profile(fake_path)
    monkeypatch.setenv("EXECUTOR_API_TOKEN", "service-secret")
    kept, dest = _keep(tmp_path)
    run = "neuron-profile/i-0abc_pid_77"
    assert kept.status == "captured"
    files = ("ntrace.pb", "trace_info.pb", "cpu_util.pb", "host_mem.pb", "neff_9.neff",
             "9_instid_0_vnc_0.ntff", "trace.json")
    traces = ("system_profile.pftrace", "device_profile_model_9.pftrace")
    assert {a.name for a in kept.artifacts} == {f"{run}/{n}" for n in files} | {
        f"neuron-profile/perfetto/{n}" for n in traces}
    assert kept.skipped == [{"name": f"{run}/evil.pb", "reason": "not a regular file"}]
    assert (dest / "perfetto" / "system_profile.pftrace").read_text() == "perfetto: system\n"
    assert kept.detail.startswith("7 files (0.0 MiB) kept as artifacts under neuron-profile/; converted for "
                                  "Perfetto: neuron-profile/perfetto/")
    assert not (dest.parent / ".perfetto-work").exists()
    env = (fake_path / "neuron-profile.env").read_text()
    assert "service-secret" not in env and f"HOME={dest.parent}/.perfetto-work" in env


def test_keep_without_neuron_profile_keeps_the_capture_and_says_it_is_not_converted(tmp_path, fake_path,
                                                                                     monkeypatch):
    monkeypatch.setenv("PATH", str(fake_path))
    kept, _ = _keep(tmp_path)
    assert kept.status == "captured" and len(kept.artifacts) == 7
    assert kept.detail.endswith("not converted for Perfetto: neuron-profile is not installed "
                                "(aws-neuronx-tools)")


def test_keep_reports_a_failing_conversion_with_what_the_tool_said(tmp_path, fake_path):
    install_fake_neuron_profile(fake_path, mode="fail")
    kept, _ = _keep(tmp_path)
    assert kept.status == "captured"
    assert kept.detail.endswith("not converted for Perfetto: neuron-profile view exited with status 3: "
                                "ERRO[0000] cannot read the profile: bad magic")
    assert not [a for a in kept.artifacts if a.name.endswith(".pftrace")]


def test_keep_stops_a_conversion_over_its_time_with_what_it_started(tmp_path, fake_path):
    install_fake_neuron_profile(fake_path, mode="hang")
    started = time.monotonic()
    kept, _ = _keep(tmp_path, timeout=1.0)
    assert time.monotonic() - started < 10
    assert kept.status == "captured"
    assert kept.detail.endswith("neuron-profile view was stopped after 1 s (neuron_profile_convert_timeout)")
    child = psutil.Process(int((fake_path / "neuron-profile.child").read_text()))
    wait_until(lambda: not child.is_running() or child.status() == psutil.STATUS_ZOMBIE, timeout=10)


def test_keep_with_conversion_off_never_runs_the_tool(tmp_path, fake_path):
    install_fake_neuron_profile(fake_path)
    kept, _ = _keep(tmp_path, timeout=0)
    assert kept.detail.endswith("not converted for Perfetto (neuron_profile_convert_timeout is 0)")
    assert not (fake_path / "neuron-profile.calls").exists()


def test_keep_within_the_room_left_keeps_the_smallest_files_and_lists_the_rest(tmp_path, fake_path):
    install_fake_neuron_profile(fake_path)
    kept, _ = _keep(tmp_path, cap=1000)
    names = {a.name.rsplit("/", 1)[1] for a in kept.artifacts}
    assert kept.status == "captured" and "9_instid_0_vnc_0.ntff" not in names and "ntrace.pb" in names
    assert any(s["reason"].startswith("over max_artifacts_mb") for s in kept.skipped)
    assert sum(a.size for a in kept.artifacts) <= 1000


def test_keep_says_why_there_is_no_profile(tmp_path):
    empty = tmp_path / "job" / "neuron-profile"
    empty.mkdir(parents=True)
    nothing = profile.keep(str(empty), str(tmp_path / "dest"), os.geteuid(), 1 << 20, 5)
    assert nothing.status == "failed" and "wrote no profile" in nothing.detail
    no_room, _ = _keep(tmp_path, cap=0)
    assert no_room.status == "failed" and "max_artifacts_mb" in no_room.detail
