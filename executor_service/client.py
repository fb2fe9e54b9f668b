"""A client for the Trainium Executor, standard library only, so a Lambda can vendor
this one file (copy it next to the handler; it needs nothing else).

    from client import ExecutorClient
    client = ExecutorClient(os.environ["TRAINIUM_ENDPOINT"], token=os.environ.get("TOKEN"))
    response = client.run_batch(batch, timeout=600, deadline_s=840)
    # response has the original /execute_batch shape:
    # {"success", "batch_size", "successful", "failed", "results": {paper_id: result}}

`run_batch` submits the batch asynchronously (POST /jobs), then polls GET /batches/<id>
with backoff until every job is terminal or the deadline passes (ExecutorTimeout,
which carries the batch id and the partial response, so a later invocation can resume
with `wait_batch`). 503 answers (queue full, restarting) are retried, honouring
Retry-After, as are connection errors; other 4xx raise ExecutorError at once.

A Neuron profile of a job: `profile=True` on `execute`, `submit`, `submit_batch` or
`run_batch` (the result's `profile` says what became of it; the files are its artifacts).

Fire and forget: `submit(code, paper_id, timeout=3600, callback_url=..., paper_title=...,
slack_thread_ts=...)` or `submit_batch(batch, callback_url=...)` return the ids at once;
the service POSTs the result to `callback_url` (signed, see docs/webhooks.md), and
`paper(paper_id)` finds a paper's latest job and result later.

Watching a job: `for event in client.events(job_id)` yields {"event": "status" | "output" |
"heartbeat" | "result", "data": {...}} as the job runs (GET /jobs/<id>/events, Server-Sent
Events), ending after "result"; `output(job_id, stream, offset)` is one poll of
GET /jobs/<id>/output.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from collections.abc import Iterator
from typing import Any

__all__ = ["ExecutorClient", "ExecutorError", "ExecutorTimeout"]


class ExecutorError(Exception):
    """The service answered an error (status and its JSON "error" message)."""

    def __init__(self, status: int | None, message: str, body: Any = None):
        super().__init__(f"{status}: {message}" if status else message)
        self.status = status
        self.message = message
        self.body = body


class ExecutorTimeout(ExecutorError):
    """The deadline passed before the batch finished; `partial` holds what is known."""

    def __init__(self, batch_id: str, partial: dict[str, Any] | None):
        super().__init__(None, f"batch {batch_id} not finished before the deadline", partial)
        self.batch_id = batch_id
        self.partial = partial


class ExecutorClient:
    """Talks to one service endpoint, e.g. http://10.0.0.5:8000."""

    def __init__(self, base_url: str, token: str | None = None, request_timeout: float = 30.0,
                 max_retries: int = 8, poll_initial: float = 0.5, poll_max: float = 10.0):
        self.base_url = base_url.rstrip("/")
        self.token = token
        self.request_timeout = request_timeout
        self.max_retries = max_retries
        self.poll_initial = poll_initial
        self.poll_max = poll_max

    # --- transport ----------------------------------------------------------------

    def _once(self, method: str, path: str, payload: Any, timeout: float,
              headers: dict[str, str] | None = None) -> tuple[int, Any, dict]:
        data = json.dumps(payload).encode("utf-8") if payload is not None else None
        req = urllib.request.Request(self.base_url + path, data=data, method=method)
        req.add_header("Accept", "application/json")
        if data is not None:
            req.add_header("Content-Type", "application/json")
        if self.token:
            req.add_header("Authorization", f"Bearer {self.token}")
        for key, value in (headers or {}).items():
            req.add_header(key, value)
        try:
            with urllib.request.urlopen(req, timeout=timeout) as resp:
                return resp.status, _decode(resp.read()), dict(resp.headers)
        except urllib.error.HTTPError as exc:
            return exc.code, _decode(exc.read()), dict(exc.headers or {})

    def request(self, method: str, path: str, payload: Any = None, *,
                timeout: float | None = None, deadline: float | None = None,
                accept: tuple[int, ...] = (200, 202), headers: dict[str, str] | None = None) -> Any:
        """One API call with retries of 503 and connection errors; returns the JSON body."""
        attempt = 0
        while True:
            attempt += 1
            try:
                status, body, got = self._once(method, path, payload, timeout or self.request_timeout,
                                               headers)
            except (urllib.error.URLError, ConnectionError, TimeoutError, OSError) as exc:
                status, body, got = None, {"error": str(exc)}, {}
            if status in accept:
                return body
            retryable = status is None or status in (502, 503, 504)
            message = body.get("error") if isinstance(body, dict) else str(body)
            if not retryable or attempt > self.max_retries:
                raise ExecutorError(status, message or "request failed", body)
            delay = _retry_after(got) or min(self.poll_max, 0.5 * 2 ** (attempt - 1))
            delay *= 1 + random.uniform(0, 0.1)  # spread callers that were refused together
            if deadline is not None and time.monotonic() + delay > deadline:
                raise ExecutorError(status, f"deadline reached while retrying: {message}", body)
            time.sleep(delay)

    # --- the API --------------------------------------------------------------------

    def health(self) -> dict[str, Any]:
        """GET /health (answered even when unhealthy: look at "status")."""
        return self.request("GET", "/health", accept=(200, 503), timeout=10)

    def status(self) -> dict[str, Any]:
        """GET /status: running_executions, queued, capacity, idle_since."""
        return self.request("GET", "/status")

    def execute(self, code: str, paper_id: str = "test", timeout: float | None = None,
                profile: bool | None = None, **fields: Any) -> dict:
        """POST /execute: run one script and wait for its result (synchronous). `profile`:
        capture a Neuron profile (None: the service's default). `fields`: the caller's own
        (paper_title, slack_thread_ts, s3_code_key), returned with it."""
        payload: dict[str, Any] = {"code": code, "paper_id": paper_id, **fields}
        if timeout is not None:
            payload["timeout"] = timeout
        if profile is not None:
            payload["profile"] = profile
        return self.request("POST", "/execute", payload, timeout=(timeout or 600) * 3 + 60)

    def submit(self, code: str, paper_id: str, timeout: float | None = None,
               callback_url: str | None = None, deadline: float | None = None, profile: bool | None = None,
               **fields: Any) -> dict:
        """POST /jobs with one script: {"job_id", "batch_id", "deduplicated", ...} at once."""
        payload: dict[str, Any] = {"code": code, "paper_id": paper_id, **fields}
        return self._submit(payload, timeout, callback_url, deadline, profile)

    def submit_batch(self, batch: list[dict[str, Any]], timeout: float | None = None,
                     deadline: float | None = None, callback_url: str | None = None,
                     profile: bool | None = None) -> dict[str, Any]:
        """POST /jobs: {"batch_id", "job_ids": {paper_id: job_id}}; returns at once.
        `callback_url` receives the batch's results when every job has ended; `profile`
        applies to the items that do not say."""
        return self._submit({"batch": batch}, timeout, callback_url, deadline, profile)

    def _submit(self, payload: dict[str, Any], timeout: float | None, callback_url: str | None,
                deadline: float | None, profile: bool | None = None) -> dict[str, Any]:
        # Every retry carries the same Idempotency-Key, so a request whose answer was
        # lost does not submit the work twice.
        if timeout is not None:
            payload["timeout"] = timeout
        if callback_url is not None:
            payload["callback_url"] = callback_url
        if profile is not None:
            payload["profile"] = profile
        key = {"Idempotency-Key": uuid.uuid4().hex}
        return self.request("POST", "/jobs", payload, deadline=deadline, headers=key)

    def paper(self, paper_id: str) -> dict[str, Any] | None:
        """GET /papers/<id>: {"latest", "latest_finished", "jobs"}, or None if it has no job."""
        try:
            return self.request("GET", f"/papers/{urllib.parse.quote(paper_id, safe='')}")
        except ExecutorError as exc:
            if exc.status == 404:
                return None
            raise

    def list_jobs(self, paper_id: str | None = None, status: str | None = None, limit: int = 50,
                  cursor: str | None = None) -> dict[str, Any]:
        """GET /jobs: one page of job summaries, newest first ({"jobs", "next_cursor"})."""
        query = {k: v for k, v in (("paper_id", paper_id), ("status", status), ("limit", str(limit)),
                                   ("cursor", cursor)) if v is not None}
        return self.request("GET", "/jobs?" + urllib.parse.urlencode(query))

    def get_batch(self, batch_id: str) -> dict[str, Any]:
        """GET /batches/<id>: status and results so far."""
        return self.request("GET", f"/batches/{batch_id}")

    def get_job(self, job_id: str) -> dict[str, Any]:
        return self.request("GET", f"/jobs/{job_id}")

    def cancel_job(self, job_id: str) -> dict[str, Any]:
        """DELETE /jobs/<id>; a job that already finished is returned as it is."""
        try:
            return self.request("DELETE", f"/jobs/{job_id}")
        except ExecutorError as exc:
            if exc.status == 409:
                return self.get_job(job_id)
            raise

    def list_artifacts(self, job_id: str) -> dict[str, Any]:
        """GET /jobs/<id>/artifacts: {"artifacts": [{name, size, sha256, content_type, url}], ...}."""
        return self.request("GET", f"/jobs/{_quote(job_id)}/artifacts")

    def get_artifact(self, job_id: str, name: str) -> bytes:
        """One artifact's bytes."""
        req = urllib.request.Request(f"{self.base_url}/jobs/{_quote(job_id)}/artifacts/{_quote(name, '/')}")
        if self.token:
            req.add_header("Authorization", f"Bearer {self.token}")
        try:
            with urllib.request.urlopen(req, timeout=self.request_timeout) as resp:
                return resp.read()
        except urllib.error.HTTPError as exc:
            body = _decode(exc.read())
            message = body.get("error") if isinstance(body, dict) else str(body)
            raise ExecutorError(exc.code, message or "request failed", body) from None

    def download_artifacts(self, job_id: str, dest: str) -> list[str]:
        """Save every artifact of a job below dest (subdirectories kept); return the paths.

        Names come from the service, but are checked again here (no absolute path, no
        '..', no hidden parts), and each file's SHA-256 against the listing.
        """
        saved = []
        for item in self.list_artifacts(job_id)["artifacts"]:
            name = item["name"]
            parts = name.split("/")
            if not all(_SAFE_PART.match(p) for p in parts):
                raise ExecutorError(None, f"refusing an artifact name that is not a plain relative path: "
                                          f"{name!r}")
            data = self.get_artifact(job_id, name)
            if hashlib.sha256(data).hexdigest() != item["sha256"]:
                raise ExecutorError(None, f"artifact {name} does not match its SHA-256")
            path = os.path.join(dest, *parts)
            os.makedirs(os.path.dirname(path), exist_ok=True)
            with open(path, "wb") as f:
                f.write(data)
            saved.append(path)
        return saved

    def output(self, job_id: str, stream: str = "stdout", offset: int = 0) -> dict[str, Any]:
        """GET /jobs/<id>/output: {"text", "next_offset", "ended", "status", ...}."""
        query = urllib.parse.urlencode({"stream": stream, "offset": str(offset)})
        return self.request("GET", f"/jobs/{_quote(job_id)}/output?{query}")

    def events(self, job_id: str, poll_interval: float = 0.5) -> Iterator[dict[str, Any]]:
        """The job's events as they happen, ending with {"event": "result", "data": job}.

        Each is {"event": name, "data": object}: "status" ({"status"}), "output"
        ({"stream", "text"}), "heartbeat", "result" (the job's document). Read from the
        event stream; a dropped connection resumes where it stopped (Last-Event-ID). When
        the service has no stream to spare (503), the output is polled instead.
        """
        offsets = {"stdout": 0, "stderr": 0}
        failures = 0
        while True:
            try:
                for event in self._stream(job_id, offsets):
                    failures = 0
                    yield event
                    if event["event"] == "result":
                        return
                failures += 1  # the stream ended without a result: reconnect
            except ExecutorError as exc:
                if exc.status == 503:
                    yield from self._poll_events(job_id, offsets, poll_interval)
                    return
                if exc.status is not None:
                    raise
                failures += 1
            if failures > self.max_retries:
                raise ExecutorError(None, f"lost the event stream of job {job_id}")
            time.sleep(min(self.poll_max, 0.5 * 2 ** (failures - 1)))

    def _stream(self, job_id: str, offsets: dict[str, int]) -> Iterator[dict[str, Any]]:
        req = urllib.request.Request(f"{self.base_url}/jobs/{_quote(job_id)}/events")
        req.add_header("Accept", "text/event-stream")
        req.add_header("Last-Event-ID", f"{offsets['stdout']}:{offsets['stderr']}")
        if self.token:
            req.add_header("Authorization", f"Bearer {self.token}")
        try:
            resp = urllib.request.urlopen(req, timeout=max(self.request_timeout, 60.0))
        except urllib.error.HTTPError as exc:
            body = _decode(exc.read())
            message = body.get("error") if isinstance(body, dict) else str(body)
            raise ExecutorError(exc.code, message or "request failed", body) from None
        except (urllib.error.URLError, OSError) as exc:
            raise ExecutorError(None, str(exc)) from None
        with resp:
            name, data = "message", []
            try:
                for raw in resp:
                    line = raw.decode("utf-8", "replace").rstrip("\r\n")
                    if line.startswith("event:"):
                        name = line[6:].strip()
                    elif line.startswith("data:"):
                        data.append(line[5:].removeprefix(" "))
                    elif line.startswith("id:"):
                        parts = line[3:].strip().split(":")
                        if len(parts) == 2 and all(p.isdigit() for p in parts):
                            offsets["stdout"], offsets["stderr"] = int(parts[0]), int(parts[1])
                    elif not line and data:
                        event = {"event": name, "data": json.loads("\n".join(data))}
                        name, data = "message", []
                        if event["event"] == "error":  # shutting down, the job still queued
                            raise ExecutorError(503, str(event["data"].get("error")), event["data"])
                        yield event
            except (OSError, ValueError) as exc:  # dropped, or timed out: resume
                raise ExecutorError(None, str(exc)) from None

    def _poll_events(self, job_id: str, offsets: dict[str, int], interval: float) -> Iterator[dict[str, Any]]:
        """The same events from GET /jobs/<id>/output and GET /jobs/<id>, polled."""
        status = None
        while True:
            caught_up_after_end = []  # per stream: read to its end, and the job had ended
            for stream in ("stdout", "stderr"):
                while True:
                    part = self.output(job_id, stream, offsets[stream])
                    if part["status"] != status and not part["ended"]:
                        status = part["status"]
                        yield {"event": "status", "data": {"job_id": job_id, "status": status}}
                    if part["next_offset"] == offsets[stream]:
                        caught_up_after_end.append(part["ended"])
                        break
                    offsets[stream] = part["next_offset"]
                    if part["text"]:
                        yield {"event": "output", "data": {"stream": stream, "text": part["text"]}}
            ended = all(caught_up_after_end)
            if ended:
                job = self.get_job(job_id)
                yield {"event": "status", "data": {"job_id": job_id, "status": job.get("status")}}
                yield {"event": "result", "data": job}
                return
            time.sleep(interval)

    def wait_batch(self, batch_id: str, deadline_s: float | None = None) -> dict[str, Any]:
        """Poll with backoff until the batch is completed; the original batch shape."""
        deadline = time.monotonic() + deadline_s if deadline_s else None
        delay = self.poll_initial
        while True:
            body = self.request("GET", f"/batches/{batch_id}", deadline=deadline)
            if body.get("status") == "completed":
                return original_shape(body)
            if deadline is not None and time.monotonic() + delay > deadline:
                raise ExecutorTimeout(batch_id, body)
            time.sleep(delay)
            delay = min(self.poll_max, delay * 1.5)

    def run_batch(self, batch: list[dict[str, Any]], timeout: float | None = None,
                  deadline_s: float | None = None, callback_url: str | None = None,
                  profile: bool | None = None) -> dict[str, Any]:
        """Submit a batch and wait for it: the response POST /execute_batch would give."""
        start = time.monotonic()
        deadline = start + deadline_s if deadline_s else None
        submitted = self.submit_batch(batch, timeout=timeout, deadline=deadline, callback_url=callback_url,
                                      profile=profile)
        left = None if deadline is None else max(0.0, deadline - time.monotonic())
        return self.wait_batch(submitted["batch_id"], deadline_s=left)


_SAFE_PART = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9 ._+=-]{0,127}$")


def _quote(text: str, safe: str = "") -> str:
    return urllib.parse.quote(text, safe=safe)


def original_shape(batch: dict[str, Any]) -> dict[str, Any]:
    """Keep the fields of the original /execute_batch response."""
    return {k: batch[k] for k in ("success", "batch_size", "successful", "failed", "results")
            if k in batch}


def _decode(raw: bytes) -> Any:
    try:
        return json.loads(raw.decode("utf-8")) if raw else None
    except (ValueError, UnicodeDecodeError):
        return {"error": raw[:500].decode("utf-8", "replace")}


def _retry_after(headers: dict) -> float | None:
    for key, value in headers.items():
        if key.lower() == "retry-after":
            try:
                return max(0.0, float(value))
            except ValueError:
                return None
    return None
