"""What a reused worker's restore costs after a trivial job: `python -m benchmarks.reuse_restore`.

This process imports what the template preloads (torch, numpy), freezes its heap as the
template does, and forks a child as the template forks a worker. The child takes its
Baseline, then `--runs` times does what the worker does around an empty job (TMPDIR
and HOME set for it) and restores, timing the whole `Baseline.restore` and, apart, its
native part (`NativeState`: timers, scheduling, fds, C environment, seccomp, threads).
The fingerprint's check (integrity.py) is not included: the pool's `check_ms_mean`
counts both. Prints milliseconds (p50, p90, max) and one JSON line.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import tempfile
import time


def measure(runs: int) -> dict[str, dict[str, float]]:
    """In this (forked) process: take a Baseline, then time `runs` restores."""
    from warm_pool.child.isolation import Baseline

    baseline = Baseline.take()
    job_dir = tempfile.mkdtemp(prefix="bench-restore-")
    whole, native = [], []
    for _ in range(runs):
        os.environ["TMPDIR"], os.environ["HOME"] = job_dir, job_dir
        started = time.perf_counter()
        baseline.restore(job_dir)
        whole.append(time.perf_counter() - started)
    for _ in range(runs):
        started = time.perf_counter()
        baseline.native.stop_timers()
        baseline.native.restore()
        native.append(time.perf_counter() - started)
    os.rmdir(job_dir)
    return {"restore": _summary(whole), "native_part": _summary(native)}


def _summary(seconds: list[float]) -> dict[str, float]:
    ms = sorted(s * 1000 for s in seconds)
    return {"p50_ms": round(statistics.median(ms), 3), "p90_ms": round(ms[int(len(ms) * 0.9)], 3),
            "max_ms": round(ms[-1], 3)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=200)
    args = parser.parse_args()
    import numpy  # noqa: F401 - preloaded by the template
    import torch  # noqa: F401

    gc.collect()
    gc.freeze()
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(read_end)
        try:
            out = json.dumps(measure(args.runs))
        except BaseException as exc:  # noqa: BLE001 - reported by the parent
            out = json.dumps({"error": repr(exc)})
        os.write(write_end, out.encode())
        os._exit(0)
    os.close(write_end)
    with os.fdopen(read_end, "rb") as f:
        result = json.loads(f.read())
    os.waitpid(pid, 0)
    if "error" in result:
        raise SystemExit(result["error"])
    for name, s in result.items():
        print(f"{name:12} p50 {s['p50_ms']:.3f} ms   p90 {s['p90_ms']:.3f} ms   max {s['max_ms']:.3f} ms")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
