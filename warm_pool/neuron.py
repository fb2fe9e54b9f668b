"""Neuron helpers: detection, worker environment, compile cache, per-core device memory.

Pure functions over the file system and one subprocess (``neuron-ls``); no torch import,
so the service process and the supervisor can call them. Every fact used here comes from
the Neuron SDK documentation, cited where it is relied on:

- ``neuron-ls --json-output`` prints a JSON array, one object per Neuron device, with
  ``neuron_device``, ``nc_count``, ``neuroncore_ids``, ``memory_size`` (bytes) and
  ``neuron_processes`` (Neuron LS User Guide, tools/neuron-sys-tools/neuron-ls.rst; the
  trn1.2xlarge shape is ``[{"neuron_device": 0, "nc_count": 2, "neuroncore_ids": [0, 1],
  "memory_size": 34359738368, ...}]``). Neuron 2.34 announces ``--output-format json``
  as its successor, so both flags are tried.
- The driver registers one character device per Neuron device, ``/dev/neuron<N>``, in
  the ``neuron`` char-device group (aws-neuron-driver ``ncdev_module_init``).
- Runtime variables (Neuron Runtime Configuration, nrt-configurable-parameters):
  ``NEURON_RT_VISIBLE_CORES`` (which cores a process takes; must be set before the
  runtime starts), ``NEURON_RT_LOG_LEVEL`` (ERROR, WARNING, INFO, DEBUG, TRACE; default
  ERROR). ``NEURON_PROCESS_TAG`` names the process for neuron-monitor, at most 32
  characters (Neuron Monitor User Guide, "Neuron applications tagging").
- Persistent compile cache (Neuron Persistent Cache, neuron-caching.rst): default
  ``/var/tmp/neuron-compile-cache``, moved by ``NEURON_COMPILE_CACHE_URL`` (a
  ``--cache_dir=`` in ``NEURON_CC_FLAGS`` wins over it); entries live in
  ``<cache>/neuronxcc-<version>/MODULE_<hash>+<flags hash>/`` (``model.neff``,
  ``model.done``, ``compile_flags.txt``, ``*.lock``); a failed or interrupted compile
  is cached as failed and skipped until ``--retry_failed_compilation`` is in
  ``NEURON_CC_FLAGS``.
- Per-core memory counters (Neuron Sysfs User Guide):
  ``/sys/devices/virtual/neuron_device/neuron<D>/neuron_core<C>/stats/memory_usage/
  device_mem/{total,present,peak}``, one directory per category below it; counters are
  "write to clear" (writing any value sets them to 0, root only in practice).
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

# Where the Neuron tools are installed (aws-neuronx-tools). The DLAMI puts this directory
# on PATH only in login shells, so a systemd service must look here itself.
NEURON_BIN_DIR = "/opt/aws/neuron/bin"
SYSFS_NEURON_DIR = "devices/virtual/neuron_device"
RETRY_FLAG = "--retry_failed_compilation"
LOG_LEVELS = ("ERROR", "WARNING", "INFO", "DEBUG", "TRACE")
# NEURON_PROCESS_TAG longer than this is not accepted by neuron-monitor.
MAX_PROCESS_TAG = 32
CACHE_ENTRY_PREFIX = "MODULE_"
CACHE_VERSION_PREFIX = "neuronxcc-"

_DEVICE_NODE = re.compile(r"^neuron(\d+)$")


@dataclass(frozen=True)
class NeuronInfo:
    """What this machine offers: devices, NeuronCores, and why not when it offers none."""

    available: bool
    device_count: int
    core_count: int
    cores_per_device: int
    reason: str


@dataclass(frozen=True)
class CoreMemory:
    """Device (HBM) memory of one NeuronCore, in bytes, from its sysfs counters."""

    core: int
    used_bytes: int
    peak_bytes: int


def device_paths(dev_root: str | os.PathLike = "/dev") -> list[str]:
    """The Neuron device nodes (``/dev/neuron0``, ``/dev/neuron1``, ...) in index order."""
    try:
        names = os.listdir(dev_root)
    except OSError:
        return []
    found = [(int(m.group(1)), name) for name in names if (m := _DEVICE_NODE.match(name))]
    return [os.path.join(str(dev_root), name) for _, name in sorted(found)]


def find_neuron_ls(executable: str = "neuron-ls") -> str | None:
    """The neuron-ls to run: on PATH, else in /opt/aws/neuron/bin, else None."""
    if os.sep in executable:
        return executable if os.access(executable, os.X_OK) else None
    found = shutil.which(executable)
    if found:
        return found
    fallback = os.path.join(NEURON_BIN_DIR, executable)
    return fallback if os.access(fallback, os.X_OK) else None


def neuron_ls(executable: str = "neuron-ls", timeout: float = 10) -> list[dict] | None:
    """The devices ``neuron-ls --json-output`` reports, or None if it cannot be run or read.

    Neuron 2.34 replaces ``--json-output`` with ``--output-format json`` (which may wrap
    the device list in an object with a ``neuron_devices``-style key), so the new flag is
    tried when the old one fails.
    """
    path = find_neuron_ls(executable)
    if path is None:
        return None
    for flags in (["--json-output"], ["--output-format", "json"]):
        try:
            proc = subprocess.run([path, *flags], capture_output=True, text=True, timeout=timeout)
        except (OSError, subprocess.SubprocessError):
            return None
        if proc.returncode != 0:
            continue
        devices = _parse_devices(proc.stdout)
        if devices is not None:
            return devices
    return None


def _parse_devices(text: str) -> list[dict] | None:
    """The device objects in neuron-ls JSON output (a list, or an object holding one)."""
    try:
        data = json.loads(text)
    except ValueError:
        return None
    if isinstance(data, dict):
        lists = [v for v in data.values() if isinstance(v, list) and all(isinstance(d, dict) for d in v)]
        data = next((v for v in lists if any("neuron_device" in d for d in v)), None)
    if not isinstance(data, list) or not all(isinstance(d, dict) for d in data):
        return None
    return data


def device_core_count(device: dict) -> int:
    """NeuronCores of one neuron-ls device: ``nc_count``, else ``len(neuroncore_ids)``."""
    count = device.get("nc_count")
    if isinstance(count, int) and count > 0:
        return count
    ids = device.get("neuroncore_ids")
    return len(ids) if isinstance(ids, list) else 0


def detect(dev_root: str | os.PathLike = "/dev", executable: str = "neuron-ls") -> NeuronInfo:
    """Neuron devices as the driver and neuron-ls see them; available only if both agree.

    A path existing is not enough: ``available`` needs device nodes *and* neuron-ls
    reporting at least one NeuronCore. Whether torch_neuronx imports is for the worker to
    prove.
    """
    nodes = device_paths(dev_root)
    if not nodes:
        return NeuronInfo(False, 0, 0, 0, f"no Neuron device nodes in {dev_root} (neuron driver not loaded?)")
    devices = neuron_ls(executable)
    if devices is None:
        return NeuronInfo(False, len(nodes), 0, 0,
                          f"{len(nodes)} Neuron device node(s) but {executable} --json-output "
                          "could not be run or parsed (install aws-neuronx-tools)")
    cores = [device_core_count(d) for d in devices]
    total = sum(cores)
    if total == 0:
        return NeuronInfo(False, len(devices), 0, 0, f"{executable} reports no NeuronCores")
    per_device = max(cores)
    return NeuronInfo(True, len(devices), total, per_device,
                      f"{len(devices)} Neuron device(s), {total} NeuronCore(s)")


def worker_env(core: int, tag: str, log_level: str | None = None,
               environ: dict[str, str] | None = None) -> dict[str, str]:
    """Environment for the worker that owns NeuronCore ``core``; set before its runtime starts.

    ``NEURON_RT_VISIBLE_CORES`` gives the worker exactly one core (the runtime otherwise
    takes every core for the first process); an inherited ``NEURON_RT_NUM_CORES`` would
    contradict it, so callers drop the names in ``CONFLICTING_ENV``. ``NEURON_PROCESS_TAG``
    is cut to 32 characters. ``log_level`` None keeps ``NEURON_RT_LOG_LEVEL`` from ``environ``
    (default os.environ), else ERROR, the runtime's own default.
    """
    if not isinstance(core, int) or core < 0:
        raise ValueError(f"core must be a NeuronCore index >= 0, not {core!r}")
    source = os.environ if environ is None else environ
    level = (log_level or source.get("NEURON_RT_LOG_LEVEL") or "ERROR").upper()
    if level not in LOG_LEVELS:
        raise ValueError(f"NEURON_RT_LOG_LEVEL must be one of {', '.join(LOG_LEVELS)}, not {level!r}")
    return {
        "NEURON_RT_VISIBLE_CORES": str(core),
        "NEURON_PROCESS_TAG": tag[:MAX_PROCESS_TAG],
        "NEURON_RT_LOG_LEVEL": level,
        # torch-xla picks its PJRT plugin by this name; the DLAMI venv's activate script
        # exports it, but the service runs the venv's python directly, and without it
        # torch-xla silently falls back to CPU.
        "PJRT_DEVICE": "NEURON",
    }


# Inherited variables that would contradict NEURON_RT_VISIBLE_CORES in a worker.
CONFLICTING_ENV = ("NEURON_RT_NUM_CORES",)


def compile_cache_env(cache_dir: Path, retry_failed: bool = True, existing_flags: str = "") -> dict[str, str]:
    """``NEURON_COMPILE_CACHE_URL`` and ``NEURON_CC_FLAGS`` for a shared persistent cache.

    ``--retry_failed_compilation`` is appended once (unless present or ``retry_failed``
    is False): a compile killed with its job is cached as failed, and without the flag
    every later run of that graph would skip compiling and fail. Other flags in
    ``existing_flags`` are kept as they are; note that a ``--cache_dir=`` there takes
    precedence over ``NEURON_COMPILE_CACHE_URL`` (neuron-caching.rst).
    """
    flags = shlex.split(existing_flags) if existing_flags.strip() else []
    if retry_failed and RETRY_FLAG not in flags:
        flags.append(RETRY_FLAG)
    return {
        "NEURON_COMPILE_CACHE_URL": str(cache_dir),
        "NEURON_CC_FLAGS": shlex.join(flags),
    }


def cache_entries(cache_dir: str | os.PathLike) -> list[Path]:
    """The compiled-module entry directories: ``<cache>/neuronxcc-*/MODULE_*``."""
    root = Path(cache_dir)
    entries: list[Path] = []
    try:
        versions = [p for p in root.iterdir() if p.is_dir() and p.name.startswith(CACHE_VERSION_PREFIX)]
    except OSError:
        return []
    for version in versions:
        try:
            entries.extend(p for p in version.iterdir()
                           if p.is_dir() and not p.is_symlink() and p.name.startswith(CACHE_ENTRY_PREFIX))
        except OSError:
            continue
    return entries


def clear_stale_locks(cache_dir: str | os.PathLike) -> int:
    """Remove every ``*.lock`` file in the cache; return how many. Call only when no worker runs.

    A compile killed mid-way (a job's timeout) leaves its entry's lock behind, and the
    next compile of the same graph waits on it. With no worker alive no lock can be live.
    """
    removed = 0
    for dirpath, _dirnames, filenames in os.walk(cache_dir):
        for name in filenames:
            if name.endswith(".lock"):
                try:
                    os.unlink(os.path.join(dirpath, name))
                    removed += 1
                except FileNotFoundError:
                    pass
    return removed


def _tree_size(path: Path) -> int:
    """Bytes of the regular files under path (symlinks not followed)."""
    total = 0
    for dirpath, _dirnames, filenames in os.walk(path):
        for name in filenames:
            try:
                st = os.lstat(os.path.join(dirpath, name))
            except OSError:
                continue
            if not os.path.islink(os.path.join(dirpath, name)):
                total += st.st_size
    return total


def cache_size_bytes(cache_dir: str | os.PathLike) -> int:
    """Total size of the compile cache in bytes (0 when it does not exist yet)."""
    return _tree_size(Path(cache_dir))


def _entry_mtime(entry: Path) -> float:
    """Last time an entry was written: the newest mtime of the directory and its files."""
    newest = entry.stat().st_mtime
    for child in entry.iterdir():
        try:
            newest = max(newest, child.lstat().st_mtime)
        except OSError:
            continue
    return newest


def prune_cache(cache_dir: str | os.PathLike, max_bytes: int) -> int:
    """Delete whole entries, oldest first, until the cache is at most ``max_bytes``.

    Returns the bytes freed. An entry holding a ``*.lock`` file is being compiled and is
    skipped. ``max_bytes`` 0 or less means no cap (nothing is pruned).
    """
    if max_bytes <= 0:
        return 0
    size = cache_size_bytes(cache_dir)
    if size <= max_bytes:
        return 0
    aged: list[tuple[float, Path]] = []
    for entry in cache_entries(cache_dir):
        try:
            if any(p.name.endswith(".lock") for p in entry.iterdir()):
                continue
            aged.append((_entry_mtime(entry), entry))
        except OSError:
            continue
    freed = 0
    for _mtime, entry in sorted(aged, key=lambda pair: pair[0]):
        if size - freed <= max_bytes:
            break
        entry_size = _tree_size(entry)
        shutil.rmtree(entry, ignore_errors=True)
        if not entry.exists():
            freed += entry_size
    return freed


def core_sysfs_dir(core: int, sysfs_root: str | os.PathLike = "/sys", cores_per_device: int = 2) -> Path:
    """The sysfs directory of global NeuronCore ``core`` (device = core // cores_per_device)."""
    if cores_per_device < 1:
        raise ValueError("cores_per_device must be at least 1")
    device, local = divmod(core, cores_per_device)
    return Path(sysfs_root) / SYSFS_NEURON_DIR / f"neuron{device}" / f"neuron_core{local}"


def _device_mem_dir(core: int, sysfs_root: str | os.PathLike, cores_per_device: int) -> Path:
    return core_sysfs_dir(core, sysfs_root, cores_per_device) / "stats" / "memory_usage" / "device_mem"


def _read_int(path: Path) -> int | None:
    try:
        return int(path.read_text().strip())
    except (OSError, ValueError):
        return None


def core_memory(core: int, sysfs_root: str | os.PathLike = "/sys",
                cores_per_device: int = 2) -> CoreMemory | None:
    """Device memory now in use and the high-water mark of one NeuronCore; None when absent.

    The sysfs guide calls ``total`` the current usage and ``present`` the last change,
    while tools reading real trn1 counters (all-smi, Backend.AI's Neuron plugin) found
    ``present`` to be the live allocation and ``total`` cumulative. ``peak`` is the
    maximum either way, so per-job peaks rest on it; ``used_bytes`` reads ``present``
    and falls back to ``total`` when ``present`` is missing.
    """
    base = _device_mem_dir(core, sysfs_root, cores_per_device)
    peak = _read_int(base / "peak")
    used = _read_int(base / "present")
    if used is None:
        used = _read_int(base / "total")
    if peak is None and used is None:
        return None
    used = used or 0
    return CoreMemory(core=core, used_bytes=used, peak_bytes=max(peak or 0, used))


def reset_core_peak(core: int, sysfs_root: str | os.PathLike = "/sys", cores_per_device: int = 2) -> bool:
    """Clear the core's device-memory peak counter ("write to clear"); False if not allowed."""
    path = _device_mem_dir(core, sysfs_root, cores_per_device) / "peak"
    try:
        with open(path, "w") as f:
            f.write("0\n")
    except OSError:
        return False
    return _read_int(path) == 0


class PeakTracker:
    """One job's device-memory peak on one NeuronCore.

    ``start()`` at job start tries to clear the sysfs peak; ``sample()`` on the monitor's
    tick records the live usage; ``finish()`` gives the job's peak in bytes (None when
    the core has no counters). If the peak could be cleared it is exact. If not (the
    service is not root), a peak above the one seen at start was set during the job and
    is used; otherwise the highest sampled usage is.
    """

    def __init__(self, core: int, sysfs_root: str | os.PathLike = "/sys", cores_per_device: int = 2,
                 reset: Callable[[int, str | os.PathLike, int], bool] = reset_core_peak) -> None:
        self.core = core
        self.sysfs_root = sysfs_root
        self.cores_per_device = cores_per_device
        self._reset = reset
        self.was_reset = False
        self.start_peak: int | None = None
        self.start_used: int | None = None
        self.max_sampled = 0

    def _read(self) -> CoreMemory | None:
        return core_memory(self.core, self.sysfs_root, self.cores_per_device)

    def start(self) -> None:
        """Mark the job's start: clear the peak if allowed, else remember it."""
        self.was_reset = self._reset(self.core, self.sysfs_root, self.cores_per_device)
        mem = self._read()
        self.start_peak = mem.peak_bytes if mem else None
        self.start_used = mem.used_bytes if mem else None
        self.max_sampled = mem.used_bytes if mem else 0

    def sample(self) -> None:
        """Record the live usage now (call on each monitor tick)."""
        mem = self._read()
        if mem is not None:
            self.max_sampled = max(self.max_sampled, mem.used_bytes)

    def finish(self) -> int | None:
        """The job's device-memory peak in bytes, or None if the core has no counters."""
        mem = self._read()
        if mem is None:
            return None
        sampled = max(self.max_sampled, mem.used_bytes)
        if self.was_reset:
            return max(mem.peak_bytes, sampled)
        if self.start_peak is not None and mem.peak_bytes > self.start_peak:
            return mem.peak_bytes
        return sampled


class IdleGrowth:
    """Decide when a worker's idle device memory keeps growing (a leak across jobs).

    ``observe(used_bytes)`` is called after each job with the core's idle usage. After
    ``jobs`` consecutive increases totalling more than ``min_growth_bytes`` over the
    first idle reading, ``observe`` returns True: recycle the worker.
    """

    def __init__(self, jobs: int = 3, min_growth_bytes: int = 64 * 1024 * 1024) -> None:
        self.jobs = jobs
        self.min_growth_bytes = min_growth_bytes
        self.readings: list[int] = []

    def observe(self, used_bytes: int) -> bool:
        """Record one idle reading; True when the worker should be replaced."""
        if self.readings and used_bytes <= self.readings[-1]:
            self.readings = [used_bytes]
            return False
        self.readings.append(used_bytes)
        grew = len(self.readings) > self.jobs
        return grew and self.readings[-1] - self.readings[0] >= self.min_growth_bytes
