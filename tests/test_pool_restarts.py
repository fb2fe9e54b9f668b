"""A pool never gives up for good (issue 21 item 0): starts killed from outside never make
it broken; starts that fail do, and it keeps trying and comes back by itself.

The first tests drive restarts.Restarts on a clock of their own (no processes, no
sleeps); the others kill and break real pools.
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import psutil
import pytest
from conftest import job_uid_base, reachable_by_jobs, shutdown_leaving_nothing, wait_until

from warm_pool import Condition, JobSpec, PoolConfig, WarmPool, errors
from warm_pool.restarts import (
    BROKEN_MAX_WAIT_S,
    FAILED_MAX_WAIT_S,
    KILLED_MAX_WAIT_S,
    Restarts,
    killed_from_outside,
)

pytestmark = pytest.mark.timeout(180)


# --- what counts, and how long to wait (no processes) -----------------------------------

@pytest.mark.parametrize(("return_code", "stop_reason", "killed"), [
    (-signal.SIGKILL, None, True),            # the OOM killer, an operator, a chaos test
    (-signal.SIGTERM, None, True),
    (-signal.SIGKILL, "crashed", True),       # a spare the supervisor did not stop
    (-signal.SIGKILL, "channel_closed", True),
    (None, None, True),                       # it died with its template
    (-signal.SIGSEGV, None, False),           # its own code faulted
    (-signal.SIGABRT, None, False),
    (1, None, False),                         # it exited: something in it failed
    (0, None, False),
    (3, "start_failed", False),               # it reported WorkerFailed
    (-signal.SIGKILL, "start_failed", False),
    (-signal.SIGKILL, "start_timeout", False),  # the supervisor stopped it for being slow
    (-signal.SIGKILL, "protocol_error", False),
])
def test_a_start_is_killed_from_outside_only_by_a_signal_that_is_not_its_own_fault(
        return_code, stop_reason, killed):
    assert killed_from_outside(return_code, stop_reason) is killed


def _waits(restarts: Restarts, count: int, kind: str) -> list[float]:
    now, waits = 1000.0, []
    for _ in range(count):
        getattr(restarts, kind)("x", now)
        waits.append(restarts.next_mono - now)
        now = restarts.next_mono
    return waits


def test_killed_starts_wait_a_little_and_never_break_the_pool():
    restarts = Restarts(max_failures=1)
    waits = _waits(restarts, 1000, "start_killed")
    assert waits[:5] == [0.25, 0.5, 1.0, 2.0, 2.0] and max(waits) == KILLED_MAX_WAIT_S
    assert not restarts.broken and restarts.killed_total == 1000


def test_failed_starts_wait_longer_and_break_the_pool_after_max_failures_in_a_row():
    restarts = Restarts(max_failures=5)
    waits = _waits(restarts, 4, "start_failed")
    assert waits == [0.25, 0.5, 1.0, 2.0] and not restarts.broken
    waits = _waits(restarts, 4, "start_failed")
    assert restarts.broken and waits == [4.0, 8.0, 16.0, BROKEN_MAX_WAIT_S]
    assert _waits(Restarts(max_failures=100), 20, "start_failed")[-1] == FAILED_MAX_WAIT_S


def test_killed_starts_in_between_neither_count_nor_forgive_failed_ones():
    restarts = Restarts(max_failures=3)
    for kind in ("start_failed", "start_killed", "start_failed", "start_killed", "start_killed"):
        getattr(restarts, kind)("x", 0.0)
    assert restarts.failed == 2 and not restarts.broken
    restarts.start_failed("the last straw", 0.0)
    assert restarts.broken and restarts.last == "the last straw"


def test_a_ready_worker_ends_broken_and_every_wait():
    restarts = Restarts(max_failures=2)
    for _ in range(3):
        restarts.start_failed("x", 50.0)
    assert restarts.broken and not restarts.may_start(50.0, starting=0)
    restarts.started()
    assert not restarts.broken and restarts.may_start(50.0, starting=3)
    assert restarts.describe(50.0)["failed_in_a_row"] == 0 and restarts.failed_total == 3


def test_a_template_that_cannot_import_breaks_the_pool_at_once():
    restarts = Restarts(max_failures=5)
    restarts.template_failed("cannot import torch_neuronx", 0.0)
    assert restarts.broken and restarts.next_mono == 4.0  # the broken pool's first wait


def test_a_broken_pool_starts_one_process_at_a_time_and_never_sooner_than_its_wait():
    restarts = Restarts(max_failures=1)
    restarts.start_failed("x", 0.0)
    assert not restarts.may_start(0.1, starting=0)
    assert restarts.may_start(0.25, starting=0) and not restarts.may_start(0.25, starting=1)
    restarts.start_killed("x", 0.0)  # a kill never shortens a wait already set
    assert restarts.next_mono == 0.25


# --- real pools --------------------------------------------------------------------------

def _never_broken(pool, seconds: float, act) -> None:
    """Call act(stats) on every fresh snapshot for `seconds`, failing at once if the pool
    ever says it is broken."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        stats = pool.stats().to_json()
        assert stats["state"] != "broken", stats["broken_reason"]
        if act(stats):
            return
        time.sleep(0.0005)


def _kill(pid: int) -> None:
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:  # it ended on its own meanwhile
        pass


def test_workers_killed_while_starting_never_break_the_pool(make_pool):
    handle = make_pool(pool_size=2, spares_per_slot=1, max_start_failures=1)
    pool, killed = handle.pool, set()

    def kill_a_starting_worker(stats) -> bool:
        workers = stats["workers"]
        starting = [w for w in workers if w["state"] == "starting" and w["pid"] and w["pid"] not in killed]
        target = starting[0] if starting else None
        if target is None and not any(w["pid"] in killed or w["state"] == "starting" for w in workers):
            target = next((w for w in workers if w["state"] == "idle"), None)  # its replacement starts
        if target is not None:
            killed.add(target["pid"])
            _kill(target["pid"])
        return stats["starts"]["killed_total"] >= 5

    _never_broken(pool, 60, kill_a_starting_worker)
    assert pool.stats().detail["starts"]["killed_total"] >= 5
    handle.wait_full()
    stats = pool.stats().to_json()
    assert stats["state"] == "ready" and "start_failed" not in stats["respawns"]["by_reason"]
    assert handle.run("print('still here')").stdout == "still here\n"


def test_a_template_killed_while_it_imports_never_breaks_the_pool(make_pool):
    handle = make_pool(pool_size=1, spares_per_slot=1, max_start_failures=1)
    pool = handle.pool
    standby = wait_until(lambda: pool.stats().detail["standby_template_pid"])
    os.kill(standby, signal.SIGKILL)  # with it, the template is not imported again (next test)
    for _ in range(3):
        old = pool.stats().detail["template_pid"]
        os.kill(old, signal.SIGKILL)
        # The next template: killed before it forked anything (still importing).
        new = wait_until(lambda old=old: (pid := pool.stats().detail["template_pid"]) not in (None, old)
                         and pid, timeout=30, interval=0.001)
        assert not any(w["pid"] for w in pool.stats().workers)
    os.kill(new, signal.SIGKILL)
    _never_broken(pool, 60, lambda stats: stats["idle"] == stats["size"] and not stats["spares"]["starting"])
    stats = pool.stats().to_json()
    assert stats["state"] == "ready" and stats["starts"]["failed_total"] == 0
    assert handle.run("print('back')").stdout == "back\n"


def test_a_killed_template_is_replaced_at_once_by_its_standby(make_pool):
    handle = make_pool(pool_size=2, spares_per_slot=1)
    pool = handle.pool
    stats = wait_until(lambda: (s := pool.stats().to_json())["standby_template_pid"] and s)
    template, standby = stats["template_pid"], stats["standby_template_pid"]
    assert psutil.Process(standby).ppid() == template  # a fork of it
    workers = {w["pid"] for w in stats["workers"]}
    os.kill(template, signal.SIGKILL)
    wait_until(lambda: pool.stats().detail["template_pid"] == standby, timeout=5)
    handle.wait_full(timeout=10)  # spares forked by the standby: no imports waited for
    stats = pool.stats().to_json()
    assert not workers & {w["pid"] for w in stats["workers"]}
    assert stats["starts"]["failed_total"] == 0 and stats["state"] == "ready"
    assert handle.run("print('on the standby')").stdout == "on the standby\n"
    # It has a standby of its own, and a standby killed from outside is simply forked again.
    second = wait_until(lambda: pool.stats().detail["standby_template_pid"])
    assert psutil.Process(second).ppid() == standby
    os.kill(second, signal.SIGKILL)
    wait_until(lambda: pool.stats().detail["standby_template_pid"] not in (None, second))
    assert pool.stats().detail["template_pid"] == standby


def _failing_pool(work: Path, **kw) -> WarmPool:
    kw.setdefault("backend", "cpu")
    return WarmPool(PoolConfig(pool_size=1, spares_per_slot=1, work_dir=work, job_uid_base=job_uid_base(),
                               **kw)).start()


def _wait_state(pool: WarmPool, state: str, timeout: float) -> dict:
    return wait_until(lambda: (s := pool.stats().to_json())["state"] == state and s,
                      timeout=timeout, interval=0.05)


def test_workers_that_cannot_start_break_the_pool_until_they_can_then_it_comes_back(tmp_path):
    work = reachable_by_jobs(tmp_path / "closed" / "work")
    closed = work.parent
    closed.chmod(0o700)  # the job uids cannot reach the work dir below it: WorkerFailed
    pool = _failing_pool(work, max_start_failures=2)
    try:
        stats = _wait_state(pool, "broken", 60)
        assert "cannot reach" in stats["broken_reason"] and "tries again by itself" in stats["broken_reason"]
        condition = pool.condition()  # what admission reads: the same state, no snapshot
        assert condition.state == "broken" and "cannot reach" in condition.broken_reason
        with pytest.raises(errors.PoolBroken):
            pool.submit(JobSpec(code="pass", job_id="refused"))
        # It keeps trying, one worker at a time.
        failed = stats["starts"]["failed_total"]
        wait_until(lambda: pool.stats().detail["starts"]["failed_total"] > failed, timeout=30, interval=0.05)
        assert pool.stats().state == "broken"
        closed.chmod(0o711)  # the operator's fix
        stats = _wait_state(pool, "ready", BROKEN_MAX_WAIT_S + 30)
        assert stats["broken_reason"] is None and stats["starts"]["failed_in_a_row"] == 0
        assert pool.condition() == Condition("ready", None, 1, stats["isolation"])
        result = pool.submit(JobSpec(code="print('back')", job_id="after")).result(timeout=60)
        assert result.stdout == "back\n"
    finally:
        shutdown_leaving_nothing(pool)
    assert pool.condition().state == "closed"


def test_a_template_that_cannot_import_is_broken_until_it_can_then_it_comes_back(tmp_path):
    mods = reachable_by_jobs(tmp_path / "mods")
    path = os.pathsep.join([str(mods), os.environ.get("PYTHONPATH", "")])
    pool = _failing_pool(reachable_by_jobs(tmp_path / "work"), backend_preload=("torch", "installed_later"),
                         extra_env=(("PYTHONPATH", path),))
    try:
        stats = _wait_state(pool, "broken", 60)
        assert "installed_later" in stats["broken_reason"] and stats["template_pid"] is None
        assert pool.wait_ready(0.1) is False
        (mods / "installed_later.py").write_text("VALUE = 1\n")  # the operator installs it
        stats = _wait_state(pool, "ready", BROKEN_MAX_WAIT_S + 60)
        assert stats["broken_reason"] is None and "installed_later" in stats["preloaded"]
        assert 0 < stats["template_import_s"] < BROKEN_MAX_WAIT_S + 60  # by the template's own clock
        assert pool.wait_ready(60)
        result = pool.submit(JobSpec(code="print('back')", job_id="after")).result(timeout=60)
        assert result.stdout == "back\n"
    finally:
        shutdown_leaving_nothing(pool)
