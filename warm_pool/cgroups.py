"""The kernel's accounts of each job: a memory and a pids cgroup per worker process.

Why cgroups and not the processes' RSS: a memory cgroup charges every page its
processes cause, wherever it lives: anonymous memory, tmpfs and /dev/shm files, memfds,
SysV shared memory and pipe buffers. Summing the RSS of a uid's processes misses all but
the first, and a job holding gigabytes in a memfd looked like 1 MB. The kernel also
keeps the true peak (no sampling gap) and enforces the limit itself (its OOM killer
stops the job inside its group, counted in `oom_kill`), and the pids controller caps the
job's tasks: a thread or fork bomb meets EAGAIN instead of the machine's pid limit.

Layout: below the service's own cgroup, ``warm-pool-<first job uid>/`` (unique on the
machine: a pool holds its job uids exclusively), one child ``w<worker id>`` per worker
process. The template's child joins its group right after the fork, before it drops
privileges; every process the job starts is born in it. When the process and all it
started have gone, the group is removed, and a new worker gets a new one: counters and
peak start at zero.

Two hierarchies, chosen at start:

- cgroup v2 (Trainium instances on Ubuntu 22.04; the unit sets ``Delegate=yes`` so the
  service owns its subtree). A cgroup with processes may not enable controllers for its
  children ("no internal processes"), so the service first moves itself into a leaf
  ``service/`` of its own cgroup, then enables ``+memory +pids`` below.
  Files: memory.max, memory.current, memory.peak, memory.events (oom_kill), pids.max,
  cgroup.procs.
- cgroup v1 (the development machines: memory and pids controllers mounted apart).
  Files: memory.limit_in_bytes, memory.usage_in_bytes, memory.max_usage_in_bytes,
  memory.oom_control (oom_kill), pids.max, cgroup.procs in each controller.

Without either (no controllers, or no permission), `Accounts.detect` returns None and
the pool measures RSS from /proc as before; /health says which (`accounting`).
"""

from __future__ import annotations

import errno
import os
from dataclasses import dataclass

_ROOT = "/sys/fs/cgroup"
_CONTROLLERS = ("memory", "pids")


@dataclass(frozen=True)
class Usage:
    """One reading of a group's accounts."""

    memory_bytes: int   # charged now (anonymous, tmpfs, shm, memfd, pipes, kernel)
    peak_bytes: int     # the most ever charged since the group was made
    oom_kills: int      # processes the kernel's OOM killer ended for the group's limit
    tasks: int          # processes and threads now


class Group:
    """One worker process's cgroup (in each controller's hierarchy under v1)."""

    def __init__(self, version: int, dirs: dict[str, str]):
        self.version = version
        self.dirs = dirs  # controller -> directory (v2: one directory under both names)

    @property
    def procs_files(self) -> tuple[str, ...]:
        """What the new process writes its pid into to join the group."""
        return tuple(dict.fromkeys(os.path.join(d, "cgroup.procs") for d in self.dirs.values()))

    def limit(self, memory_bytes: int | None, tasks: int | None) -> None:
        """Set the group's memory limit and task cap (None: no limit)."""
        if self.version == 2:
            _write(self.dirs["memory"], "memory.max", memory_bytes if memory_bytes else "max")
            _write(self.dirs["memory"], "memory.swap.max", 0, missing_ok=True)
            _write(self.dirs["pids"], "pids.max", tasks if tasks else "max")
        else:
            if memory_bytes:
                _write(self.dirs["memory"], "memory.limit_in_bytes", memory_bytes)
            _write(self.dirs["pids"], "pids.max", tasks if tasks else "max")

    def reset_peak(self) -> None:
        """Start the peak over (reuse mode, between jobs): v1 resets it on any write;
        v2's memory.peak resets per open file from Linux 6.12, so there it stays the
        process's lifetime peak."""
        if self.version == 1:
            _write(self.dirs["memory"], "memory.max_usage_in_bytes", 0, missing_ok=True)

    def usage(self) -> Usage:
        """The group's accounts now (zeros for files that are gone)."""
        mem, pids = self.dirs["memory"], self.dirs["pids"]
        if self.version == 2:
            return Usage(_read_int(mem, "memory.current"), _read_int(mem, "memory.peak"),
                         _read_key(mem, "memory.events", "oom_kill"), _read_int(pids, "pids.current"))
        return Usage(_read_int(mem, "memory.usage_in_bytes"), _read_int(mem, "memory.max_usage_in_bytes"),
                     _read_key(mem, "memory.oom_control", "oom_kill"), _read_int(pids, "pids.current"))

    def pids(self) -> list[int]:
        """The processes in the group now (any controller: they are the same)."""
        try:
            with open(os.path.join(next(iter(self.dirs.values())), "cgroup.procs")) as f:
                return [int(line) for line in f.read().split()]
        except OSError:
            return []

    def kill(self) -> None:
        """SIGKILL everything in the group (v2: cgroup.kill, atomic against forks)."""
        if self.version == 2:
            _write(self.dirs["pids"], "cgroup.kill", 1, missing_ok=True)
            return
        for pid in self.pids():
            try:
                os.kill(pid, 9)
            except OSError:
                pass

    def remove(self) -> bool:
        """Remove the group once nothing runs in it; False while something still does."""
        for directory in dict.fromkeys(self.dirs.values()):
            try:
                os.rmdir(directory)
            except FileNotFoundError:
                continue
            except OSError as exc:
                if exc.errno in (errno.EBUSY, errno.ENOTEMPTY):
                    return False
                raise
        return True


class Accounts:
    """The pool's cgroup subtree: makes one Group per worker process."""

    def __init__(self, version: int, roots: dict[str, str]):
        self.version = version
        self.roots = roots  # controller -> the pool's directory

    @classmethod
    def detect(cls, name: str) -> Accounts | None:
        """The pool's subtree `name` under this process's own cgroup, made ready; None
        when memory and pids accounting are not available to this process."""
        try:
            return _detect_v2(name) or _detect_v1(name)
        except OSError:
            return None

    def describe(self) -> str:
        return f"cgroup v{self.version}"

    def group(self, name: str) -> Group:
        """A new, empty group (a leftover of that name is removed first)."""
        dirs = {c: os.path.join(root, name) for c, root in self.roots.items()}
        group = Group(self.version, dirs)
        group.kill()
        group.remove()
        for directory in dict.fromkeys(dirs.values()):
            os.mkdir(directory)
        return group

    def clean(self) -> None:
        """Remove every group left in the subtree (a previous service's, after the job
        uids' processes were killed); groups still in use stay."""
        for root in dict.fromkeys(self.roots.values()):
            try:
                names = [e.name for e in os.scandir(root) if e.is_dir(follow_symlinks=False)]
            except OSError:
                continue
            for name in names:
                try:
                    os.rmdir(os.path.join(root, name))
                except OSError:
                    pass

    def remove(self) -> None:
        """Remove the pool's subtree (at shutdown, when no worker is left)."""
        self.clean()
        for root in dict.fromkeys(self.roots.values()):
            try:
                os.rmdir(root)
            except OSError:
                pass


def _own_paths() -> dict[str, str]:
    """This process's cgroup per controller ("" for the v2 unified hierarchy)."""
    out = {}
    with open("/proc/self/cgroup") as f:
        for line in f:
            _, controllers, path = line.rstrip("\n").split(":", 2)
            for controller in controllers.split(",") if controllers else [""]:
                out[controller] = path
    return out


def _detect_v2(name: str) -> Accounts | None:
    if not os.path.exists(os.path.join(_ROOT, "cgroup.controllers")):
        return None  # not a unified hierarchy at /sys/fs/cgroup
    own = os.path.join(_ROOT, _own_paths().get("", "/").lstrip("/"))
    with open(os.path.join(own, "cgroup.controllers")) as f:
        if not set(_CONTROLLERS) <= set(f.read().split()):
            return None
    _enable_below(own)
    pool = os.path.join(own, name)
    os.makedirs(pool, exist_ok=True)
    _write(pool, "cgroup.subtree_control", "+memory +pids")
    return Accounts(2, {"memory": pool, "pids": pool})


def _enable_below(own: str) -> None:
    """Enable memory and pids for our children; if our cgroup holds processes (ours), move
    them into a leaf first, as the kernel requires of a cgroup that delegates them."""
    try:
        _write(own, "cgroup.subtree_control", "+memory +pids")
        return
    except OSError as exc:
        if exc.errno != errno.EBUSY:
            raise
    leaf = os.path.join(own, "service")
    os.makedirs(leaf, exist_ok=True)
    with open(os.path.join(own, "cgroup.procs")) as f:
        pids = f.read().split()
    for pid in pids:
        try:
            _write(leaf, "cgroup.procs", pid)
        except OSError:
            pass  # gone, or a kernel thread
    _write(own, "cgroup.subtree_control", "+memory +pids")


def _detect_v1(name: str) -> Accounts | None:
    own = _own_paths()
    roots = {}
    for controller in _CONTROLLERS:
        mount = os.path.join(_ROOT, controller)
        if controller not in own or not os.path.exists(os.path.join(mount, "cgroup.procs")):
            return None
        pool = os.path.join(mount, own[controller].lstrip("/"), name)
        os.makedirs(pool, exist_ok=True)
        roots[controller] = pool
    return Accounts(1, roots)


def _write(directory: str, name: str, value: object, missing_ok: bool = False) -> None:
    try:
        with open(os.path.join(directory, name), "w") as f:
            f.write(str(value))
    except FileNotFoundError:
        if not missing_ok:
            raise


def _read_int(directory: str, name: str) -> int:
    try:
        with open(os.path.join(directory, name)) as f:
            text = f.read().strip()
    except OSError:
        return 0
    return int(text) if text.isdigit() else 0


def _read_key(directory: str, name: str, key: str) -> int:
    try:
        with open(os.path.join(directory, name)) as f:
            for line in f:
                parts = line.split()
                if len(parts) == 2 and parts[0] == key:
                    return int(parts[1])
    except (OSError, ValueError):
        pass
    return 0
