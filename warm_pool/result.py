"""What goes into the pool (JobSpec) and what comes out (JobResult).

JobResult.to_dict() gives the pool's part of a result as JSON-ready values: how the
job ended (status, success, return_code, error_type and error_message), its output and
truncation counts, its times, memory peaks and the worker that ran it. What the HTTP
callers' format adds from the code and the output (lines_of_code, has_training_loop,
the METRICS: values) is the service's business (executor_service/analysis.py).
"""

from __future__ import annotations

import datetime as _dt
import re
import time
from concurrent.futures import Future
from dataclasses import asdict, dataclass, field
from typing import Any

# Job status words.
STATUS_QUEUED = "queued"
STATUS_RUNNING = "running"
STATUS_COMPLETED = "completed"
STATUS_CANCELLED = "cancelled"
STATUS_INTERRUPTED = "interrupted"
TERMINAL_STATUSES = (STATUS_COMPLETED, STATUS_CANCELLED, STATUS_INTERRUPTED)

# What became of a profile the job asked for (JobResult.profile; null when it asked for none).
PROFILE_STATES = ("captured", "failed", "unavailable")

# Every error_type a result may carry (docs/api.md); null when the job succeeded.
ERROR_TYPES = frozenset({
    "exception", "syntax_error", "exit", "signal", "timeout", "memory_limit", "output_limit",
    "disk_limit", "protocol_error", "worker_crashed", "node_lost", "cancelled", "interrupted",
    "internal",
})


# A job id names the job's directory (and a paper id its files): a safe file name
# (not "." or "..", which the pattern lets through and `checked_timeout` refuses).
JOB_ID_RE = re.compile(r"^[A-Za-z0-9._-]{1,128}$")


@dataclass(frozen=True)
class JobSpec:
    """One script to run as `python main.py`.

    job_id names the job directory, so it must be a safe file name
    ([A-Za-z0-9._-]{1,128}); timeout is in seconds (None: the pool's default). `profile`:
    capture a Neuron profile of the job (on neuron, its process starts its runtime with
    the profiler on; elsewhere the result says it is unavailable).
    """

    code: str
    job_id: str
    paper_id: str | None = None
    timeout: float | None = None
    profile: bool = False

    def checked_timeout(self, default: float, most: float) -> float:
        """This job's timeout (`default` when it names none); ValueError for a job id
        that is not a safe file name or a timeout outside (0, most]."""
        if not JOB_ID_RE.fullmatch(self.job_id) or self.job_id in (".", ".."):
            raise ValueError(f"job_id must match {JOB_ID_RE.pattern}: {self.job_id!r}")
        timeout = default if self.timeout is None else float(self.timeout)
        if not (0 < timeout <= most):
            raise ValueError(f"timeout must be in (0, {most}] seconds")
        return timeout


@dataclass(frozen=True)
class WorkerRef:
    """Which worker ran a job."""

    id: int
    pid: int
    core: int | None = None


def utc_iso(ts: float | None) -> str | None:
    """Seconds since the epoch as an ISO-8601 UTC string (None stays None)."""
    if ts is None:
        return None
    return _dt.datetime.fromtimestamp(ts, _dt.timezone.utc).isoformat()


@dataclass
class JobResult:
    """The outcome of one job; failures of the job are described here, not raised."""

    job_id: str
    paper_id: str | None
    status: str = STATUS_COMPLETED
    return_code: int | None = None
    stdout: str = ""
    stderr: str = ""
    stdout_truncated_bytes: int = 0
    stderr_truncated_bytes: int = 0
    timeout: bool = False
    error_type: str | None = None
    error_message: str | None = None
    execution_time: float = 0.0
    queue_time: float = 0.0
    submitted_at: float | None = None
    started_at: float | None = None
    finished_at: float | None = None
    peak_memory_mb: float | None = None
    # What the job itself charged to its memory cgroup at most (its own pages, tmpfs,
    # shm, memfds, pipes; not the pages it shares with the template): None without cgroups.
    peak_memory_own_mb: float | None = None
    # The job's device-memory peak on its NeuronCore (neuron backend only).
    peak_device_memory_mb: float | None = None
    worker: WorkerRef | None = None
    # Files the job left that were kept (artifacts.Artifact: name, size, sha256), and
    # those that matched the pattern but were refused ({"name", "reason"}).
    artifacts: list[Any] = field(default_factory=list)
    artifacts_skipped: list[dict[str, str]] = field(default_factory=list)
    # The Neuron profile, when the job asked for one: one of PROFILE_STATES, and why.
    profile: str | None = None
    profile_detail: str | None = None

    @classmethod
    def not_run(cls, job_id: str, paper_id: str | None, status: str, error_type: str, message: str,
                **fields: Any) -> Any:
        """The result of a job that never ran to an outcome of its own (cancelled before it
        started, interrupted, lost, or its result could not be built): finished now."""
        fields.setdefault("finished_at", time.time())
        return cls(job_id=job_id, paper_id=paper_id, status=status, error_type=error_type,
                   error_message=message, **fields)

    @property
    def success(self) -> bool:
        """True when the script ran to exit status 0 within its limits."""
        return self.status == STATUS_COMPLETED and self.return_code == 0 and not self.error_type

    def to_dict(self) -> dict[str, Any]:
        """The JSON-ready result: how the job ended, its output, times and worker."""
        return {
            "job_id": self.job_id,
            "paper_id": self.paper_id,
            "status": self.status,
            "success": self.success,
            "execution_time": round(self.execution_time, 6),
            "return_code": self.return_code,
            "stdout": self.stdout,
            "stderr": self.stderr,
            "timeout": self.timeout,
            "peak_memory_mb": self.peak_memory_mb,
            "peak_memory_own_mb": self.peak_memory_own_mb,
            "peak_device_memory_mb": self.peak_device_memory_mb,
            "error_type": self.error_type,
            "error_message": self.error_message,
            "stdout_truncated_bytes": self.stdout_truncated_bytes,
            "stderr_truncated_bytes": self.stderr_truncated_bytes,
            "queue_time": round(self.queue_time, 6),
            "started_at": utc_iso(self.started_at),
            "finished_at": utc_iso(self.finished_at),
            "worker": asdict(self.worker) if self.worker else None,
            "artifacts": [a.name for a in self.artifacts],
            "artifacts_skipped": list(self.artifacts_skipped),
            "profile": self.profile,
            "profile_detail": self.profile_detail,
        }


def complete_future(future: Future, result: Any) -> None:
    """Give a job's future its result, unless it is done (a cancelled queued job's is)."""
    if not future.done():
        if not future.running():
            future.set_running_or_notify_cancel()
        future.set_result(result)
