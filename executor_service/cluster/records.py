"""What the cluster's dispatcher (pool.py) keeps: its record of each node and each job,
the results it hands back, and the sums over the nodes' pools that /health shows.

The dispatcher's loop thread alone changes the records, under its lock.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

from warm_pool import JobResult, JobSpec, PoolConfig, PoolStats


@dataclass
class ClusterResult(JobResult):
    """A node's JobResult, plus how many times the job was started and on which node."""

    attempts: int = 0
    node: str | None = None
    node_address: str | None = None

    def to_dict(self) -> dict[str, Any]:
        out = super().to_dict()
        out["attempts"] = self.attempts
        if self.node is not None:
            out["worker"] = {**(out["worker"] or {}), "node": self.node, "node_address": self.node_address}
        return out


@dataclass(frozen=True)
class NodeRef:
    """What `on_start` gets on a cluster: the node a job is being started on, and which try."""

    node: str
    node_address: str
    attempt: int


@dataclass(eq=False)
class Node:
    """One Ray node with NeuronCores, as the head sees it (the loop thread alone changes it)."""

    node_id: str
    address: str
    neuron_cores: int
    actor: Any
    placed_mono: float
    state: str = "placing"            # placing | ready | lost | dead
    stats: PoolStats | None = None    # its pool's, as it last reported them
    stats_mono: float = 0.0
    asking: bool = False              # a stats call is on its way
    running: dict[str, Any] = field(default_factory=dict)  # job_id -> ClusterJob
    lost_reason: str | None = None
    probe_mono: float = 0.0
    hold_until: float = 0.0           # it refused a job: nothing more until then
    last_sent_mono: float = 0.0

    def free_slots(self) -> int:
        """Workers ready for one more job here, by its last counts and what is on its way."""
        s = self.stats
        if self.state != "ready" or s is None or s.state in ("broken", "closing", "closed"):
            return 0
        return max(0, s.ready_workers - len(self.running))

    def describe(self) -> dict[str, Any]:
        return {"node_id": self.node_id, "address": self.address, "neuron_cores": self.neuron_cores,
                "alive": self.state in ("placing", "ready"), "state": self.state,
                "lost_reason": self.lost_reason, "running": len(self.running),
                "pool": self.stats.to_json() if self.stats is not None else None}


@dataclass(eq=False)
class ClusterJob:
    """A job from submit() until its future has a result."""

    spec: JobSpec
    future: Future
    on_start: Callable | None
    submitted_mono: float = field(default_factory=time.monotonic)
    submitted_at: float = field(default_factory=time.time)
    queued_mono: float = field(default_factory=time.monotonic)
    waited_s: float = 0.0             # in the head's queue, over every attempt
    attempts: int = 0
    node: Node | None = None
    ref: Any = None                   # the current NodePool.run call
    cancelled: bool = False


def cluster_state(pools: list[PoolStats], state: str) -> tuple[str, str | None]:
    """The cluster's state as one pool's (contract.POOL_STATES) and why it is broken,
    from the nodes' pools' stats: "broken" only when every node's pool is."""
    if state in ("closing", "closed"):
        return state, None
    broken = [s for s in pools if s.state == "broken"]
    if pools and len(broken) == len(pools):
        reasons = "; ".join(str(s.broken_reason) for s in broken)
        return "broken", f"every node's pool is broken: {reasons}"
    ready = sum(s.ready_workers for s in pools)
    return ("ready" if ready else "starting"), None


def pool_sums(pools: list[tuple[str, PoolStats]], state: str, config: PoolConfig,
              cluster: dict[str, Any]) -> PoolStats:
    """The nodes' pools as one, for /health, /status and /metrics: counts summed, workers
    and replacements listed with their node; "broken" only when every node's pool is."""
    workers, recent, preloaded, backend, isolation = [], [], [], None, None
    by_reason: Counter[str] = Counter()
    for node_id, s in pools:
        workers += [{**w, "node": node_id} for w in s.workers]
        by_reason.update(s.respawns_by_reason)
        recent += [{**r, "node": node_id} for r in s.respawns_recent]
        preloaded = preloaded or list(s.detail.get("preloaded") or [])
        backend = backend or s.backend
        isolation = isolation or s.isolation
    pool_state, reason = cluster_state([s for _, s in pools], state)
    return PoolStats(
        state=pool_state, broken_reason=reason,
        backend=backend or (None if config.backend == "auto" else config.backend), isolation=isolation,
        size=sum(s.size for _, s in pools), idle=sum(s.idle for _, s in pools),
        busy=sum(s.busy for _, s in pools), starting=sum(s.starting for _, s in pools),
        queued=sum(s.queued for _, s in pools), workers=tuple(workers), respawns_by_reason=dict(by_reason),
        respawns_recent=tuple(recent[-20:]),
        detail={"requested_backend": config.backend, "max_queue": config.max_queue, "preloaded": preloaded,
                "template_pid": None},
        cluster=cluster)
