"""What the service asks of a pool, declared once: the local `WarmPool` and the Ray
`ClusterPool` (executor_service/cluster.py) both fulfil `Pool`.

`condition()` is what admission reads on every request: three fields kept as plain
attributes, read under the pool's lock, never a snapshot of the workers. `stats()` is
the whole picture (workers, their memory, templates, nodes) for `/health` and
`/metrics`.

One vocabulary of states for both:

    starting ─▶ ready ─▶ closing ─▶ closed
         └──────▶ broken (retrying; see restarts.py) ──▶ ready
"""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass
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


class Pool(Protocol):
    """A pool of warm processes that runs jobs as `python main.py` would."""

    def start(self) -> Pool: ...

    def wait_ready(self, timeout: float | None = None) -> bool: ...

    def submit(self, spec: JobSpec, on_start: Callable | None = None) -> Future: ...

    def cancel(self, job_id: str) -> bool: ...

    def output(self, job_id: str, stream: str, offset: int = 0, limit: int = 65536) -> JobOutput | None: ...

    def condition(self) -> Condition: ...

    def stats(self) -> dict[str, Any]: ...

    def shutdown(self, grace: float = 30.0) -> None: ...
