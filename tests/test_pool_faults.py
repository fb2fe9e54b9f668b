"""The crash matrix: every way a job can end badly gives a result, and the pool recovers."""

from __future__ import annotations

import os
import signal
import time

import pytest
from conftest import alive, group_members, pool_processes, wait_until

CRASHES = {
    "segfault": ("import ctypes\nctypes.string_at(0)", -signal.SIGSEGV, "signal"),
    "sigkill_self": ("import os, signal\nos.kill(os.getpid(), signal.SIGKILL)", -signal.SIGKILL, "signal"),
    "os_exit": ("import os\nos._exit(9)", 9, "exit"),
    "abort": ("import os\nos.abort()", -signal.SIGABRT, "signal"),
}


@pytest.mark.parametrize("reuse", [False, True], ids=["process_per_job", "reuse"])
@pytest.mark.parametrize("name", sorted(CRASHES))
def test_crash_gives_a_result_and_a_fresh_worker(make_pool, name, reuse):
    code, return_code, error_type = CRASHES[name]
    pool = make_pool(reuse_workers=reuse)
    result = pool.run("print('partial output', flush=True)\n" + code)
    assert (result.return_code, result.error_type) == (return_code, error_type)
    assert result.stdout == "partial output\n"
    pool.wait_full()
    assert pool.run("print('next')").stdout == "next\n"
    # One process per job: a crash is how that job ended, not a worker to replace.
    assert pool.pool.stats().to_json()["respawns"]["total"] == (1 if reuse else 0)


def test_timeout_interrupts_then_replaces_and_keeps_output(make_pool):
    pool = make_pool(kill_grace=1.0)
    result = pool.run("import time\nprint('started', flush=True)\ntime.sleep(60)", timeout=0.5)
    assert result.timeout is True
    assert result.error_type == "timeout"
    assert result.stdout == "started\n"
    assert "KeyboardInterrupt" in result.stderr
    assert 0.5 <= result.execution_time < 5
    pool.wait_full()
    assert pool.pool.stats().respawns_by_reason == {"timeout": 1}


def test_timeout_kills_a_job_that_ignores_sigint(make_pool):
    pool = make_pool(kill_grace=0.3)
    code = "import signal, time\nsignal.signal(signal.SIGINT, signal.SIG_IGN)\nwhile True: time.sleep(0.01)"
    result = pool.run(code, timeout=0.3)
    assert result.timeout is True
    assert result.return_code == -signal.SIGKILL


def test_timeout_kills_grandchildren_too(make_pool):
    pool = make_pool(kill_grace=0.2)
    code = ("import subprocess, time\np = subprocess.Popen(['sleep', '300'])\n"
            "print(p.pid, flush=True)\ntime.sleep(300)")
    result = pool.run(code, timeout=0.5)
    assert result.timeout
    pid = int(result.stdout)
    wait_until(lambda: not _alive(pid), timeout=10)
    wait_until(lambda: not group_members(result.worker.pid), timeout=10)


def test_cancel_a_running_job(make_pool):
    pool = make_pool()
    started = []
    fut = pool.pool.submit(_spec("import time\ntime.sleep(60)", "cancel-me"),
                           on_start=lambda job_id, ref: started.append(job_id))
    wait_until(lambda: started)
    assert pool.pool.cancel("cancel-me") is True
    result = fut.result(timeout=30)
    assert (result.status, result.error_type) == ("cancelled", "cancelled")
    assert pool.pool.cancel("cancel-me") is False


def test_cancel_a_queued_job(make_pool):
    pool = make_pool()
    running = pool.pool.submit(_spec("import time\ntime.sleep(1)", "first"))
    queued = pool.pool.submit(_spec("print('never')", "second"))
    assert pool.pool.cancel("second") is True
    result = queued.result(timeout=10)
    assert result.status == "cancelled"
    assert result.worker is None
    assert running.result(timeout=30).success


def test_memory_limit_kills_the_job(make_pool):
    pool = make_pool(max_memory_mb=600)
    code = "import time\nb = bytearray(800 * 1024 * 1024)\nb[::4096] = b'x' * len(b[::4096])\ntime.sleep(30)"
    result = pool.run(code, timeout=60)
    assert result.error_type == "memory_limit"
    assert result.return_code == -signal.SIGKILL
    assert result.peak_memory_mb > 600


def test_worker_killed_from_outside_is_replaced(make_pool):
    pool = make_pool(pool_size=2)
    victim = pool.idle_workers()[0]["pid"]
    os.kill(victim, signal.SIGKILL)
    wait_until(lambda: victim not in [w["pid"] for w in pool.pool.stats().workers])
    pool.wait_full()
    assert pool.pool.stats().to_json()["respawns"]["total"] == 1


def test_queue_full_is_a_clear_error(make_pool):
    from warm_pool import errors

    pool = make_pool(max_queue=1)
    pool.pool.submit(_spec("import time\ntime.sleep(2)", "busy"))
    wait_until(lambda: pool.pool.stats().busy == 1)
    pool.pool.submit(_spec("pass", "waiting"))
    with pytest.raises(errors.QueueFull):
        pool.pool.submit(_spec("pass", "rejected"))


def test_shutdown_interrupts_running_jobs_cancels_queued_ones_and_leaves_no_process(make_pool):
    pool = make_pool(pool_size=1)
    fut = pool.pool.submit(_spec("import time\ntime.sleep(60)", "long"))
    queued = [pool.pool.submit(_spec("pass", f"q{i}")) for i in range(3)]  # the one worker is busy
    wait_until(lambda: pool.pool.stats().busy == 1)
    procs = pool_processes(pool.pool)
    pool.pool.shutdown(grace=0.5)
    assert fut.result(timeout=10).status == "interrupted"
    assert all(f.cancelled() for f in queued)
    wait_until(lambda: not alive(procs))


def test_shutdown_while_a_replacement_is_starting_is_prompt_and_clean(make_pool):
    pool = make_pool(pool_size=1)
    procs = pool_processes(pool.pool)
    victim = pool.pool.stats().workers[0]["pid"]
    os.kill(victim, signal.SIGKILL)
    wait_until(lambda: pool.pool.stats().detail["spares"]["starting"] >= 1 and victim not in
               [w["pid"] for w in pool.pool.stats().workers], interval=0.001)
    started = time.monotonic()
    pool.pool.shutdown(grace=1)
    assert time.monotonic() - started < 3  # not the 5 s of a template that had to be SIGKILLed
    wait_until(lambda: not alive(procs + pool_processes(pool.pool)))


def _spec(code: str, job_id: str):
    from warm_pool import JobSpec

    return JobSpec(code=code, job_id=job_id, timeout=120)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split()[2] != "Z"
    except OSError:
        return False


def test_template_killed_from_outside_is_restarted_with_its_workers(make_pool):
    pool = make_pool(pool_size=2)
    template = pool.pool.stats().detail["template_pid"]
    old = {w["pid"] for w in pool.pool.stats().workers}
    os.kill(template, signal.SIGKILL)
    # The workers die with it (parent-death signal), and a new template forks new ones.
    wait_until(lambda: pool.pool.stats().detail["template_pid"] not in (None, template), timeout=30)
    pool.wait_full()
    assert not old & {w["pid"] for w in pool.pool.stats().workers}
    assert pool.run("print('back')").stdout == "back\n"
