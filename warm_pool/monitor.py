"""Measuring running jobs, on a thread of its own.

Memory is cheap to read from a job's cgroup, but a job's disk use is not: the walk over
its directory takes as long as the job made it (max_job_files entries). On the loop
that enforces timeouts, one job's 50,000 directories would delay every other job's
deadline. So a thread measures, every monitor_interval, what the loop published as
running (`watch`), and posts what it found (`take`): each job's memory now and at
peak, and a verdict for the jobs over a limit. The loop alone acts on them.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from warm_pool import limits, usage
from warm_pool.config import PoolConfig


@dataclass(frozen=True)
class Watched:
    """What the monitor needs of one running job (a copy, made by the loop)."""

    job_id: str
    pid: int
    uid: int | None
    group: Any            # cgroups.Group or None
    job: Any              # records.Job: read-only here (job_dir, tmp_dir, device tracker)


@dataclass(frozen=True)
class Reading:
    """One measurement of one job."""

    job_id: str
    memory_bytes: int                 # resident (RSS) memory of its processes
    own_bytes: int | None             # charged to its cgroup
    own_peak_bytes: int | None
    verdict: limits.Verdict | None


class Monitor:
    """The thread that measures; `watch` and `take` are its only doors."""

    def __init__(self, config: PoolConfig, wake: Callable[[], None]):
        self.config = config
        self._wake = wake
        self._lock = threading.Lock()
        self._watched: tuple[Watched, ...] = ()
        self._readings: list[Reading] = []
        self._stop = threading.Event()
        self._next_disk: dict[str, float] = {}  # job id → when its disk is measured next
        self._thread = threading.Thread(target=self._run, name="warm-pool-monitor", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():  # a pool shut down before it started never started it
            self._thread.join(timeout=5)

    def watch(self, watched: tuple[Watched, ...]) -> None:
        """Measure these jobs from now on (the loop's latest view of what runs)."""
        with self._lock:
            self._watched = watched

    def take(self) -> list[Reading]:
        """What was measured since the last call."""
        with self._lock:
            readings, self._readings = self._readings, []
        return readings

    def _run(self) -> None:
        while not self._stop.wait(self.config.monitor_interval):
            with self._lock:
                watched = self._watched
            if not watched:
                continue
            readings = list(measure(self.config, watched, self._next_disk))
            running = {w.job_id for w in watched}
            for job_id in [j for j in self._next_disk if j not in running]:
                del self._next_disk[job_id]
            with self._lock:
                self._readings.extend(readings)
            if any(r.verdict for r in readings):
                self._wake()


# A job's disk is walked again only after this many times the last walk's duration: a
# job with 60,000 directories must not keep the monitor (and a core) walking them.
_DISK_BACKOFF = 10


def measure(config: PoolConfig, watched: tuple[Watched, ...],
            next_disk: dict[str, float] | None = None) -> list[Reading]:
    """One pass over the running jobs: memory (cgroup, and RSS for the seed's field) and
    disk (each job's as often as its size allows); a verdict for each job over a limit."""
    next_disk = {} if next_disk is None else next_disk
    by_uid = usage.uid_usage({w.uid for w in watched if w.uid is not None})
    limit = config.memory_limit_bytes
    out = []
    for w in watched:
        rss = by_uid[w.uid].rss_bytes if w.uid is not None else usage.tree_rss(w.pid)
        own = w.group.usage() if w.group is not None else None
        if w.job.device is not None:
            w.job.device.sample()
        charged = own.memory_bytes if own is not None else rss
        verdict = None
        # Over the limit, or the kernel already enforced it: its OOM killer ended one of the
        # job's processes (whichever it picked: a daemon the job forked, or the job itself).
        # The job exceeded max_memory_mb either way, and ends as memory_limit.
        if limit and (charged > limit or (own is not None and own.oom_kills)):
            verdict = limits.Verdict("memory_limit")
        elif time.monotonic() >= next_disk.get(w.job_id, 0.0):
            started = time.monotonic()
            verdict = limits.disk(config, w.job, w.uid)
            next_disk[w.job_id] = time.monotonic() + _DISK_BACKOFF * (time.monotonic() - started)
        out.append(Reading(w.job_id, rss, own.memory_bytes if own else None,
                           own.peak_bytes if own else None, verdict))
    return out
