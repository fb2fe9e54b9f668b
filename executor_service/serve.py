"""Run the service under waitress, in this one process, and drain on SIGTERM/SIGINT.

Why waitress: it is a production WSGI server that runs in-process with a thread pool,
so the warm pool, its template and the job store belong to exactly one process that
we control. gunicorn forks its worker from an arbiter that restarts it on its own
timeouts, which would kill and re-create the pool (and its template) behind our back,
and its own signal handling would race ours for the drain.

Shutdown, in order (signal handlers only record the signal; the main thread acts):
  1. stop accepting connections (the listening socket is closed), stop polling SQS and
     watching for Spot notices;
  2. the pool takes no more jobs; running jobs get `shutdown_grace` seconds, then are
     killed and recorded `interrupted`; jobs not started stay `queued` in the store;
  3. SQS messages of jobs that ended are deleted, the others made visible again (the
     next start records their jobs interrupted: whoever receives the message runs it);
  4. in-flight responses are written, the store is closed, exit status 0.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
import time

from executor_service import http_server, logs
from executor_service.app import app_for
from executor_service.config import ServiceConfig
from executor_service.service import Service

log = logging.getLogger("executor_service.serve")


def serve(config: ServiceConfig) -> int:
    """Serve until SIGTERM or SIGINT, then drain; return the exit status."""
    logs.configure(config.log_level)
    # Whatever this process creates (the job store, its journal) is its own alone; job
    # dirs and capture files get their modes explicitly.
    os.umask(0o077)
    received: list[int] = []

    def record(signum, _frame):  # only record: the main loop does the work
        received.append(signum)

    signal.signal(signal.SIGTERM, record)
    signal.signal(signal.SIGINT, record)

    service = Service.start(config)
    runner, intake, watcher = service.runner, service.intake, service.watcher
    server = http_server.create(app_for(service), config)
    log.info("listening", extra={"host": config.host, "port": int(server.effective_port),
                                 "connection_limit": server.adj.connection_limit,
                                 "backend": config.pool.backend, "pool_size": config.pool.pool_size,
                                 "work_dir": str(config.work_dir), "auth": bool(config.api_token),
                                 "isolation": service.pool.condition().isolation,
                                 "ray_address": config.ray_address})
    loop = threading.Thread(target=server.run, name="waitress", daemon=True)
    loop.start()
    while not received and loop.is_alive():
        time.sleep(0.2)
    sig = signal.Signals(received[0]).name if received else "server loop ended"
    log.info("shutting down", extra={"signal": sig, "grace_s": config.shutdown_grace})

    # 1. Stop accepting: close the listening socket from inside waitress's loop thread.
    server.trigger.pull_trigger(server.close)
    if intake is not None:
        intake.stop_polling()
    if watcher is not None:
        watcher.close()
    # 2. Drain the pool; requests waiting on their jobs get their results.
    runner.shutdown(grace=config.shutdown_grace)
    # 3. Settle the queue's messages.
    if intake is not None:
        intake.close()
    # 4. Let waitress finish writing the responses in flight.
    server.task_dispatcher.shutdown(cancel_pending=False, timeout=5)
    deadline = time.monotonic() + 2
    while time.monotonic() < deadline and any(not c.will_close and c.total_outbufs_len
                                              for c in list(server._map.values())
                                              if hasattr(c, "total_outbufs_len")):
        time.sleep(0.05)
    left_queued = service.store.counts().get("queued", 0)
    service.store.close()
    log.info("stopped", extra={"left_queued": left_queued})
    return 0
