"""The environment of a worker that owns one NeuronCore, and of the shared compile cache.

- Runtime variables (Neuron Runtime Configuration, nrt-configurable-parameters):
  ``NEURON_RT_VISIBLE_CORES`` (which cores a process takes; must be set before the
  runtime starts), ``NEURON_RT_LOG_LEVEL`` (ERROR, WARNING, INFO, DEBUG, TRACE; default
  ERROR). ``NEURON_PROCESS_TAG`` names the process for neuron-monitor, at most 32
  characters (Neuron Monitor User Guide, "Neuron applications tagging").
- ``NEURON_COMPILE_CACHE_URL`` moves the persistent compile cache (a ``--cache_dir=`` in
  ``NEURON_CC_FLAGS`` wins over it); a failed or interrupted compile is cached as failed
  and skipped until ``--retry_failed_compilation`` is in ``NEURON_CC_FLAGS``
  (Neuron Persistent Cache, neuron-caching.rst).
"""

from __future__ import annotations

import os
import shlex
from pathlib import Path

RETRY_FLAG = "--retry_failed_compilation"
LOG_LEVELS = ("ERROR", "WARNING", "INFO", "DEBUG", "TRACE")
# NEURON_PROCESS_TAG longer than this is not accepted by neuron-monitor.
MAX_PROCESS_TAG = 32


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
