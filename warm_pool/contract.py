"""What the service asks of a pool, declared once: the local `WarmPool` and the Ray
`ClusterPool` (executor_service/cluster/pool.py) both fulfil `Pool`.

`condition()` is what admission reads on every request: three fields kept as plain
attributes, read under the pool's lock, never a snapshot of the workers. `stats()` is
the whole picture (workers, their memory, templates, nodes) for `/health` and
`/metrics`: a `PoolStats`, whose fields the service decides on are typed, and whose
`to_json()` is the `pool` block of `/health?verbose=1`.

One vocabulary of states for both:

    starting ─▶ ready ─▶ closing ─▶ closed
         └──────▶ broken (retrying; see restarts.py) ──▶ ready
"""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any, Protocol

from warm_pool.capture import JobOutput
from warm_pool.result import JobSpec

POOL_STATES = ("starting", "ready", "broken", "closing", "closed")


@dataclass(frozen=True)
class Condition:
    """A pool's state in a few fields, cheap enough for every request."""

    state: str                 # one of POOL_STATES
    broken_reason: str | None  # why, while state is "broken"
    size: int                  # slots: jobs that can run at once
    isolation: str | None      # "uid" | "none"; None until a cluster's first node reports


_COUNTS = ("size", "idle", "busy", "starting", "queued")


@dataclass(frozen=True)
class PoolStats:
    """A pool's whole picture, one shape for the local pool and the cluster. What the
    service reads is typed; `detail` is the rest (spares, templates, preloaded modules,
    starts, the compile cache...), shown as it is by /health?verbose=1."""

    state: str                             # one of POOL_STATES
    broken_reason: str | None
    backend: str | None                    # None until known ("auto" on its first start)
    isolation: str | None                  # "uid" | "none"; None before a cluster's first node
    size: int                              # slots
    idle: int                              # slots with a ready process and no job
    busy: int                              # slots running a job
    starting: int                          # slots with neither yet
    queued: int                            # jobs waiting for a slot
    workers: tuple[dict[str, Any], ...] = ()           # one per process, as /health lists them
    respawns_by_reason: dict[str, int] = field(default_factory=dict)  # processes replaced
    respawns_recent: tuple[dict[str, Any], ...] = ()   # the last replacements, with why
    detail: dict[str, Any] = field(default_factory=dict)
    cluster: dict[str, Any] | None = None  # a cluster's nodes, each with its own pool's

    @property
    def ready_workers(self) -> int:
        return self.idle + self.busy

    @property
    def healthy(self) -> bool:
        """At least one slot can take or is running a job, and the pool is not broken."""
        return self.ready_workers >= 1 and self.state != "broken"

    def to_json(self) -> dict[str, Any]:
        """The `pool` block of /health?verbose=1 (the cluster's nodes are its `cluster`)."""
        return {**self.detail, "state": self.state, "broken_reason": self.broken_reason,
                "backend": self.backend, "isolation": self.isolation,
                **{name: getattr(self, name) for name in _COUNTS}, "workers": list(self.workers),
                "respawns": {"total": sum(self.respawns_by_reason.values()),
                             "by_reason": dict(self.respawns_by_reason),
                             "recent": list(self.respawns_recent)}}

    @classmethod
    def from_json(cls, data: Any) -> PoolStats:
        """Decode a pool's JSON picture (a node's pool's, as it crosses from the node):
        ValueError naming what is wrong."""
        if not isinstance(data, dict):
            raise ValueError(f"pool stats must be an object, not {type(data).__name__}")
        detail = dict(data)
        state = detail.pop("state", None)
        if state not in POOL_STATES:
            raise ValueError(f"pool state {str(state)[:40]!r} is not one of {', '.join(POOL_STATES)}")
        counts = {name: detail.pop(name, 0) or 0 for name in _COUNTS}
        bad = [name for name, n in counts.items() if not isinstance(n, int) or isinstance(n, bool) or n < 0]
        if bad:
            raise ValueError(f"pool stats: {bad[0]} must be a count")
        respawns = detail.pop("respawns", None) or {}
        by_reason = respawns.get("by_reason") or {} if isinstance(respawns, dict) else None
        if not isinstance(by_reason, dict) or not all(
                isinstance(k, str) and isinstance(v, int) for k, v in by_reason.items()):
            raise ValueError("pool stats: respawns.by_reason must map reasons to counts")
        workers, recent = detail.pop("workers", None) or [], respawns.get("recent") or []
        if not all(isinstance(x, list) and all(isinstance(i, dict) for i in x) for x in (workers, recent)):
            raise ValueError("pool stats: workers and respawns.recent must be lists of objects")
        text = {name: detail.pop(name, None) for name in ("broken_reason", "backend", "isolation")}
        if not all(v is None or isinstance(v, str) for v in text.values()):
            raise ValueError("pool stats: broken_reason, backend and isolation must be text")
        return cls(state=state, **text, **counts, workers=tuple(workers), respawns_by_reason=dict(by_reason),
                   respawns_recent=tuple(recent), detail=detail)

    @classmethod
    def unknown(cls, reason: str) -> PoolStats:
        """What /health and /metrics show when the pool could not say (it never raises there)."""
        return cls(state="broken", broken_reason=reason, backend=None, isolation=None,
                   size=0, idle=0, busy=0, starting=0, queued=0)


class Pool(Protocol):
    """A pool of warm processes that runs jobs as `python main.py` would."""

    def start(self) -> Pool: ...

    def wait_ready(self, timeout: float | None = None) -> bool: ...

    def submit(self, spec: JobSpec, on_start: Callable | None = None) -> Future: ...

    def cancel(self, job_id: str) -> bool: ...

    def output(self, job_id: str, stream: str, offset: int = 0, limit: int = 65536) -> JobOutput | None: ...

    def condition(self) -> Condition: ...

    def stats(self) -> PoolStats: ...

    def shutdown(self, grace: float = 30.0) -> None: ...
