"""A job's stdout and stderr: pipes the service drains into files, within a hard cap.

A job's fds 1 and 2 are the write ends of two pipes (capture at the fd level: output of
C code and of child processes is caught too). One thread in the service (`Capture`)
moves what arrives into one file per stream with splice(2), in the kernel, and stops at
`limit` bytes per stream: past it the job is stopped (error_type ``output_limit``), so a
job printing gigabytes never grows the disk by more than the cap. Output written before
a worker is SIGKILLed is still in its pipe and is drained too. The files live in a
directory of the service's that jobs cannot read.

`read_capped` then gives the result its head and tail within `max_output_bytes`. Bytes
that are not UTF-8 are decoded with replacement characters.
"""

from __future__ import annotations

import errno
import os
import selectors
import threading
from collections.abc import Callable
from dataclasses import dataclass, field

TRUNCATION_MARK = "\n... [{n} bytes truncated] ...\n"
STREAMS = ("stdout", "stderr")
_CHUNK = 1 << 20


@dataclass(eq=False)
class _Stream:
    job_id: str
    name: str
    read_fd: int
    file_fd: int
    path: str
    limit: int
    written: int = 0
    open: bool = True
    over_limit: bool = False


@dataclass(eq=False)
class _Job:
    streams: list[_Stream] = field(default_factory=list)


class Capture:
    """Drains every running job's pipes into its capture files (one thread for all)."""

    def __init__(self, directory: str, limit: int, on_change: Callable[[], None]):
        self.directory = directory
        self.limit = limit
        self.on_change = on_change  # called (from the capture thread) when a stream ends
        self._jobs: dict[str, _Job] = {}
        self._lock = threading.Lock()
        self._selector = selectors.DefaultSelector()
        self._wake_r, self._wake_w = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)
        self._selector.register(self._wake_r, selectors.EVENT_READ, None)
        self._thread = threading.Thread(target=self._run, name="warm-pool-capture", daemon=True)
        self._closed = False
        self._thread.start()

    def open(self, job_id: str) -> tuple[int, int]:
        """Start capturing a job; return the write ends (stdout, stderr) for its worker."""
        job = _Job()
        ends = []
        for name in STREAMS:
            read_fd, write_fd = os.pipe2(os.O_CLOEXEC)
            path = self.path(job_id, name)
            file_fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
            job.streams.append(_Stream(job_id, name, read_fd, file_fd, path, self.limit))
            ends.append(write_fd)
        with self._lock:
            self._jobs[job_id] = job
            for stream in job.streams:
                self._selector.register(stream.read_fd, selectors.EVENT_READ, stream)
        self._poke()
        return ends[0], ends[1]

    def path(self, job_id: str, stream: str) -> str:
        return os.path.join(self.directory, f"{job_id}.{stream}")

    def finished(self, job_id: str) -> bool:
        """True when every writer of both streams has closed them (or the cap closed one)."""
        with self._lock:
            job = self._jobs.get(job_id)
            return job is None or not any(s.open for s in job.streams)

    def over_limit(self, job_id: str) -> str | None:
        """The stream that passed the cap, if one did."""
        with self._lock:
            job = self._jobs.get(job_id)
            hit = [s.name for s in job.streams if s.over_limit] if job else []
        return hit[0] if hit else None

    def size(self, job_id: str, stream: str) -> int:
        """Bytes captured so far on one stream."""
        with self._lock:
            job = self._jobs.get(job_id)
            found = [s.written for s in job.streams if s.name == stream] if job else []
        return found[0] if found else 0

    def stop(self, job_id: str) -> None:
        """Stop reading a job's streams (its writers are gone or will never close them)."""
        with self._lock:
            job = self._jobs.get(job_id)
            for stream in job.streams if job else ():
                self._close(stream)

    def release(self, job_id: str) -> None:
        """Forget a job: close what is open and remove its files."""
        self.stop(job_id)
        with self._lock:
            job = self._jobs.pop(job_id, None)
        for stream in job.streams if job else ():
            os.close(stream.file_fd)
            try:
                os.unlink(stream.path)
            except FileNotFoundError:
                pass

    def close(self) -> None:
        """Stop the thread; release every job."""
        with self._lock:
            self._closed = True
            jobs = list(self._jobs)
        self._poke()
        self._thread.join(timeout=5)
        for job_id in jobs:
            self.release(job_id)

    def _poke(self) -> None:
        try:
            os.write(self._wake_w, b"\0")
        except BlockingIOError:
            pass

    def _run(self) -> None:
        while True:
            events = self._selector.select()
            ended = False
            with self._lock:
                if self._closed:
                    return
                for key, _ in events:
                    if key.data is None:
                        os.read(self._wake_r, 4096)
                    elif key.data.open:
                        ended |= self._drain(key.data)
            if ended:
                self.on_change()

    def _drain(self, stream: _Stream) -> bool:
        """Move what the pipe holds into the file; True when the stream ended."""
        room = stream.limit - stream.written
        try:
            if room > 0:
                moved = _move(stream.read_fd, stream.file_fd, min(room, _CHUNK))
            else:  # at the cap: is there more? one byte tells, and is thrown away
                moved = len(os.read(stream.read_fd, 1))
                if moved:
                    stream.over_limit = True
                    self._close(stream)
                    return True
        except OSError:
            moved = 0
        if moved == 0:  # EOF: every writer closed its end
            self._close(stream)
            return True
        stream.written += moved
        return False

    def _close(self, stream: _Stream) -> None:
        if stream.open:
            stream.open = False
            self._selector.unregister(stream.read_fd)
            os.close(stream.read_fd)


def _move(src: int, dst: int, count: int) -> int:
    """Bytes moved from a pipe to a file: splice(2) when the kernel allows, else copy."""
    try:
        return os.splice(src, dst, count)
    except OSError as exc:
        if exc.errno not in (errno.EINVAL, errno.ENOSYS):
            raise
    data = os.read(src, count)
    view = memoryview(data)
    while view:
        view = view[os.write(dst, view):]
    return len(data)


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
