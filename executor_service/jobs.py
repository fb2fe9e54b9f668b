"""The job runner: between the HTTP handlers, the job store and the warm pool.

    request --accept()--> store (queued) --dispatch()--> pool.submit --> worker
                                                           |  on_start: store running
                                                           v  done:     store terminal + result

The store is the queue of record: a job is persisted before it is acknowledged, and
`dispatch()` hands queued jobs to the pool: on every accept, and from a background
thread once a second and when a job ends while jobs wait outside the pool, so jobs left
queued by a restart or a full pool queue run too. The pool's callback threads only
record, release the request waiting for the result, and wake that thread (and the
webhook deliverer, when a callback waits for the job; it sends from threads of its own).
On shutdown the pool cancels the futures of jobs it had not started; their rows stay
`queued`, so they run when the service starts again on the same work dir.

A request for a paper whose identical code is already queued or running joins that job
instead of running it twice (unless the `deduplicate` setting is off): its batch lists
the existing job, marked `deduplicated`.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import shutil
import threading
import time
import uuid
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any

from executor_service import artifacts
from executor_service.analysis import result_document
from executor_service.config import ServiceConfig
from executor_service.metrics import Metrics
from executor_service.store import CALLBACKS_FIELD, CallbackRow, JobRow, JobStore
from executor_service.validation import JobQuery, Request, echo
from executor_service.webhooks import Deliverer, run_woken
from warm_pool import (
    STATUS_CANCELLED,
    STATUS_INTERRUPTED,
    STATUS_QUEUED,
    STATUS_RUNNING,
    TERMINAL_STATUSES,
    JobResult,
    JobSpec,
    Pool,
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
    """The pool cannot run jobs now (broken, trying to start again); the message says why."""


class QueueFull(JobsError):
    """The queue has no room for the whole request (retry later)."""


class UnknownJob(JobsError, LookupError):
    """No job has this id."""


class UnknownBatch(JobsError, LookupError):
    """No batch has this id."""


class AlreadyFinished(JobsError):
    """The job already has its result (it cannot be cancelled)."""


@dataclass(frozen=True)
class Accepted:
    """What accept() did: the request's batch, its jobs by paper, which were joined."""

    batch_id: str
    ids: list[tuple[str, str]]          # (paper_id, job_id) in request order
    deduplicated: tuple[str, ...] = ()  # paper_ids whose identical code was already queued/running
    repeated: bool = False              # an Idempotency-Key seen before: the earlier batch

    @property
    def job_ids(self) -> list[str]:
        return [job_id for _, job_id in self.ids]


def batch_status(rows: list[JobRow]) -> str:
    """A batch's status word from its jobs' statuses."""
    statuses = [r.status for r in rows]
    if all(s in TERMINAL_STATUSES for s in statuses):
        return "completed"
    if all(s == STATUS_QUEUED for s in statuses):
        return STATUS_QUEUED
    return STATUS_RUNNING


def batch_response(results: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """The original /execute_batch shape: success, batch_size, successful, failed, results."""
    finished = [r for r in results.values() if r.get("status") in TERMINAL_STATUSES]
    successful = sum(1 for r in finished if r.get("success"))
    return {
        "success": True,
        "batch_size": len(results),
        "successful": successful,
        "failed": len(finished) - successful,
        "results": results,
    }


def new_id() -> str:
    """A fresh job or batch id (a safe directory name)."""
    return uuid.uuid4().hex


def short_reason(reason: str | None) -> str:
    """A traceback cut to its first and last lines (the whole one is in /health?verbose=1)."""
    lines = [line for line in (reason or "unknown").splitlines() if line.strip()]
    return lines[0] if len(lines) < 2 else f"{lines[0]} ... {lines[-1].strip()}"


def synthetic_result(row: JobRow, status: str, error_type: str, message: str) -> dict[str, Any]:
    """A full result for a job that never ran to an outcome (cancelled, interrupted)."""
    res = JobResult.not_run(row.job_id, row.paper_id, status, error_type, message,
                            submitted_at=row.created_at, started_at=row.started_at)
    return result_document(res.to_dict(), row.code)


class JobRunner:
    """Accepts validated requests, feeds the pool from the store, records results."""

    def __init__(self, pool: Pool, store: JobStore, config: ServiceConfig, metrics: Metrics):
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
        # Whether queued jobs may wait outside the pool (the last dispatch stopped short):
        # only then does a job's end wake the loop.
        self._backlog = True
        # Jobs whose end a waiting callback waits for: only their end wakes the deliverer.
        self._callback_jobs: set[str] = set()
        self._accept_lock = threading.Lock()  # queue-room check and insert, together
        self._last_activity = time.time()
        self._thread: threading.Thread | None = None
        self._last_prune = 0.0
        self._refusal: str | None = None  # why no new work is taken (a Spot notice), when set
        self._end_listeners: list[Callable[[], None]] = []
        self.webhooks = Deliverer(store, config.callback_secret, self._callback_document,
                                  config.callback_attempts, config.callback_backoff, config.callback_timeout)
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
        with self._lock:
            self._callback_jobs.update(self.store.callback_jobs())
        self._prune()
        if self.exporter is not None:
            self.exporter.start()
        self._thread = threading.Thread(target=self._loop, name="dispatch", daemon=True)
        self._thread.start()
        self.webhooks.start()

    def _loop(self) -> None:
        run_woken(self._closing, self._wake, self._step, "dispatch loop")

    def _step(self) -> None:
        self.dispatch()
        if time.monotonic() - self._last_prune > _PRUNE_EVERY_S:
            self._prune()

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
        try:  # callbacks of the jobs that just ended: sent now if they can be, else after a restart
            self.webhooks.step()
        except Exception:  # noqa: BLE001 - shutting down whatever happens
            log.exception("webhook pass at shutdown failed")
        self.webhooks.shutdown(timeout=5)
        if self.exporter is not None:
            self.exporter.close()

    @property
    def closing(self) -> bool:
        """True once shutdown has begun: nothing new is accepted or started."""
        return self._closing.is_set()

    @property
    def refusal(self) -> str | None:
        """Why the runner takes no new work while it still runs its jobs, or None."""
        return self._refusal

    def refuse_work(self, reason: str) -> None:
        """Take no new work from now on (accept raises Closing with `reason`) and start no
        queued job; running jobs go on."""
        self._refusal = reason
        self._wake.set()

    def add_end_listener(self, listener: Callable[[], None]) -> None:
        """Call `listener()` (it must only wake its owner) whenever jobs reach an end."""
        self._end_listeners.append(listener)

    def _ended(self, job_ids: list[str]) -> None:
        """These jobs reached an end: wake whoever may have work now. The dispatch loop and
        the webhook deliverer only when they have (jobs wait outside the pool, a callback
        waits for one of these jobs): otherwise they would query the store for nothing
        beside the request that is fetching the result."""
        with self._lock:
            callbacks = not self._callback_jobs.isdisjoint(job_ids)
            self._callback_jobs.difference_update(job_ids)
        if self._backlog:
            self._wake.set()
        if callbacks:
            self.webhooks.wake()
        for listener in self._end_listeners:
            listener()

    def interrupt(self, statuses: tuple[str, ...], message: str) -> list[str]:
        """Record the jobs in `statuses` (queued, running) as `interrupted` with `message`,
        and stop those the pool holds; return their ids. Their callbacks then report it."""
        ended = []
        with self._dispatch_lock:
            for row in self.store.in_status(statuses):
                data = synthetic_result(row, STATUS_INTERRUPTED, "interrupted", message)
                if not self.store.finish(row.job_id, STATUS_INTERRUPTED, data):
                    continue  # it ended meanwhile
                self.metrics.job_finished(data)
                ended.append(row.job_id)
                with self._lock:
                    submitted = row.job_id in self._submitted
                    event = None if submitted else self._done_events.pop(row.job_id, None)
                if submitted:
                    self.pool.cancel(row.job_id)  # its own result arrives later and is not kept
                elif event:
                    event.set()
        if ended:
            log.warning("jobs interrupted", extra={"job_ids": ended, "reason": message})
            self._ended(ended)
        return ended

    # accepting and dispatching -------------------------------------------------------

    def accept(self, request: Request, kind: str, idem_key: str | None = None,
               message_id: str | None = None) -> Accepted:
        """Persist a request's jobs (queued) and callbacks, start dispatching the jobs, and
        return once they are on disk (they start while the disk syncs).

        Raises Closing, Unavailable (the pool is broken) or QueueFull (no room for the
        whole request). A request repeating an earlier `idem_key` gets that request's
        batch back; an item whose paper has the identical code queued or running joins
        that job (when `deduplicate` is on). `message_id`: the SQS message it came in.
        """
        if self._closing.is_set():
            raise Closing("service is shutting down")
        if self._refusal is not None:
            raise Closing(self._refusal)
        condition = self.pool.condition()
        if condition.state == "broken":
            raise Unavailable(f"pool is broken: {short_reason(condition.broken_reason)}")
        batch_id = new_id()
        with self._accept_lock:
            if idem_key and (earlier := self.store.batch_for_key(idem_key)):
                rows = self.store.get_batch(earlier) or []
                self.store.sync()  # the earlier request may still be syncing it
                return Accepted(earlier, [(r.paper_id, r.job_id) for r in rows],
                                tuple(r.paper_id for r in rows if r.deduplicated), repeated=True)
            jobs, callbacks = [], []
            for item in request.items:
                same = (self.store.active_job(item.paper_id, item.code, item.profile)
                        if self.config.deduplicate else None)
                if same is not None:
                    jobs.append({"job_id": same.job_id, "paper_id": item.paper_id, "deduplicated": True})
                else:
                    fields = dict(item.fields)
                    if item.paper_title is not None:
                        fields.setdefault("paper_title", item.paper_title)
                    jobs.append({"job_id": new_id(), "paper_id": item.paper_id, "code": item.code,
                                 "timeout": request.timeout, "fields": fields, "profile": item.profile,
                                 "timeout_clamped_from": request.timeout_clamped_from})
                if item.callback_url:
                    callbacks.append((jobs[-1]["job_id"], item.callback_url))
            if request.callback_url:
                callbacks.append((None, request.callback_url))
            new = [j for j in jobs if not j.get("deduplicated")]
            queued = self.store.count(STATUS_QUEUED)
            if new and queued + len(new) > self.config.pool.max_queue:
                raise QueueFull(f"queue is full ({queued} of {self.config.pool.max_queue} jobs "
                                "waiting); retry later")
            # Registered before the insert: a job can finish (and look for its event and
            # callbacks) as soon as it is stored. Removed again if the insert fails.
            awaited = {job_id for job_id, _ in callbacks if job_id is not None}
            if request.callback_url:
                awaited.update(j["job_id"] for j in jobs)
            with self._lock:
                for j in new:
                    self._done_events[j["job_id"]] = threading.Event()
                added = awaited - self._callback_jobs
                self._callback_jobs.update(added)
            try:
                self.store.add_batch(batch_id, kind, jobs, idem_key, callbacks, message_id, synced=False)
            except BaseException:
                with self._lock:
                    for j in new:
                        self._done_events.pop(j["job_id"], None)
                    self._callback_jobs.difference_update(added)
                raise
        self._last_activity = time.time()
        deduplicated = tuple(j["paper_id"] for j in jobs if j.get("deduplicated"))
        if deduplicated:
            log.info("joined jobs already queued or running", extra={"batch_id": batch_id,
                                                                       "papers": list(deduplicated)})
        if new:
            self.dispatch()
        # Committed above, on disk only now: the jobs start while the disk syncs (an fsync,
        # 0.5-5 ms here, is most of an empty job's HTTP cost), and whoever called us
        # acknowledges nothing before it is done.
        self.store.sync()
        if callbacks:
            self.webhooks.wake()  # a joined job may have ended already
        return Accepted(batch_id, [(j["paper_id"], j["job_id"]) for j in jobs], deduplicated)

    def dispatch(self) -> int:
        """Hand queued jobs that the pool does not hold yet to the pool; return how many."""
        if self._closing.is_set() or self._refusal is not None:
            return 0
        n = 0
        with self._dispatch_lock:
            limit = self.config.pool.max_queue * 2
            rows = self.store.queued(limit=limit)
            backlog = len(rows) >= limit
            for row in rows:
                with self._lock:
                    if row.job_id in self._submitted:
                        continue
                spec = JobSpec(code=row.code, job_id=row.job_id, paper_id=row.paper_id,
                               timeout=row.timeout, profile=row.profile)
                try:
                    fut = self.pool.submit(spec, on_start=self._on_start)
                except (PoolQueueFull, PoolClosed, PoolBroken):
                    backlog = True  # the loop retries when a job ends, and every second
                    break
                with self._lock:
                    self._submitted[row.job_id] = fut
                fut.add_done_callback(lambda f, row=row: self._on_done(row, f))
                n += 1
            # A job accepted after our read dispatches itself after us (the lock orders them).
            self._backlog = backlog
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
            recorded = self.store.finish(row.job_id, status, data, kept)
            self._release(row.job_id)  # the result is stored: a waiting request answers now
            if recorded:
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
            self._last_activity = time.time()
            self._release(row.job_id)  # if recording failed above: the request answers anyway
            # Dispatch from our loop thread, never from the pool's callback thread.
            self._ended([row.job_id])

    def _release(self, job_id: str) -> None:
        """Wake the request waiting for this job, if one is."""
        with self._lock:
            event = self._done_events.pop(job_id, None)
        if event:
            event.set()

    # waiting, cancelling, reading ---------------------------------------------------

    def wait(self, job_ids: list[str], timeout: float, gone: Callable[[], bool] | None = None) -> bool:
        """Block until every job is terminal (or `timeout` s pass, or `gone()`: the waiting
        client hung up); True if all are. The jobs run on either way."""
        deadline = time.monotonic() + timeout
        for job_id in job_ids:
            with self._lock:
                event = self._done_events.get(job_id)
            if event:  # its end first: a read now would take the store's lock as the job starts
                event.wait(max(0.0, min(deadline - time.monotonic(), 1.0)))
            while True:
                row = self.store.get_job(job_id)
                if row is None or row.status in TERMINAL_STATUSES:
                    break
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                if gone is not None and gone():
                    return False
                if self._closing.is_set() and row.status == STATUS_QUEUED:
                    with self._lock:
                        if job_id not in self._submitted:
                            return False  # stays queued for the next start
                if event and not event.is_set():
                    event.wait(min(left, 1.0))
                else:  # no event, or set while the store says otherwise (its result failed to record)
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
                self._release(job_id)
                self._ended([job_id])
        if submitted:
            self.pool.cancel(job_id)
            self.wait([job_id], timeout=_CANCEL_WAIT_S)
        return self.store.get_job(job_id) or row

    # documents: what GET answers, and what callbacks send -------------------------------

    def job_document(self, job_id: str) -> dict[str, Any]:
        """GET /jobs/<id>: the job (its result once it has one) and its callbacks' state."""
        row = self.store.get_job(job_id)
        if row is None:
            raise UnknownJob(f"no job {echo(job_id)}")
        out = row.to_public()
        callbacks = self.store.callbacks(job_id=job_id)
        if callbacks:
            out[CALLBACKS_FIELD] = [c.to_public() for c in callbacks]
        return out

    def batch_document(self, batch_id: str, rows: list[JobRow] | None = None) -> dict[str, Any]:
        """GET /batches/<id>: status, the original batch shape, the batch's callbacks' state."""
        rows = rows if rows is not None else self.store.get_batch(batch_id)
        if rows is None:
            raise UnknownBatch(f"no batch {echo(batch_id)}")
        out = {"batch_id": batch_id, "status": batch_status(rows),
               "done": sum(r.status in TERMINAL_STATUSES for r in rows)}
        out.update(batch_response({r.paper_id: r.to_public() for r in rows}))
        callbacks = self.store.callbacks(batch_id=batch_id)
        if callbacks:
            out[CALLBACKS_FIELD] = [c.to_public() for c in callbacks]
        return out

    def _callback_document(self, callback: CallbackRow) -> dict[str, Any]:
        """What a callback POSTs: the job's (or batch's) document as GET gives it, without
        the delivery state."""
        doc = (self.job_document(callback.job_id) if callback.job_id
               else self.batch_document(callback.batch_id))
        doc.pop(CALLBACKS_FIELD, None)
        return doc

    def paper_document(self, paper_id: str) -> dict[str, Any]:
        """GET /papers/<id>: the paper's newest job, its newest result, how many jobs it has."""
        count, latest, finished = self.store.paper(paper_id)
        if latest is None:
            raise UnknownJob(f"no job for paper {echo(paper_id)}")
        return {"paper_id": paper_id, "jobs": count, "latest": self.job_document(latest.job_id),
                "latest_finished": self.job_document(finished.job_id) if finished else None,
                "jobs_url": f"/jobs?paper_id={paper_id}"}

    def list_jobs(self, query: JobQuery) -> dict[str, Any]:
        """GET /jobs: one page of job summaries, newest first, and the cursor of the next."""
        rows = self.store.list_jobs(query.paper_id, query.statuses, query.before, query.limit + 1)
        page, more = rows[:query.limit], len(rows) > query.limit
        cursor = str(page[-1].seq) if more else None
        params = {"paper_id": query.paper_id, "status": ",".join(query.statuses) or None,
                  "limit": str(query.limit), "cursor": cursor}
        return {"jobs": [r.summary() for r in page], "next_cursor": cursor,
                "next": ("/jobs?" + "&".join(f"{k}={v}" for k, v in params.items() if v)) if more else None}

    def status(self) -> dict[str, Any]:
        """What a cron caller needs to decide whether to send work or stop the instance."""
        counts = self.store.counts()
        running, queued = counts.get(STATUS_RUNNING, 0), counts.get(STATUS_QUEUED, 0)
        try:
            capacity = self.pool.condition().size
        except Exception:  # noqa: BLE001
            capacity = None
        idle_since = None
        if running == 0 and queued == 0:
            idle_since = utc_iso(self._last_activity)
        return {"running_executions": running, "queued": queued, "capacity": capacity,
                "idle": running == 0 and queued == 0, "idle_since": idle_since,
                "accepting": not self._closing.is_set() and self._refusal is None}
