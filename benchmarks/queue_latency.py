"""`python -m benchmarks.queue_latency [--runs N] [--backend cpu]`: what a job costs when it
comes through the SQS queue rather than HTTP.

One service (a real process, 2 slots, idle between jobs) takes jobs both ways; the queue
is moto's SQS server on 127.0.0.1, reached through AWS_ENDPOINT_URL_SQS as a deployment
reaches SQS (so the SQS round trips here are loopback's, not a region's: on AWS add the
in-region API latency, tens of ms, to `queue_to_store`). For the same small script, one
at a time:

- http:  POST /execute (synchronous) until its result is read;
- queue: SendMessage until GET /papers/<id> shows its result (polled every 5 ms), and of
  that, `queue_to_store`: from SendMessage to the job's row in the store (the long
  poll's wake-up, the receive, validation, the durable insert).

Prints a table and writes benchmarks/results/queue_latency.json. Needs boto3 and
moto[server] (requirements-dev.txt).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from benchmarks.report import load_avg, machine, summarize, write_json
from benchmarks.service import Service, _free_port

RESULTS = Path(__file__).resolve().parent / "results"
CODE = "print('hello')"
AWS = {"AWS_ACCESS_KEY_ID": "bench", "AWS_SECRET_ACCESS_KEY": "bench", "AWS_DEFAULT_REGION": "us-east-1",
       "AWS_EC2_METADATA_DISABLED": "true"}
POLL_S = 0.005


def start_moto(log_dir: Path) -> tuple[subprocess.Popen, str]:
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    log = open(log_dir / "moto.log", "wb")  # noqa: SIM115 - lives as long as the process
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                            stdout=log, stderr=log, env={**os.environ, **AWS})
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            if urllib.request.urlopen(url + "/moto-api/", timeout=1).status == 200:
                return proc, url
        except OSError:
            time.sleep(0.2)
    proc.kill()
    raise RuntimeError("moto's server did not start")


def over_http(svc: Service, runs: int, prefix: str) -> list[float]:
    samples = []
    for i in range(runs):
        start = time.perf_counter()
        status, body = svc.request("POST", "/execute", {"paper_id": f"{prefix}-{i}", "code": CODE})
        samples.append(time.perf_counter() - start)
        assert status == 200 and body["success"], body
    return samples


def over_queue(svc: Service, sqs, queue_url: str, runs: int, prefix: str) -> tuple[list[float], list[float]]:
    total, intake = [], []
    for i in range(runs):
        paper = f"{prefix}-{i}"
        sent_at = time.time()
        start = time.perf_counter()
        sqs.send_message(QueueUrl=queue_url, MessageBody=json.dumps({"paper_id": paper, "code": CODE}))
        while True:
            status, body = svc.request("GET", f"/papers/{paper}")
            if status == 200 and body["latest_finished"]:
                break
            time.sleep(POLL_S)
        total.append(time.perf_counter() - start)
        _, listed = svc.request("GET", f"/jobs?paper_id={paper}")
        intake.append(_epoch(listed["jobs"][0]["submitted_at"]) - sent_at)
        assert body["latest_finished"]["success"], body
    return total, intake


def _epoch(iso: str) -> float:
    from datetime import datetime

    return datetime.fromisoformat(iso.replace("Z", "+00:00")).timestamp()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=30)
    parser.add_argument("--backend", default="cpu")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    import boto3

    with tempfile.TemporaryDirectory(prefix="queue-bench-") as tmp:
        moto, url = start_moto(Path(tmp))
        try:
            os.environ.update(AWS, AWS_ENDPOINT_URL_SQS=url)
            sqs = boto3.client("sqs", endpoint_url=url, region_name=AWS["AWS_DEFAULT_REGION"])
            queue_url = sqs.create_queue(QueueName="bench")["QueueUrl"]
            work = Path(tmp) / "work"
            os.chmod(tmp, 0o755)
            with Service(args.backend, work, args=("--sqs-queue-url", queue_url)) as svc:
                over_http(svc, 4, "warm-http")  # warm-up: the first jobs of a fresh pool
                over_queue(svc, sqs, queue_url, 4, "warm-queue")
                http = over_http(svc, args.runs, "http")
                queue, intake = over_queue(svc, sqs, queue_url, args.runs, "queue")
        finally:
            moto.terminate()
            moto.wait(10)
    results = {"machine": machine(), "runs": args.runs, "backend": args.backend, "code": CODE,
               "http": summarize(http), "queue": summarize(queue), "queue_to_store": summarize(intake)}
    results["queue_minus_http_p50_ms"] = round(results["queue"]["p50_ms"] - results["http"]["p50_ms"], 3)
    args.out.mkdir(parents=True, exist_ok=True)
    write_json(results, args.out / "queue_latency.json")
    print(f"{'path':<16}{'p50 ms':>10}{'p95 ms':>10}{'mean ms':>10}")
    for name in ("http", "queue", "queue_to_store"):
        row = results[name]
        print(f"{name:<16}{row['p50_ms']:>10.1f}{row['p95_ms']:>10.1f}{row['mean_ms']:>10.1f}")
    print(f"a queued job costs {results['queue_minus_http_p50_ms']:.1f} ms more than HTTP at the median "
          f"(load average at the end {load_avg()})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
