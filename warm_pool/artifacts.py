"""A job's artifacts: the files it left in its directory that are worth keeping.

Scripts save their loss curves, checkpoints and metrics next to main.py. When a job
ends, before its directory is removed, the supervisor copies the files whose names
match the `artifacts_pattern` setting into ``<work_dir>/artifacts/<job_id>/``, a
directory of the service's that no job can reach, within `max_artifacts_mb` per job
(smallest files first, so the plots and metrics survive a checkpoint too big to keep).

Every file there was chosen by untrusted code, so the copy trusts nothing about it
(every process of the job is dead by then, but a job could have prepared anything):

- only regular files, opened relative to their directory with O_NOFOLLOW and checked
  again on the open descriptor: no symlink (to the service's files), FIFO (a read that
  never ends), device or socket is followed;
- only files the job's own uid owns with a single link: a hard link to a file the job
  could not read itself would be copied out with the service's rights;
- only names made of letters, digits and ``._-+= `` that start with a letter, digit or
  ``_``, at most 6 directories deep: no path tricks, no hidden files, nothing a client
  or a URL could misread;
- exactly the size seen on the descriptor, never more, and never past the cap.

A job decides how many directories it leaves (up to max_job_files), so the scan holds
a bounded number of descriptors: one per level it is in (at most MAX_DEPTH), each
closed once that directory is listed; a kept file is opened again later by walking
down from the job dir, component by component with O_NOFOLLOW, and its directory must
be the one scanned. At most MAX_SCANNED entries are looked at.

What matched a pattern but was refused is listed with the reason (`skipped`), and so
are directories too deep to look into and a scan cut short.
"""

from __future__ import annotations

import fnmatch
import hashlib
import os
import re
import shutil
import stat
from dataclasses import dataclass, field

_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9 ._+=-]{0,127}$")
MAX_DEPTH = 6
MAX_ARTIFACTS = 1000
MAX_SKIPPED = 20
# Most directory entries (files and directories) looked at per job: above the default
# max_job_files (100,000), so a job within its limits is scanned whole; beyond it the
# rest is not looked at, and `skipped` says so.
MAX_SCANNED = 200_000
_CHUNK = 1 << 20
_SKIP_DIRS = {"__pycache__"}
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


@dataclass(frozen=True)
class Artifact:
    """One kept file: its name (relative, '/'-separated), size and SHA-256."""

    name: str
    size: int
    sha256: str


@dataclass(frozen=True)
class _Found:
    name: str                 # relative, '/'-separated
    folder: tuple[int, int]   # (st_dev, st_ino) of its directory, as scanned
    ino: int
    size: int


@dataclass
class _Scan:
    """What one scan looks for, what it found, and what it has left."""

    owner: int
    patterns: tuple[str, ...]
    skipped: list[dict[str, str]]
    found: list[_Found] = field(default_factory=list)
    left: int = 0                                      # entries it may still look at
    too_deep: int = 0                                  # directories not looked into
    first_too_deep: str | None = None
    cut_at: str | None = None                          # where MAX_SCANNED ran out
    skip: tuple[str, ...] = ()                         # top-level directories not looked into


def collect(job_dir: str, dest: str, owner_uid: int, patterns: tuple[str, ...],
            cap_bytes: int, skip: tuple[str, ...] = ()) -> tuple[list[Artifact], list[dict[str, str]]]:
    """Copy the job's artifacts into dest (created); return (kept, skipped). `skip`:
    directories of job_dir not looked into (kept otherwise, e.g. a Neuron profile)."""
    kept: list[Artifact] = []
    skipped: list[dict[str, str]] = []
    if cap_bytes <= 0 or not patterns:
        return kept, skipped
    try:
        root = os.open(job_dir, _DIR_FLAGS)
    except OSError:
        return kept, skipped
    scan = _Scan(owner_uid, tuple(p.lower() for p in patterns), skipped, left=MAX_SCANNED, skip=skip)
    try:
        _scan(root, "", 0, scan)
        total = 0
        for item in sorted(scan.found, key=lambda f: (f.size, f.name)):
            if len(kept) >= MAX_ARTIFACTS:
                _skip(skipped, item.name, f"more than {MAX_ARTIFACTS} artifacts")
            elif total + item.size > cap_bytes:
                _skip(skipped, item.name, f"over max_artifacts_mb ({item.size} bytes)")
            else:
                artifact = _copy(root, item, dest, owner_uid, skipped)
                if artifact is not None:
                    kept.append(artifact)
                    total += artifact.size
    finally:
        os.close(root)
    if scan.first_too_deep is not None:
        more = f" (and {scan.too_deep - 1} more)" if scan.too_deep > 1 else ""
        _skip(skipped, scan.first_too_deep, f"deeper than {MAX_DEPTH} levels{more}: not looked into")
    if scan.cut_at is not None:
        _skip(skipped, scan.cut_at, f"more than {MAX_SCANNED} entries: the rest were not looked at")
    return sorted(kept, key=lambda a: a.name), skipped


def _scan(dir_fd: int, prefix: str, depth: int, scan: _Scan) -> None:
    """List one directory (within what is left of MAX_SCANNED), then each subdirectory,
    each open only while it is scanned: at most MAX_DEPTH descriptors at once."""
    entries = []
    try:
        with os.scandir(dir_fd) as it:
            for entry in it:
                if scan.left <= 0:
                    scan.cut_at = scan.cut_at or prefix or "."
                    break
                scan.left -= 1
                entries.append(entry)
    except OSError:
        return
    entries.sort(key=lambda e: e.name)
    folder: tuple[int, int] | None = None
    for entry in entries:
        name = entry.name
        try:
            st = entry.stat(follow_symlinks=False)
        except OSError:
            continue
        if stat.S_ISDIR(st.st_mode):
            if name in _SKIP_DIRS or not _NAME.match(name) or (depth == 0 and name in scan.skip):
                continue
            if depth + 1 >= MAX_DEPTH:
                scan.too_deep += 1
                scan.first_too_deep = scan.first_too_deep or f"{prefix}{name}/"
                continue
            try:
                sub = os.open(name, _DIR_FLAGS, dir_fd=dir_fd)
            except OSError:
                continue
            try:
                _scan(sub, f"{prefix}{name}/", depth + 1, scan)
            finally:
                os.close(sub)
            continue
        lowered = name.lower()
        if not any(fnmatch.fnmatchcase(lowered, p) for p in scan.patterns):
            continue
        why = _refuse(name, st, scan.owner)
        if why:
            _skip(scan.skipped, prefix + name, why)
            continue
        if folder is None:
            here = os.fstat(dir_fd)
            folder = (here.st_dev, here.st_ino)
        scan.found.append(_Found(prefix + name, folder, st.st_ino, st.st_size))


def _refuse(name: str, st: os.stat_result, owner: int) -> str | None:
    """Why a matching entry is not kept, or None."""
    if not stat.S_ISREG(st.st_mode):
        return "not a regular file"
    if not _NAME.match(name):
        return "unsafe name"
    if st.st_uid != owner:
        return "not the job's own file"
    if st.st_nlink != 1:
        return "a hard link"
    return None


def _open_folder(root: int, parts: list[str]) -> int:
    """The directory root/parts..., opened one component at a time with O_NOFOLLOW (no
    symlink anywhere on the way), holding at most two descriptors besides root."""
    fd = root
    try:
        for part in parts:
            sub = os.open(part, _DIR_FLAGS, dir_fd=fd)
            if fd != root:
                os.close(fd)
            fd = sub
    except BaseException:
        if fd != root:
            os.close(fd)
        raise
    return fd


def _copy(root: int, item: _Found, dest: str, owner: int, skipped: list[dict[str, str]]) -> Artifact | None:
    parts = item.name.split("/")
    folder = fd = None
    try:
        folder = _open_folder(root, parts[:-1])
        here = os.fstat(folder)
        if (here.st_dev, here.st_ino) != item.folder:
            _skip(skipped, item.name, "replaced while being kept")
            return None
        fd = os.open(parts[-1], os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC,
                     dir_fd=folder)
    except OSError as exc:
        _skip(skipped, item.name, f"cannot open: {exc.strerror}")
        return None
    finally:
        if folder is not None and folder != root:
            os.close(folder)
    try:
        st = os.fstat(fd)
        why = _refuse(parts[-1], st, owner)
        if why is None and st.st_ino != item.ino:
            why = "replaced while being kept"
        if why is None and st.st_size > item.size:
            why = "grew while being kept"
        if why:
            _skip(skipped, item.name, why)
            return None
        target = _target(dest, item.name)
        digest = hashlib.sha256()
        left = st.st_size
        with open(target, "wb", opener=lambda p, f: os.open(p, f | os.O_EXCL, 0o600)) as out:
            while left > 0:
                chunk = os.read(fd, min(_CHUNK, left))
                if not chunk:
                    break
                digest.update(chunk)
                out.write(chunk)
                left -= len(chunk)
        return Artifact(item.name, st.st_size - left, digest.hexdigest())
    except OSError as exc:
        _skip(skipped, item.name, f"copy failed: {exc.strerror or exc}")
        return None
    finally:
        os.close(fd)


def _target(dest: str, name: str) -> str:
    """The path of artifact `name` ('/'-separated) under dest, its directories made, each
    level 0700 whatever the umask."""
    parts = name.split("/")
    folder = dest
    for part in [None, *parts[:-1]]:
        folder = os.path.join(folder, part) if part else folder
        if not os.path.isdir(folder):
            os.makedirs(folder, exist_ok=True)
            os.chmod(folder, 0o700)
    return os.path.join(folder, parts[-1])


def _skip(skipped: list[dict[str, str]], name: str, reason: str) -> None:
    if len(skipped) < MAX_SKIPPED:
        skipped.append({"name": printable(name), "reason": reason})


def printable(name: str, limit: int = 200) -> str:
    """A file name a job chose, safe to show and to store: undecodable bytes and control
    characters escaped, cut to `limit` characters."""
    text = name.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
    text = "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)
    return text if len(text) <= limit else text[: limit - 3] + "..."


# --- moving kept artifacts to another machine (a cluster node's to the head's) ----------

def valid_name(name: str) -> bool:
    """Whether `name` is one `collect` could have kept: '/'-separated safe parts, at
    most MAX_DEPTH deep (no '..', no absolute path, no hidden file)."""
    parts = name.split("/")
    return 0 < len(parts) <= MAX_DEPTH and all(_NAME.match(p) for p in parts)


def pack(root: str, job_id: str, kept: list[Artifact]) -> list[tuple[str, bytes]]:
    """The bytes of a job's kept artifacts under root/<job_id>, then removes them there."""
    base = os.path.join(root, job_id)
    files = []
    for artifact in kept:
        if not valid_name(artifact.name):
            continue
        try:
            with open(os.path.join(base, artifact.name), "rb",
                      opener=lambda p, f: os.open(p, f | os.O_NOFOLLOW)) as f:
                files.append((artifact.name, f.read(artifact.size + 1)))
        except OSError:
            continue
    shutil.rmtree(base, ignore_errors=True)
    return files


def unpack(root: str, job_id: str, kept: list[Artifact], files: list[tuple[str, bytes]]) -> list[Artifact]:
    """Write packed artifacts under root/<job_id>: only those named in `kept` whose bytes
    match their size and SHA-256, each directory 0700 and file 0600. Returns those written."""
    wanted = {a.name: a for a in kept if valid_name(a.name)}
    written = []
    for name, data in files:
        artifact = wanted.pop(name, None) if isinstance(name, str) else None
        if (artifact is None or not isinstance(data, bytes) or len(data) != artifact.size
                or hashlib.sha256(data).hexdigest() != artifact.sha256):
            continue
        target = _target(os.path.join(root, job_id), name)
        with open(target, "wb", opener=lambda p, f: os.open(p, f | os.O_EXCL | os.O_NOFOLLOW, 0o600)) as out:
            out.write(data)
        written.append(artifact)
    return sorted(written, key=lambda a: a.name)
