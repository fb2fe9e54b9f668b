"""The supervisor: spawns, watches, kills, reaps and replaces workers; dispatches jobs.

Data flow (one loop thread owns every connection; callers only queue and wake it)::

    submit() ─▶ queue ─▶ dispatch ─RunJob─▶ worker ─JobDone─▶ finish ─▶ Future
                                   template ─Exited─▶ reap_workers ─▶ finish (crash)
    each pass: handle ready connections, murder_workers (overdue, over memory),
               reap_workers, manage_workers (restore the count), dispatch

Every mutation happens under `lock`; futures and callbacks run after it is released,
so a slow callback can never stall the loop.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import threading
import time
from collections import Counter, deque
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from multiprocessing import connection, reduction
from multiprocessing.connection import Connection

import psutil

from warm_pool import protocol
from warm_pool.config import PoolConfig
from warm_pool.result import JobSpec


@dataclass(eq=False)
class Job:
    """A job from submit() until its result is set."""

    spec: JobSpec
    future: Future
    on_start: Callable | None
    paths: protocol.RunJob
    timeout: float
    submitted_mono: float = field(default_factory=time.monotonic)
    submitted_at: float = field(default_factory=time.time)
    started_mono: float | None = None
    started_at: float | None = None
    deadline: float | None = None
    kill_at: float | None = None
    stop_reason: str | None = None  # timeout | cancelled | memory_limit | interrupted
    peak_tree_bytes: int = 0
    done: protocol.JobDone | None = None
    device: object | None = None  # neuron.PeakTracker of the job's NeuronCore
    peak_device_bytes: int | None = None


@dataclass(eq=False)
class Worker:
    """One worker process as the supervisor sees it."""

    id: int
    slot: int
    core: int | None
    conn: Connection
    state: str = "starting"  # starting | idle | busy | stopping
    pid: int | None = None
    spawned_mono: float = field(default_factory=time.monotonic)
    ready_seconds: float | None = None
    preloaded: tuple[str, ...] = ()
    device: str | None = None
    jobs_run: int = 0
    job: Job | None = None
    retire_reason: str | None = None
    growth: object | None = None  # neuron.IdleGrowth of its core's idle device memory


class Supervisor:
    """Owns the template and workers; `step` runs one pass of the loop."""

    def __init__(self, config: PoolConfig, size: int, cores: list[int | None],
                 finish: Callable[[Job, Worker | None, int | None], None],
                 notify: Callable[[list[Callable[[], None]]], None]):
        self.config = config
        self.size = size
        self.cores = cores
        self.finish = finish  # builds and delivers a Job's result (called under lock)
        self.notify = notify
        self.lock = threading.RLock()
        self.queue: deque[Job] = deque()
        self.workers: dict[int, Worker] = {}
        self.respawns: Counter[str] = Counter()
        self.state = "starting"  # starting | ready | broken | closing | closed
        self.broken_reason: str | None = None
        self.backend: str | None = None
        self.preloaded: tuple[str, ...] = ()
        self.template_proc: subprocess.Popen | None = None
        self.template_conn: Connection | None = None
        self.template_sock: socket.socket | None = None
        self.start_failures = 0
        self.last_start_error: str | None = None  # a worker's device-init traceback
        self.next_start_mono = 0.0
        self.next_worker_id = 1
        self.pending_groups: dict[int, int] = {}  # slot -> pgid that must be empty first
        self.callbacks: list[Callable[[], None]] = []
        self.last_monitor = 0.0
        self.idle_since: float | None = None
        self.neuron = False  # set by the pool: Neuron env, core reclaim, device memory
        self.cores_per_device = 2
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_w, False)

    # --- the loop ---------------------------------------------------------------------

    def wake(self) -> None:
        """Make the loop run a pass now (called after an API call changed state)."""
        try:
            os.write(self._wake_w, b"\0")
        except BlockingIOError:  # already awake
            pass

    def run(self) -> None:
        """The loop thread's body: one step per pass until closed."""
        while True:
            with self.lock:
                if self.state == "closed":
                    return
                objects = [self._wake_r] + [w.conn for w in self.workers.values()]
                if self.template_conn is not None:
                    objects.append(self.template_conn)
                timeout = self._next_timeout(time.monotonic())
            ready = connection.wait(objects, timeout)
            self.step(ready)

    def step(self, ready: list, now: float | None = None) -> None:
        """One pass: handle ready connections, then murder, reap, manage, dispatch."""
        now = time.monotonic() if now is None else now
        with self.lock:
            for obj in ready:
                if obj == self._wake_r:
                    os.read(self._wake_r, 4096)
                elif obj is self.template_conn:
                    self._read_template()
                else:
                    worker = next((w for w in self.workers.values() if w.conn is obj), None)
                    if worker is not None:
                        self._read_worker(worker)
            if self.state != "closed":
                self.murder_workers(now)
                self.manage_workers(now)
                self.dispatch(now)
            callbacks, self.callbacks = self.callbacks, []
        self.notify(callbacks)

    def _next_timeout(self, now: float) -> float:
        wakeups = [now + 1.0]
        for w in self.workers.values():
            if w.job is not None:
                wakeups.append(now + self.config.monitor_interval)
                wakeups.extend(t for t in (w.job.deadline, w.job.kill_at) if t is not None)
            if w.state == "starting":
                wakeups.append(w.spawned_mono + self.config.worker_start_timeout)
        if self.next_start_mono > now:
            wakeups.append(self.next_start_mono)
        if self.pending_groups:
            wakeups.append(now + 0.02)
        return max(0.0, min(wakeups) - now)

    # --- template -----------------------------------------------------------------------

    def start_template(self) -> None:
        """Start the template process (not a fork of this multi-threaded process)."""
        ours, theirs = socket.socketpair()
        settings = {"backend": self.config.backend,
                    "preload": list(self.config.preload) if self.config.preload is not None else None}
        self.template_proc = subprocess.Popen(
            [self.config.python_executable(), "-P", "-m", "warm_pool.template",
             str(theirs.fileno()), json.dumps(settings)],
            pass_fds=[theirs.fileno()], env=self.config.template_env(neuron=self.neuron),
            stdin=subprocess.DEVNULL, start_new_session=True)
        theirs.close()
        self.template_sock = ours
        self.template_conn = Connection(os.dup(ours.fileno()))

    def _read_template(self) -> None:
        try:
            msg = self.template_conn.recv()
        except (EOFError, OSError):
            self._template_lost()
            return
        if isinstance(msg, protocol.TemplateReady):
            self.backend, self.preloaded = msg.backend, msg.preloaded
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
        """The template died: its workers died with it (PDEATHSIG); start over."""
        self._close_template()
        for worker in list(self.workers.values()):
            self.reap_workers(worker.id, None)
        if self.state in ("closing", "closed", "broken"):
            return
        self.state = "starting"
        self._start_failed("template exited")

    def _close_template(self) -> None:
        for obj in (self.template_conn, self.template_sock):
            if obj is not None:
                obj.close()
        self.template_conn = self.template_sock = None
        if self.template_proc is not None:
            try:
                self.template_proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.template_proc.kill()
                self.template_proc.wait()

    def break_pool(self, reason: str) -> None:
        """Stop respawning: the pool cannot work. Queued jobs fail with the reason."""
        from warm_pool.errors import PoolBroken

        self.state, self.broken_reason = "broken", reason
        while self.queue:
            job = self.queue.popleft()
            self.callbacks.append(lambda job=job: job.future.set_exception(PoolBroken(reason)))

    # --- workers ----------------------------------------------------------------------

    def spawn_worker(self, slot: int) -> Worker:
        """Ask the template for a new worker in this slot."""
        ours, theirs = socket.socketpair()
        worker = Worker(self.next_worker_id, slot, self.cores[slot], Connection(ours.detach()))
        self.next_worker_id += 1
        self.workers[worker.id] = worker
        env = self._worker_env(worker)
        self.template_conn.send(protocol.Spawn(worker.id, tuple(env.items()), worker.core))
        reduction.sendfds(self.template_sock, [theirs.fileno()])
        theirs.close()
        return worker

    def _worker_env(self, worker: Worker) -> dict[str, str]:
        env = {}
        threads = self.config.threads_per_worker
        if threads is None and "OMP_NUM_THREADS" not in os.environ:  # an operator's choice wins
            threads = max(1, (os.cpu_count() or 1) // self.size)
        if threads:
            env.update(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
        if self.backend != "neuron" or worker.core is None:
            return env
        from warm_pool import neuron

        env.update(neuron.worker_env(worker.core, tag=f"trainium-executor-w{worker.id}",
                                     log_level=self.config.neuron_log_level))
        return env

    def kill_worker(self, worker: Worker, reason: str) -> None:
        """SIGKILL the worker's whole process group; reap_workers finishes the job."""
        if worker.state != "stopping":
            worker.state, worker.retire_reason = "stopping", reason
        if worker.pid is not None:
            kill_group(worker.pid, signal.SIGKILL)
            try:  # it may not have called setsid() yet
                os.kill(worker.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass

    def murder_workers(self, now: float) -> None:
        """Stop overdue jobs (soft, then hard), jobs over memory, workers slow to start."""
        for worker in list(self.workers.values()):
            job = worker.job
            if worker.state == "starting" and now - worker.spawned_mono > self.config.worker_start_timeout:
                self.kill_worker(worker, "start_timeout")
            if job is None:
                continue
            if job.kill_at is not None and now >= job.kill_at:
                self.kill_worker(worker, job.stop_reason or "timeout")
            elif job.deadline is not None and now >= job.deadline and job.stop_reason is None:
                self.stop_job(job, worker, "timeout", now)
        if now - self.last_monitor >= self.config.monitor_interval:
            self.last_monitor = now
            self._measure_memory()

    def stop_job(self, job: Job, worker: Worker, reason: str, now: float, hard: bool = False) -> None:
        """Interrupt a running job: SIGINT now, SIGKILL of its group after the grace."""
        job.stop_reason = job.stop_reason or reason
        if hard:
            self.kill_worker(worker, reason)
            return
        job.kill_at = now + self.config.kill_grace
        if worker.pid is not None:
            try:
                os.kill(worker.pid, signal.SIGINT)
            except ProcessLookupError:
                pass

    def _measure_memory(self) -> None:
        limit = self.config.memory_limit_bytes
        for worker in self.workers.values():
            job = worker.job
            if job is None or worker.pid is None or worker.state != "busy":
                continue
            rss = tree_rss(worker.pid)
            job.peak_tree_bytes = max(job.peak_tree_bytes, rss)
            if job.device is not None:
                job.device.sample()
            if limit and rss > limit:
                self.stop_job(job, worker, "memory_limit", time.monotonic(), hard=True)

    def _read_worker(self, worker: Worker) -> None:
        try:
            msg = worker.conn.recv()
        except (EOFError, OSError):
            # The process is gone or going; the template's Exited gives the status.
            if worker.state != "stopping":
                worker.state = "stopping"
                worker.retire_reason = worker.retire_reason or "crashed"
            return
        self._handle_worker_msg(worker, msg)

    def _handle_worker_msg(self, worker: Worker, msg: object) -> None:
        if isinstance(msg, protocol.WorkerReady):
            worker.pid, worker.preloaded, worker.device = msg.pid, msg.preloaded, msg.device
            worker.ready_seconds = time.monotonic() - worker.spawned_mono
            self.start_failures, self.last_start_error = 0, None
            if worker.state == "starting":
                worker.state = "idle"
        elif isinstance(msg, protocol.WorkerFailed):
            worker.state, worker.retire_reason = "stopping", "start_failed"
            self.last_start_error = msg.error
        elif isinstance(msg, protocol.JobDone) and worker.job is not None:
            worker.job.done = msg
            self._job_finished(worker, msg.return_code)

    def _job_finished(self, worker: Worker, return_code: int | None) -> None:
        job, worker.job = worker.job, None
        worker.jobs_run += 1
        if job.device is not None:
            job.peak_device_bytes = job.device.finish()
        reason = None
        if job.stop_reason:
            reason = job.stop_reason
        elif job.done is None:
            reason = "crashed"
        elif job.done.dirty:
            reason = "dirty"
        elif self.config.max_jobs_per_worker and worker.jobs_run >= self.config.max_jobs_per_worker:
            reason = "recycled"
        elif self._device_memory_growing(worker):
            reason = "device_memory_growth"
        if reason is not None:
            self.kill_worker(worker, reason)
        elif worker.state == "busy":
            worker.state = "idle"
        self.finish(job, worker, return_code)

    def _device_memory_growing(self, worker: Worker) -> bool:
        """True when this worker's idle NeuronCore memory grew after several jobs in a row."""
        if self.backend != "neuron" or worker.core is None or not self.config.neuron_idle_growth_jobs:
            return False
        from warm_pool import neuron

        mem = neuron.core_memory(worker.core, self.config.neuron_sysfs_root, self.cores_per_device)
        if mem is None:
            return False
        if worker.growth is None:
            worker.growth = neuron.IdleGrowth(jobs=self.config.neuron_idle_growth_jobs)
        return worker.growth.observe(mem.used_bytes)

    def reap_workers(self, worker_id: int, return_code: int | None) -> None:
        """A worker process is gone: finish its job, free its slot, count the respawn."""
        worker = self.workers.pop(worker_id, None)
        if worker is None:
            return
        # Anything the worker sent before dying is still in the socket: read it first.
        try:
            while worker.job is not None and worker.conn.poll(0):
                self._handle_worker_msg(worker, worker.conn.recv())
        except (EOFError, OSError):
            pass
        worker.conn.close()
        if worker.pid is not None:
            kill_group(worker.pid, signal.SIGKILL)  # orphaned grandchildren in its group
            self.pending_groups[worker.slot] = worker.pid
        if worker.job is not None:
            worker.retire_reason = worker.job.stop_reason or "crashed"
            self._job_finished(worker, return_code)
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
        if self.template_conn is None:
            self.start_template()
            return
        if self.backend is None:
            return  # the template is still importing
        used = {w.slot for w in self.workers.values()}
        for slot in range(self.size):
            if slot in used or not self._slot_free(slot):
                continue
            self.spawn_worker(slot)

    def _slot_free(self, slot: int) -> bool:
        """On neuron a NeuronCore is free only when the last holder's group is gone."""
        pgid = self.pending_groups.get(slot)
        if pgid is None:
            return True
        if self.neuron and _group_alive(pgid):
            kill_group(pgid, signal.SIGKILL)
            return False
        del self.pending_groups[slot]
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
                continue
            worker.state, worker.job = "busy", job
            job.started_mono, job.started_at = now, time.time()
            if self.backend == "neuron" and worker.core is not None:
                from warm_pool import neuron

                job.device = neuron.PeakTracker(worker.core, self.config.neuron_sysfs_root,
                                                self.cores_per_device)
                job.device.start()
            job.deadline = now + job.timeout
            worker.conn.send(job.paths)
            if job.on_start is not None:
                ref = worker_ref(worker)
                self.callbacks.append(lambda job=job, ref=ref: job.on_start(job.spec.job_id, ref))
        if not self.queue and all(w.job is None for w in self.workers.values()):
            self.idle_since = self.idle_since or time.time()
        else:
            self.idle_since = None


def worker_ref(worker: Worker):
    """The result's `worker` field for this worker."""
    from warm_pool.result import WorkerRef

    return WorkerRef(worker.id, worker.pid or 0, worker.core)


def tree_rss(pid: int) -> int:
    """Resident bytes of a process and all its descendants (0 if it is gone)."""
    try:
        proc = psutil.Process(pid)
        procs = [proc] + proc.children(recursive=True)
    except psutil.Error:
        return 0
    total = 0
    for p in procs:
        try:
            total += p.memory_info().rss
        except psutil.Error:
            pass
    return total


def kill_group(pgid: int, sig: int) -> None:
    """Signal a whole process group; a group that is already gone is not an error."""
    try:
        os.killpg(pgid, sig)
    except ProcessLookupError:
        pass
    except PermissionError:  # the group id was reused by someone else's process
        pass


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return False
    return True
