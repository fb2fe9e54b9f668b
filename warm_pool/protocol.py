"""The messages on the pool's pipes, as frozen dataclasses.

Two channels, both AF_UNIX stream sockets wrapped in multiprocessing Connections
(framing: a 4-byte big-endian length, then the pickled message; see
multiprocessing.connection.Connection.send_bytes):

    supervisor ──Spawn (+ one fd by SCM_RIGHTS)──▶ template
    supervisor ◀──TemplateReady | TemplateFailed | Spawned | Exited── template

    supervisor ──RunJob | Stop──▶ worker
    supervisor ◀──WorkerReady | WorkerFailed | JobDone── worker

Only these classes and builtin values are ever pickled: a job's exception crosses as
its type name, message and formatted traceback (text), never as an object, so a
script's own classes can never fail to unpickle in the supervisor.
"""

from __future__ import annotations

from dataclasses import dataclass

# --- template channel ------------------------------------------------------------------

@dataclass(frozen=True)
class Spawn:
    """Fork a worker; the worker's end of its socket follows as an fd."""

    worker_id: int
    env: tuple[tuple[str, str], ...]
    core: int | None


@dataclass(frozen=True)
class TemplateReady:
    """The template imported its modules and waits for Spawn messages."""

    pid: int
    backend: str
    preloaded: tuple[str, ...]
    import_seconds: float
    optional_failures: tuple[tuple[str, str], ...] = ()


@dataclass(frozen=True)
class TemplateFailed:
    """The template cannot serve: a required import failed (the text says which)."""

    error: str


@dataclass(frozen=True)
class Spawned:
    """A worker was forked with this pid (also its process group id)."""

    worker_id: int
    pid: int


@dataclass(frozen=True)
class Exited:
    """A worker ended; return_code as CPython reports it (negative: killed by signal)."""

    worker_id: int
    pid: int
    return_code: int


# --- worker channel --------------------------------------------------------------------

@dataclass(frozen=True)
class WorkerReady:
    """The worker initialised its device and waits for jobs."""

    worker_id: int
    pid: int
    preloaded: tuple[str, ...]
    device: str | None
    init_seconds: float


@dataclass(frozen=True)
class WorkerFailed:
    """The worker could not initialise its device; it exits after sending this."""

    worker_id: int
    error: str


@dataclass(frozen=True)
class RunJob:
    """Run main_path as `python main.py` in job_dir, output appended to the two files."""

    job_id: str
    main_path: str
    job_dir: str
    stdout_path: str
    stderr_path: str


@dataclass(frozen=True)
class JobDone:
    """How the job ended, and what it left behind that could not be reset (dirty)."""

    job_id: str
    return_code: int
    error_type: str | None
    error_message: str | None
    run_seconds: float
    peak_rss_bytes: int
    dirty: tuple[str, ...] = ()


@dataclass(frozen=True)
class Stop:
    """Exit cleanly (used at shutdown and to recycle a worker)."""
