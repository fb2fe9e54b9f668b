"""The cold path: what the original service did for every script.

Each run writes the script to a fresh temporary directory and runs `python main.py`
there with the venv's interpreter, so every run pays for interpreter start-up and for
importing torch (and torch_xla) again. A batch is those runs one after another.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time


def cold_env(backend: str) -> dict[str, str]:
    """The environment a cold script runs with, as the pool gives jobs theirs: no display
    for matplotlib, the shipped job helpers (dataset_loader) on PYTHONPATH; xla runs on
    the CPU PJRT device here."""
    from warm_pool import JOB_HELPERS_DIR

    env = dict(os.environ)
    env["MPLBACKEND"] = "Agg"
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(JOB_HELPERS_DIR), env.get("PYTHONPATH")) if p)
    if backend == "xla":
        env.setdefault("PJRT_DEVICE", "CPU")
    return env


def run_once(code: str, backend: str, timeout: float = 300.0) -> float:
    """Run `code` as a fresh `python main.py`; return its wall time (s). Raises if it fails."""
    with tempfile.TemporaryDirectory(prefix="bench-cold-") as tmp:
        path = os.path.join(tmp, "main.py")
        with open(path, "w", encoding="utf-8") as f:
            f.write(code)
        start = time.perf_counter()
        proc = subprocess.run([sys.executable, "main.py"], cwd=tmp, env=cold_env(backend),
                              capture_output=True, text=True, timeout=timeout)
        elapsed = time.perf_counter() - start
    if proc.returncode != 0:
        raise RuntimeError(f"cold script exited {proc.returncode}: {proc.stderr.strip()[-500:]}")
    return elapsed


def latencies(code: str, backend: str, runs: int) -> list[float]:
    """Wall times of `runs` cold runs of one script."""
    return [run_once(code, backend) for _ in range(runs)]


def batch_wall(batch: list[dict[str, str]], backend: str) -> float:
    """Wall time of a batch run the cold way: one subprocess after another."""
    start = time.perf_counter()
    for item in batch:
        run_once(item["code"], backend)
    return time.perf_counter() - start
