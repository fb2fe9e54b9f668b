"""The service's own front door (waitress as `make run` starts it) under abuse, on loopback.

Floods are bounded (at most 1,200 sockets, held for a few seconds, closed at the end);
the flood comes from 127.0.0.2, the measured client from 127.0.0.1.
"""

from __future__ import annotations

import http.client
import json
import socket
import subprocess
import sys
import time

import pytest
from flood import Flood, parse_response, raw_exchange, timed_request
from service_fixtures import REPO, openapi, start_server  # noqa: F401

pytestmark = pytest.mark.timeout(180)

TOKEN = "front-door-token-0123456789"
IDLE, SLOWLORIS = 1000, 200
SIXTY_MIB = 60 << 20


@pytest.fixture(scope="module")
def service(tmp_path_factory):
    """A server as deployed: a token and the default limits."""
    srv = start_server(tmp_path_factory, "front", env={"EXECUTOR_API_TOKEN": TOKEN}, token=TOKEN)
    yield srv
    srv.close()


# --- floods ---------------------------------------------------------------------------

def test_idle_connections_and_a_slowloris_do_not_lock_out_a_new_client(service):
    with Flood("127.0.0.1", service.port, idle=IDLE, slowloris=SLOWLORIS) as flood:
        assert flood.open_connections() == IDLE + SLOWLORIS, f"{flood.refused} refused"
        worst = 0.0
        for _ in range(3):  # the first probe right after the burst of connections, then while held
            health = timed_request(service.port, "GET", "/health")
            run = timed_request(service.port, "POST", "/execute", {"code": "print('through')"}, token=TOKEN)
            assert health.status == 200 and health.body["status"] == "healthy"
            assert run.status == 200 and run.body["stdout"] == "through\n"
            worst = max(worst, health.seconds, run.seconds)
            assert health.seconds < 1 and run.seconds < 1, (health.seconds, run.seconds)
            time.sleep(1)
        held = flood.open_connections()
    print(f"\nwaitress direct: {held} connections held ({IDLE} idle + {SLOWLORIS} slowloris); "
          f"new client's worst latency {worst * 1000:.0f} ms")
    assert held == IDLE + SLOWLORIS  # the flood was really held open all along


def test_idle_connections_are_closed_after_the_channel_timeout(tmp_path_factory):
    srv = start_server(tmp_path_factory, "idle", args=["--channel-timeout", "2"])
    try:
        with Flood("127.0.0.1", srv.port, idle=20) as flood:
            time.sleep(4)  # 2 s timeout, checked every second
            for sock in flood.idle:
                sock.settimeout(2)
                assert sock.recv(1) == b"", "the server kept an idle connection"
    finally:
        srv.close()


def test_connection_limit_is_lowered_to_fit_the_open_files_limit(tmp_path):
    code = """
import logging, resource
resource.setrlimit(resource.RLIMIT_NOFILE, (1024, 2048))
logging.basicConfig()
from executor_service.config import ServiceConfig
from executor_service.http_server import create
server = create(lambda environ, start_response: [], ServiceConfig(port=0))
print(server.adj.connection_limit, resource.getrlimit(resource.RLIMIT_NOFILE)[0])
"""
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    # soft raised to the hard limit; two descriptors per connection and 1,024 kept spare
    assert proc.stdout.split() == ["512", "2048"]
    assert "connection limit lowered" in proc.stderr


# --- the WSGI server's own errors ----------------------------------------------------------

LONG = b"A" * 5000
SERVER_ERRORS = {
    "invalid header line": (b"GET /health HTTP/1.1\r\nHost: x\r\nno colon " + LONG + b"\r\n\r\n", 400),
    "bare CR echoed": (b"GET /health HTTP/1.1\r\nHost: x\r\nX-A: " + LONG + b"\rB\r\n\r\n", 400),
    "lowercase method echoed": (b"get" + LONG + b" /health HTTP/1.1\r\nHost: x\r\n\r\n", 400),
    "header fields too large": (b"GET /health HTTP/1.1\r\nHost: x\r\nX-A: " + b"A" * 300_000 + b"\r\n\r\n",
                                431),
    "unsupported transfer-encoding": (b"POST /execute HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: gzip\r\n\r\n",
                                      501),
    "body above the limit, refused from its Content-Length":
        (f"POST /execute HTTP/1.1\r\nHost: x\r\nContent-Length: {SIXTY_MIB}\r\n\r\n".encode(), 413),
}


@pytest.mark.parametrize("name", SERVER_ERRORS)
def test_errors_of_the_wsgi_server_are_our_json(service, name):
    request, status = SERVER_ERRORS[name]
    got, headers, body = parse_response(raw_exchange(service.port, request))
    assert got == status
    assert headers["content-type"] == "application/json"
    assert headers["x-content-type-options"] == "nosniff"
    error = json.loads(body)
    assert list(error) == ["error"] and len(error["error"]) < 140, error
    assert "AAAAAAAAAA" * 7 not in error["error"]  # echoed input cut to a short prefix
    if status == 413:
        assert error["error"] == "request body too large (limit 10485760 bytes)"


def test_a_body_above_the_limit_sent_in_full_gets_the_json_413(service, openapi):  # noqa: F811
    conn = http.client.HTTPConnection("127.0.0.1", service.port, timeout=30)
    start = time.monotonic()
    try:
        conn.request("POST", "/execute", body=b"x" * SIXTY_MIB,
                     headers={"Content-Type": "application/json", "Authorization": f"Bearer {TOKEN}"})
        resp = conn.getresponse()
        body = resp.read()
    finally:
        conn.close()
    assert resp.status == 413 and json.loads(body)["error"].startswith("request body too large")
    assert time.monotonic() - start < 10
    assert service.get("/health").status == 200


def test_a_body_above_the_limit_is_refused_before_100_continue(service):
    head = (f"POST /execute HTTP/1.1\r\nHost: x\r\nContent-Length: {SIXTY_MIB}\r\n"
            "Expect: 100-continue\r\n\r\n").encode()
    with socket.create_connection(("127.0.0.1", service.port), timeout=10) as sock:
        sock.sendall(head)
        first = sock.recv(65536)
    assert first.startswith(b"HTTP/1.1 413 "), first[:80]  # no "100 Continue" invitation first
