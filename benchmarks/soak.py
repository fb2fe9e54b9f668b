"""Hostile jobs against the real service for a while: does anything a job does make it wait?

For `seconds`, one client keeps hostile jobs coming (benchmarks.workloads.HOSTILE in
turn: a message left half-sent, megabyte METRICS lines, 50,000 directories, a 4 MB
line), one at a time, on the pool's first slot; a second client runs a control job again
and again (a sleep past a 2 s timeout) on the other; a third asks for GET /health every
50 ms. The figures: the worst /health latency, and the worst timeout overshoot (how long
past its 2 s deadline a control job's process still ran, by its `execution_time`). The
goal (issue 22) is ≤ 0.5 s for both, whatever the hostile jobs do.

    python -m benchmarks.soak [--seconds 60] [--backend cpu]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import threading
import time
from itertools import cycle
from pathlib import Path
from typing import Any

from benchmarks.service import Service
from benchmarks.workloads import HOSTILE

CONTROL_TIMEOUT_S = 2.0
CONTROL = "import time\ntime.sleep(60)\n"
GOAL_S = 0.5


def soak(backend: str, work_dir: Path, seconds: float) -> dict[str, Any]:
    """Run the soak; return its figures (and what the hostile jobs ended as)."""
    out: dict[str, Any] = {"seconds": seconds, "health_s": [], "overshoot_s": [], "hostile": {},
                           "control_errors": []}
    stop = threading.Event()
    with Service(backend, work_dir, pool_size=2, args=("--message-timeout", "2")) as svc:
        threads = [threading.Thread(target=fn, args=(svc, stop, out), daemon=True)
                   for fn in (_hostile, _control, _health)]
        for thread in threads:
            thread.start()
        time.sleep(seconds)
        stop.set()
        for thread in threads:
            thread.join(timeout=120)
    health, overshoot = out.pop("health_s"), out.pop("overshoot_s")
    out["health_requests"] = len(health)
    out["health_worst_s"] = round(max(health), 4) if health else None
    out["control_jobs"] = len(overshoot)
    out["timeout_overshoot_worst_s"] = round(max(overshoot), 4) if overshoot else None
    out["goal_s"] = GOAL_S
    return out


def _hostile(svc: Service, stop: threading.Event, out: dict[str, Any]) -> None:
    for name in cycle(sorted(HOSTILE)):
        if stop.is_set():
            return
        status, body = svc.request("POST", "/execute", {"paper_id": f"hostile-{name}", "code": HOSTILE[name],
                                                        "timeout": 30})
        ended = (body or {}).get("error_type") or "ok" if status == 200 else f"http {status}"
        counts = out["hostile"].setdefault(name, {})
        counts[ended] = counts.get(ended, 0) + 1


def _control(svc: Service, stop: threading.Event, out: dict[str, Any]) -> None:
    while not stop.is_set():
        status, body = svc.request("POST", "/execute", {"paper_id": "control", "code": CONTROL,
                                                        "timeout": CONTROL_TIMEOUT_S})
        if status != 200 or body.get("error_type") != "timeout":
            out["control_errors"].append(f"{status} {str(body)[:200]}")
            continue
        out["overshoot_s"].append(max(0.0, body["execution_time"] - CONTROL_TIMEOUT_S))


def _health(svc: Service, stop: threading.Event, out: dict[str, Any]) -> None:
    while not stop.is_set():
        started = time.perf_counter()
        svc.request("GET", "/health")
        out["health_s"].append(time.perf_counter() - started)
        time.sleep(0.05)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.soak", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=60.0)
    parser.add_argument("--backend", default="cpu")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="soak-", dir="/var/tmp") as tmp:
        Path(tmp).chmod(0o755)
        print(json.dumps(soak(args.backend, Path(tmp) / "work", args.seconds), indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
