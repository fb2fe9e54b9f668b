"""Turning an ended job into its result, off the supervisor's thread.

How long this takes is the job's to decide: its output (up to max_output_bytes a stream
read back), the files it left (a disk check and the artifacts' collection walk them),
its directory's removal. So none of it runs on the loop that enforces every other job's
timeouts and limits: the loop hands over what it knows of the job and the descriptors
of its capture files (read with pread, never by path), and forgets the job; a small
thread pool does the rest and completes the job's future::

    supervisor loop ──(job, its capture fds)──▶ Finisher.submit ─▶ thread:
        read capped output ─▶ disk limit at the end ─▶ build_result ─▶ artifacts
        ─▶ remove the job's dirs ─▶ future.set_result

A profiled job's result waits for its profile: kept as artifacts, then converted for
Perfetto by `neuron-profile` (for up to neuron_profile_convert_timeout), on a thread of
its own, so that no other job's result waits for a conversion (neuron/profile.py).
"""

from __future__ import annotations

import os
import shutil
import threading
import traceback
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from warm_pool import artifacts, limits, outcome
from warm_pool.capture import read_capped
from warm_pool.config import PoolConfig
from warm_pool.neuron import profile
from warm_pool.protocol import error_text
from warm_pool.records import Job
from warm_pool.result import complete_future
from warm_pool.usage import MIB

# Results built at once; more wait their turn (each is a few file reads).
_THREADS = 2
# Profiles kept and converted at once (a conversion may take minutes).
_PROFILE_THREADS = 1


class Finisher:
    """A small pool of threads that build results and hand them to their callers."""

    def __init__(self, config: PoolConfig, on_done: Callable[[], None] = lambda: None):
        self.config = config
        self._on_done = on_done  # told after each result is delivered (the loop's wake)
        self._executor = ThreadPoolExecutor(_THREADS, thread_name_prefix="warm-pool-finisher")
        self._profiles = ThreadPoolExecutor(_PROFILE_THREADS, thread_name_prefix="warm-pool-profile")
        self._lock = threading.Lock()
        self._pending = 0

    @property
    def busy(self) -> bool:
        """Whether a result is being built or waits to be (a profile's conversion included)."""
        return self._pending > 0

    def submit(self, job: Job, fds: dict[str, int], remove_tmp: bool) -> None:
        """Build and deliver `job`'s result; `fds` (stream → descriptor) are closed after."""
        with self._lock:
            self._pending += 1
        self._executor.submit(self._finish, job, fds, remove_tmp)

    def shutdown(self) -> None:
        """Wait for the results being built (profiles included)."""
        self._executor.shutdown(wait=True)
        self._profiles.shutdown(wait=True)

    def _finish(self, job: Job, fds: dict[str, int], remove_tmp: bool) -> None:
        try:
            result = self._result(job, fds)
        except Exception:  # noqa: BLE001 - a bug here must still give the caller a result
            traceback.print_exc()
            result = outcome.internal_result(job, traceback.format_exc())
        finally:
            for fd in fds.values():
                os.close(fd)
        if job.profile_dir is not None and result.error_type != "internal":
            self._profiles.submit(self._finish_profile, job, result, remove_tmp)
            return
        self._deliver(job, result, remove_tmp)

    def _finish_profile(self, job: Job, result: Any, remove_tmp: bool) -> None:
        """Keep the profile a profiled job's runtime wrote, convert it, then deliver."""
        owner = job.uid if job.uid is not None else os.geteuid()
        room = self.config.max_artifacts_mb * MIB - sum(a.size for a in result.artifacts)
        dest = os.path.join(str(self.config.artifacts_dir / job.spec.job_id), profile.OUTPUT_DIR)
        timeout = self.config.neuron_profile_convert_timeout
        try:
            kept = profile.keep(job.profile_dir, dest, owner, room, timeout)
        except Exception as exc:  # noqa: BLE001 - the result matters more than its profile
            kept = profile.Kept("failed", f"keeping it failed: {error_text(exc)}")
        result.profile, result.profile_detail = kept.status, kept.detail
        result.artifacts = sorted([*result.artifacts, *kept.artifacts], key=lambda a: a.name)
        result.artifacts_skipped = [*result.artifacts_skipped, *kept.skipped][:artifacts.MAX_SKIPPED]
        self._deliver(job, result, remove_tmp)

    def _deliver(self, job: Job, result: Any, remove_tmp: bool) -> None:
        complete_future(job.future, result)
        if not self.config.keep_job_dirs:  # after the caller has its result
            remove_job_dir(job, tmp=remove_tmp)
        with self._lock:
            self._pending -= 1
        self._on_done()

    def _result(self, job: Job, fds: dict[str, int]) -> Any:
        cap = self.config.max_output_bytes

        def read_output(name: str, _cap: int) -> tuple[str, int]:
            return read_capped(fds[name], cap) if name in fds else ("", 0)

        if job.started_mono is not None and job.stop_reason is None:
            verdict = limits.disk(self.config, job, job.uid)  # reached at the very end
            if verdict is not None:
                job.stop_reason, job.stop_detail = verdict.reason, verdict.detail
        result = outcome.build_result(job, job.worker, self.config, read_output)
        if job.started_mono is not None:
            owner = job.uid if job.uid is not None else os.geteuid()
            profiled = (profile.OUTPUT_DIR,) if job.profile_dir is not None else ()  # kept on its own
            try:
                result.artifacts, result.artifacts_skipped = artifacts.collect(
                    job.job_dir, str(self.config.artifacts_dir / job.spec.job_id), owner,
                    self.config.artifacts_pattern, self.config.max_artifacts_mb * MIB, skip=profiled)
            except Exception as exc:  # noqa: BLE001 - the result matters more than its files
                result.artifacts_skipped = [{"name": "*", "reason": f"collection failed: {error_text(exc)}"}]
        return result


def remove_job_dir(job: Job, tmp: bool = True) -> None:
    """Remove a job's directory (and its temporary one)."""
    try:  # the common case, cheaply: the script wrote nothing beside main.py
        os.unlink(job.main_path)
        os.rmdir(job.job_dir)
    except OSError:
        shutil.rmtree(job.job_dir, ignore_errors=True)
    if tmp and job.tmp_dir and job.tmp_dir != "/tmp":
        shutil.rmtree(job.tmp_dir, ignore_errors=True)
