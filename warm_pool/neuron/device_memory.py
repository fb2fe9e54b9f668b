"""Device (HBM) memory of one NeuronCore: a job's peak, a worker's idle growth.

Per-core memory counters (Neuron Sysfs User Guide):
``/sys/devices/virtual/neuron_device/neuron<D>/neuron_core<C>/stats/memory_usage/
device_mem/{total,present,peak}``, one directory per category below it; counters are
"write to clear" (writing any value sets them to 0, root only in practice).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

SYSFS_NEURON_DIR = "devices/virtual/neuron_device"


@dataclass(frozen=True)
class CoreMemory:
    """Device (HBM) memory of one NeuronCore, in bytes, from its sysfs counters."""

    core: int
    used_bytes: int
    peak_bytes: int


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
