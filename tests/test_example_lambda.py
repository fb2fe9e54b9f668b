"""examples/lambda_function.py as a Lambda would run it, against stand-ins on loopback only.

EC2 and S3 are moto's server (a real local process: never a real account); the service is
a real server with a real pool; the callback receiver is a real HTTP server. The handler
runs in its own interpreter with client.py vendored next to it, as deployed.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time

import pytest
from aws_fixtures import AWS, MotoServer, moto  # noqa: F401 - moto: a fixture
from conftest import wait_until
from service_fixtures import REPO, free_port, start_server

boto3 = pytest.importorskip("boto3")
pytest.importorskip("moto")

pytestmark = pytest.mark.timeout(180)

SECRET = "lambda-callback-secret"
TOKEN = "lambda-api-token-123"


def stopped_instance(server: MotoServer) -> str:
    ec2 = server.client("ec2")
    image = ec2.describe_images(Owners=["amazon"])["Images"][0]["ImageId"]
    instance_id = ec2.run_instances(ImageId=image, MinCount=1, MaxCount=1,
                                    InstanceType="trn1.2xlarge")["Instances"][0]["InstanceId"]
    ec2.stop_instances(InstanceIds=[instance_id])
    return instance_id


def state(server: MotoServer, instance_id: str) -> str:
    reservations = server.client("ec2").describe_instances(InstanceIds=[instance_id])["Reservations"]
    return reservations[0]["Instances"][0]["State"]["Name"]


@pytest.fixture(scope="module")
def service(tmp_path_factory):
    srv = start_server(tmp_path_factory, "lambda", token=TOKEN,
                       args=["--callback-hosts", "127.0.0.1", "--callback-backoff", "0.2"],
                       env={"EXECUTOR_API_TOKEN": TOKEN, "EXECUTOR_CALLBACK_SECRET": SECRET})
    yield srv
    srv.close()


def run_handler(tmp_path, event: dict, env: dict[str, str], remaining_ms: int = 120_000) -> dict:
    """The handler in a fresh interpreter, deployed as in Lambda: the file and client.py."""
    package = tmp_path / "package"
    package.mkdir(exist_ok=True)
    shutil.copy(REPO / "examples" / "lambda_function.py", package)
    shutil.copy(REPO / "executor_service" / "client.py", package)  # vendored
    code = ("import json, sys, lambda_function\n"
            "class Context:\n"
            f"    def get_remaining_time_in_millis(self): return {remaining_ms}\n"
            "print('RESULT ' + json.dumps(lambda_function.handler(json.loads(sys.argv[1]), Context())))\n")
    base = {k: v for k, v in os.environ.items() if not k.startswith(("EXECUTOR_", "AWS_", "PYTHONPATH"))}
    proc = subprocess.run([sys.executable, "-c", code, json.dumps(event)], cwd=package,
                          env={**base, **AWS, **env}, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    [line] = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")]
    return json.loads(line.removeprefix("RESULT "))


def test_it_starts_the_stopped_instance_and_submits_fire_and_forget_with_a_callback(
        tmp_path, moto, service, receiver):  # noqa: F811
    instance_id = stopped_instance(moto)
    s3 = moto.client("s3")
    s3.create_bucket(Bucket="papers")
    s3.put_object(Bucket="papers", Key="p2/code.py", Body=b"print('from s3')\n")
    hook = receiver.route("/lambda-batch")
    event = {"papers": [
        {"paper_id": "lp1", "code": "print('inline')", "paper_title": "Inline", "slack_thread_ts": "9.1"},
        {"paper_id": "lp2", "s3_code_key": "p2/code.py", "paper_title": "From S3"}]}
    env = {"AWS_ENDPOINT_URL": moto.url, "TRAINIUM_ENDPOINT": service.url,
           "TRAINIUM_INSTANCE_ID": instance_id,
           "EXECUTOR_API_TOKEN": TOKEN, "EXECUTOR_CALLBACK_URL": hook, "CODE_BUCKET": "papers",
           "POLL_INTERVAL_S": "0.2"}
    started = time.monotonic()
    result = run_handler(tmp_path, event, env)
    assert time.monotonic() - started < 30  # it does not wait for the scripts
    assert result["status"] == "submitted" and result["instance"] == "started"
    assert state(moto, instance_id) == "running"
    [batch] = result["batches"]
    assert set(batch["job_ids"]) == {"lp1", "lp2"} and batch["poll"] == f"/batches/{batch['batch_id']}"

    wait_until(lambda: receiver.received("/lambda-batch"), timeout=60)
    [got] = receiver.received("/lambda-batch")
    assert got.signed_with(SECRET)
    results = got.json["results"]
    assert results["lp1"]["stdout"] == "inline\n" and results["lp1"]["slack_thread_ts"] == "9.1"
    assert results["lp2"]["stdout"] == "from s3\n" and results["lp2"]["s3_code_key"] == "p2/code.py"

    # The next scheduled run finds the instance running and the results by paper.
    again = run_handler(tmp_path, {"papers": [{"paper_id": "lp3", "code": "print(3)"}]}, env)
    assert again["instance"] == "running"
    paper = service.get("/papers/lp1").json
    assert paper["latest_finished"]["paper_title"] == "Inline"


def test_it_gives_up_for_this_run_when_the_service_is_not_ready_in_time(tmp_path, moto):  # noqa: F811
    instance_id = stopped_instance(moto)
    env = {"AWS_ENDPOINT_URL": moto.url, "TRAINIUM_ENDPOINT": f"http://127.0.0.1:{free_port()}",
           "TRAINIUM_INSTANCE_ID": instance_id, "POLL_INTERVAL_S": "0.2"}
    result = run_handler(tmp_path, {"papers": [{"paper_id": "x", "code": "print(1)"}]}, env,
                         remaining_ms=23_000)  # 3 s left after the reserve
    assert result == {"status": "starting", "instance": "started", "instance_id": instance_id}
    assert state(moto, instance_id) == "running"


def test_the_queue_path_enqueues_the_papers_starts_the_instance_and_the_service_runs_them(
        tmp_path, moto, receiver):  # noqa: F811
    """TRAINIUM_QUEUE_URL: the handler neither waits for the instance nor talks to the
    service; a service taking jobs from that queue runs the papers and reports back."""
    from conftest import reachable_by_jobs
    from service_fixtures import Server

    instance_id = stopped_instance(moto)
    url = moto.client("sqs").create_queue(QueueName="papers")["QueueUrl"]
    hook = receiver.route("/lambda-queue")
    env = {"AWS_ENDPOINT_URL": moto.url,
           "TRAINIUM_ENDPOINT": f"http://127.0.0.1:{free_port()}",  # nobody there
           "TRAINIUM_INSTANCE_ID": instance_id, "TRAINIUM_QUEUE_URL": url, "EXECUTOR_CALLBACK_URL": hook,
           "POLL_INTERVAL_S": "0.2"}
    event = {"papers": [{"paper_id": "qp1", "code": "print('queued 1')", "paper_title": "First"},
                        {"paper_id": "qp2", "code": "print('queued 2')", "slack_thread_ts": "7.7"}]}
    result = run_handler(tmp_path, event, env)
    assert result["status"] == "enqueued" and result["instance"] == "started"
    assert set(result["message_ids"]) == {"qp1", "qp2"}
    assert state(moto, instance_id) == "running"

    srv = Server(reachable_by_jobs(tmp_path / "work"),
                 args=["--sqs-queue-url", url, "--sqs-wait-time", "1", "--callback-hosts", "127.0.0.1"],
                 env={**AWS, "AWS_EC2_METADATA_DISABLED": "true", "AWS_ENDPOINT_URL_SQS": moto.url,
                      "EXECUTOR_CALLBACK_SECRET": SECRET}).start()
    try:
        wait_until(lambda: len(receiver.received("/lambda-queue")) == 2, timeout=60)
        by_paper = {r.json["paper_id"]: r for r in receiver.received("/lambda-queue")}
        assert all(r.signed_with(SECRET) for r in by_paper.values())
        first, second = by_paper["qp1"].json, by_paper["qp2"].json
        assert first["stdout"] == "queued 1\n" and first["paper_title"] == "First"
        assert second["stdout"] == "queued 2\n" and second["slack_thread_ts"] == "7.7"
        assert srv.get("/papers/qp2").json["latest_finished"]["success"] is True
    finally:
        srv.close()
