"""Shared fixtures: real pools with real processes, and a check that none are left."""

from __future__ import annotations

import itertools
import os
import shutil
import subprocess
import sys
import tempfile
import textwrap
import time
import uuid
from pathlib import Path

import psutil
import pytest

from warm_pool import JobSpec, PoolConfig, WarmPool

os.environ.setdefault("PJRT_DEVICE", "CPU")


_BASE = None


def pytest_configure(config):
    """Jobs run under their own uids and must traverse to their dirs, but pytest keeps
    its temporary directories in /tmp/pytest-of-<user>, which it closes (0700) at every
    run. So the suite's temporary directories go below one of ours, open for traversal
    (not listing); several runs at once each get their own."""
    global _BASE
    if config.option.basetemp is None:
        # Not below /tmp: each job process gets a /tmp of its own, which would hide it.
        # Short: socket paths below it must fit 107 bytes.
        _BASE = tempfile.mkdtemp(prefix="te-", dir="/var/tmp")
        os.chmod(_BASE, 0o711)
        config.option.basetemp = os.path.join(_BASE, "t")


def pytest_unconfigure(config):
    if _BASE is not None:
        shutil.rmtree(_BASE, ignore_errors=True)


def reachable_by_jobs(path: Path) -> Path:
    """Open a temporary directory and its parents up to /tmp for traversal by job uids
    (pytest makes each one 0700); create it if needed."""
    path.mkdir(parents=True, exist_ok=True)
    for p in (path, *path.parents):
        if p in (Path(tempfile.gettempdir()), Path("/var/tmp")) or p == p.parent:
            break
        p.chmod(p.stat().st_mode | 0o111)
    return path


def wait_until(predicate, timeout: float = 10.0, interval: float = 0.01):
    """Poll predicate until it returns something truthy; fail the test on timeout."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"condition not met within {timeout} s")


def group_members(pgid: int) -> list[int]:
    """Live processes in a process group (0 members: the group is gone)."""
    members = []
    for p in psutil.process_iter(["pid"]):
        try:
            if os.getpgid(p.pid) == pgid and p.status() != psutil.STATUS_ZOMBIE:
                members.append(p.pid)
        except (OSError, psutil.Error):
            pass
    return members


class PoolHandle:
    """A started pool plus helpers for running code on it."""

    def __init__(self, pool: WarmPool):
        self.pool = pool

    def run(self, code: str, timeout: float | None = 60.0, **kw):
        job_id = kw.pop("job_id", None) or f"t-{uuid.uuid4().hex[:12]}"
        fut = self.pool.submit(JobSpec(code=code, job_id=job_id, timeout=timeout), **kw)
        return fut.result(timeout=(timeout or 60) + 30)

    def idle_workers(self) -> list[dict]:
        return [w for w in self.pool.stats().workers if w["state"] == "idle"]

    def wait_full(self, timeout: float = 60.0) -> None:
        """Wait until every slot has a ready worker and no spare is still starting."""
        def full() -> bool:
            stats = self.pool.stats().to_json()
            return stats["idle"] == stats["size"] and not stats["spares"]["starting"]
        wait_until(full, timeout)


# Each pool (and each test server) gets uids of its own, so that pools of this run, and
# of other runs on the machine, never share one (the pool refuses a uid in use).
_UID_BASES = itertools.count(200_000 + (os.getpid() % 20_000) * 20_000, 32)


def job_uid_base() -> int:
    return next(_UID_BASES)


def start_pool(tmp: Path, **kw) -> PoolHandle:
    kw.setdefault("backend", "cpu")
    kw.setdefault("job_uid_base", job_uid_base())
    kw.setdefault("pool_size", 1)
    kw.setdefault("spares_per_slot", 2)  # fewer forks than the default's 5: the suite is big
    pool = WarmPool(PoolConfig(work_dir=reachable_by_jobs(tmp), **kw)).start()
    assert pool.wait_ready(120), pool.stats().to_json()
    handle = PoolHandle(pool)
    handle.wait_full()
    return handle


def pool_processes(pool: WarmPool) -> list[psutil.Process]:
    """The pool's template and everything below it (the template is the subreaper of its
    workers' orphans, so a job's daemons are below it too)."""
    pid = pool.stats().detail["template_pid"]
    if pid is None:  # not started, or shut down already
        return []
    try:
        root = psutil.Process(pid)
        return [root, *root.children(recursive=True)]
    except (AttributeError, psutil.Error):
        return []


def alive(procs: list[psutil.Process]) -> list[psutil.Process]:
    out = []
    for p in procs:
        try:
            if p.is_running() and p.status() != psutil.STATUS_ZOMBIE:
                out.append(p)
        except psutil.Error:
            pass
    return out


def shutdown_leaving_nothing(pool: WarmPool, grace: float = 5) -> None:
    """Shut the pool down and check that none of its processes outlives it."""
    procs = pool_processes(pool)
    pool.shutdown(grace=grace)
    wait_until(lambda: not alive(procs), timeout=15)


@pytest.fixture
def make_pool(tmp_path):
    """Factory for pools that are shut down (and checked for leftovers) after the test."""
    pools: list[PoolHandle] = []

    def make(**kw) -> PoolHandle:
        handle = start_pool(tmp_path / f"pool{len(pools)}", **kw)
        pools.append(handle)
        return handle

    yield make
    for handle in pools:
        shutdown_leaving_nothing(handle.pool)


@pytest.fixture(scope="module")
def shared_pool(tmp_path_factory):
    """One cpu pool of two workers shared by a module's tests (they must leave it clean)."""
    handle = start_pool(tmp_path_factory.mktemp("shared"), pool_size=2)
    yield handle
    handle.pool.shutdown(grace=5)


def run_cold(code: str, tmp: Path) -> subprocess.CompletedProcess:
    """The reference: `python main.py` in a fresh interpreter, like the original service."""
    job = tmp / "cold"
    job.mkdir(exist_ok=True)
    (job / "main.py").write_text(code)
    return subprocess.run([sys.executable, str(job / "main.py")], cwd=job, capture_output=True, timeout=120,
                          stdin=subprocess.DEVNULL)


# The prelude of a job that must still be running when the test looks: wait_gate()
# returns once the test creates "go" in the job's dir (at most 60 s).
GATE = textwrap.dedent("""
    import os, sys, time
    def wait_gate():
        deadline = time.monotonic() + 60
        while not os.path.exists("go") and time.monotonic() < deadline:
            time.sleep(0.01)
""")


@pytest.fixture(scope="module")
def receiver():
    """A webhook receiver on 127.0.0.1 for the module's tests (webhook_receiver.py)."""
    from webhook_receiver import Receiver

    rec = Receiver()
    yield rec
    rec.close()
