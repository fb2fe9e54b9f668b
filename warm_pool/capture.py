"""Reading a job's captured output: head and tail of each stream, within a cap.

The worker's fds 1 and 2 are dup2'd onto files (DESIGN.md: capture at the fd level), so
what a job printed survives even when the worker is SIGKILLed mid-job. Bytes that are
not UTF-8 are decoded with replacement characters.
"""

from __future__ import annotations

import os

TRUNCATION_MARK = "\n... [{n} bytes truncated] ...\n"


def read_capped(path: str, limit: int) -> tuple[str, int]:
    """The file's text, cut to its first and last limit/2 bytes; and how many were cut."""
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            if size <= limit:
                return f.read().decode("utf-8", errors="replace"), 0
            half = limit // 2
            head = f.read(half)
            f.seek(size - (limit - half))
            tail = f.read()
    except FileNotFoundError:
        return "", 0
    cut = size - len(head) - len(tail)
    text = (head.decode("utf-8", errors="replace") + TRUNCATION_MARK.format(n=cut)
            + tail.decode("utf-8", errors="replace"))
    return text, cut
