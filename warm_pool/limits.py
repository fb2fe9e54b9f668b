"""What a job may use, judged from outside it: memory, output, disk, and what it leaves.

The monitor thread and the finisher call these; each measures (usage.py: /proc and the
file system, never what the worker says) and returns a verdict (why the job must stop,
with the text its result will carry). The supervisor acts.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from warm_pool import usage
from warm_pool.config import PoolConfig
from warm_pool.usage import MIB

if TYPE_CHECKING:
    from warm_pool.records import Job, Worker



@dataclass(frozen=True)
class Verdict:
    """Why a job must stop: a key of outcome.STOP_OUTCOMES, and the message for its result."""

    reason: str
    detail: str | None = None


def disk(config: PoolConfig, job: Job, uid: int | None) -> Verdict | None:
    """disk_limit when the job's files reached max_disk_mb or max_job_files."""
    used, files = usage.disk_usage((job.job_dir, job.tmp_dir), uid, config.max_job_files)
    if used >= config.max_disk_mb * MIB:
        return Verdict("disk_limit", f"the job's files reached max_disk_mb={config.max_disk_mb}")
    if files > config.max_job_files:
        return Verdict("disk_limit", f"the job created more than max_job_files={config.max_job_files} files")
    return None


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
