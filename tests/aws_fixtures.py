"""AWS stand-ins on loopback for the tests: moto's standalone server (a real process
speaking the AWS wire protocols: SQS, EC2, S3), reached as a real deployment would reach
AWS, through the standard endpoint settings (`AWS_ENDPOINT_URL_SQS`...), never through a
patched client; and a fake instance metadata service (IMDSv2) with a Spot notice to set.

No test ever contacts a real AWS account or the real metadata address.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
import urllib.request
from datetime import datetime, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from conftest import wait_until
from service_fixtures import free_port

# Credentials and region for the stand-ins; AWS_EC2_METADATA_DISABLED keeps boto3 from
# ever looking for credentials at the real metadata address.
AWS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1",
       "AWS_EC2_METADATA_DISABLED": "true"}


class MotoServer:
    """`python -m moto.server` on 127.0.0.1, as a child process."""

    def __init__(self, log_path):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self._log = open(log_path, "wb")  # noqa: SIM115 - closed in close()
        cmd = [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(self.port)]
        self.proc = subprocess.Popen(cmd, stdout=self._log, stderr=self._log, env={**os.environ, **AWS})

        def up():
            try:
                return urllib.request.urlopen(self.url + "/moto-api/", timeout=1).status == 200
            except OSError:
                return False

        try:
            wait_until(up, timeout=30, interval=0.2)
        except BaseException:
            self.close()
            raise

    def client(self, service: str):
        import boto3

        return boto3.client(service, endpoint_url=self.url, region_name=AWS["AWS_DEFAULT_REGION"],
                            aws_access_key_id=AWS["AWS_ACCESS_KEY_ID"],
                            aws_secret_access_key=AWS["AWS_SECRET_ACCESS_KEY"])

    def env(self) -> dict[str, str]:
        """What a process needs to reach SQS here the standard way."""
        return {**AWS, "AWS_ENDPOINT_URL_SQS": self.url}

    def close(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)
        self._log.close()


@pytest.fixture(scope="module")
def moto(tmp_path_factory):
    """One moto server for a test module: `from aws_fixtures import moto  # noqa: F401`."""
    stand_in = MotoServer(tmp_path_factory.mktemp("moto") / "moto.log")
    yield stand_in
    stand_in.close()


def queue_counts(sqs, url: str) -> tuple[int, int]:
    """(visible, not visible) messages of a queue, as SQS counts them."""
    attrs = sqs.get_queue_attributes(QueueUrl=url, AttributeNames=[
        "ApproximateNumberOfMessages", "ApproximateNumberOfMessagesNotVisible"])["Attributes"]
    return int(attrs["ApproximateNumberOfMessages"]), int(attrs["ApproximateNumberOfMessagesNotVisible"])


def iso(at: float) -> str:
    return datetime.fromtimestamp(at, timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


class FakeImds:
    """The instance metadata service's IMDSv2 contract on 127.0.0.1: a token from PUT
    /latest/api/token, required on every GET (401 without it); the Spot instance-action
    and the rebalance recommendation 404 until set."""

    def __init__(self) -> None:
        self.instance_action: dict | None = None
        self.rebalance: dict | None = None
        self.token = "fake-imds-token"
        self.requests: list[tuple[str, str, bool]] = []  # (method, path, had a valid token)
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def do_PUT(self):  # noqa: N802 - http.server's name
                fake.requests.append(("PUT", self.path, True))
                ttl = self.headers.get("X-aws-ec2-metadata-token-ttl-seconds")
                if self.path != "/latest/api/token" or not ttl:
                    return self._send(400, b"")
                self._send(200, fake.token.encode())

            def do_GET(self):  # noqa: N802
                ok = self.headers.get("X-aws-ec2-metadata-token") == fake.token
                fake.requests.append(("GET", self.path, ok))
                if not ok:
                    return self._send(401, b"")
                doc = {"/latest/meta-data/spot/instance-action": fake.instance_action,
                       "/latest/meta-data/events/recommendations/rebalance": fake.rebalance}.get(self.path)
                if doc is None:
                    return self._send(404, b"")
                self._send(200, json.dumps(doc).encode())

            def _send(self, status: int, body: bytes) -> None:
                self.send_response(status)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def terminate_in(self, seconds: float) -> None:
        """A Spot notice: the instance is terminated `seconds` from now."""
        self.instance_action = {"action": "terminate", "time": iso(time.time() + seconds)}

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
