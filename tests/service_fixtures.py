"""Helpers and fixtures for the HTTP service tests: a real server process on 127.0.0.1
with a real pool (cpu backend, 2 workers, a temp work dir), a small HTTP helper, and a
validator of responses against executor_service/openapi.yaml.

Import the fixtures into a test module with
``from service_fixtures import openapi, server  # noqa: F401`` (tests/ is on sys.path:
it has no __init__.py, so pytest puts the directory itself there).
"""

from __future__ import annotations

import http.client
import json
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil
import pytest

REPO = Path(__file__).resolve().parent.parent
OPENAPI = REPO / "executor_service" / "openapi.yaml"
START_TIMEOUT_S = 60


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Response:
    status: int
    headers: dict[str, str]
    raw: bytes

    @property
    def json(self) -> Any:
        return json.loads(self.raw)


class Server:
    """`python -m executor_service serve` as a child process, with a tiny HTTP client."""

    def __init__(self, work_dir: Path, args: list[str] | None = None, env: dict[str, str] | None = None,
                 token: str | None = None):
        self.work_dir = work_dir
        self.args = args or []
        self.extra_env = env or {}
        self.token = token
        self.port = free_port()
        from conftest import job_uid_base

        self.uid_base = job_uid_base()
        self.command_prefix: list[str] = []  # e.g. to run the service as another user
        self.proc: subprocess.Popen | None = None
        self.log_path = work_dir.parent / f"server-{self.port}.log"

    # process -----------------------------------------------------------------------

    def start(self, wait: bool = True) -> Server:
        env = {k: v for k, v in os.environ.items() if not k.startswith("EXECUTOR_")}
        # Never the real instance metadata service, even on a test machine that is an EC2
        # instance: a test that wants the Spot watcher passes its own fake's endpoint.
        env["EXECUTOR_SPOT_WATCH"] = "off"
        env.update(self.extra_env)
        env["PYTHONPATH"] = str(REPO)
        cmd = [*self.command_prefix, sys.executable, "-m", "executor_service", "serve", "--host", "127.0.0.1",
               "--port", str(self.port), "--backend", "cpu", "--pool-size", "2",
               "--work-dir", str(self.work_dir), "--shutdown-grace", "5",
               "--job-uid-base", str(self.uid_base), "--spares-per-slot", "2", *self.args]
        self.log = open(self.log_path, "ab")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=self.log, stderr=self.log)
        if wait:
            self.wait_healthy()
        return self

    def wait_healthy(self, timeout: float = START_TIMEOUT_S) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited {self.proc.returncode}:\n{self.read_log()}")
            try:
                if self.get("/health").status == 200:
                    return
            except OSError:
                pass
            time.sleep(0.1)
        raise RuntimeError(f"server not healthy after {timeout}s:\n{self.read_log()}")

    def read_log(self, tail: int | None = 5000) -> str:
        """The server's output (stdout and stderr), its last `tail` characters."""
        try:
            text = self.log_path.read_text(errors="replace")
            return text[-tail:] if tail else text
        except OSError:
            return ""

    def descendants(self) -> list[psutil.Process]:
        try:
            return psutil.Process(self.proc.pid).children(recursive=True)
        except psutil.NoSuchProcess:
            return []

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30) -> int | None:
        """Send `sig` and wait for the exit; returns the exit status."""
        if self.proc is None or self.proc.poll() is not None:
            return self.proc.returncode if self.proc else None
        self.proc.send_signal(sig)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill_tree()
            raise
        finally:
            self.log.close()

    def close(self) -> None:
        """Stop gracefully (SIGTERM), and in any case leave no process of it behind."""
        try:
            self.stop()
        finally:
            self.kill_tree()

    def kill_tree(self) -> None:
        """SIGKILL the server and everything under it (its pool's template and workers)."""
        procs = self.descendants()
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        for p in procs:
            try:
                p.kill()
            except psutil.NoSuchProcess:
                pass
        psutil.wait_procs(procs, timeout=10)

    # HTTP ----------------------------------------------------------------------------

    def request(self, method: str, path: str, body: Any = None, *, raw: bytes | None = None,
                headers: dict[str, str] | None = None, token: str | None | bool = True,
                timeout: float = 120) -> Response:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=timeout)
        hdrs = dict(headers or {})
        data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
        if data is not None:
            hdrs.setdefault("Content-Type", "application/json")
        use = self.token if token is True else (token or None)
        if use:
            hdrs["Authorization"] = f"Bearer {use}"
        try:
            conn.request(method, path, body=data, headers=hdrs)
            resp = conn.getresponse()
            return Response(resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read())
        finally:
            conn.close()

    def get(self, path: str, **kw) -> Response:
        return self.request("GET", path, **kw)

    def post(self, path: str, body: Any = None, **kw) -> Response:
        return self.request("POST", path, body, **kw)

    def wait_batch(self, batch_id: str, timeout: float = 60) -> dict:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            body = self.get(f"/batches/{batch_id}").json
            if body["status"] == "completed":
                return body
            time.sleep(0.1)
        raise AssertionError(f"batch {batch_id} not completed in {timeout}s: {body}")

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"


class OpenApi:
    """Validates real responses against the schemas that openapi.yaml declares."""

    def __init__(self, path: Path = OPENAPI):
        import yaml

        self.doc = yaml.safe_load(path.read_text())

    def schema_for(self, method: str, template: str, status: int) -> dict | None:
        op = self.doc["paths"][template][method.lower()]
        resp = op["responses"].get(str(status))
        assert resp is not None, f"{method} {template} does not document status {status}"
        if "$ref" in resp:
            resp = self.doc["components"]["responses"][resp["$ref"].rsplit("/", 1)[1]]
        content = resp.get("content", {}).get("application/json")
        return content["schema"] if content else None

    def validate(self, method: str, template: str, response: Response) -> None:
        """Raise jsonschema.ValidationError when the response does not match the spec."""
        import jsonschema

        schema = self.schema_for(method, template, response.status)
        if schema is None:
            return
        root = {k: v for k, v in self.doc.items() if k != "paths"}
        root.update(schema)
        jsonschema.Draft202012Validator(root).validate(response.json)


def start_server(tmp_path_factory, name: str, **kw) -> Server:
    """A started server whose every worker is ready (healthy needs only one)."""
    from conftest import reachable_by_jobs, wait_until

    work = reachable_by_jobs(tmp_path_factory.mktemp(name) / "work")
    srv = Server(work, **kw).start()
    try:
        wait_until(lambda: (lambda p: p["idle"] == p["size"])(srv.get("/health").json["pool"]),
                   timeout=START_TIMEOUT_S, interval=0.05)
    except BaseException:
        srv.close()
        raise
    return srv


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """One unauthenticated server per test module, jobs limited to 1 GiB of memory."""
    srv = start_server(tmp_path_factory, "svc", args=["--max-memory-mb", "1024"])
    yield srv
    srv.close()


@pytest.fixture(scope="session")
def openapi() -> OpenApi:
    return OpenApi()
