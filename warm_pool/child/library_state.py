"""What the libraries that training scripts commonly use keep between two jobs, put back.

A fresh `python main.py` starts with no pyplot figures, matplotlib's rcParams as the
environment set them, no tqdm monitor thread and numpy's global random state seeded
from the OS. In a warm worker the previous job's state would still be there: its open
figures (the next job's ``plt.plot`` would draw on them), the style it chose, the
thread tqdm starts with its first bar (a live thread makes a worker dirty), the seed
it set, numpy's floating-point error handling (``np.seterr(all='raise')`` is an
ordinary line in generated scripts, and would make a later job's overflow an
exception) and torch's flush-denormal mode (later jobs' small numbers would become 0).
`LibraryState.take()` records this once per worker, `restore()` puts it back after
every job. Only libraries already imported are touched; none is imported here.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from typing import Any

from warm_pool.protocol import error_text

_MISSING = object()
_TQDM_ATTRS = ("monitor", "_instances", "_lock")
_TQDM_JOIN_S = 1.0


@dataclass
class LibraryState:
    """The clean state of commonly used libraries in this worker."""

    rc_params: dict[str, Any] | None = None
    tqdm_classes: dict[type, dict[str, Any]] = field(default_factory=dict)
    numpy_errors: tuple[dict[str, str], Any] | None = None  # geterr(), geterrcall()
    flush_denormal: bool | None = None

    @classmethod
    def take(cls) -> LibraryState:
        state = cls()
        mpl = sys.modules.get("matplotlib")
        if mpl is not None:
            state.rc_params = dict.copy(mpl.rcParams)
        for klass in _tqdm_classes():
            state.tqdm_classes[klass] = {a: vars(klass).get(a, _MISSING) for a in _TQDM_ATTRS}
        numpy = sys.modules.get("numpy")
        if numpy is not None:
            state.numpy_errors = numpy.geterr(), numpy.geterrcall()
        torch = sys.modules.get("torch")
        if torch is not None:
            state.flush_denormal = flushes_denormals(torch)
        return state

    def restore(self) -> list[str]:
        """Put the libraries' state back; return what could not be (the worker is dirty)."""
        dirty: list[str] = []
        for step in (self._restore_matplotlib, self._restore_tqdm, reseed_numpy,
                     self._restore_numpy_errors, self._restore_flush_denormal):
            try:
                step()
            except Exception as exc:  # noqa: BLE001 - a library we cannot reset: replace the worker
                dirty.append(f"{step.__name__.strip('_').replace('_', ' ')} failed: {error_text(exc)}")
        return dirty

    def _restore_matplotlib(self) -> None:
        pyplot = sys.modules.get("matplotlib.pyplot")
        if pyplot is not None:
            pyplot.close("all")
        mpl = sys.modules.get("matplotlib")
        if mpl is not None and self.rc_params is not None and dict(mpl.rcParams) != self.rc_params:
            # Raw dict methods: the saved values were valid, and RcParams.__setitem__
            # would re-validate (and resolve the backend) for nothing.
            dict.clear(mpl.rcParams)
            dict.update(mpl.rcParams, self.rc_params)

    def _restore_tqdm(self) -> None:
        """Stop every monitor thread the job's bars started; put the classes back."""
        for klass in _tqdm_classes():
            monitor = vars(klass).get("monitor")
            if monitor is not None and hasattr(monitor, "was_killed"):
                # What TMonitor.exit() does, with a bound: it waits on that event, but a
                # thread the job left may hold the lock it takes next (then the thread is
                # still alive, and the worker is found dirty for it).
                monitor.was_killed.set()
                monitor.join(_TQDM_JOIN_S)
            saved = self.tqdm_classes.get(klass)
            if saved is None:  # a class the job defined: it goes with the job
                continue
            for attr, value in saved.items():
                if value is _MISSING:
                    if attr in vars(klass):
                        delattr(klass, attr)
                elif vars(klass).get(attr, _MISSING) is not value:
                    setattr(klass, attr, value)
            instances = vars(klass).get("_instances")
            if instances is not None:
                instances.clear()

    def _restore_numpy_errors(self) -> None:
        numpy = sys.modules.get("numpy")
        if numpy is None or self.numpy_errors is None:
            return
        errors, call = self.numpy_errors
        if numpy.geterr() != errors:
            numpy.seterr(**errors)
        if numpy.geterrcall() is not call:
            numpy.seterrcall(call)
        if (numpy.geterr(), numpy.geterrcall()) != self.numpy_errors:
            raise RuntimeError(f"numpy's error handling is still {numpy.geterr()}")

    def _restore_flush_denormal(self) -> None:
        torch = sys.modules.get("torch")
        if torch is None or self.flush_denormal is None:
            return
        if flushes_denormals(torch) != self.flush_denormal:
            torch.set_flush_denormal(self.flush_denormal)
            if flushes_denormals(torch) != self.flush_denormal:
                raise RuntimeError("denormal numbers are still flushed to zero")


def flushes_denormals(torch: Any) -> bool:
    """Whether torch.set_flush_denormal(True) is in effect on this thread (it has no getter):
    a denormal double times 1 is 0 then. On the CPU, explicitly: a job may have changed
    the default device."""
    return (torch.tensor([1e-310], dtype=torch.float64, device="cpu") * 1).item() == 0.0


def _tqdm_classes() -> list[type]:
    std = sys.modules.get("tqdm.std")
    if std is None:
        return []
    out, todo = [], [std.tqdm]
    while todo:
        klass = todo.pop()
        if klass not in out:
            out.append(klass)
            todo.extend(klass.__subclasses__())
    return out


def reseed_numpy() -> None:
    """numpy's global RandomState from the OS, as in a new process (workers forked from
    one template would otherwise all start from the template's state)."""
    numpy = sys.modules.get("numpy")
    if numpy is not None and "numpy.random" in sys.modules:
        numpy.random.seed()
