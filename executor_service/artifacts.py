"""Serving what jobs left, and (optionally) uploading results and artifacts to S3.

An artifact is a file an untrusted job chose (warm_pool.artifacts copied it out under
strict rules). It is served for download only: ``Content-Disposition: attachment``, a
Content-Type from a short allow-list of image and plain-data types by extension
(anything else, SVG and PDF included, is ``application/octet-stream``), never HTML,
with ``X-Content-Type-Options: nosniff`` (every response has it) and a sandboxing CSP.

`S3Exporter` uploads each finished job's result (``result.json``) and artifacts to
``<artifacts_s3_uri>/<paper_id>/<job_id>/`` from one background thread, with boto3 and
the default credential chain (the instance role on an instance; jobs never see the
service's AWS_* variables). The outcome is recorded in the store (exports table) and
shown with the artifacts listing. Jobs that finished while the service was down are
uploaded at the next start.
"""

from __future__ import annotations

import json
import logging
import os
import queue
import threading
import time
from pathlib import Path
from typing import Any

from warm_pool import error_text

log = logging.getLogger("executor_service.artifacts")

# By extension: what a browser may be told a file is. Nothing here renders as a page.
SAFE_TYPES = {
    ".png": "image/png", ".jpg": "image/jpeg", ".jpeg": "image/jpeg", ".gif": "image/gif",
    ".txt": "text/plain; charset=utf-8", ".log": "text/plain; charset=utf-8",
    ".csv": "text/csv; charset=utf-8", ".json": "application/json",
}
DEFAULT_TYPE = "application/octet-stream"
HEADERS = {"Content-Security-Policy": "default-src 'none'; sandbox", "Cache-Control": "private, no-cache"}
_RETRIES = 3


def content_type(name: str) -> str:
    """The Content-Type an artifact is served with (allow-list by extension)."""
    return SAFE_TYPES.get(os.path.splitext(name)[1].lower(), DEFAULT_TYPE)


def records(result: Any) -> list[dict[str, Any]]:
    """The store's rows for a JobResult's artifacts."""
    return [{"name": a.name, "size": a.size, "sha256": a.sha256, "content_type": content_type(a.name)}
            for a in getattr(result, "artifacts", ())]


def parse_s3_uri(uri: str) -> tuple[str, str]:
    """(bucket, prefix without slashes) of s3://bucket/prefix; ValueError otherwise."""
    if not uri.startswith("s3://") or not uri[5:].split("/", 1)[0]:
        raise ValueError(f"not an s3://bucket/prefix URI: {uri[:64]!r}")
    bucket, _, prefix = uri[5:].partition("/")
    return bucket, prefix.strip("/")


class S3Exporter:
    """Uploads finished jobs' results and artifacts, one job at a time, in the background."""

    def __init__(self, uri: str, store: Any, artifacts_dir: Path):
        self.bucket, self.prefix = parse_s3_uri(uri)
        self.store = store
        self.artifacts_dir = Path(artifacts_dir)
        self._queue: queue.Queue = queue.Queue()
        self._client = None
        self._thread = threading.Thread(target=self._run, name="s3-export", daemon=True)

    def start(self) -> None:
        """Start the thread; queue what finished while the service was down."""
        self._thread.start()
        for row in self.store.not_exported():
            if row.result is not None:
                self.submit(row.job_id, row.paper_id, row.to_public())

    def submit(self, job_id: str, paper_id: str, result: dict[str, Any]) -> None:
        self._queue.put((job_id, paper_id, result))

    def close(self, timeout: float = 10.0) -> None:
        """Finish what is queued (up to timeout), then stop."""
        self._queue.put(None)
        self._thread.join(timeout)

    def key(self, paper_id: str, job_id: str, name: str) -> str:
        parts = [self.prefix] if self.prefix else []
        return "/".join([*parts, paper_id, job_id, name])

    def _run(self) -> None:
        while True:
            item = self._queue.get()
            if item is None:
                return
            job_id, paper_id, result = item
            error = None
            for attempt in range(_RETRIES):
                try:
                    self._upload(job_id, paper_id, result)
                    error = None
                    break
                except Exception as exc:  # noqa: BLE001 - recorded, the service goes on
                    error = error_text(exc, 500)
                    time.sleep(0.5 * 2 ** attempt)
            where = f"s3://{self.bucket}/{self.key(paper_id, job_id, '')}"
            try:
                self.store.record_export(job_id, where, "failed" if error else "uploaded", error)
            except Exception:  # noqa: BLE001
                log.exception("could not record an upload", extra={"job_id": job_id})
            if error:
                log.warning("upload failed", extra={"job_id": job_id, "error": error})

    def _upload(self, job_id: str, paper_id: str, result: dict[str, Any]) -> None:
        if self._client is None:
            import boto3

            self._client = boto3.client("s3")
        body = json.dumps(result).encode("utf-8")
        self._client.put_object(Bucket=self.bucket, Key=self.key(paper_id, job_id, "result.json"), Body=body,
                                ContentType="application/json")
        for artifact in self.store.artifacts(job_id):
            path = self.artifacts_dir / job_id / artifact["name"]
            self._client.upload_file(str(path), self.bucket,
                                     self.key(paper_id, job_id, f"artifacts/{artifact['name']}"),
                                     ExtraArgs={"ContentType": artifact["content_type"]})
