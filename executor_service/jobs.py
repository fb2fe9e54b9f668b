"""The job runner: between the HTTP handlers, the job store and the warm pool.

    request --accept()--> store (queued) --dispatch()--> pool.submit --> worker
                                                           |  on_start: store running
                                                           v  done:     store terminal + result

The store is the queue of record: a job is persisted before it is acknowledged, and
`dispatch()` hands queued jobs to the pool: on every accept, and from a background
thread when a job ends and once a second, so jobs left queued by a restart or a full
pool queue run too. The pool's callback threads only record and wake that thread.
On shutdown the pool cancels the futures of jobs it had not started; their rows stay
`queued`, so they run when the service starts again on the same work dir.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import shutil
import threading
import time
import uuid
from concurrent.futures import Future
from typing import Any

from executor_service import artifacts
from executor_service.analysis import result_document
from executor_service.config import ServiceConfig
from executor_service.metrics import Metrics
from executor_service.store import JobRow, JobStore
from executor_service.validation import Request, echo
from warm_pool import (
    STATUS_CANCELLED,
    STATUS_INTERRUPTED,
    STATUS_QUEUED,
    STATUS_RUNNING,
    TERMINAL_STATUSES,
    JobResult,
    JobSpec,
    PoolBroken,
    PoolClosed,
    utc_iso,
)
from warm_pool import (
    QueueFull as PoolQueueFull,
)

log = logging.getLogger("executor_service.jobs")

RETRY_AFTER_S = 5
_PRUNE_EVERY_S = 600.0
# How long DELETE /jobs/<id> waits for a running job to be stopped (SIGINT, then the
# pool's kill grace, then SIGKILL) before it answers with the job as it then is.
_CANCEL_WAIT_S = 10.0


class JobsError(Exception):
    """Base of what the runner refuses; app.ERRORS maps each kind to an HTTP answer."""

    def __init__(self, message: str, **detail: Any):
        super().__init__(message)
        self.detail = detail


class Closing(JobsError):
    """The service is shutting down and takes no work (retry later)."""


class Unavailable(JobsError):
    """The pool cannot run jobs (broken); the message says why."""


class QueueFull(JobsError):
    """The queue has no room for the whole request (retry later)."""


class UnknownJob(JobsError, LookupError):
    """No job has this id."""


class AlreadyFinished(JobsError):
    """The job already has its result (it cannot be cancelled)."""


def new_id() -> str:
    """A fresh job or batch id (a safe directory name)."""
    return uuid.uuid4().hex


def short_reason(reason: str | None) -> str:
    """A traceback cut to its first and last lines (the whole one is in /health?verbose=1)."""
    lines = [line for line in (reason or "unknown").splitlines() if line.strip()]
    return lines[0] if len(lines) < 2 else f"{lines[0]} ... {lines[-1].strip()}"


def synthetic_result(row: JobRow, status: str, error_type: str, message: str) -> dict[str, Any]:
    """A full result for a job that never ran to an outcome (cancelled, interrupted)."""
    now = time.time()
    res = JobResult(job_id=row.job_id, paper_id=row.paper_id, status=status,
                    error_type=error_type, error_message=message, submitted_at=row.created_at,
                    started_at=row.started_at, finished_at=now)
    return result_document(res.to_dict(), row.code)


class JobRunner:
    """Accepts validated requests, feeds the pool from the store, records results."""

    def __init__(self, pool, store: JobStore, config: ServiceConfig, metrics: Metrics):
        self.pool = pool
        self.store = store
        self.config = config
        self.metrics = metrics
        self._submitted: dict[str, Future] = {}
        self._done_events: dict[str, threading.Event] = {}
        self._lock = threading.Lock()
        # Reentrant: a future that is already done runs its callback (which dispatches)
        # inside add_done_callback, under this lock.
        self._dispatch_lock = threading.RLock()
        self._closing = threading.Event()
        self._wake = threading.Event()  # a job ended: the loop dispatches at once
        self._accept_lock = threading.Lock()  # queue-room check and insert, together
        self._last_activity = time.time()
        self._thread: threading.Thread | None = None
        self._last_prune = 0.0
        self.exporter = (artifacts.S3Exporter(config.artifacts_s3_uri, store, config.pool.artifacts_dir)
                         if config.artifacts_s3_uri else None)

    # lifecycle -------------------------------------------------------------------

    def start(self) -> None:
        """Recover jobs left by a previous process, then start the dispatch loop."""
        interrupted, queued = self.store.recover(
            lambda row: synthetic_result(row, STATUS_INTERRUPTED, "interrupted",
                                         "the service stopped while this job was running"))
        if interrupted or queued:
            log.info("recovered jobs", extra={"interrupted": interrupted, "requeued": queued})
        self._prune()
        if self.exporter is not None:
            self.exporter.start()
        self._thread = threading.Thread(target=self._loop, name="dispatch", daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        while not self._closing.is_set():
            self._wake.wait(1.0)
            self._wake.clear()
            if self._closing.is_set():
                break
            try:
                self.dispatch()
                if time.monotonic() - self._last_prune > _PRUNE_EVERY_S:
                    self._prune()
            except Exception:  # noqa: BLE001 - the loop must survive anything
                log.exception("dispatch loop error")

    def _prune(self) -> None:
        self._last_prune = time.monotonic()
        if self.config.retention_hours > 0:
            n = self.store.prune(self.config.retention_hours * 3600)
            if n:
                log.info("pruned old batches", extra={"batches": n})
        self._sweep_artifacts()

    def _sweep_artifacts(self) -> None:
        """Remove the artifacts of jobs the store no longer holds (pruned, or never stored)."""
        root = self.config.pool.artifacts_dir
        try:
            names = [n for n in os.listdir(root) if not n.startswith(".")]
        except OSError:
            return
        with self._lock:
            running = set(self._submitted)
        known = self.store.known_jobs(names)
        for name in names:
            if name not in known and name not in running:
                shutil.rmtree(os.path.join(root, name), ignore_errors=True)

    def shutdown(self, grace: float) -> None:
        """Stop taking work; running jobs get `grace` seconds; queued ones stay queued."""
        self._closing.set()
        self._wake.set()
        with self._dispatch_lock:  # no submit may race the pool's shutdown
            self.pool.shutdown(grace=grace)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:  # let done-callbacks record their results
            with self._lock:
                if not self._submitted:
                    break
            time.sleep(0.05)
        if self._thread:
            self._thread.join(timeout=5)
        if self.exporter is not None:
            self.exporter.close()

    # accepting and dispatching -------------------------------------------------------

    def accept(self, request: Request, kind: str,
               idem_key: str | None = None) -> tuple[str, list[tuple[str, str]]]:
        """Persist a request's jobs (queued) and start dispatching them.

        Returns (batch_id, [(paper_id, job_id), ...]). Raises Closing, Unavailable (the
        pool is broken) or QueueFull (no room for the whole request). A request repeating
        an earlier `idem_key` gets that request's batch back instead.
        """
        if self._closing.is_set():
            raise Closing("service is shutting down")
        stats = self.pool.stats()
        if stats.get("state") == "broken":
            raise Unavailable(f"pool is broken: {short_reason(stats.get('broken_reason'))}")
        batch_id = new_id()
        jobs = [{"job_id": new_id(), "paper_id": it.paper_id, "paper_title": it.paper_title,
                 "code": it.code, "timeout": request.timeout} for it in request.items]
        with self._accept_lock:
            if idem_key and (earlier := self.store.batch_for_key(idem_key)):
                return earlier, [(r.paper_id, r.job_id) for r in self.store.get_batch(earlier) or []]
            queued = self.store.counts().get(STATUS_QUEUED, 0)
            if queued + len(jobs) > self.config.pool.max_queue:
                raise QueueFull(f"queue is full ({queued} of {self.config.pool.max_queue} jobs "
                                "waiting); retry later")
            # Registered before the insert: a job can finish (and look for its event)
            # as soon as it is stored. Removed again if the insert fails.
            with self._lock:
                for j in jobs:
                    self._done_events[j["job_id"]] = threading.Event()
            try:
                self.store.add_batch(batch_id, kind, jobs, idem_key)
            except BaseException:
                with self._lock:
                    for j in jobs:
                        self._done_events.pop(j["job_id"], None)
                raise
        self._last_activity = time.time()
        self.dispatch()
        return batch_id, [(j["paper_id"], j["job_id"]) for j in jobs]

    def dispatch(self) -> int:
        """Hand queued jobs that the pool does not hold yet to the pool; return how many."""
        if self._closing.is_set():
            return 0
        n = 0
        with self._dispatch_lock:
            for row in self.store.queued(limit=self.config.pool.max_queue * 2):
                with self._lock:
                    if row.job_id in self._submitted:
                        continue
                spec = JobSpec(code=row.code, job_id=row.job_id, paper_id=row.paper_id,
                               timeout=row.timeout)
                try:
                    fut = self.pool.submit(spec, on_start=self._on_start)
                except PoolQueueFull:
                    break  # the loop retries in a second
                except (PoolClosed, PoolBroken):
                    break
                with self._lock:
                    self._submitted[row.job_id] = fut
                fut.add_done_callback(lambda f, row=row: self._on_done(row, f))
                n += 1
        return n

    def _on_start(self, job_id: str, worker_ref: Any) -> None:
        worker = dataclasses.asdict(worker_ref) if dataclasses.is_dataclass(worker_ref) else None
        try:
            self.store.mark_running(job_id, worker)
        except Exception:  # noqa: BLE001 - never break the pool's thread
            log.exception("could not mark job running", extra={"job_id": job_id})

    def _on_done(self, row: JobRow, fut: Future) -> None:
        try:
            if fut.cancelled():
                return  # pool shut down before the job started: it stays queued
            kept: list[dict[str, Any]] = []
            try:
                result: JobResult = fut.result()
                data = result_document(result.to_dict(), row.code)
                status = result.status if result.status in TERMINAL_STATUSES else "completed"
                kept = artifacts.records(result)
            except Exception as exc:  # noqa: BLE001 - the pool promised results, be safe anyway
                log.exception("job future raised", extra={"job_id": row.job_id})
                data = synthetic_result(row, "completed", "internal", f"internal error: {exc!r}")
                status = "completed"
            if self.store.finish(row.job_id, status, data, kept):
                self.metrics.job_finished(data)
                if self.exporter is not None:
                    stored = self.store.get_job(row.job_id)
                    self.exporter.submit(row.job_id, row.paper_id, stored.to_public() if stored else data)
            log.info("job finished", extra={"job_id": row.job_id, "paper_id": row.paper_id,
                                            "status": status, "error_type": data.get("error_type"),
                                            "execution_time": data.get("execution_time")})
        except Exception:  # noqa: BLE001
            log.exception("could not record job result", extra={"job_id": row.job_id})
        finally:
            with self._lock:
                self._submitted.pop(row.job_id, None)
                event = self._done_events.pop(row.job_id, None)
            self._last_activity = time.time()
            if event:
                event.set()
            # Dispatch from our loop thread, never from the pool's callback thread.
            self._wake.set()

    # waiting, cancelling, reading ---------------------------------------------------

    def wait(self, job_ids: list[str], timeout: float) -> bool:
        """Block until every job is terminal (or `timeout` s pass); True if all are."""
        deadline = time.monotonic() + timeout
        for job_id in job_ids:
            with self._lock:
                event = self._done_events.get(job_id)
            while True:
                row = self.store.get_job(job_id)
                if row is None or row.status in TERMINAL_STATUSES:
                    break
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                if self._closing.is_set() and row.status == STATUS_QUEUED:
                    with self._lock:
                        if job_id not in self._submitted:
                            return False  # stays queued for the next start
                if event:
                    event.wait(min(left, 1.0))
                else:
                    time.sleep(min(left, 0.2))
        return True

    def cancel(self, job_id: str) -> JobRow:
        """Cancel a queued or running job; UnknownJob, or AlreadyFinished with its status."""
        row = self.store.get_job(job_id)
        if row is None:
            raise UnknownJob(f"no job {echo(job_id)}")
        if row.status in TERMINAL_STATUSES:
            raise AlreadyFinished(f"job {job_id} already finished with status {row.status}",
                                  job_status=row.status)
        with self._dispatch_lock:
            with self._lock:
                submitted = job_id in self._submitted
            if not submitted:
                self.store.cancel_queued(job_id, synthetic_result(
                    row, STATUS_CANCELLED, "cancelled", "cancelled before it started"))
                with self._lock:
                    event = self._done_events.pop(job_id, None)
                if event:
                    event.set()
        if submitted:
            self.pool.cancel(job_id)
            self.wait([job_id], timeout=_CANCEL_WAIT_S)
        return self.store.get_job(job_id) or row

    def status(self) -> dict[str, Any]:
        """What a cron caller needs to decide whether to send work or stop the instance."""
        counts = self.store.counts()
        running, queued = counts.get(STATUS_RUNNING, 0), counts.get(STATUS_QUEUED, 0)
        try:
            capacity = self.pool.stats().get("size")
        except Exception:  # noqa: BLE001
            capacity = None
        idle_since = None
        if running == 0 and queued == 0:
            idle_since = utc_iso(self._last_activity)
        return {"running_executions": running, "queued": queued, "capacity": capacity,
                "idle": running == 0 and queued == 0, "idle_since": idle_since,
                "accepting": not self._closing.is_set()}
