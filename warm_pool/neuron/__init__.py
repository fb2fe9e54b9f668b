"""Neuron helpers, one module per role; no torch import, so the service and the
supervisor can use them. Every fact used comes from the Neuron SDK documentation, cited
in the module that relies on it.

- devices: which Neuron devices and NeuronCores this machine has (driver + neuron-ls);
- runtime_env: the environment of a worker that owns one NeuronCore, and the compile
  cache's variables;
- compile_cache: the persistent compile cache on disk (entries, stale locks, pruning);
- device_memory: a job's device-memory peak and a worker's idle growth (sysfs counters);
- profile: the runtime's profiler settings for a profiled job, keeping what it wrote, and
  its conversion for Perfetto (neuron-profile).
"""

from warm_pool.neuron.compile_cache import cache_entries, cache_size_bytes, clear_stale_locks, prune_cache
from warm_pool.neuron.device_memory import (
    CoreMemory,
    IdleGrowth,
    PeakTracker,
    core_memory,
    core_sysfs_dir,
    reset_core_peak,
)
from warm_pool.neuron.devices import (
    NeuronInfo,
    detect,
    device_core_count,
    device_paths,
    find_neuron_ls,
    find_tool,
    neuron_ls,
)
from warm_pool.neuron.runtime_env import (
    CONFLICTING_ENV,
    LOG_LEVELS,
    RETRY_FLAG,
    compile_cache_env,
    worker_env,
)

__all__ = [
    "CONFLICTING_ENV", "LOG_LEVELS", "RETRY_FLAG", "CoreMemory", "IdleGrowth", "NeuronInfo", "PeakTracker",
    "cache_entries", "cache_size_bytes", "clear_stale_locks", "compile_cache_env", "core_memory",
    "core_sysfs_dir", "detect", "device_core_count", "device_paths", "find_neuron_ls", "find_tool",
    "neuron_ls", "prune_cache", "reset_core_peak", "worker_env",
]
