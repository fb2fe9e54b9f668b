"""Spot interruption: watch the instance metadata service, drain before the instance goes.

    watcher thread, every spot_poll_interval:
      PUT  /latest/api/token                                (IMDSv2; the token is kept for its TTL)
      GET  /latest/meta-data/spot/instance-action           404: none; {"action", "time"}
      GET  /latest/meta-data/events/recommendations/rebalance   404: none; {"noticeTime"}
    the first notice → drain():
      1. the runner takes no new work: HTTP 503 with Retry-After, no queued job starts;
      2. the SQS intake stops polling;
      3. queued jobs are recorded interrupted now, their SQS messages visible again at once;
    at the deadline (the notice's time, or a rebalance's noticeTime + spot_rebalance_window,
    less spot_margin) → jobs still running are stopped and recorded interrupted; the
    intake returns their messages. Jobs that end before it keep their results.

Why a margin: EC2 gives two minutes from the notice to the stop, and returning messages
and recording results must be done before then, not at the last second. A rebalance
recommendation carries no deadline: it is treated as a notice with the usual two
minutes (spot_rebalance_window), since it often comes shortly before one; 0 ignores it.
A later notice with an earlier deadline moves the deadline; nothing ever moves it later.
Draining is for good: the service takes work again only when it is started again.
"""

from __future__ import annotations

import json
import logging
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from executor_service.config import ServiceConfig
from executor_service.jobs import JobRunner
from executor_service.metrics import Metrics
from warm_pool import STATUS_QUEUED, STATUS_RUNNING, error_text, utc_iso

log = logging.getLogger("executor_service.spot")

TOKEN_TTL_S = 21600
_TIMEOUT_S = 2.0
_INSTANCE_ACTION = "/latest/meta-data/spot/instance-action"
_REBALANCE = "/latest/meta-data/events/recommendations/rebalance"


def on_ec2() -> bool:
    """What the machine says of itself (DMI, the Xen hypervisor's uuid): an EC2 instance?"""
    for path, marker in (("/sys/class/dmi/id/sys_vendor", "amazon ec2"),
                         ("/sys/class/dmi/id/board_asset_tag", "i-"), ("/sys/hypervisor/uuid", "ec2")):
        try:
            if Path(path).read_text().strip().lower().startswith(marker):
                return True
        except OSError:
            continue
    return False


def wanted(config: ServiceConfig) -> bool:
    """Whether the service watches for notices (spot_watch: on, off, auto = on EC2)."""
    return config.spot_watch == "on" or (config.spot_watch == "auto" and on_ec2())


@dataclass(frozen=True)
class Notice:
    """A notice the metadata service gave, and when this service must have drained."""

    kind: str            # instance-action | rebalance
    action: str | None   # terminate, stop, hibernate (instance-action only)
    time: float          # the notice's own time: the stop's (instance-action) or the notice's
    deadline: float      # when jobs still running are stopped (epoch seconds)

    def to_public(self) -> dict[str, Any]:
        return {"kind": self.kind, "action": self.action, "time": utc_iso(self.time),
                "deadline": utc_iso(self.deadline)}


def _epoch(text: Any) -> float | None:
    try:
        return datetime.fromisoformat(str(text).replace("Z", "+00:00")).timestamp()
    except ValueError:
        return None


class Imds:
    """An IMDSv2 client: a session token first, then GETs that present it."""

    def __init__(self, endpoint: str):
        self.endpoint = endpoint.rstrip("/")
        self._token: str | None = None
        self._token_until = 0.0

    def _request(self, method: str, path: str, headers: dict[str, str]) -> tuple[int, bytes]:
        req = urllib.request.Request(self.endpoint + path, method=method, headers=headers)
        try:
            with urllib.request.urlopen(req, timeout=_TIMEOUT_S) as resp:  # noqa: S310 - a setting's http URL
                return resp.status, resp.read(65536)
        except urllib.error.HTTPError as exc:
            return exc.code, b""

    def get(self, path: str) -> dict[str, Any] | None:
        """The JSON document at `path`, or None when there is none (404)."""
        if self._token is None or time.monotonic() >= self._token_until:
            status, body = self._request("PUT", "/latest/api/token",
                                         {"X-aws-ec2-metadata-token-ttl-seconds": str(TOKEN_TTL_S)})
            if status != 200:
                raise OSError(f"IMDSv2 token refused: HTTP {status}")
            self._token, self._token_until = body.decode(), time.monotonic() + TOKEN_TTL_S - 60
        status, body = self._request("GET", path, {"X-aws-ec2-metadata-token": self._token})
        if status == 401:
            self._token = None  # expired: a new one next time
        if status != 200:
            return None
        doc = json.loads(body)
        return doc if isinstance(doc, dict) else None


def read_notice(imds: Imds, config: ServiceConfig, now: float) -> Notice | None:
    """The most urgent notice the metadata service has now (a stop's over a rebalance
    recommendation), with its deadline; None when it has none."""
    action = imds.get(_INSTANCE_ACTION)
    if action is not None:
        at = _epoch(action.get("time")) or now + 120
        return Notice("instance-action", str(action.get("action"))[:32], at, at - config.spot_margin)
    rebalance = imds.get(_REBALANCE) if config.spot_rebalance_window > 0 else None
    if rebalance is not None:
        at = _epoch(rebalance.get("noticeTime")) or now
        return Notice("rebalance", None, at, at + config.spot_rebalance_window - config.spot_margin)
    return None


class SpotWatcher:
    """Polls for notices and drains the runner (and the SQS intake) on the first."""

    def __init__(self, config: ServiceConfig, runner: JobRunner, metrics: Metrics, intake=None):
        self.config = config
        self.runner = runner
        self.intake = intake
        self.imds = Imds(config.imds_endpoint)
        self.notice: Notice | None = None
        self.interrupted: list[str] = []
        self._stopped_running = False
        self._closing = threading.Event()
        self._thread: threading.Thread | None = None
        self._failing = False
        metrics.gauge("executor_spot_notice", "1 once a Spot interruption notice or rebalance recommendation "
                      "was seen (the service is draining)", lambda: int(self.notice is not None))

    def start(self) -> SpotWatcher:
        self._thread = threading.Thread(target=self._loop, name="spot-watcher", daemon=True)
        self._thread.start()
        log.info("watching for Spot interruption notices", extra={"imds_endpoint": self.config.imds_endpoint})
        return self

    def close(self) -> None:
        self._closing.set()
        if self._thread:
            self._thread.join(timeout=_TIMEOUT_S * 4)

    def _loop(self) -> None:
        while not self._closing.is_set():
            self.step()
            wait = self.config.spot_poll_interval
            if self.notice is not None and not self._stopped_running:
                wait = min(wait, max(0.0, self.notice.deadline - time.time()))
            self._closing.wait(wait)

    def step(self, now: float | None = None) -> None:
        """One pass: ask for notices, drain on a new one, stop what runs past the deadline."""
        now = time.time() if now is None else now
        try:
            found = read_notice(self.imds, self.config, now)
            self._failing = False
        except (OSError, ValueError) as exc:
            found = None
            if not self._failing:  # said once, not every few seconds
                log.warning("metadata service unreachable", extra={"error": error_text(exc)})
            self._failing = True
        if found is not None and (self.notice is None or found.deadline < self.notice.deadline):
            self.drain(found)
        if self.notice is not None and not self._stopped_running and now >= self.notice.deadline:
            self._stopped_running = True
            ended = self.runner.interrupt((STATUS_RUNNING,), self._message("did not end before the "
                                                                          "instance's deadline"))
            self.interrupted.extend(ended)

    def drain(self, notice: Notice) -> None:
        """Take no new work, return what has not started; running jobs go on to the deadline."""
        first = self.notice is None
        self.notice = notice
        log.warning("Spot interruption notice: draining", extra={**notice.to_public(), "first": first})
        if not first:
            return
        self.runner.refuse_work(f"the instance is being reclaimed (Spot {notice.kind} notice); send the "
                                "work elsewhere or later")
        if self.intake is not None:
            self.intake.stop_polling()
        self.interrupted.extend(self.runner.interrupt((STATUS_QUEUED,), self._message("had not started")))

    def _message(self, what: str) -> str:
        notice = self.notice
        kind = notice.kind if notice else "interruption"
        return (f"the instance is being reclaimed (Spot {kind} notice, deadline "
                f"{utc_iso(notice.deadline) if notice else '?'}); this job {what}: submit it again")
