"""Turning what the supervisor saw of a job into its JobResult (pure functions).

What decides a result, in order: why the supervisor stopped the job, if it did
(timeout, a limit, a cancel, a protocol violation, shutdown); else what the worker
reported (exit status as CPython gives it, the job's exception); else how the worker
process ended when it died without reporting (a signal, an exit status).
"""

from __future__ import annotations

import time
import traceback
from collections.abc import Callable

from warm_pool import errors
from warm_pool.config import PoolConfig
from warm_pool.protocol import JOB_ERROR_TYPES, JobDone
from warm_pool.records import Job
from warm_pool.result import (
    STATUS_CANCELLED,
    STATUS_COMPLETED,
    STATUS_INTERRUPTED,
    JobResult,
    JobSpec,
    WorkerRef,
)
from warm_pool.usage import MIB

# Why a job was stopped → its status and error_type.
STOP_OUTCOMES = {
    "timeout": (STATUS_COMPLETED, "timeout"),
    "memory_limit": (STATUS_COMPLETED, "memory_limit"),
    "output_limit": (STATUS_COMPLETED, "output_limit"),
    "disk_limit": (STATUS_COMPLETED, "disk_limit"),
    "protocol_error": (STATUS_COMPLETED, "protocol_error"),
    "cancelled": (STATUS_CANCELLED, "cancelled"),
    "interrupted": (STATUS_INTERRUPTED, "interrupted"),
}


def build_result(job: Job, worker: WorkerRef | None, config: PoolConfig,
                 read_output: Callable[[str, int], tuple[str, int]]) -> JobResult:
    """The result of a job that was handed to a worker (or cancelled before);
    `read_output(stream, cap)` gives a stream's text within the cap and the bytes cut."""
    now, now_mono = time.time(), time.monotonic()
    cap = config.max_output_bytes
    stdout, out_cut = read_output("stdout", cap)
    stderr, err_cut = read_output("stderr", cap)
    done, return_code = job.done, job.exit_status
    status, error_type, message = STATUS_COMPLETED, None, None
    if job.one_job and job.started_mono is not None:
        error_type, message = exit_outcome(return_code, done)
    elif done is not None:
        return_code, error_type, message = done.return_code, done.error_type, done.error_message
    elif return_code is not None and return_code != 0:
        error_type = "signal" if return_code < 0 else "exit"
        message = f"worker {errors.describe_exit(return_code)}"
    elif job.started_mono is not None:
        error_type, message = "worker_crashed", "the worker died and its exit status is unknown"
    if job.stop_reason is None and job.oom_kills:  # the kernel enforced the memory limit
        job.stop_reason = "memory_limit"
    if job.stop_reason:
        status, error_type = STOP_OUTCOMES[job.stop_reason]
        message = stop_message(job, config)
    claimed = done.peak_rss_bytes if done is not None and not job.one_job else 0
    peak = max(job.peak_memory_bytes, claimed)
    started = job.started_mono
    ended = job.ended_mono or now_mono
    return JobResult(
        job_id=job.spec.job_id, paper_id=job.spec.paper_id, status=status,
        return_code=return_code, stdout=stdout, stderr=stderr,
        stdout_truncated_bytes=out_cut, stderr_truncated_bytes=err_cut,
        timeout=job.stop_reason == "timeout", error_type=error_type, error_message=message,
        execution_time=(ended - started) if started is not None else 0.0,
        queue_time=((started if started is not None else now_mono) - job.submitted_mono),
        submitted_at=job.submitted_at, started_at=job.started_at, finished_at=now,
        peak_memory_mb=round(peak / MIB, 3) if peak else None,
        peak_memory_own_mb=round(job.own_peak_bytes / MIB, 3) if job.own_peak_bytes is not None else None,
        peak_device_memory_mb=(round(job.peak_device_bytes / MIB, 3)
                               if job.peak_device_bytes is not None else None),
        worker=worker if started is not None else None,
        **_no_profile(job),
    )


def _no_profile(job: Job) -> dict[str, str]:
    """A profiled job that had no profile captured: why (the finisher keeps a captured one)."""
    if not job.spec.profile or job.profile_dir is not None:
        return {}
    why = job.profile_unavailable or "the job never started"
    return {"profile": "unavailable", "profile_detail": why}


def exit_outcome(return_code: int | None, claim: JobDone | None) -> tuple[str | None, str | None]:
    """error_type and message of a job whose process ended with `return_code` (its wait
    status, the truth), given what the process claimed before it ended. The claim only
    names the kind of a failure the status already shows, from a fixed set."""
    if return_code is None:
        return "worker_crashed", "the job's process ended and its exit status is unknown"
    if return_code == 0:
        return None, None
    if claim is not None and claim.return_code == return_code and claim.error_type in JOB_ERROR_TYPES:
        return claim.error_type, claim.error_message
    if return_code < 0:
        return "signal", f"the job's process was {errors.describe_exit(return_code)}"
    return "exit", errors.describe_exit(return_code)


def internal_result(job: Job, detail: str) -> JobResult:
    """The result of a job whose result could not be built (a bug of ours, said so)."""
    return JobResult.not_run(job.spec.job_id, job.spec.paper_id, STATUS_COMPLETED, "internal",
                             f"the service could not build this job's result: {detail[-500:]}",
                             submitted_at=job.submitted_at, started_at=job.started_at)


def stop_message(job: Job, config: PoolConfig) -> str:
    """The error_message of a job the supervisor stopped."""
    reason = job.stop_reason
    if job.stop_detail:
        return job.stop_detail
    if reason == "timeout":
        return f"timed out after {job.timeout:g} s"
    if reason == "memory_limit":
        how = " (the kernel's OOM killer stopped it)" if job.oom_kills else ""
        return f"the job's processes exceeded max_memory_mb={config.max_memory_mb}{how}"
    if reason == "cancelled":
        return "cancelled"
    return "the pool shut down while the job ran"


def syntax_error(code: str, path: str) -> tuple[str, str] | None:
    """CPython's report of a syntax error in main.py, or None if the code compiles."""
    try:
        compile(code, path, "exec", dont_inherit=True)
    except (SyntaxError, ValueError) as exc:
        text = "".join(traceback.format_exception_only(type(exc), exc))
        return text, text.strip().splitlines()[-1]
    return None


def syntax_result(spec: JobSpec, stderr: str, message: str) -> JobResult:
    """The result of a script that does not compile: no worker is spent on it."""
    now = time.time()
    profile = {"profile": "unavailable", "profile_detail": "the script does not compile: it never ran"}
    return JobResult(job_id=spec.job_id, paper_id=spec.paper_id, return_code=1, stderr=stderr,
                     error_type="syntax_error", error_message=message, submitted_at=now,
                     started_at=now, finished_at=now, **(profile if spec.profile else {}))
