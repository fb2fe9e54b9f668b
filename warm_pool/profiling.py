"""Profiled jobs on neuron: which slot each one is kept for, until a process opened for it is ready.

The Neuron runtime reads its profiler's settings when it starts in a process
(neuron/profile.py), and a spare on neuron starts it as soon as its NeuronCore is free. So
a profiled job cannot take the spare that holds its core: it needs a process that starts
the runtime for it. When such a job is next in line for a slot, the slot is *kept* for it:
the spares holding or opening the core are retired (they never ran a job, so only their
runtime's start is lost), and once the core is free the next spare opens it with the
profiler on, writing into the job's dir (supervisor._open_device); that process takes the
job and no other::

    queued profiled job ─▶ plan: keep a free slot ─▶ retire its ready spare ─▶ core free
        ─▶ open_device(profiler settings) ─▶ worker_ready ─▶ job_for: that job ─▶ run_job

If the runtime does not start with the profiler on (MAX_OPENS processes opened for the
job failed), the job is let go: it runs on an ordinary process, and its result says why.
Otherwise each failed start would be followed by another, for ever (a parked spare's
ready resets the pool's count of start failures).

`ProfileSlots` only decides; the supervisor owns the workers and acts on what it returns.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from warm_pool.records import Job

# Processes opened for one profiled job before it runs without a profile.
MAX_OPENS = 2


class ProfileSlots:
    """The slots kept for profiled jobs (the supervisor loop's alone)."""

    def __init__(self, size: int):
        self.size = size
        self.kept: dict[int, Job] = {}  # slot → the profiled job it is kept for

    def plan(self, queued: list[Job], busy: set[int], ready: set[int],
             own_process: Callable[[Job], bool]) -> list[tuple[int, str | None]]:
        """Keep a free slot for each profiled job in line, oldest job first: an older job
        of any kind takes a ready spare (`ready`: slots with one) before it. A slot whose
        job left the queue (cancelled) is given back. Returns the slots whose spares that
        hold or open the core must be retired, each with the job id whose process is kept
        (None: none is)."""
        retire: list[tuple[int, str | None]] = []
        for slot, job in list(self.kept.items()):
            if job not in queued:
                del self.kept[slot]
                retire.append((slot, None))
        free = [s for s in range(self.size) if s not in busy and s not in self.kept]
        waiting = list(self.kept.values())
        for job in queued:
            if not free:
                break
            if not own_process(job):
                slot = next((s for s in free if s in ready), None)
            elif job not in waiting:
                slot = min(free, key=lambda s: s in ready)  # a core no spare holds, if any
                self.kept[slot] = job
                retire.append((slot, job.spec.job_id))
            else:
                continue
            if slot is not None:
                free.remove(slot)
        return retire

    def opening(self, slot: int) -> Job | None:
        """The job whose settings the slot's next runtime starts with, if it is kept for
        one; after MAX_OPENS processes opened for it, none: the job is let go, told why."""
        job = self.kept.get(slot)
        if job is None or job.ended_mono is not None:
            return None
        if job.profile_opens >= MAX_OPENS:
            del self.kept[slot]
            job.profile_unavailable = (f"its Neuron runtime did not start with the profiler on ({MAX_OPENS} "
                                       "processes tried, counted in /health?verbose=1 as "
                                       "respawns.by_reason.start_failed); the job ran without it")
            return None
        job.profile_opens += 1
        return job

    def job_for(self, worker: Any, queued: list[Job], own_process: Callable[[Job], bool]) -> Job | None:
        """The queued job a ready spare takes: the one its runtime was opened for, else the
        oldest that needs no process of its own (none on a slot kept for a profiled job)."""
        if worker.profile_job is not None:
            return next((j for j in queued if j.spec.job_id == worker.profile_job), None)
        if worker.slot in self.kept:
            return None
        return next((j for j in queued if not own_process(j)), None)

    def started(self, job: Job, slot: int) -> None:
        """The job started: its slot is no longer kept."""
        if self.kept.get(slot) is job:
            del self.kept[slot]
