"""Seats: the uids a slot's processes take turns on, and cleaning the ones jobs left.

Slot k owns `spares_per_slot + 1` uids (placement.seat_uids). A spare is forked onto a
free seat; when its process ends (its job is over, or it was killed), everything its
uid still runs is killed at once (sandbox.kill_uid_now: kill(-1) as that uid), and the
seat is dirty until nothing of it is left: its cgroup empty (then removed), or without
cgroups no process of its uid in /proc. Only then may a new process take the seat, so
a job's leftovers never share a uid, a cgroup or a NeuronCore with the next job, and
killing them never touches a spare: spares sit on the other seats.

Under isolation none there are no uids: a seat is a place for a process, and a dirty
one waits for its cgroup, or its process group, to be empty.
"""

from __future__ import annotations

import signal
from dataclasses import dataclass
from typing import Any

from warm_pool import sandbox, usage
from warm_pool.placement import Placement


@dataclass
class _Dirty:
    slot: int
    uid: int | None
    group: Any          # cgroups.Group or None
    pgid: int | None    # the process group of the worker (isolation none, no cgroups)


class Seats:
    """Which uid a slot's next process may take; the seats that wait for cleaning."""

    def __init__(self, placement: Placement):
        self.placement = placement
        self.dirty: dict[tuple[int, Any], _Dirty] = {}

    def make_group(self, worker_id: int) -> Any:
        """A new worker's cgroup, limits set (None without kernel accounts)."""
        accounts = self.placement.accounts
        if accounts is None:
            return None
        config = self.placement.config
        group = accounts.group(f"w{worker_id}")
        group.limit(config.memory_limit_bytes, config.max_job_tasks or None)
        return group

    def free(self, slot: int, used: list[int | None], live: int) -> int | None | bool:
        """A uid for a new process of `slot` (None: isolation none), or False when every
        seat is taken or still being cleaned. `used`: the uids of its live processes."""
        if self.placement.isolation == "uid":
            for uid in self.placement.seat_uids(slot):
                if uid not in used and (slot, uid) not in self.dirty:
                    return uid
            return False
        cleaning = sum(1 for d in self.dirty.values() if d.slot == slot)
        return None if live + cleaning < self.placement.seats else False

    def release(self, worker: Any, kill: bool) -> None:
        """A worker's process is gone (or going): end everything of its seat now and wait
        for it to be clean before the seat is used again."""
        if kill:
            # Not waited for: the seat stays dirty until nothing of it is left (`clean`).
            if worker.uid is not None and not sandbox.kill_uid_now(worker.uid, wait=False):
                sandbox.kill_uid(worker.uid)
            if worker.group is not None:
                worker.group.kill()
            if worker.pid is not None:
                usage.kill_group(worker.pid, signal.SIGKILL)
        key = (worker.slot, worker.uid if worker.uid is not None else f"w{worker.id}")
        self.dirty[key] = _Dirty(worker.slot, worker.uid, worker.group, worker.pid)

    def slot_dirty(self, slot: int) -> bool:
        """True while something a process of the slot left may still run (hold its core)."""
        return any(d.slot == slot for d in self.dirty.values())

    def clean(self) -> None:
        """Free the seats that nothing runs on any more."""
        for key, dirty in list(self.dirty.items()):
            if self._empty(dirty):
                del self.dirty[key]

    def clean_all(self, timeout: float = 5.0) -> None:
        """At shutdown: kill and wait until every seat is clean (at most `timeout`)."""
        import time

        deadline = time.monotonic() + timeout
        while self.dirty and time.monotonic() < deadline:
            for dirty in self.dirty.values():
                if dirty.uid is not None:
                    sandbox.kill_uid_now(dirty.uid)
                if dirty.group is not None:
                    dirty.group.kill()
            self.clean()
            if self.dirty:
                time.sleep(0.01)

    def _empty(self, dirty: _Dirty) -> bool:
        if dirty.group is not None:
            if dirty.group.pids():
                dirty.group.kill()
                return False
            if not dirty.group.remove():
                return False
        elif dirty.uid is not None:
            if usage.uid_usage({dirty.uid})[dirty.uid].pids:
                if not sandbox.kill_uid_now(dirty.uid):
                    sandbox.kill_uid(dirty.uid)
                return False
        elif dirty.pgid is not None and usage.group_alive(dirty.pgid):
            usage.kill_group(dirty.pgid, signal.SIGKILL)
            return False
        if dirty.uid is not None and not self.placement.namespaces:
            usage.remove_shm(dirty.uid)  # no IPC namespace of its own: its /dev/shm files
        return True
