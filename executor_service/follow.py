"""Watching jobs from the command line: `submit --follow` and `logs [-f]`.

Each followed job's events are read on a thread of its own (`ExecutorClient.events`) and
handed to the main thread through one queue, which alone prints: the job's stdout to
stdout and its stderr to stderr, line by line, each line prefixed with `[paper_id]` when
several jobs are followed (a line is printed once it is complete, or when its job ends).
"""

from __future__ import annotations

import queue
import sys
import threading
from typing import Any, TextIO

from executor_service.client import ExecutorClient, original_shape


class _Lines:
    """Complete lines of one job's stream, prefixed; the rest kept until it is complete."""

    def __init__(self, prefix: str, out: TextIO):
        self.prefix = prefix
        self.out = out
        self.partial = ""

    def write(self, text: str) -> None:
        *lines, self.partial = (self.partial + text).split("\n")
        for line in lines:
            self.out.write(f"{self.prefix}{line}\n")
        self.out.flush()

    def close(self) -> None:
        if self.partial:
            self.write("\n")


def follow_jobs(client: ExecutorClient, jobs: dict[str, str], prefix: bool) -> dict[str, dict[str, Any]]:
    """Print the output of every job (paper_id -> job_id) as it comes; return each paper's
    result document."""
    events: queue.Queue = queue.Queue()

    def watch(paper_id: str, job_id: str) -> None:
        try:
            for event in client.events(job_id):
                events.put((paper_id, event))
        except Exception as exc:  # noqa: BLE001 - reported by the printing thread
            events.put((paper_id, {"event": "failed", "data": exc}))

    for paper_id, job_id in jobs.items():
        threading.Thread(target=watch, args=(paper_id, job_id), daemon=True,
                         name=f"follow-{paper_id}").start()
    streams = {p: {"stdout": _Lines(f"[{p}] " if prefix else "", sys.stdout),
                   "stderr": _Lines(f"[{p}] " if prefix else "", sys.stderr)} for p in jobs}
    results: dict[str, dict[str, Any]] = {}
    while len(results) < len(jobs):
        paper_id, event = events.get()
        if event["event"] == "output":
            streams[paper_id][event["data"]["stream"]].write(event["data"]["text"])
        elif event["event"] in ("result", "failed"):
            for lines in streams[paper_id].values():
                lines.close()
            if event["event"] == "failed":
                exc = event["data"]
                print(f"trainium-executor: lost job {jobs[paper_id]} ({paper_id}): {exc}", file=sys.stderr)
                results[paper_id] = client.get_job(jobs[paper_id])
            else:
                results[paper_id] = event["data"]
    return results


def run_batch(client: ExecutorClient, batch: list[dict[str, Any]], timeout: float | None,
              deadline_s: float | None, callback_url: str | None) -> dict[str, Any]:
    """`submit --follow`: submit, print the jobs' output as it comes, then wait for the batch."""
    submitted = client.submit_batch(batch, timeout=timeout, callback_url=callback_url)
    follow_jobs(client, submitted["job_ids"], prefix=len(submitted["job_ids"]) > 1)
    return original_shape(client.wait_batch(submitted["batch_id"], deadline_s=deadline_s))


def logs(client: ExecutorClient, job_id: str, follow: bool) -> int:
    """`logs JOB_ID [-f]`: the output so far, or followed until the job ends (exit 1 if it
    failed)."""
    if follow:
        result = follow_jobs(client, {"job": job_id}, prefix=False)["job"]
        return 0 if result.get("success") else 1
    for stream, out in (("stdout", sys.stdout), ("stderr", sys.stderr)):
        offset = 0
        while True:
            part = client.output(job_id, stream, offset)
            out.write(part["text"])
            if part["next_offset"] == offset:
                break
            offset = part["next_offset"]
        out.flush()
    return 0
