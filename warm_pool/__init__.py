"""Warm pool: workers forked from a pre-importing template, one device each.

Public API (everything the HTTP service uses comes from here)::

    from warm_pool import WarmPool, PoolConfig, JobSpec, JobResult

    pool = WarmPool(PoolConfig(backend="cpu", pool_size=2, work_dir=Path("/tmp/w")))
    pool.start()                       # template + workers start in the background
    pool.wait_ready(timeout=60)        # True once at least one worker is ready
    fut = pool.submit(JobSpec(code="print('hi')", job_id="j1", paper_id="p1",
                              timeout=600.0), on_start=callback)
    result: JobResult = fut.result()   # job failures are results, never exceptions
    pool.cancel("j1")                  # queued or running; result.status == "cancelled"
    out: JobOutput | None = pool.output("j1", "stdout", offset=0, limit=65536)
                                       # live output of a running job (None: not running)
    pool.condition()                   # Condition(state, broken_reason, size, isolation): cheap
    pool.stats()                       # PoolStats for /health: state, size, idle, busy, workers, ...
    result.artifacts                   # files the job left that were kept (artifacts.py;
                                       # artifacts.pack/unpack move them to another machine)
    pool.shutdown(grace=30.0)          # drain running jobs up to grace, then kill

``submit`` raises ``QueueFull``, ``PoolClosed`` or ``PoolBroken``; nothing else about a
job ever raises. ``contract.Pool`` declares these methods (the cluster's pool has them too).

Layout: this package's top level is the service's side (supervisor, seats, cgroups,
capture, limits, results; docs/pool.md has a line per module); ``child/`` is what runs
only in the template's and the jobs' processes, never imported by the service's.
"""

from warm_pool import artifacts, settings
from warm_pool.artifacts import Artifact
from warm_pool.capture import STREAMS, TRUNCATION_MARK, JobOutput
from warm_pool.config import BACKENDS, DEFAULT_ARTIFACTS, DEFAULT_PRELOAD, JOB_HELPERS_DIR, PoolConfig
from warm_pool.contract import POOL_STATES, Condition, Pool, PoolStats
from warm_pool.errors import PoolBroken, PoolClosed, PoolError, QueueFull
from warm_pool.pool import WarmPool
from warm_pool.protocol import error_text
from warm_pool.result import (
    ERROR_TYPES,
    JOB_ID_RE,
    PROFILE_STATES,
    STATUS_CANCELLED,
    STATUS_COMPLETED,
    STATUS_INTERRUPTED,
    STATUS_QUEUED,
    STATUS_RUNNING,
    TERMINAL_STATUSES,
    JobResult,
    JobSpec,
    WorkerRef,
    complete_future,
    utc_iso,
)
from warm_pool.settings import ConfigError

__all__ = [
    "BACKENDS", "DEFAULT_ARTIFACTS", "DEFAULT_PRELOAD", "ERROR_TYPES", "JOB_ID_RE", "JOB_HELPERS_DIR",
    "PROFILE_STATES", "POOL_STATES", "STATUS_CANCELLED", "STATUS_COMPLETED", "STATUS_INTERRUPTED",
    "STATUS_QUEUED", "STATUS_RUNNING", "STREAMS", "TERMINAL_STATUSES", "TRUNCATION_MARK", "Artifact",
    "Condition", "ConfigError", "JobOutput", "JobResult", "JobSpec", "Pool", "PoolBroken", "PoolClosed",
    "PoolConfig", "PoolError", "PoolStats", "QueueFull", "WarmPool", "WorkerRef", "artifacts",
    "complete_future", "error_text", "settings", "utc_iso",
]
