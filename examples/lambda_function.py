"""A scheduling Lambda for the Trainium Executor: start the instance when papers wait,
submit them fire-and-forget, and let the service report back (or poll later).

Two paths. HTTP (default): wait for the instance's /health, then POST the batches.
Queue (TRAINIUM_QUEUE_URL set): put each paper on the service's SQS queue at once and
start the instance if it is stopped, without waiting for it: the service takes the
messages when it is up, and a paper whose instance is reclaimed goes back to the queue.

Deploy this file with `client.py` copied next to it (executor_service/client.py: the
standard library only). boto3 is the only other import, and Lambda's Python runtime
ships it. docs/lambda.md explains the whole flow.

Environment:
    TRAINIUM_ENDPOINT        http://<private ip>:8000 (the instance keeps its private IP
                             across stop and start)
    TRAINIUM_INSTANCE_ID     i-0123456789abcdef0
    EXECUTOR_API_TOKEN       the service's bearer token (better: from Secrets Manager)
    EXECUTOR_CALLBACK_URL    optional: where the service POSTs each batch's results
                             (its host must be on the service's --callback-hosts)
    TRAINIUM_QUEUE_URL       optional: the service's SQS queue (--sqs-queue-url): the queue path
    CODE_BUCKET              optional: bucket of papers given by s3_code_key
    EXECUTION_TIMEOUT        seconds per script (default 3600)
    POLL_INTERVAL_S          how often to look at the instance and /health (default 5)

Event: {"papers": [{"paper_id", "code" | "s3_code_key", "paper_title"?, "slack_thread_ts"?}]}

Returns {"status": "submitted", "batch_id", "job_ids", "deduplicated_papers", "poll"} or
{"status": "starting", ...} when the instance is not ready before this invocation must
end (the papers are not sent: the next scheduled run sends them, and identical code
already queued or running is never run twice, see "deduplicated"). On the queue path:
{"status": "enqueued", "instance", "message_ids": {paper_id: id}, "poll": "/papers/<id>"}.
"""

from __future__ import annotations

import json
import os
import time

import boto3
from client import ExecutorClient, ExecutorError

# Seconds of the Lambda's own time kept for submitting and returning.
RESERVE_S = 20
# The callers' own fields: the service keeps them and returns them with each result.
CALLER_FIELDS = ("paper_title", "slack_thread_ts", "s3_code_key")


def ensure_running(ec2, instance_id: str, deadline: float, interval: float, wait: bool = True) -> str:
    """Start the instance if it is stopped (waiting out a stop in progress first); return
    what was done: "running" (it was), "started", or "pending" (not running by deadline).
    With `wait` false it returns as soon as the instance is started or already starting."""
    action = "running"
    while True:
        state = ec2.describe_instances(InstanceIds=[instance_id])["Reservations"][0]["Instances"][0][
            "State"]["Name"]
        if state == "running":
            return action
        if state == "stopped":
            ec2.start_instances(InstanceIds=[instance_id])
            action = "started"
            print(json.dumps({"msg": "starting the instance", "instance_id": instance_id}))
            if not wait:
                return action
        elif state in ("terminated", "shutting-down"):
            raise RuntimeError(f"instance {instance_id} is {state}")
        elif state == "pending" and not wait:
            return "pending"
        if time.monotonic() + interval > deadline:
            return "pending"
        time.sleep(interval)  # pending, or stopping (it must be stopped before it can start)


def wait_healthy(executor: ExecutorClient, deadline: float, interval: float) -> bool:
    """True once GET /health says healthy (a worker is ready), False at the deadline."""
    while True:
        try:
            if executor.health().get("status") == "healthy":
                return True
        except (ExecutorError, OSError):
            pass  # the instance is booting: nothing listens yet
        if time.monotonic() + interval > deadline:
            return False
        time.sleep(interval)


def load_papers(papers: list[dict], s3, bucket: str | None) -> list[dict]:
    """The batch items: each paper's code inline or fetched from S3, its own fields kept."""
    batch = []
    for paper in papers:
        item = {k: paper[k] for k in ("paper_id", *CALLER_FIELDS) if k in paper}
        if "code" in paper:
            item["code"] = paper["code"]
        else:
            body = s3.get_object(Bucket=paper.get("s3_bucket") or bucket, Key=paper["s3_code_key"])["Body"]
            item["code"] = body.read().decode("utf-8")
        batch.append(item)
    return batch


def enqueue(sqs, queue_url: str, batch: list[dict], timeout: float, callback_url: str | None) -> dict:
    """Each paper as one message whose body is its POST /execute request; {paper_id: message id}."""
    sent = {}
    for start in range(0, len(batch), 10):  # SQS's most messages per call
        chunk = batch[start:start + 10]
        entries = [{"Id": str(i), "MessageBody": json.dumps(
            {**item, "timeout": timeout, **({"callback_url": callback_url} if callback_url else {})})}
            for i, item in enumerate(chunk)]
        resp = sqs.send_message_batch(QueueUrl=queue_url, Entries=entries)
        if resp.get("Failed"):
            raise RuntimeError(f"SQS refused messages: {resp['Failed']}")
        sent.update({chunk[int(ok["Id"])]["paper_id"]: ok["MessageId"] for ok in resp["Successful"]})
    return sent


def handler(event, context):
    papers = event.get("papers") or []
    if not papers:
        return {"status": "nothing to do"}
    interval = float(os.environ.get("POLL_INTERVAL_S", "5"))
    deadline = time.monotonic() + context.get_remaining_time_in_millis() / 1000 - RESERVE_S
    instance_id = os.environ["TRAINIUM_INSTANCE_ID"]
    timeout = float(os.environ.get("EXECUTION_TIMEOUT", "3600"))
    callback_url = os.environ.get("EXECUTOR_CALLBACK_URL") or None
    if os.environ.get("TRAINIUM_QUEUE_URL"):
        batch = load_papers(papers, boto3.client("s3"), os.environ.get("CODE_BUCKET"))
        sent = enqueue(boto3.client("sqs"), os.environ["TRAINIUM_QUEUE_URL"], batch, timeout, callback_url)
        # Enqueued first: if starting fails, the papers still wait for the next start.
        instance = ensure_running(boto3.client("ec2"), instance_id, deadline, interval, wait=False)
        result = {"status": "enqueued", "instance": instance, "message_ids": sent,
                  "poll": "/papers/<paper_id>"}
        print(json.dumps(result))
        return result
    executor = ExecutorClient(os.environ["TRAINIUM_ENDPOINT"], token=os.environ.get("EXECUTOR_API_TOKEN"),
                              request_timeout=30, max_retries=3)

    instance = ensure_running(boto3.client("ec2"), instance_id, deadline, interval)
    if instance == "pending" or not wait_healthy(executor, deadline, interval):
        return {"status": "starting", "instance": instance, "instance_id": instance_id}

    batch = load_papers(papers, boto3.client("s3"), os.environ.get("CODE_BUCKET"))
    # At most 10 per batch (the service's max_batch_size); each batch answers 202 at once.
    submitted = []
    for start in range(0, len(batch), 10):
        accepted = executor.submit_batch(batch[start:start + 10], timeout=timeout, callback_url=callback_url)
        submitted.append({"batch_id": accepted["batch_id"], "job_ids": accepted["job_ids"],
                          "deduplicated_papers": accepted.get("deduplicated_papers", []),
                          "poll": accepted["batch_url"]})
    result = {"status": "submitted", "instance": instance, "batches": submitted}
    print(json.dumps(result))
    return result
