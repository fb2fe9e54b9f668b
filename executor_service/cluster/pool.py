"""The cluster's dispatcher on the head: the pool's interface, over Ray (docs/cluster.md).

`ClusterPool` is to the service what `WarmPool` is (`start`, `wait_ready`, `submit`, `output`,
`cancel`, `stats`, `shutdown`), but its workers are the warm pools of the cluster's
nodes: one NodePool actor (node_pool.py) per node with `neuron_cores`, pinned to it and
holding all its cores, started with the service's pool settings.

    JobRunner ─submit─▶ queue ─dispatch─▶ on_start (store: running) ─▶ NodePool.run, least loaded node
                          ▲                                                        │
                          └─ its node was lost: queued again (attempts) ◀──────────┤ actor died
    Future ◀── ClusterResult (attempts, worker.node) ◀── JobResult ◀───────────────┘

One loop thread owns the nodes, the queue and the jobs (under `lock`); each pass:
`watch_nodes` (an actor for every node that joined, drop those that left), `poll_stats`,
`collect` (what Ray delivered: results, stats, failures), `confirm_lost`, `dispatch`.
Ray's callbacks only record what arrived and wake the loop.

Why a job starts again only once its actor is known dead: Ray reports a call to an
unreachable actor as "may or may not have been executed", and a node cut off from the
head may still be running the job. So a failed call marks its node lost (nothing more is
sent there), and its jobs wait until Ray says the actor died (its process is gone) or the
node is dead (its health checks failed); only then are they queued again, or end
`node_lost` past `max_attempts`. An actor that answers again (a passing fault: Ray's
ActorUnavailableError) is never killed: its pool and its other jobs are fine. The node
is ready again, and each job whose call failed is followed there anew
(`NodePool.follow`): its result when it ends, or, if its call never came, it is run
again (and that attempt never starts there). A job never runs in two places at once,
and its result is recorded once. (Killing an actor that answers again is what made one
node's loss take healthy nodes with it, issue 21: a passing failure of one call turned
into the death of a healthy pool and every job on it.)

`on_start` runs before the call that starts a job is sent, so the store says `running`
before the job can start anywhere: a job that was running when the head died is
reported `interrupted` at the next start (its actor dies with the head's Ray driver), never
run twice silently. Ray is imported only here, and only when `start()` is called.
"""

from __future__ import annotations

import dataclasses
import logging
import signal
import socket
import threading
import time
import warnings
from collections import Counter, deque
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any

from executor_service.cluster.node_pool import NodePool
from executor_service.cluster.records import (
    ClusterJob,
    ClusterResult,
    Node,
    NodeRef,
    cluster_state,
    pool_sums,
)
from executor_service.config import split_address
from warm_pool import (
    STATUS_CANCELLED,
    STATUS_COMPLETED,
    STATUS_INTERRUPTED,
    STREAMS,
    Condition,
    ConfigError,
    JobOutput,
    JobResult,
    JobSpec,
    PoolBroken,
    PoolClosed,
    PoolConfig,
    PoolStats,
    QueueFull,
    complete_future,
    error_text,
)
from warm_pool import artifacts as pool_artifacts

log = logging.getLogger("executor_service.cluster.pool")

NAMESPACE = "trainium-executor"
WATCH_EVERY_S = 1.0      # how often the cluster's node list is read
STATS_EVERY_S = 0.5      # how often each node's pool is asked for its counts
PROBE_EVERY_S = 0.5      # how often a lost node's actor is asked whether it is dead yet
OUTPUT_TIMEOUT_S = 0.5   # a live-output read from a node's pool (an HTTP request waits on it)
GET_TIMEOUT_S = 5.0      # taking a delivered value (a large one is fetched from its node's store)
REPLACE_AFTER_S = 10.0   # an actor that died before it was ever ready: wait before the next
PLACE_AGAIN_S = 1.0      # Ray could not place an actor on a node it lists alive: try again then


class ClusterPool:
    """The pool interface of WarmPool, running every job on a node of a Ray cluster."""

    def __init__(self, config: PoolConfig, address: str, max_attempts: int = 2,
                 node_start_timeout: float = 300.0):
        self.config = config.validate()
        self.address = address
        self.max_attempts = max_attempts
        self.node_start_timeout = node_start_timeout
        self.lock = threading.RLock()
        self._changed = threading.Condition(self.lock)
        self.state = "starting"           # starting | running | closing | closed
        self.nodes: dict[str, Node] = {}
        self.queue: deque[ClusterJob] = deque()
        self.jobs: dict[str, ClusterJob] = {}
        self.lost_total: Counter[str] = Counter()   # jobs whose node was lost, by what happened
        self.answered_again = 0                     # lost nodes that answered again (passing faults)
        self._replace_after: dict[str, float] = {}  # node_id -> when its next actor may be placed
        self._arrived: list[tuple[str, Any, Any]] = []
        self._arrived_lock = threading.Lock()
        self._wake = threading.Event()
        self._failed: dict[str, str] = {}           # node_id -> why its last actor died before it was ready
        self._last_watch = 0.0
        self._ray: Any = None
        self._actor_class: Any = None
        self._thread: threading.Thread | None = None

    # --- lifecycle ------------------------------------------------------------------

    def start(self) -> ClusterPool:
        """Connect to the cluster as a Ray driver and start the loop; ConfigError when
        nothing answers at the address."""
        host, port = split_address(self.address)
        try:
            socket.create_connection((host, port), timeout=5).close()
        except OSError as exc:
            raise ConfigError(f"ray_address (--ray-address / EXECUTOR_RAY_ADDRESS) {self.address}: nothing "
                              f"answers there ({exc.strerror or exc}); start the head first with "
                              "`ray start --head` (docs/cluster.md)") from None
        import ray

        # ray.init installs SIGTERM handlers of its own (exit at once, and a crash report);
        # the service's handlers must stay: on SIGTERM it drains (serve.py).
        main = threading.current_thread() is threading.main_thread()
        handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT)} if main else {}
        with warnings.catch_warnings():  # Ray's notice about GPU variables: not ours to act on
            warnings.simplefilter("ignore", FutureWarning)
            ray.init(address=self.address, namespace=NAMESPACE, log_to_driver=False,
                     configure_logging=False, _node_ip_address=socket.gethostbyname(host))
        for sig, handler in handlers.items():
            signal.signal(sig, handler)
        self._ray = ray
        self._actor_class = ray.remote(NodePool)
        # The jobs' artifacts come back from their nodes to here, as on one instance.
        self.config.artifacts_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        with self.lock:
            self.state = "running"
        self._thread = threading.Thread(target=self._loop, name="cluster-dispatch", daemon=True)
        self._thread.start()
        log.info("connected to the Ray cluster", extra={"address": self.address})
        return self

    def wait_ready(self, timeout: float | None = None) -> bool:
        """Wait until some node's pool has a ready worker; False on timeout."""
        with self._changed:
            return self._changed.wait_for(lambda: self._ready_workers() > 0 or self.state == "closed",
                                          timeout) and self._ready_workers() > 0

    def shutdown(self, grace: float = 30.0) -> None:
        """Take no more jobs (queued ones are handed back: their futures are cancelled),
        give running ones `grace` seconds, then stop every node's pool (its jobs end
        `interrupted`), kill the actors and leave the cluster."""
        with self._changed:
            if self.state in ("closing", "closed") or self._ray is None:
                self.state = "closed"
                return
            self.state = "closing"
            handed_back = [job for job in self.queue if not job.cancelled]
            self.queue.clear()
            for job in handed_back:
                self.jobs.pop(job.spec.job_id, None)
        for job in handed_back:
            job.future.cancel()
        self._wake.set()
        with self._changed:
            self._changed.wait_for(lambda: not self.jobs, grace)
            actors = [n.actor for n in self.nodes.values() if n.state in ("placing", "ready")]
        # Their grace is over: each node's pool stops its jobs now, as the local pool does.
        stops = [actor.shutdown.remote(0.0) for actor in actors]
        with self._changed:  # the loop collects the interrupted results meanwhile
            self._changed.wait_for(lambda: not self.jobs, self.config.kill_grace + 15)
            left = list(self.jobs.values())
            self.jobs.clear()
            self.state = "closed"
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        for job in left:
            self._finish(job, self._synthetic(job, STATUS_INTERRUPTED, "interrupted",
                                              "the service stopped while this job was running"))
        if stops:
            self._ray.wait(stops, num_returns=len(stops), timeout=5)
        for actor in actors:
            self._ray.kill(actor, no_restart=True)
        self._ray.shutdown()

    def __enter__(self) -> ClusterPool:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.shutdown()

    # --- jobs -------------------------------------------------------------------------

    def submit(self, spec: JobSpec, on_start: Callable | None = None) -> Future:
        """Queue a job for the cluster; the Future's result is a ClusterResult.

        `on_start(job_id, NodeRef)` runs in the loop thread before each attempt is sent to
        a node. Raises QueueFull or PoolClosed, and ValueError for a bad job id or timeout.
        """
        timeout = spec.checked_timeout(self.config.default_timeout, self.config.max_timeout)
        job = ClusterJob(dataclasses.replace(spec, timeout=timeout), Future(), on_start)
        with self.lock:
            if self.state in ("closing", "closed"):
                raise PoolClosed("the service is shutting down")
            if len(self.queue) >= self.config.max_queue:
                raise QueueFull(f"{len(self.queue)} jobs are queued (max_queue)")
            self.jobs[spec.job_id] = job
            self.queue.append(job)
        self._wake.set()
        return job.future

    def cancel(self, job_id: str) -> bool:
        """Cancel a queued or running job; False if it is unknown or already ending."""
        with self.lock:
            job = self.jobs.get(job_id)
            if job is None or job.cancelled or job.future.done():
                return False
            job.cancelled = True
            if job in self.queue:
                self.queue.remove(job)
                self.jobs.pop(job_id, None)
                finished = self._synthetic(job, STATUS_CANCELLED, "cancelled", "cancelled before it started")
            else:  # on its way to a node (then _send stops it), running there, or its node was lost
                finished = None
                node = job.node
                if job.ref is not None and node.state in ("placing", "ready"):
                    node.actor.cancel.remote(job_id)  # its result comes back as cancelled
        if finished is not None:
            self._finish(job, finished)
        return True

    def output(self, job_id: str, stream: str, offset: int = 0, limit: int = 65536) -> JobOutput | None:
        """Live output of a job running on a node, asked of that node's pool (one Ray call,
        at most OUTPUT_TIMEOUT_S). None when it runs nowhere now (queued, on its way, its
        node lost) or its node does not answer in time. A job started again elsewhere
        writes its output afresh: offsets then count from that attempt's start."""
        if stream not in STREAMS or offset < 0 or limit < 1:
            raise ValueError(f"stream must be one of {', '.join(STREAMS)}, offset ≥ 0 and limit ≥ 1")
        with self.lock:
            job = self.jobs.get(job_id)
            node = job.node if job is not None and job.ref is not None else None
            if node is None or node.state not in ("placing", "ready"):
                return None
            actor = node.actor
        try:
            return self._ray.get(actor.output.remote(job_id, stream, offset, limit), timeout=OUTPUT_TIMEOUT_S)
        except self._ray.exceptions.RayError:  # the node is slow, lost or the call failed
            return None

    # --- health ------------------------------------------------------------------------

    def condition(self) -> Condition:
        """The cluster's state, size and isolation from the nodes' last reported stats
        (no Ray call: what every request's admission reads)."""
        with self.lock:
            pools = [n.stats for n in self.nodes.values()
                     if n.stats is not None and n.state in ("placing", "ready")]
            state = self.state
        pool_state, reason = cluster_state(pools, state)
        isolation = next((s.isolation for s in pools if s.isolation), None)
        return Condition(pool_state, reason, sum(s.size for s in pools), isolation)

    def stats(self) -> PoolStats:
        """The cluster as one pool for /health, /status and /metrics (sums over the nodes'
        pools), and `cluster`: the engine, its address and every node with its own pool."""
        with self.lock:
            nodes = [n.describe() for n in self.nodes.values()]
            pools = [(n.node_id, n.stats) for n in self.nodes.values()
                     if n.stats is not None and n.state in ("placing", "ready")]
            queued, state, lost = len(self.queue), self.state, dict(self.lost_total)
            again = self.answered_again
            failed = [{"node_id": k, "error": v} for k, v in self._failed.items() if k not in self.nodes]
        out = pool_sums(pools, state, self.config, cluster={
            "engine": "ray", "address": self.address, "max_attempts": self.max_attempts,
            "jobs_on_lost_nodes": lost, "nodes_answered_again": again, "nodes": nodes,
            "failed_placements": failed})
        return dataclasses.replace(out, queued=out.queued + queued)

    def _ready_workers(self) -> int:
        return sum(n.stats.ready_workers for n in self.nodes.values()
                   if n.stats is not None and n.state == "ready" and n.stats.state != "broken")

    # --- the loop ------------------------------------------------------------------------

    def _loop(self) -> None:
        while True:
            self._wake.wait(0.1)
            self._wake.clear()
            with self.lock:
                if self.state == "closed":
                    return
            try:
                self.step(time.monotonic())
            except Exception:  # noqa: BLE001 - the loop must survive anything
                log.exception("cluster dispatch loop error")

    def step(self, now: float) -> None:
        """One pass: watch_nodes, poll_stats, collect, confirm_lost, dispatch."""
        if now - self._last_watch >= WATCH_EVERY_S:
            self._last_watch = now
            self.watch_nodes(self._ray.nodes(), now)
        self.poll_stats(now)
        finished = self.collect(now)
        finished += self.confirm_lost(now)
        starts = self.dispatch(now)
        for job, result in finished:
            self._finish(job, result)
        for job, node in starts:
            self._send(job, node)

    def watch_nodes(self, cluster_nodes: list[dict[str, Any]], now: float) -> None:
        """Place an actor on every live node with NeuronCores that has none; a node Ray
        reports dead has lost its actor and every job on it."""
        alive = {n["NodeID"]: n for n in cluster_nodes
                 if n.get("Alive") and (n.get("Resources") or {}).get("neuron_cores", 0) >= 1}
        with self.lock:
            if self.state != "running":
                return
            for node in self.nodes.values():
                if node.node_id not in alive and node.state != "dead":
                    self._mark_lost(node, "Ray reports the node dead", dead=True)
            joined = [info for node_id, info in alive.items() if node_id not in self.nodes
                      and now >= self._replace_after.get(node_id, 0.0)]
        for info in joined:  # placing calls Ray's GCS: never under the lock the HTTP threads take
            node_id, cores = info["NodeID"], int(info["Resources"]["neuron_cores"])
            node = Node(node_id, info.get("NodeManagerAddress", ""), cores, self._place(node_id, cores), now)
            with self.lock:
                self.nodes[node_id] = node
            log.info("node joined: placing its pool", extra={"node_id": node_id, "neuron_cores": cores,
                                                             "address": node.address})

    def _place(self, node_id: str, cores: int) -> Any:
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        return self._actor_class.options(
            num_cpus=0, resources={"neuron_cores": cores}, max_restarts=0, max_task_retries=0,
            scheduling_strategy=NodeAffinitySchedulingStrategy(node_id, soft=False),
        ).remote(self.config, node_id)

    def poll_stats(self, now: float) -> None:
        """Ask each node's pool for its counts, one call at a time per node."""
        with self.lock:
            due = [n for n in self.nodes.values() if n.state in ("placing", "ready") and not n.asking
                   and now - n.stats_mono >= STATS_EVERY_S]
            for node in due:
                node.asking = True
        for node in due:
            self._watch(("stats", node), node.actor.stats.remote())

    def collect(self, now: float) -> list[tuple[ClusterJob, JobResult]]:
        """Take in what Ray delivered: job results, node stats, failed calls."""
        with self._arrived_lock:
            arrived, self._arrived = self._arrived, []
        finished = []
        for kind, subject, ref in arrived:
            try:
                value, error = self._ray.get(ref, timeout=GET_TIMEOUT_S), None
            except Exception as exc:  # noqa: BLE001 - sorted below
                value, error = None, exc
            with self._changed:
                if kind == "stats":
                    self._took_stats(subject, value, error, now)
                elif kind == "probe":
                    self._took_probe(subject, error, now)
                elif subject.ref is ref:  # a job's current call (an older one is stale)
                    done = self._took_result(subject, value, error, now)
                    if done is not None:
                        finished.append((subject, done))
                self._changed.notify_all()
        return finished

    def _took_stats(self, node: Node, value: Any, error: BaseException | None, now: float) -> None:
        node.asking, node.stats_mono = False, now
        if error is None:
            try:
                node.stats = PoolStats.from_json(value)
            except ValueError as exc:  # a node's word is decoded, not trusted: keep its last
                log.error("a node's pool stats are malformed",
                          extra={"node_id": node.node_id, "error": str(exc)})
                return
            if node.state == "placing":
                node.state = "ready"
                self._failed.pop(node.node_id, None)
                log.info("node ready", extra={"node_id": node.node_id, "size": node.stats.size})
        elif node.state in ("placing", "ready"):
            self._mark_lost(node, _reason(error), dead=self._died(error))

    def _took_probe(self, node: Node, error: BaseException | None, now: float) -> None:
        """A lost node's actor: dead (its jobs can run again), unreachable (ask again), or
        answering again (a passing fault). Then it is never killed (its pool and its other
        jobs are fine): it is ready again, and each job whose call failed is followed
        there anew (NodePool.follow: its outcome when it ends, or None if it never came)."""
        node.asking = False
        if node.state != "lost":
            return
        if self._died(error):
            node.state, node.lost_reason = "dead", _reason(error)
            return
        if error is not None:
            return
        log.warning("node answers again: ready", extra={"node_id": node.node_id, "was": node.lost_reason})
        node.state, node.lost_reason = "ready", None
        self.answered_again += 1
        for job in node.running.values():
            if job.ref is None:
                job.ref = node.actor.follow.remote(job.spec.job_id, job.attempts)
                self._watch(("job", job), job.ref)
                if job.cancelled:  # cancel() could not reach it meanwhile
                    node.actor.cancel.remote(job.spec.job_id)

    def _took_result(self, job: ClusterJob, value: Any, error: BaseException | None,
                     now: float) -> JobResult | None:
        node = job.node
        node.running.pop(job.spec.job_id, None)
        job.ref = None
        if error is None and value is None:  # followed after a fault: it never came there
            return self._settle_lost(job, node, now)
        if error is None:
            self.jobs.pop(job.spec.job_id, None)
            return self._unpacked(job, value)
        cause = getattr(error, "cause", None)
        if isinstance(error, self._ray.exceptions.RayTaskError) and isinstance(
                cause, (QueueFull, PoolClosed, PoolBroken)):
            # The node's pool refused it: it never started there. Try another node.
            node.hold_until, node.stats_mono = now + 1.0, 0.0
            job.attempts -= 1
            self._requeue(job, now)
            return None
        if isinstance(error, self._ray.exceptions.RayError) and not isinstance(
                error, self._ray.exceptions.RayTaskError):
            node.running[job.spec.job_id] = job  # lost with its node, settled by confirm_lost
            if node.state in ("placing", "ready"):
                self._mark_lost(node, _reason(error), dead=self._died(error))
            return None
        self.jobs.pop(job.spec.job_id, None)
        log.error("job call failed on its node", extra={"job_id": job.spec.job_id, "error": repr(error)})
        return self._synthetic(job, STATUS_COMPLETED, "internal", f"internal error on node {node.node_id}: "
                               f"{_reason(error)}")

    def _unpacked(self, job: ClusterJob, outcome: tuple) -> ClusterResult:
        """A node's (result, artifact files) as the job's result, its artifacts kept here."""
        result, files = outcome
        kept = pool_artifacts.unpack(str(self.config.artifacts_dir), job.spec.job_id, result.artifacts, files)
        return self._wrap(job, dataclasses.replace(result, artifacts=kept))

    def _died(self, error: BaseException) -> bool:
        """Ray says the actor is dead (its process is gone) or never came to be, not
        merely unreachable. Never came to be: Ray lists a node alive (ray.nodes(), from
        the GCS) before the scheduler that places actors has the node in its view, and a
        node that just died the other way round; an actor pinned there (soft=False) then
        fails at once with ActorUnschedulableError, and every later call to it too. Such
        a node is dropped and placed again PLACE_AGAIN_S later; held as lost, it would
        never be placed again (issue 21: a node that joined never got its pool)."""
        return isinstance(error, (self._ray.exceptions.ActorDiedError,
                                  self._ray.exceptions.ActorUnschedulableError))

    def _mark_lost(self, node: Node, reason: str, dead: bool = False) -> None:
        """Send nothing more there. Its jobs wait in confirm_lost until the actor is known
        dead (`dead`: it is already). It is not killed now: Ray would then report it dead
        at once, before a node that is only cut off has stopped running them."""
        node.state, node.lost_reason = ("dead" if dead else "lost"), reason
        log.warning("node lost", extra={"node_id": node.node_id, "reason": reason, "dead": dead,
                                        "running": list(node.running)})

    def confirm_lost(self, now: float) -> list[tuple[ClusterJob, JobResult]]:
        """Settle the jobs of nodes whose actor is known dead: again elsewhere, or
        `node_lost` past max_attempts; the node is dropped (a live one gets a new actor)."""
        finished, probes, overdue = [], [], []
        with self.lock:
            for node in list(self.nodes.values()):
                if node.state == "lost" and not node.asking and now - node.probe_mono >= PROBE_EVERY_S:
                    node.probe_mono, node.asking = now, True
                    probes.append(node)
                elif node.state == "placing" and now - node.placed_mono > self.node_start_timeout:
                    self._mark_lost(node, f"its pool did not start within {self.node_start_timeout:g} s "
                                    "(node_start_timeout)", dead=True)
                    overdue.append(node.actor)
                if node.state != "dead":
                    continue
                del self.nodes[node.node_id]
                if node.stats is None:  # its actor died before it was ever ready: not at once again
                    unplaced = (node.lost_reason or "").startswith("ActorUnschedulableError")
                    self._replace_after[node.node_id] = now + (PLACE_AGAIN_S if unplaced else REPLACE_AFTER_S)
                    self._failed[node.node_id] = node.lost_reason or "unknown"
                for job in node.running.values():
                    job.ref = None
                    done = self._settle_lost(job, node, now)
                    if done is not None:
                        finished.append((job, done))
                node.running.clear()
        for node in probes:
            self._watch(("probe", node), node.actor.stats.remote())
        for actor in overdue:  # it never became ready: no job of ours is there
            self._ray.kill(actor, no_restart=True)
        return finished

    def _settle_lost(self, job: ClusterJob, node: Node, now: float) -> JobResult | None:
        if job.cancelled or self.state != "running":
            self.jobs.pop(job.spec.job_id, None)
            status, word = ((STATUS_CANCELLED, "cancelled") if job.cancelled
                            else (STATUS_INTERRUPTED, "interrupted"))
            return self._synthetic(job, status, word,
                                   f"its node {node.node_id} was lost ({node.lost_reason})")
        if job.attempts >= self.max_attempts:
            self.lost_total["node_lost"] += 1
            self.jobs.pop(job.spec.job_id, None)
            return self._synthetic(job, STATUS_COMPLETED, "node_lost",
                                   f"the node running it was lost {job.attempts} time(s), the most "
                                   f"max_attempts allows (last: node {node.node_id} at {node.address}: "
                                   f"{node.lost_reason})")
        self.lost_total["run_again"] += 1
        log.info("running a job again: its node was lost", extra={
            "job_id": job.spec.job_id, "node_id": node.node_id, "attempts": job.attempts})
        self._requeue(job, now)
        return None

    def _requeue(self, job: ClusterJob, now: float) -> None:
        job.queued_mono = now
        self.queue.appendleft(job)

    def dispatch(self, now: float) -> list[tuple[ClusterJob, Node]]:
        """Give queued jobs to the nodes with a free worker, the least loaded first."""
        starts = []
        with self.lock:
            if self.state != "running":
                return starts
            while self.queue:
                ready = [n for n in self.nodes.values() if n.free_slots() > 0 and now >= n.hold_until]
                if not ready:
                    break
                # Most free workers; then fewest jobs on their way; then the one sent to least recently.
                node = max(ready, key=lambda n: (n.free_slots(), -len(n.running), -n.last_sent_mono))
                job = self.queue.popleft()
                if job.cancelled:
                    continue
                job.attempts += 1
                job.waited_s += now - job.queued_mono
                job.node = node
                node.running[job.spec.job_id] = job
                node.last_sent_mono = now
                starts.append((job, node))
        return starts

    def _send(self, job: ClusterJob, node: Node) -> None:
        """Tell the caller the job starts (the store says running), then start it: unless
        it was cancelled meanwhile (cancel() could not reach it: it was on no node yet)."""
        if job.on_start is not None:
            try:
                job.on_start(job.spec.job_id, NodeRef(node.node_id, node.address, job.attempts))
            except Exception:  # noqa: BLE001 - a caller's bug must not stop the loop
                log.exception("on_start failed", extra={"job_id": job.spec.job_id})
        with self.lock:
            if job.cancelled:
                node.running.pop(job.spec.job_id, None)
                self.jobs.pop(job.spec.job_id, None)
                job.attempts -= 1
                ref = None
            else:  # sent under the lock: a cancel() from now on finds job.ref and follows it
                ref = job.ref = node.actor.run.remote(job.spec, job.attempts)
        if ref is None:
            self._finish(job, self._synthetic(job, STATUS_CANCELLED, "cancelled",
                                              "cancelled before it started"))
        else:
            self._watch(("job", job), ref)

    def _watch(self, key: tuple[str, Any], ref: Any) -> None:
        def arrived(_future: Future) -> None:
            with self._arrived_lock:
                self._arrived.append((key[0], key[1], ref))
            self._wake.set()

        ref.future().add_done_callback(arrived)

    # --- results ------------------------------------------------------------------------

    def _wrap(self, job: ClusterJob, result: JobResult) -> ClusterResult:
        values = {f.name: getattr(result, f.name) for f in dataclasses.fields(JobResult)}
        values.update(submitted_at=job.submitted_at, queue_time=job.waited_s + (result.queue_time or 0.0))
        return ClusterResult(**values, attempts=job.attempts, node=job.node.node_id,
                             node_address=job.node.address)

    def _synthetic(self, job: ClusterJob, status: str, error_type: str, message: str) -> ClusterResult:
        node = job.node
        return ClusterResult.not_run(job.spec.job_id, job.spec.paper_id, status, error_type, message,
                                     submitted_at=job.submitted_at, queue_time=job.waited_s,
                                     attempts=job.attempts, node=node.node_id if node else None,
                                     node_address=node.address if node else None)

    def _finish(self, job: ClusterJob, result: JobResult) -> None:
        complete_future(job.future, result)


def _reason(error: BaseException) -> str:
    return error_text(error)
