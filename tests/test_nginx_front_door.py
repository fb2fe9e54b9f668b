"""The shipped deployment's front door: a real nginx running deployment/nginx/nginx.conf
in front of a real server, both on loopback (see nginx_fixtures for what is substituted).

Floods are bounded (at most 1,200 sockets, held for seconds, closed at the end) and come
from 127.0.0.2 and 127.0.0.3; the measured client is 127.0.0.1.
"""

from __future__ import annotations

import http.client
import json
import socket
import time

import pytest
from flood import Flood, parse_response, raw_exchange, timed_request
from nginx_fixtures import Nginx, nginx_binary
from service_fixtures import free_port, openapi, start_server  # noqa: F401

pytestmark = [pytest.mark.timeout(180),
              pytest.mark.skipif(nginx_binary() is None, reason="nginx not installed (make system-deps)")]

TOKEN = "nginx-front-door-token-0123"
IDLE, SLOWLORIS = 1000, 200
HEADER_TIMEOUT_S = 10  # client_header_timeout in the shipped config
PER_ADDRESS = 16  # limit_conn per_address in the shipped config
SIXTY_MIB = 60 << 20


@pytest.fixture(scope="module")
def front(tmp_path_factory):
    """nginx on a loopback port in front of a server with a token."""
    srv = start_server(tmp_path_factory, "behind-nginx", env={"EXECUTOR_API_TOKEN": TOKEN}, token=TOKEN)
    proxy = Nginx(tmp_path_factory.mktemp("nginx"), srv.port)
    try:
        proxy.start()
        yield proxy
    finally:
        proxy.close()
        srv.close()


def request(port: int, method: str, path: str, body=None, token: str | None = TOKEN,
            headers: dict[str, str] | None = None) -> tuple[int, dict[str, str], bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    hdrs = dict(headers or {})
    if token:
        hdrs["Authorization"] = f"Bearer {token}"
    try:
        conn.request(method, path, body=json.dumps(body).encode() if body is not None else None,
                     headers=hdrs)
        resp = conn.getresponse()
        return resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read()
    finally:
        conn.close()


# --- the API goes through ---------------------------------------------------------------

def test_the_api_works_through_nginx(front, openapi):  # noqa: F811
    status, headers, body = request(front.port, "GET", "/health", token=None)
    assert status == 200 and set(json.loads(body)["pool"]) == {"size", "idle", "busy", "state"}
    assert headers["x-content-type-options"] == "nosniff"  # once, not once per hop
    status, headers, body = request(front.port, "GET", "/status", token=None)
    assert status == 401 and headers["www-authenticate"].startswith("Bearer")
    status, _, body = request(front.port, "GET", "/health?verbose=1")
    assert status == 200 and json.loads(body)["pool"]["workers"]
    status, _, body = request(front.port, "POST", "/execute", {"code": "print('via nginx')"},
                              headers={"Content-Type": "application/json"})
    assert status == 200 and json.loads(body)["stdout"] == "via nginx\n"
    status, _, body = request(front.port, "GET", "/jobs/" + "x" * 5000)
    assert status == 404 and len(body) < 300  # the service's own 404, passed through


# --- floods -----------------------------------------------------------------------------

def test_idle_connections_and_a_slowloris_do_not_lock_out_a_new_client(front):
    with Flood("127.0.0.1", front.port, idle=IDLE, slowloris=SLOWLORIS) as flood:
        assert flood.open_connections() == IDLE + SLOWLORIS, f"{flood.refused} refused"
        worst = 0.0
        for _ in range(3):
            health = timed_request(front.port, "GET", "/health")
            run = timed_request(front.port, "POST", "/execute", {"code": "print('through')"}, token=TOKEN)
            assert health.status == 200 and run.status == 200 and run.body["stdout"] == "through\n"
            worst = max(worst, health.seconds, run.seconds)
            assert health.seconds < 1 and run.seconds < 1, (health.seconds, run.seconds)
            time.sleep(1)
        held = flood.open_connections()
    print(f"\nnginx in front: {held} connections held ({IDLE} idle + {SLOWLORIS} slowloris); "
          f"new client's worst latency {worst * 1000:.0f} ms")
    assert held == IDLE + SLOWLORIS


def test_nginx_drops_idle_and_half_sent_connections_after_the_header_timeout(front):
    with Flood("127.0.0.1", front.port, idle=50, slowloris=50, drip_every=1.0) as flood:
        deadline = time.monotonic() + HEADER_TIMEOUT_S + 5
        open_socks = flood.idle + flood.slow
        while open_socks and time.monotonic() < deadline:
            time.sleep(0.5)
            open_socks = [s for s in open_socks if not _closed_by_peer(s)]
        assert not open_socks, f"{len(open_socks)} connections still open after {HEADER_TIMEOUT_S + 5}s"


def _closed_by_peer(sock: socket.socket) -> bool:
    sock.setblocking(False)
    try:
        return sock.recv(4096) == b""
    except BlockingIOError:
        return False
    except OSError:  # reset: reset_timedout_connection
        return True


def test_one_address_cannot_hold_more_than_its_share_of_requests(front):
    # Requests whose header is in and whose body is still coming count against the
    # per-address limit; the service never sees them.
    held = []
    try:
        for _ in range(PER_ADDRESS):
            sock = socket.socket()
            sock.bind(("127.0.0.3", 0))
            sock.connect(("127.0.0.1", front.port))
            sock.sendall(b"POST /jobs HTTP/1.1\r\nHost: x\r\nContent-Length: 1000\r\n\r\n{")
            held.append(sock)
        time.sleep(0.5)
        extra = socket.socket()
        extra.bind(("127.0.0.3", 0))
        extra.connect(("127.0.0.1", front.port))
        held.append(extra)
        extra.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        status, headers, body = parse_response(_read_all(extra))
        assert status == 503 and headers["retry-after"] == "5"
        assert "from this address" in json.loads(body)["error"]
        assert timed_request(front.port, "GET", "/health").status == 200  # other addresses unaffected
    finally:
        for sock in held:
            sock.close()


def _read_all(sock: socket.socket) -> bytes:
    sock.settimeout(10)
    out = b""
    while chunk := sock.recv(65536):
        out += chunk
    return out


# --- nginx's own errors -------------------------------------------------------------------

NGINX_ERRORS = {
    "request line that does not parse": (b"GARBAGE\r\n\r\n", 400),
    "header line above 16 KiB":
        (b"GET /health HTTP/1.1\r\nHost: x\r\nX-A: " + b"A" * 40_000 + b"\r\n\r\n", 400),
    "body above the limit, refused from its Content-Length":
        (f"POST /execute HTTP/1.1\r\nHost: x\r\nContent-Length: {SIXTY_MIB}\r\n\r\n".encode(), 413),
    "unsupported transfer-encoding": (b"POST /execute HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: gzip\r\n\r\n",
                                      501),
    "the error page itself":
        (b"GET /_front_door_error HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n", 404),
}


@pytest.mark.parametrize("name", NGINX_ERRORS)
def test_errors_of_nginx_are_our_json(front, name):
    data, status = NGINX_ERRORS[name]
    got, headers, body = parse_response(_read_until_json(front.port, data))
    assert got == status
    assert headers["content-type"] == "application/json"
    assert headers["x-content-type-options"] == "nosniff"
    error = json.loads(body)
    assert list(error) == ["error"] and "AAAA" not in error["error"]


def _read_until_json(port: int, data: bytes) -> bytes:
    """The response to `data`: read until its JSON body is complete (nginx may then
    keep the connection open or reset it after its lingering close)."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(data)
        out = b""
        while not (b"\r\n\r\n" in out and out.endswith(b"}\n")):
            try:
                chunk = sock.recv(65536)
            except ConnectionResetError:
                break
            if not chunk:
                break
            out += chunk
    return out


def test_a_body_above_the_limit_sent_in_full_gets_the_json_413(front):
    status, _, body = _post_raw(front.port, b"x" * SIXTY_MIB)
    assert status == 413 and json.loads(body)["error"] == "request body too large (limit 10485760 bytes)"


def _post_raw(port: int, data: bytes) -> tuple[int, dict[str, str], bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        conn.request("POST", "/execute", body=data, headers={"Authorization": f"Bearer {TOKEN}"})
        resp = conn.getresponse()
        return resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read()
    finally:
        conn.close()


def test_a_service_that_is_down_is_a_json_502_with_retry_after(tmp_path):
    proxy = Nginx(tmp_path / "nginx", upstream_port=free_port()).start()  # nothing listens there
    try:
        got, headers, body = parse_response(raw_exchange(
            proxy.port, b"GET /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"))
        assert got == 502 and headers["retry-after"] == "5"
        assert headers["content-type"] == "application/json" and "retry later" in json.loads(body)["error"]
    finally:
        proxy.close()
