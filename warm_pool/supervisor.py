"""The supervisor: spawns, watches, kills, reaps and replaces workers; runs the queue.

Data flow (one loop thread owns the workers, their sockets and the capture)::

    submit() ─▶ queue ─▶ dispatch ─run_job + pipes─▶ spare ─▶ the job's process
                                    capture ◀─ its stdout/stderr ─┘    │ exits
                  template ─exited (wait status, peak RSS)─▶ reap_workers
                                    cgroup ─peak, OOM kills─┘          │ uid killed,
                                                                       ▼ pipes drained
                                              Finisher thread ─▶ result ─▶ Future
    each pass: read what arrived, murder_workers (overdue, over a limit, half-sent),
               manage_workers (clean seats, restore the spares), dispatch, finish_jobs,
               publish (the snapshot /health reads)

One process per job (the default): a slot keeps `spares_per_slot` workers forked,
confined and warmed, each on a uid (seat) of its own; a job goes to a ready spare of a
free slot; its process ends with it, everything of its uid is killed, its cgroup goes
once empty, and a new spare takes the seat. Nothing the job says ends it: the template
reports the wait status, the kernel the memory. On neuron a profiled job waits for a
process that starts its runtime for it, with the profiler on (profiling.py). In the
reuse mode (`reuse_workers`) a worker runs job after job: its job_done ends a job,
worker_idle (or its check deadline) decides whether it serves again.

Locking: `lock` guards only what callers share with the loop (the queue, the jobs by
id, the commands, the published snapshot), and is held for moments: no socket, file
or parsing work under it. Everything else is the loop's alone. Callers `submit`,
`cancel`, `read_output`, `snapshot`, `wait_ready` and `shutdown`.

Everything a worker sends is untrusted (its job may own the socket): read without
blocking (protocol.FrameReader), decoded by protocol.decode, and it must fit the
worker's state; anything else kills the worker with error_type ``protocol_error``.
"""

from __future__ import annotations

import copy
import os
import signal
import socket
import threading
import time
from collections import Counter, deque
from multiprocessing import connection, reduction
from typing import Any

from warm_pool import limits, protocol, usage
from warm_pool.capture import Capture, JobOutput, read_live
from warm_pool.config import PoolConfig
from warm_pool.errors import PoolBroken, PoolClosed, QueueFull, describe_exit
from warm_pool.finisher import Finisher, remove_job_dir
from warm_pool.monitor import Monitor, Watched
from warm_pool.neuron import profile
from warm_pool.placement import Placement
from warm_pool.profiling import ProfileSlots
from warm_pool.records import Job, Worker
from warm_pool.restarts import BROKEN_MAX_WAIT_S, Restarts, killed_from_outside
from warm_pool.result import WorkerRef
from warm_pool.seats import Seats
from warm_pool.template_link import TemplateLink

# After a worker's channel closes, how long its exit may take to be reported before the
# supervisor concludes the job closed the channel itself (reuse mode) and kills it.
_CHANNEL_GRACE_S = 0.5
# The worker's exit status when its job cut its channel (worker.EXIT_CHANNEL_LOST).
_EXIT_CHANNEL_LOST = 117
_CHANNEL_CUT = "the job closed its worker's channel to the service (e.g. os.closerange); the job was stopped"
# After a job's process ended, how long its pipes may stay open (a grandchild holding
# them is being killed) before the result is built from what arrived.
_DRAIN_GRACE_S = 2.0
_READY = ("idle", "busy", "checking")
# Longest a send to a worker may wait for room in its socket (it holds a few bytes; only
# a worker that stopped reading makes it wait): then the worker is treated as gone.
_SEND_TIMEOUT_S = 0.2
_RETRYING = f"; the pool tries again by itself, at most {BROKEN_MAX_WAIT_S:g} s apart"


class Supervisor:
    """Owns the template, the workers and the queue; `step` runs one pass of the loop."""

    def __init__(self, config: PoolConfig, placement: Placement):
        self.config = config
        self.placement = placement
        self.size = len(placement.cores)
        self.one_job = not config.reuse_workers
        # Shared with callers, under `lock`:
        self.lock = threading.Lock()
        self._changed = threading.Condition(self.lock)
        self.queue: deque[Job] = deque()
        self.jobs: dict[str, Job] = {}
        self.commands: list[tuple[str, str]] = []
        self.state = "starting"  # starting | ready | broken | closing | closed
        self.broken_reason: str | None = None
        self.published: dict[str, Any] = {}
        # The loop's own:
        self.workers: dict[int, Worker] = {}
        self.finishing: list[Job] = []
        self.seats = Seats(placement)
        self.respawns: Counter[str] = Counter()
        self.replacements: deque[dict[str, Any]] = deque(maxlen=20)  # the latest, with details
        self.backend: str | None = None
        self.preloaded: tuple[str, ...] = ()
        self.preload_skipped: dict[str, str] = {}
        self.preload_threads: dict[str, int] = {}
        self.template_import_s: float | None = None  # the last template's imports, by its clock
        self.template: TemplateLink | None = None
        self.standby: TemplateLink | None = None  # a fork of the template, to take over if it dies
        self.restarts = Restarts(config.max_start_failures)  # bad starts, the wait before the next
        self.last_start_error: str | None = None  # a worker's start-up traceback
        self.next_worker_id = 1
        self.idle_since: float | None = None
        self.spare_seconds: deque[float] = deque(maxlen=50)  # fork → ready of the latest spares
        self.profiling = ProfileSlots(self.size)  # neuron: slots kept for profiled jobs
        self.capture = Capture(os.path.join(config.work_dir, "capture"), placement.output_limit_bytes)
        self._wake_r, self._wake_w = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)
        self.finisher = Finisher(config, on_done=self.wake)
        self.monitor = Monitor(config, self.wake)
        self._thread: threading.Thread | None = None

    # --- what callers may do --------------------------------------------------------

    def start(self) -> None:
        """Start the loop thread (it starts the template and the workers)."""
        self.monitor.start()
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
            job.one_job = self.one_job
            self.jobs[job.spec.job_id] = job
            self.queue.append(job)
        self.wake()

    def cancel(self, job_id: str) -> bool:
        """Cancel a queued or running job; False if it is unknown or already ending."""
        with self.lock:
            job = self.jobs.get(job_id)
            if job is None or job.ended_mono is not None or job.future.done():
                return False
            self.commands.append(("cancel", job_id))
        self.wake()
        return True

    def read_output(self, job_id: str, stream: str, offset: int, limit: int) -> JobOutput | None:
        """What a running job has written to `stream` from `offset` on; None when its
        output is not being captured (queued, unknown, or its result is made)."""
        found = self.capture.reader(job_id, stream)
        if found is None:
            return None
        fd, size, running = found
        try:
            return read_live(fd, size, running, offset, limit)
        finally:
            os.close(fd)

    def wait_ready(self, timeout: float | None) -> bool:
        """Wait until at least one worker is ready; False on timeout or a broken pool."""
        def settled() -> bool:
            return self.published.get("ready", False) or self.state in ("broken", "closed")

        with self._changed:
            self._changed.wait_for(settled, timeout)
            return bool(self.published.get("ready", False))

    def snapshot(self) -> dict[str, Any]:
        """The pool's state as plain data (for /health), as the loop last published it:
        never waits for the loop."""
        with self.lock:
            published = self.published
        return copy.deepcopy(published) if published else self._describe()

    def shutdown(self, grace: float) -> None:
        """Take no more jobs, give running ones `grace` seconds, then kill; no orphans."""
        with self._changed:
            if self.state == "closed":
                return
            self.state = "closing"  # a broken pool too: it stops retrying
            while self.queue:  # never started: the caller may submit them again later
                job = self.queue.popleft()
                self.jobs.pop(job.spec.job_id, None)
                job.future.cancel()
                remove_job_dir(job)
        self.wake()
        with self._changed:
            self._changed.wait_for(lambda: not self.published.get("running"), grace)
            self.commands.append(("interrupt", ""))
        self.wake()
        with self._changed:
            self._changed.wait_for(lambda: not self.published.get("running")
                                   and not self.published.get("finishing"), 10)
            self.state = "closed"
        self.wake()
        if self._thread is not None:
            self._thread.join(timeout=10)
        self.monitor.stop()
        self._close_template()  # EOF: the template kills and reaps every worker
        self._drop_standby()
        for worker in list(self.workers.values()):
            self.kill_worker(worker, "shutdown")
            self.seats.release(worker, kill=True)
        self.seats.clean_all()
        self.finisher.shutdown()
        self.capture.close()

    # --- the loop ---------------------------------------------------------------------

    def wake(self) -> None:
        """Make the loop run a pass now."""
        try:
            os.write(self._wake_w, b"\0")
        except BlockingIOError:  # already awake
            pass

    def run(self) -> None:
        """The loop thread's body: one step per pass until closed."""
        while self.state != "closed":
            objects = [self._wake_r] + [w.reader.fd for w in self.workers.values()
                                        if not w.reader.eof] + self.capture.fds()
            if self.template is not None:
                objects.append(self.template.conn)
            if self.standby is not None:
                objects.append(self.standby.conn)
            ready = connection.wait(objects, self._next_timeout(time.monotonic()))
            self.step(ready)
        self._finish_jobs(time.monotonic(), force=True)
        self.publish()

    def step(self, ready: list, now: float | None = None) -> None:
        """One pass: read, then murder, manage, dispatch, finish (gunicorn's order)."""
        now = time.monotonic() if now is None else now
        by_fd = {w.reader.fd: w for w in self.workers.values()}
        for obj in ready:
            if obj == self._wake_r:
                os.read(self._wake_r, 4096)
            elif self.template is not None and obj is self.template.conn:
                self._read_template()
            elif self.standby is not None and obj is self.standby.conn:
                self._read_standby()
            elif obj in by_fd:
                self._read_worker(by_fd[obj], now)
            elif isinstance(obj, int):  # a job's output pipe
                self.capture.drain_fd(obj)
        with self.lock:
            commands, self.commands = self.commands, []
            closing = self.state in ("closing", "closed")
        for command, job_id in commands:
            self._command(command, job_id, now)
        self._take_readings(now)
        self.murder_workers(now)
        if not closing:
            self.manage_workers(now)
            self.dispatch(now)
        self._finish_jobs(now)
        self.publish()

    def _next_timeout(self, now: float) -> float:
        wakeups = [now + 1.0]
        for w in self.workers.values():
            if w.job is not None:
                wakeups.extend(t for t in (w.job.deadline, w.job.kill_at) if t is not None)
            if w.state == "starting":
                wakeups.append(w.spawned_mono + self.config.worker_start_timeout)
            if w.reader.partial_since is not None:
                wakeups.append(w.reader.partial_since + self.config.message_timeout)
            if w.channel_closed_mono is not None:
                wakeups.append(w.channel_closed_mono + _CHANNEL_GRACE_S)
        if self.finishing or self.seats.dirty:
            wakeups.append(now + 0.005)
        if self.restarts.next_mono > now:
            wakeups.append(self.restarts.next_mono)
        return max(0.0, min(wakeups) - now)

    def publish(self) -> None:
        """Publish the snapshot callers read, and the running jobs the monitor measures."""
        described = self._describe()
        self.monitor.watch(tuple(
            Watched(w.job.spec.job_id, w.pid, w.uid, w.group, w.job)
            for w in self.workers.values() if w.state == "busy" and w.job is not None and w.pid))
        with self._changed:
            self.published = described
            self._changed.notify_all()

    def _describe(self) -> dict[str, Any]:
        states = [w.state for w in self.workers.values()]
        busy_slots = {w.slot for w in self.workers.values() if w.state in ("busy", "checking")}
        free_ready = {w.slot for w in self.workers.values() if w.state == "idle"} - busy_slots
        with_job = [w for w in self.workers.values() if w.job is not None]
        return {
            "backend": self.backend, "state": self.state, "broken_reason": self.broken_reason,
            "size": self.size, "idle": len(free_ready), "busy": len(busy_slots),
            "starting": self.size - len(free_ready) - len(busy_slots),
            "spares": {"ready": states.count("idle"), "starting": states.count("starting"),
                       "parked": states.count("parked") + states.count("opening"),
                       "per_slot": self.config.spares_per_slot,
                       "ready_ms_p50": _p50_ms(self.spare_seconds),
                       "kept_for_profiles": sorted(self.profiling.kept)},
            "queued": len(self.queue), "ready": any(s in _READY for s in states),
            "running": len(with_job), "finishing": len(self.finishing),
            "preloaded": list(self.preloaded), "preload_skipped": dict(self.preload_skipped),
            "preload_threads": dict(self.preload_threads),
            "workers": [w.stats() for w in sorted(self.workers.values(), key=lambda w: (w.slot, w.id))],
            "respawns": {"total": sum(self.respawns.values()), "by_reason": dict(self.respawns),
                         "recent": list(self.replacements)},
            "idle_since": self.idle_since,
            "template_pid": self.template.pid if self.template else None,
            "template_import_s": self.template_import_s,
            "standby_template_pid": self.standby.pid if self.standby and self.standby.ready else None,
            "starts": self.restarts.describe(time.monotonic()),
        }

    def _command(self, command: str, job_id: str, now: float) -> None:
        if command == "interrupt":
            for worker in self.workers.values():
                if worker.job is not None:
                    self.stop_job(worker.job, worker, "interrupted", now, hard=True)
            return
        with self.lock:
            job = self.jobs.get(job_id)
            queued = job is not None and job in self.queue
            if queued:
                self.queue.remove(job)
        if job is None or job.ended_mono is not None:
            return
        if queued:
            job.stop_reason = "cancelled"
            job.ended_mono = now
            self.finishing.append(job)
            return
        worker = next((w for w in self.workers.values() if w.job is job), None)
        if worker is not None:
            self.stop_job(job, worker, "cancelled", now)

    # --- the template -----------------------------------------------------------------

    def _read_template(self) -> None:
        try:
            msg = self.template.read()
        except (EOFError, OSError, protocol.ProtocolError):
            self._template_lost()  # its exit status says whether it failed or was killed
            return
        if isinstance(msg, protocol.TemplateReady):
            self.backend, self.preloaded = msg.backend, msg.preloaded
            self.preload_skipped, self.preload_threads = msg.preload_skipped, msg.preload_threads
            if msg.import_seconds:  # a standby that takes over imported nothing
                self.template_import_s = round(msg.import_seconds, 3)
            with self.lock:
                if self.state == "starting":
                    self.state = "ready"
        elif isinstance(msg, protocol.TemplateFailed):
            self._template_lost(failed=f"the template could not start: {msg.error.strip()}")
        elif isinstance(msg, protocol.Spawned):
            worker = self.workers.get(msg.worker_id)
            if worker is not None:
                worker.pid = msg.pid
        elif isinstance(msg, protocol.Exited):
            self.reap_workers(msg.worker_id, msg.return_code, msg.max_rss_kb * 1024)

    def _template_lost(self, failed: str | None = None) -> None:
        """The template died or could not start (`failed`): every worker dies with it
        (parent-death signal); start over after a wait (restarts.py)."""
        return_code = self._close_template()
        for worker_id in list(self.workers):
            self.reap_workers(worker_id, None, 0)
        if self.state in ("closing", "closed"):
            return
        now = time.monotonic()
        if failed is not None:
            self.respawns["start_failed"] += 1
            self.restarts.template_failed(failed, now)
            self.break_pool(failed.strip() + _RETRYING)
            self._drop_standby()
            return
        self.respawns["template_died"] += 1
        what = f"the template ended: {describe_exit(return_code)}"
        if killed_from_outside(return_code):
            self.restarts.start_killed(what, now)
        else:
            self._start_failed(what, now)
        if self.standby is not None and self.standby.ready:  # it takes over: no imports to wait for
            self.template, self.standby = self.standby, None
        self._drop_standby()

    def _read_standby(self) -> None:
        """The standby says it is ready; anything else (its end, a stray message) drops it
        and manage_workers asks the template for another."""
        try:
            if isinstance(self.standby.read(), protocol.TemplateReady) and self.standby.ready:
                return
        except (EOFError, OSError, protocol.ProtocolError):
            pass
        self._drop_standby()

    def _drop_standby(self) -> None:
        standby, self.standby = self.standby, None
        if standby is not None:
            standby.close()

    def _close_template(self) -> int | None:
        """Close the template (it ends and takes its workers); its exit status."""
        template, self.template = self.template, None
        return template.close() if template is not None else None

    def break_pool(self, reason: str) -> None:
        """The pool cannot run jobs: fail the queued ones and say why until a worker
        starts again (it keeps trying, restarts.py)."""
        with self.lock:
            self.state, self.broken_reason = "broken", reason
            queued, self.queue = list(self.queue), deque()
            for job in queued:
                self.jobs.pop(job.spec.job_id, None)
        for job in queued:
            remove_job_dir(job)
            job.future.set_exception(PoolBroken(reason))

    def _recovered(self) -> None:
        """A worker started: a broken pool takes jobs again."""
        with self.lock:
            if self.state == "broken":
                self.state, self.broken_reason = "ready", None

    # --- workers ----------------------------------------------------------------------

    def spawn_worker(self, slot: int, uid: int | None) -> Worker:
        """Ask the template for a new worker in this slot, on this uid."""
        worker_id, core = self.next_worker_id, self.placement.cores[slot]
        self.next_worker_id += 1
        env = self.placement.worker_env(worker_id, core, self.backend)
        group = self.seats.make_group(worker_id)
        defer = self.one_job and self.backend == "neuron"
        conn = self.template.spawn(protocol.Spawn(
            worker_id, slot, uid, env, core, group.procs_files if group else (),
            self.config.job_tmpfs_mb if self.placement.namespaces else 0, self.placement.tmpfs_targets(),
            defer, self.one_job))
        worker = Worker(worker_id, slot, core, uid, conn, one_job=self.one_job, group=group)
        os.set_blocking(conn.fileno(), False)
        worker.reader = protocol.FrameReader(conn.fileno())
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
        """Stop what is overdue, over a limit, slow to start or check, half-sent, or mute."""
        for worker in list(self.workers.values()):
            job = worker.job
            if worker.state in ("starting", "opening") and \
                    now - worker.spawned_mono > self.config.worker_start_timeout:
                self.kill_worker(worker, "start_timeout")
            if worker.state == "checking" and now - worker.check_started_mono > self.config.check_timeout:
                self.kill_worker(worker, "check_timeout")
            if worker.reader.partial_since is not None and worker.state != "stopping" and \
                    now - worker.reader.partial_since > self.config.message_timeout:
                self._protocol_error(worker, f"a message left half-sent for over "
                                             f"{self.config.message_timeout:g} s")
            if worker.channel_closed_mono is not None and worker.state != "stopping" and \
                    now - worker.channel_closed_mono > _CHANNEL_GRACE_S and \
                    not (worker.one_job and worker.state == "busy"):
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

    def _take_readings(self, now: float) -> None:
        """What the monitor measured: peaks recorded, jobs over a limit stopped."""
        running = {w.job.spec.job_id: w for w in self.workers.values() if w.job is not None}
        for reading in self.monitor.take():
            worker = running.get(reading.job_id)
            if worker is None:
                continue
            job = worker.job
            job.peak_memory_bytes = max(job.peak_memory_bytes, reading.memory_bytes)
            if reading.own_peak_bytes is not None:
                job.own_peak_bytes = max(job.own_peak_bytes or 0, reading.own_peak_bytes)
            if reading.verdict is not None and job.stop_reason is None:
                self.stop_job(job, worker, reading.verdict.reason, now, hard=True,
                              detail=reading.verdict.detail)

    def _read_worker(self, worker: Worker, now: float) -> None:
        """Handle what a worker sent: whole frames only, never waiting for the rest."""
        try:
            frames = worker.reader.read(now)
        except protocol.ProtocolError as exc:
            self._protocol_error(worker, str(exc))
            return
        for frame in frames:
            try:
                msg = protocol.decode(frame, protocol.FROM_WORKER)
            except protocol.ProtocolError as exc:
                self._protocol_error(worker, str(exc))
                return
            self._handle_worker_msg(worker, msg, now)
            if worker.state == "stopping":
                return
        if worker.reader.eof and worker.channel_closed_mono is None:
            worker.channel_closed_mono = now  # gone or going: the template's exited says how

    def _handle_worker_msg(self, worker: Worker, msg: protocol.Message, now: float) -> None:
        job, state = worker.job, worker.state
        if isinstance(msg, protocol.WorkerReady) and state in ("starting", "opening") \
                and msg.worker_id == worker.id:
            worker.preloaded, worker.device, worker.confinement = msg.preloaded, msg.device, msg.confinement
            if state == "starting":
                worker.ready_seconds = now - worker.spawned_mono
            self.restarts.started()
            self.last_start_error = None
            self._recovered()
            parked = worker.one_job and self.backend == "neuron" and msg.device is None
            worker.state = "parked" if parked else "idle"
            if not parked:
                self.spare_seconds.append(now - worker.spawned_mono)
        elif isinstance(msg, protocol.WorkerFailed) and state in ("starting", "opening"):
            worker.state, worker.retire_reason = "stopping", "start_failed"
            self.last_start_error = msg.error
        elif isinstance(msg, protocol.JobDone) and state == "busy" and job is not None \
                and job.done is None and msg.job_id == job.spec.job_id:
            if worker.one_job and msg.error_type not in (None, *protocol.JOB_ERROR_TYPES):
                self._protocol_error(worker, "job_done names an error_type outside the fixed set")
                return
            job.done = msg
            if not worker.one_job:  # the reuse mode: the worker's word ends the job
                worker.state, worker.check_started_mono = "checking", now
                self._job_ended(worker, now)
        elif isinstance(msg, protocol.WorkerIdle) and state == "checking":
            worker.checks += 1
            worker.check_seconds += max(0.0, msg.check_seconds)
            self._after_job(worker, list(msg.dirty))
        else:
            self._protocol_error(worker, f"{msg.type} is not expected from a worker that is {worker.state}")

    def _protocol_error(self, worker: Worker, what: str) -> None:
        """A worker broke the protocol: it is killed; its job says why."""
        if worker.job is not None and worker.job.stop_reason is None:
            worker.job.stop_reason = "protocol_error"
            worker.job.stop_detail = f"the worker broke the protocol ({what[:200]}); it was replaced"
        self.kill_worker(worker, "protocol_error")

    def _job_ended(self, worker: Worker, now: float) -> None:
        """The job is over: its result waits only for its output to drain."""
        job, worker.job = worker.job, None
        self.capture.drain(job.spec.job_id)  # its writers are usually gone already
        over = self.capture.over_limit(job.spec.job_id)
        if over and job.stop_reason is None:
            job.stop_reason = "output_limit"
            job.stop_detail = f"{over} exceeded output_limit_mb={self.config.output_limit_mb}"
        worker.jobs_run += 1
        job.ended_mono = now
        if worker.group is not None and job.own_peak_bytes is None:
            job.own_peak_bytes = worker.group.usage().peak_bytes
        if job.device is not None:
            job.peak_device_bytes = job.device.finish()
        self.finishing.append(job)
        if not worker.one_job and job.stop_reason and worker.state != "stopping":
            # Interrupted mid-way (SIGINT can land inside library code): never reused.
            self.kill_worker(worker, job.stop_reason)

    def _after_job(self, worker: Worker, dirty: list[str]) -> None:
        """Reuse mode: the worker restored itself; check it from outside, then reuse or
        replace it."""
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
            worker.state, worker.check_started_mono = "idle", None

    def reap_workers(self, worker_id: int, return_code: int | None, max_rss: int) -> None:
        """A worker process is gone: end its job with its status and the kernel's
        accounts, kill what its uid still runs, mark its seat for cleaning, count it."""
        worker = self.workers.pop(worker_id, None)
        if worker is None:
            return
        now = time.monotonic()
        try:  # what it sent before it ended is still in the socket: read it first
            self._read_worker(worker, now)
        except OSError:
            pass
        self.seats.release(worker, kill=True)
        job = worker.job
        if job is not None:
            job.exit_status = return_code
            job.peak_memory_bytes = max(job.peak_memory_bytes, max_rss)
            if worker.group is not None:
                accounts = worker.group.usage()
                job.own_peak_bytes = max(job.own_peak_bytes or 0, accounts.peak_bytes)
                job.oom_kills = accounts.oom_kills if self.config.memory_limit_bytes else 0
            if not worker.one_job and return_code == _EXIT_CHANNEL_LOST and job.stop_reason is None:
                job.stop_reason, job.stop_detail = "protocol_error", _CHANNEL_CUT
            if not worker.one_job or job.stop_reason:
                worker.retire_reason = job.stop_reason or "crashed"
            self._job_ended(worker, now)
        elif worker.state != "stopping" and worker.retire_reason is None:
            worker.retire_reason = "crashed"  # a spare died, killed from outside
        worker.conn.close()
        if self.state in ("closing", "closed"):
            return
        if worker.ready_seconds is None:
            self._start_ended(worker, return_code)
        elif worker.retire_reason is not None:
            self.respawns[worker.retire_reason] += 1

    def _start_ended(self, worker: Worker, return_code: int | None) -> None:
        """A worker ended before it was ready: a failed start, or one killed from outside
        (never counted towards broken); restarts.py says which and how long to wait."""
        if return_code is None:  # it died with its template, which _template_lost counts
            self.respawns["start_killed"] += 1
            return
        now = time.monotonic()
        what = f"worker {worker.id} ended before it was ready: {describe_exit(return_code)}"
        if killed_from_outside(return_code, worker.retire_reason):
            self.respawns["start_killed"] += 1
            self.restarts.start_killed(what, now)
            return
        self.respawns["start_failed"] += 1
        if worker.retire_reason == "start_failed" and self.last_start_error:
            what = self.last_start_error  # what it reported (WorkerFailed): its traceback
        elif worker.retire_reason in ("start_timeout", "protocol_error"):
            what += f" (stopped: {worker.retire_reason})"
        self._start_failed(what, now)

    def _start_failed(self, what: str, now: float) -> None:
        self.restarts.start_failed(what, now)
        if self.restarts.broken:  # the reason kept current while it stays broken
            self.break_pool(f"{self.restarts.failed} starts failed in a row{_RETRYING}; "
                            f"last: {what.strip()}")

    def manage_workers(self, now: float) -> None:
        """Clean the seats jobs left, restore each slot's spares, hand free cores over."""
        self.seats.clean()
        starting = sum(1 for w in self.workers.values() if w.state == "starting")
        if self.state in ("closing", "closed") or not self.restarts.may_start(now, starting):
            return
        if self.template is None:
            self.template = TemplateLink(self.config, self.placement)
            return
        if self.backend is None:
            return  # the template is still importing
        if self.standby is None:
            self.standby = TemplateLink.standby_of(self.template)
        for slot in range(self.size):
            mine = [w for w in self.workers.values() if w.slot == slot]
            waiting = [w for w in mine if w.state in ("starting", "parked", "opening", "idle")]
            wanted = self._spares_wanted(mine)
            for _ in range(wanted - len(waiting)):
                if not self.restarts.may_start(now, starting):
                    break  # broken: one worker at a time
                starting += 1
                uid = self.seats.free(slot, [w.uid for w in mine], len(mine))
                if uid is False:
                    break
                mine.append(self.spawn_worker(slot, uid))
            if self.one_job and self.backend == "neuron":
                self._open_device(slot, mine)

    def _spares_wanted(self, mine: list[Worker]) -> int:
        """How many waiting processes a slot should have now.

        While the slot runs a job, or a job's result is being built, one ready spare is
        enough for the next job, and the rest are forked after: the template reports a
        job's exit only between two forks (a fork of the template takes 20-40 ms here),
        and a fork's work competes with the result's for the cores.
        """
        if not self.one_job:
            return 0 if mine else 1
        if self.finishing or self.finisher.busy or any(w.state == "busy" for w in mine):
            return min(1, self.config.spares_per_slot)
        return self.config.spares_per_slot

    def _open_device(self, slot: int, mine: list[Worker]) -> None:
        """Neuron: a NeuronCore serves one process at a time, so spares wait without it;
        once its last holder has exited (its seat clean), the oldest spare opens it. On a
        slot kept for a profiled job, with the profiler on, writing into the job's dir."""
        if any(w.state in ("opening", "idle", "busy") for w in mine) or self.seats.slot_dirty(slot):
            return
        parked = sorted((w for w in mine if w.state == "parked"), key=lambda w: w.id)
        if parked:
            worker, job = parked[0], self.profiling.opening(slot)
            try:
                env = self.placement.hand_over_profile(job.job_dir, job.main_path, worker.uid) if job else {}
                _send(worker, protocol.OpenDevice(env).encode())
                worker.state, worker.profile_job = "opening", job.spec.job_id if job else None
            except OSError:
                self.kill_worker(worker, "channel_closed")

    def _own_process(self, job: Job) -> bool:
        """Whether a job needs a process whose runtime starts for it: a profiled job on
        neuron, one process per job, unless that runtime would not start (profiling.py)."""
        wanted = job.spec.profile and job.profile_unavailable is None
        return wanted and self.one_job and self.backend == "neuron"

    def _keep_slots(self, queued: list[Job], busy: set[int]) -> None:
        """Keep slots for the profiled jobs in line: retire the spares that hold or open
        their cores (they never ran a job), but one opened for the job itself."""
        ready = {w.slot for w in self.workers.values() if w.state == "idle" and w.profile_job is None}
        for slot, keep in self.profiling.plan(queued, busy, ready, self._own_process):
            for worker in [w for w in self.workers.values() if w.slot == slot]:
                if worker.state in ("opening", "idle") and worker.profile_job != keep:
                    self.kill_worker(worker, "profiling")

    def dispatch(self, now: float) -> None:
        """Give queued jobs to ready spares of free slots, oldest job first; on neuron a
        profiled job first gets a process of its own (profiling.py, _open_device)."""
        busy = {w.slot for w in self.workers.values() if w.state in ("busy", "checking")}
        with self.lock:
            queued = list(self.queue)
        if self.profiling.kept or any(job.spec.profile for job in queued):
            self._keep_slots(queued, busy)
        for worker in sorted(self.workers.values(), key=lambda w: w.id):
            if worker.state != "idle" or worker.slot in busy:
                continue
            job = self.profiling.job_for(worker, queued, self._own_process)
            if job is None:
                continue
            queued.remove(job)
            with self.lock:  # shutdown() may have emptied the queue since it was read
                taken = job in self.queue
                if taken:
                    self.queue.remove(job)
            if not taken:
                continue
            if not job.future.set_running_or_notify_cancel():
                with self.lock:
                    self.jobs.pop(job.spec.job_id, None)
                continue
            busy.add(worker.slot)
            self._start_job(job, worker, now)
        running = busy or self.queue
        self.idle_since = None if running else (self.idle_since or time.time())

    def _start_job(self, job: Job, worker: Worker, now: float) -> None:
        worker.state, worker.job = "busy", job
        if job.spec.profile:  # its runtime was started for it, or it has no profile
            self.profiling.started(job, worker.slot)
            if worker.profile_job == job.spec.job_id:
                job.profile_dir = os.path.join(job.job_dir, profile.OUTPUT_DIR)
            elif job.profile_unavailable is None:
                job.profile_unavailable = profile.unavailable(self.backend, self.one_job) or \
                    "its process's Neuron runtime was started without the profiler"
        # Not the pass's `now`: callers submit while the loop runs, so a job taken in this
        # pass may have arrived after it began.
        now = time.monotonic()
        job.started_mono, job.started_at = now, time.time()
        job.worker = WorkerRef(worker.id, worker.pid or 0, worker.core)
        job.device = self.placement.device_tracker(worker.core, self.backend)
        job.deadline = now + job.timeout
        private_tmp = self.placement.private_tmp
        job.tmp_dir = "/tmp" if private_tmp else self.placement.tmp_dir(worker.slot)
        job.uid = worker.uid
        self.placement.hand_over(job.job_dir, None if private_tmp else job.tmp_dir, job.main_path, worker.uid)
        if not worker.one_job and worker.group is not None:
            worker.group.reset_peak()
        if job.on_start is not None:  # before the job runs: the caller records it as running
            try:
                job.on_start(job.spec.job_id, job.worker)
            except Exception:  # noqa: BLE001 - a caller's bug must not stop the loop
                pass
        out, err = self.capture.open(job.spec.job_id)
        try:
            _send(worker, protocol.RunJob(job.spec.job_id, job.main_path, job.job_dir, job.tmp_dir).encode(),
                  fds=[out, err])
        except OSError:  # the worker is gone: reap_workers ends the job
            worker.channel_closed_mono = now
        finally:
            os.close(out)
            os.close(err)

    def _finish_jobs(self, now: float, force: bool = False) -> None:
        """Hand the jobs whose output has drained to the finisher, which builds results."""
        still = []
        for job in self.finishing:
            job_id = job.spec.job_id
            drained = self.capture.finished(job_id) or force or (
                job.ended_mono is not None and now - job.ended_mono > _DRAIN_GRACE_S)
            if not drained:
                self.capture.drain(job_id)
                still.append(job)
                continue
            self.capture.stop(job_id)
            fds = self.capture.take_files(job_id)
            self.capture.release(job_id)
            with self.lock:
                self.jobs.pop(job_id, None)
            shared_tmp = any(w.job is not None and w.job.tmp_dir == job.tmp_dir
                             for w in self.workers.values())
            self.finisher.submit(job, fds, remove_tmp=not shared_tmp)
        self.finishing = still


def _send(worker: Worker, data: bytes, fds: list[int] | None = None) -> None:
    """Send a frame (and fds) to a worker; its socket is non-blocking, so a worker whose
    job stopped reading and filled it raises OSError instead of stalling the loop."""
    with socket.socket(fileno=os.dup(worker.conn.fileno())) as sock:
        sock.settimeout(_SEND_TIMEOUT_S)
        sock.sendall(len(data).to_bytes(4, "big") + data)
        if fds:
            reduction.sendfds(sock, fds)


def _p50_ms(values: deque[float]) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return round(1000 * ordered[len(ordered) // 2], 2)
