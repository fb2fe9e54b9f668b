"""The persistent compile cache on disk: its entries, stale locks, size and pruning.

Neuron Persistent Cache (neuron-caching.rst): default ``/var/tmp/neuron-compile-cache``;
entries live in ``<cache>/neuronxcc-<version>/MODULE_<hash>+<flags hash>/``
(``model.neff``, ``model.done``, ``compile_flags.txt``, ``*.lock``).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

CACHE_ENTRY_PREFIX = "MODULE_"
CACHE_VERSION_PREFIX = "neuronxcc-"


def cache_entries(cache_dir: str | os.PathLike) -> list[Path]:
    """The compiled-module entry directories: ``<cache>/neuronxcc-*/MODULE_*``."""
    root = Path(cache_dir)
    entries: list[Path] = []
    try:
        versions = [p for p in root.iterdir() if p.is_dir() and p.name.startswith(CACHE_VERSION_PREFIX)]
    except OSError:
        return []
    for version in versions:
        try:
            entries.extend(p for p in version.iterdir()
                           if p.is_dir() and not p.is_symlink() and p.name.startswith(CACHE_ENTRY_PREFIX))
        except OSError:
            continue
    return entries


def clear_stale_locks(cache_dir: str | os.PathLike) -> int:
    """Remove every ``*.lock`` file in the cache; return how many. Call only when no worker runs.

    A compile killed mid-way (a job's timeout) leaves its entry's lock behind, and the
    next compile of the same graph waits on it. With no worker alive no lock can be live.
    """
    removed = 0
    for dirpath, _dirnames, filenames in os.walk(cache_dir):
        for name in filenames:
            if name.endswith(".lock"):
                try:
                    os.unlink(os.path.join(dirpath, name))
                    removed += 1
                except FileNotFoundError:
                    pass
    return removed


def _tree_size(path: Path) -> int:
    """Bytes of the regular files under path (symlinks not followed)."""
    total = 0
    for dirpath, _dirnames, filenames in os.walk(path):
        for name in filenames:
            try:
                st = os.lstat(os.path.join(dirpath, name))
            except OSError:
                continue
            if not os.path.islink(os.path.join(dirpath, name)):
                total += st.st_size
    return total


def cache_size_bytes(cache_dir: str | os.PathLike) -> int:
    """Total size of the compile cache in bytes (0 when it does not exist yet)."""
    return _tree_size(Path(cache_dir))


def _entry_mtime(entry: Path) -> float:
    """Last time an entry was written: the newest mtime of the directory and its files."""
    newest = entry.stat().st_mtime
    for child in entry.iterdir():
        try:
            newest = max(newest, child.lstat().st_mtime)
        except OSError:
            continue
    return newest


def prune_cache(cache_dir: str | os.PathLike, max_bytes: int) -> int:
    """Delete whole entries, oldest first, until the cache is at most ``max_bytes``.

    Returns the bytes freed. An entry holding a ``*.lock`` file is being compiled and is
    skipped. ``max_bytes`` 0 or less means no cap (nothing is pruned).
    """
    if max_bytes <= 0:
        return 0
    size = cache_size_bytes(cache_dir)
    if size <= max_bytes:
        return 0
    aged: list[tuple[float, Path]] = []
    for entry in cache_entries(cache_dir):
        try:
            if any(p.name.endswith(".lock") for p in entry.iterdir()):
                continue
            aged.append((_entry_mtime(entry), entry))
        except OSError:
            continue
    freed = 0
    for _mtime, entry in sorted(aged, key=lambda pair: pair[0]):
        if size - freed <= max_bytes:
            break
        entry_size = _tree_size(entry)
        shutil.rmtree(entry, ignore_errors=True)
        if not entry.exists():
            freed += entry_size
    return freed
