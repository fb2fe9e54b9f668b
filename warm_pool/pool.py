"""WarmPool: the library's public face (see the package docstring for its API).

It prepares job directories, answers syntax errors without spending a worker, queues
jobs for the supervisor's loop thread and turns what the supervisor saw into JobResults.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import threading
import time
import traceback
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any

from warm_pool import capture, errors, protocol
from warm_pool.config import PoolConfig
from warm_pool.result import (
    STATUS_CANCELLED,
    STATUS_COMPLETED,
    STATUS_INTERRUPTED,
    JobResult,
    JobSpec,
)
from warm_pool.supervisor import Job, Supervisor, Worker, kill_group, tree_rss, worker_ref

JOB_ID_RE = re.compile(r"^[A-Za-z0-9._-]{1,128}$")
_MIB = 1024 * 1024

# Why a job was stopped → (status, error_type).
_STOP_OUTCOMES = {
    "timeout": (STATUS_COMPLETED, "timeout"),
    "memory_limit": (STATUS_COMPLETED, "memory_limit"),
    "cancelled": (STATUS_CANCELLED, "cancelled"),
    "interrupted": (STATUS_INTERRUPTED, "interrupted"),
}


class WarmPool:
    """A pool of warm workers running scripts as `python main.py`."""

    def __init__(self, config: PoolConfig):
        self.config = config.validate()
        self._neuron_info = None
        if self.config.backend in ("neuron", "auto"):
            from warm_pool import neuron

            self._neuron_info = neuron.detect()
        # auto becomes neuron only if the template then imports torch_neuronx too.
        self._neuron = self.config.backend == "neuron" or bool(
            self.config.backend == "auto" and self._neuron_info and self._neuron_info.available)
        self._cores = self._plan_cores()
        self.supervisor = Supervisor(self.config, len(self._cores), self._cores,
                                     finish=self._finish, notify=_run_callbacks)
        self.supervisor.neuron = self._neuron
        if self._neuron_info and self._neuron_info.cores_per_device:
            self.supervisor.cores_per_device = self._neuron_info.cores_per_device
        self._thread: threading.Thread | None = None
        self._jobs: dict[str, Job] = {}
        self._capture_dir = os.path.join(self.config.work_dir, "capture")

    def _plan_cores(self) -> list[int | None]:
        """One slot per worker; on neuron each slot owns one NeuronCore."""
        if not self._neuron:
            return [None] * (self.config.pool_size or 2)
        cores = list(self.config.neuron_cores or ())
        if not cores and self._neuron_info is not None:
            cores = list(range(self._neuron_info.core_count))
        if not cores:
            cores = [0]
        return cores[: self.config.pool_size] if self.config.pool_size else cores

    # --- lifecycle ----------------------------------------------------------------------

    def start(self) -> WarmPool:
        """Start the template and workers in the background; return at once."""
        if self._thread is not None:
            return self
        os.makedirs(self.config.jobs_dir, exist_ok=True)
        os.makedirs(self._capture_dir, exist_ok=True)
        if self._neuron:
            self._prepare_compile_cache()
        self._thread = threading.Thread(target=self.supervisor.run, name="warm-pool-supervisor",
                                        daemon=True)
        self._thread.start()
        self.supervisor.wake()
        return self

    def _prepare_compile_cache(self) -> None:
        """Before any worker runs: drop locks left by killed compiles, enforce the cap."""
        from warm_pool import neuron

        cache = self.config.compile_cache_dir
        os.makedirs(cache, exist_ok=True)
        neuron.clear_stale_locks(cache)
        if self.config.neuron_cache_max_mb:
            neuron.prune_cache(cache, self.config.neuron_cache_max_mb * _MIB)

    def wait_ready(self, timeout: float | None = None) -> bool:
        """Wait until at least one worker is ready; False on timeout or a broken pool."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            with self.supervisor.lock:
                if any(w.state in ("idle", "busy") for w in self.supervisor.workers.values()):
                    return True
                if self.supervisor.state in ("broken", "closed"):
                    return False
            if deadline is not None and time.monotonic() >= deadline:
                return False
            time.sleep(0.01)

    def shutdown(self, grace: float = 30.0) -> None:
        """Take no more jobs, give running ones `grace` seconds, then kill; no orphans."""
        sup = self.supervisor
        with sup.lock:
            if sup.state == "closed":
                return
            sup.state = "closing" if sup.state != "broken" else sup.state
            while sup.queue:  # never started: the caller may resubmit them later
                job = sup.queue.popleft()
                job.future.cancel()
                self._jobs.pop(job.spec.job_id, None)
                _remove_job_dir(job.paths)
        sup.wake()
        deadline = time.monotonic() + grace
        while time.monotonic() < deadline and self._busy_count():
            time.sleep(0.02)
        with sup.lock:
            for worker in sup.workers.values():
                if worker.job is not None:
                    sup.stop_job(worker.job, worker, "interrupted", time.monotonic(), hard=True)
        sup.wake()
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and self._busy_count():
            time.sleep(0.02)
        with sup.lock:
            pids = [w.pid for w in sup.workers.values() if w.pid]
            sup.state = "closed"
            sup._close_template()  # EOF: the template kills and reaps every worker
            for pid in pids:  # belt and braces: the template already did this
                kill_group(pid, signal.SIGKILL)
        sup.wake()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def _busy_count(self) -> int:
        with self.supervisor.lock:
            return sum(1 for w in self.supervisor.workers.values() if w.job is not None)

    def __enter__(self) -> WarmPool:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.shutdown()

    # --- jobs -------------------------------------------------------------------------

    def submit(self, spec: JobSpec, on_start: Callable | None = None) -> Future:
        """Queue a job; the Future's result is a JobResult (never raises for the job)."""
        if not JOB_ID_RE.match(spec.job_id):
            raise ValueError(f"job_id must match {JOB_ID_RE.pattern}: {spec.job_id!r}")
        timeout = self.config.default_timeout if spec.timeout is None else float(spec.timeout)
        if not (0 < timeout <= self.config.max_timeout):
            raise ValueError(f"timeout must be in (0, {self.config.max_timeout}] seconds")
        sup = self.supervisor
        with sup.lock:
            if sup.state == "broken":
                raise errors.PoolBroken(sup.broken_reason or "pool is broken")
            if sup.state in ("closing", "closed"):
                raise errors.PoolClosed("the pool is shutting down")
            if len(sup.queue) >= self.config.max_queue:
                raise errors.QueueFull(f"{len(sup.queue)} jobs are queued (max_queue)")
        future: Future = Future()
        syntax_error = _syntax_error(spec.code, os.path.join(self.config.jobs_dir, spec.job_id, "main.py"))
        if syntax_error is not None:
            future.set_running_or_notify_cancel()
            future.set_result(self._syntax_result(spec, *syntax_error))
            return future
        job = Job(spec, future, on_start, self._prepare(spec), timeout)
        with sup.lock:
            self._jobs[spec.job_id] = job
            sup.queue.append(job)
        sup.wake()
        return future

    def _prepare(self, spec: JobSpec) -> protocol.RunJob:
        job_dir = os.path.join(self.config.jobs_dir, spec.job_id)
        if os.path.lexists(job_dir):
            shutil.rmtree(job_dir, ignore_errors=True)
        os.makedirs(job_dir)
        main_path = os.path.join(job_dir, "main.py")
        with open(main_path, "w", encoding="utf-8") as f:
            f.write(spec.code)
        capture_dir = self._capture_dir
        out, err = (os.path.join(capture_dir, f"{spec.job_id}.{s}") for s in ("stdout", "stderr"))
        for path in (out, err):  # a stale file from an earlier job of the same id
            if os.path.exists(path):
                os.unlink(path)
        return protocol.RunJob(spec.job_id, main_path, job_dir, out, err)

    def _syntax_result(self, spec: JobSpec, stderr: str, message: str) -> JobResult:
        now = time.time()
        return JobResult(job_id=spec.job_id, paper_id=spec.paper_id,
                         return_code=1, stderr=stderr, error_type="syntax_error",
                         error_message=message, submitted_at=now, started_at=now, finished_at=now)

    def cancel(self, job_id: str) -> bool:
        """Cancel a queued or running job; False if it is unknown or already finished."""
        sup = self.supervisor
        with sup.lock:
            job = self._jobs.get(job_id)
            if job is None or job.future.done():
                return False
            if job in sup.queue:
                sup.queue.remove(job)
                job.stop_reason = "cancelled"
                self._finish(job, None, None)
                callbacks, sup.callbacks = sup.callbacks, []
            else:
                worker = next((w for w in sup.workers.values() if w.job is job), None)
                if worker is None:
                    return False
                sup.stop_job(job, worker, "cancelled", time.monotonic())
                callbacks = []
        _run_callbacks(callbacks)
        sup.wake()
        return True

    def _finish(self, job: Job, worker: Worker | None, return_code: int | None) -> None:
        """Build the job's result (called under the supervisor's lock)."""
        self._jobs.pop(job.spec.job_id, None)
        result = self._build_result(job, worker, return_code)
        if not self.config.keep_job_dirs:
            _remove_job_dir(job.paths)
        for path in (job.paths.stdout_path, job.paths.stderr_path):
            try:
                os.unlink(path)
            except OSError:
                pass

        def deliver() -> None:
            if not job.future.done():
                if not job.future.running():
                    job.future.set_running_or_notify_cancel()
                job.future.set_result(result)

        self.supervisor.callbacks.append(deliver)

    def _build_result(self, job: Job, worker: Worker | None, return_code: int | None) -> JobResult:
        now, now_mono = time.time(), time.monotonic()
        cap = self.config.max_output_bytes
        stdout, out_cut = capture.read_capped(job.paths.stdout_path, cap)
        stderr, err_cut = capture.read_capped(job.paths.stderr_path, cap)
        done = job.done
        status, error_type, message = STATUS_COMPLETED, None, None
        if done is not None:
            return_code, error_type, message = done.return_code, done.error_type, done.error_message
        elif return_code is not None and return_code != 0:
            error_type = "signal" if return_code < 0 else "exit"
            message = f"worker {errors.describe_exit(return_code)}"
        elif return_code is None and job.started_mono is not None:
            error_type, message = "worker_crashed", "the worker died and its exit status is unknown"
        if job.stop_reason:
            status, error_type = _STOP_OUTCOMES[job.stop_reason]
            message = _stop_message(job, self.config, return_code)
        peak = max(job.peak_tree_bytes, done.peak_rss_bytes if done else 0)
        device_peak = job.peak_device_bytes
        started = job.started_mono
        return JobResult(
            job_id=job.spec.job_id, paper_id=job.spec.paper_id, status=status,
            return_code=return_code, stdout=stdout, stderr=stderr,
            stdout_truncated_bytes=out_cut, stderr_truncated_bytes=err_cut,
            timeout=job.stop_reason == "timeout", error_type=error_type, error_message=message,
            execution_time=(now_mono - started) if started is not None else 0.0,
            queue_time=((started if started is not None else now_mono) - job.submitted_mono),
            submitted_at=job.submitted_at, started_at=job.started_at, finished_at=now,
            peak_memory_mb=round(peak / _MIB, 3) if peak else None,
            peak_device_memory_mb=round(device_peak / _MIB, 3) if device_peak is not None else None,
            worker=worker_ref(worker) if worker is not None and started is not None else None,
            worker_replaced=worker is not None and worker.state == "stopping",
        )

    # --- health -----------------------------------------------------------------------

    def stats(self) -> dict[str, Any]:
        """The pool's state for /health: counts, workers, preloaded modules, respawns."""
        sup = self.supervisor
        with sup.lock:
            workers = [self._worker_stats(w) for w in sorted(sup.workers.values(), key=lambda w: w.slot)]
            states = [w.state for w in sup.workers.values()]
            out = {
                "backend": sup.backend or (None if self.config.backend == "auto" else self.config.backend),
                "requested_backend": self.config.backend,
                "state": sup.state,
                "broken_reason": sup.broken_reason,
                "size": sup.size,
                "idle": states.count("idle"),
                "busy": states.count("busy"),
                "starting": states.count("starting") + max(0, sup.size - len(states)),
                "queued": len(sup.queue),
                "max_queue": self.config.max_queue,
                "preloaded": list(sup.preloaded),
                "workers": workers,
                "respawns": {"total": sum(sup.respawns.values()), "by_reason": dict(sup.respawns)},
                "idle_since": sup.idle_since,
            }
        # Measured outside the lock: both walk /proc or the file system, and the
        # supervisor's loop must not wait for a health check.
        for worker in workers:
            worker["rss_mb"] = round(tree_rss(worker["pid"]) / _MIB, 1) if worker["pid"] else None
        out["neuron"] = self._neuron_stats()
        return out

    def _neuron_stats(self) -> dict[str, Any] | None:
        if not self._neuron:
            return None
        from warm_pool import neuron

        info = self._neuron_info
        cache = self.config.compile_cache_dir
        return {
            "available": bool(info and info.available),
            "reason": info.reason if info else None,
            "cores": self._cores,
            "compile_cache": {"dir": str(cache), "size_mb": round(neuron.cache_size_bytes(cache) / _MIB, 1),
                              "max_mb": self.config.neuron_cache_max_mb},
        }

    @staticmethod
    def _worker_stats(worker: Worker) -> dict[str, Any]:
        return {
            "id": worker.id, "pid": worker.pid, "state": worker.state, "core": worker.core,
            "jobs_run": worker.jobs_run, "device": worker.device, "preloaded": list(worker.preloaded),
            "ready_seconds": round(worker.ready_seconds, 4) if worker.ready_seconds else None,
            "current_job": worker.job.spec.job_id if worker.job else None,
        }


def _remove_job_dir(paths: protocol.RunJob) -> None:
    try:  # the common case, cheaply: the script wrote nothing beside main.py
        os.unlink(paths.main_path)
        os.rmdir(paths.job_dir)
    except OSError:
        shutil.rmtree(paths.job_dir, ignore_errors=True)


def _syntax_error(code: str, path: str) -> tuple[str, str] | None:
    """CPython's report of a syntax error in main.py, or None if the code compiles."""
    try:
        compile(code, path, "exec", dont_inherit=True)
    except (SyntaxError, ValueError) as exc:
        text = "".join(traceback.format_exception_only(type(exc), exc))
        return text, text.strip().splitlines()[-1]
    return None


def _stop_message(job: Job, config: PoolConfig, return_code: int | None) -> str:
    reason = job.stop_reason
    if reason == "timeout":
        return f"timed out after {job.timeout:g} s"
    if reason == "memory_limit":
        return f"process tree exceeded max_memory_mb={config.max_memory_mb}"
    if reason == "cancelled":
        return "cancelled"
    return "the pool shut down while the job ran"


def _run_callbacks(callbacks: list[Callable[[], None]]) -> None:
    for callback in callbacks:
        try:
            callback()
        except Exception:  # noqa: BLE001 - a caller's callback must not kill the loop
            traceback.print_exc()
