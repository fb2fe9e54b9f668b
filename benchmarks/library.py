"""The warm pool driven as a library (no HTTP): the floor the service builds on.

Every measure takes a started, ready WarmPool. Times are the caller's wall clock from
`submit` to the Future's result unless the name says otherwise.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import signal
import time
from pathlib import Path
from typing import Any

from benchmarks import workloads
from benchmarks.report import run_clients, summarize
from warm_pool import JobSpec, PoolConfig, WarmPool

_ids = itertools.count()
# Each pool of a run, and the service it starts, gets job uids of its own, apart from any
# service or test run on the machine (a pool refuses uids that a live pool holds).
_UID_BASES = itertools.count(3_000_000 + (os.getpid() % 20_000) * 20_000, 32)


def job_uid_base() -> int:
    return next(_UID_BASES)


def start_pool(backend: str, work_dir: Path, size: int = 2, timeout: float = 180.0,
               isolation: str = "auto", backend_preload: tuple[str, ...] | None = None,
               reuse_workers: bool = False) -> tuple[WarmPool, float]:
    """Start a pool and wait until all `size` workers are idle; return it and the seconds it took."""
    pool = WarmPool(PoolConfig(backend=backend, pool_size=size, work_dir=work_dir, isolation=isolation,
                               backend_preload=backend_preload, job_uid_base=job_uid_base(),
                               reuse_workers=reuse_workers))
    start = time.perf_counter()
    pool.start()
    if not pool.wait_ready(timeout) or not wait_idle(pool, size, timeout):
        stats = pool.stats().to_json()
        pool.shutdown(grace=1)
        raise RuntimeError(f"{backend} pool not ready: {stats.get('broken_reason') or stats}")
    return pool, time.perf_counter() - start


def wait_idle(pool: WarmPool, count: int, timeout: float, exclude: set[int] = frozenset(),
              poll: float = 0.0005) -> bool:
    """Poll stats() until `count` workers are idle (none of them a pid in `exclude`)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        idle = [w for w in pool.stats().workers if w["state"] == "idle" and w["pid"] not in exclude]
        if len(idle) >= count:
            return True
        time.sleep(poll)
    return False


def wait_spares(pool: WarmPool, timeout: float = 60.0, poll: float = 0.0005) -> bool:
    """Poll stats() until every slot has all its spares ready (a job then finds one)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        stats = pool.stats().to_json()
        spares = stats.get("spares", {})
        if not spares.get("starting") and stats["idle"] == stats["size"]:
            return True
        time.sleep(poll)
    return False


def run_job(pool: WarmPool, code: str, timeout: float = 120.0):
    """Submit one job and wait; return (wall seconds, JobResult)."""
    start = time.perf_counter()
    result = pool.submit(JobSpec(code=code, job_id=f"b{next(_ids)}", timeout=timeout)).result()
    return time.perf_counter() - start, result


def latencies(pool: WarmPool, code: str, runs: int, warmup: int = 4) -> dict[str, Any]:
    """Submit→result wall times of one script, plus the pool's own execution and queue times."""
    size = pool.config.pool_size or 2
    wait_idle(pool, size, 120)  # let replacements from earlier sections finish first
    for _ in range(warmup):  # first use of an op in a worker (lazy init, XLA compile)
        _check(run_job(pool, code)[1])
    wait_idle(pool, size, 120)
    respawns_before = dict(pool.stats().respawns_by_reason)
    walls, execs, queues = [], [], []
    for _ in range(runs):
        # A job that finds a spare ready: what a caller meets unless jobs come faster than
        # spares are made (throughput() measures that case).
        wait_spares(pool)
        wall, result = run_job(pool, code)
        _check(result)
        walls.append(wall)
        execs.append(result.execution_time)
        queues.append(result.queue_time)
    out = summarize(walls)
    out["execution"] = summarize(execs)
    out["queue"] = summarize(queues)
    after = pool.stats().respawns_by_reason
    # Workers replaced while this workload ran (e.g. "dirty": the job left state behind).
    out["respawns_during"] = {k: v - respawns_before.get(k, 0) for k, v in after.items()
                              if v - respawns_before.get(k, 0)}
    return out


def _check(result) -> None:
    if result.return_code != 0 or result.error_type:
        raise RuntimeError(f"warm job failed ({result.error_type}): {result.stderr.strip()[-500:]}")


def replacement(pool: WarmPool, kills: int, size: int) -> dict[str, Any]:
    """SIGKILL an idle worker; time until a replacement is idle (stats() polled every 0.5 ms)."""
    times, ready = [], []
    for _ in range(kills):
        for _attempt in range(5):  # a spare listed idle may have ended since the snapshot
            wait_idle(pool, size, 60)
            workers = pool.stats().workers
            known = {w["pid"] for w in workers}
            victim = next(w["pid"] for w in workers if w["state"] == "idle")
            start = time.perf_counter()
            try:
                os.kill(victim, signal.SIGKILL)
                break
            except ProcessLookupError:
                time.sleep(0.05)
        # A new process (not one of the spares already there) idle in the victim's place.
        if not wait_idle(pool, 1, 60, exclude=known):
            raise RuntimeError("no replacement worker became idle within 60 s")
        times.append(time.perf_counter() - start)
        ready.extend(w["ready_seconds"] for w in pool.stats().workers
                     if w["pid"] not in known and w["ready_seconds"])
    out = summarize(times)
    out["worker_fork_to_ready"] = summarize(ready)
    out["respawns"] = pool.stats().to_json()["respawns"]
    return out


def timeout_delay(pool: WarmPool, code: str, runs: int, timeout: float = 0.5) -> dict[str, Any]:
    """Time from a job's deadline (start + timeout) to the caller holding its result."""
    delays = []
    for _ in range(runs):
        wait_idle(pool, 1, 60)
        fut = pool.submit(JobSpec(code=code, job_id=f"t{next(_ids)}", timeout=timeout))
        result = fut.result()
        got = time.time()
        if result.error_type != "timeout":
            raise RuntimeError(f"expected a timeout, got {result.error_type}")
        delays.append(got - (result.started_at + timeout))
    out = summarize(delays)
    out["timeout_s"] = timeout
    out["kill_grace"] = pool.config.kill_grace
    return out


def memory(pool: WarmPool, jobs: int, code: str) -> dict[str, Any]:
    """Template RSS and each idle worker's RSS/USS/PSS, before and after `jobs` jobs."""
    wait_idle(pool, pool.config.pool_size or 2, 60)
    size = pool.config.pool_size or 2
    before = memory_snapshot(pool_pids(pool))
    # `size` at a time so every worker runs its share: one after another, the first idle
    # worker would take them all and reach max_jobs_per_worker (recycled) at 100.
    for start in range(0, jobs, size):
        futures = [pool.submit(JobSpec(code=code, job_id=f"m{next(_ids)}", timeout=120))
                   for _ in range(min(size, jobs - start))]
        for fut in futures:
            _check(fut.result())
    wait_idle(pool, size, 30)
    after = memory_snapshot(pool_pids(pool))
    jobs_run = {str(w["pid"]): w["jobs_run"] for w in pool.stats().workers}
    return {"jobs": jobs, "before": before, "after": after, "growth": growth(before, after),
            "jobs_run_by_worker": jobs_run, "max_jobs_per_worker": pool.config.max_jobs_per_worker}


def pool_pids(pool: WarmPool) -> tuple[int | None, list[int]]:
    """(template pid, idle worker pids) of a library pool."""
    stats = pool.stats().to_json()
    return stats["template_pid"], [w["pid"] for w in stats["workers"] if w["state"] == "idle"]


def memory_snapshot(pids: tuple[int | None, list[int]]) -> dict[str, Any]:
    """Template RSS and per-worker RSS/USS/PSS in MiB (psutil memory_full_info)."""
    import psutil

    template, workers = pids
    snap: dict[str, Any] = {"template_rss_mb": None, "workers": {}}
    if template:
        snap["template_rss_mb"] = _mb(psutil.Process(template).memory_info().rss)
    for pid in workers:
        try:
            full = psutil.Process(pid).memory_full_info()
        except (psutil.Error, OSError) as exc:
            snap["workers"][str(pid)] = {"error": str(exc)}
            continue
        snap["workers"][str(pid)] = {"rss_mb": _mb(full.rss), "uss_mb": _mb(full.uss),
                                     "pss_mb": _mb(getattr(full, "pss", 0)),
                                     "shared_mb": _mb(full.rss - full.uss)}
    return snap


def growth(before: dict[str, Any], after: dict[str, Any]) -> dict[str, Any]:
    """Per-worker change in USS/PSS/RSS for workers present in both snapshots."""
    out = {}
    for pid, row in after["workers"].items():
        old = before["workers"].get(pid)
        if old and "error" not in old and "error" not in row:
            out[pid] = {k: round(row[k] - old[k], 2) for k in ("rss_mb", "uss_mb", "pss_mb")}
        else:
            out[pid] = "new worker (the old one was recycled)"
    return out


def _mb(n: int) -> float:
    return round(n / 2**20, 2)


def throughput(pool: WarmPool, clients: int, max_jobs: int, max_seconds: float) -> dict[str, Any]:
    """Empty jobs per second with `clients` threads each submitting and waiting in a loop."""
    def job() -> None:
        _check(run_job(pool, workloads.EMPTY)[1])

    return run_clients(clients, max_jobs, max_seconds, lambda: contextlib.nullcontext(job))


def isolation_overhead(backend: str, work_dir: Path, runs: int) -> dict[str, Any]:
    """Empty-job latency side by side: one process per job with jobs under their own uids
    (uid: a uid per seat, Landlock, cgroup, namespaces, every process of the uid killed
    after the job), the same under the service's uid (none), and the reuse mode (reuse:
    one worker for job after job, uid isolation), with what its after-job restore and
    fingerprint check cost (after the result)."""
    out: dict[str, Any] = {}
    for isolation, reuse in (("uid", False), ("none", False), ("reuse", True)):
        pool, _ = start_pool(backend, work_dir / f"{backend}-iso-{isolation}",
                             isolation="auto" if reuse else isolation, reuse_workers=reuse)
        try:
            if pool.stats().isolation != ("uid" if reuse else isolation):
                out[isolation] = {"skipped": f"isolation {isolation} not possible here"}
                continue
            out[isolation] = latencies(pool, workloads.EMPTY, runs, warmup=5)
            checks = [w["check_ms_mean"] for w in pool.stats().workers if w["check_ms_mean"]]
            out[isolation]["check_ms_mean"] = round(sum(checks) / len(checks), 3) if checks else None
        finally:
            pool.shutdown(grace=5)
    uid, none = out["uid"].get("p50_ms"), out["none"].get("p50_ms")
    out["uid_minus_none_p50_ms"] = round(uid - none, 3) if uid is not None and none is not None else None
    return out
