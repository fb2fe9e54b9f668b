"""The HTTP service, started as `python -m executor_service serve` on 127.0.0.1.

Requests go over persistent HTTP/1.1 connections (one per client thread), so the
figures are the service's cost, not the cost of opening a TCP connection each time.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from benchmarks import library, workloads
from benchmarks.report import run_clients, summarize


class Service:
    """One service process; `with Service(...) as svc:` starts it and stops it."""

    def __init__(self, backend: str, work_dir: Path, pool_size: int = 2, start_timeout: float = 180.0,
                 args: tuple[str, ...] = ()):
        self.backend, self.work_dir, self.pool_size = backend, work_dir, pool_size
        self.args = args  # more flags (e.g. --ray-address)
        self.start_timeout = start_timeout
        self.port = _free_port()
        self.proc: subprocess.Popen | None = None
        self.log_path = work_dir / "service.log"
        self.ready_s: float | None = None
        self.uid_base = library.job_uid_base()  # the pool's job uids: 32 from here

    def __enter__(self) -> Service:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self) -> None:
        """Start the service; return once /health is 200 with every worker idle."""
        self.work_dir.mkdir(parents=True, exist_ok=True)
        env = {k: v for k, v in os.environ.items() if not k.startswith("EXECUTOR_")}
        env["EXECUTOR_SPOT_WATCH"] = "off"  # a benchmark never drains on a notice, even on EC2
        if self.backend == "xla":
            env.setdefault("PJRT_DEVICE", "CPU")
        cmd = [sys.executable, "-m", "executor_service", "serve", "--host", "127.0.0.1",
               "--port", str(self.port), "--backend", self.backend, "--pool-size", str(self.pool_size),
               "--work-dir", str(self.work_dir), "--log-level", "WARNING",
               "--job-uid-base", str(self.uid_base), *self.args]
        start = time.perf_counter()
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
        if not self.wait_idle(self.pool_size, self.start_timeout):
            self.stop()
            raise RuntimeError(f"service not healthy within {self.start_timeout} s: {self._log_tail()}")
        self.ready_s = time.perf_counter() - start

    def wait_idle(self, count: int, timeout: float) -> bool:
        """Wait until /health is 200 with at least `count` idle workers."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"service exited {self.proc.returncode}: {self._log_tail()}")
            try:
                status, body = self.request("GET", "/health")
                if status == 200 and (body.get("pool") or {}).get("idle", 0) >= count:
                    return True
            except (OSError, http.client.HTTPException, ValueError):
                pass
            time.sleep(0.1)
        return False

    def stop(self) -> None:
        """SIGTERM, then SIGKILL after 30 s; the service kills its own pool."""
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.terminate()
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=10)

    def _log_tail(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-1500:]
        except OSError:
            return "(no log)"

    def connect(self) -> http.client.HTTPConnection:
        """A persistent connection to the service."""
        return http.client.HTTPConnection("127.0.0.1", self.port, timeout=600)

    def request(self, method: str, path: str, body: Any = None,
                conn: http.client.HTTPConnection | None = None) -> tuple[int, Any]:
        """One request; a fresh connection unless `conn` is given. Returns (status, JSON)."""
        own = conn is None
        conn = conn or self.connect()
        try:
            data = None if body is None else json.dumps(body).encode()
            headers = {"Content-Type": "application/json"} if data is not None else {}
            conn.request(method, path, body=data, headers=headers)
            resp = conn.getresponse()
            payload = resp.read()
            return resp.status, json.loads(payload or b"null")
        finally:
            if own:
                conn.close()

    def execute(self, code: str, conn: http.client.HTTPConnection, timeout: float = 120.0) -> float:
        """POST /execute; return the wall time (s). Raises unless the script succeeded."""
        start = time.perf_counter()
        status, body = self.request("POST", "/execute", {"paper_id": "bench", "code": code,
                                                         "timeout": timeout}, conn)
        elapsed = time.perf_counter() - start
        if status != 200 or not body.get("success"):
            raise RuntimeError(f"POST /execute → {status}: {str(body)[:500]}")
        return elapsed

    def pool_pids(self) -> tuple[int | None, list[int]]:
        """(template pid, idle worker pids) from /health?verbose=1; the template is the workers' parent."""
        import psutil

        deadline = time.monotonic() + 60  # replacements of dirty workers may still be starting
        while True:
            _, body = self.request("GET", "/health?verbose=1")
            workers = [w["pid"] for w in body["pool"]["workers"] if w["state"] == "idle"]
            if len(workers) >= self.pool_size or time.monotonic() > deadline:
                break
            time.sleep(0.05)
        template = psutil.Process(workers[0]).ppid() if workers else None
        return template, workers


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def latencies(svc: Service, code: str, runs: int, warmup: int = 4) -> dict[str, Any]:
    """POST /execute round-trip wall times of one script."""
    conn = svc.connect()
    try:
        for _ in range(warmup):
            svc.execute(code, conn)
        walls = []
        for _ in range(runs):
            # A job that finds a spare ready (throughput() is the other case), asked on the
            # same connection: a poll's own connection closing would overlap the job's request.
            wait_spares(svc, conn=conn)
            walls.append(svc.execute(code, conn))
        return summarize(walls)
    finally:
        conn.close()


def wait_spares(svc: Service, timeout: float = 60.0, conn: http.client.HTTPConnection | None = None) -> bool:
    """Poll /health?verbose=1 (on `conn`, else a connection each) until every slot has all
    its spares ready."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        _, body = svc.request("GET", "/health?verbose=1", conn=conn)
        pool = (body or {}).get("pool") or {}
        if pool.get("idle") == pool.get("size") and not (pool.get("spares") or {}).get("starting"):
            return True
        time.sleep(0.002)
    return False


def batch_wall(svc: Service, batch: list[dict[str, str]]) -> tuple[float, dict[str, Any]]:
    """POST /execute_batch wall time (s) and a summary of the response."""
    respawns_before = _respawns(svc)
    start = time.perf_counter()
    status, body = svc.request("POST", "/execute_batch", {"batch": batch})
    elapsed = time.perf_counter() - start
    if status != 200:
        raise RuntimeError(f"POST /execute_batch → {status}: {str(body)[:500]}")
    summary = {k: body.get(k) for k in ("success", "batch_size", "successful", "failed")}
    results = list((body.get("results") or {}).values())
    # Where the wall time went: in the scripts, or waiting for one of the workers.
    summary["sum_execution_s"] = round(sum(r.get("execution_time") or 0 for r in results), 4)
    summary["max_queue_s"] = round(max((r.get("queue_time") or 0 for r in results), default=0), 4)
    summary["workers_replaced"] = _respawns(svc) - respawns_before
    if body.get("failed"):
        bad = [r.get("stderr", "")[-300:] for r in body.get("results", {}).values() if not r.get("success")]
        summary["first_failure"] = bad[0] if bad else None
    return elapsed, summary


def throughput(svc: Service, clients: int, max_jobs: int, max_seconds: float) -> dict[str, Any]:
    """Empty jobs per second through POST /execute with `clients` threads, one connection each."""
    @contextlib.contextmanager
    def session():
        conn = svc.connect()
        try:
            yield lambda: svc.execute(workloads.EMPTY, conn)
        finally:
            conn.close()

    return run_clients(clients, max_jobs, max_seconds, session)


def _respawns(svc) -> int:
    """Workers the pool replaced so far (GET /health)."""
    _, body = svc.request("GET", "/health")
    return int(((body or {}).get("pool") or {}).get("respawns", {}).get("total", 0))


def own_cost(backend: str, work_dir: Path, pairs: int) -> dict[str, Any]:
    """The HTTP path's own cost, as this shared machine lets it be measured: a library pool
    and a service side by side, one empty job through each in turn (spares ready before
    each), so both p50s see the same load. Measured one after the other, as `dispatch`
    is, the two p50s drift apart by several ms with the load alone."""
    pool, _ = library.start_pool(backend, work_dir / "library")
    try:
        with Service(backend, work_dir / "service") as svc:
            conn = svc.connect()
            try:
                for _ in range(5):  # warm-up: each side's first jobs
                    library.run_job(pool, workloads.EMPTY)
                    svc.execute(workloads.EMPTY, conn)
                lib, http = [], []
                for _ in range(pairs):
                    library.wait_spares(pool)
                    lib.append(library.run_job(pool, workloads.EMPTY)[0])
                    wait_spares(svc, conn=conn)
                    http.append(svc.execute(workloads.EMPTY, conn))
            finally:
                conn.close()
    finally:
        pool.shutdown(grace=5)
    library_p50, http_p50 = summarize(lib)["p50_ms"], summarize(http)["p50_ms"]
    return {"pairs": pairs, "library": summarize(lib), "http": summarize(http),
            "own_cost_ms": round(http_p50 - library_p50, 2),
            "pair_difference": summarize([h - c for h, c in zip(http, lib, strict=True)])}
