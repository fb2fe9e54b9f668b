"""`trainium-executor idle-stop --after MINUTES [--command CMD]`: stop an idle instance.

Run by trainium-executor-idle-stop.timer (systemd/, installed disabled unless
setup_instance.sh is given --idle-stop MINUTES). It acts only when no job has been
queued or running for MINUTES, judged from the job store alone: the newest time a job
was accepted, started or finished, and never earlier than the machine's boot, so an
instance that a caller has just started is not stopped before the caller's work
arrives. With a queue (`--sqs-queue-url`, or EXECUTOR_SQS_QUEUE_URL from the service's
environment file), messages visible in it are work too: papers wait there for this
instance. It reads the store without writing it, and logs one JSON line saying what it
found and what it did. The default command, `shutdown -h now`, stops an EBS-backed EC2
instance (it is not terminated); the caller starts it again when papers wait.
"""

from __future__ import annotations

import argparse
import logging
import os
import shlex
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import psutil

from executor_service import logs
from executor_service.store import activity
from warm_pool import error_text

log = logging.getLogger("executor_service.idle")

DEFAULT_COMMAND = "shutdown -h now"


@dataclass(frozen=True)
class Verdict:
    """What the store says: how long nothing has been queued or running, and why."""

    idle: bool
    idle_for_s: float
    queued: int
    running: int
    reason: str
    waiting_in_queue: int = 0


def visible_messages(queue_url: str) -> int:
    """How many messages wait, visible, in the SQS queue (SQS's approximate count)."""
    import boto3

    from executor_service.sqs_intake import region_of

    session = boto3.session.Session()
    sqs = session.client("sqs", region_name=session.region_name or region_of(queue_url))
    attrs = sqs.get_queue_attributes(QueueUrl=queue_url, AttributeNames=["ApproximateNumberOfMessages"])
    return int(attrs["Attributes"]["ApproximateNumberOfMessages"])


def judge(store_path: Path, after_s: float, now: float | None = None,
          boot_time: float | None = None, waiting_in_queue: int = 0) -> Verdict:
    """Idle for at least `after_s`? From the store at `store_path` (absent: no job ever)
    and the messages waiting in the queue."""
    now = time.time() if now is None else now
    boot_time = psutil.boot_time() if boot_time is None else boot_time
    if store_path.exists():
        counts, last = activity(store_path)
    else:
        counts, last = {"queued": 0, "running": 0}, None
    queued, running = counts["queued"], counts["running"]
    since = max(last or 0.0, boot_time)
    idle_for = max(0.0, now - since)
    if queued or running or waiting_in_queue:
        return Verdict(False, 0.0, queued, running, f"busy: {running} running, {queued} queued, "
                       f"{waiting_in_queue} waiting in the queue", waiting_in_queue)
    what = "the last job" if last and last >= boot_time else "boot"
    enough = idle_for >= after_s
    return Verdict(enough, idle_for, 0, 0, f"idle for {idle_for:.0f} s since {what}, "
                                           f"{'at least' if enough else 'less than'} {after_s:.0f} s")


def add_arguments(parser: argparse.ArgumentParser, default_work_dir: str) -> None:
    parser.add_argument("--after", type=float, required=True, metavar="MINUTES",
                        help="act when nothing has been queued or running for this long")
    parser.add_argument("--command", dest="run_command", default=DEFAULT_COMMAND, metavar="CMD",
                        help=f"what to run then (split like a shell would; default: {DEFAULT_COMMAND})")
    parser.add_argument("--work-dir", default=default_work_dir,
                        help="the service's work dir, holding jobs.sqlite3 [env EXECUTOR_WORK_DIR]")
    parser.add_argument("--dry-run", action="store_true", help="say what would be done, do nothing")
    parser.add_argument("--sqs-queue-url", default=os.environ.get("EXECUTOR_SQS_QUEUE_URL") or None,
                        help="the service's SQS queue: its visible messages count as work "
                             "[env EXECUTOR_SQS_QUEUE_URL]")


def main(args: argparse.Namespace) -> int:
    """Judge, act when idle, log what happened; the command's exit status when it ran."""
    logs.configure("INFO")
    if args.after <= 0:
        log.error("idle-stop: --after must be a positive number of minutes", extra={"after": args.after})
        return 2
    store_path = Path(args.work_dir) / "jobs.sqlite3"
    waiting = 0
    if args.sqs_queue_url:
        try:
            waiting = visible_messages(args.sqs_queue_url)
        except Exception as exc:  # noqa: BLE001 - an unreadable queue: never stop blind
            log.error("idle-stop: cannot read the queue; doing nothing",
                      extra={"queue_url": args.sqs_queue_url, "error": error_text(exc)})
            return 1
    try:
        verdict = judge(store_path, args.after * 60, waiting_in_queue=waiting)
    except Exception as exc:  # noqa: BLE001 - an unreadable store: never stop blind
        log.error("idle-stop: cannot read the job store; doing nothing",
                  extra={"store": str(store_path), "error": error_text(exc)})
        return 1
    fields = {"store": str(store_path), "after_min": args.after, "idle_for_s": round(verdict.idle_for_s),
              "queued": verdict.queued, "running": verdict.running,
              "waiting_in_queue": verdict.waiting_in_queue, "reason": verdict.reason}
    if not verdict.idle:
        log.info("idle-stop: not idle; nothing to do", extra={**fields, "action": "none"})
        return 0
    if args.dry_run:
        log.info("idle-stop: idle; would run the command (dry run)", extra={**fields, "action": "dry-run",
                                                                             "command": args.run_command})
        return 0
    log.info("idle-stop: idle; running the command", extra={**fields, "action": "command",
                                                             "command": args.run_command})
    try:
        proc = subprocess.run(shlex.split(args.run_command), stdin=subprocess.DEVNULL, capture_output=True,
                              text=True, timeout=300)
    except (OSError, subprocess.TimeoutExpired) as exc:
        log.error("idle-stop: the command failed to run",
                  extra={"command": args.run_command, "error": str(exc)})
        return 1
    level = logging.INFO if proc.returncode == 0 else logging.ERROR
    log.log(level, "idle-stop: the command ended", extra={"command": args.run_command,
                                                          "exit_status": proc.returncode,
                                                          "output": (proc.stdout + proc.stderr)[-500:]})
    return proc.returncode
