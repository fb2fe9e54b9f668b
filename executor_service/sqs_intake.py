"""SQS intake: jobs from a queue beside HTTP (`--sqs-queue-url`).

    SQS ──receive: only while a slot is free, at most that many──▶ poller thread
            body = a POST /execute request, validated by the same rules
            ├─ not a valid request  → a queue_rejects record; the message is deleted
            ├─ its id was seen      → its job: active here → keep the newest receipt handle;
            │                          ended → delete; interrupted → run it again (below)
            └─ new                  → runner.accept(..., message_id): job and link, one transaction
    held: message id → (job_id, receipt handle)          keeper thread, woken when jobs end
            every third of the visibility timeout  → ChangeMessageVisibility (still ours)
            job completed or cancelled             → DeleteMessage (its result is stored)
            job interrupted (shutdown, Spot)       → ChangeMessageVisibility 0 (runs elsewhere)

Why a message is kept until its job ends instead of being deleted once the job is
stored: the queue, not this instance's disk, is what outlives a Spot reclaim or a
SIGKILL. While the service lives it renews the message; when it dies, the message comes
back after at most the visibility timeout, and the job runs again exactly once: the next
start marks the dead process's SQS jobs interrupted (store.recover), a redelivered
message whose job was interrupted runs again, one whose job ended is deleted, and one
whose job runs here is only renewed. The store's link from message id to job is what
keeps a second delivery of one message from being a second run.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from executor_service import validation
from executor_service.config import ServiceConfig
from executor_service.jobs import RETRY_AFTER_S, JobRunner, JobsError
from executor_service.metrics import Metrics
from executor_service.store import ACTIVE_STATUSES, JobStore
from executor_service.webhooks import run_woken
from warm_pool import STATUS_INTERRUPTED, ConfigError, error_text, settings, utc_iso

log = logging.getLogger("executor_service.sqs")

_BATCH = 10          # SQS's most messages per receive, delete or visibility call
_BACKOFF_MAX_S = 30.0
# What a message's record says is wrong is cut to this many characters.
_ERROR_CHARS = 500


def sqs_client(config: ServiceConfig):
    """A boto3 SQS client from the standard AWS configuration; the region from the
    queue's URL when the configuration names none. boto3 is imported only here."""
    try:
        import boto3
        from botocore.config import Config
    except ImportError:
        raise ConfigError(f"{settings.label(ServiceConfig, 'sqs_queue_url')} needs boto3: "
                          "pip install -r requirements.txt") from None
    session = boto3.session.Session()
    region = session.region_name or region_of(config.sqs_queue_url or "")
    if not region:
        raise ConfigError(f"{settings.label(ServiceConfig, 'sqs_queue_url')}: no AWS region; set "
                          "AWS_REGION or AWS_DEFAULT_REGION")
    # A receive waits up to sqs_wait_time: the read timeout must outlast it.
    return session.client("sqs", region_name=region, config=Config(
        connect_timeout=5, read_timeout=config.sqs_wait_time + 10,
        retries={"max_attempts": 3, "mode": "standard"}))


def region_of(url: str) -> str | None:
    """us-east-1 from https://sqs.us-east-1.amazonaws.com/..., else None."""
    parts = (urlsplit(url).hostname or "").split(".")
    return parts[1] if len(parts) > 3 and parts[0] == "sqs" and parts[-2] == "amazonaws" else None


@dataclass
class _Held:
    """A message this service holds (invisible to others) while its job is active."""

    job_id: str
    receipt: str
    renewed_at: float  # monotonic


@dataclass(frozen=True)
class IntakeStats:
    """What /health shows of the queue."""

    polling: bool
    taken: int        # messages that became jobs (a run again after an interruption counts)
    in_flight: int    # messages held now: their jobs are queued or running here
    duplicates: int   # deliveries of a message already taken (never run twice)
    failed: int       # messages that were not a valid request (deleted, recorded)
    returned: int     # messages made visible again (their job interrupted, or no room)
    errors: int       # SQS calls that failed
    last_error: str | None

    def to_public(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


class SqsIntake:
    """Receives, holds, renews, deletes and returns the messages of one queue."""

    def __init__(self, runner: JobRunner, store: JobStore, config: ServiceConfig, metrics: Metrics,
                 client=None):
        """`client`: a boto3 SQS client (sqs_client(config) when not given)."""
        self.runner = runner
        self.store = store
        self.config = config
        self.metrics = metrics
        self.url = config.sqs_queue_url
        self.client = client if client is not None else sqs_client(config)
        self.rules = config.request_rules()
        self._held: dict[str, _Held] = {}  # by message id (two messages may share a job)
        self._lock = threading.Lock()
        self._counts = {"taken": 0, "duplicates": 0, "failed": 0, "returned": 0, "errors": 0}
        self._last_error: str | None = None
        self._no_polling = threading.Event()
        self._closing = threading.Event()
        self._wake = threading.Event()       # the keeper's: a job ended, a message came again
        self._slot_free = threading.Event()  # the poller's: a job ended
        self._threads: list[threading.Thread] = []
        runner.add_end_listener(self._job_ended)
        metrics.gauge("executor_sqs_in_flight", "SQS messages held: their jobs are queued or running here",
                      lambda: len(self._held))

    # lifecycle -----------------------------------------------------------------------

    def start(self) -> SqsIntake:
        """Start the poller and the keeper threads."""
        self._threads = [threading.Thread(target=self._poll_loop, name="sqs-poller", daemon=True),
                         threading.Thread(target=self._keep_loop, name="sqs-keeper", daemon=True)]
        for thread in self._threads:
            thread.start()
        log.info("taking jobs from SQS", extra={"queue_url": self.url, "wait_s": self.config.sqs_wait_time,
                                                "visibility_s": self.config.sqs_visibility_timeout})
        return self

    def _job_ended(self) -> None:
        self._wake.set()
        self._slot_free.set()

    def stop_polling(self) -> None:
        """Receive no more messages (a receive under way ends within sqs_wait_time; what it
        brings is returned at once)."""
        self._no_polling.set()
        self._slot_free.set()

    def close(self) -> None:
        """After the runner's shutdown: delete the messages of jobs that ended, return the
        others to the queue, stop both threads. A receive still waiting is not waited
        for: what it brings now is returned at once, or, if the process is gone by
        then, comes back after its visibility timeout (no job of this store holds it)."""
        self.stop_polling()
        self._threads[0].join(timeout=1)
        self._closing.set()
        self._wake.set()
        self._threads[1].join(timeout=10)
        self.settle(release_active=True)

    @property
    def polling(self) -> bool:
        return not self._no_polling.is_set()

    def stats(self) -> IntakeStats:
        with self._lock:
            return IntakeStats(polling=self.polling, in_flight=len(self._held), last_error=self._last_error,
                               **self._counts)

    # receiving -----------------------------------------------------------------------

    def _poll_loop(self) -> None:
        backoff = 1.0
        while not self._no_polling.is_set():
            try:
                self.poll_once()
                backoff = 1.0
            except Exception as exc:  # noqa: BLE001 - the queue may be unreachable for a while
                self._error("ReceiveMessage", exc)
                self._no_polling.wait(backoff)
                backoff = min(backoff * 2, _BACKOFF_MAX_S)

    def free_slots(self) -> int:
        """Slots with nothing running or waiting for them: how many messages may be taken."""
        condition = self.runner.pool.condition()
        if condition.state in ("broken", "closing", "closed"):
            return 0
        counts = self.store.counts()
        active = sum(counts.get(s, 0) for s in ACTIVE_STATUSES)
        with self._lock:
            held = len(self._held)
        return condition.size - max(active, held)

    def poll_once(self) -> int:
        """One long poll when a slot is free (else wait for a job to end); how many taken."""
        free = self.free_slots()
        if free <= 0 or self.runner.refusal is not None or self.runner.closing:
            self._slot_free.wait(1.0)
            self._slot_free.clear()
            return 0
        resp = self.client.receive_message(
            QueueUrl=self.url, MaxNumberOfMessages=min(_BATCH, free),
            WaitTimeSeconds=self.config.sqs_wait_time, VisibilityTimeout=self.config.sqs_visibility_timeout,
            AttributeNames=["ApproximateReceiveCount"])
        taken = 0
        for message in resp.get("Messages", []):
            try:
                taken += self._take(message)
            except Exception as exc:  # noqa: BLE001 - one message never stops the others
                self._error("take", exc)
                self._return(message["ReceiptHandle"], RETRY_AFTER_S)
        return taken

    def _take(self, message: dict[str, Any]) -> int:
        message_id, receipt = message["MessageId"], message["ReceiptHandle"]
        if self._no_polling.is_set() or self.runner.refusal is not None or self.runner.closing:
            self._return(receipt, 0)  # it arrived as we stopped taking work
            return 0
        known = self.store.message_job(message_id)
        if known is not None and known.status != STATUS_INTERRUPTED:
            self._redelivered(message_id, receipt, known.job_id, known.status in ACTIVE_STATUSES)
            return 0
        body = message.get("Body") or ""
        raw = body.encode("utf-8", "surrogatepass")
        try:
            if len(raw) > self.config.max_body_bytes:
                raise validation.ApiError(413, f"message body of {len(raw)} bytes is larger than "
                                               f"max_body_bytes ({self.config.max_body_bytes})")
            request = validation.parse_single(validation.parse_json_object(raw), "test", self.rules)
        except validation.ApiError as exc:
            self._reject(message_id, receipt, raw, exc.message)
            return 0
        try:
            done = self.runner.accept(request, "sqs", message_id=message_id)
        except JobsError as exc:  # shutting down, pool broken, queue full: later, or elsewhere
            log.info("message returned: no room for its job", extra={"message_id": message_id,
                                                                      "reason": str(exc)})
            self._return(receipt, RETRY_AFTER_S)
            return 0
        [job_id] = done.job_ids
        with self._lock:
            self._held[message_id] = _Held(job_id, receipt, time.monotonic())
            self._counts["taken"] += 1
        self.metrics.queue_messages.labels(outcome="taken").inc()
        log.info("message taken", extra={"message_id": message_id, "job_id": job_id,
                                         "paper_id": request.items[0].paper_id, "rerun": known is not None,
                                         "receive_count": message.get("Attributes", {}).get(
                                             "ApproximateReceiveCount")})
        return 1

    def _redelivered(self, message_id: str, receipt: str, job_id: str, active: bool) -> None:
        """A message taken before: never a second run. Its job still active here: keep the
        newest receipt handle (SQS deletes a message only by its latest one); ended: delete."""
        with self._lock:
            self._counts["duplicates"] += 1
            if active:
                self._held[message_id] = _Held(job_id, receipt, time.monotonic())
        self.metrics.queue_messages.labels(outcome="duplicate").inc()
        log.info("message delivered again; not run again",
                 extra={"message_id": message_id, "job_id": job_id, "job_active": active})
        if not active:
            self._delete(receipt)
        self._wake.set()  # the keeper looks at it at once

    def _reject(self, message_id: str, receipt: str, raw: bytes, error: str) -> None:
        """Not a valid request: recorded (what was wrong, size, digest) and deleted, since
        it could never become valid; nothing of it is run or called back."""
        error = validation.cut(error, _ERROR_CHARS)
        self.store.record_reject(message_id, raw, error)
        with self._lock:
            self._counts["failed"] += 1
        self.metrics.queue_messages.labels(outcome="rejected").inc()
        log.warning("message rejected: not a valid request", extra={"message_id": message_id,
                                                                    "bytes": len(raw), "error": error})
        self._delete(receipt)

    # holding -------------------------------------------------------------------------

    def _keep_loop(self) -> None:
        every = min(1.0, self.config.sqs_visibility_timeout / 6)
        run_woken(self._closing, self._wake, self.settle, "sqs keeper", every=every)

    def settle(self, release_active: bool = False) -> None:
        """Delete the messages of jobs that ended, return those of interrupted jobs (and,
        with `release_active`, of every job not ended), renew the rest when due."""
        renew_every = self.config.sqs_visibility_timeout / 3
        now = time.monotonic()
        with self._lock:
            held = dict(self._held)
        to_delete, to_return, to_renew = [], [], []
        for message_id, h in held.items():
            row = self.store.get_job(h.job_id)
            active = row is not None and row.status in ACTIVE_STATUSES
            if row is None or row.status == STATUS_INTERRUPTED or (release_active and active):
                to_return.append((message_id, h))
            elif not active:
                to_delete.append((message_id, h))
            elif now - h.renewed_at >= renew_every:
                to_renew.append((message_id, h))
        for message_id, h in to_delete:
            self._delete(h.receipt)
            log.info("message deleted: its job ended", extra={"message_id": message_id, "job_id": h.job_id})
        for message_id, h in to_return:
            self._return(h.receipt, 0)
            log.info("message returned to the queue: its job did not end here",
                     extra={"message_id": message_id, "job_id": h.job_id})
        # Held until SQS has them gone or back: the poller counts them until then, so it
        # never holds more messages than the pool has slots (it is woken when they go).
        if self._forget(to_delete + to_return):
            self._slot_free.set()
        self._renew(to_renew, now)

    def _forget(self, pairs: list[tuple[str, _Held]]) -> int:
        """No longer held (unless a newer delivery replaced one meanwhile); how many."""
        forgotten = 0
        with self._lock:
            for message_id, h in pairs:
                if self._held.get(message_id) is h:
                    del self._held[message_id]
                    forgotten += 1
        return forgotten

    def _renew(self, pairs: list[tuple[str, _Held]], now: float) -> None:
        for start in range(0, len(pairs), _BATCH):
            chunk = pairs[start:start + _BATCH]
            try:
                entries = [{"Id": str(i), "ReceiptHandle": h.receipt,
                            "VisibilityTimeout": self.config.sqs_visibility_timeout}
                           for i, (_, h) in enumerate(chunk)]
                resp = self.client.change_message_visibility_batch(QueueUrl=self.url, Entries=entries)
            except Exception as exc:  # noqa: BLE001 - tried again at the next pass
                self._error("ChangeMessageVisibilityBatch", exc)
                continue
            failed = {f["Id"] for f in resp.get("Failed", [])}
            for i, (_, h) in enumerate(chunk):
                if str(i) not in failed:
                    h.renewed_at = now
            if failed:
                self._error("ChangeMessageVisibilityBatch", RuntimeError(str(resp["Failed"][:3])))

    # SQS calls -------------------------------------------------------------------------

    def _delete(self, receipt: str) -> None:
        try:
            self.client.delete_message(QueueUrl=self.url, ReceiptHandle=receipt)
        except Exception as exc:  # noqa: BLE001 - it comes back, is seen as ended, deleted then
            self._error("DeleteMessage", exc)

    def _return(self, receipt: str, after_s: int) -> None:
        """Make a message visible again in `after_s` seconds."""
        try:
            self.client.change_message_visibility(QueueUrl=self.url, ReceiptHandle=receipt,
                                                  VisibilityTimeout=after_s)
        except Exception as exc:  # noqa: BLE001 - it comes back after its visibility timeout anyway
            self._error("ChangeMessageVisibility", exc)
            return
        with self._lock:
            self._counts["returned"] += 1
        self.metrics.queue_messages.labels(outcome="returned").inc()

    def _error(self, call: str, exc: BaseException) -> None:
        text = f"{call}: {error_text(exc, _ERROR_CHARS)}"
        with self._lock:
            self._counts["errors"] += 1
            self._last_error = f"{utc_iso(time.time())} {text}"
        self.metrics.queue_errors.labels(call=call if call in _CALLS else "other").inc()
        log.warning("SQS call failed", extra={"call": call, "error": text})


_CALLS = frozenset({"ReceiveMessage", "DeleteMessage", "ChangeMessageVisibility",
                    "ChangeMessageVisibilityBatch", "take"})
