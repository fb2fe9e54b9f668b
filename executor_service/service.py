"""The composition root: the parts of one running service, built once and owned here.

    Service.start(config)
        ├─ the SQS client, when a queue is configured (a bad queue stops the start here,
        │  before any process exists)
        ├─ the pool: this instance's WarmPool, or with ray_address the cluster's ClusterPool
        ├─ the job store, the metrics, the runner that feeds the pool from the store
        └─ the queue intake and the Spot watcher, when wanted

The HTTP app (`app.app_for`) is given the service and hands each handler what it uses;
`serve.py` starts, drains and stops it. Nothing reaches these parts through the Flask app.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from executor_service import spot
from executor_service.config import ServiceConfig
from executor_service.jobs import JobRunner
from executor_service.metrics import Metrics
from executor_service.store import JobStore
from warm_pool import Pool


def start_pool(config: ServiceConfig) -> Pool:
    """This instance's warm pool; or, with `ray_address`, the cluster's dispatcher (which
    alone imports Ray)."""
    if config.ray_address:
        from executor_service.cluster.pool import ClusterPool

        return ClusterPool(config.pool, config.ray_address, config.max_attempts,
                           config.node_start_timeout).start()
    from warm_pool import WarmPool

    return WarmPool(config.pool).start()


@dataclass
class Service:
    """One service's parts; `start` builds and starts them, in order."""

    config: ServiceConfig
    pool: Pool
    store: JobStore
    metrics: Metrics
    runner: JobRunner
    intake: Any = None                    # sqs_intake.SqsIntake, with --sqs-queue-url
    watcher: spot.SpotWatcher | None = None

    @classmethod
    def start(cls, config: ServiceConfig, pool: Pool | None = None) -> Service:
        """Build and start everything (`pool` given: use it as it is, started or not)."""
        sqs = None
        if config.sqs_queue_url:  # its ConfigError (no region, no boto3) comes before any process starts
            from executor_service.sqs_intake import SqsIntake, sqs_client

            sqs = sqs_client(config)
        if pool is None:
            pool = start_pool(config)
        store = JobStore(config.store_path)
        metrics = Metrics(pool.stats, store.counts)
        runner = JobRunner(pool, store, config, metrics)
        runner.start()
        intake = SqsIntake(runner, store, config, metrics, sqs).start() if sqs is not None else None
        watcher = spot.SpotWatcher(config, runner, metrics, intake).start() if spot.wanted(config) else None
        return cls(config, pool, store, metrics, runner, intake, watcher)
