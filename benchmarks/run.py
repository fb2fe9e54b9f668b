"""`python -m benchmarks.run [--quick] [--backends cpu,xla] [--no-cluster]`: cold against warm, one run.

For each backend, in this order so that nothing else competes for the two cores:
cold per-script runs and the cold batch (no pool running); then a library pool
(latency, dispatch, throughput, memory, timeouts, replacement last since it kills);
then the HTTP service (latency, dispatch, the warm batch, throughput). Then the soak
(hostile jobs) and the chaos run (SIGKILLs under load) against the service. Then several
instances on Ray (benchmarks/cluster.py; needs Ray and root): the same batch on 1 node
and on 2, and an empty job's dispatch through Ray against the local pool; then the
cluster's chaos run (benchmarks/cluster_chaos.py: jobs completed per minute while nodes
are SIGKILLed and restarted). Prints a table,
writes benchmarks/results/latest.json and, when matplotlib imports, latency.png.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from benchmarks import chaos, cluster, cluster_chaos, cold, library, report, service, soak, workloads
from benchmarks.report import ratio, summarize
from benchmarks.table import goals, render

RESULTS = Path(__file__).resolve().parent / "results"


@dataclass(frozen=True)
class Plan:
    """How many of everything; the full plan fits in ~10 minutes on 2 cores."""

    cold_runs: int = 5
    cold_runs_xla: int = 3
    warm_runs: int = 30
    batch_size: int = 10
    dispatch_runs: int = 300
    kills: int = 10
    kills_xla: int = 6
    timeouts_soft: int = 3
    timeouts_hard: int = 2
    memory_jobs: int = 100
    throughput_jobs: int = 2000
    throughput_seconds: float = 3.0
    throughput_clients: tuple[int, ...] = (1, 4, 8)
    # Several instances: a batch of jobs that each wait this long, on 1 then 2 nodes of 2 workers.
    # Issue 22: hostile jobs against the service, this long.
    soak_seconds: float = 60.0
    # Issue 21: mixed jobs while the pool's processes are SIGKILLed from outside, this long.
    chaos_seconds: float = 60.0
    cluster_batch: int = 8
    cluster_job_s: float = 1.0
    cluster_dispatch_runs: int = 200
    # Issue 21: mixed jobs on a cluster while its nodes are SIGKILLed and restarted, this long.
    cluster_chaos_seconds: float = 60.0


QUICK = Plan(cold_runs=2, cold_runs_xla=2, warm_runs=5, batch_size=2, dispatch_runs=20, kills=2,
             soak_seconds=5.0, chaos_seconds=5.0, kills_xla=2, timeouts_soft=1, timeouts_hard=0,
             memory_jobs=10, throughput_jobs=100,
             throughput_seconds=0.5, throughput_clients=(2,), cluster_batch=4, cluster_job_s=0.5,
             cluster_dispatch_runs=20, cluster_chaos_seconds=12.0)


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def bench_backend(backend: str, plan: Plan, work: Path) -> dict[str, Any]:
    """Every figure for one backend."""
    loads = workloads.workloads(backend)
    batch = workloads.batch(backend, plan.batch_size)
    cold_runs = plan.cold_runs_xla if backend == "xla" else plan.cold_runs
    out: dict[str, Any] = {"latency": {}, "batch": {"size": plan.batch_size}}

    for name, code in loads.items():
        log(f"{backend}: cold {name} ×{cold_runs}")
        out["latency"][name] = {"cold": summarize(cold.latencies(code, backend, cold_runs))}
    log(f"{backend}: cold batch of {plan.batch_size}")
    out["batch"]["cold_s"] = round(cold.batch_wall(batch, backend), 3)

    log(f"{backend}: library pool")
    pool, ready_s = library.start_pool(backend, work / f"{backend}-lib")
    try:
        out["pool_start_s"] = round(ready_s, 3)
        # Memory first, while both workers are fresh (jobs_run 0, so 100 jobs spread over two
        # stay below max_jobs_per_worker); then empty jobs, before any workload dirties one.
        log(f"{backend}: memory over {plan.memory_jobs} jobs")
        out["memory"] = library.memory(pool, plan.memory_jobs, loads["matmul"])
        dispatch = library.latencies(pool, workloads.EMPTY, plan.dispatch_runs, warmup=5)
        out["dispatch"] = {"library": dispatch}
        out["throughput"] = {"library": [library.throughput(pool, c, plan.throughput_jobs,
                                                            plan.throughput_seconds)
                                         for c in plan.throughput_clients]}
        for name, code in loads.items():
            log(f"{backend}: warm library {name} ×{plan.warm_runs}")
            out["latency"][name]["warm_library"] = library.latencies(pool, code, plan.warm_runs)
        log(f"{backend}: timeouts")
        out["timeout"] = {"sigint": library.timeout_delay(pool, workloads.SLEEPER, plan.timeouts_soft)}
        if plan.timeouts_hard:
            out["timeout"]["sigkill"] = library.timeout_delay(pool, workloads.STUBBORN, plan.timeouts_hard)
        kills = plan.kills_xla if backend == "xla" else plan.kills
        log(f"{backend}: replacement ×{kills}")
        out["replacement"] = library.replacement(pool, kills, pool.config.pool_size or 2)
    finally:
        pool.shutdown(grace=5)

    log(f"{backend}: isolation on and off")
    out["isolation"] = library.isolation_overhead(backend, work, plan.dispatch_runs)

    log(f"{backend}: HTTP service")
    with service.Service(backend, work / f"{backend}-svc") as svc:
        out["service_start_s"] = round(svc.ready_s or 0, 3)
        out["dispatch"]["http"] = service.latencies(svc, workloads.EMPTY, plan.dispatch_runs, warmup=5)
        for name, code in loads.items():
            log(f"{backend}: warm HTTP {name} ×{plan.warm_runs}")
            out["latency"][name]["warm_http"] = service.latencies(svc, code, plan.warm_runs)
        service.batch_wall(svc, batch)  # warm-up: first use of each op in each worker
        wall, summary = service.batch_wall(svc, batch)
        out["batch"].update(warm_http_s=round(wall, 4), response=summary)
        out["memory"]["service_idle"] = library.memory_snapshot(svc.pool_pids())
        out["throughput"]["http"] = [service.throughput(svc, c, plan.throughput_jobs, plan.throughput_seconds)
                                     for c in plan.throughput_clients]
    log(f"{backend}: the HTTP path's own cost, library and HTTP interleaved ×{plan.dispatch_runs}")
    out["own_cost"] = service.own_cost(backend, work / f"{backend}-pairs", plan.dispatch_runs)
    for row in out["latency"].values():
        c = row["cold"].get("p50_ms")
        row["ratio_cold_over_warm_http"] = ratio(c, row["warm_http"].get("p50_ms"))
        row["ratio_cold_over_warm_library"] = ratio(c, row["warm_library"].get("p50_ms"))
    out["batch"]["ratio"] = ratio(out["batch"]["cold_s"], out["batch"]["warm_http_s"])
    return out


def _section(results: dict[str, Any], name: str, what: str, measure: Any) -> None:
    """Run one single-backend section; a failure is reported with the rest, never fatal."""
    log(f"{name}: {what}")
    try:
        results[name] = measure()
    except Exception as exc:  # noqa: BLE001 - reported with the rest
        log(f"{name}: FAILED: {exc}")
        results["errors"][name] = f"{type(exc).__name__}: {exc}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.run", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="tiny run (smoke test): few runs each")
    parser.add_argument("--backends", default=None,
                        help="comma-separated, default cpu,xla (cpu only with --quick)")
    parser.add_argument("--out", type=Path, default=RESULTS, help=f"results directory [{RESULTS}]")
    parser.add_argument("--no-cluster", action="store_true", help="skip the several-instances section")
    args = parser.parse_args(argv)
    plan = QUICK if args.quick else Plan()
    backends = (args.backends or ("cpu" if args.quick else "cpu,xla")).split(",")
    started = time.perf_counter()
    results: dict[str, Any] = {"machine": report.machine(), "mode": "quick" if args.quick else "full",
                               "plan": asdict(plan), "backends": {}, "errors": {}}
    # Not below /tmp: each job process gets a /tmp of its own, which would hide it.
    work = Path(tempfile.mkdtemp(prefix="bench-", dir="/var/tmp"))
    work.chmod(0o711)  # jobs run under their own uids and must reach their dirs below it
    try:
        for backend in backends:
            try:
                results["backends"][backend] = bench_backend(backend, plan, work)
            except Exception as exc:  # noqa: BLE001 - one backend failing must not hide the other
                log(f"{backend}: FAILED: {exc}")
                results["errors"][backend] = f"{type(exc).__name__}: {exc}"
        _section(results, "soak", f"hostile jobs for {plan.soak_seconds:g} s against /health and a "
                 "timed-out control job", lambda: soak.soak(backends[0], work / "soak", plan.soak_seconds))
        _section(results, "chaos", f"mixed jobs for {plan.chaos_seconds:g} s while the pool's processes "
                 "are SIGKILLed", lambda: chaos.chaos(backends[0], work / "chaos", plan.chaos_seconds))
        why_not = "--no-cluster" if args.no_cluster else cluster.available()
        if why_not:
            log(f"cluster: skipped ({why_not})")
            results["cluster"] = results["cluster_chaos"] = {"skipped": why_not}
        else:
            _section(results, "cluster", "several instances on Ray, in a private namespace",
                     lambda: cluster.bench_cluster(plan.cluster_batch, plan.cluster_job_s,
                                                   plan.cluster_dispatch_runs, work))
            _section(results, "cluster_chaos", f"mixed jobs on a cluster for {plan.cluster_chaos_seconds:g} "
                     "s while its nodes are SIGKILLed and restarted",
                     lambda: cluster_chaos.chaos(plan.cluster_chaos_seconds, work / "cluster-chaos"))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    results["machine"]["load_avg_end"] = report.load_avg()
    results["goals"] = goals(results)
    results["duration_s"] = round(time.perf_counter() - started, 1)
    json_path = args.out / "latest.json"
    png_note = report.plot(results, args.out / "latency.png") if results["backends"] else "no data"
    results["plot"] = png_note or str(args.out / "latency.png")
    report.write_json(results, json_path)
    print(render(results))
    print(f"\nJSON: {json_path}\nplot: {results['plot']}")
    return 1 if results["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
