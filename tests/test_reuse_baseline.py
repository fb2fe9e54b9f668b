"""In the reuse mode, what a job leaves in its worker's process is put back before the next
job, or the worker reports itself dirty (issue 18, item 5).

Each test forks a child of this process, which imported torch and numpy as the template
does. The child takes a Baseline as a worker does once it is ready, does what a job
would, restores, and reports over a pipe what it then sees. Real processes, no mocks.
"""

from __future__ import annotations

import _thread
import ctypes
import faulthandler
import gc
import json
import os
import select
import signal
import subprocess
import time
import warnings

import numpy
import pytest
import torch

from warm_pool.child.isolation import Baseline
from warm_pool.child.library_state import flushes_denormals
from warm_pool.child.native_state import _c_environ

_libc = ctypes.CDLL(None, use_errno=True)
PR_SET_DUMPABLE, PR_GET_DUMPABLE = 4, 3
PR_SET_TIMERSLACK, PR_GET_TIMERSLACK = 29, 30
PR_SET_NO_NEW_PRIVS, PR_SET_SECCOMP, SECCOMP_MODE_FILTER = 38, 22, 2
NOBODY = 65534
_CHILD_TIMEOUT_S = 60


def prctl(option: int, value: int = 0, arg3: int = 0) -> int:
    return _libc.prctl(option, ctypes.c_ulong(value), ctypes.c_ulong(arg3), ctypes.c_ulong(0),
                       ctypes.c_ulong(0))


def _drop_privileges() -> None:
    """What the sandbox does to a worker under isolation uid: another uid, no capabilities."""
    os.setgroups([])
    os.setresgid(NOBODY, NOBODY, NOBODY)
    os.setresuid(NOBODY, NOBODY, NOBODY)
    prctl(PR_SET_DUMPABLE, 1)  # a uid change clears it; the sandbox sets it again


def in_worker(job, check, setup=None, unprivileged=False) -> dict:
    """Run setup, Baseline.take(), job, restore and check in a forked child; return
    {"dirty": what restore reported, "check": what check returned}.

    setup() runs before the baseline and returns a dict that job and check share; a
    job may put fds to keep in it under "keep_fds" (the worker's channel)."""
    # pytest's faulthandler_timeout arms a dump in this process. A forked child would
    # inherit the armed state without the watchdog thread, so it is cancelled here
    # (pytest-timeout still bounds the test).
    faulthandler.cancel_dump_traceback_later()
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child reports through the pipe
        os.close(read_end)
        try:
            # As a worker starts: dumpable (sandbox.enter sets it; a thread of the suite's
            # process that took a job uid to kill its processes cleared it for the process),
            # and only its own fds: what other tests left open here (a resource tracker's
            # pipe, a server's log) is not a worker's.
            prctl(PR_SET_DUMPABLE, 1)
            os.closerange(3, write_end)
            os.closerange(write_end + 1, 65536)
            if unprivileged:
                _drop_privileges()
            ctx = setup() if setup else {}
            baseline = Baseline.take()
            job(ctx)
            dirty = baseline.restore("/nonexistent-job-dir", keep_fds=(write_end, *ctx.get("keep_fds", ())))
            out = {"dirty": dirty, "check": check(ctx, baseline)}
        except BaseException as exc:  # noqa: BLE001
            out = {"error": repr(exc)}
        os.write(write_end, json.dumps(out, default=str).encode())
        os._exit(0)
    os.close(write_end)
    try:
        data = b""
        deadline = time.monotonic() + _CHILD_TIMEOUT_S
        while time.monotonic() < deadline:
            if select.select([read_end], [], [], 0.1)[0]:
                chunk = os.read(read_end, 1 << 16)
                if not chunk:
                    break
                data += chunk
    finally:
        os.close(read_end)
        if os.waitpid(pid, os.WNOHANG)[0] == 0:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
    assert data, "the child reported nothing (killed, or hung)"
    out = json.loads(data)
    assert "error" not in out, out["error"]
    return out


def _nothing(ctx):
    pass


needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="changes a uid or sets what only root may")


def test_an_empty_job_leaves_the_worker_clean():
    out = in_worker(_nothing, lambda ctx, b: len(b.native.fork_hooks))
    assert out["dirty"] == []
    assert out["check"] == 3, "the register_at_fork lists were not found"


def test_all_interval_timers_are_disarmed_and_their_handlers_put_back():
    def job(ctx):
        for sig in (signal.SIGALRM, signal.SIGVTALRM, signal.SIGPROF):
            signal.signal(sig, lambda *a: None)
        signal.setitimer(signal.ITIMER_REAL, 5, 5)
        signal.setitimer(signal.ITIMER_VIRTUAL, 5, 5)
        signal.setitimer(signal.ITIMER_PROF, 0.05, 0.05)

    def check(ctx, baseline):
        spin = time.process_time() + 0.2  # SIGPROF's default action would end this process
        while time.process_time() < spin:
            pass
        return {"timers": [signal.getitimer(w) for w in (0, 1, 2)],
                "handlers": [signal.getsignal(s) == handler  # pytest-timeout's SIGALRM, SIG_DFL
                             for s, handler in baseline.native.timer_handlers.items()]}

    out = in_worker(job, check)
    assert out["dirty"] == []
    assert out["check"] == {"timers": [[0.0, 0.0]] * 3, "handlers": [True] * 3}


def test_a_blocked_signal_is_unblocked():
    out = in_worker(lambda ctx: signal.pthread_sigmask(signal.SIG_BLOCK, [signal.SIGUSR1]),
                    lambda ctx, b: sorted(signal.pthread_sigmask(signal.SIG_BLOCK, [])))
    assert out["dirty"] == []
    assert out["check"] == []


def test_timer_slack_is_restored():
    out = in_worker(lambda ctx: prctl(PR_SET_TIMERSLACK, 5_000_000),
                    lambda ctx, b: (prctl(PR_GET_TIMERSLACK), b.native.timer_slack))
    assert out["dirty"] == []
    slack, baseline = out["check"]
    assert slack == baseline != 5_000_000


@needs_root
def test_scheduling_policy_and_nice_are_restored_when_allowed():
    def job(ctx):
        os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))
        os.nice(5)

    out = in_worker(job, lambda ctx, b: (os.sched_getscheduler(0), os.getpriority(os.PRIO_PROCESS, 0)))
    assert out["dirty"] == []
    assert out["check"] == [os.SCHED_OTHER, os.getpriority(os.PRIO_PROCESS, 0)]


@needs_root
def test_sched_idle_under_an_unprivileged_uid_makes_the_worker_dirty():
    out = in_worker(lambda ctx: os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0)),
                    lambda ctx, b: os.getuid(), unprivileged=True)
    assert out["check"] == NOBODY
    assert any("scheduling" in d for d in out["dirty"]), out["dirty"]


@needs_root
def test_raised_nice_under_an_unprivileged_uid_makes_the_worker_dirty():
    out = in_worker(lambda ctx: os.nice(5), lambda ctx, b: os.getuid(), unprivileged=True)
    assert any("scheduling" in d for d in out["dirty"]), out["dirty"]


def _allow_all_seccomp_filter() -> None:
    """One BPF instruction, `return SECCOMP_RET_ALLOW`: a filter that changes nothing."""
    class SockFilter(ctypes.Structure):
        _fields_ = [("code", ctypes.c_uint16), ("jt", ctypes.c_uint8), ("jf", ctypes.c_uint8),
                    ("k", ctypes.c_uint32)]

    class SockFprog(ctypes.Structure):
        _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.POINTER(SockFilter))]

    program = (SockFilter * 1)(SockFilter(0x06, 0, 0, 0x7FFF0000))  # BPF_RET|BPF_K, ALLOW
    fprog = SockFprog(1, program)
    prctl(PR_SET_NO_NEW_PRIVS, 1)
    assert _libc.prctl(PR_SET_SECCOMP, ctypes.c_ulong(SECCOMP_MODE_FILTER), ctypes.byref(fprog),
                       ctypes.c_ulong(0), ctypes.c_ulong(0)) == 0, ctypes.get_errno()


def test_a_seccomp_filter_makes_the_worker_dirty():
    out = in_worker(lambda ctx: _allow_all_seccomp_filter(), lambda ctx, b: None)
    assert any("seccomp" in d and "Seccomp_filters 0 -> 1" in d for d in out["dirty"]), out["dirty"]


def test_no_new_privs_makes_the_worker_dirty():
    out = in_worker(lambda ctx: prctl(PR_SET_NO_NEW_PRIVS, 1), lambda ctx, b: None)
    assert any("NoNewPrivs 0 -> 1" in d for d in out["dirty"]), out["dirty"]


def test_flush_denormal_is_turned_off_again():
    out = in_worker(lambda ctx: torch.set_flush_denormal(True),
                    lambda ctx, b: (torch.tensor([1e-310], dtype=torch.float64) * 1).item())
    assert out["dirty"] == []
    assert out["check"] == 1e-310
    assert not flushes_denormals(torch)  # this process was never changed


def test_numpy_error_handling_is_restored():
    def check(ctx, baseline):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            overflow = float(numpy.float64(1e308) * 10)  # raises under seterr(all='raise')
        return numpy.geterr(), overflow

    out = in_worker(lambda ctx: numpy.seterr(all="raise"), check)
    assert out["dirty"] == []
    assert out["check"] == [numpy.geterr(), float("inf")]


def test_dumpable_is_set_again():
    out = in_worker(lambda ctx: prctl(PR_SET_DUMPABLE, 0), lambda ctx, b: prctl(PR_GET_DUMPABLE))
    assert out["dirty"] == []
    assert out["check"] == 1


def test_fds_the_job_left_are_closed_but_the_kept_ones_and_installed_files():
    def job(ctx):
        ctx["memfd"] = os.memfd_create("leak")
        os.write(ctx["memfd"], b"paper A's data")
        ctx["device"] = os.open("/dev/null", os.O_RDONLY)
        ctx["installed"] = os.open(numpy.__file__, os.O_RDONLY)  # as matplotlib keeps its fonts
        ctx["keep_fds"] = [os.open("/dev/null", os.O_RDONLY)]  # a channel opened later

    def check(ctx, baseline):
        def is_open(fd):
            try:
                os.fstat(fd)
                return True
            except OSError:
                return False
        return {"memfd": is_open(ctx["memfd"]), "device": is_open(ctx["device"]),
                "installed": is_open(ctx["installed"]), "kept": is_open(ctx["keep_fds"][0]),
                "worker's": all(map(is_open, baseline.native.fds)), "closed": baseline.native.closed_fds}

    out = in_worker(job, check)
    assert out["dirty"] == []
    closed = out["check"].pop("closed")
    assert out["check"] == {"memfd": False, "device": False, "installed": True, "kept": True,
                            "worker's": True}
    assert any("memfd:leak" in c for c in closed), closed


def test_a_worker_fd_the_job_replaced_makes_the_worker_dirty():
    def setup():
        return {"worker_fd": os.open("/dev/null", os.O_RDONLY)}

    def job(ctx):
        os.dup2(os.memfd_create("impostor"), ctx["worker_fd"])

    out = in_worker(job, lambda ctx, b: None, setup=setup)
    assert any("fds the worker had" in d for d in out["dirty"]), out["dirty"]


def test_the_c_environment_is_restored_for_subprocesses():
    def job(ctx):
        os.putenv("LD_PRELOAD", "/nonexistent/libleak.so")
        _libc.setenv(b"LEAKED_BY_CTYPES", b"1", 1)
        _libc.unsetenv(b"PATH")  # behind os.environ's back

    def check(ctx, baseline):
        env = subprocess.run(["/usr/bin/env"], capture_output=True, text=True).stdout
        return {"subprocess": sorted(line.split("=")[0] for line in env.splitlines()),
                "c_environ": sorted(_c_environ()) == baseline.native.environ,
                "os_environ": dict(os.environ) == baseline.environ}

    out = in_worker(job, check)
    assert out["dirty"] == []
    names = out["check"]["subprocess"]
    assert "LD_PRELOAD" not in names and "LEAKED_BY_CTYPES" not in names and "PATH" in names
    assert out["check"]["c_environ"] and out["check"]["os_environ"]


def test_a_thread_threading_does_not_know_makes_the_worker_dirty():
    out = in_worker(lambda ctx: _thread.start_new_thread(time.sleep, (30,)), lambda ctx, b: None)
    assert any("threads the worker did not have" in d for d in out["dirty"]), out["dirty"]


def test_a_thread_that_ended_does_not_make_the_worker_dirty():
    out = in_worker(lambda ctx: _thread.start_new_thread(lambda: None, ()), lambda ctx, b: None)
    assert out["dirty"] == []


def test_a_register_at_fork_hook_makes_the_worker_dirty_even_with_a_frozen_heap():
    def setup():
        gc.collect()
        gc.freeze()  # as the template does before forking workers
        return {}

    out = in_worker(lambda ctx: os.register_at_fork(after_in_child=lambda: print("leak")),
                    lambda ctx, b: len(b.native.fork_hooks), setup=setup)
    assert out["check"] == 3
    assert any("register_at_fork" in d for d in out["dirty"]), out["dirty"]


def test_the_resource_trackers_fd_is_forgotten_with_its_process():
    """Its fd is closed with the job's; a later job must start a new tracker rather than
    write into whatever file gets that fd number."""
    def job(ctx):
        from multiprocessing import resource_tracker

        resource_tracker.ensure_running()
        tracker = resource_tracker._resource_tracker
        ctx["fd"] = tracker._fd
        os.kill(tracker._pid, signal.SIGKILL)  # what the end of a job does to its processes
        os.waitpid(tracker._pid, 0)

    def check(ctx, baseline):
        from multiprocessing import resource_tracker

        tracker = resource_tracker._resource_tracker
        closed = any(c.startswith(f"{ctx['fd']} ") for c in baseline.native.closed_fds)
        return tracker._fd, tracker._pid, closed

    out = in_worker(job, check)
    assert out["dirty"] == []
    assert out["check"] == [None, None, True]


def test_a_pending_faulthandler_dump_is_cancelled():
    def setup():
        faulthandler.disable()  # pytest enables it; a worker has it as python does: off
        return {}

    def job(ctx):
        read_end, write_end = os.pipe()
        ctx.update(read_end=read_end, keep_fds=[read_end, write_end])
        faulthandler.dump_traceback_later(0.3, file=write_end)
        faulthandler.enable(file=write_end)
        faulthandler.register(signal.SIGUSR1, file=write_end)

    def check(ctx, baseline):
        time.sleep(0.6)
        os.set_blocking(ctx["read_end"], False)
        try:
            dumped = os.read(ctx["read_end"], 1 << 16).decode()
        except BlockingIOError:
            dumped = ""
        return {"dumped": dumped, "enabled": faulthandler.is_enabled(),
                "usr1_registered": faulthandler.unregister(signal.SIGUSR1)}

    out = in_worker(job, check, setup=setup)
    assert out["dirty"] == []
    assert out["check"] == {"dumped": "", "enabled": False, "usr1_registered": False}
