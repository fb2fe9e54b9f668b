"""Webhooks: a finished job's (or batch's) document POSTed to its callback_url, signed.

    accept ──▶ store.callbacks (waiting)
    step(): waiting ──▶ pending    when the job, or every job of the batch, is terminal
            pending, due ──▶ a delivery thread: POST ──▶ delivered
                                                   └──▶ pending again after a backoff, or failed

Why it is built like this:
- The state of every delivery is in the job store, so a restart loses none: what was
  pending is sent again, and a delivery cut short by a crash is repeated (at least once:
  receivers recognise a repeat by X-Delivery-Id, or the job_id in the body).
- Sending happens on this module's own threads, never on the pool's callback threads nor
  a request's: a receiver that hangs holds a delivery thread for callback_timeout, no more.
- `step()` does one pass and takes the time as an argument (huey's consumer loop), so the
  loop thread is trivial and a pass is easy to reason about.
- The body is signed with HMAC-SHA256 (`X-Signature: sha256=<hex>`, like GitHub's
  X-Hub-Signature-256) over the exact bytes sent; docs/webhooks.md shows how to check it.
- http.client, not urllib: no redirect is followed (a 3xx could point past the
  allow-list) and no proxy from the environment is used.
"""

from __future__ import annotations

import hashlib
import hmac
import http.client
import json
import logging
import random
import ssl
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any
from urllib.parse import urlsplit

from executor_service.store import (
    CALLBACK_DELIVERED,
    CALLBACK_FAILED,
    CALLBACK_PENDING,
    CallbackRow,
    JobStore,
)
from warm_pool import error_text

log = logging.getLogger("executor_service.webhooks")

DELIVERY_THREADS = 4
MAX_BACKOFF_S = 600.0
USER_AGENT = "trainium-executor-webhook/1"
# How much of a receiver's error answer is kept in the job's delivery state.
_ERROR_CHARS = 200


def sign(secret: str, body: bytes) -> str:
    """The X-Signature header value: sha256=<hex HMAC-SHA256 of the body, keyed by secret>."""
    return "sha256=" + hmac.new(secret.encode("utf-8"), body, hashlib.sha256).hexdigest()


def post(url: str, body: bytes, headers: dict[str, str], timeout: float) -> tuple[int, str]:
    """POST body to url once; (status, the start of the answer). OSError when unreachable."""
    parts = urlsplit(url)
    path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    if parts.scheme == "https":
        conn: http.client.HTTPConnection = http.client.HTTPSConnection(
            parts.hostname, parts.port, timeout=timeout, context=ssl.create_default_context())
    else:
        conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=timeout)
    try:
        conn.request("POST", path, body=body, headers=headers)
        resp = conn.getresponse()
        return resp.status, resp.read(_ERROR_CHARS).decode("utf-8", "replace")
    finally:
        conn.close()


def backoff(first: float, failures: int) -> float:
    """Seconds before the next attempt after `failures` failed ones: first, doubling, capped,
    with up to 10 % jitter so that callbacks failing together do not retry together."""
    return min(MAX_BACKOFF_S, first * 2 ** (failures - 1)) * (1 + random.uniform(0, 0.1))


class Deliverer:
    """Promotes, sends and records callbacks; `render(row)` gives the document to send."""

    def __init__(self, store: JobStore, secret: str | None, render: Callable[[CallbackRow], dict[str, Any]],
                 attempts: int, first_backoff: float, timeout: float):
        self.store = store
        self.secret = secret
        self.render = render
        self.attempts = attempts
        self.first_backoff = first_backoff
        self.timeout = timeout
        self._inflight: set[int] = set()
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._closing = threading.Event()
        self._pool = ThreadPoolExecutor(max_workers=DELIVERY_THREADS, thread_name_prefix="webhook")
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        """Start the loop: a pass every second, and at once when woken."""
        self._thread = threading.Thread(target=self._loop, name="webhooks", daemon=True)
        self._thread.start()

    def wake(self) -> None:
        """A job ended: look for callbacks that became due now rather than within a second."""
        self._wake.set()

    def shutdown(self, timeout: float = 5.0) -> None:
        """Stop the loop; deliveries in flight get `timeout` s; the rest stay pending."""
        self._closing.set()
        self._wake.set()
        if self._thread:
            self._thread.join(timeout)
        self._pool.shutdown(wait=False, cancel_futures=True)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self._lock:
                if not self._inflight:
                    break
            time.sleep(0.05)

    def _loop(self) -> None:
        run_woken(self._closing, self._wake, self.step, "webhook loop")

    def step(self, now: float | None = None) -> int:
        """One pass: make due what can be sent, hand due deliveries to the threads; how many."""
        now = time.time() if now is None else now
        self.store.promote_callbacks(now)
        started = 0
        for row in self.store.due_callbacks(now, limit=DELIVERY_THREADS * 4):
            with self._lock:
                if row.id in self._inflight or len(self._inflight) >= DELIVERY_THREADS * 2:
                    continue
                self._inflight.add(row.id)
            try:
                future = self._pool.submit(self._deliver, row)
            except RuntimeError:  # shutting down
                self._done(row.id)
                break
            # Also when the future is cancelled at shutdown, before it ran.
            future.add_done_callback(lambda _f, callback_id=row.id: self._done(callback_id))
            started += 1
        return started

    def _done(self, callback_id: int) -> None:
        with self._lock:
            self._inflight.discard(callback_id)

    def _deliver(self, row: CallbackRow) -> None:
        try:
            self._attempt(row)
        except Exception:  # noqa: BLE001 - never lose the thread; the row stays pending
            log.exception("webhook delivery error", extra={"callback_id": row.id})

    def _attempt(self, row: CallbackRow) -> None:
        attempt = row.attempts + 1
        status, error = None, None
        try:
            body = json.dumps(self.render(row)).encode("utf-8")
            headers = {"Content-Type": "application/json", "User-Agent": USER_AGENT,
                       "X-Executor-Event": "job.finished" if row.job_id else "batch.finished",
                       "X-Delivery-Id": str(row.id), "X-Delivery-Attempt": str(attempt)}
            if self.secret:
                headers["X-Signature"] = sign(self.secret, body)
            status, answer = post(row.url, body, headers, self.timeout)
            if not 200 <= status < 300:
                error = f"HTTP {status}: {answer}"[:_ERROR_CHARS]
        except (OSError, http.client.HTTPException, LookupError, ValueError) as exc:
            # LookupError: the job or batch is gone; ValueError: a URL http.client refuses.
            error = error_text(exc, _ERROR_CHARS)
        fields = {"callback_id": row.id, "job_id": row.job_id, "batch_id": row.batch_id,
                  "attempt": attempt, "status": status}
        if error is None:
            self.store.record_attempt(row.id, CALLBACK_DELIVERED, status, None, None)
            log.info("callback delivered", extra=fields)
        elif attempt >= self.attempts:
            self.store.record_attempt(row.id, CALLBACK_FAILED, status, error, None)
            log.warning("callback failed for good", extra={**fields, "error": error})
        else:
            retry_at = time.time() + backoff(self.first_backoff, attempt)
            self.store.record_attempt(row.id, CALLBACK_PENDING, status, error, retry_at)
            log.info("callback attempt failed; will retry", extra={**fields, "error": error})


def run_woken(closing: threading.Event, wake: threading.Event, step: Callable[[], object], name: str,
              every: float = 1.0) -> None:
    """A background loop: `step()` each time `wake` is set, and at least every `every`
    seconds, until `closing` is set. An error in a step is logged and the loop goes on."""
    while not closing.is_set():
        wake.wait(every)
        wake.clear()
        if closing.is_set():
            break
        try:
            step()
        except Exception:  # noqa: BLE001 - the loop must survive anything
            log.exception(f"{name} error")
