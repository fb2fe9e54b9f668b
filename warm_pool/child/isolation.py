"""What one job changes must not be seen by the next: the state a worker puts back.

`Baseline.take()` records, once per worker after its device is ready, every piece of
interpreter and process state a script commonly changes: cwd, environment, sys.path and
argv, modules imported from the job dir, logging (every logger's level, handlers,
filters), warnings, builtins, signal handlers, std streams and hooks, recursion and
int-to-str limits, resource limits, umask, CPU affinity, torch's global settings and
print options, what common libraries keep (library_state.py: pyplot figures, rcParams,
tqdm's monitor thread, numpy's seed and error handling, torch's flush-denormal mode),
and what the kernel and libc keep for the process (native_state.py: timers, scheduling,
fds, the C environment, seccomp, threads). `Baseline.restore()` puts it back after each
job, drops the modules the job imported from its own dir and the job helper dirs, closes
the fds the job left open, and returns what it could not (dirty): threads or child
processes still alive, atexit handlers, a resource limit the job lowered for good, a
seccomp filter. What a job does to library code and global registries is the
fingerprint's business (integrity.py). A dirty worker is replaced, never reused.
"""

from __future__ import annotations

import atexit
import builtins
import logging
import os
import random
import resource
import signal
import sys
import tempfile
import threading
import warnings
from dataclasses import dataclass, field
from typing import Any

from warm_pool.child.library_state import LibraryState
from warm_pool.child.native_state import NativeState

_SIGNALS = [s for s in signal.valid_signals() if s not in (signal.SIGKILL, signal.SIGSTOP)]


def _torch_state() -> dict[str, Any] | None:
    torch = sys.modules.get("torch")
    if torch is None:
        return None
    with warnings.catch_warnings():  # torch 2.9 warns that the TF32 API will change
        warnings.simplefilter("ignore")
        return _read_torch_state(torch)


def _read_torch_state(torch: Any) -> dict[str, Any]:
    return {
        "dtype": torch.get_default_dtype(),
        "grad": torch.is_grad_enabled(),
        "threads": torch.get_num_threads(),
        "deterministic": torch.are_deterministic_algorithms_enabled(),
        "deterministic_warn_only": torch.is_deterministic_algorithms_warn_only_enabled(),
        "matmul_precision": torch.get_float32_matmul_precision(),
        "anomaly": torch.is_anomaly_enabled(),
        "cudnn": (torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark),
        "device": torch.get_default_device(),
    }


def _restore_torch(state: dict[str, Any] | None) -> None:
    torch = sys.modules.get("torch")
    if torch is None or state is None:
        return
    # Each setter is called only when its value changed: some of them record a stack
    # trace every call, which would double the cost of an empty job.
    current = _read_torch_state(torch)
    if current["dtype"] != state["dtype"]:
        torch.set_default_dtype(state["dtype"])
    if current["grad"] != state["grad"]:
        torch.set_grad_enabled(state["grad"])
    if current["threads"] != state["threads"]:
        torch.set_num_threads(state["threads"])
    if (current["deterministic"], current["deterministic_warn_only"]) != (
            state["deterministic"], state["deterministic_warn_only"]):
        torch.use_deterministic_algorithms(state["deterministic"], warn_only=state["deterministic_warn_only"])
    if current["matmul_precision"] != state["matmul_precision"]:
        torch.set_float32_matmul_precision(state["matmul_precision"])
    if current["anomaly"] != state["anomaly"]:
        torch.set_anomaly_enabled(state["anomaly"])
    if current["cudnn"] != state["cudnn"]:
        torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = state["cudnn"]
    if current["device"] != state["device"]:
        torch.set_default_device(state["device"])
    # A fresh process starts from a random seed; so does each job. (torch.seed() would
    # also queue lazy CUDA/XPU seeding calls that capture a stack trace each time.)
    torch.default_generator.seed()


@dataclass
class Baseline:
    """The worker's clean state, taken once and restored after every job."""

    cwd: str
    environ: dict[str, str]
    path: list[str]
    argv: list[str]
    modules: set[str]
    main_module: Any
    root_handlers: list[logging.Handler]
    root_level: int
    warning_filters: list[Any]
    showwarning: Any
    builtins: dict[str, Any]
    signals: dict[int, Any]
    streams: tuple[Any, ...]
    hooks: tuple[Any, ...]
    recursion_limit: int
    threads: set[threading.Thread]
    atexit_count: int
    torch: dict[str, Any] | None
    loggers: dict[str, tuple[Any, ...]] = field(repr=False, default_factory=dict)
    process: dict[str, Any] = field(repr=False, default_factory=dict)
    print_options: dict[str, Any] = field(repr=False, default_factory=dict)
    path_obj: list[str] = field(repr=False, default_factory=list)
    argv_obj: list[str] = field(repr=False, default_factory=list)
    filters_obj: list[Any] = field(repr=False, default_factory=list)
    libraries: LibraryState = field(repr=False, default_factory=LibraryState)
    native: NativeState = field(repr=False, default_factory=NativeState)

    @classmethod
    def take(cls) -> Baseline:
        """Record the current (clean) interpreter state."""
        return cls(
            cwd=os.getcwd(),
            environ=dict(os.environ),
            path=list(sys.path),
            argv=list(sys.argv),
            modules=set(sys.modules),
            main_module=sys.modules.get("__main__"),
            root_handlers=list(logging.root.handlers),
            root_level=logging.root.level,
            warning_filters=list(warnings.filters),
            showwarning=warnings.showwarning,
            builtins=dict(vars(builtins)),
            signals={s: _handler(signal.getsignal(s)) for s in _SIGNALS},
            streams=(sys.stdin, sys.stdout, sys.stderr, sys.__stdin__, sys.__stdout__, sys.__stderr__),
            hooks=(sys.excepthook, sys.displayhook, sys.breakpointhook, threading.excepthook),
            recursion_limit=sys.getrecursionlimit(),
            threads=set(threading.enumerate()),
            atexit_count=atexit._ncallbacks(),
            torch=_torch_state(),
            loggers={name: _logger_state(lg) for name, lg in _loggers()},
            process=_process_state(),
            print_options=_print_options(),
            path_obj=sys.path,
            argv_obj=sys.argv,
            filters_obj=warnings.filters,
            libraries=LibraryState.take(),
            native=NativeState.take(),
        )

    def restore(self, job_dir: str, job_paths: tuple[str, ...] = (),
                keep_fds: tuple[int, ...] = ()) -> list[str]:
        """Put the clean state back; return why this worker must be replaced, if at all.

        Modules imported from the job's dir or from a job helper dir (`job_paths`) are
        dropped: the next job imports them afresh, whatever this one did to them. Every
        fd the job left open is closed but 0-2, `keep_fds` (the worker's channel, and
        any other fd the worker opened since take()) and read-only fds on installed
        files (native_state.py says why).
        """
        dirty = self.native.stop_timers()
        dirty.extend(self.libraries.restore())
        for sig, handler in self.signals.items():
            if signal.getsignal(sig) is not handler and handler is not None:
                signal.signal(sig, handler)
        os.chdir(self.cwd)
        if os.environ != self.environ:
            os.environ.clear()
            os.environ.update(self.environ)
        dirty.extend(self.native.restore(keep_fds))  # the C environment too: after os.environ
        # The same list objects, so code holding a reference sees the reset too.
        sys.path, sys.argv = self.path_obj, self.argv_obj
        sys.path[:] = self.path
        sys.argv[:] = self.argv
        warnings.filters = self.filters_obj
        self._drop_job_modules((job_dir, *job_paths))
        sys.modules["__main__"] = self.main_module
        logging.root.handlers[:] = self.root_handlers
        logging.root.setLevel(self.root_level)
        self._restore_loggers()
        warnings.filters[:] = self.warning_filters
        warnings._filters_mutated()
        warnings.showwarning = self.showwarning
        warnings.onceregistry.clear()
        self.restore_builtins()
        (sys.stdin, sys.stdout, sys.stderr, sys.__stdin__, sys.__stdout__, sys.__stderr__) = self.streams
        sys.excepthook, sys.displayhook, sys.breakpointhook, threading.excepthook = self.hooks
        sys.setrecursionlimit(self.recursion_limit)
        tempfile.tempdir = None
        dirty.extend(_restore_process(self.process))
        _restore_print_options(self.print_options)
        random.seed()
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                _restore_torch(self.torch)
        except Exception as exc:  # noqa: BLE001 - a broken torch state is a dirty worker
            dirty.append(f"torch settings could not be restored: {exc}")
        dirty.extend(self.leftovers())
        return dirty

    def _restore_loggers(self) -> None:
        for name, lg in _loggers():
            saved = self.loggers.get(name)
            if saved is None:  # created by the job: it keeps nothing of the job's
                lg.setLevel(logging.NOTSET)
                lg.handlers.clear()
                lg.filters.clear()
                lg.propagate, lg.disabled = True, False
            elif _logger_state(lg) != saved:
                level, handlers, filters, lg.propagate, lg.disabled = saved
                lg.setLevel(level)
                lg.handlers[:] = handlers
                lg.filters[:] = filters

    def new_modules(self) -> list[str]:
        """Why the worker must go if the job imported library modules it did not have.

        The fingerprint cannot vouch for a module first loaded by a job (the job could
        have changed it before anyone looked), so such a worker is replaced. Keep
        workers warm by preloading what jobs commonly import.
        """
        new = sorted(set(sys.modules) - self.modules)
        if not new:
            return []
        return [f"imported modules that were not preloaded: {', '.join(new[:8])}"
                + (f" and {len(new) - 8} more" if len(new) > 8 else "")]

    def restore_builtins(self) -> None:
        """Builtins first: everything after the job (ours included) relies on them."""
        namespace = builtins.__dict__
        if namespace != self.builtins:
            namespace.clear()  # from here until update() no builtin name resolves
            namespace.update(self.builtins)

    def _drop_job_modules(self, dirs: tuple[str, ...]) -> None:
        prefixes = tuple(os.path.join(d, "") for d in dirs)
        for name in set(sys.modules) - self.modules:
            module = sys.modules.get(name)
            origin = getattr(module, "__file__", None) or ""
            if not isinstance(origin, str):  # a job can set anything as __file__
                origin = ""
            if origin.startswith(prefixes) or name == "__mp_main__":
                del sys.modules[name]

    def leftovers(self) -> list[str]:
        """What the job left that cannot be reset: threads, children, patched modules."""
        reasons = []
        extra = [t for t in threading.enumerate() if t not in self.threads and t.is_alive()]
        if extra:
            reasons.append("threads still running: " + ", ".join(sorted(t.name for t in extra)))
        if live_children():
            reasons.append("child processes still running")
        if atexit._ncallbacks() != self.atexit_count:
            reasons.append("atexit handlers registered")
        return reasons


def _handler(handler: Any) -> Any:
    """Signal handlers as CPython reports them in a fresh process (ints as Handlers)."""
    return signal.Handlers(handler) if isinstance(handler, int) else handler


def _loggers() -> list[tuple[str, logging.Logger]]:
    return [(name, lg) for name, lg in list(logging.Logger.manager.loggerDict.items())
            if isinstance(lg, logging.Logger)]


def _logger_state(lg: logging.Logger) -> tuple[Any, ...]:
    return lg.level, list(lg.handlers), list(lg.filters), lg.propagate, lg.disabled


# Soft resource limits a job may change for itself (and so for the next job).
_RLIMITS = ("RLIMIT_NOFILE", "RLIMIT_STACK", "RLIMIT_AS", "RLIMIT_DATA", "RLIMIT_NPROC",
            "RLIMIT_FSIZE", "RLIMIT_CORE", "RLIMIT_CPU", "RLIMIT_MEMLOCK")


def _process_state() -> dict[str, Any]:
    umask = os.umask(0o022)
    os.umask(umask)
    state: dict[str, Any] = {"umask": umask, "affinity": os.sched_getaffinity(0),
                             "int_max_str_digits": sys.get_int_max_str_digits(),
                             "switch_interval": sys.getswitchinterval()}
    for name in _RLIMITS:
        if hasattr(resource, name):
            state[name] = resource.getrlimit(getattr(resource, name))
    return state


def _restore_process(state: dict[str, Any]) -> list[str]:
    """Put back umask, CPU affinity, interpreter knobs and soft limits; dirty when it cannot."""
    dirty = []
    os.umask(state["umask"])
    if os.sched_getaffinity(0) != state["affinity"]:
        try:
            os.sched_setaffinity(0, state["affinity"])
        except OSError:
            dirty.append("CPU affinity could not be restored")
    sys.set_int_max_str_digits(state["int_max_str_digits"])
    sys.setswitchinterval(state["switch_interval"])
    for name in _RLIMITS:
        if name not in state:
            continue
        which = getattr(resource, name)
        if resource.getrlimit(which) != state[name]:
            try:
                resource.setrlimit(which, state[name])
            except (OSError, ValueError):
                dirty.append(f"{name} lowered (cannot be raised again)")
    return dirty


def _print_options() -> dict[str, Any]:
    """torch's and numpy's print options: they change what later jobs print."""
    out: dict[str, Any] = {}
    torch_str = sys.modules.get("torch._tensor_str")
    if torch_str is not None:
        out["torch"] = dict(vars(torch_str.PRINT_OPTS))
    numpy = sys.modules.get("numpy")
    if numpy is not None:
        out["numpy"] = numpy.get_printoptions()
    return out


def _restore_print_options(saved: dict[str, Any]) -> None:
    if "torch" in saved:
        opts = sys.modules["torch._tensor_str"].PRINT_OPTS
        if vars(opts) != saved["torch"]:
            vars(opts).clear()
            vars(opts).update(saved["torch"])
    if "numpy" in saved:
        numpy = sys.modules["numpy"]
        if numpy.get_printoptions() != saved["numpy"]:
            numpy.set_printoptions(**saved["numpy"])


def live_children() -> bool:
    """True if a child process is still running (exited ones are reaped here)."""
    while True:
        try:
            pid, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return False
        if pid == 0:
            return True
