"""Confinement of a worker, and so of every job it runs and every process a job starts.

A job is untrusted code. The template applies a `Confinement` to each new worker right
after the fork, before the worker touches its device or a job:

1. **A uid of its own** (isolation "uid"): worker slot k runs as uid and gid
   ``job_uid_base + k`` with no supplementary groups but the configured ones (the Neuron
   devices' group on neuron). Then it cannot read the service's memory, environment or
   files, signal it or its template, or touch another slot's jobs. No passwd entries are
   needed: numeric ids, as sandboxes such as isolate use.
2. **No privileges**: every capability dropped, explicitly (a uid change clears them
   only when it leaves uid 0: a service running as its own user with capabilities
   would otherwise hand them to its jobs), the bounding set emptied too when we may,
   and ``PR_SET_NO_NEW_PRIVS``, so no setuid binary or file capability gives any back.
   `enter` checks the result.
3. **Writes only where a job may write** (Landlock, Linux 5.13+, unprivileged): below
   the jobs directory (its own dir there, by file permissions), ``/dev/shm`` and the
   compile cache; devices and ``/proc`` files only through their own permissions.
   Landlock also keeps the job from signalling or ptracing any process outside its
   worker (ABI 6 for signals), which is what protects the service when jobs share its
   uid (isolation "none", for development).
4. **Bounded files**: ``RLIMIT_FSIZE`` caps every file a job writes (the disk limit),
   ``RLIMIT_CORE`` 0 (a crash must not drop a core file the size of the process).

5. **Its own IPC namespace, /dev/shm and /tmp** (`enter_namespaces`, before the uid
   drop, when the template may): SysV shared memory, message queues and semaphores, and
   POSIX ones, are the job's alone and vanish with its last process, as do its small
   tmpfs mounts on /dev/shm and /tmp (their pages are charged to its memory cgroup).

`can_switch_uids` decides whether isolation "uid" is possible; `kill_uid` ends
everything a uid runs, at once, and `kill_uid_now` does the same from a thread of ours.
"""

from __future__ import annotations

import ctypes
import os
import platform
import resource
import socket
import subprocess
import sys
import threading
from dataclasses import dataclass

# Capabilities (linux/capability.h) the service needs for isolation "uid": become the
# job uids (SETUID, SETGID), kill their processes (KILL), hand job dirs over (CHOWN), and
# read and clean what jobs leave behind whatever its mode (DAC_OVERRIDE, FOWNER).
CAP_CHOWN, CAP_DAC_OVERRIDE, CAP_FOWNER, CAP_KILL, CAP_SETGID, CAP_SETUID = 0, 1, 3, 5, 6, 7
NEEDED_CAPS = {"CAP_CHOWN": CAP_CHOWN, "CAP_DAC_OVERRIDE": CAP_DAC_OVERRIDE, "CAP_FOWNER": CAP_FOWNER,
               "CAP_KILL": CAP_KILL, "CAP_SETGID": CAP_SETGID, "CAP_SETUID": CAP_SETUID}

_PR_CAPBSET_DROP = 24
_PR_SET_NO_NEW_PRIVS = 38
_PR_SET_DUMPABLE, _PR_GET_DUMPABLE = 4, 3
_PR_CAP_AMBIENT, _PR_CAP_AMBIENT_CLEAR_ALL = 47, 4
_LINUX_CAPABILITY_VERSION_3 = 0x20080522
_LAST_CAP = 63

# Landlock (linux/landlock.h); the syscall numbers are the same on x86_64 and aarch64.
_SYS_CREATE_RULESET, _SYS_ADD_RULE, _SYS_RESTRICT_SELF = 444, 445, 446
_CREATE_RULESET_VERSION = 1
_RULE_PATH_BENEATH = 1
_FS_WRITE_FILE = 1 << 1
_FS_REMOVE_DIR, _FS_REMOVE_FILE = 1 << 4, 1 << 5
_FS_MAKE = sum(1 << bit for bit in range(6, 13))  # char, dir, reg, sock, fifo, block, sym
_FS_REFER = 1 << 13       # ABI 2: rename and link across directories
_FS_TRUNCATE = 1 << 14    # ABI 3
_SCOPE_ABSTRACT_UNIX_SOCKET, _SCOPE_SIGNAL = 1 << 0, 1 << 1  # ABI 6


class _RulesetAttr(ctypes.Structure):
    _fields_ = [("handled_access_fs", ctypes.c_uint64), ("handled_access_net", ctypes.c_uint64),
                ("scoped", ctypes.c_uint64)]


class _CapHeader(ctypes.Structure):
    _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]


class _CapData(ctypes.Structure):
    _fields_ = [("effective", ctypes.c_uint32), ("permitted", ctypes.c_uint32),
                ("inheritable", ctypes.c_uint32)]


class _PathBeneathAttr(ctypes.Structure):
    _pack_ = 1
    _fields_ = [("allowed_access", ctypes.c_uint64), ("parent_fd", ctypes.c_int32)]


_libc = ctypes.CDLL(None, use_errno=True)


class ConfinementError(RuntimeError):
    """The worker could not be confined as configured; it must not run jobs."""


@dataclass(frozen=True)
class Confinement:
    """How the template confines each worker (trusted settings, from the service)."""

    uid_base: int | None                 # None: jobs keep the service's uid
    groups: tuple[int, ...] = ()         # supplementary groups of every job uid
    writable: tuple[str, ...] = ()       # trees where jobs may create and change files
    max_file_bytes: int | None = None    # RLIMIT_FSIZE

    def uid(self, slot: int) -> int | None:
        return None if self.uid_base is None else self.uid_base + slot


def landlock_abi() -> int:
    """The Landlock ABI version this kernel offers (0: none)."""
    version = _libc.syscall(_SYS_CREATE_RULESET, None, ctypes.c_size_t(0),
                            ctypes.c_uint32(_CREATE_RULESET_VERSION))
    return max(0, version)


def enter(conf: Confinement, slot: int, uid: int | None = None,
          more_writable: tuple[str, ...] = ()) -> dict[str, str]:
    """Confine this (new worker) process; return what was applied, for /health.

    `uid` overrides the slot's (a slot's processes take turns on several uids).
    Raises ConfinementError when a step that was asked for did not take effect.
    """
    applied = {}
    uid = conf.uid(slot) if uid is None else uid
    abi = landlock_abi()
    # Opened before the uid changes: the new uid may not be able to look these up.
    anchors = _open_anchors(conf.writable + more_writable) if abi else []
    if uid is not None:
        _drop_bounding_set()
        os.setgroups(list(conf.groups))
        os.setresgid(uid, uid, uid)
        os.setresuid(uid, uid, uid)
        if os.getresuid() != (uid, uid, uid) or os.getresgid() != (uid, uid, uid):
            raise ConfinementError(f"could not switch to uid {uid}")
        drop_capabilities()
        # A credential change makes the process non-dumpable (its /proc files root's);
        # a job's own /proc/self should look like any program's.
        _prctl(_PR_SET_DUMPABLE, 1)
        applied["uid"] = str(uid)
    if _prctl(_PR_SET_NO_NEW_PRIVS, 1) != 0:
        raise ConfinementError("PR_SET_NO_NEW_PRIVS failed")
    if uid is not None:
        caps = capabilities()
        if any(caps[k] for k in ("CapPrm", "CapEff", "CapAmb")):
            raise ConfinementError(f"capabilities left after dropping privileges: {caps}")
        applied["capabilities"] = "none"
    if conf.max_file_bytes:
        resource.setrlimit(resource.RLIMIT_FSIZE, (conf.max_file_bytes, conf.max_file_bytes))
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    if abi:
        restrict_writes(anchors, abi)
        applied["landlock"] = f"abi {abi}"
    else:
        applied["landlock"] = "unavailable"
    return applied


_CLONE_NEWNS, _CLONE_NEWIPC = 0x00020000, 0x08000000
_MS_NOSUID, _MS_NODEV, _MS_REC, _MS_PRIVATE = 2, 4, 1 << 14, 1 << 18
# Files and directories one private tmpfs may hold (each inode costs kernel memory,
# charged to the job's cgroup too; this bounds it even without one).
TMPFS_INODES = 16384


def enter_namespaces(tmpfs_mb: int, targets: tuple[str, ...] = ("/dev/shm", "/tmp")) -> dict[str, str]:
    """Give this process (a new worker, still privileged) its own IPC namespace and its own
    /dev/shm and /tmp (`targets`): tmpfs mounts of `tmpfs_mb` each, in a mount namespace
    of its own.

    Everything in them is gone when the last process of the job is: the kernel frees an
    IPC namespace and unmounts a mount namespace's tmpfs with it. Raises ConfinementError
    when the kernel refuses (no CAP_SYS_ADMIN): the caller decides whether that is fatal.
    """
    if _libc.unshare(_CLONE_NEWIPC | _CLONE_NEWNS) != 0:
        raise ConfinementError(f"unshare(IPC, mount): {os.strerror(ctypes.get_errno())}")
    # Mounts below stay ours: without this they would propagate to the host's namespace.
    _mount(None, "/", None, _MS_REC | _MS_PRIVATE, None)
    options = f"size={tmpfs_mb}m,nr_inodes={TMPFS_INODES},mode=1777"
    for target in targets:
        _mount("tmpfs", target, "tmpfs", _MS_NOSUID | _MS_NODEV, options)
    return {"ipc_namespace": "own", "tmpfs": f"{tmpfs_mb} MiB each: {', '.join(targets)}"}


def _mount(source: str | None, target: str, fstype: str | None, flags: int, data: str | None) -> None:
    enc = (lambda v: v.encode() if v is not None else None)
    if _libc.mount(enc(source), enc(target), enc(fstype), ctypes.c_ulong(flags), enc(data)) != 0:
        raise ConfinementError(f"mount {target}: {os.strerror(ctypes.get_errno())}")


def _prctl(option: int, value: int) -> int:
    return _libc.prctl(option, ctypes.c_ulong(value), ctypes.c_ulong(0), ctypes.c_ulong(0),
                       ctypes.c_ulong(0))


def drop_capabilities() -> None:
    """Drop every capability this process holds: ambient, permitted, effective, inheritable.

    Dropping is always allowed. Needed after a uid change that did not start at uid 0,
    which keeps the capabilities (a service running as its own user with some).
    """
    _prctl(_PR_CAP_AMBIENT, _PR_CAP_AMBIENT_CLEAR_ALL)
    data = (_CapData * 2)()
    if _libc.capset(ctypes.byref(_CapHeader(_LINUX_CAPABILITY_VERSION_3, 0)), data) != 0:
        raise ConfinementError(f"capset: {os.strerror(ctypes.get_errno())}")


def _drop_bounding_set() -> None:
    """Empty the capability bounding set when we may (needs CAP_SETPCAP; root has it).

    Without it, NO_NEW_PRIVS still keeps exec from granting anything back.
    """
    for cap in range(_LAST_CAP + 1):
        if _prctl(_PR_CAPBSET_DROP, cap) != 0:
            errno = ctypes.get_errno()
            if errno == 1:  # EPERM: no CAP_SETPCAP, leave the rest to NO_NEW_PRIVS
                return


def capabilities(pid: int | str = "self") -> dict[str, int]:
    """The capability sets of a process (CapInh, CapPrm, CapEff, CapBnd, CapAmb) as ints."""
    out = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("Cap"):
                name, _, value = line.partition(":")
                out[name] = int(value.strip(), 16)
    return out


def can_switch_uids() -> tuple[bool, list[str]]:
    """Whether this process may run jobs under their own uids, and which capabilities lack."""
    if os.geteuid() == 0:
        return True, []
    effective = capabilities().get("CapEff", 0)
    missing = [name for name, bit in NEEDED_CAPS.items() if not effective & (1 << bit)]
    return not missing, missing


_CAP_SYS_ADMIN = 21


def can_unshare() -> bool:
    """Whether this process may give each worker its own IPC and mount namespace."""
    return os.geteuid() == 0 or bool(capabilities().get("CapEff", 0) & (1 << _CAP_SYS_ADMIN))


def _open_anchors(writable: tuple[str, ...]) -> list[tuple[int, bool]]:
    """O_PATH fds of the rule paths: (fd, True) where jobs may create files, (fd, False)
    for device, /proc and /sys files, writable only as what they are."""
    out = []
    for path, full in [(p, True) for p in writable] + [(p, False) for p in ("/dev", "/proc", "/sys")]:
        try:
            out.append((os.open(path, os.O_PATH | os.O_CLOEXEC), full))
        except FileNotFoundError:
            continue
    return out


def restrict_writes(anchors: list[tuple[int, bool]], abi: int) -> None:
    """Landlock: from now on this process and its children write only below the anchors.

    Nothing may be created or removed anywhere else. Reads are not restricted (file
    permissions decide). Closes the anchors' fds.
    """
    handled = _FS_WRITE_FILE | _FS_REMOVE_DIR | _FS_REMOVE_FILE | _FS_MAKE
    if abi >= 2:
        handled |= _FS_REFER
    if abi >= 3:
        handled |= _FS_TRUNCATE
    scoped = _SCOPE_ABSTRACT_UNIX_SOCKET | _SCOPE_SIGNAL if abi >= 6 else 0
    attr = _RulesetAttr(handled, 0, scoped)
    size = ctypes.sizeof(_RulesetAttr) if abi >= 6 else 8 if abi < 4 else 16
    try:
        ruleset = _libc.syscall(_SYS_CREATE_RULESET, ctypes.byref(attr), ctypes.c_size_t(size),
                                ctypes.c_uint32(0))
        if ruleset < 0:
            raise ConfinementError(f"landlock_create_ruleset: {os.strerror(ctypes.get_errno())}")
        try:
            files_only = _FS_WRITE_FILE | (handled & _FS_TRUNCATE)
            for fd, full in anchors:
                rule = _PathBeneathAttr(handled if full else files_only, fd)
                if _libc.syscall(_SYS_ADD_RULE, ruleset, _RULE_PATH_BENEATH, ctypes.byref(rule),
                                 ctypes.c_uint32(0)) != 0:
                    raise ConfinementError(f"landlock_add_rule: {os.strerror(ctypes.get_errno())}")
            if _libc.syscall(_SYS_RESTRICT_SELF, ruleset, ctypes.c_uint32(0)) != 0:
                raise ConfinementError(f"landlock_restrict_self: {os.strerror(ctypes.get_errno())}")
        finally:
            os.close(ruleset)
    finally:
        for fd, _ in anchors:
            os.close(fd)


def claim_uids(uids: range) -> list[socket.socket]:
    """Hold the job uids for this pool: one abstract AF_UNIX socket name per uid, released
    by the kernel when the process ends. Raises ConfinementError naming a uid that a
    live pool holds (two pools on one uid would kill each other's jobs)."""
    held = []
    for uid in uids:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        try:
            sock.bind(f"\0trainium-executor-job-uid-{uid}")
        except OSError:
            sock.close()
            for other in held:
                other.close()
            raise ConfinementError(f"job uid {uid} is in use by another running pool") from None
        held.append(sock)
    return held


# What kill_uid runs as the uid (self-contained: it must not depend on how this package
# was found): drop every capability (the service's stay across a uid change when it is
# not root), check that none is left, then kill(-1).
_KILL_AS_UID = """
import ctypes, os, signal, sys
libc = ctypes.CDLL(None, use_errno=True)
libc.prctl(47, 4, 0, 0, 0)  # PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL
class Header(ctypes.Structure):
    _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]
class Data(ctypes.Structure):
    _fields_ = [("effective", ctypes.c_uint32), ("permitted", ctypes.c_uint32),
                ("inheritable", ctypes.c_uint32)]
libc.capset(ctypes.byref(Header(0x20080522, 0)), (Data * 2)())
held = [line.split()[1] for line in open("/proc/self/status")
        if line.startswith(("CapPrm", "CapEff", "CapAmb"))]
if any(int(value, 16) for value in held):
    sys.exit("capabilities left: not killing")
try:
    os.kill(-1, signal.SIGKILL)
except ProcessLookupError:
    pass
"""


_SYS_SETRESUID = {"x86_64": 117, "aarch64": 147}.get(platform.machine())


def kill_uid_now(uid: int, wait: bool = True) -> bool:
    """SIGKILL every process of a uid from a short-lived thread of this process.

    Linux keeps credentials per thread; glibc's setresuid changes every thread of the
    process, the raw system call only the caller. So the thread takes the uid alone,
    drops every capability it still holds (a non-root service keeps them across a uid
    change) and checks that none is left, then kill(-1): every process of the uid, at
    once, and never this process (kill(-1) skips the caller's thread group). The thread
    then ends with those credentials. About 0.1 ms of work, against tens for a helper
    process. `wait=False` returns once the thread is started (the caller checks the
    result some other way: the uid's processes gone). False when it could not (not
    x86_64/aarch64, or the checks failed): use kill_uid.
    """
    if uid == 0:
        raise ValueError("refusing to kill every process of uid 0")
    if _SYS_SETRESUID is None:
        return False
    done: list[bool] = []
    # A credential change, even a thread's, makes the whole process non-dumpable (the
    # kernel's rule for set*uid): the thread puts back what this process was.
    dumpable = _libc.prctl(_PR_GET_DUMPABLE, 0, 0, 0, 0)

    def as_uid() -> None:
        try:
            if _libc.syscall(_SYS_SETRESUID, uid, uid, uid) != 0:
                return
            try:
                drop_capabilities()
                with open("/proc/thread-self/status") as f:
                    held = [line.split()[1] for line in f if line.startswith(("CapPrm", "CapEff", "CapAmb"))]
            except (OSError, ConfinementError):
                return
            if any(int(value, 16) for value in held) or _thread_uid() != uid:
                return
            try:
                os.kill(-1, 9)
            except ProcessLookupError:
                pass
            done.append(True)
        finally:
            if dumpable >= 0:
                _prctl(_PR_SET_DUMPABLE, dumpable)

    thread = threading.Thread(target=as_uid, name=f"kill-uid-{uid}", daemon=True)
    thread.start()
    if not wait:
        return True
    thread.join()
    return bool(done)


def _thread_uid() -> int:
    with open("/proc/thread-self/status") as f:
        for line in f:
            if line.startswith("Uid:"):
                return int(line.split()[1])
    return -1


def kill_uid(uid: int) -> None:
    """SIGKILL every process of a uid, at once: kill(-1) from a process of that uid.

    kill(-1) signals every process the caller may signal except itself, under the
    kernel's task list lock, so nothing can fork its way out of it. The caller must hold
    no capability (CAP_KILL would make that every process on the machine): the helper
    drops them all and checks before it kills.
    """
    if uid == 0:
        raise ValueError("refusing to kill every process of uid 0")
    subprocess.run([sys.executable, "-I", "-c", _KILL_AS_UID], user=uid, group=uid, extra_groups=[],
                   stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                   check=False, close_fds=True, timeout=30, env={})
