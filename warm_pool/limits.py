"""What a job may use, judged from outside it: memory, output, disk, and what it leaves.

The supervisor calls these on its monitor tick and when a job ends; each measures
(usage.py: /proc and the file system, never what the worker says) and returns a verdict
(why the job must stop, with the text its result will carry). The supervisor acts.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

from warm_pool import usage
from warm_pool.capture import Capture
from warm_pool.config import PoolConfig

if TYPE_CHECKING:
    from warm_pool.records import Job, Worker

_MIB = 1024 * 1024


@dataclass(frozen=True)
class Verdict:
    """Why a job must stop: a key of outcome.STOP_OUTCOMES, and the message for its result."""

    reason: str
    detail: str | None = None


def measure_running(config: PoolConfig, running: list[Worker]) -> Iterator[tuple[Worker, Verdict]]:
    """Memory of every process of each busy slot, and disk of each running job; record the
    peaks, and yield the jobs over a limit."""
    by_uid = usage.uid_usage({w.uid for w in running if w.uid is not None})
    limit = config.memory_limit_bytes
    for worker in running:
        job = worker.job
        rss = by_uid[worker.uid].rss_bytes if worker.uid is not None else usage.tree_rss(worker.pid)
        job.peak_memory_bytes = max(job.peak_memory_bytes, rss)
        if job.device is not None:
            job.device.sample()
        if limit and rss > limit:
            yield worker, Verdict("memory_limit")
            continue
        verdict = disk(config, job, worker.uid)
        if verdict is not None:
            yield worker, verdict


def disk(config: PoolConfig, job: Job, uid: int | None) -> Verdict | None:
    """disk_limit when the job's files reached max_disk_mb or max_job_files."""
    used, files = usage.disk_usage((job.job_dir, job.tmp_dir), uid, config.max_job_files)
    if used >= config.max_disk_mb * _MIB:
        return Verdict("disk_limit", f"the job's files reached max_disk_mb={config.max_disk_mb}")
    if files > config.max_job_files:
        return Verdict("disk_limit", f"the job created more than max_job_files={config.max_job_files} files")
    return None


def at_end(config: PoolConfig, capture: Capture, job: Job, uid: int | None) -> Verdict | None:
    """A limit the job reached even if it ended on its own before a tick saw it (a write
    failing at a cap raises in the job)."""
    over = capture.over_limit(job.spec.job_id)
    if over:
        return Verdict("output_limit", f"{over} exceeded output_limit_mb={config.output_limit_mb}")
    return disk(config, job, uid)


def leftovers(worker: Worker) -> list[str]:
    """What a job left in its worker's slot that the worker itself should have ended: the
    slot's other processes (killed here) and its /dev/shm files (removed).

    Threads are the worker's own check (Python threads still running make it dirty);
    counting them from outside cannot tell a job's thread from one a runtime starts when
    it first meets a new graph (XLA does), and would replace every such worker.
    """
    found = []
    if worker.uid is not None:
        slot = usage.uid_usage({worker.uid})[worker.uid]
        # Processes the worker's kill(-1) reached may not have finished exiting: those
        # are on their way out; one without a pending SIGKILL escaped it.
        others = [p for p in slot.pids if p != worker.pid and p not in slot.dying]
        if others:
            usage.kill_pids(others)
            found.append(f"{len(others)} processes of the job outlived it")
        usage.remove_shm(worker.uid)
    return found
