"""WarmPool: the library's public face (see the package docstring for its API).

It checks what a caller submits, writes the job's directory, answers syntax errors
without spending a worker, and hands the rest to the supervisor, which alone owns the
workers and the queue (`submit`, `cancel`, `snapshot`, `shutdown`).
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any

from warm_pool import outcome
from warm_pool.capture import STREAMS, JobOutput
from warm_pool.config import PoolConfig
from warm_pool.contract import Condition, PoolStats
from warm_pool.placement import Placement
from warm_pool.result import JobSpec
from warm_pool.supervisor import Job, Supervisor
from warm_pool.usage import MIB, process_rss


class WarmPool:
    """A pool of warm workers running scripts as `python main.py`."""

    def __init__(self, config: PoolConfig):
        self.config = config.validate()
        self.placement = Placement.plan(self.config)
        self.supervisor = Supervisor(self.config, self.placement)
        self._started = False

    # --- lifecycle ----------------------------------------------------------------------

    def start(self) -> WarmPool:
        """Start the template and workers in the background; return at once."""
        if not self._started:
            self._started = True
            self.placement.claim()
            self.placement.prepare_dirs()
            self.supervisor.start()
        return self

    def wait_ready(self, timeout: float | None = None) -> bool:
        """Wait until at least one worker is ready; False on timeout or a broken pool."""
        return self.supervisor.wait_ready(timeout)

    def shutdown(self, grace: float = 30.0) -> None:
        """Take no more jobs, give running ones `grace` seconds, then kill; no orphans."""
        self.supervisor.shutdown(grace)
        self.placement.release()

    def __enter__(self) -> WarmPool:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.shutdown()

    # --- jobs -------------------------------------------------------------------------

    def submit(self, spec: JobSpec, on_start: Callable | None = None) -> Future:
        """Queue a job; the Future's result is a JobResult (never raises for the job).

        `on_start(job_id, worker_ref)` runs in the supervisor's thread just before the job
        starts (keep it short). Raises QueueFull, PoolClosed or PoolBroken, and ValueError
        for a bad job id or timeout.
        """
        timeout = spec.checked_timeout(self.config.default_timeout, self.config.max_timeout)
        job_dir = os.path.join(self.config.jobs_dir, spec.job_id)
        main_path = os.path.join(job_dir, "main.py")
        future: Future = Future()
        syntax_error = outcome.syntax_error(spec.code, main_path)
        if syntax_error is not None:
            future.set_running_or_notify_cancel()
            future.set_result(outcome.syntax_result(spec, *syntax_error))
            return future
        _write_job_dir(job_dir, main_path, spec.code)
        job = Job(spec, future, on_start, main_path, job_dir, timeout)
        try:
            self.supervisor.submit(job)
        except Exception:
            shutil.rmtree(job_dir, ignore_errors=True)
            raise
        return future

    def cancel(self, job_id: str) -> bool:
        """Cancel a queued or running job; False if it is unknown or already finished."""
        return self.supervisor.cancel(job_id)

    def output(self, job_id: str, stream: str, offset: int = 0, limit: int = 65536) -> JobOutput | None:
        """Live output: up to `limit` bytes of what a running job wrote to `stream`
        ("stdout" or "stderr") from byte `offset` on, decoded as UTF-8 with replacement.

        None when the pool captures no output for the job: it has not started, is
        unknown, or has ended and its result was made (its output is in the result then;
        the capture is gone). ValueError for a bad stream, offset or limit.
        """
        if stream not in STREAMS:
            raise ValueError(f"stream must be one of {', '.join(STREAMS)}, not {stream!r}")
        return self.supervisor.read_output(job_id, stream, offset, limit)

    # --- health -----------------------------------------------------------------------

    def condition(self) -> Condition:
        """State, why it is broken, size and isolation: what every request's admission
        reads (no snapshot, no /proc read)."""
        sup = self.supervisor
        with sup.lock:
            return Condition(sup.state, sup.broken_reason, sup.size, self.placement.isolation)

    def stats(self) -> PoolStats:
        """The pool's state for /health: counts, workers, preloaded modules, respawns."""
        out = self.supervisor.snapshot()
        out["backend"] = out["backend"] or (None if self.config.backend == "auto" else self.config.backend)
        out["requested_backend"] = self.config.backend
        out["max_queue"] = self.config.max_queue
        out.update(self.placement.describe())
        # One small /proc read per worker, no walk over every process (/health reads this;
        # admission reads `condition` instead).
        for worker in out["workers"]:
            worker["rss_mb"] = round(process_rss(worker["pid"]) / MIB, 1) if worker["pid"] else None
        out["neuron"] = self._neuron_stats()
        return PoolStats.from_json(out)

    def _neuron_stats(self) -> dict[str, Any] | None:
        if not self.placement.neuron:
            return None
        from warm_pool import neuron

        info = self.placement.neuron_info
        cache = self.config.compile_cache_dir
        return {
            "available": bool(info and info.available),
            "reason": info.reason if info else None,
            "cores": self.placement.cores,
            "compile_cache": {"dir": str(cache), "size_mb": round(neuron.cache_size_bytes(cache) / MIB, 1),
                              "max_mb": self.config.neuron_cache_max_mb},
        }


def _write_job_dir(job_dir: str, main_path: str, code: str) -> None:
    if os.path.lexists(job_dir):  # left by an earlier run of the same id
        shutil.rmtree(job_dir, ignore_errors=True)
    os.mkdir(job_dir, 0o700)
    with open(main_path, "w", encoding="utf-8") as f:
        f.write(code)
