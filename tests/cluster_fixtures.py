"""A Ray cluster, the service on it and its client, all inside a private namespace.

`ClusterNamespace` starts tests/ray_cluster.py as PID 1 of new network, PID and mount
namespaces (`unshare --net --pid --fork --mount-proc --kill-child`): loopback is the only
interface there, so every address Ray picks is loopback and no packet leaves; `ray stop`
sees only the namespace's processes; and when the agent exits (or is killed), the kernel
kills everything left in it. The test talks to the agent over its stdin and stdout (one
JSON command and one JSON answer a line): start the cluster and the service, send HTTP
requests to the service, add or SIGKILL nodes, list processes and listening sockets.

Import with ``from cluster_fixtures import ClusterNamespace, needs_cluster``.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import psutil
import pytest
from service_fixtures import Server

REPO = Path(__file__).resolve().parent.parent
AGENT = REPO / "tests" / "ray_cluster.py"


def _unavailable() -> str | None:
    try:
        import ray  # noqa: F401
    except ImportError:
        return "ray is not installed (requirements-cluster.txt; make test installs it)"
    if os.geteuid() != 0:
        return "a cluster in a private namespace needs root"
    probe = subprocess.run(["unshare", "--net", "--pid", "--fork", "--mount-proc", "true"],
                           capture_output=True)
    if probe.returncode != 0:
        return f"cannot create namespaces here: {probe.stderr.decode(errors='replace').strip()}"
    return None


_REASON = _unavailable()
needs_cluster = pytest.mark.skipif(_REASON is not None, reason=_REASON or "")


class AgentError(RuntimeError):
    """The agent could not do what it was asked (its traceback attached)."""


class HttpAnswer:
    """An answer of the service, as the agent received it inside the namespace."""

    def __init__(self, reply: dict[str, Any]):
        self.status: int = reply["status"]
        self.headers: dict[str, str] = reply["headers"]
        self.json: Any = reply["body"]
        self.seconds: float = reply["seconds"]  # measured inside, next to the service


class ClusterNamespace:
    """One namespace with a head, nodes and the service on them."""

    def __init__(self, root: Path):
        self.root = root
        # Ray's temporary dir holds unix sockets (paths of at most 107 bytes): keep it short.
        # Not below /tmp: a job's /tmp is its own, which would hide Ray's sockets from the
        # test that checks a job cannot open them.
        self.ray_root = Path(tempfile.mkdtemp(prefix="rc-", dir="/var/tmp"))
        self.proc: subprocess.Popen | None = None
        self.pid_ns: int | None = None
        self.info: dict[str, Any] = {}

    def start(self, nodes: int = 2, args: list[str] | None = None, rules: bool = True,
              work_dir: Path | None = None, uid_base: int | None = None) -> ClusterNamespace:
        """Start the namespace, `nodes` nodes and the service (`args` added to its flags)."""
        from conftest import job_uid_base, reachable_by_jobs

        if uid_base is None:  # the 64 uids the rules cover: node pools pick free ranges in them
            uid_base = job_uid_base()
            for _ in range(15):
                job_uid_base()
        self.uid_base = uid_base
        work_dir = work_dir or reachable_by_jobs(self.root / "work")
        self.stderr = open(self.root / "agent.log", "ab")  # noqa: SIM115 - closed in close()
        self.proc = subprocess.Popen(
            ["unshare", "--net", "--pid", "--fork", "--mount-proc", "--kill-child",
             sys.executable, str(AGENT), str(self.ray_root)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.stderr, cwd=REPO,
            env={**os.environ, "PYTHONPATH": str(REPO)}, text=True, bufsize=1)
        try:
            self.pid_ns = self._namespace_of_child()
            self.info = self.call("start", nodes=nodes, work_dir=str(work_dir), uid_base=uid_base,
                                  args=list(args or []), rules=rules)
        except BaseException:
            self.close(check=False)
            raise
        return self

    def _namespace_of_child(self) -> int:
        """The PID namespace of the agent (unshare's child), to find leftovers later."""
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            for child in psutil.Process(self.proc.pid).children():
                try:
                    return os.stat(f"/proc/{child.pid}/ns/pid").st_ino
                except OSError:
                    pass
            time.sleep(0.01)
        raise RuntimeError("the namespace's agent did not start")

    # --- talking to the agent ---------------------------------------------------------

    def call(self, op: str, **args: Any) -> Any:
        """Send one command; its value, or AgentError with the agent's traceback."""
        self.proc.stdin.write(json.dumps({"op": op, **args}) + "\n")
        self.proc.stdin.flush()
        while True:
            line = self.proc.stdout.readline()
            if not line:
                raise AgentError(f"the agent exited during {op}: {self.logs_tail()}")
            if line.startswith("{"):
                break
        reply = json.loads(line)
        if not reply["ok"]:
            raise AgentError(f"{op}: {reply['error']}\n{reply['traceback']}\n{self.logs_tail()}")
        return reply["value"]

    def request(self, method: str, path: str, body: Any = None, **kw: Any) -> HttpAnswer:
        return HttpAnswer(self.call("http", method=method, path=path, body=body, **kw))

    def get(self, path: str, **kw: Any) -> HttpAnswer:
        return self.request("GET", path, **kw)

    def post(self, path: str, body: Any = None, **kw: Any) -> HttpAnswer:
        return self.request("POST", path, body, **kw)

    # The same polling as for a service outside the namespace (it needs only get().json).
    wait_batch = Server.wait_batch

    def health(self, verbose: bool = True) -> dict[str, Any]:
        return self.get("/health?verbose=1" if verbose else "/health").json

    def ready_nodes(self) -> list[dict[str, Any]]:
        """The nodes whose pool has every worker idle or busy (none starting)."""
        cluster = self.health().get("cluster") or {}
        return [n for n in cluster.get("nodes", []) if n["alive"] and n["pool"]
                and n["pool"]["size"] and n["pool"]["idle"] + n["pool"]["busy"] == n["pool"]["size"]]

    def wait_nodes(self, count: int, timeout: float = 90) -> list[dict[str, Any]]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            nodes = self.ready_nodes()
            if len(nodes) == count:
                return nodes
            time.sleep(0.2)
        raise AssertionError(f"not {count} ready nodes in {timeout}s: {self.health()}")

    def logs_tail(self) -> str:
        try:
            return (self.root / "agent.log").read_text(errors="replace")[-3000:]
        except OSError:
            return ""

    # --- teardown ---------------------------------------------------------------------

    def leftovers(self) -> list[int]:
        """Processes of the namespace still alive on this machine."""
        left = []
        for pid in psutil.pids():
            try:
                if os.stat(f"/proc/{pid}/ns/pid").st_ino == self.pid_ns:
                    left.append(pid)
            except OSError:
                pass
        return left

    def close(self, check: bool = True) -> None:
        """Stop the service and Ray, let the agent exit (the kernel kills what is left in
        the namespace), and check that no process of it remains."""
        try:
            if self.proc is not None and self.proc.poll() is None:
                try:
                    self.call("stop")
                except (AgentError, OSError, ValueError):
                    pass
                try:
                    self.proc.wait(30)
                except subprocess.TimeoutExpired:
                    self.proc.kill()  # --kill-child: the agent, PID 1, dies and the namespace with it
                    self.proc.wait(10)
            if self.pid_ns is not None:
                deadline = time.monotonic() + 15
                while self.leftovers() and time.monotonic() < deadline:
                    time.sleep(0.1)
                if check:
                    assert not self.leftovers(), f"processes of the namespace left: {self.leftovers()}"
        finally:
            if hasattr(self, "stderr"):
                self.stderr.close()
            # Ray's own logs (GCS, raylets, workers: a few hundred KB) stay with the test's
            # files, where pytest keeps the last runs' (for reading a failure after it).
            with contextlib.suppress(OSError):  # shutil.Error too: none if Ray never started
                shutil.copytree(self.ray_root / "r" / "ray", self.root / "ray-logs", dirs_exist_ok=True,
                                ignore=shutil.ignore_patterns("*.sock", "sockets", "runtime_resources"),
                                symlinks=True)
            shutil.rmtree(self.ray_root, ignore_errors=True)
