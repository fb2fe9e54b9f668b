"""Starting again after a start went wrong: what counts against the pool, and how long to wait.

A worker or the template can end before it is ready for two kinds of reasons, and the
pool must not confuse them (issue 21: spares SIGKILLed while starting once made a
healthy pool give up for good):

- *failed*: it cannot start. The template's imports fail (TemplateFailed); a worker
  reports WorkerFailed (its confinement or its device failed); it exits without a signal
  before it is ready; it faults (SIGSEGV, SIGABRT, ...: its own code raised the
  signal); or the supervisor stopped it for being too slow or breaking the protocol.
  The next start will most likely fail the same way.
- *killed*: something outside ended it, a SIGKILL from the OOM killer or an operator, or
  a worker that died with its template. It says nothing about the next start.

Both wait before the next start, 0.25 s doubling: to at most 2 s after killed starts
(the wait only keeps a killer that takes every start, memory pressure, from making the
pool spin), to 10 s after failed ones. `max_start_failures` failed starts in a row make
the pool broken: it refuses jobs and says why, and keeps trying, one worker at a time,
at most 30 s apart (a template's imports cost seconds of a core each time). Killed starts
never make it broken. As soon as a worker reports ready every count starts over and the
pool is ready again. A TemplateFailed breaks the pool at once: the template names the
import that failed, and importing everything again would only say it again.

`Restarts` is a plain record the supervisor's loop alone changes, on a clock it passes
in, so tests drive it without processes or sleeps.
"""

from __future__ import annotations

import signal
from dataclasses import dataclass
from typing import Any

FIRST_WAIT_S = 0.25
KILLED_MAX_WAIT_S = 2.0
FAILED_MAX_WAIT_S = 10.0
BROKEN_MAX_WAIT_S = 30.0

# Signals a process raises on itself when its own code goes wrong: a start ended by one
# of these failed. Any other signal came from outside.
FAULTS = frozenset({signal.SIGSEGV, signal.SIGBUS, signal.SIGILL, signal.SIGFPE, signal.SIGABRT,
                    signal.SIGSYS, signal.SIGTRAP})
# Why the supervisor itself stopped a starting worker, when that is the worker's fault.
FAILING_REASONS = frozenset({"start_failed", "start_timeout", "protocol_error"})


def killed_from_outside(return_code: int | None, stop_reason: str | None = None) -> bool:
    """True when a process that ended before it was ready was killed from outside: a
    signal that is not a fault of its own, or None (it died with its template). False
    when it failed: an exit status, a fault, or a `stop_reason` of FAILING_REASONS (it
    reported WorkerFailed, or the supervisor stopped it for it)."""
    if stop_reason in FAILING_REASONS:
        return False
    if return_code is None:
        return True
    return return_code < 0 and -return_code not in FAULTS


def wait_s(in_a_row: int, longest: float) -> float:
    """The wait before the next start after `in_a_row` bad starts: 0.25 s doubling."""
    return min(FIRST_WAIT_S * 2 ** max(0, min(in_a_row - 1, 16)), longest)


@dataclass
class Restarts:
    """Bad starts since a worker was last ready, and when the next start may begin."""

    max_failures: int
    failed: int = 0            # failed starts in a row
    killed: int = 0            # killed starts in a row
    failed_total: int = 0
    killed_total: int = 0
    last: str | None = None    # what the latest bad start was, in words
    next_mono: float = 0.0     # no start before this (monotonic clock)

    @property
    def broken(self) -> bool:
        """True once `max_failures` starts in a row failed (killed ones never count)."""
        return self.failed >= self.max_failures

    def start_failed(self, what: str, now: float) -> None:
        """A start failed (see the module docstring): count it, wait longer."""
        self.failed += 1
        self.failed_total += 1
        self.last = what
        longest = BROKEN_MAX_WAIT_S if self.broken else FAILED_MAX_WAIT_S
        self._wait(wait_s(self.failed, longest), now)

    def template_failed(self, what: str, now: float) -> None:
        """The template could not import its modules: broken at once (module docstring)."""
        self.failed = max(self.failed, self.max_failures - 1)
        self.start_failed(what, now)

    def start_killed(self, what: str, now: float) -> None:
        """A start was killed from outside: it never counts towards broken; wait a little."""
        self.killed += 1
        self.killed_total += 1
        self.last = what
        self._wait(wait_s(self.killed, KILLED_MAX_WAIT_S), now)

    def started(self) -> None:
        """A worker reported ready: every count starts over, the next start may begin now."""
        self.failed = self.killed = 0
        self.last = None
        self.next_mono = 0.0

    def may_start(self, now: float, starting: int) -> bool:
        """Whether a new process (worker or template) may start now, with `starting` of
        them still starting: never before the wait is over, and while broken only one
        at a time (a probe: one failure says enough)."""
        return now >= self.next_mono and not (self.broken and starting)

    def describe(self, now: float) -> dict[str, Any]:
        """What /health?verbose=1 shows (pool.starts)."""
        return {"failed_in_a_row": self.failed, "killed_in_a_row": self.killed,
                "failed_total": self.failed_total, "killed_total": self.killed_total,
                "max_failures": self.max_failures, "last": self.last,
                "retry_in_s": round(self.next_mono - now, 2) if self.next_mono > now else None}

    def _wait(self, seconds: float, now: float) -> None:
        # Never shorter than a wait already set: starts end in any order.
        self.next_mono = max(self.next_mono, now + seconds)
