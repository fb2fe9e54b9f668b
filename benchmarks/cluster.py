"""Several instances on Ray (docs/cluster.md), measured on this one machine.

A real cluster, as in tests/test_cluster.py: a Ray head and node processes (each a
separate `ray start --block` with `neuron_cores: 2`, each its own 127.0.0.N), all inside a
private network and PID namespace (`unshare --net --pid --fork --mount-proc`), where this
module runs itself again as PID 1 (`--inside`) and writes its figures as JSON.

- scaling: one batch of jobs that each wait `job_s` seconds, through POST /execute_batch,
  on 1 node and then on 2 (2 workers each): wall times and their ratio. The jobs wait
  rather than compute because every node here shares this machine's cores; a job
  waiting on its NeuronCore is what separate instances spread.
- dispatch overhead: an empty job's round trip through the cluster (service → Ray →
  the node's actor → its pool and back) against the same through a local pool, both at
  the library level (ClusterPool.submit against WarmPool.submit) and over HTTP (a
  service with --ray-address against one with its own pool).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from benchmarks import library, service, workloads
from benchmarks.report import ratio

REPO = Path(__file__).resolve().parent.parent


def available() -> str | None:
    """None when the cluster section can run here, else why not."""
    try:
        import ray  # noqa: F401
    except ImportError:
        return "ray is not installed (pip install -r requirements-cluster.txt)"
    if os.geteuid() != 0:
        return "a cluster in a private namespace needs root"
    probe = subprocess.run(["unshare", "--net", "--pid", "--fork", "--mount-proc", "true"],
                           capture_output=True)
    return None if probe.returncode == 0 else "cannot create namespaces here"


def bench_cluster(batch_size: int, job_s: float, dispatch_runs: int, work: Path) -> dict[str, Any]:
    """Run the measurements inside a namespace of their own (its progress on stderr); their figures."""
    out = work / "cluster.json"
    root = Path(tempfile.mkdtemp(prefix="rb-", dir="/var/tmp"))  # short: Ray's socket paths
    try:
        cmd = ["unshare", "--net", "--pid", "--fork", "--mount-proc", "--kill-child", sys.executable, "-m",
               "benchmarks.cluster", "--inside", str(out), str(root), str(work / "cluster"),
               str(batch_size), str(job_s), str(dispatch_runs)]
        proc = subprocess.run(cmd, cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)}, timeout=900,
                              stdout=sys.stderr, stderr=sys.stderr)
        if proc.returncode != 0 or not out.exists():
            raise RuntimeError(f"the cluster benchmark failed (exit status {proc.returncode}; see above)")
        return json.loads(out.read_text())
    finally:
        subprocess.run(["rm", "-rf", str(root)], check=False)


def inside(out: Path, root: Path, work: Path, batch_size: int, job_s: float, runs: int) -> None:
    """PID 1 of the namespace: the figures, into `out`."""
    from ray_cluster import LocalRay

    from executor_service.cluster.pool import ClusterPool
    from warm_pool import PoolConfig

    os.environ["RAY_USAGE_STATS_ENABLED"] = "0"
    subprocess.run(["ip", "link", "set", "lo", "up"], check=True)
    work.mkdir(parents=True, exist_ok=True)
    work.chmod(0o711)
    figures: dict[str, Any] = {"nodes_workers": 2, "job_s": job_s, "batch_size": batch_size}

    def say(msg: str) -> None:
        print(f"[{time.strftime('%H:%M:%S')}] cluster: {msg}", file=sys.stderr, flush=True)

    say("local pool: library and HTTP")
    pool, _ = library.start_pool("cpu", work / "local-lib")
    try:
        local_lib = library.latencies(pool, workloads.EMPTY, runs, warmup=5)
    finally:
        pool.shutdown(grace=5)
    with service.Service("cpu", work / "local-svc") as svc:
        local_http = service.latencies(svc, workloads.EMPTY, runs, warmup=5)

    ray = LocalRay(root)
    try:
        ray.start_head()
        ray.add_node()
        say("one node: ClusterPool as a library")
        config = PoolConfig(backend="cpu", pool_size=2, work_dir=work / "cluster-lib")
        cluster = ClusterPool(config, ray.address).start()
        try:
            if not cluster.wait_ready(180) or not library.wait_idle(cluster, 2, 180):
                raise RuntimeError(f"cluster not ready: {cluster.stats()}")
            cluster_lib = library.latencies(cluster, workloads.EMPTY, runs, warmup=5)
        finally:
            cluster.shutdown(grace=5)
        say("one node, then two: the service with --ray-address")
        svc = service.Service("cpu", work / "cluster-svc", args=("--ray-address", ray.address))
        with svc:
            cluster_http = service.latencies(svc, workloads.EMPTY, runs, warmup=5)
            jobs = [{"paper_id": f"wait{i}", "code": f"import time\ntime.sleep({job_s})\n"}
                    for i in range(batch_size)]
            service.batch_wall(svc, jobs[:2])  # warm-up
            one, one_summary = service.batch_wall(svc, jobs)
            ray.add_node()
            svc.wait_idle(4, 180)
            service.batch_wall(svc, jobs[:4])
            two, two_summary = service.batch_wall(svc, jobs)
    finally:
        ray.stop()
    figures["batch"] = {"one_node_s": round(one, 3), "two_nodes_s": round(two, 3), "scaling": ratio(one, two),
                        "one_node": one_summary, "two_nodes": two_summary}
    figures["dispatch"] = {
        "local_library": local_lib, "cluster_library": cluster_lib,
        "overhead_library_p50_ms": _minus(cluster_lib, local_lib),
        "local_http": local_http, "cluster_http": cluster_http,
        "overhead_http_p50_ms": _minus(cluster_http, local_http),
    }
    out.write_text(json.dumps(figures, indent=2))


def _minus(a: dict[str, Any], b: dict[str, Any]) -> float | None:
    if a.get("p50_ms") is None or b.get("p50_ms") is None:
        return None
    return round(a["p50_ms"] - b["p50_ms"], 3)


if __name__ == "__main__" and sys.argv[1:2] == ["--inside"]:
    sys.path.insert(0, str(REPO / "tests"))
    from ray_cluster import as_init

    out_path, root_dir, work_dir, size, seconds, n = sys.argv[2:8]
    as_init(lambda: inside(Path(out_path), Path(root_dir), Path(work_dir), int(size), float(seconds), int(n)))
