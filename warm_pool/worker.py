"""The worker: a child of the template that owns one device and runs jobs one at a time.

After the fork it initialises its own device (never the template's: runtime state does
not survive fork), reports ready, then loops: receive RunJob, execute main.py exactly as
`python main.py` would, reply JobDone, restore the interpreter for the next job. Its
stdout and stderr file descriptors point at the job's capture files while a job runs, so
output of C code and child processes is captured too.
"""

from __future__ import annotations

import io
import os
import signal
import sys
import threading
import time
import traceback
import types
from multiprocessing.connection import Connection

from warm_pool import protocol
from warm_pool.isolation import Baseline

_BUFFER_SIZE = io.DEFAULT_BUFFER_SIZE


def init_device(backend: str) -> str | None:
    """Create this worker's device and run one tiny op on it, proving the backend."""
    import torch

    # OpenMP read OMP_NUM_THREADS when the template loaded it, so the per-worker value
    # the supervisor put in our environment takes effect only through set_num_threads.
    # (The variable itself is still right for the job's child processes.)
    threads = os.environ.get("OMP_NUM_THREADS", "")
    if threads.isdigit() and int(threads) > 0:
        torch.set_num_threads(int(threads))
    if backend == "cpu":
        torch.ones(2).add_(1).sum().item()
        return "cpu"
    import torch_xla

    if backend == "neuron":
        import torch_neuronx  # noqa: F401 - registers the Neuron PJRT plugin
    device = torch_xla.device()
    (torch.ones(2, device=device) + 1).sum().item()
    return str(device)


def main(conn: Connection, worker_id: int, backend: str, core: int | None,
         preload: tuple[str, ...]) -> int:
    """The worker's life: init, ready, jobs until Stop or EOF. Returns the exit code."""
    started = time.perf_counter()
    # What was really imported before the fork (the template's report could be stale).
    preloaded = tuple(name for name in preload if name in sys.modules)
    try:
        device = init_device(backend)
    except BaseException:  # noqa: BLE001 - reported, then this worker ends
        conn.send(protocol.WorkerFailed(worker_id, traceback.format_exc()))
        return 3
    baseline = Baseline.take()
    conn.send(protocol.WorkerReady(worker_id, os.getpid(), preloaded, device,
                                   time.perf_counter() - started))
    runner = JobRunner(baseline)
    while True:
        try:
            msg = conn.recv()
        except (EOFError, OSError):  # the supervisor is gone
            return 0
        except KeyboardInterrupt:  # a late soft-kill for a job that already ended
            continue
        if isinstance(msg, protocol.Stop):
            return 0
        if isinstance(msg, protocol.RunJob):
            done = runner.run(msg)
            conn.send(done)


class JobRunner:
    """Runs one job at a time inside this worker, then restores the baseline."""

    def __init__(self, baseline: Baseline):
        self.baseline = baseline
        # Private copies of the worker's own fds 0-2, to put back after each job.
        self.saved_fds = [os.dup(fd) for fd in (0, 1, 2)]
        for fd in self.saved_fds:
            os.set_inheritable(fd, False)

    def run(self, msg: protocol.RunJob) -> protocol.JobDone:
        """Execute msg.main_path as __main__ with fds 0-2 redirected; never raises."""
        self._redirect(msg)
        _reset_peak_rss()
        started = time.perf_counter()
        try:
            return_code, error_type, error_message = execute_main(msg.main_path, msg.job_dir)
            _finish_like_python(self.baseline)
        except KeyboardInterrupt:  # arrived while we were finishing up: still a stop
            return_code, error_type, error_message = -signal.SIGINT, "exception", "KeyboardInterrupt"
        run_seconds = time.perf_counter() - started
        self.baseline.restore_builtins()
        _flush_std_streams()
        peak = _peak_rss()
        self._restore_fds()
        dirty = self.baseline.restore(msg.job_dir)
        return protocol.JobDone(msg.job_id, return_code, error_type, error_message,
                                run_seconds, peak, tuple(dirty))

    def _redirect(self, msg: protocol.RunJob) -> None:
        flags = os.O_WRONLY | os.O_CREAT | os.O_APPEND
        devnull = os.open(os.devnull, os.O_RDONLY)
        out = os.open(msg.stdout_path, flags, 0o644)
        err = os.open(msg.stderr_path, flags, 0o644)
        for src, dst in ((devnull, 0), (out, 1), (err, 2)):
            os.dup2(src, dst)
            os.close(src)
        # Fresh stream objects per job, as a new interpreter would have: stdout fully
        # buffered (not a tty), stderr line-buffered with backslashreplace (3.9+), both
        # unbuffered under PYTHONUNBUFFERED.
        unbuffered = bool(os.environ.get("PYTHONUNBUFFERED"))
        sys.stdin = io.TextIOWrapper(io.FileIO(0, "r", closefd=False), encoding="utf-8")
        sys.stdout = _text_stream(1, "strict", unbuffered, line_buffering=False)
        sys.stderr = _text_stream(2, "backslashreplace", unbuffered, line_buffering=True)
        sys.__stdin__, sys.__stdout__, sys.__stderr__ = sys.stdin, sys.stdout, sys.stderr

    def _restore_fds(self) -> None:
        for saved, fd in zip(self.saved_fds, (0, 1, 2), strict=True):
            os.dup2(saved, fd)


def _text_stream(fd: int, errors: str, unbuffered: bool, line_buffering: bool) -> io.TextIOWrapper:
    raw = io.FileIO(fd, "w", closefd=False)
    binary = raw if unbuffered else io.BufferedWriter(raw, _BUFFER_SIZE)
    return io.TextIOWrapper(binary, encoding="utf-8", errors=errors,
                            line_buffering=line_buffering, write_through=unbuffered)


def execute_main(main_path: str, job_dir: str) -> tuple[int, str | None, str | None]:
    """Run the file as `python main.py` would; return (exit status, error_type, message)."""
    module = types.ModuleType("__main__")
    module.__file__ = main_path
    module.__builtins__ = __builtins__
    module.__spec__ = None
    module.__loader__ = None
    sys.modules["__main__"] = module
    sys.argv[:] = [main_path]
    sys.path[:0] = [job_dir]
    os.chdir(job_dir)
    try:
        with open(main_path, "rb") as f:
            source = f.read()
        code = compile(source, main_path, "exec", dont_inherit=True)
    except (SyntaxError, ValueError) as exc:
        sys.excepthook(type(exc), exc, None)
        return 1, "syntax_error", _one_line(exc)
    try:
        exec(code, module.__dict__)
    except SystemExit as exc:
        return _system_exit_status(exc)
    except BaseException as exc:  # noqa: BLE001 - the job's own failure, reported like CPython
        tb = exc.__traceback__.tb_next if exc.__traceback__ else None  # hide our frame
        exc.__traceback__ = tb
        sys.excepthook(type(exc), exc, tb)
        if isinstance(exc, KeyboardInterrupt):
            return -signal.SIGINT, "exception", "KeyboardInterrupt"
        return 1, "exception", _one_line(exc)
    return 0, None, None


def _system_exit_status(exc: SystemExit) -> tuple[int, str | None, str | None]:
    """CPython's handling of SystemExit: None → 0, int → it, anything else printed → 1."""
    code = exc.code
    if code is None:
        return 0, None, None
    if isinstance(code, int):
        status = code & 0xFF  # the OS keeps the low 8 bits: sys.exit(-1) is 255
        return status, ("exit" if status else None), (f"exit status {status}" if status else None)
    try:
        print(code, file=sys.stderr)
    except Exception:  # noqa: BLE001
        pass
    return 1, "exit", f"exit status 1: {code}"


def _finish_like_python(baseline: Baseline) -> None:
    """What the interpreter does at exit: join non-daemon threads, run atexit handlers."""
    for thread in threading.enumerate():
        if thread not in baseline.threads and not thread.daemon and thread.is_alive():
            thread.join()
    import atexit

    if atexit._ncallbacks() != baseline.atexit_count:
        atexit._run_exitfuncs()


def _one_line(exc: BaseException) -> str:
    text = "".join(traceback.format_exception_only(type(exc), exc)).strip().splitlines()
    return text[-1] if text else type(exc).__name__


def _flush_std_streams() -> None:
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except Exception:  # noqa: BLE001 - closed or broken by the job: nothing to save
            pass


def _reset_peak_rss() -> None:
    # Writing 5 to clear_refs resets VmHWM, so the peak below is this job's alone.
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


def _peak_rss() -> int:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0
