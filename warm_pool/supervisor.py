"""The supervisor: spawns, watches, kills, reaps and replaces workers; runs the queue.

Data flow (one loop thread owns the sockets; callers only queue work and wake it)::

    submit() ─▶ queue ─▶ dispatch ─run_job + pipes─▶ worker ─job_done─▶ finishing
                                    capture ◀─ the job's stdout/stderr ─┘      │ pipes drained
                                    worker ─worker_idle─▶ idle, or replaced    ▼
                                    template ─exited─▶ reap_workers ─▶ result ─▶ Future
    each pass: read what arrived, murder_workers (overdue, over a limit, mute),
               manage_workers (restore the count), dispatch, finish_jobs

The supervisor alone owns its state (workers, queue, template, capture), under `lock`;
`WarmPool` and everyone else call `submit`, `cancel`, `snapshot`, `read_output`,
`wait_ready` and `shutdown`. Futures are completed after the lock is released, so no caller's callback
can stall the loop.

Everything a worker sends is untrusted (its job owns the socket): it is decoded by
protocol.decode, must fit the worker's state (worker_ready once, job_done for its own
job, worker_idle after job_done), and anything else kills the worker with
error_type ``protocol_error`` for its job.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import threading
import time
import traceback
from collections import Counter, deque
from collections.abc import Callable
from concurrent.futures import Future
from multiprocessing import connection, reduction
from typing import Any

from warm_pool import artifacts, limits, outcome, protocol, sandbox, usage
from warm_pool.capture import Capture, JobOutput, read_live
from warm_pool.config import PoolConfig
from warm_pool.errors import PoolBroken, PoolClosed, QueueFull
from warm_pool.placement import Placement
from warm_pool.records import Job, Worker
from warm_pool.result import WorkerRef
from warm_pool.template_link import TemplateLink

# After a worker's channel closes, how long its exit may take to be reported before the
# supervisor concludes the job closed the channel itself and kills the worker.
_CHANNEL_GRACE_S = 0.5
# The worker's exit status when its job cut its channel (worker.EXIT_CHANNEL_LOST).
_EXIT_CHANNEL_LOST = 117
_CHANNEL_CUT = "the job closed its worker's channel to the service (e.g. os.closerange); the job was stopped"
# After a job's process ended, how long its pipes may stay open (a grandchild holding
# them is being killed) before the result is built from what arrived.
_DRAIN_GRACE_S = 2.0


class Supervisor:
    """Owns the template, the workers and the queue; `step` runs one pass of the loop."""

    def __init__(self, config: PoolConfig, placement: Placement):
        self.config = config
        self.placement = placement
        self.size = len(placement.cores)
        self.lock = threading.RLock()
        self._changed = threading.Condition(self.lock)
        self.queue: deque[Job] = deque()
        self.jobs: dict[str, Job] = {}
        self.finishing: list[tuple[Job, Worker | None]] = []
        self.workers: dict[int, Worker] = {}
        self.respawns: Counter[str] = Counter()
        self.replacements: deque[dict[str, Any]] = deque(maxlen=20)  # the latest, with details
        self.state = "starting"  # starting | ready | broken | closing | closed
        self.broken_reason: str | None = None
        self.backend: str | None = None
        self.preloaded: tuple[str, ...] = ()
        self.preload_skipped: dict[str, str] = {}
        self.preload_threads: dict[str, int] = {}
        self.template: TemplateLink | None = None
        self.start_failures = 0
        self.last_start_error: str | None = None  # a worker's start-up traceback
        self.next_start_mono = 0.0
        self.next_worker_id = 1
        self.dirty_slots: dict[int, int] = {}  # slot -> pgid (or uid) that must be empty first
        self.callbacks: list[Callable[[], None]] = []
        self.last_monitor = 0.0
        self.idle_since: float | None = None
        self.capture = Capture(os.path.join(config.work_dir, "capture"), placement.output_limit_bytes)
        self._thread: threading.Thread | None = None
        self._wake_r, self._wake_w = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)

    # --- what callers may do --------------------------------------------------------

    def start(self) -> None:
        """Start the loop thread (it starts the template and the workers)."""
        self._thread = threading.Thread(target=self.run, name="warm-pool-supervisor", daemon=True)
        self._thread.start()
        self.wake()

    def submit(self, job: Job) -> None:
        """Queue a job; QueueFull, PoolClosed or PoolBroken when it cannot be taken."""
        with self.lock:
            if self.state == "broken":
                raise PoolBroken(self.broken_reason or "pool is broken")
            if self.state in ("closing", "closed"):
                raise PoolClosed("the pool is shutting down")
            if len(self.queue) >= self.config.max_queue:
                raise QueueFull(f"{len(self.queue)} jobs are queued (max_queue)")
            self.jobs[job.spec.job_id] = job
            self.queue.append(job)
        self.wake()

    def cancel(self, job_id: str) -> bool:
        """Cancel a queued or running job; False if it is unknown or already ending."""
        with self.lock:
            job = self.jobs.get(job_id)
            if job is None or job.ended_mono is not None or job.future.done():
                return False
            if job in self.queue:
                self.queue.remove(job)
                job.stop_reason = "cancelled"
                self.finishing.append((job, None))
            else:
                worker = next((w for w in self.workers.values() if w.job is job), None)
                if worker is None:
                    return False
                self.stop_job(job, worker, "cancelled", time.monotonic())
        self.wake()
        return True

    def read_output(self, job_id: str, stream: str, offset: int, limit: int) -> JobOutput | None:
        """What a running job has written to `stream` from `offset` on; None when its
        output is not being captured (queued, unknown, or its result is made)."""
        with self.lock:
            found = self.capture.reader(job_id, stream)
        if found is None:
            return None
        fd, size, running = found
        try:  # outside the lock: the loop goes on draining while this reads
            return read_live(fd, size, running, offset, limit)
        finally:
            os.close(fd)

    def wait_ready(self, timeout: float | None) -> bool:
        """Wait until at least one worker is ready; False on timeout or a broken pool."""
        def settled() -> bool:
            return (any(w.state in ("idle", "busy", "checking") for w in self.workers.values())
                    or self.state in ("broken", "closed"))

        with self._changed:
            self._changed.wait_for(settled, timeout)
            return any(w.state in ("idle", "busy", "checking") for w in self.workers.values())

    def snapshot(self) -> dict[str, Any]:
        """The pool's state as plain data (for /health); cheap, taken under the lock."""
        with self.lock:
            states = [w.state for w in self.workers.values()]
            return {
                "backend": self.backend,
                "state": self.state,
                "broken_reason": self.broken_reason,
                "size": self.size,
                "idle": states.count("idle"),
                "busy": states.count("busy") + states.count("checking"),
                "starting": states.count("starting") + max(0, self.size - len(states)),
                "queued": len(self.queue),
                "preloaded": list(self.preloaded),
                "preload_skipped": dict(self.preload_skipped),
                "preload_threads": dict(self.preload_threads),
                "workers": [w.stats() for w in sorted(self.workers.values(), key=lambda w: w.slot)],
                "respawns": {"total": sum(self.respawns.values()), "by_reason": dict(self.respawns),
                             "recent": list(self.replacements)},
                "idle_since": self.idle_since,
                "template_pid": self.template.pid if self.template else None,
            }

    def shutdown(self, grace: float) -> None:
        """Take no more jobs, give running ones `grace` seconds, then kill; no orphans."""
        with self._changed:
            if self.state == "closed":
                return
            if self.state != "broken":
                self.state = "closing"
            while self.queue:  # never started: the caller may submit them again later
                job = self.queue.popleft()
                self.jobs.pop(job.spec.job_id, None)
                job.future.cancel()
                _remove_job_dir(job)
            self._changed.wait_for(lambda: not self._running(), grace)
            now = time.monotonic()
            for worker in self.workers.values():
                if worker.job is not None:
                    self.stop_job(worker.job, worker, "interrupted", now, hard=True)
            self.wake()
            self._changed.wait_for(lambda: not self._running() and not self.finishing, 10)
            self.state = "closed"
            self._close_template()  # EOF: the template kills and reaps every worker
            for worker in self.workers.values():
                self.kill_worker(worker, "shutdown")
            for slot in range(self.size):
                self._clean_slot(slot)
        self.wake()
        if self._thread is not None:
            self._thread.join(timeout=5)
        self.capture.close()

    def _running(self) -> bool:
        return any(w.job is not None for w in self.workers.values())

    # --- the loop ---------------------------------------------------------------------

    def wake(self) -> None:
        """Make the loop run a pass now."""
        try:
            os.write(self._wake_w, b"\0")
        except BlockingIOError:  # already awake
            pass

    def run(self) -> None:
        """The loop thread's body: one step per pass until closed."""
        while True:
            with self.lock:
                if self.state == "closed":
                    self._deliver_finished(time.monotonic(), force=True)
                    callbacks, self.callbacks = self.callbacks, []
                    _run_callbacks(callbacks)
                    return
                objects = [self._wake_r] + [w.conn for w in self.workers.values()
                                            if w.channel_closed_mono is None] + self.capture.fds()
                if self.template is not None:
                    objects.append(self.template.conn)
                timeout = self._next_timeout(time.monotonic())
            ready = connection.wait(objects, timeout)
            self.step(ready)

    def step(self, ready: list, now: float | None = None) -> None:
        """One pass: read, then murder, manage, dispatch, finish (gunicorn's order)."""
        now = time.monotonic() if now is None else now
        with self._changed:
            for obj in ready:
                if obj == self._wake_r:
                    os.read(self._wake_r, 4096)
                elif isinstance(obj, int):  # a job's output pipe
                    self.capture.drain_fd(obj)
                elif self.template is not None and obj is self.template.conn:
                    self._read_template()
                else:
                    worker = next((w for w in self.workers.values() if w.conn is obj), None)
                    if worker is not None:
                        self._read_worker(worker, now)
            if self.state != "closed":
                self.murder_workers(now)
                self.manage_workers(now)
                self.dispatch(now)
            self._deliver_finished(now)
            self._changed.notify_all()
            callbacks, self.callbacks = self.callbacks, []
        _run_callbacks(callbacks)

    def _next_timeout(self, now: float) -> float:
        wakeups = [now + 1.0]
        for w in self.workers.values():
            if w.job is not None:
                wakeups.append(now + self.config.monitor_interval)
                wakeups.extend(t for t in (w.job.deadline, w.job.kill_at) if t is not None)
            if w.state == "starting":
                wakeups.append(w.spawned_mono + self.config.worker_start_timeout)
            if w.channel_closed_mono is not None:
                wakeups.append(w.channel_closed_mono + _CHANNEL_GRACE_S)
        if self.finishing:
            wakeups.append(now + 0.05)
        if self.next_start_mono > now:
            wakeups.append(self.next_start_mono)
        if self.dirty_slots:
            wakeups.append(now + 0.02)
        return max(0.0, min(wakeups) - now)

    # --- the template -----------------------------------------------------------------

    def _read_template(self) -> None:
        try:
            msg = self.template.read()
        except (EOFError, OSError, protocol.ProtocolError):
            self._template_lost()
            return
        if isinstance(msg, protocol.TemplateReady):
            self.backend, self.preloaded = msg.backend, msg.preloaded
            self.preload_skipped, self.preload_threads = dict(msg.preload_skipped), dict(msg.preload_threads)
            if self.state == "starting":
                self.state = "ready"
        elif isinstance(msg, protocol.TemplateFailed):
            self.break_pool(f"template failed to start: {msg.error.strip()}")
        elif isinstance(msg, protocol.Spawned):
            worker = self.workers.get(msg.worker_id)
            if worker is not None:
                worker.pid = msg.pid
                if worker.state == "stopping":  # killed before we knew its pid
                    self.kill_worker(worker, worker.retire_reason or "killed")
        elif isinstance(msg, protocol.Exited):
            self.reap_workers(msg.worker_id, msg.return_code)

    def _template_lost(self) -> None:
        """The template died: its workers died with it (parent-death signal); start over."""
        self._close_template()
        for worker in list(self.workers.values()):
            self.reap_workers(worker.id, None)
        if self.state in ("closing", "closed", "broken"):
            return
        self.state = "starting"
        self._start_failed("template exited")

    def _close_template(self) -> None:
        if self.template is not None:
            self.template.close()
            self.template = None

    def break_pool(self, reason: str) -> None:
        """Stop respawning: the pool cannot work. Queued jobs fail with the reason."""
        self.state, self.broken_reason = "broken", reason
        while self.queue:
            job = self.queue.popleft()
            self.jobs.pop(job.spec.job_id, None)
            _remove_job_dir(job)
            self.callbacks.append(lambda job=job: job.future.set_exception(PoolBroken(reason)))

    # --- workers ----------------------------------------------------------------------

    def spawn_worker(self, slot: int) -> Worker:
        """Ask the template for a new worker in this slot."""
        worker_id, core = self.next_worker_id, self.placement.cores[slot]
        self.next_worker_id += 1
        env = self.placement.worker_env(worker_id, core, self.backend)
        conn = self.template.spawn(worker_id, slot, env, core)
        worker = Worker(worker_id, slot, core, self.placement.uid(slot), conn)
        self.workers[worker.id] = worker
        return worker

    def kill_worker(self, worker: Worker, reason: str) -> None:
        """SIGKILL the worker and its process group; reap_workers finishes its job."""
        if worker.state != "stopping":
            worker.state, worker.retire_reason = "stopping", reason
        if worker.pid is not None:
            usage.kill_group(worker.pid, signal.SIGKILL)
            try:  # it may not have called setsid() yet
                os.kill(worker.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass

    def stop_job(self, job: Job, worker: Worker, reason: str, now: float, hard: bool = False,
                 detail: str | None = None) -> None:
        """Interrupt a running job: SIGINT now, SIGKILL after the grace (at once if hard)."""
        if job.stop_reason is None:
            job.stop_reason, job.stop_detail = reason, detail
        if hard:
            self.kill_worker(worker, reason)
            return
        job.kill_at = now + self.config.kill_grace
        if worker.pid is not None:
            try:
                os.kill(worker.pid, signal.SIGINT)
            except ProcessLookupError:
                pass

    def murder_workers(self, now: float) -> None:
        """Stop what is overdue, over a limit, slow to start, or gone mute."""
        for worker in list(self.workers.values()):
            job = worker.job
            if worker.state == "starting" and now - worker.spawned_mono > self.config.worker_start_timeout:
                self.kill_worker(worker, "start_timeout")
            if worker.channel_closed_mono is not None and worker.state != "stopping" and \
                    now - worker.channel_closed_mono > _CHANNEL_GRACE_S:
                if job is not None and job.stop_reason is None:  # alive, its channel gone: cut by the job
                    job.stop_reason, job.stop_detail = "protocol_error", _CHANNEL_CUT
                self.kill_worker(worker, "channel_closed")
            if job is None:
                continue
            over = self.capture.over_limit(job.spec.job_id)
            if over and job.stop_reason is None:
                self.stop_job(job, worker, "output_limit", now, hard=True, detail=(
                    f"{over} exceeded output_limit_mb={self.config.output_limit_mb}"))
            elif job.kill_at is not None and now >= job.kill_at:
                self.kill_worker(worker, job.stop_reason or "timeout")
            elif job.deadline is not None and now >= job.deadline and job.stop_reason is None:
                self.stop_job(job, worker, "timeout", now)
        if now - self.last_monitor >= self.config.monitor_interval:
            self.last_monitor = now
            self._measure(now)

    def _measure(self, now: float) -> None:
        """Stop the running jobs that are over a memory or disk limit."""
        running = [w for w in self.workers.values() if w.state == "busy" and w.job and w.pid]
        for worker, verdict in limits.measure_running(self.config, running) if running else ():
            self.stop_job(worker.job, worker, verdict.reason, now, hard=True, detail=verdict.detail)

    def _read_worker(self, worker: Worker, now: float) -> bool:
        """Handle one message from a worker; False when its channel is closed or broken."""
        try:
            frame = worker.conn.recv_bytes(protocol.MAX_FRAME)
        except (EOFError, OSError) as exc:
            if isinstance(exc, OSError) and "bad message length" in str(exc):
                self._protocol_error(worker, f"a message longer than {protocol.MAX_FRAME} bytes")
            else:  # gone, or going: the template's exited gives the status
                worker.channel_closed_mono = now
            return False
        try:
            msg = protocol.decode(frame, protocol.FROM_WORKER)
        except protocol.ProtocolError as exc:
            self._protocol_error(worker, str(exc))
            return False
        self._handle_worker_msg(worker, msg, now)
        return True

    def _handle_worker_msg(self, worker: Worker, msg: protocol.Message, now: float) -> None:
        job, state = worker.job, worker.state
        if isinstance(msg, protocol.WorkerReady) and state == "starting" and msg.worker_id == worker.id:
            worker.preloaded, worker.device, worker.confinement = msg.preloaded, msg.device, msg.confinement
            worker.ready_seconds = now - worker.spawned_mono
            self.start_failures, self.last_start_error = 0, None
            worker.state = "idle"
        elif isinstance(msg, protocol.WorkerFailed) and worker.state == "starting":
            worker.state, worker.retire_reason = "stopping", "start_failed"
            self.last_start_error = msg.error
        elif isinstance(msg, protocol.JobDone) and worker.state == "busy" and job is not None \
                and job.done is None and msg.job_id == job.spec.job_id:
            job.done = msg
            worker.state = "checking"
            self._job_ended(worker, now)
        elif isinstance(msg, protocol.WorkerIdle) and worker.state == "checking":
            worker.checks += 1
            worker.check_seconds += max(0.0, msg.check_seconds)
            self._after_job(worker, list(msg.dirty))
        else:
            self._protocol_error(worker, f"{msg.type} is not expected from a worker that is {worker.state}")

    def _protocol_error(self, worker: Worker, what: str) -> None:
        """A worker broke the protocol: it is killed; its job says why."""
        if worker.job is not None and worker.job.stop_reason is None:
            worker.job.stop_reason = "protocol_error"
            worker.job.stop_detail = f"the worker broke the protocol ({what}); it was replaced"
        self.kill_worker(worker, "protocol_error")

    def _job_ended(self, worker: Worker, now: float) -> None:
        """The job's process is done: its result waits only for its output to drain.

        A job that hit a hard limit may have ended on its own before the monitor saw it
        (a write failing at the cap raises in the job): the limit is still its outcome.
        """
        job, worker.job = worker.job, None
        self.capture.drain(job.spec.job_id)  # its writers are usually gone already
        if job.stop_reason is None:
            verdict = limits.at_end(self.config, self.capture, job, worker.uid)
            if verdict is not None:
                job.stop_reason, job.stop_detail = verdict.reason, verdict.detail
        worker.jobs_run += 1
        job.ended_mono = now
        if job.device is not None:
            job.peak_device_bytes = job.device.finish()
        self.finishing.append((job, worker))
        if job.stop_reason and worker.state != "stopping":
            # Interrupted mid-way (SIGINT can land inside library code): never reused.
            self.kill_worker(worker, job.stop_reason)

    def _after_job(self, worker: Worker, dirty: list[str]) -> None:
        """The worker restored itself: check it from outside, then reuse or replace it."""
        dirty.extend(limits.leftovers(worker))
        reason = None
        if dirty:
            reason = "dirty"
        elif self.config.max_jobs_per_worker and worker.jobs_run >= self.config.max_jobs_per_worker:
            reason = "recycled"
        elif self.placement.device_memory_growing(worker):
            reason = "device_memory_growth"
        if reason is not None:
            worker.retire_reason = reason
            self.replacements.append({"worker": worker.id, "reason": reason, "detail": dirty[:5],
                                      "at": time.time()})
            self.kill_worker(worker, reason)
        else:
            worker.state = "idle"

    def reap_workers(self, worker_id: int, return_code: int | None) -> None:
        """A worker process is gone: end its job, mark its slot for cleaning, count it."""
        worker = self.workers.pop(worker_id, None)
        if worker is None:
            return
        try:  # what the worker sent before dying is still in the socket: read it first
            now = time.monotonic()
            while worker.job is not None and worker.conn.poll(0) and self._read_worker(worker, now):
                pass
        except OSError:
            pass
        worker.conn.close()
        if worker.pid is not None:
            usage.kill_group(worker.pid, signal.SIGKILL)  # orphaned grandchildren in its group
            self.dirty_slots[worker.slot] = worker.pid
        if worker.job is not None:
            worker.job.exit_status = return_code
            if return_code == _EXIT_CHANNEL_LOST and worker.job.stop_reason is None:
                worker.job.stop_reason, worker.job.stop_detail = "protocol_error", _CHANNEL_CUT
            worker.retire_reason = worker.job.stop_reason or "crashed"
            self._job_ended(worker, time.monotonic())
        if worker.ready_seconds is None and self.state not in ("closing", "closed"):
            self._start_failed(worker.retire_reason or "died while starting")
        elif self.state not in ("closing", "closed"):
            self.respawns[worker.retire_reason or "crashed"] += 1

    def _start_failed(self, reason: str) -> None:
        self.respawns["start_failed"] += 1
        self.start_failures += 1
        if self.start_failures >= self.config.max_start_failures:
            detail = self.last_start_error or reason
            self.break_pool(f"{self.start_failures} worker starts failed in a row; last: {detail.strip()}")
            return
        self.next_start_mono = time.monotonic() + min(0.25 * 2 ** (self.start_failures - 1), 10.0)

    def manage_workers(self, now: float) -> None:
        """Restore the worker count: start the template, then one worker per free slot."""
        if self.state in ("broken", "closing", "closed") or now < self.next_start_mono:
            return
        if self.template is None:
            self.template = TemplateLink(self.config, self.placement)
            return
        if self.backend is None:
            return  # the template is still importing
        used = {w.slot for w in self.workers.values()}
        for slot in range(self.size):
            if slot not in used and self._clean_slot(slot):
                self.spawn_worker(slot)

    def _clean_slot(self, slot: int) -> bool:
        """True when nothing of the slot's last worker is left: no process of its uid (or
        its process group), so its NeuronCore and its uid are free for a new worker."""
        pgid = self.dirty_slots.get(slot)
        if pgid is None:
            return True
        uid = self.placement.uid(slot)
        if uid is not None:
            if usage.uid_usage({uid})[uid].pids:
                sandbox.kill_uid(uid)
                return False
            usage.remove_shm(uid)
        elif usage.group_alive(pgid):
            usage.kill_group(pgid, signal.SIGKILL)
            return False
        del self.dirty_slots[slot]
        return True

    def dispatch(self, now: float) -> None:
        """Give queued jobs to idle workers, oldest job first."""
        for worker in self.workers.values():
            if not self.queue:
                break
            if worker.state != "idle":
                continue
            job = self.queue.popleft()
            if not job.future.set_running_or_notify_cancel():
                self.jobs.pop(job.spec.job_id, None)
                continue
            self._start_job(job, worker, now)
        busy = self.queue or any(w.job is not None for w in self.workers.values())
        self.idle_since = None if busy else (self.idle_since or time.time())

    def _start_job(self, job: Job, worker: Worker, now: float) -> None:
        worker.state, worker.job = "busy", job
        job.started_mono, job.started_at = now, time.time()
        job.worker = WorkerRef(worker.id, worker.pid or 0, worker.core)
        job.device = self.placement.device_tracker(worker.core, self.backend)
        job.deadline = now + job.timeout
        job.tmp_dir = self.placement.tmp_dir(worker.slot)
        job.uid = worker.uid
        self.placement.hand_over(job.job_dir, job.tmp_dir, job.main_path, worker.uid)
        if job.on_start is not None:  # before the job runs: the caller records it as running
            try:
                job.on_start(job.spec.job_id, job.worker)
            except Exception:  # noqa: BLE001 - a caller's bug must not stop the loop
                pass
        out, err = self.capture.open(job.spec.job_id)
        try:
            worker.conn.send_bytes(protocol.RunJob(job.spec.job_id, job.main_path, job.job_dir,
                                                   job.tmp_dir).encode())
            with socket.socket(fileno=os.dup(worker.conn.fileno())) as sock:
                reduction.sendfds(sock, [out, err])
        except OSError:  # the worker is gone: reap_workers ends the job
            worker.channel_closed_mono = now
        finally:
            os.close(out)
            os.close(err)

    def _deliver_finished(self, now: float, force: bool = False) -> None:
        """Build the results of jobs whose output has drained, and complete their futures."""
        still = []
        for job, worker in self.finishing:
            job_id = job.spec.job_id
            drained = self.capture.finished(job_id) or force or (
                job.ended_mono is not None and now - job.ended_mono > _DRAIN_GRACE_S)
            if not drained:
                still.append((job, worker))
                continue
            self.capture.stop(job_id)
            result = outcome.build_result(job, job.worker, self.config,
                                          lambda name, cap, job_id=job_id: self.capture.read_capped(
                                              job_id, name, cap))
            self.capture.release(job_id)
            self.jobs.pop(job_id, None)
            if job.tmp_dir and not self.config.keep_job_dirs and not any(
                    w.job is not None and w.job.tmp_dir == job.tmp_dir for w in self.workers.values()):
                shutil.rmtree(job.tmp_dir, ignore_errors=True)  # unless the slot's next job has it
            # Outside the lock (callbacks run after it is released): copying artifacts
            # takes as long as the files are big.
            self.callbacks.append(lambda job=job, result=result: self._finish_job(job, result))
        self.finishing = still

    def _finish_job(self, job: Job, result: Any) -> None:
        """Keep the job's artifacts, remove its dir, and hand the result to its caller."""
        if job.started_mono is not None:
            owner = job.uid if job.uid is not None else os.geteuid()
            try:
                result.artifacts, result.artifacts_skipped = artifacts.collect(
                    job.job_dir, str(self.config.artifacts_dir / job.spec.job_id), owner,
                    self.config.artifacts_pattern, self.config.max_artifacts_mb * 1024 * 1024)
            except Exception as exc:  # noqa: BLE001 - the result matters more than its files
                result.artifacts_skipped = [{"name": "*", "reason": f"collection failed: {exc!r}"[:300]}]
        if not self.config.keep_job_dirs:
            _remove_job_dir(job, tmp=False)
        _complete(job.future, result)


def _complete(future: Future, result: Any) -> None:
    if not future.done():
        if not future.running():
            future.set_running_or_notify_cancel()
        future.set_result(result)


def _remove_job_dir(job: Job, tmp: bool = True) -> None:
    try:  # the common case, cheaply: the script wrote nothing beside main.py
        os.unlink(job.main_path)
        os.rmdir(job.job_dir)
    except OSError:
        shutil.rmtree(job.job_dir, ignore_errors=True)
    if tmp and job.tmp_dir:
        shutil.rmtree(job.tmp_dir, ignore_errors=True)


def _run_callbacks(callbacks: list[Callable[[], None]]) -> None:
    for callback in callbacks:
        try:
            callback()
        except Exception:  # noqa: BLE001 - a caller's callback must not kill the loop
            traceback.print_exc()
