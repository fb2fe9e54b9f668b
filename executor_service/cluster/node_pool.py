"""The node-pool actor: one per Ray node with NeuronCores, running the warm pool there.

    head: ClusterPool ──actor call (run, cancel, stats, shutdown)──▶ NodePool (a Ray worker process)
                                                                      └─ WarmPool ─▶ template ─▶ workers
                                                                         (job uids, one NeuronCore each)

Ray reuses its worker processes, and a NeuronCore is free again only when the process
that started the Neuron runtime on it exits. So nothing here imports torch or touches a
device: the pool's template is an interpreter of its own, and only the workers it forks
start a runtime (their exit frees the core). The actor holds every `neuron_cores` of its
node (so Ray places nothing else that wants them there) and the pool uses the cores Ray
assigned it.

Everything the pool guarantees on one instance holds here, with the service's own
settings: this actor is started with the head's PoolConfig and changes only what is the
node's own (its work dir, its cores, its job uids, the threads per worker, what Ray put
in the environment). Its calls are our code on both ends, so Ray's serialization of
JobSpec and JobResult between them is fine; nothing of a job crosses but its result.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import shutil
import time
from collections import OrderedDict
from pathlib import Path
from typing import Any

from warm_pool import (
    STATUS_CANCELLED,
    STATUS_INTERRUPTED,
    ConfigError,
    JobOutput,
    JobResult,
    JobSpec,
    PoolConfig,
    WarmPool,
    artifacts,
)

log = logging.getLogger("executor_service.cluster.node_pool")

# The job network rules (deployment/nftables) cover this many uids from job_uid_base; a
# node pool takes the first free range of its size within them (two nodes on one machine,
# as in the tests, each get their own).
UID_SPAN = 64
# What Ray sets in the environment of a worker that holds neuron_cores (besides RAY_*).
RAY_SET = ("NEURON_RT_VISIBLE_CORES", "OMP_NUM_THREADS")
_IN_USE = "in use by another running pool"
# The last few finished jobs' outcomes stay here a while, in case the call that carried
# one failed on its way to the head (a passing network fault): the head asks for it
# (`follow`) within a second or two of the node answering again, instead of running the
# job again. Few: each holds a result (its output) and its artifacts' bytes.
KEEP_S = 60.0
KEEP_COUNT = 8


class NodePool:
    """The warm pool of one node; the head creates it as a Ray actor pinned to that node."""

    def __init__(self, config: PoolConfig, node_id: str):
        self.node_id = node_id
        self.config = node_config(config, node_id, assigned_cores(), os.environ)
        remove_departed(self.config.work_dir.parent, live_node_ids())
        self.pool = start_on_free_uids(self.config)
        self.cancelled: set[str] = set()  # cancelled before their run() call got here
        self.released: set[tuple[str, int]] = set()  # (job_id, attempt) given up before its run() came
        self.runs: dict[str, asyncio.Task] = {}  # job_id -> its run, until it has ended
        self.kept: OrderedDict[str, tuple[float, tuple]] = OrderedDict()  # job_id -> (when, outcome)
        log.info("node pool started", extra={"node_id": node_id, "work_dir": str(self.config.work_dir),
                                             "job_uid_base": self.pool.config.job_uid_base})

    async def run(self, spec: JobSpec, attempt: int = 1) -> tuple[JobResult, list[tuple[str, bytes]]]:
        """Run one job on this node's pool: its result (never raises for the job itself)
        and its kept artifacts' bytes, which leave this node with it (the head keeps them).

        Raises what `WarmPool.submit` raises (QueueFull, PoolClosed, PoolBroken): the job
        did not start here, and the head may send it elsewhere."""
        if spec.job_id in self.cancelled or (spec.job_id, attempt) in self.released:
            self.cancelled.discard(spec.job_id)
            self.released.discard((spec.job_id, attempt))
            return _cancelled(spec), []
        future = self.pool.submit(spec)
        task = self.runs[spec.job_id] = asyncio.ensure_future(self._outcome(spec, future))
        task.add_done_callback(lambda _: self.runs.pop(spec.job_id, None))
        return await asyncio.shield(task)

    async def _outcome(self, spec: JobSpec, future: Any) -> tuple[JobResult, list[tuple[str, bytes]]]:
        """The job's result and artifacts, kept a while (KEEP_S) for `follow`."""
        try:
            result = await asyncio.wrap_future(future)
            files = await asyncio.to_thread(artifacts.pack, str(self.config.artifacts_dir), spec.job_id,
                                            result.artifacts)
            outcome = (result, files)
        except asyncio.CancelledError:
            if not future.cancelled():
                raise
            # The pool shut down before a worker took it: it never started here.
            outcome = (JobResult.not_run(spec.job_id, spec.paper_id, STATUS_INTERRUPTED, "interrupted",
                                         "the node's pool shut down before the job started"), [])
        self._keep(spec.job_id, outcome)
        return outcome

    def _keep(self, job_id: str, outcome: tuple) -> None:
        now = time.monotonic()
        self.kept[job_id] = (now, outcome)
        while self.kept and (len(self.kept) > KEEP_COUNT or next(iter(self.kept.values()))[0] < now - KEEP_S):
            self.kept.popitem(last=False)

    async def follow(self, job_id: str, attempt: int) -> tuple[JobResult, list[tuple[str, bytes]]] | None:
        """The outcome of a job whose run() call the head lost (a passing fault between it
        and this node; the call may or may not have come): as run() would have returned it,
        once the job ends here. None when it never came: then it never starts here (a late
        run() of that attempt ends cancelled) and the head runs it again. So a job never
        runs in two places at once, nor to its end twice."""
        task = self.runs.get(job_id)
        if task is not None:
            return await asyncio.shield(task)
        kept = self.kept.pop(job_id, None)
        if kept is not None:
            return kept[1]
        if len(self.released) < 10_000:
            self.released.add((job_id, attempt))
        return None

    async def cancel(self, job_id: str) -> bool:
        """Cancel a job queued or running here; False if it is already ending. One whose
        run() has not arrived yet (Ray may start an async actor's calls out of order) is
        remembered, and never starts."""
        if self.pool.cancel(job_id):
            return True
        if len(self.cancelled) < 10_000:
            self.cancelled.add(job_id)
        return False

    async def output(self, job_id: str, stream: str, offset: int, limit: int) -> JobOutput | None:
        """Live output of a job running here (WarmPool.output)."""
        return await asyncio.to_thread(self.pool.output, job_id, stream, offset, limit)

    async def stats(self) -> dict[str, Any]:
        """The pool's stats as /health shows one pool (JSON: the head decodes them,
        PoolStats.from_json), measured off the event loop."""
        return (await asyncio.to_thread(self.pool.stats)).to_json()

    async def shutdown(self, grace: float) -> None:
        """Stop the pool (running jobs get `grace` s, then end `interrupted`); leave no
        process and, unless job dirs are kept, no directory of this node's."""
        await asyncio.to_thread(self.pool.shutdown, grace)
        if not self.config.keep_job_dirs:
            shutil.rmtree(self.config.work_dir, ignore_errors=True)


def _cancelled(spec: JobSpec) -> JobResult:
    return JobResult.not_run(spec.job_id, spec.paper_id, STATUS_CANCELLED, "cancelled",
                             "cancelled before it started")


def assigned_cores() -> list[int]:
    """The NeuronCores Ray assigned this actor (it sets NEURON_RT_VISIBLE_CORES to them)."""
    import ray

    ids = ray.get_runtime_context().get_accelerator_ids().get("neuron_cores") or []
    return [int(i) for i in ids]


def live_node_ids() -> set[str]:
    """The ids of the cluster's live nodes."""
    import ray

    return {n["NodeID"] for n in ray.nodes() if n.get("Alive")}


def remove_departed(nodes_dir: Path, live: set[str]) -> None:
    """Remove the work dirs of nodes that left without shutting their pool down (killed,
    reclaimed): what their interrupted jobs left there. Their pools' processes ended with
    them (a template kills its workers and job uids' processes when its actor goes)."""
    for entry in nodes_dir.iterdir():
        if entry.is_dir() and not any(node_id.startswith(entry.name) for node_id in live):
            shutil.rmtree(entry, ignore_errors=True)


def node_config(config: PoolConfig, node_id: str, cores: list[int], environ: dict[str, str]) -> PoolConfig:
    """The head's pool settings, made this node's own.

    - work dir: `<work_dir>/nodes/<node id>`, so two nodes on one machine (tests) never
      share a slot's temporary dir; job uids must traverse its parents;
    - size and cores: one worker per NeuronCore Ray assigned, unless the head set a size;
    - threads per worker: the head's setting, else cores ÷ size, computed here: Ray sets
      OMP_NUM_THREADS=1 in its workers, which the pool would take for an operator's choice;
    - environment: what Ray put in this process's (its RAY_* variables, addresses and ids;
      the cores it assigned, OMP_NUM_THREADS) never reaches the template or a job, which
      see what they would on one instance (each worker sets its own core and threads).
    """
    top = Path(config.work_dir)
    work_dir = top / "nodes" / node_id[:12]  # short: jobs' socket paths below it must fit 107 bytes
    top.mkdir(parents=True, exist_ok=True)
    top.chmod(top.stat().st_mode | 0o111)
    work_dir.parent.mkdir(exist_ok=True)
    work_dir.parent.chmod(0o711)  # traversable, not listable
    size = config.pool_size or len(cores) or None
    threads = config.threads_per_worker
    if threads is None:
        threads = max(1, (os.cpu_count() or 1) // (size or 2))
    ray_env = tuple(sorted(k for k in environ if k.startswith("RAY_"))) + RAY_SET
    return dataclasses.replace(
        config, work_dir=work_dir, pool_size=size, threads_per_worker=threads,
        neuron_cores=config.neuron_cores or (tuple(cores) or None),
        scrub_env=tuple(config.scrub_env) + ray_env).validate()


def start_on_free_uids(config: PoolConfig) -> WarmPool:
    """Start a pool on the first range of job uids no live pool holds, within the UID_SPAN
    uids from job_uid_base that the network rules cover."""
    base = config.job_uid_base
    size = config.pool_size or 2
    for first in range(base, base + UID_SPAN - size + 1, size):
        pool = WarmPool(dataclasses.replace(config, job_uid_base=first))
        try:
            return pool.start()
        except ConfigError as exc:
            if _IN_USE not in str(exc):
                raise
    raise ConfigError(f"job_uid_base (--job-uid-base / EXECUTOR_JOB_UID_BASE) {base}: every range of "
                      f"{size} uids among the {UID_SPAN} from it is held by another running pool on this "
                      "machine")
