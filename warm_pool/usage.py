"""What a job uses, measured from outside it: memory, disk, processes and threads.

Everything here reads /proc or the file system; nothing trusts what a worker reports.
"""

from __future__ import annotations

import os
import shutil
import signal
import stat
from dataclasses import dataclass, field

import psutil

MIB = 1024 * 1024  # the one MiB of the package: every *_mb setting is in these
SHM_DIR = "/dev/shm"


@dataclass
class UidUsage:
    """What one uid runs: its processes and their resident memory together."""

    pids: list[int]
    rss_bytes: int
    dying: set[int] = field(default_factory=set)  # SIGKILL already pending: on their way out


def uid_usage(uids: set[int]) -> dict[int, UidUsage]:
    """One pass over /proc: the processes of each uid (real uid) and their RSS.

    Reads /proc/<pid>/status, which stays readable whatever a process does to its own
    dumpable flag or ownership of /proc/<pid>.
    """
    out = {uid: UidUsage([], 0) for uid in uids}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/status", "rb") as f:
                text = f.read()
        except OSError:
            continue
        uid = _field_int(text, b"\nUid:")
        if uid not in out or b"\nState:\tZ" in text:  # zombies hold nothing but a pid
            continue
        usage = out[uid]
        pid = int(entry.name)
        usage.pids.append(pid)
        usage.rss_bytes += (_field_int(text, b"\nVmRSS:") or 0) * 1024
        if _sigkill_pending(text):
            usage.dying.add(pid)
    return out


_SIGKILL_BIT = 1 << (signal.SIGKILL - 1)


def _sigkill_pending(text: bytes) -> bool:
    """True when SIGKILL is pending for the process (kill(-1) reached it; it is exiting)."""
    for key in (b"\nShdPnd:", b"\nSigPnd:"):
        start = text.find(key)
        if start >= 0:
            value = text[start + len(key): text.find(b"\n", start + 1)].strip()
            if int(value or b"0", 16) & _SIGKILL_BIT:
                return True
    return False


def _field_int(text: bytes, key: bytes) -> int | None:
    start = text.find(key)
    if start < 0:
        return None
    fields = text[start + len(key): text.find(b"\n", start + 1)].split()
    return int(fields[0]) if fields else None


def tree_rss(pid: int) -> int:
    """Resident bytes of a process and all its descendants (0 if it is gone)."""
    try:
        proc = psutil.Process(pid)
        procs = [proc] + proc.children(recursive=True)
    except psutil.Error:
        return 0
    total = 0
    for p in procs:
        try:
            total += p.memory_info().rss
        except psutil.Error:
            pass
    return total


def parent_pid(pid: int) -> int | None:
    """The parent of a process, from /proc/<pid>/stat (None if it is gone). The command
    name in parentheses may hold spaces and parentheses: the fields follow the last ')'."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return int(f.read().rsplit(")", 1)[1].split()[1])
    except (OSError, ValueError, IndexError):
        return None


def process_rss(pid: int) -> int:
    """Resident bytes of one process (0 if it is gone): /proc/<pid>/statm, no walk."""
    try:
        with open(f"/proc/{pid}/statm", "rb") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0


def disk_usage(roots: tuple[str, ...], uid: int | None, max_files: int) -> tuple[int, int]:
    """(bytes, files) a job holds: its directory trees, and its uid's files in /dev/shm.

    Bytes are allocated blocks (a sparse file counts what it really uses). The walk
    stops after `max_files` entries: the caller treats more as over the limit.
    """
    total, files = 0, 0
    stack = list(roots)
    while stack and files <= max_files:
        try:
            with os.scandir(stack.pop()) as entries:
                for entry in entries:
                    files += 1
                    try:
                        st = entry.stat(follow_symlinks=False)
                    except OSError:
                        continue
                    total += st.st_blocks * 512
                    if stat.S_ISDIR(st.st_mode):
                        stack.append(entry.path)
        except OSError:
            continue
    if uid is not None:
        for entry in _shm_entries(uid):
            total += entry[1]
            files += 1
    return total, files


def _shm_entries(uid: int) -> list[tuple[str, int]]:
    out = []
    try:
        with os.scandir(SHM_DIR) as entries:
            for entry in entries:
                try:
                    st = entry.stat(follow_symlinks=False)
                except OSError:
                    continue
                if st.st_uid == uid:
                    out.append((entry.path, st.st_blocks * 512))
    except OSError:
        pass
    return out


def remove_shm(uid: int) -> int:
    """Remove what a uid left in /dev/shm (shared memory of a job's processes); how many."""
    removed = 0
    for path, _ in _shm_entries(uid):
        try:
            if os.path.isdir(path) and not os.path.islink(path):
                shutil.rmtree(path, ignore_errors=True)
            else:
                os.unlink(path)
            removed += 1
        except OSError:
            pass
    return removed


def kill_group(pgid: int, sig: int) -> None:
    """Signal a whole process group; a group that is already gone is not an error."""
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):  # gone, or the id now belongs to another user
        pass


def group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except (ProcessLookupError, PermissionError):
        return False
    return True


def kill_pids(pids: list[int]) -> None:
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except OSError:
            pass
