"""The three kinds of failure, in one place.

1. The job failed (its own exception or exit status): not an exception at all, a
   JobResult with error_type set. `describe_exit` turns an exit status into its words.
2. The worker died: `WorkerDied`, carrying the exit code or signal and a human hint.
3. The pool itself is broken (the template could not import its modules, or worker
   starts keep failing): `PoolBroken`; the pool refuses jobs and says why while it keeps
   trying, slowly, and takes jobs again once a worker starts (restarts.py).
"""

from __future__ import annotations

import signal


class PoolError(Exception):
    """Base of every error the pool raises to its caller."""


class PoolBroken(PoolError):
    """The pool cannot run jobs now: the template or every recent worker start failed."""


class PoolClosed(PoolError):
    """The pool is shutting down or shut down and takes no new jobs."""


class QueueFull(PoolError):
    """The queue holds max_queue jobs already; try again later."""


class WorkerDied(PoolError):
    """A worker process ended while it was starting or running a job."""

    def __init__(self, return_code: int | None, during: str = "a job"):
        self.return_code = return_code
        super().__init__(f"worker died during {during}: {describe_exit(return_code)}")


def signal_name(signum: int) -> str:
    """SIGKILL for 9, and so on; 'signal N' when the number has no name."""
    try:
        return signal.Signals(signum).name
    except ValueError:
        return f"signal {signum}"


_SIGNAL_HINTS = {
    signal.SIGKILL: "often the kernel's out-of-memory killer",
    signal.SIGSEGV: "a segmentation fault, usually in native code",
    signal.SIGABRT: "abort(), usually a failed assertion in native code",
    signal.SIGBUS: "a bus error, often a truncated memory-mapped file",
    signal.SIGFPE: "an arithmetic fault in native code",
}


def describe_exit(return_code: int | None) -> str:
    """A sentence for an exit status as CPython reports it (negative: a signal)."""
    if return_code is None:
        return "exit status unknown"
    if return_code >= 0:
        return f"exit status {return_code}"
    signum = -return_code
    hint = _SIGNAL_HINTS.get(signum)
    text = f"killed by {signal_name(signum)}"
    return f"{text} ({hint})" if hint else text
