"""Warm pool: workers forked from a pre-importing template, one device each.

Public API (the only names the HTTP service uses)::

    from warm_pool import WarmPool, PoolConfig, JobSpec, JobResult
    from warm_pool import errors

    pool = WarmPool(PoolConfig(backend="cpu", size=2, work_dir=Path("/tmp/w")))
    pool.start()                       # template + workers start in the background
    pool.wait_ready(timeout=60)        # True once at least one worker is ready
    fut = pool.submit(JobSpec(code="print('hi')", job_id="j1", paper_id="p1",
                              timeout=600.0), on_start=callback)
    result: JobResult = fut.result()   # job failures are results, never exceptions
    pool.cancel("j1")                  # queued or running; result.status == "cancelled"
    pool.stats()                       # dict for /health: backend, size, idle, busy, ...
    pool.shutdown(grace=30.0)          # drain running jobs up to grace, then kill

``submit`` raises ``errors.QueueFull``, ``errors.PoolClosed`` or
``errors.PoolBroken``; nothing else about a job ever raises.
"""

from warm_pool.config import PoolConfig
from warm_pool.pool import WarmPool
from warm_pool.result import JobResult, JobSpec

__all__ = ["JobResult", "JobSpec", "PoolConfig", "WarmPool"]
