"""The messages on the pool's sockets, and how they are framed and checked.

Two channels, both AF_UNIX stream sockets::

    supervisor ──spawn (+ the worker's socket, by SCM_RIGHTS)──▶ template
    supervisor ──fork_standby (+ the standby's socket)──▶ template
    supervisor ◀──template_ready | template_failed | spawned | exited── template (or standby)

    supervisor ──open_device | run_job (+ the job's stdout and stderr pipes)──▶ worker
    supervisor ◀──worker_ready | worker_failed | job_done | worker_idle── worker

Framing: a 4-byte big-endian length, then a UTF-8 JSON object (the framing of
multiprocessing.connection.Connection.send_bytes): ``{"v": 1, "type": "job_done",
...fields}``. File descriptors travel beside a message with SCM_RIGHTS.

Why JSON and not pickle: a job runs *inside* its worker, so it owns the worker's end of
the socket and can write anything on it. Unpickling what it wrote would run its code in
the service. So everything received is decoded as untrusted data (`decode`): at most
`MAX_FRAME` bytes, valid JSON, the protocol version, a message type expected on that
channel, exactly the fields of that type with their types. Anything else is a
`ProtocolError`, and the supervisor kills the worker that sent it (never itself). A
job's exception crosses as its type name, message and formatted traceback (text).

The supervisor reads every worker's socket without blocking (`FrameReader`): a frame
arrives a piece at a time as the kernel has it, and one that stays incomplete past a
deadline is a protocol error of its sender, never a wait of the reader's.

Lifecycle of a worker (the default, one job per process): worker_ready (with its device,
or none yet on neuron: then open_device → worker_ready again once the NeuronCore is
free; for a profiled job, open_device carries the profiler's settings); run_job →
job_done, a *claim* about how the job ended (error type, message), then the process
exits. The supervisor takes the job's end from the template's
`exited` (the wait status, the kernel's peak RSS) and its memory from the job's cgroup;
the claim only names the kind of error, from a fixed set. In the reuse mode, job_done
ends the job and worker_idle follows (the worker restored itself and lists what it
could not: `dirty`; only then may it get another job).
"""

from __future__ import annotations

import dataclasses
import json
import os
import typing
from dataclasses import dataclass
from typing import Any, ClassVar

# Bound once: a job that replaces json.dumps must not break its worker's next message.
_dumps = json.dumps
_loads = json.loads

VERSION = 1
# Largest frame the supervisor reads from a worker or the template; a longer one is a
# protocol error (checked from the length prefix, before anything is read).
MAX_FRAME = 64 * 1024
# Longest text field a worker sends (tracebacks, messages); the sender cuts to it.
MAX_TEXT = 16 * 1024


class ProtocolError(Exception):
    """A message broke the protocol; the text says how (never echoing much of it)."""


@dataclass(frozen=True)
class Message:
    """Base of every message: `type` is its name on the wire."""

    type: ClassVar[str] = ""

    def encode(self) -> bytes:
        body = {"v": VERSION, "type": self.type}
        body.update(dataclasses.asdict(self))
        return _dumps(body, separators=(",", ":"), allow_nan=False).encode("utf-8")


# --- the template's start ---------------------------------------------------------------

@dataclass(frozen=True)
class TemplateSettings(Message):
    """How a template starts: its command line's second argument (template.main)."""

    type: ClassVar[str] = "template_settings"
    backend: str                             # auto | cpu | xla | neuron
    backend_preload: tuple[str, ...] | None  # replaces the backend's own list (tests, operators)
    preload: tuple[str, ...]                 # optional preloads: skipped when missing
    matplotlib_dir: str                      # its font cache, kept across starts
    job_paths: tuple[str, ...]               # dirs on every job's sys.path
    needed: tuple[str, ...]                  # what a job's uid must be able to reach
    reuse_workers: bool                      # the reuse mode: fingerprint the preloads
    uid_base: int | None                     # sandbox.Confinement's fields
    groups: tuple[int, ...]
    writable: tuple[str, ...]
    max_file_bytes: int
    # Set by the template when it starts over without a preload that left a thread.
    skip: dict[str, str] = dataclasses.field(default_factory=dict)
    seconds_before: float = 0.0              # import time spent before it started over


# --- template channel ------------------------------------------------------------------

@dataclass(frozen=True)
class Spawn(Message):
    """Fork a worker for a slot; its end of the worker socket follows as an fd."""

    type: ClassVar[str] = "spawn"
    worker_id: int
    slot: int
    uid: int | None                  # the uid it runs as (None: the service's)
    env: dict[str, str]
    core: int | None
    cgroups: tuple[str, ...]         # cgroup.procs files the new process joins
    tmpfs_mb: int                    # its own IPC namespace and tmpfs mounts of this size; 0: none
    tmpfs_at: tuple[str, ...]        # where those mounts go (/dev/shm, and /tmp unless the work dir is there)
    defer_device: bool               # wait for open_device before touching the device
    one_job: bool                    # run one job, then exit (False: the reuse mode)


@dataclass(frozen=True)
class ForkStandby(Message):
    """Fork a standby: a copy of the template that keeps only what it imported and
    answers template_ready on the socket that follows as an fd. The supervisor turns to
    it when the template dies, instead of waiting for a new one's imports."""

    type: ClassVar[str] = "fork_standby"


@dataclass(frozen=True)
class TemplateReady(Message):
    """The template imported its modules and waits for spawn messages."""

    type: ClassVar[str] = "template_ready"
    pid: int
    backend: str
    preloaded: tuple[str, ...]
    import_seconds: float            # its imports, by its own clock (/health: template_import_s)
    fingerprint_items: int
    # Optional preloads left out, and why (not installed, import failed, started a thread).
    preload_skipped: dict[str, str]
    # Native threads a preload added to the template (reported, see preload.py).
    preload_threads: dict[str, int]


@dataclass(frozen=True)
class TemplateFailed(Message):
    """The template cannot serve: a required import failed (the text says which)."""

    type: ClassVar[str] = "template_failed"
    error: str


@dataclass(frozen=True)
class Spawned(Message):
    """A worker was forked with this pid (also its process group and session id)."""

    type: ClassVar[str] = "spawned"
    worker_id: int
    pid: int


@dataclass(frozen=True)
class Exited(Message):
    """A worker ended; return_code as CPython reports it (negative: killed by signal)."""

    type: ClassVar[str] = "exited"
    worker_id: int
    pid: int
    return_code: int
    max_rss_kb: int    # the kernel's peak resident set of the process (wait4's ru_maxrss)


# --- worker channel --------------------------------------------------------------------

@dataclass(frozen=True)
class WorkerReady(Message):
    """The worker confined itself, initialised its device, and waits for jobs."""

    type: ClassVar[str] = "worker_ready"
    worker_id: int
    preloaded: tuple[str, ...]
    device: str | None
    confinement: dict[str, str]


@dataclass(frozen=True)
class WorkerFailed(Message):
    """The worker could not start (confinement or device); it exits after sending this."""

    type: ClassVar[str] = "worker_failed"
    worker_id: int
    error: str


@dataclass(frozen=True)
class OpenDevice(Message):
    """The NeuronCore is free now: start the device (the worker answers worker_ready),
    with `env` set first (a profiled job's runtime settings; empty for any other)."""

    type: ClassVar[str] = "open_device"
    env: dict[str, str]


@dataclass(frozen=True)
class RunJob(Message):
    """Run main_path as `python main.py` in job_dir; stdout and stderr pipes follow as fds."""

    type: ClassVar[str] = "run_job"
    job_id: str
    main_path: str
    job_dir: str
    tmp_dir: str


@dataclass(frozen=True)
class JobDone(Message):
    """How the job ended (its exit status as CPython gives it). Sent from the job's own
    process, so only a claim: in the default mode the supervisor keeps error_type (one
    of JOB_ERROR_TYPES) and the message, and measures everything else itself."""

    type: ClassVar[str] = "job_done"
    job_id: str
    return_code: int
    error_type: str | None
    error_message: str | None
    peak_rss_bytes: int


@dataclass(frozen=True)
class WorkerIdle(Message):
    """The worker restored itself after a job; `dirty` lists what it could not undo."""

    type: ClassVar[str] = "worker_idle"
    dirty: tuple[str, ...]
    check_seconds: float


FROM_TEMPLATE = (TemplateReady, TemplateFailed, Spawned, Exited)
FROM_WORKER = (WorkerReady, WorkerFailed, JobDone, WorkerIdle)
TO_TEMPLATE = (Spawn, ForkStandby)
TO_WORKER = (RunJob, OpenDevice)

# What a job's process may claim as its error_type; anything else is a protocol error.
JOB_ERROR_TYPES = frozenset({"exception", "syntax_error", "exit"})


def decode(frame: bytes, expected: tuple[type[Message], ...]) -> Message:
    """The message in a frame, checked against the protocol; ProtocolError otherwise."""
    if len(frame) > MAX_FRAME:
        raise ProtocolError(f"frame of {len(frame)} bytes exceeds {MAX_FRAME}")
    try:
        body = _loads(frame.decode("utf-8"), parse_constant=_no_constants)
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise ProtocolError(f"not a JSON message: {str(exc)[:100]}") from None
    if not isinstance(body, dict):
        raise ProtocolError("a message must be a JSON object")
    if body.pop("v", None) != VERSION:
        raise ProtocolError(f"protocol version must be {VERSION}")
    kind = body.pop("type", None)
    cls = next((c for c in expected if c.type == kind), None)
    if cls is None:
        raise ProtocolError(f"unexpected message type {str(kind)[:40]!r}")
    hints = _hints(cls)
    if set(body) != set(hints):
        extra, missing = sorted(set(body) - set(hints))[:3], sorted(set(hints) - set(body))[:3]
        raise ProtocolError(f"{kind}: wrong fields (unexpected {extra}, missing {missing})")
    values = {name: _check(kind, name, body[name], hint) for name, hint in hints.items()}
    return cls(**values)


def _no_constants(name: str) -> None:
    raise ValueError(f"{name} is not allowed")


def _hints(cls: type) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def _check(kind: str, name: str, value: Any, hint: Any) -> Any:
    """The value if it has the field's type (tuples arrive as lists); ProtocolError if not."""
    args = typing.get_args(hint)
    if type(None) in args:
        if value is None:
            return None
        hint = next(a for a in args if a is not type(None))
    origin = typing.get_origin(hint)
    ok = False
    if hint is bool:
        ok = type(value) is bool
    elif hint is int:
        ok = type(value) is int
    elif hint is float:
        ok = type(value) in (int, float)
        value = float(value) if ok else value
    elif hint is str:
        ok = type(value) is str and len(value) <= MAX_TEXT
    elif origin is tuple:
        item = typing.get_args(hint)[0]
        ok = type(value) is list and all(type(v) is item and (item is not str or len(v) <= MAX_TEXT)
                                         for v in value)
        value = tuple(value) if ok else value
    elif origin is dict:
        item = typing.get_args(hint)[1]
        ok = type(value) is dict and len(value) <= 1000 and all(
            type(k) is str and len(k) <= MAX_TEXT and type(v) is item
            and (item is not str or len(v) <= MAX_TEXT) for k, v in value.items())
    if not ok:
        raise ProtocolError(f"{kind}.{name} has the wrong type ({type(value).__name__})")
    return value


def clip(text: str, limit: int = MAX_TEXT) -> str:
    """Text cut to what a message may carry (keeping its end, where tracebacks say most)."""
    return text if len(text) <= limit else "...\n" + text[-(limit - 4):]


def error_text(exc: BaseException, limit: int = 300) -> str:
    """An exception as a line for a message, a record or a log: its type and the first
    line of what it says (Ray's and others' errors go on with tracebacks), cut to `limit`
    characters ("..." marks a cut). Every error the pool and the service keep is said so."""
    lines = str(exc).strip().splitlines()
    text = f"{type(exc).__name__}: {lines[0]}" if lines else type(exc).__name__
    return text if len(text) <= limit else text[:limit] + "..."


class FrameReader:
    """Reads one peer's frames from a non-blocking socket, as much as has arrived.

    `read()` takes what the kernel holds now (never waiting) and returns the complete
    frames; the length prefix is checked before a frame's body is read, so an oversized
    frame is refused unread. `partial_since` is when the frame now being assembled began
    (None between frames): the caller holds it to a deadline, because a sender that
    stops half-way must not hold anything but its own job.
    """

    def __init__(self, fd: int, max_frame: int = MAX_FRAME):
        self.fd = fd
        self.max_frame = max_frame
        self.buffer = bytearray()
        self.partial_since: float | None = None
        self.eof = False

    def read(self, now: float, budget: int = 4 * MAX_FRAME) -> list[bytes]:
        """Complete frames that arrived; ProtocolError for an oversized one. Reads at most
        `budget` bytes per call, so one chatty peer cannot hold the reader."""
        got = 0
        while got < budget and not self.eof:
            try:
                data = os.read(self.fd, min(65536, budget - got))
            except (BlockingIOError, InterruptedError):
                break
            except OSError:
                data = b""
            if not data:
                self.eof = True
                break
            got += len(data)
            self.buffer += data
            if len(self.buffer) >= 4 and int.from_bytes(self.buffer[:4], "big") > self.max_frame:
                raise ProtocolError(f"a message longer than {self.max_frame} bytes")
        frames = []
        while len(self.buffer) >= 4:
            size = int.from_bytes(self.buffer[:4], "big")
            if size > self.max_frame:
                raise ProtocolError(f"a message longer than {self.max_frame} bytes")
            if len(self.buffer) < 4 + size:
                break
            frames.append(bytes(self.buffer[4:4 + size]))
            del self.buffer[:4 + size]
        self.partial_since = (self.partial_since or now) if self.buffer else None
        return frames
