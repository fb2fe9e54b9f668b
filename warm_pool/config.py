"""The pool's settings: one frozen object, each setting declared once (see settings.py).

A field made with `setting()` is an operator setting: it has a flag and an environment
variable in the service, a bounds check, and a line in docs/configuration.md. The plain
fields at the end are for code that embeds the library (tests, benchmarks).
"""

from __future__ import annotations

import os
import re
import sys
from dataclasses import dataclass
from pathlib import Path

from warm_pool import job_env
from warm_pool.neuron import LOG_LEVELS as NEURON_LOG_LEVELS
from warm_pool.settings import ConfigError, check_all, label, setting
from warm_pool.usage import MIB

BACKENDS = ("auto", "cpu", "xla", "neuron")
ISOLATIONS = ("auto", "uid", "none")

# Modules each backend's template imports before any worker is forked.
PRELOAD = {
    # torch._dynamo: the first optimizer.step() imports it (~900 modules), which registers
    # atexit handlers and rebinds torch.manual_seed; imported here it costs a job nothing
    # and does not make the worker look dirty. (torch_xla imports it itself.)
    "cpu": ("torch", "torch._dynamo"),
    "xla": ("torch", "torch_xla"),
    "neuron": ("torch", "torch_xla", "torch_neuronx"),
}

# What generated training scripts commonly import beyond torch (the `preload` setting's
# default; those not installed are skipped). preload.py adds what their common calls
# import later and warms up what they fill lazily.
DEFAULT_PRELOAD = ("numpy", "tqdm", "matplotlib.pyplot", "torchvision", "pandas", "sklearn", "transformers",
                   "datasets")

# Files a job leaves in its directory that are kept as its artifacts (the default of
# the `artifacts_pattern` setting): figures, checkpoints, metrics.
DEFAULT_ARTIFACTS = ("*.png", "*.jpg", "*.jpeg", "*.svg", "*.pdf", "*.pt", "*.pth", "*.json", "*.csv",
                     "*.txt")

# The job helpers this package ships (dataset_loader), importable by every job after
# the directories of the `job_path` setting.
JOB_HELPERS_DIR = Path(__file__).resolve().parent / "job_helpers"

# Environment variables the service may hold that job code must never see. Every
# EXECUTOR_* and AWS_* variable is scrubbed as well (placement.template_env): the service's
# cloud credentials (artifact upload) are not the jobs'.
DEFAULT_SCRUB_ENV = ("EXECUTOR_API_TOKEN", "EXECUTOR_API_TOKEN_FILE")
SCRUB_PREFIXES = ("EXECUTOR_", "AWS_")

_MODULE_NAME = re.compile(r"^[A-Za-z_]\w*(\.[A-Za-z_]\w*)*$")

__all__ = ["BACKENDS", "DEFAULT_ARTIFACTS", "DEFAULT_PRELOAD", "JOB_HELPERS_DIR", "PRELOAD", "ConfigError",
           "PoolConfig"]


@dataclass(frozen=True)
class PoolConfig:
    """Everything the pool needs to know; each setting with its default and unit."""

    backend: str = setting(
        "auto", "pool backend: neuron if a Neuron device and torch_neuronx are present, else "
        "xla if torch_xla imports, else cpu (auto); a backend counts only once a worker proved it",
        choices=BACKENDS)
    pool_size: int | None = setting(
        None, "workers in the pool", minimum=1, maximum=64,
        none="one per NeuronCore on neuron, else 2")
    work_dir: Path = setting(
        Path("/var/lib/trainium-jobs"), "job directories (jobs/<job_id>/) and the job store live here")
    max_memory_mb: int | None = setting(
        None, "most memory a job may use (error_type memory_limit): with cgroups, all its "
        "processes charge (their own pages, tmpfs, /dev/shm, memfds, SysV shm, pipes) and the kernel "
        "enforces it; without, the resident memory of its processes, sampled",
        unit="MiB", minimum=0, zero="no limit", none="no limit")
    default_timeout: float = setting(
        600.0, "timeout of a job whose request names none; /health reports it as max_execution_time",
        unit="s", minimum=0.001)
    max_timeout: float = setting(
        7200.0, "the longest a job may run; the service runs a request asking for more with this "
        "and says so in its result (timeout_clamped_from)", unit="s", minimum=0.001)
    kill_grace: float = setting(
        2.0, "after a timeout, cancel or shutdown the job gets SIGINT (KeyboardInterrupt), and "
        "SIGKILL this much later", unit="s", minimum=0.001)
    reuse_workers: bool = setting(
        False, "reuse a worker process for job after job (the Neuron runtime starts once per "
        "process, ~7 s on trn1), restoring and checking it between jobs; weaker isolation between "
        "papers (docs/security.md says what it does not stop). Off: one fresh process per job")
    spares_per_slot: int = setting(
        5, "processes each slot keeps forked, confined and warmed for its next jobs (5 on 2 slots: a "
        "batch of ten finds a process ready for each paper); each slot gets this many + 1 job uids "
        "(a finished job's uid is cleaned while the others serve)",
        minimum=1, maximum=8)
    max_jobs_per_worker: int = setting(
        100, "reuse mode: replace a worker after this many jobs even if it looks clean", minimum=0,
        zero="never")
    check_timeout: float = setting(
        10.0, "reuse mode: how long a worker may take to restore and check itself after a job "
        "before it is killed", unit="s", minimum=0.001)
    max_job_tasks: int = setting(
        4096, "most processes and threads a job may have at once (its pids cgroup; a fork or "
        "thread bomb meets EAGAIN)", minimum=0, zero="no cap")
    job_tmpfs_mb: int = setting(
        512, "each job process's own /tmp and /dev/shm (tmpfs in a private mount and IPC "
        "namespace, gone with the job; their pages count towards max_memory_mb)", unit="MiB",
        minimum=0, zero="no private /tmp, /dev/shm or IPC namespace (the slot's TMPDIR instead)")
    message_timeout: float = setting(
        2.0, "how long a message from a worker may stay half-sent before its job is stopped "
        "(error_type protocol_error)", unit="s", minimum=0.001)
    output_limit_mb: int = setting(
        256, "hard cap on what a job may write to each of stdout and stderr; beyond it the job is "
        "stopped (error_type output_limit) and what was kept is returned", unit="MiB", minimum=1,
        maximum=1024)
    max_disk_mb: int = setting(
        10_240, "most disk a job's files may take (its dir, its TMPDIR, its /dev/shm files); at it "
        "the job is stopped (error_type disk_limit); also the largest single file it may write",
        unit="MiB", minimum=1)
    max_job_files: int = setting(
        100_000, "most files and directories a job may create (error_type disk_limit beyond)",
        minimum=1)
    isolation: str = setting(
        "auto", "how jobs are kept from the service and from each other: uid (each worker slot its "
        "own unprivileged uid; needs root or CAP_SETUID, CAP_SETGID, CAP_KILL, CAP_CHOWN, "
        "CAP_DAC_OVERRIDE, CAP_FOWNER), none (the service's uid: development only), auto (uid when "
        "possible)", choices=ISOLATIONS)
    job_uid_base: int = setting(
        61_000, "worker slot k runs its jobs as uid and gid job_uid_base + k (no passwd entry needed)",
        minimum=1000, maximum=2**31 - 1000)
    job_groups: tuple[str, ...] = setting(
        (), "supplementary groups of the job uids, comma-separated names or gids (the Neuron "
        "devices' and the compile cache's group)",
        none="none; on neuron the group owning /dev/neuron0 when it is not root's")
    max_output_bytes: int = setting(
        1_000_000, "captured output kept per stream per job; beyond it the head and tail halves "
        "are kept and *_truncated_bytes says how much was cut", unit="bytes", minimum=1024)
    max_queue: int = setting(
        100, "accepted jobs waiting for a worker; beyond it new work is refused (503, Retry-After)",
        minimum=1)
    worker_start_timeout: float = setting(
        120.0, "how long a worker may take from fork to ready, device start included",
        unit="s", minimum=0.001)
    max_start_failures: int = setting(
        5, "failed starts in a row (a worker's confinement or device failed, or it exited or "
        "faulted before it was ready; the template's failed imports count as all of them) before "
        "the pool reports itself broken: it refuses jobs (503) and keeps trying, one worker at a "
        "time, at most 30 s apart, until one starts. Starts killed from outside (SIGKILL) never "
        "count. Between starts: 0.25 s doubling, to 2 s after killed ones and 10 s after failed "
        "ones", minimum=1)
    monitor_interval: float = setting(
        0.05, "how often running jobs' memory is measured", unit="s", minimum=0.001)
    threads_per_worker: int | None = setting(
        None, "intra-op threads per worker (torch.set_num_threads, OMP_NUM_THREADS), so jobs side "
        "by side do not oversubscribe the cores", minimum=0, zero="torch's default (every core)",
        none="cores / pool size, or OMP_NUM_THREADS if set")
    keep_job_dirs: bool = setting(
        False, "keep each job's directory after its result (debugging)")
    preload: tuple[str, ...] = setting(
        DEFAULT_PRELOAD, "modules the template imports once for every job, after the backend's own "
        "(torch...), comma-separated; `default` stands for the default list. One that is not "
        "installed, fails to import or starts a thread is skipped and reported in /health "
        "(pool.preload_skipped); a job importing a module that was not preloaded costs its worker")
    job_path: tuple[Path, ...] = setting(
        (), "directories of helper modules every job can import (after its own dir, before the "
        "shipped dataset_loader), comma-separated or the flag repeated; read-only to jobs: refused "
        "at start if writable by other users", repeat=True, none="only the shipped job helpers")
    datasets_dir: Path | None = setting(
        None, "data set cache handed to jobs as DATASET_CACHE_DIR (dataset_loader reads it; "
        "`trainium-executor datasets fetch` fills it); readable by every job, writable by none",
        none="<work_dir>/datasets")
    artifacts_pattern: tuple[str, ...] = setting(
        DEFAULT_ARTIFACTS, "files a job leaves in its directory (or below it) that are kept as its "
        "artifacts: shell patterns matched against file names, comma-separated", none="none kept")
    max_artifacts_mb: int = setting(
        100, "most bytes of artifacts kept per job (smallest files first; the rest are listed as "
        "skipped)", unit="MiB", minimum=0, zero="keep no artifacts")
    neuron_cores: tuple[int, ...] | None = setting(
        None, "NeuronCores to use on neuron, comma-separated", minimum=0,
        none="every core neuron-ls reports")
    neuron_log_level: str | None = setting(
        None, "NEURON_RT_LOG_LEVEL for workers", choices=NEURON_LOG_LEVELS,
        none="inherited, else ERROR")
    neuron_cache_dir: Path | None = setting(
        None, "persistent Neuron compile cache shared by every worker",
        none="$NEURON_COMPILE_CACHE_URL, else <work_dir>/neuron-compile-cache")
    neuron_cache_max_mb: int = setting(
        50_000, "Neuron compile cache cap; the oldest compiled modules are pruned at start beyond it",
        unit="MiB", minimum=0, zero="no cap")
    neuron_retry_failed_compilation: bool = setting(
        True, "add --retry_failed_compilation to NEURON_CC_FLAGS, so a compile killed with its job "
        "is retried instead of failing every later run of that graph")
    neuron_idle_growth_jobs: int = setting(
        3, "replace a worker whose idle device memory grew after this many jobs in a row",
        minimum=0, zero="never")
    neuron_profile_device: bool = setting(
        True, "a profiled job (\"profile\": true) gets device profiles too, not only the system profile: "
        "NEURON_RT_INSPECT_DEVICE_PROFILE=1, the first execution of each compiled graph on its NeuronCore "
        "(.ntff with its .neff)")
    neuron_profile_convert_timeout: float = setting(
        300.0, "longest `neuron-profile view` may take to convert a profiled job's profile for Perfetto "
        "(after the job, before its result is delivered; then it is stopped and the result says so)",
        unit="s", minimum=0, zero="never convert")
    job_env: tuple[str, ...] = setting(
        (), "variables given to every job, NAME=VALUE, the flag repeated or `;` between them (e.g. "
        "HF_TOKEN, NEURON_RT_LOG_LEVEL); every job can read them, so no secret of the service belongs "
        "here; names the pool sets (`PATH`, `HOME`, `TMPDIR`, `DATASET_CACHE_DIR`, "
        "`NEURON_RT_VISIBLE_CORES`, `LD_*`, `PYTHON*`, `EXECUTOR_*`, `AWS_*`, `HF_HOME`...) are refused "
        "at start (docs/job-environment.md)",
        repeat=True, separator=";", secret=True, none="none")
    job_env_file: Path | None = setting(
        None, "a file of NAME=VALUE lines (blank and # lines skipped) given to every job like "
        "job_env, whose entries win over it; keep it 0600: it may hold a token", none="none")
    hf_home: Path | None = setting(
        None, "a Hugging Face cache the operator filled: every job's HF_HOME, readable by every job, "
        "writable by none (refused at start otherwise); jobs then read models from it offline "
        "(HF_HUB_OFFLINE=1 unless job_env sets it)",
        none="each job's own .cache/huggingface in its dir")

    # --- for code embedding the library, not operator settings ------------------------
    # Interpreter for the template; None: the one running this process.
    python: str | None = None
    # Environment variables removed from the template's (and so every job's) environment.
    scrub_env: tuple[str, ...] = DEFAULT_SCRUB_ENV
    # Extra environment for the template and workers.
    extra_env: tuple[tuple[str, str], ...] = ()
    # Replace the backend's preload list (tests); None: PRELOAD[backend].
    backend_preload: tuple[str, ...] | None = None
    # Where the Neuron driver's sysfs counters live (tests point it at a fake tree).
    neuron_sysfs_root: Path = Path("/sys")

    def validate(self) -> PoolConfig:
        """Raise ConfigError naming the first bad setting; return self when all are fine."""
        check_all(self)
        bad = [name for name in self.preload if name != "default" and not _MODULE_NAME.match(name)]
        if bad:
            raise ConfigError(f"{label(PoolConfig, 'preload')}: {bad[0][:64]!r} is not a module name")
        self.job_environment()  # ConfigError naming job_env or job_env_file
        if self.default_timeout > self.max_timeout:
            raise ConfigError(f"{label(PoolConfig, 'default_timeout')} must not exceed "
                              f"{label(PoolConfig, 'max_timeout')}")
        return self

    @property
    def memory_limit_bytes(self) -> int | None:
        """The memory limit in bytes, or None when there is none."""
        return self.max_memory_mb * MIB if self.max_memory_mb else None

    @property
    def jobs_dir(self) -> Path:
        """Where job directories are created."""
        return Path(self.work_dir) / "jobs"

    @property
    def artifacts_dir(self) -> Path:
        """Where each job's artifacts are kept (<job_id>/<name>), closed to jobs."""
        return Path(self.work_dir) / "artifacts"

    @property
    def datasets_path(self) -> Path:
        """The data set cache (DATASET_CACHE_DIR of every job)."""
        return Path(self.datasets_dir) if self.datasets_dir is not None else Path(self.work_dir) / "datasets"

    @property
    def matplotlib_dir(self) -> Path:
        """matplotlib's config and font cache for the template: built once, kept across starts."""
        return Path(self.work_dir) / "matplotlib"

    def job_paths(self) -> tuple[str, ...]:
        """What every job has on sys.path after its own dir: the operator's dirs, then ours."""
        paths = [os.path.abspath(p) for p in self.job_path] + [str(JOB_HELPERS_DIR)]
        return tuple(dict.fromkeys(paths))

    def job_environment(self) -> dict[str, str]:
        """The operator's variables for every job: job_env_file's, then job_env's."""
        return job_env.parse(self.job_env, self.job_env_file,
                             labels=(label(PoolConfig, "job_env"), label(PoolConfig, "job_env_file")))

    def preload_list(self) -> tuple[str, ...]:
        """The optional preloads, `default` expanded, each once."""
        names: list[str] = []
        for name in self.preload:
            names.extend(DEFAULT_PRELOAD if name == "default" else (name,))
        return tuple(dict.fromkeys(names))

    def python_executable(self) -> str:
        """The interpreter the template runs on."""
        return self.python or sys.executable

    @property
    def compile_cache_dir(self) -> Path:
        """The Neuron compile cache directory."""
        if self.neuron_cache_dir is not None:
            return Path(self.neuron_cache_dir)
        from_env = os.environ.get("NEURON_COMPILE_CACHE_URL")
        return Path(from_env) if from_env else Path(self.work_dir) / "neuron-compile-cache"
