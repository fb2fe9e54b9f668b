"""The pool's settings: one frozen object, validated once, every limit documented here.

Units are in the names (_s seconds, _mb mebibytes, _bytes bytes). "0 means" is said
where 0 has a meaning of its own.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from pathlib import Path

BACKENDS = ("auto", "cpu", "xla", "neuron")

# Modules each backend's template imports before any worker is forked.
PRELOAD = {
    # torch._dynamo: the first optimizer.step() imports it (~900 modules), which registers
    # atexit handlers and rebinds torch.manual_seed; imported here it costs a job nothing
    # and does not make the worker look dirty. (torch_xla imports it itself.)
    "cpu": ("torch", "torch._dynamo"),
    "xla": ("torch", "torch_xla"),
    "neuron": ("torch", "torch_xla", "torch_neuronx"),
}

# Environment variables the service may hold that job code must never see.
DEFAULT_SCRUB_ENV = ("EXECUTOR_API_TOKEN", "EXECUTOR_API_TOKEN_FILE")


class ConfigError(ValueError):
    """A setting is invalid; the message names the setting."""


@dataclass(frozen=True)
class PoolConfig:
    """Everything the pool needs to know, with its default and its unit."""

    # auto | cpu | xla | neuron. auto: neuron if a Neuron device and torch_neuronx are
    # present, else xla if torch_xla imports, else cpu.
    backend: str = "auto"
    # Number of workers. None: the number of NeuronCores on neuron, else 2.
    size: int | None = None
    # Job directories live under <work_dir>/jobs/<job_id>/.
    work_dir: Path = field(default_factory=lambda: Path("/tmp/trainium-jobs"))
    # Kill a job whose process tree's resident memory exceeds this. None or 0: no limit.
    max_memory_mb: int | None = None
    # Timeout used when a job names none, and the largest a job may ask for.
    default_timeout_s: float = 600.0
    max_timeout_s: float = 3600.0
    # After the timeout (or a cancel) the worker gets SIGINT (KeyboardInterrupt) and
    # this long to stop before its whole process group is SIGKILLed.
    kill_grace_s: float = 2.0
    # Recycle a worker after this many jobs even if it looks clean. 0: never.
    max_jobs_per_worker: int = 100
    # Captured output kept per stream; beyond it the head and tail halves are kept and
    # the cut is reported as *_truncated_bytes.
    max_output_bytes: int = 1_000_000
    # Jobs waiting for a worker; submit() raises QueueFull beyond it.
    max_queue: int = 100
    # How long a worker may take from fork to ready (device init included).
    worker_start_timeout_s: float = 120.0
    # Consecutive failed worker starts after which the pool declares itself broken.
    max_start_failures: int = 5
    # How often busy workers' process trees are measured (memory peak and limit).
    monitor_interval_s: float = 0.05
    # Python interpreter for the template; None: the one running the service.
    python: str | None = None
    # Environment variables removed from the template's (and so every job's) environment.
    scrub_env: tuple[str, ...] = DEFAULT_SCRUB_ENV
    # Extra environment for the template and workers (e.g. NEURON_RT_LOG_LEVEL).
    extra_env: tuple[tuple[str, str], ...] = ()
    # Override the preload list (tests); None: PRELOAD[backend].
    preload: tuple[str, ...] | None = None
    # Intra-op threads (torch.set_num_threads, OMP_NUM_THREADS/MKL_NUM_THREADS) per worker.
    # None: the machine's cores divided by the pool size (at least 1), so parallel jobs do
    # not oversubscribe the cores (OpenMP threads spin-wait: oversubscribed, they starve
    # each other). 0: leave torch's default (all cores in every worker).
    threads_per_worker: int | None = None
    # Keep each job's directory (main.py and what the script wrote) after its result.
    # False: removed as soon as the result is built.
    keep_job_dirs: bool = False
    # NeuronCores to use on neuron (None: all that neuron-ls reports).
    neuron_cores: tuple[int, ...] | None = None
    # NEURON_RT_LOG_LEVEL for workers (None: inherited, else ERROR).
    neuron_log_level: str | None = None
    # Persistent Neuron compile cache shared by every worker and job. None:
    # $NEURON_COMPILE_CACHE_URL if set, else <work_dir>/neuron-compile-cache.
    neuron_cache_dir: Path | None = None
    # Cache size cap; the oldest compiled modules are pruned at start beyond it. 0: no cap.
    neuron_cache_max_mb: int = 50_000
    # Add --retry_failed_compilation to NEURON_CC_FLAGS so a compile killed with its job
    # (cached as failed) is retried instead of failing every later run of that graph.
    neuron_retry_failed_compilation: bool = True
    # Where the Neuron driver's sysfs counters live (tests point it at a fake tree).
    neuron_sysfs_root: Path = Path("/sys")
    # Recycle a worker whose idle device memory grew after this many jobs in a row. 0: never.
    neuron_idle_growth_jobs: int = 3

    def validate(self) -> PoolConfig:
        """Raise ConfigError naming the first bad setting; return self when all are fine."""
        if self.backend not in BACKENDS:
            raise ConfigError(f"backend must be one of {', '.join(BACKENDS)}, not {self.backend!r}")
        if self.size is not None and not (1 <= self.size <= 64):
            raise ConfigError(f"pool size must be between 1 and 64, not {self.size}")
        if self.max_memory_mb is not None and self.max_memory_mb < 0:
            raise ConfigError("max_memory_mb must be >= 0 (0: no limit)")
        for name in ("default_timeout_s", "max_timeout_s", "kill_grace_s", "worker_start_timeout_s",
                     "monitor_interval_s"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
                raise ConfigError(f"{name} must be a positive number of seconds, not {value!r}")
        if self.default_timeout_s > self.max_timeout_s:
            raise ConfigError("default_timeout_s must not exceed max_timeout_s")
        for name in ("max_jobs_per_worker", "max_output_bytes", "max_queue", "max_start_failures",
                     "neuron_cache_max_mb", "neuron_idle_growth_jobs"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 0:
                raise ConfigError(f"{name} must be a whole number >= 0, not {value!r}")
        threads = self.threads_per_worker
        if threads is not None and (not isinstance(threads, int) or threads < 0):
            raise ConfigError(f"threads_per_worker must be a whole number >= 0, not {threads!r}")
        if self.max_output_bytes < 1024:
            raise ConfigError("max_output_bytes must be at least 1024")
        if self.max_start_failures < 1:
            raise ConfigError("max_start_failures must be at least 1")
        return self

    @property
    def memory_limit_bytes(self) -> int | None:
        """The memory limit in bytes, or None when there is none."""
        return self.max_memory_mb * 1024 * 1024 if self.max_memory_mb else None

    @property
    def jobs_dir(self) -> Path:
        """Where job directories are created."""
        return Path(self.work_dir) / "jobs"

    def python_executable(self) -> str:
        """The interpreter the template runs on."""
        import sys

        return self.python or sys.executable

    @property
    def compile_cache_dir(self) -> Path:
        """The Neuron compile cache directory."""
        if self.neuron_cache_dir is not None:
            return Path(self.neuron_cache_dir)
        from_env = os.environ.get("NEURON_COMPILE_CACHE_URL")
        return Path(from_env) if from_env else Path(self.work_dir) / "neuron-compile-cache"

    def template_env(self, neuron: bool = False) -> dict[str, str]:
        """The environment the template (and every worker and job) starts with."""
        env = {k: v for k, v in os.environ.items() if k not in self.scrub_env}
        env.update(dict(self.extra_env))
        if neuron:
            from warm_pool import neuron as neuron_env

            for name in neuron_env.CONFLICTING_ENV:
                env.pop(name, None)
            env.setdefault("PJRT_DEVICE", "NEURON")
            env.update(neuron_env.compile_cache_env(self.compile_cache_dir,
                                                    self.neuron_retry_failed_compilation,
                                                    env.get("NEURON_CC_FLAGS", "")))
        return env
