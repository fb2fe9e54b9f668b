"""Prometheus metrics, in the service's own CollectorRegistry (never the global one, so
several apps in one test process do not collide).

Counters and histograms are updated as jobs finish; the pool's and the queue's state is
read at scrape time by a custom collector, so it can never be stale.

Every label value comes from a fixed set (`label()`): a value outside it is counted as
"other". A label series is kept for the life of the process, so a value a job could
choose (a forged error_type of 16 KiB) would otherwise grow /metrics with every job.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from warm_pool import ERROR_TYPES, PoolStats

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
_DURATION_BUCKETS = (0.1, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800, 3600)

OTHER = "other"
# The values each label may take; anything else is OTHER.
OUTCOMES = frozenset({"success", "failed", *ERROR_TYPES})
# Why the pool replaced a worker (the supervisor's retire reasons).
RESPAWN_REASONS = frozenset({
    "crashed", "start_failed", "start_killed", "start_timeout", "check_timeout", "template_died", "killed",
    "shutdown", "channel_closed", "dirty", "recycled", "device_memory_growth", "timeout",
    "memory_limit", "output_limit", "disk_limit", "protocol_error", "cancelled", "interrupted",
    "profiling",
})
LOST_JOB_OUTCOMES = frozenset({"run_again", "node_lost"})


def label(value: Any, allowed: frozenset[str]) -> str:
    """`value` when it is one of `allowed`, else OTHER."""
    return value if isinstance(value, str) and value in allowed else OTHER


def _by_label(counts: dict[Any, Any], allowed: frozenset[str]) -> dict[str, float]:
    """Counts keyed by any values, summed by their label (unknown ones together as OTHER)."""
    out: dict[str, float] = {}
    for key, n in counts.items():
        name = label(key, allowed)
        out[name] = out.get(name, 0) + (n if isinstance(n, (int, float)) else 0)
    return out


class _StateCollector:
    """Pool and queue gauges, from callables evaluated on every scrape."""

    def __init__(self, pool_stats: Callable[[], PoolStats], job_counts: Callable[[], dict[str, int]]):
        self._pool_stats = pool_stats
        self._job_counts = job_counts

    def collect(self):
        counts = self._job_counts()
        jobs = GaugeMetricFamily("executor_jobs", "Jobs in the store by status", labels=["status"])
        for status in ("queued", "running"):
            jobs.add_metric([status], counts.get(status, 0))
        yield jobs
        yield GaugeMetricFamily("executor_queue_depth", "Accepted jobs waiting for a worker",
                                value=counts.get("queued", 0))
        try:
            stats = self._pool_stats()
        except Exception as exc:  # noqa: BLE001 - a scrape must not fail because the pool is down
            stats = PoolStats.unknown(repr(exc))
        workers = GaugeMetricFamily("executor_pool_workers", "Pool workers by state", labels=["state"])
        for state, n in (("idle", stats.idle), ("busy", stats.busy), ("starting", stats.starting)):
            workers.add_metric([state], n)
        yield workers
        yield GaugeMetricFamily("executor_pool_size", "Configured pool size", value=stats.size)
        yield GaugeMetricFamily("executor_pool_ready", "1 when at least one worker is ready",
                                value=1 if stats.healthy else 0)
        yield GaugeMetricFamily("executor_pool_broken", "1 when the pool declared itself broken",
                                value=1 if stats.state == "broken" else 0)
        state = GaugeMetricFamily("executor_pool_state", "The pool's state (1 for the current one)",
                                  labels=["state"])
        state.add_metric([stats.state], 1)  # one of POOL_STATES (PoolStats checks it)
        yield state
        respawns = CounterMetricFamily("executor_worker_respawns", "Workers replaced, by reason",
                                       labels=["reason"])
        for reason, n in _by_label(stats.respawns_by_reason, RESPAWN_REASONS).items():
            respawns.add_metric([reason], n)
        yield respawns
        cluster = stats.cluster
        if cluster is not None:  # on a cluster the counts above are sums over its nodes' pools
            nodes = GaugeMetricFamily("executor_cluster_nodes", "Nodes with NeuronCores, by state",
                                      labels=["state"])
            for state in ("placing", "ready", "lost", "dead"):
                nodes.add_metric([state], sum(1 for n in cluster["nodes"] if n["state"] == state))
            yield nodes
            lost = CounterMetricFamily("executor_cluster_lost_jobs", "Jobs whose node was lost, by what "
                                       "became of them (run_again, node_lost)", labels=["outcome"])
            for outcome, n in _by_label(cluster["jobs_on_lost_nodes"], LOST_JOB_OUTCOMES).items():
                lost.add_metric([outcome], n)
            yield lost


class _Gauge:
    """One gauge whose value a callable gives at scrape time."""

    def __init__(self, name: str, doc: str, value: Callable[[], float]):
        self._name, self._doc, self._value = name, doc, value

    def collect(self):
        yield GaugeMetricFamily(self._name, self._doc, value=self._value())


class Metrics:
    """The service's metrics and the registry they live in."""

    def __init__(self, pool_stats: Callable[[], PoolStats], job_counts: Callable[[], dict[str, int]]):
        self.registry = CollectorRegistry()
        self.jobs = Counter("executor_jobs_finished", "Jobs finished, by outcome (error_type or success)",
                            ["outcome"], registry=self.registry)
        self.duration = Histogram("executor_job_duration_seconds", "Run time of finished jobs",
                                  buckets=_DURATION_BUCKETS, registry=self.registry)
        self.queue_time = Histogram("executor_job_queue_seconds", "Time jobs waited for a worker",
                                    buckets=_DURATION_BUCKETS, registry=self.registry)
        self.requests = Counter("executor_http_requests", "HTTP requests by endpoint and status",
                                ["endpoint", "status"], registry=self.registry)
        self.registry.register(_StateCollector(pool_stats, job_counts))
        self.queue_messages = Counter(
            "executor_sqs_messages", "SQS messages by what became of them: taken (a job), duplicate "
            "(delivered again, not run again), rejected (not a valid request), returned (visible again)",
            ["outcome"], registry=self.registry)
        self.queue_errors = Counter("executor_sqs_errors", "SQS calls that failed, by call", ["call"],
                                    registry=self.registry)

    def gauge(self, name: str, doc: str, value: Callable[[], float]) -> None:
        """A gauge read from `value()` at scrape time (the SQS intake's, the Spot watcher's)."""
        self.registry.register(_Gauge(name, doc, value))

    def job_finished(self, result: dict[str, Any]) -> None:
        """Count a finished job's outcome and observe its times."""
        outcome = "success" if result.get("success") else (result.get("error_type") or "failed")
        self.jobs.labels(outcome=label(outcome, OUTCOMES)).inc()
        if result.get("execution_time") is not None:
            self.duration.observe(float(result["execution_time"]))
        if result.get("queue_time") is not None:
            self.queue_time.observe(float(result["queue_time"]))

    def render(self) -> bytes:
        return generate_latest(self.registry)
