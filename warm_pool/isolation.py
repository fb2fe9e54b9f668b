"""What one job changes must not be seen by the next.

`Baseline.take()` records, once per worker after its device is ready, every piece of
interpreter state a script can change cheaply; `Baseline.restore()` puts it back after
each job and returns the reasons the worker cannot be trusted again (dirty): threads or
child processes still alive, preloaded library modules whose attributes were replaced.
A dirty worker is replaced, never reused.
"""

from __future__ import annotations

import atexit
import builtins
import logging
import operator
import os
import random
import signal
import sys
import threading
import warnings
from dataclasses import dataclass, field
from typing import Any

# Library modules whose attributes a script might monkey-patch; a replaced attribute
# makes the worker dirty. New attributes are fine (lazy submodule imports add them).
WATCHED_MODULES = (
    "torch", "torch.nn", "torch.nn.functional", "torch.optim", "torch.utils.data",
    "torch_xla", "torch_neuronx", "numpy", "os", "sys", "time", "random", "json",
    "math", "logging", "warnings", "subprocess", "threading", "multiprocessing",
)

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
    watched: dict[str, tuple[list[str], list[Any]]] = field(repr=False, default_factory=dict)
    path_obj: list[str] = field(repr=False, default_factory=list)
    argv_obj: list[str] = field(repr=False, default_factory=list)
    filters_obj: list[Any] = field(repr=False, default_factory=list)

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
            watched={n: _public(vars(sys.modules[n])) for n in WATCHED_MODULES if n in sys.modules},
            path_obj=sys.path,
            argv_obj=sys.argv,
            filters_obj=warnings.filters,
        )

    def restore(self, job_dir: str) -> list[str]:
        """Put the clean state back; return why this worker must be replaced, if at all."""
        dirty: list[str] = []
        signal.setitimer(signal.ITIMER_REAL, 0)
        for sig, handler in self.signals.items():
            if signal.getsignal(sig) is not handler and handler is not None:
                signal.signal(sig, handler)
        os.chdir(self.cwd)
        if os.environ != self.environ:
            os.environ.clear()
            os.environ.update(self.environ)
        # The same list objects, so code holding a reference sees the reset too.
        sys.path, sys.argv = self.path_obj, self.argv_obj
        sys.path[:] = self.path
        sys.argv[:] = self.argv
        warnings.filters = self.filters_obj
        self._drop_job_modules(job_dir)
        sys.modules["__main__"] = self.main_module
        logging.root.handlers[:] = self.root_handlers
        logging.root.setLevel(self.root_level)
        warnings.filters[:] = self.warning_filters
        warnings._filters_mutated()
        warnings.showwarning = self.showwarning
        warnings.onceregistry.clear()
        self.restore_builtins()
        (sys.stdin, sys.stdout, sys.stderr, sys.__stdin__, sys.__stdout__, sys.__stderr__) = self.streams
        sys.excepthook, sys.displayhook, sys.breakpointhook, threading.excepthook = self.hooks
        sys.setrecursionlimit(self.recursion_limit)
        random.seed()
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                _restore_torch(self.torch)
        except Exception as exc:  # noqa: BLE001 - a broken torch state is a dirty worker
            dirty.append(f"torch settings could not be restored: {exc}")
        dirty.extend(self.leftovers())
        return dirty

    def restore_builtins(self) -> None:
        """Builtins first: everything after the job (ours included) relies on them."""
        namespace = builtins.__dict__
        if namespace != self.builtins:
            namespace.clear()  # from here until update() no builtin name resolves
            namespace.update(self.builtins)

    def _drop_job_modules(self, job_dir: str) -> None:
        prefix = os.path.join(job_dir, "")
        for name in set(sys.modules) - self.modules:
            module = sys.modules.get(name)
            origin = getattr(module, "__file__", None) or ""
            if origin.startswith(prefix) or name == "__mp_main__":
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
        for name, (keys, values) in self.watched.items():
            module = sys.modules.get(name)
            if module is None:
                reasons.append(f"module {name} removed")
                continue
            now = list(map(vars(module).get, keys))
            if not any(map(operator.is_not, now, values)):  # the fast path, all in C
                continue
            changed = [k for k, a, b in zip(keys, now, values, strict=True) if a is not b]
            if changed:
                reasons.append(f"module {name} patched: {', '.join(sorted(changed)[:5])}")
        return reasons


# Module attributes that restore() itself puts back (or that CPython updates).
_RESTORED_ATTRS = frozenset({
    "stdin", "stdout", "stderr", "__stdin__", "__stdout__", "__stderr__", "argv", "path",
    "excepthook", "displayhook", "breakpointhook", "last_type", "last_value", "last_traceback",
    "last_exc", "filters", "showwarning",
})


def _handler(handler: Any) -> Any:
    """Signal handlers as CPython reports them in a fresh process (ints as Handlers)."""
    return signal.Handlers(handler) if isinstance(handler, int) else handler


def _public(namespace: dict[str, Any]) -> tuple[list[str], list[Any]]:
    """A module's public attributes that restore() does not reset, as keys and values.

    Private ones are the module's own business (caches, counters).
    """
    keys = [k for k in namespace if not k.startswith("_") and k not in _RESTORED_ATTRS]
    return keys, [namespace[k] for k in keys]


def live_children() -> bool:
    """True if a child process is still running (exited ones are reaped here)."""
    while True:
        try:
            pid, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return False
        if pid == 0:
            return True
