"""`python -m benchmarks.run --quick` runs end to end and its JSON has every section."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SECTIONS = ("latency", "batch", "dispatch", "replacement", "timeout", "memory", "throughput", "isolation")


# Every section once, small: cold runs (hf_imports ~10 s each on 2 cores), a pool, the
# service, the soak, the Ray cluster.
@pytest.mark.timeout(600)
def test_quick_benchmark_writes_every_section(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "benchmarks.run", "--quick", "--backends", "cpu",
                           "--out", str(tmp_path)], cwd=ROOT, capture_output=True, text=True,
                          timeout=590)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "goals (reported, not asserted)" in proc.stdout
    results = json.loads((tmp_path / "latest.json").read_text())
    assert results["errors"] == {}
    assert {"cpu_model", "logical_cores", "torch_version", "date_utc"} <= set(results["machine"])
    cpu = results["backends"]["cpu"]
    assert set(SECTIONS) <= set(cpu)
    for row in cpu["latency"].values():
        assert {"cold", "warm_library", "warm_http"} <= set(row)
        assert row["cold"]["p50_ms"] > 0 and row["warm_http"]["p50_ms"] > 0
    assert cpu["batch"]["cold_s"] > 0 and cpu["batch"]["warm_http_s"] > 0
    assert {"library", "http"} <= set(cpu["dispatch"]) and {"library", "http"} <= set(cpu["throughput"])
    assert cpu["memory"]["before"]["template_rss_mb"] > 0
    assert cpu["replacement"]["n"] >= 1 and cpu["timeout"]["sigint"]["n"] >= 1
    assert cpu["isolation"]["uid"]["p50_ms"] > 0 and cpu["isolation"]["none"]["p50_ms"] > 0
    assert cpu["isolation"]["reuse"]["check_ms_mean"] > 0  # only the reuse mode checks after a job
    assert {g["backend"] for g in results["goals"]} == {"cpu"}
    hf = cpu["latency"].get("hf_imports")
    if hf is not None:  # transformers and datasets installed (requirements-jobs.txt)
        assert hf["ratio_cold_over_warm_library"] > 0
        assert any(g["goal"].startswith("hf_imports") and g["value"] for g in results["goals"])
    cluster = results["cluster"]  # several instances on Ray: run wherever the cluster tests run
    if "skipped" not in cluster:
        assert cluster["batch"]["one_node_s"] > 0 and cluster["batch"]["two_nodes_s"] > 0
        assert cluster["batch"]["scaling"] > 1.3  # the jobs wait: 2 nodes take half as long
        assert {"local_library", "cluster_library", "local_http", "cluster_http"} <= set(cluster["dispatch"])
        assert "several instances: Ray" in proc.stdout
        chaos = results["cluster_chaos"]  # issue 21 item 4: a short churn run in --quick
        assert chaos["jobs_per_minute"] > 0 and chaos["results"] == chaos["jobs_submitted"], chaos
        assert "jobs completed per minute" in proc.stdout


@pytest.mark.timeout(300)
def test_the_queue_latency_benchmark_runs_end_to_end(tmp_path):
    pytest.importorskip("moto")
    proc = subprocess.run([sys.executable, "-m", "benchmarks.queue_latency", "--runs", "3",
                           "--out", str(tmp_path)], cwd=ROOT, capture_output=True, text=True, timeout=290)
    assert proc.returncode == 0, proc.stderr[-2000:]
    results = json.loads((tmp_path / "queue_latency.json").read_text())
    for path in ("http", "queue", "queue_to_store"):
        assert results[path]["n"] == 3 and results[path]["min_ms"] > 0
    assert "a queued job costs" in proc.stdout
