"""Statistics, the machine, the stdout table, the JSON file and the plot."""

from __future__ import annotations

import datetime as _dt
import json
import math
import os
import platform
import statistics
import threading
import time
from collections.abc import Callable
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any


def summarize(samples: list[float]) -> dict[str, Any]:
    """min / p50 / p95 / mean / max of samples in seconds, reported in milliseconds."""
    if not samples:
        return {"n": 0}
    ms = sorted(s * 1000.0 for s in samples)
    return {"n": len(ms), "min_ms": round(ms[0], 3), "p50_ms": round(_pct(ms, 50), 3),
            "p95_ms": round(_pct(ms, 95), 3), "mean_ms": round(statistics.fmean(ms), 3),
            "max_ms": round(ms[-1], 3)}


def run_clients(clients: int, max_jobs: int, max_seconds: float,
                session: Callable[[], AbstractContextManager[Callable[[], None]]]) -> dict[str, Any]:
    """Jobs per second with `clients` threads, each running jobs in a loop until it has
    done its share of max_jobs or max_seconds are up. `session()` gives each thread its
    job function (and whatever it holds open, e.g. a connection, for as long as it runs).
    """
    done = [0] * clients
    errors: list[str] = []
    stop_at = time.perf_counter() + max_seconds
    per_client = max(1, max_jobs // clients)

    def client(i: int) -> None:
        try:
            with session() as job:
                while done[i] < per_client and time.perf_counter() < stop_at:
                    job()
                    done[i] += 1
        except Exception as exc:  # noqa: BLE001 - reported in the results, not raised
            errors.append(str(exc)[:300])

    start = time.perf_counter()
    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    elapsed = time.perf_counter() - start
    out: dict[str, Any] = {"clients": clients, "jobs": sum(done), "seconds": round(elapsed, 3),
                           "jobs_per_s": round(sum(done) / elapsed, 1)}
    if errors:
        out["errors"] = errors[:3]
    return out


def _pct(sorted_ms: list[float], pct: float) -> float:
    """Linear-interpolated percentile of an already sorted list."""
    if len(sorted_ms) == 1:
        return sorted_ms[0]
    rank = (len(sorted_ms) - 1) * pct / 100.0
    lo, hi = math.floor(rank), math.ceil(rank)
    return sorted_ms[lo] + (sorted_ms[hi] - sorted_ms[lo]) * (rank - lo)


def ratio(cold: float | None, warm: float | None) -> float | None:
    """cold ÷ warm, rounded; None when either is missing or warm is zero."""
    if not cold or not warm:
        return None
    return round(cold / warm, 1)


def machine() -> dict[str, Any]:
    """CPU model, cores, memory, OS and the versions that matter."""
    info: dict[str, Any] = {
        "date_utc": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "cpu_model": _cpu_model(), "logical_cores": os.cpu_count(),
        "os": platform.platform(), "python": platform.python_version(),
        # The machine may be shared: other load competes with both cold and warm runs.
        "load_avg_start": load_avg(),
    }
    try:
        import psutil

        info["physical_cores"] = psutil.cpu_count(logical=False)
        info["memory_gb"] = round(psutil.virtual_memory().total / 2**30, 1)
    except ImportError:
        pass
    from importlib import metadata

    for dist in ("torch", "torch-xla", "psutil", "waitress", "flask"):
        try:
            info[f"{dist}_version"] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            info[f"{dist}_version"] = None
    return info


def load_avg() -> list[float] | None:
    """1, 5 and 15 minute load averages (None where the OS has none)."""
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def write_json(results: dict[str, Any], path: Path) -> None:
    """Write every figure to `path` (pretty, stable key order)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")


def plot(results: dict[str, Any], path: Path) -> str | None:
    """Cold vs warm p50 latency per workload on a log scale; a note if matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib is not installed: no plot (pip install matplotlib to get one)"
    labels, cold, lib, http = [], [], [], []
    for backend, section in results["backends"].items():
        for name, row in section["latency"].items():
            labels.append(f"{backend}\n{name}")
            cold.append(row["cold"].get("p50_ms") or float("nan"))
            lib.append(row["warm_library"].get("p50_ms") or float("nan"))
            http.append(row.get("warm_http", {}).get("p50_ms") or float("nan"))
        labels.append(f"{backend}\nbatch of {section['batch']['size']}")
        cold.append((section["batch"].get("cold_s") or float("nan")) * 1000)
        lib.append(float("nan"))
        http.append((section["batch"].get("warm_http_s") or float("nan")) * 1000)
    fig, ax = plt.subplots(figsize=(max(6, 1.3 * len(labels)), 4.5))
    width = 0.27
    xs = range(len(labels))
    ax.bar([x - width for x in xs], cold, width, label="cold: python main.py")
    ax.bar(list(xs), http, width, label="warm: POST /execute(_batch)")
    ax.bar([x + width for x in xs], lib, width, label="warm: library submit")
    ax.set_yscale("log")
    ax.set_ylabel("p50 wall time, batch: one wall time (ms, log)")
    ax.set_xticks(list(xs))
    ax.set_xticklabels(labels, fontsize=8)
    m = results["machine"]
    ax.set_title(f"Cold vs warm — {m['cpu_model']}, {m['logical_cores']} cores, {m['date_utc'][:10]}",
                 fontsize=9)
    ax.legend(fontsize=8)
    ax.grid(axis="y", which="both", alpha=0.3)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return None
