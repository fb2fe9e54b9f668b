"""A job's stdout and stderr: pipes drained into files, within a hard cap.

A job's fds 1 and 2 are the write ends of two pipes (capture at the fd level: output of
C code and of child processes is caught too). The supervisor's loop waits on the read
ends with its sockets and moves what arrives into one file per stream with splice(2),
in the kernel; it stops at `limit` bytes per stream: past it the stream is closed (the
job's next write fails) and the job is stopped (error_type ``output_limit``), so a job
printing gigabytes never grows the disk by more than the cap. Output written before a
worker is SIGKILLed is still in its pipe and is drained too. The files live in a
directory of the service's that jobs cannot read.

No thread of its own: when a job ends its process has closed its ends, so the
supervisor drains them at once and hands duplicates of the files' descriptors
(`take_files`) to the thread that builds the result.

`read_capped` then gives the result its head and tail within `max_output_bytes`, read
through the supervisor's own descriptor. Bytes
that are not UTF-8 are decoded with replacement characters.

While a job runs, `read_live` gives what it has written so far (live output): read with
pread(2) from a duplicate of the descriptor the supervisor writes through, never by
path, so nothing can be swapped in under the name; the file is created with O_NOFOLLOW
in a directory jobs cannot reach. Its bytes are the job's: untrusted, decoded with
replacement, at most `limit` per read.
"""

from __future__ import annotations

import errno
import os
import threading
from dataclasses import dataclass, field

TRUNCATION_MARK = "\n... [{n} bytes truncated] ...\n"
STREAMS = ("stdout", "stderr")
_CHUNK = 1 << 20
_SPLICE_F_NONBLOCK = 2


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


@dataclass(frozen=True)
class JobOutput:
    """Part of a running job's stdout or stderr, from `offset` (bytes) on."""

    text: str          # the bytes read, decoded (UTF-8, invalid bytes replaced)
    offset: int        # where the read started
    next_offset: int   # where the next read should start (after the last whole character)
    size: int          # bytes captured in this stream so far
    running: bool      # True while the job may still write to it


@dataclass(eq=False)
class _Job:
    streams: list[_Stream] = field(default_factory=list)


class Capture:
    """Every running job's output streams; driven by the supervisor's loop (not thread-safe)."""

    def __init__(self, directory: str, limit: int):
        self.directory = directory
        self.limit = limit
        self._jobs: dict[str, _Job] = {}
        self._by_fd: dict[int, _Stream] = {}
        # Live reads come from other threads: they look a job up, and `release` forgets it.
        self._lock = threading.Lock()

    def open(self, job_id: str) -> tuple[int, int]:
        """Start capturing a job; return the write ends (stdout, stderr) for its worker."""
        job = _Job()
        ends = []
        for name in STREAMS:
            read_fd, write_fd = os.pipe2(os.O_CLOEXEC)
            os.set_blocking(read_fd, False)
            path = self.path(job_id, name)
            # Read and write: live output is read through a duplicate of this descriptor.
            file_fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC | os.O_NOFOLLOW,
                              0o600)
            stream = _Stream(job_id, name, read_fd, file_fd, path, self.limit)
            job.streams.append(stream)
            self._by_fd[read_fd] = stream
            ends.append(write_fd)
        with self._lock:
            self._jobs[job_id] = job
        return ends[0], ends[1]

    def path(self, job_id: str, stream: str) -> str:
        return os.path.join(self.directory, f"{job_id}.{stream}")

    def reader(self, job_id: str, name: str) -> tuple[int, int, bool] | None:
        """For a live read of one stream: a duplicate of its file's descriptor (the caller
        closes it), the bytes written so far, and whether the stream is still open; None
        when the job is not being captured."""
        with self._lock:
            job = self._jobs.get(job_id)
            stream = next((s for s in job.streams if s.name == name), None) if job else None
            if stream is None:
                return None
            return os.dup(stream.file_fd), stream.written, stream.open

    def take_files(self, job_id: str) -> dict[str, int]:
        """Duplicates of a job's capture files' descriptors (stream → fd), for building its
        result on another thread after `release`; the caller closes them."""
        with self._lock:
            job = self._jobs.get(job_id)
            return {s.name: os.dup(s.file_fd) for s in job.streams} if job else {}

    def read_capped(self, job_id: str, name: str, limit: int) -> tuple[str, int]:
        """A captured stream's text for the result (see `read_capped`); "" if none."""
        job = self._jobs.get(job_id)
        stream = next((s for s in job.streams if s.name == name), None) if job else None
        return read_capped(stream.file_fd, limit) if stream else ("", 0)

    def fds(self) -> list[int]:
        """The read ends still open: the supervisor waits on them."""
        return list(self._by_fd)

    def drain_fd(self, fd: int) -> None:
        """Move what one readable stream holds into its file."""
        stream = self._by_fd.get(fd)
        if stream is not None:
            _drain(stream, self._close)

    def drain(self, job_id: str) -> bool:
        """Move what a job's streams hold now; True when both have ended."""
        job = self._jobs.get(job_id)
        for stream in job.streams if job else ():
            if stream.open:
                _drain(stream, self._close)
        return self.finished(job_id)

    def finished(self, job_id: str) -> bool:
        """True when every writer of both streams has closed them (or the cap closed one)."""
        job = self._jobs.get(job_id)
        return job is None or not any(s.open for s in job.streams)

    def over_limit(self, job_id: str) -> str | None:
        """The stream that passed the cap, if one did."""
        job = self._jobs.get(job_id)
        hit = [s.name for s in job.streams if s.over_limit] if job else []
        return hit[0] if hit else None

    def stop(self, job_id: str) -> None:
        """Stop reading a job's streams (what is left unread is dropped)."""
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
        """Release every job."""
        for job_id in list(self._jobs):
            self.release(job_id)

    def _close(self, stream: _Stream) -> None:
        if stream.open:
            stream.open = False
            self._by_fd.pop(stream.read_fd, None)
            os.close(stream.read_fd)


def _drain(stream: _Stream, close) -> None:
    """Move what the pipe holds into the file, up to the cap; close the stream at EOF or
    past the cap."""
    while True:
        room = stream.limit - stream.written
        try:
            if room <= 0:  # at the cap: is there more? one byte tells, and is thrown away
                if os.read(stream.read_fd, 1):
                    stream.over_limit = True
                    close(stream)
                    return
                moved = 0
            else:
                moved = _move(stream.read_fd, stream.file_fd, min(room, _CHUNK))
        except BlockingIOError:  # drained for now; writers still hold the pipe
            return
        except OSError:
            moved = 0
        if moved == 0:  # EOF: every writer closed its end
            close(stream)
            return
        stream.written += moved


def _move(src: int, dst: int, count: int) -> int:
    """Bytes moved from a non-blocking pipe to a file: splice(2) when possible, else copy."""
    try:
        return os.splice(src, dst, count, flags=_SPLICE_F_NONBLOCK)
    except OSError as exc:
        if exc.errno == errno.EAGAIN:
            raise BlockingIOError from None
        if exc.errno not in (errno.EINVAL, errno.ENOSYS):
            raise
    data = os.read(src, count)
    view = memoryview(data)
    while view:
        view = view[os.write(dst, view):]
    return len(data)


def read_capped(fd: int, limit: int) -> tuple[str, int]:
    """A capture file's text, cut to its first and last limit/2 bytes; and how many were
    cut. Read through `fd` with pread(2): never by path."""
    size = os.fstat(fd).st_size
    if size <= limit:
        return _pread_all(fd, size, 0).decode("utf-8", errors="replace"), 0
    half = limit // 2
    head = _pread_all(fd, half, 0)
    tail = _pread_all(fd, limit - half, size - (limit - half))
    cut = size - len(head) - len(tail)
    text = (head.decode("utf-8", errors="replace") + TRUNCATION_MARK.format(n=cut)
            + tail.decode("utf-8", errors="replace"))
    return text, cut


def _pread_all(fd: int, count: int, offset: int) -> bytes:
    chunks = []
    while count > 0:
        data = os.pread(fd, count, offset)
        if not data:
            break
        chunks.append(data)
        count -= len(data)
        offset += len(data)
    return b"".join(chunks)


def read_live(fd: int, size: int, running: bool, offset: int, limit: int) -> JobOutput:
    """Up to `limit` bytes of a capture file from `offset` (`size` bytes are written).

    While the stream is open, a character cut at the end of the read is left for the
    next one: `next_offset` stops before it, so no reader sees a replacement character
    the job did not write.
    """
    if offset < 0 or limit < 1:
        raise ValueError(f"offset must be >= 0 and limit >= 1, not {offset} and {limit}")
    want = max(0, min(max(limit, 4), size - offset))  # 4: room for one whole character
    data = _pread_all(fd, want, offset) if want else b""
    if running:
        data = data[:len(data) - _cut_character(data)]
    return JobOutput(data.decode("utf-8", errors="replace"), offset, offset + len(data), size, running)


def _cut_character(data: bytes) -> int:
    """How many bytes at the end of `data` begin a UTF-8 character that is not complete."""
    for back in range(1, min(4, len(data)) + 1):
        byte = data[-back]
        if byte & 0xC0 != 0x80:  # a lead byte (or ASCII): does its character fit?
            need = 2 if byte & 0xE0 == 0xC0 else 3 if byte & 0xF0 == 0xE0 else 4 if byte & 0xF8 == 0xF0 else 1
            return back if need > back else 0
    return 0
