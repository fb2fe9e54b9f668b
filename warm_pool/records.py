"""What the supervisor knows of each job and each worker (its records; it alone changes them)."""

from __future__ import annotations

import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from typing import Any

from warm_pool import protocol
from warm_pool.result import JobSpec, WorkerRef


@dataclass(eq=False)
class Job:
    """A job from submit() until its result is set."""

    spec: JobSpec
    future: Future
    on_start: Callable | None
    main_path: str
    job_dir: str
    timeout: float
    tmp_dir: str = ""  # the slot's, set when a worker takes the job
    uid: int | None = None  # the slot's, set when a worker takes the job (isolation uid)
    submitted_mono: float = field(default_factory=time.monotonic)
    submitted_at: float = field(default_factory=time.time)
    started_mono: float | None = None
    started_at: float | None = None
    ended_mono: float | None = None
    deadline: float | None = None
    kill_at: float | None = None
    stop_reason: str | None = None  # a key of outcome.STOP_OUTCOMES
    stop_detail: str | None = None
    peak_memory_bytes: int = 0        # RSS of its processes, sampled, and the kernel's peak RSS
    own_peak_bytes: int | None = None  # its cgroup's peak (None: no cgroup)
    oom_kills: int = 0                # the kernel's OOM kills in its cgroup
    one_job: bool = True              # its process ends with it (False: the reuse mode)
    done: protocol.JobDone | None = None  # the worker's claim (reuse mode: how it ended)
    exit_status: int | None = None  # of its process (the reuse mode: of a worker that died)
    worker: WorkerRef | None = None
    device: Any = None  # neuron.PeakTracker of the job's NeuronCore
    peak_device_bytes: int | None = None
    # A profiled job (spec.profile): where its runtime writes the profile, once it started on
    # a process opened for it; else why it has none.
    profile_dir: str | None = None
    profile_unavailable: str | None = None
    profile_opens: int = 0  # processes opened for it, with the profiler on (profiling.py)


@dataclass(eq=False)
class Worker:
    """One worker process as the supervisor sees it."""

    id: int
    slot: int
    core: int | None
    uid: int | None
    conn: Connection
    one_job: bool = True
    group: Any = None  # its cgroups.Group (None without kernel accounts)
    reader: Any = None  # protocol.FrameReader of its channel
    state: str = "starting"  # starting | parked | opening | idle | busy | checking | stopping
    pid: int | None = None
    spawned_mono: float = field(default_factory=time.monotonic)
    ready_seconds: float | None = None
    preloaded: tuple[str, ...] = ()
    device: str | None = None
    confinement: dict[str, str] = field(default_factory=dict)
    jobs_run: int = 0
    job: Job | None = None
    retire_reason: str | None = None
    channel_closed_mono: float | None = None
    check_started_mono: float | None = None  # reuse mode: when its after-job check began
    checks: int = 0                # jobs after which it restored and checked itself
    check_seconds: float = 0.0     # the time those checks took, in all
    growth: Any = None  # neuron.IdleGrowth of its core's idle device memory
    profile_job: str | None = None  # the profiled job its runtime was started for (it takes no other)

    def stats(self) -> dict[str, Any]:
        """What /health shows of this worker."""
        return {
            "id": self.id, "pid": self.pid, "state": self.state, "core": self.core, "slot": self.slot,
            "uid": self.uid, "jobs_run": self.jobs_run, "device": self.device,
            "preloaded": list(self.preloaded), "confinement": dict(self.confinement),
            "ready_seconds": round(self.ready_seconds, 4) if self.ready_seconds else None,
            "check_ms_mean": round(1000 * self.check_seconds / self.checks, 3) if self.checks else None,
            "current_job": self.job.spec.job_id if self.job else None,
        }
