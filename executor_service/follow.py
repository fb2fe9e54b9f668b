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
import time
from typing import Any, TextIO

from executor_service.client import ExecutorClient, original_shape

LOST_POLL_S = 1.0  # how often a job whose event stream was lost is asked whether it ended


class _Lines:
    """Complete lines of one job's stream, prefixed; the rest kept until it is complete."""

    def __init__(self, prefix: str, out: TextIO):
        self.prefix = prefix
        self.out = out
        self.partial = ""
        self.written = 0  # characters of the stream received so far

    def write(self, text: str) -> None:
        self.written += len(text)
        *lines, self.partial = (self.partial + text).split("\n")
        for line in lines:
            self.out.write(f"{self.prefix}{line}\n")
        self.out.flush()

    def finish(self, whole: Any) -> None:
        """At the job's end: what the stream missed of the result's text (a stream lost
        or cut short), then the last incomplete line."""
        if isinstance(whole, str) and len(whole) > self.written:
            self.write(whole[self.written:])
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
            try:  # the stream is lost, not the job: its result will hold what was missed
                while not client.output(job_id)["ended"]:
                    time.sleep(LOST_POLL_S)
            except Exception:  # noqa: BLE001 - the service is gone too: report what we have
                pass
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
            if event["event"] == "failed":
                exc = event["data"]
                print(f"trainium-executor: lost the event stream of job {jobs[paper_id]} ({paper_id}): "
                      f"{exc}; its output is taken from its result", file=sys.stderr)
                results[paper_id] = client.get_job(jobs[paper_id])
            else:
                results[paper_id] = event["data"]
            for name, lines in streams[paper_id].items():
                # Whole unless cut (head, mark, tail): then positions no longer match.
                cut = results[paper_id].get(f"{name}_truncated_bytes")
                lines.finish(None if cut else results[paper_id].get(name))
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
