"""The worker: a confined child of the template that owns one device and runs jobs.

After the fork the template confines it (sandbox.enter: its own uid, no privileges,
writes only where jobs may write), then it initialises its own device (never the
template's: runtime state does not survive fork), warms up, records its clean state,
reports ready, and loops::

    run_job (+ stdout, stderr pipes) ─▶ execute main.py as `python main.py` would
                                        end every process the job started
                                     ◀─ job_done       (the result can be built)
                                        restore the interpreter, check the fingerprint
                                     ◀─ worker_idle    (dirty: what could not be undone)

Only fds 0-2 and the channel to the supervisor are open here: 0-2 are /dev/null between
jobs and the job's pipes during one.
"""

from __future__ import annotations

import atexit
import contextvars
import ctypes
import io
import os
import signal
import socket
import sys
import tempfile
import threading
import time
import traceback
import types
import weakref
from multiprocessing import reduction
from multiprocessing.connection import Connection
from typing import Any

from warm_pool import protocol
from warm_pool.child.integrity import Fingerprint
from warm_pool.child.isolation import Baseline
from warm_pool.child.library_state import reseed_numpy

_BUFFER_SIZE = io.DEFAULT_BUFFER_SIZE
# Exit status of a worker whose job cut its channel to the supervisor (os.closerange):
# it cannot report the job, so it ends, and the supervisor says why.
EXIT_CHANNEL_LOST = 117
# How long the end of a job waits for the processes it started to be gone.
_KILL_WAIT_S = 2.0


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
    # What a first training step does to the process, done before the baseline: a
    # backward pass on the device starts autograd's thread for it, and the step marker
    # creates torch_xla.core.xla_model's context for the device (most generated scripts
    # call xm.mark_step()). Done by a job, both would make the worker look dirty.
    import torch_xla.core.xla_model as xm

    weight = torch.ones(2, device=device, requires_grad=True)
    (weight * 2).sum().backward()
    xm.mark_step()
    return str(device)


def warm_up() -> None:
    """Do once what a job's first training step would do to shared library state.

    Instantiating an optimizer wraps its class's step() (torch.optim patches the class
    on first use); done here, before the fingerprint's baseline, a job doing it does not
    look like a job patching torch. CPU tensors only: the device is the job's.

    The native thread pools start here too, as a first training step would start them:
    torch's OpenMP pool, and OpenBLAS's (numpy's, scipy's), which shut themselves down
    before the template forked us and start again on the first large product. Started
    by a job, they would look like threads the job left behind (a dirty worker).
    """
    import torch

    param = torch.zeros(1, requires_grad=True)
    base = torch.optim.Optimizer
    for name in getattr(torch.optim, "__all__", ()):
        cls = getattr(torch.optim, name, None)
        if isinstance(cls, type) and issubclass(cls, base) and cls is not base:
            try:
                cls([param])
            except Exception:  # noqa: BLE001 - an optimizer needing other arguments stays cold
                pass
    _start_native_pools(torch)


def _start_native_pools(torch: Any) -> None:
    """Start the pools a job's first large product would start, when they have more than
    one thread (with one, the default when workers fill the cores, none ever starts)."""
    if torch.get_num_threads() > 1:
        square = torch.ones(256, 256)
        (square @ square).sum().item()
    numpy = sys.modules.get("numpy")
    blas_threads = os.environ.get("OPENBLAS_NUM_THREADS", "")
    if numpy is None or (blas_threads.isdigit() and int(blas_threads) <= 1):
        return
    matrix = numpy.ones((256, 256))
    matrix @ matrix  # noqa: B018 - run for its side effect (OpenBLAS starts its threads)
    blas = sys.modules.get("scipy.linalg.blas")
    if blas is not None:
        blas.dgemm(1.0, matrix, matrix)


def check_job_access(paths: tuple[str, ...]) -> None:
    """Fail with a clear message when this worker's uid cannot reach what jobs need."""
    for path in paths:
        parts = os.path.abspath(path).split(os.sep)
        for depth in range(2, len(parts) + 1):
            probe = os.sep.join(parts[:depth])
            if not os.access(probe, os.X_OK):
                raise PermissionError(
                    f"jobs run as uid {os.getuid()} and cannot reach {path}: {probe} is closed to "
                    f"other users. Open it for traversal (chmod o+x {probe}) or put Python and the "
                    "work dir where other users can read them")


def main(fd: int, worker_id: int, backend: str, core: int | None, preloaded: tuple[str, ...],
         fingerprint: Fingerprint | None, confinement: dict[str, str], needed: tuple[str, ...],
         job_paths: tuple[str, ...] = (), one_job: bool = True, defer_device: bool = False) -> int:
    """The worker's life. One job (the default): init, ready, the job, exit with its
    status. Reuse mode: init, ready, jobs until the supervisor closes the channel."""
    conn = Connection(fd)
    os.umask(0o022)  # what a job gets, as under a login shell (the service's is 077)
    preloaded = tuple(name for name in preloaded if name in sys.modules)
    device = None
    try:
        check_job_access(needed)
        if not defer_device:
            device = _start_device(backend, one_job)
        if fingerprint is not None:
            fingerprint.rebase()
        baseline = None if one_job else Baseline.take()
    except BaseException:  # noqa: BLE001 - reported, then this worker ends
        _send(conn, protocol.WorkerFailed(worker_id, protocol.clip(traceback.format_exc())))
        return 3
    if not _send(conn, protocol.WorkerReady(worker_id, preloaded, device, confinement)):
        return 0
    if one_job:
        if not defer_device:
            _hold_address_space()
        return _one_job(conn, worker_id, backend, preloaded, confinement, job_paths,
                        device is None and defer_device)
    runner = ScriptRunner(baseline, fingerprint, isolated="uid" in confinement, job_paths=job_paths,
                          keep_fds=(conn.fileno(),))
    while True:
        try:
            msg = protocol.decode(conn.recv_bytes(), protocol.TO_WORKER)
            pipes = _receive_fds(conn, 2)
        except (EOFError, OSError, protocol.ProtocolError):  # the supervisor is gone
            return 0
        except KeyboardInterrupt:  # a late soft-kill for a job that already ended
            continue
        done = runner.run(msg, pipes)
        if not _send(conn, done):
            return EXIT_CHANNEL_LOST
        if not _send(conn, runner.restore(msg)):
            return EXIT_CHANNEL_LOST


_CLONE_VM = 0x100
_HOLDER_STACK = 64 * 1024
_held: tuple = ()


def _hold_address_space() -> None:
    """Start a task that shares this process's memory and does nothing, so the job's
    end is not delayed by its memory's teardown.

    A process forked from the template maps everything the template preloaded: ending
    it frees some hundred thousand page-table entries, 20-60 ms measured here, and the
    kernel does that *before* it reports the exit to the parent. A second task in the
    same address space (clone with CLONE_VM) keeps the memory alive past our exit, so
    the template learns of the exit at once (0.2 ms); the task runs as our uid in our
    cgroup, and the supervisor's kill of our uid right after our exit ends it, tearing
    the memory down off the job's path. It blocks every signal in sigsuspend (called by
    clone as its function, with a full mask as its argument): only SIGKILL ends it.
    It is nothing the job could not start itself. Without it (clone refused), exits are
    only slower.
    """
    global _held
    libc = ctypes.CDLL(None, use_errno=True)
    stack = ctypes.create_string_buffer(_HOLDER_STACK)
    mask = ctypes.create_string_buffer(b"\xff" * 128, 128)  # sigset_t, every signal
    top = (ctypes.addressof(stack) + _HOLDER_STACK - 64) & ~15
    fn = ctypes.cast(libc.sigsuspend, ctypes.c_void_p)
    if libc.clone(fn, ctypes.c_void_p(top), _CLONE_VM | signal.SIGCHLD, mask) > 0:
        _held = (stack, mask)  # the task's stack and argument must live as long as it


def _start_device(backend: str, one_job: bool) -> str | None:
    """The device, and (reuse mode) the warm-up that keeps a first training step from
    looking like a job's change to the libraries. A process that runs one job has
    nothing to compare: it skips the warm-up (50-80 ms of a spare's start measured here),
    starting only the native thread pools a first large product would."""
    device = init_device(backend)
    if one_job:
        import torch

        _start_native_pools(torch)
    else:
        warm_up()
    reseed_numpy()  # each worker its own numpy stream, not the template's
    return device


def _one_job(conn: Connection, worker_id: int, backend: str, preloaded: tuple[str, ...],
             confinement: dict[str, str], job_paths: tuple[str, ...], device_pending: bool) -> int:
    """Wait for the job (on neuron, first for the core), run it, and end as
    `python main.py` ends: its exit status, or the signal that stopped it."""
    profiled = False
    while True:
        try:
            msg = protocol.decode(conn.recv_bytes(), protocol.TO_WORKER)
        except (EOFError, OSError, protocol.ProtocolError):  # the supervisor is gone
            return 0
        if isinstance(msg, protocol.RunJob):
            break
        if device_pending:  # open_device: the NeuronCore's last holder has exited
            os.environ.update(msg.env)  # a profiled job's: the runtime reads them as it starts
            profiled = bool(msg.env)
            try:
                device = _start_device(backend, True)
            except BaseException:  # noqa: BLE001
                _send(conn, protocol.WorkerFailed(worker_id, protocol.clip(traceback.format_exc())))
                return 3
            device_pending = False
            _hold_address_space()  # after the runtime's start: it sees no other process of ours
            if not _send(conn, protocol.WorkerReady(worker_id, preloaded, device, confinement)):
                return 0
    pipes = _receive_fds(conn, 2)
    done = ScriptRunner(None, None, isolated=False, job_paths=job_paths).run(msg, pipes, last=True)
    if profiled:
        close_runtime()
    _send(conn, done)  # a claim: the supervisor takes the end from our exit status
    if done.return_code < 0:  # stopped by a signal (KeyboardInterrupt): end by it, as CPython does
        signal.signal(-done.return_code, signal.SIG_DFL)
        os.kill(os.getpid(), -done.return_code)
    return done.return_code


# The Neuron runtime's library, as the Neuron PJRT plugin loads it (aws-neuronx-runtime-lib).
_LIBNRT = ("libnrt.so.1", "libnrt.so")


def close_runtime() -> None:
    """End a profiled job's Neuron runtime as a cold run's exit would, so that it writes
    what it still holds of the profile.

    A job's process ends with os._exit, skipping the libraries' teardown (_LastAtexit),
    where the runtime would be closed. So: torch_xla's exit hook first (it waits for the
    device's pending work), then the runtime's own nrt_close() ("closes all the devices and
    cleans up the runtime state", nrt.h), in the library already loaded. A process whose
    runtime never started has no such library loaded: nothing is done. Never raises.
    """
    xlac = getattr(sys.modules.get("torch_xla"), "_XLAC", None)
    try:
        if xlac is not None and xlac._xla_runtime_is_initialized():
            xlac._prepare_to_exit()
    except Exception:  # noqa: BLE001 - the profile is best effort, the job's status is not
        pass
    for name in _LIBNRT:
        try:
            close = ctypes.CDLL(name, mode=os.RTLD_NOLOAD).nrt_close
        except (OSError, AttributeError):  # not loaded (or not the runtime's)
            continue
        close.restype = None
        close()
        return


def _receive_fds(conn: Connection, count: int) -> list[int]:
    sock = socket.socket(fileno=conn.fileno())
    try:
        return reduction.recvfds(sock, count)
    finally:
        sock.detach()


def _send(conn: Connection, msg: protocol.Message) -> bool:
    """Send a message; False when the channel is gone (a job may have closed it)."""
    try:
        conn.send_bytes(msg.encode())
        return True
    except (OSError, ValueError):
        return False


class ScriptRunner:
    """Runs one job at a time inside this worker, then restores the clean state."""

    def __init__(self, baseline: Baseline | None, fingerprint: Fingerprint | None, isolated: bool,
                 job_paths: tuple[str, ...] = (), keep_fds: tuple[int, ...] = ()):
        self.baseline = baseline
        self.fingerprint = fingerprint
        self.isolated = isolated
        self.job_paths = job_paths
        self.keep_fds = keep_fds  # the channel: every other fd a job left is closed

    def run(self, msg: protocol.RunJob, pipes: list[int], last: bool = False) -> protocol.JobDone:
        """Execute msg.main_path as __main__ with fds 1 and 2 on the pipes; never raises.
        `last`: this process ends after the job (nothing to restore)."""
        _redirect(pipes)
        if not last:
            _reset_peak_rss()
        os.environ["TMPDIR"] = msg.tmp_dir
        os.environ["HOME"] = msg.job_dir
        tempfile.tempdir = None  # cached by whoever asked before: recomputed from TMPDIR
        base_threads = self.baseline.threads if self.baseline else frozenset(threading.enumerate())
        # A reused worker runs only the job's own atexit handlers; the last job of its
        # process, what the interpreter's exit would do for it (_LastAtexit).
        handlers = _LastAtexit() if last else JobAtexit()
        try:
            with handlers:
                # A context of its own, as a new interpreter's: context variables a job
                # sets (decimal's context, a library's) end with it.
                return_code, error_type, error_message = contextvars.Context().run(
                    execute_main, msg.main_path, msg.job_dir, self.job_paths)
            _finish_like_python(base_threads, handlers)
        except KeyboardInterrupt:  # arrived while we were finishing up: still a stop
            return_code, error_type, error_message = -signal.SIGINT, "exception", "KeyboardInterrupt"
        if self.baseline is not None:
            self.baseline.restore_builtins()
        _flush_std_streams()
        peak = _peak_rss()
        _redirect_to_devnull()  # the job's pipes close here: its output ends
        if self.isolated:
            _kill_the_rest()
        return protocol.JobDone(msg.job_id, return_code, error_type,
                                protocol.clip(error_message) if error_message else None, peak)

    def restore(self, msg: protocol.RunJob) -> protocol.WorkerIdle:
        """Put the clean state back; say what could not be (the worker is then replaced)."""
        started = time.perf_counter()
        dirty = self.baseline.restore(msg.job_dir, self.job_paths, keep_fds=self.keep_fds)
        if self.fingerprint is not None:
            dirty.extend(self.fingerprint.changes())
        dirty.extend(self.baseline.new_modules())
        return protocol.WorkerIdle(tuple(protocol.clip(d, 500) for d in dirty[:20]),
                                   time.perf_counter() - started)


def _redirect(pipes: list[int]) -> None:
    devnull = os.open(os.devnull, os.O_RDONLY)
    for src, dst in ((devnull, 0), (pipes[0], 1), (pipes[1], 2)):
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


def _redirect_to_devnull() -> None:
    """fds 0-2 onto /dev/null, whatever the job closed or replaced."""
    devnull = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1, 2):
        if fd != devnull:
            os.dup2(devnull, fd)
    if devnull > 2:
        os.close(devnull)


def _kill_the_rest() -> None:
    """SIGKILL every other process of this uid: what the job started, daemons included.

    kill(-1) reaches every process we may signal except ourselves, under the kernel's
    task list lock, so nothing escapes by forking. Dying takes a moment for a process
    forked from a worker (its address space is torn down): our own children are reaped
    here (at most _KILL_WAIT_S), so that the restore does not see them still running;
    the others are the template's to reap, and the supervisor's check from outside
    counts a process with SIGKILL pending as on its way out.
    """
    try:
        os.kill(-1, signal.SIGKILL)
    except OSError:  # ESRCH: there was nothing else
        return
    deadline = time.monotonic() + _KILL_WAIT_S
    while time.monotonic() < deadline:
        try:
            if os.waitpid(-1, os.WNOHANG)[0] == 0:
                time.sleep(0.001)
        except ChildProcessError:
            return


def _text_stream(fd: int, errors: str, unbuffered: bool, line_buffering: bool) -> io.TextIOWrapper:
    raw = io.FileIO(fd, "w", closefd=False)
    binary = raw if unbuffered else io.BufferedWriter(raw, _BUFFER_SIZE)
    return io.TextIOWrapper(binary, encoding="utf-8", errors=errors,
                            line_buffering=line_buffering, write_through=unbuffered)


def execute_main(main_path: str, job_dir: str,
                 job_paths: tuple[str, ...] = ()) -> tuple[int, str | None, str | None]:
    """Run the file as `python main.py` would; return (exit status, error_type, message).

    sys.path starts with the script's dir, then the job helper dirs: what PYTHONPATH
    (which the worker's environment sets to them) gives a fresh interpreter.
    """
    module = types.ModuleType("__main__")
    module.__file__ = main_path
    module.__builtins__ = __builtins__
    module.__spec__ = None
    module.__loader__ = None
    sys.modules["__main__"] = module
    sys.argv[:] = [main_path]
    sys.path[:0] = [job_dir, *job_paths]
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


class JobAtexit:
    """The job's atexit handlers, kept apart from the worker's own.

    While the job runs, atexit.register and atexit.unregister record into this list; the
    handlers that libraries registered before (cleanups of the worker's own state) are
    not the job's to run. `run` calls the job's last-registered first, reporting a
    failing one as CPython does at exit. A handler registered around this (through a
    reference taken earlier) shows in atexit._ncallbacks() and makes the worker dirty.
    """

    def __init__(self) -> None:
        self.handlers: list[tuple[Any, tuple, dict]] = []
        self._saved: tuple[Any, Any] | None = None

    def register(self, func: Any, /, *args: Any, **kwargs: Any) -> Any:
        self.handlers.append((func, args, kwargs))
        return func

    def unregister(self, func: Any, /) -> None:
        self.handlers = [h for h in self.handlers if h[0] != func]

    def __enter__(self) -> JobAtexit:
        self._saved = (atexit.register, atexit.unregister)
        atexit.register, atexit.unregister = self.register, self.unregister
        return self

    def __exit__(self, *exc: object) -> None:
        atexit.register, atexit.unregister = self._saved

    def run(self) -> None:
        while self.handlers:
            func, args, kwargs = self.handlers.pop()
            _call_like_atexit(func, *args, **kwargs)


class _LastAtexit(JobAtexit):
    """How the last job of its process ends: what the interpreter's exit would do that a
    job can see, without the libraries' own teardown.

    At exit CPython runs every atexit handler, last registered first. The job's own run
    first (JobAtexit records them). Then those the template's imports registered whose
    work is the job's: the weakref finalizers the job created (a TemporaryDirectory's
    removal), multiprocessing's (it joins the job's children and releases their
    semaphores, before its resource tracker would warn of leaks) and logging's flush of
    the job's handlers. Left out: the libraries' teardown of themselves (torch.library's
    140 registry resets, 60-90 ms measured here), which the process's end makes moot.
    """

    def __enter__(self) -> _LastAtexit:
        self._finalizers = set(weakref.finalize._registry)
        return super().__enter__()

    def run(self) -> None:
        super().run()
        made = [f for f in list(weakref.finalize._registry) if f not in self._finalizers]
        for finalizer in sorted(made, key=lambda f: weakref.finalize._registry[f].index, reverse=True):
            if finalizer.atexit:
                _call_like_atexit(finalizer)
        for module, name in (("multiprocessing.util", "_exit_function"), ("logging", "shutdown")):
            loaded = sys.modules.get(module)
            if loaded is not None:
                _call_like_atexit(getattr(loaded, name))


def _call_like_atexit(func: Any, *args: Any, **kwargs: Any) -> None:
    """Call an exit handler; report its failure as CPython does at exit."""
    try:
        func(*args, **kwargs)
    except SystemExit:
        pass
    except BaseException as exc:  # noqa: BLE001 - reported like CPython, then the next
        sys.unraisablehook(types.SimpleNamespace(
            exc_type=type(exc), exc_value=exc, exc_traceback=exc.__traceback__,
            err_msg="Exception ignored in atexit callback", object=func))


def _finish_like_python(base_threads, handlers: JobAtexit) -> None:
    """What the interpreter does at exit: join non-daemon threads, run atexit handlers."""
    for thread in threading.enumerate():
        if thread not in base_threads and not thread.daemon and thread.is_alive():
            thread.join()
    handlers.run()


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
