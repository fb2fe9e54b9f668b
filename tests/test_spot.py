"""Spot interruption: a real service watching a fake instance metadata service (IMDSv2,
on 127.0.0.1: never the real address) while it runs jobs from HTTP and from a real
SQS-compatible server (moto's). The notice's time makes the window a few seconds.
"""

from __future__ import annotations

import json
import time

import pytest
from aws_fixtures import FakeImds, moto, queue_counts  # noqa: F401 - moto: a fixture
from conftest import reachable_by_jobs, wait_until
from service_fixtures import Server, openapi  # noqa: F401

from executor_service.config import ServiceConfig
from executor_service.spot import Imds, read_notice

pytest.importorskip("boto3")
pytest.importorskip("moto")

pytestmark = pytest.mark.timeout(180)

LONG = "import time\ntime.sleep(60)\nprint('never')"


@pytest.fixture
def imds():
    fake = FakeImds()
    yield fake
    fake.close()


def status(srv: Server, job_id: str) -> str:
    return srv.get(f"/jobs/{job_id}").json["status"]


def job_of(srv: Server, paper_id: str) -> dict:
    resp = srv.get(f"/papers/{paper_id}")
    return resp.json["latest"] if resp.status == 200 else {}


def test_on_a_notice_it_drains_finishing_what_fits_and_returning_the_rest(
        tmp_path, moto, imds, openapi):  # noqa: F811
    sqs = moto.client("sqs")
    url = sqs.create_queue(QueueName="spot")["QueueUrl"]
    srv = Server(reachable_by_jobs(tmp_path / "work"), env=moto.env(), args=[
        "--pool-size", "3", "--sqs-queue-url", url, "--sqs-wait-time", "1", "--sqs-visibility-timeout", "30",
        "--spot-watch", "on", "--imds-endpoint", imds.url, "--spot-poll-interval", "0.2",
        "--spot-margin", "1"]).start()
    try:
        running_http = srv.post("/jobs", {"paper_id": "h-long", "code": LONG}).json["job_id"]
        wait_until(lambda: status(srv, running_http) == "running", timeout=30)
        short = "import time\ntime.sleep(1.5)\nprint('made it')"
        sqs.send_message(QueueUrl=url, MessageBody=json.dumps({"paper_id": "s-short", "code": short}))
        sqs.send_message(QueueUrl=url, MessageBody=json.dumps({"paper_id": "s-long", "code": LONG}))
        wait_until(lambda: all(job_of(srv, p).get("status") == "running" for p in ("s-short", "s-long")),
                   timeout=30)
        queued_http = srv.post("/jobs", {"paper_id": "h-queued", "code": "print('late')"}).json["job_id"]
        assert status(srv, queued_http) == "queued"  # all 3 slots busy

        imds.terminate_in(5)  # the deadline: 5 s less the 1 s margin
        noticed = time.monotonic()
        wait_until(lambda: srv.get("/health").status == 503, timeout=5)
        refused = srv.post("/jobs", {"paper_id": "h-new", "code": "print(1)"})
        assert refused.status == 503 and refused.headers["retry-after"].isdigit()
        assert "Spot" in refused.json["error"]
        health = srv.get("/health")
        openapi.validate("GET", "/health", health)
        assert health.json["interruption"]["kind"] == "instance-action"
        assert health.json["interruption"]["action"] == "terminate"
        assert health.json["queue"]["polling"] is False
        wait_until(lambda: status(srv, queued_http) == "interrupted", timeout=5)  # never started
        sqs.send_message(QueueUrl=url, MessageBody=json.dumps({"paper_id": "s-after", "code": "print(1)"}))

        # Inside the window: the short job ends with its result, its message is deleted.
        wait_until(lambda: job_of(srv, "s-short").get("status") == "completed", timeout=10)
        assert srv.get("/papers/s-short").json["latest_finished"]["stdout"] == "made it\n"
        # At the deadline the long ones are stopped and recorded interrupted, and said so.
        wait_until(lambda: status(srv, running_http) == "interrupted", timeout=15)
        assert 3 < time.monotonic() - noticed < 9
        for doc in (srv.get(f"/jobs/{running_http}").json, job_of(srv, "s-long"),
                    srv.get(f"/jobs/{queued_http}").json):
            doc = srv.get(f"/jobs/{doc['job_id']}").json
            assert doc["status"] == "interrupted" and doc["error_type"] == "interrupted"
            assert "Spot instance-action notice" in doc["error_message"]
            assert "submit it again" in doc["error_message"]
        # The long SQS job's message is visible again, at once; the one sent after the
        # notice was never taken; the short one's was deleted.
        wait_until(lambda: queue_counts(sqs, url) == (2, 0), timeout=10)
        got = sqs.receive_message(QueueUrl=url, MaxNumberOfMessages=10, WaitTimeSeconds=1)["Messages"]
        assert sorted(json.loads(m["Body"])["paper_id"] for m in got) == ["s-after", "s-long"]
        assert srv.get("/health").json["interruption"]["jobs_interrupted"] == 3
        assert all(ok for method, _, ok in imds.requests)  # every GET carried the IMDSv2 token
        assert ("PUT", "/latest/api/token", True) in imds.requests
    finally:
        srv.close()


def test_a_rebalance_recommendation_gives_its_window_from_its_notice_time(imds):
    """The watcher's reading of the fake metadata service, over real HTTP with a token."""
    config = ServiceConfig(imds_endpoint=imds.url, spot_rebalance_window=120.0, spot_margin=15.0)
    reader = Imds(imds.url)
    assert read_notice(reader, config, time.time()) is None
    imds.rebalance = {"noticeTime": "2026-12-03T12:00:00Z"}
    notice = read_notice(reader, config, time.time())
    assert notice.kind == "rebalance" and notice.to_public()["deadline"].startswith("2026-12-03T12:01:45")
    ignoring = ServiceConfig(imds_endpoint=imds.url, spot_rebalance_window=0)
    assert read_notice(reader, ignoring, time.time()) is None
    imds.terminate_in(30)
    assert read_notice(reader, config, time.time()).kind == "instance-action"  # the stop's notice wins
    assert [r for r in imds.requests if r[0] == "PUT"] == [("PUT", "/latest/api/token", True)]  # one token
