"""What a reused worker's process keeps between jobs that no Python object shows.

`isolation.Baseline` puts the interpreter back after each job; this is the state below
it, in the kernel and the C runtime, which a job changes with one ordinary call (or one
ctypes call) and which `python main.py` in a new process would not inherit. Each kind is
recorded by `NativeState.take()` and, after every job, reset or checked:

- interval timers (real, virtual, prof): disarmed, their signals' handlers re-installed
  (a job's leftover ``ITIMER_PROF`` kills a later job). First, before anything else.
- a pending ``faulthandler.dump_traceback_later``: cancelled; faulthandler's enabled
  state and its per-signal dumps (``faulthandler.register``) put back.
- the main thread's signal mask, timer slack, scheduling policy, priority and nice (of
  every thread the worker had): set back. An unprivileged uid may not lower nice or
  leave ``SCHED_IDLE``: then the worker is dirty.
- dumpable (``PR_SET_DUMPABLE 0`` hides the process's /proc files, its peak included):
  set back.
- fds: every fd the job left open (memfds too: the next paper's job could read them) is
  closed, except 0-2, ``keep_fds`` (the worker's channel) and read-only fds on the
  installation's own files (`_installed_file`: matplotlib keeps its fonts open). The fds
  the worker had (its device's, its runtime's) stay; one the job closed or replaced makes
  it dirty.
- libc's ``environ``, which ``os.putenv`` and ctypes ``setenv`` (``LD_PRELOAD``) change
  behind ``os.environ`` and which every subprocess inherits: set back.
- what cannot be undone makes the worker dirty: a seccomp filter added or the seccomp
  mode or ``no_new_privs`` changed (/proc/self/status), a thread (task) the worker did
  not have (a ``_thread`` thread, one dropped from ``threading``'s registry, a native
  one), an ``os.register_at_fork`` hook added or removed (found in CPython's own lists,
  see `_fork_hook_lists`).

Not seen here (a fresh process per job, the default, is the fix): a Landlock ruleset the
job added (the kernel counts none anywhere we can read, and probing access path by path
would still miss rules on paths not probed); ``pthread_atfork`` handlers registered from
C; a signal disposition changed through ctypes for a signal other than the timers'; the
FPU mode, timer slack or seccomp filter of a thread other than the main one, set from
inside it (a thread the job started is dirty anyway); personality, I/O priority,
``PR_SET_PDEATHSIG`` and other prctl flags; anything a ctypes write changes in memory.

Closing the job's fds has one hazard: a library that keeps an fd's number (opened during
the job, not before the baseline) would later fail on it, or use whatever file gets that
number. Read-only files of the installation are therefore kept, and multiprocessing's
resource tracker, which a job starts, is told (`_forget_closed_fds`); other such state
(an asyncio loop a job left as the policy's) breaks in the next job.
"""

from __future__ import annotations

import ctypes
import faulthandler
import fcntl
import operator
import os
import signal
import stat
import struct
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from warm_pool.protocol import error_text

_libc = ctypes.CDLL(None, use_errno=True)
_libc.setenv.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_int]
_libc.unsetenv.argtypes = [ctypes.c_char_p]
# libc's `char **environ` itself (not a copy): indexing it reads the current array.
_ENVIRON = ctypes.POINTER(ctypes.c_char_p).in_dll(_libc, "environ")

_PR_GET_DUMPABLE, _PR_SET_DUMPABLE = 3, 4
_PR_SET_TIMERSLACK, _PR_GET_TIMERSLACK = 29, 30
_ITIMERS = (signal.ITIMER_REAL, signal.ITIMER_VIRTUAL, signal.ITIMER_PROF)
_TIMER_SIGNALS = (signal.SIGALRM, signal.SIGVTALRM, signal.SIGPROF)
# faulthandler.register refuses the signals it handles itself (enable()).
_FAULT_SIGNALS = {signal.SIGSEGV, signal.SIGFPE, signal.SIGABRT, signal.SIGBUS, signal.SIGILL}
_USER_SIGNALS = [s for s in signal.valid_signals()
                 if s not in _FAULT_SIGNALS and s not in (signal.SIGKILL, signal.SIGSTOP)]
_STATUS_FIELDS = ("NoNewPrivs", "Seccomp", "Seccomp_filters")
# Where the register_at_fork lists are looked for: the start of the interpreter's state
# (they are about 3.5 KiB in on CPython 3.11).
_INTERPRETER_SCAN_BYTES = 1 << 16
# Where the installation's files are (see _installed_file); never "/" itself.
_INSTALLED = tuple({os.path.join(p, "") for p in (sys.prefix, sys.base_prefix, sys.exec_prefix, "/usr")
                    if p.strip("/")})
# How long a thread the job ended may take to leave /proc/self/task.
_TASK_EXIT_WAIT_S = 0.05


@dataclass
class NativeState:
    """The worker's clean kernel and C-runtime state, taken once and restored after every job."""

    timer_handlers: dict[int, Any] = field(default_factory=dict)
    signal_mask: set[int] = field(default_factory=set)
    faulthandler_enabled: bool = False
    timer_slack: int = 0
    scheduling: dict[int, tuple[int, int, int]] = field(default_factory=dict)
    dumpable: int = 1
    fds: dict[int, tuple[int, int]] = field(default_factory=dict)
    environ: list[bytes] = field(default_factory=list)
    confinement: dict[str, str] = field(default_factory=dict)
    tasks: set[str] = field(default_factory=set)
    fork_hooks: list[tuple[list[Any], list[Any]]] = field(default_factory=list)
    closed_fds: list[str] = field(default_factory=list)  # what the last restore closed, for logs

    @classmethod
    def take(cls) -> NativeState:
        """Record the current (clean) state; call it from the main thread."""
        tasks = _tasks()
        return cls(
            timer_handlers={s: signal.getsignal(s) for s in _TIMER_SIGNALS},
            signal_mask=set(signal.pthread_sigmask(signal.SIG_BLOCK, [])),
            faulthandler_enabled=faulthandler.is_enabled(),
            timer_slack=_prctl(_PR_GET_TIMERSLACK),
            scheduling={int(t): s for t in tasks if (s := _scheduling(int(t))) is not None},
            dumpable=_prctl(_PR_GET_DUMPABLE),
            fds={fd: ident for fd in _open_fds() if fd > 2 and (ident := _identity(fd)) is not None},
            environ=sorted(_c_environ()),
            confinement=_confinement(),
            tasks=tasks,
            fork_hooks=[(hooks, list(hooks)) for hooks in _fork_hook_lists()],
        )

    def stop_timers(self) -> list[str]:
        """Disarm what the job armed, first: nothing may fire while the rest is restored.

        faulthandler's later dump runs in a thread of its own; it is cancelled only when
        such a thread exists. (In a process forked while a dump was pending, the cancel
        would wait forever for a thread that fork did not copy.)
        """
        try:
            for which in _ITIMERS:
                signal.setitimer(which, 0)
            for sig, handler in self.timer_handlers.items():
                if handler is not None:  # again even if Python sees no change: ctypes may have set one
                    signal.signal(sig, handler)
            if _tasks() - self.tasks:
                faulthandler.cancel_dump_traceback_later()
        except Exception as exc:  # noqa: BLE001 - a timer left armed: replace the worker
            return [f"timers could not be stopped: {error_text(exc)}"]
        return []

    def restore(self, keep_fds: Iterable[int] = ()) -> list[str]:
        """Put back or check everything else; return why the worker must be replaced, if at all.

        Call it after `os.environ` was restored (the C environment is compared with it in place).
        """
        keep = frozenset(keep_fds)
        steps: list[tuple[str, Callable[[], list[str]]]] = [
            ("signal mask", self._restore_signal_mask),
            ("faulthandler", self._restore_faulthandler),
            ("timer slack", self._restore_timer_slack),
            ("scheduling", self._restore_scheduling),
            ("dumpable", self._restore_dumpable),
            ("fds", lambda: self._close_fds(keep)),
            ("C environment", self._restore_c_environ),
            ("seccomp", self._check_confinement),
            ("fork hooks", self._check_fork_hooks),
            ("threads", self._check_tasks),
        ]
        dirty: list[str] = []
        for name, step in steps:
            try:
                dirty.extend(step())
            except Exception as exc:  # noqa: BLE001 - state we cannot put back: replace the worker
                dirty.append(f"{name} could not be restored: {error_text(exc)}")
        return dirty

    def _restore_signal_mask(self) -> list[str]:
        if set(signal.pthread_sigmask(signal.SIG_BLOCK, [])) != self.signal_mask:
            signal.pthread_sigmask(signal.SIG_SETMASK, self.signal_mask)
        return []

    def _restore_faulthandler(self) -> list[str]:
        for sig in _USER_SIGNALS:  # False when none was registered: cheap
            faulthandler.unregister(sig)
        if self.faulthandler_enabled:  # again, whatever file the job gave it
            faulthandler.enable(file=2)  # as PYTHONFAULTHANDLER does: stderr
        elif faulthandler.is_enabled():
            faulthandler.disable()
        return []

    def _restore_timer_slack(self) -> list[str]:
        if _prctl(_PR_GET_TIMERSLACK) != self.timer_slack:
            _prctl(_PR_SET_TIMERSLACK, self.timer_slack)
            if _prctl(_PR_GET_TIMERSLACK) != self.timer_slack:
                return ["timer slack could not be restored"]
        return []

    def _restore_scheduling(self) -> list[str]:
        """Policy, priority and nice of each thread the worker had (all are per thread)."""
        dirty = []
        for tid, saved in self.scheduling.items():
            now = _scheduling(tid)
            if now is None or now == saved:  # None: the thread ended (checked with the tasks)
                continue
            policy, priority, nice = saved
            try:
                if now[:2] != saved[:2]:
                    os.sched_setscheduler(tid, policy, os.sched_param(priority))
                if _scheduling(tid)[2] != nice:
                    os.setpriority(os.PRIO_PROCESS, tid, nice)
            except PermissionError:  # an unprivileged uid cannot lower nice or leave SCHED_IDLE
                pass
            if _scheduling(tid) != saved:
                dirty.append(f"scheduling of thread {tid} could not be restored "
                             f"(policy, priority, nice {_scheduling(tid)}, was {saved})")
        return dirty

    def _restore_dumpable(self) -> list[str]:
        if _prctl(_PR_GET_DUMPABLE) != self.dumpable:
            _prctl(_PR_SET_DUMPABLE, self.dumpable)
            if _prctl(_PR_GET_DUMPABLE) != self.dumpable:
                return ["dumpable flag could not be restored"]
        return []

    def _close_fds(self, keep: frozenset[int]) -> list[str]:
        """Close every fd the job left; the worker's own must still be what they were."""
        self.closed_fds = []
        closed = set()
        for fd in _open_fds():
            if fd <= 2 or fd in keep or fd in self.fds:
                continue
            try:
                target = os.readlink(f"/proc/self/fd/{fd}")
                if _installed_file(fd, target):
                    continue
                os.close(fd)
            except OSError:  # the listing's own fd, closed already
                continue
            closed.add(fd)
            self.closed_fds.append(f"{fd} -> {target}")
        _forget_closed_fds(closed)
        changed = sorted(fd for fd, ident in self.fds.items() if fd not in keep and _identity(fd) != ident)
        if changed:
            return [f"fds the worker had were closed or replaced: {changed}"]
        return []

    def _restore_c_environ(self) -> list[str]:
        now = _c_environ()
        if sorted(now) == self.environ:
            return []
        saved = _by_name(self.environ)
        for name, count in Counter(entry.partition(b"=")[0] for entry in now).items():
            if name not in saved or count > 1:  # unsetenv removes every copy
                _libc.unsetenv(name)
        current = _by_name(_c_environ())
        for name, value in saved.items():
            if current.get(name) != value:
                _libc.setenv(name, value, 1)
        if sorted(_c_environ()) != self.environ:
            return ["the C environment could not be restored"]
        return []

    def _check_confinement(self) -> list[str]:
        now = _confinement()
        if now != self.confinement:
            changes = ", ".join(f"{k} {self.confinement.get(k)} -> {v}" for k, v in now.items()
                                if self.confinement.get(k) != v)
            return [f"seccomp or no_new_privs changed (cannot be undone): {changes}"]
        return []

    def _check_fork_hooks(self) -> list[str]:
        for hooks, saved in self.fork_hooks:
            if len(hooks) != len(saved) or any(map(operator.is_not, hooks, saved)):
                return ["os.register_at_fork hooks changed (they cannot be removed safely)"]
        return []

    def _check_tasks(self) -> list[str]:
        deadline = time.monotonic() + _TASK_EXIT_WAIT_S
        while (extra := _tasks() - self.tasks) and time.monotonic() < deadline:
            time.sleep(0.001)
        if extra:
            return [f"threads the worker did not have (tids {', '.join(sorted(extra)[:8])})"]
        return []


def _prctl(option: int, value: int = 0) -> int:
    return _libc.prctl(option, ctypes.c_ulong(value), ctypes.c_ulong(0), ctypes.c_ulong(0),
                       ctypes.c_ulong(0))


def _tasks() -> set[str]:
    return set(os.listdir("/proc/self/task"))


def _scheduling(tid: int) -> tuple[int, int, int] | None:
    """(policy, static priority, nice) of one thread; None when it has ended."""
    try:
        return (os.sched_getscheduler(tid), os.sched_getparam(tid).sched_priority,
                os.getpriority(os.PRIO_PROCESS, tid))
    except (ProcessLookupError, PermissionError):
        return None


def _open_fds() -> list[int]:
    return [int(fd) for fd in os.listdir("/proc/self/fd")]


def _identity(fd: int) -> tuple[int, int] | None:
    """What an fd refers to (device, inode); None when it is closed."""
    try:
        st = os.fstat(fd)
    except OSError:
        return None
    return st.st_dev, st.st_ino


def _installed_file(fd: int, target: str) -> bool:
    """Whether fd is open read-only on a file of the installation (Python's prefixes, /usr),
    still there under that name: what a preloaded library opens and keeps for later (a
    font, a data file). It gives a later job nothing it could not open itself, and a job
    cannot write there under its own uid."""
    if not target.startswith(_INSTALLED):
        return False
    if fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_ACCMODE != os.O_RDONLY:
        return False
    opened = os.fstat(fd)
    try:
        return stat.S_ISREG(opened.st_mode) and os.path.samestat(opened, os.stat(target))
    except OSError:  # deleted or renamed since
        return False


def _forget_closed_fds(closed: set[int]) -> None:
    """multiprocessing's resource tracker keeps its pipe's fd number (its process ended
    with the job): forgotten, so that it starts a new one instead of writing into
    whatever file later gets that number."""
    tracker = getattr(sys.modules.get("multiprocessing.resource_tracker"), "_resource_tracker", None)
    if tracker is not None and getattr(tracker, "_fd", None) in closed:
        tracker._fd = tracker._pid = None


def _c_environ() -> list[bytes]:
    """libc's environment, which exec hands to every child: entries in its own order."""
    out: list[bytes] = []
    if not _ENVIRON:  # NULL: a job cleared it
        return out
    i = 0
    while (entry := _ENVIRON[i]) is not None:
        out.append(entry)
        i += 1
    return out


def _by_name(entries: list[bytes]) -> dict[bytes, bytes]:
    return dict(entry.partition(b"=")[::2] for entry in entries)


def _confinement() -> dict[str, str]:
    """The seccomp mode, its filter count and no_new_privs, from /proc/self/status."""
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in _STATUS_FIELDS:
                out[key] = value.strip()
    return out


def _fork_hook_lists() -> list[list[Any]]:
    """CPython's three lists of os.register_at_fork hooks (before, after in the parent, after
    in the child), or [] when they cannot be found (then added hooks go unseen).

    The interpreter keeps them in its C state, as three neighbouring pointers, with no API
    to read them, and the template's gc.freeze() hides them from gc.get_referrers. So a
    probe hook (it does nothing) is registered in all three, and the interpreter state is
    read through /proc/self/mem (where a bad address is an error, not a crash) for three
    neighbouring pointers to lists whose last item is the probe: those are the lists,
    and the same objects for the interpreter's life. About 1 ms, once.
    """
    def probe() -> None:
        pass

    if ctypes.sizeof(ctypes.c_void_p) != 8:
        return []
    os.register_at_fork(before=probe, after_in_parent=probe, after_in_child=probe)
    interpreter = ctypes.pythonapi.PyInterpreterState_Get
    interpreter.restype = ctypes.c_void_p
    try:
        mem = os.open("/proc/self/mem", os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return []
    try:
        data = os.pread(mem, _INTERPRETER_SCAN_BYTES, interpreter())
        run: list[int] = []
        for address in memoryview(data)[:len(data) // 8 * 8].cast("Q"):
            run = [*run, address] if _is_list_ending_with(mem, address, id(probe)) else []
            if len(run) == 3:
                return [ctypes.cast(a, ctypes.py_object).value for a in run]
    finally:
        os.close(mem)
    return []


def _is_list_ending_with(mem: int, address: int, last: int) -> bool:
    """Whether memory at `address` is a list object whose last item is at `last`."""
    if not address or address % 8:
        return False
    try:  # PyListObject: refcount, type, size, items
        _, kind, size, items = struct.unpack("4Q", os.pread(mem, 32, address))
        return (kind == id(list) and 0 < size < 1 << 20
                and struct.unpack("Q", os.pread(mem, 8, items + 8 * (size - 1)))[0] == last)
    except (OSError, OverflowError, struct.error):
        return False
