"""Chaos on one instance (issue 21 item 0): jobs under load while the pool's processes are
SIGKILLed from outside. Does every job get exactly one result, and how soon is the pool
whole again?

For `seconds`, four clients send mixed batches (ok, a tiny train loop, raise, a
segfault, a hang past a short timeout, a memory bomb over --max-memory-mb, a sleep), by
POST /jobs (then polling the batch) or POST /execute_batch, one batch at a time each.
Another thread SIGKILLs a process of the pool every 1-2 s, its pid read from
/health?verbose=1. Of every 10 kills, in a random order, two hit the template, one its
standby (the fork that takes over when it dies), three a worker while it starts (one
starts after every job: watched for), four any worker. A pid is checked (its parent is
the template, or the service for the template) through a pidfd before the signal is
sent, so a recycled pid is never hit.

After the last kill it measures the time until the pool is whole again (/health 200,
state ready, every slot with a ready spare; goal ≤ 10 s), then waits for the clients'
last batches and checks every job id submitted: terminal (GET /jobs/<id>), the same
result a synchronous request was answered with, and as many results counted by the
service (/metrics) as jobs submitted. The caller stops the service and looks for
leftovers (`leftovers`).

    python -m benchmarks.chaos [--seconds 60] [--backend cpu]
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import random
import signal
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import psutil

from warm_pool import usage

GOAL_S = 10.0
CLIENTS = 4
KILL_EVERY_S = (1.0, 2.0)
# What each 10 kills aim at, in a random order: the template, its standby (the fork that
# takes over when it dies), a worker while it starts, any worker.
AIMS = ("template",) * 2 + ("standby",) + ("starting",) * 3 + ("any",) * 4
MAX_MEMORY_MB = 256
JOB_TIMEOUT_S = 3.0          # the hang ends here (the other jobs take well under a second)
DRAIN_TIMEOUT_S = 120.0      # the clients' last batches, after the kills stopped
TERMINAL = ("completed", "cancelled", "interrupted")

JOBS = {
    "ok": "print('ok')\n",
    "train": ("import torch\ntorch.manual_seed(0)\nx, y = torch.randn(64, 8), torch.randn(64, 1)\n"
              "model = torch.nn.Linear(8, 1)\nopt = torch.optim.SGD(model.parameters(), lr=0.1)\n"
              "for step in range(20):\n    opt.zero_grad()\n"
              "    loss = torch.nn.functional.mse_loss(model(x), y)\n    loss.backward()\n    opt.step()\n"
              "print(f'METRICS: {{\"training_loss\": {loss.item():.4f}}}')\n"),
    "raise": "raise RuntimeError('chaos')\n",
    "segfault": "import os, signal\nos.kill(os.getpid(), signal.SIGSEGV)\n",
    "hang": "import time\ntime.sleep(3600)\n",
    "memory_bomb": ("b = bytearray(2 * 256 * 1024 * 1024)\nb[::4096] = b'x' * len(b[::4096])\n"
                    "import time\ntime.sleep(30)\n"),
    "sleep": "import time\ntime.sleep(0.5)\nprint('slept')\n",
}
# What each job ends as when no kill touches it.
EXPECTED = {"ok": None, "train": None, "raise": "exception", "segfault": "signal", "hang": "timeout",
            "memory_bomb": "memory_limit", "sleep": None}


class Http:
    """One persistent connection to the service (a client thread's own)."""

    def __init__(self, port: int):
        self.port = port
        self.conn: http.client.HTTPConnection | None = None

    def request(self, method: str, path: str, body: Any = None) -> tuple[int, Any]:
        """(status, JSON body); a connection error is status 0."""
        data = None if body is None else json.dumps(body).encode()
        headers = {"Content-Type": "application/json"} if data is not None else {}
        for _ in range(2):  # a kept-alive connection the server closed: once more, afresh
            if self.conn is None:
                self.conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=120)
            try:
                self.conn.request(method, path, body=data, headers=headers)
                resp = self.conn.getresponse()
                raw = resp.read()
                text = raw.decode(errors="replace")
                return resp.status, (json.loads(raw) if raw and text.lstrip()[:1] in "{[" else text)
            except (OSError, http.client.HTTPException):
                self.conn.close()
                self.conn = None
        return 0, None


class Chaos:
    """One run against a live service on 127.0.0.1:`port` whose process is `service_pid`."""

    def __init__(self, port: int, service_pid: int, seconds: float, seed: int | None = None):
        self.port, self.service_pid, self.seconds = port, service_pid, seconds
        self.seed = random.randrange(1 << 30) if seed is None else seed
        self.stop = threading.Event()
        self.lock = threading.Lock()
        self.submitted: dict[str, str] = {}        # job id → kind
        self.answered: dict[str, dict] = {}        # job id → the result a request was answered with
        self.refused: dict[str, int] = {}          # why a request was refused → how often
        self.kills: list[dict[str, Any]] = []
        self.templates: list[psutil.Process] = []  # every template seen, checked after the stop
        self.errors: list[str] = []
        self.t0 = 0.0

    def run(self) -> dict[str, Any]:
        """Load and kills for `seconds`; then recovery, the clients' last batches, the check."""
        started = self.t0 = time.monotonic()
        clients = [threading.Thread(target=self._client, args=(i,), daemon=True) for i in range(CLIENTS)]
        killer = threading.Thread(target=self._killer, daemon=True)
        for thread in (*clients, killer):
            thread.start()
        killer.join(self.seconds + 30)
        recovery = self._recovery()
        self.stop.set()
        for thread in clients:
            thread.join(DRAIN_TIMEOUT_S)
        if any(t.is_alive() for t in clients):
            self.errors.append(f"a client still waited for its batch {DRAIN_TIMEOUT_S:g} s after the kills")
        return self._figures(recovery, time.monotonic() - started)

    # --- the load -----------------------------------------------------------------------

    def _client(self, number: int) -> None:
        rng, http_ = random.Random(self.seed + number), Http(self.port)
        batch_no = 0
        while not self.stop.is_set() and not self._over():
            batch_no += 1
            kinds = [rng.choice(sorted(JOBS)) for _ in range(rng.randint(2, 5))]
            items = [{"paper_id": f"chaos-{number}-{batch_no}-{i}-{kind}", "code": JOBS[kind]}
                     for i, kind in enumerate(kinds)]
            body = {"batch": items, "timeout": JOB_TIMEOUT_S}
            if rng.random() < 0.5:
                self._execute_batch(http_, body, kinds)
            else:
                self._submit_and_wait(http_, body, kinds)

    def _execute_batch(self, http_: Http, body: dict, kinds: list[str]) -> None:
        status, answer = http_.request("POST", "/execute_batch", body)
        if status != 200:
            self._refused(status, answer)
            return
        with self.lock:
            for item, kind in zip(body["batch"], kinds, strict=True):
                result = answer["results"][item["paper_id"]]
                self.submitted[result["job_id"]] = kind
                self.answered[result["job_id"]] = result

    def _submit_and_wait(self, http_: Http, body: dict, kinds: list[str]) -> None:
        status, answer = http_.request("POST", "/jobs", body)
        if status != 202:
            self._refused(status, answer)
            return
        with self.lock:
            for item, kind in zip(body["batch"], kinds, strict=True):
                self.submitted[answer["job_ids"][item["paper_id"]]] = kind
        deadline = time.monotonic() + DRAIN_TIMEOUT_S + self.seconds
        while time.monotonic() < deadline:
            status, batch = http_.request("GET", f"/batches/{answer['batch_id']}")
            if status == 200 and batch["status"] == "completed":
                return
            time.sleep(0.1)

    def _refused(self, status: int, answer: Any) -> None:
        why = f"{status} {(answer or {}).get('error', answer) if isinstance(answer, dict) else answer}"
        with self.lock:
            self.refused[why[:120]] = self.refused.get(why[:120], 0) + 1

    def _over(self) -> bool:
        return time.monotonic() - self.t0 > self.seconds

    # --- the kills ----------------------------------------------------------------------

    def _killer(self) -> None:
        rng, http_ = random.Random(self.seed - 1), Http(self.port)
        aims: list[str] = []
        while True:
            time.sleep(rng.uniform(*KILL_EVERY_S))
            if self._over():
                return
            if not aims:
                aims = rng.sample(AIMS, len(AIMS))
            target = aims.pop()
            victim = self._pick(http_, rng, target)
            if victim is not None and _kill_child(victim[0], victim[1]):
                with self.lock:
                    self.kills.append({"what": victim[2], "pid": victim[0], "at": time.monotonic()})

    def _pick(self, http_: Http, rng: random.Random, target: str) -> tuple[int, tuple, str] | None:
        """(pid, its possible parents, what) of a process to kill: the template, a worker that is
        starting (a spare starts after every job: watched for up to 1.5 s), or any worker."""
        deadline = time.monotonic() + (1.5 if target == "starting" else 0)
        while True:
            _, pool = self._health(http_)
            template, standby = pool.get("template_pid"), pool.get("standby_template_pid")
            workers = [w for w in pool.get("workers", []) if w.get("pid")]
            starting = [w for w in workers if w.get("state") == "starting"]
            if target == "standby":
                return (standby, (template,), "standby template") if standby and template else None
            if target == "template":
                # Forked by the service, or a standby that took over (its parent died: init).
                return (template, (self.service_pid, 1), "template") if template else None
            if starting or (workers and (target != "starting" or time.monotonic() > deadline)):
                worker = rng.choice(starting if target == "starting" and starting else workers)
                return worker["pid"], (template,), f"worker ({worker['state']})"
            if time.monotonic() > deadline:
                return None
            time.sleep(0.005)

    def _health(self, http_: Http) -> tuple[int, dict[str, Any]]:
        """GET /health?verbose=1: its status and pool. Keeps a handle on every template and
        standby seen (none may outlive the service); a broken pool is an error of the run."""
        status, health = http_.request("GET", "/health?verbose=1")
        pool = health.get("pool", {}) if isinstance(health, dict) else {}
        for pid in (pool.get("template_pid"), pool.get("standby_template_pid")):
            if pid and all(p.pid != pid for p in self.templates):
                try:
                    self.templates.append(psutil.Process(pid))
                except psutil.NoSuchProcess:
                    pass
        if pool.get("state") == "broken":
            with self.lock:
                self.errors.append(f"the pool said it was broken: {str(pool.get('broken_reason'))[:300]}")
        return status, pool

    def _recovery(self) -> float | None:
        """Seconds from the last kill until the pool is whole again (None: not in 60 s)."""
        with self.lock:
            last = self.kills[-1] if self.kills else None
        if last is None:
            return None
        http_ = Http(self.port)
        seen_gone = False
        while time.monotonic() - last["at"] < 60:
            status, pool = self._health(http_)
            pids = {w.get("pid") for w in pool.get("workers", [])} | {
                pool.get("template_pid"), pool.get("standby_template_pid")}
            seen_gone = seen_gone or last["pid"] not in pids  # the kill has been noticed
            if seen_gone and status == 200 and _whole(pool):
                return round(time.monotonic() - last["at"], 3)
            time.sleep(0.02)
        return None

    # --- the check ----------------------------------------------------------------------

    def _figures(self, recovery: float | None, wall: float) -> dict[str, Any]:
        http_ = Http(self.port)
        with self.lock:
            submitted, answered = dict(self.submitted), dict(self.answered)
        outcomes: dict[str, dict[str, int]] = {}
        lost, differing, internal = [], [], []
        for job_id, kind in submitted.items():
            status, job = http_.request("GET", f"/jobs/{job_id}")
            if status != 200 or not isinstance(job, dict) or job.get("status") not in TERMINAL:
                shown = job.get("status") if isinstance(job, dict) else job
                lost.append(f"{job_id} ({kind}): {status} {shown}")
                continue
            ended = job.get("error_type") or "ok"
            outcomes.setdefault(kind, {})[ended] = outcomes.setdefault(kind, {}).get(ended, 0) + 1
            if ended == "internal":
                internal.append(f"{job_id} ({kind}): {job.get('error_message')}")
            if job_id in answered and _result_key(answered[job_id]) != _result_key(job):
                differing.append(job_id)
        kills = {}
        for k in self.kills:
            kills[k["what"]] = kills.get(k["what"], 0) + 1
        return {"seconds": self.seconds, "seed": self.seed, "wall_s": round(wall, 1), "clients": CLIENTS,
                "jobs_submitted": len(submitted), "results": len(submitted) - len(lost),
                "results_counted_by_service": _finished_count(http_),
                "lost": lost[:20], "lost_count": len(lost), "differing": differing[:20],
                "internal": internal[:20], "refused": dict(self.refused), "outcomes": outcomes,
                "kills": len(self.kills), "kills_by_target": kills, "recovery_s": recovery,
                "goal_s": GOAL_S, "errors": self.errors}


def _whole(pool: dict[str, Any]) -> bool:
    """Ready, and every slot has a ready spare."""
    ready_slots = {w.get("slot") for w in pool.get("workers", []) if w.get("state") == "idle"}
    return pool.get("state") == "ready" and len(ready_slots) >= (pool.get("size") or 1)


def _kill_child(pid: int, parents: tuple[int | None, ...]) -> bool:
    """SIGKILL `pid` if it is a child of one of `parents` and runs the pool's code, through
    a pidfd: a pid recycled by another process in between is never signalled."""
    try:
        fd = os.pidfd_open(pid)
    except OSError:
        return False
    try:
        ppid = usage.parent_pid(pid)
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            ours = b"warm_pool.child.template" in f.read()  # workers are forks of a template
        if ppid is None or ppid not in parents or not ours:
            return False
        signal.pidfd_send_signal(fd, signal.SIGKILL)
        return True
    except (OSError, ValueError, IndexError):
        return False
    finally:
        os.close(fd)


def _result_key(result: dict[str, Any]) -> tuple:
    return tuple(result.get(k) for k in ("job_id", "status", "error_type", "return_code", "finished_at"))


def _finished_count(http_: Http) -> int | None:
    status, text = http_.request("GET", "/metrics")
    if status != 200 or not isinstance(text, str):
        return None
    return int(sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
                   if line.startswith("executor_jobs_finished_total{")))


def leftovers(uid_base: int, templates: list[psutil.Process], uids: int = 32) -> list[str]:
    """Processes left after the service stopped: any of the job uids, any template seen."""
    left = []
    for proc in psutil.process_iter(["pid", "uids", "name"]):
        try:
            if uid_base <= proc.info["uids"].real < uid_base + uids:
                left.append(f"{proc.info['pid']} {proc.info['name']} uid {proc.info['uids'].real}")
        except (psutil.Error, AttributeError):
            pass
    for proc in templates:
        try:
            if proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE:
                left.append(f"{proc.pid} template")
        except psutil.Error:
            pass
    return left


def chaos(backend: str, work_dir: Path, seconds: float) -> dict[str, Any]:
    """The benchmark: a service of 2 workers under chaos for `seconds`; its figures."""
    from benchmarks.service import Service

    svc = Service(backend, work_dir, pool_size=2, args=("--max-memory-mb", str(MAX_MEMORY_MB)))
    with svc:
        run = Chaos(svc.port, svc.proc.pid, seconds)
        figures = run.run()
    figures["leftovers"] = leftovers(svc.uid_base, run.templates)
    return figures


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.chaos", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=60.0)
    parser.add_argument("--backend", default="cpu")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="chaos-", dir="/var/tmp") as tmp:
        Path(tmp).chmod(0o755)
        print(json.dumps(chaos(args.backend, Path(tmp) / "work", args.seconds), indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
