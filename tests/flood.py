"""Bounded connection floods for the front-door tests, on loopback only.

`Flood` opens `idle` TCP connections that never send a byte and `slowloris`
connections that send a request line and then one more header line every
`drip_every` seconds, never finishing the header; both from the loopback address
`source` (127.0.0.2 by default, so a per-address limit can tell the flood from the
client being measured, which comes from 127.0.0.1). Everything is closed on exit; the
drip thread stops by itself after `max_hold` seconds in any case.

`timed_request` measures what a new client sees meanwhile; `raw_exchange` and
`parse_response` send bytes no HTTP library would.
"""

from __future__ import annotations

import http.client
import json
import resource
import socket
import threading
import time
from dataclasses import dataclass

LOOPBACK = "127.0.0.1"


def ensure_open_files(wanted: int) -> None:
    """Raise this process's soft RLIMIT_NOFILE to `wanted` (never above the hard limit)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
    if soft != resource.RLIM_INFINITY and soft < target:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))


class Flood:
    """Idle connections plus a slowloris against host:port; a context manager."""

    def __init__(self, host: str, port: int, *, idle: int = 0, slowloris: int = 0,
                 source: str = "127.0.0.2", drip_every: float = 1.0, max_hold: float = 60.0):
        assert host.startswith("127."), "floods go to loopback only"
        self.host, self.port, self.source = host, port, source
        self.n_idle, self.n_slow = idle, slowloris
        self.drip_every, self.max_hold = drip_every, max_hold
        self.idle: list[socket.socket] = []
        self.slow: list[socket.socket] = []
        self.refused = 0  # connections that could not be opened in time
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _connect(self) -> socket.socket | None:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.settimeout(5)
        try:
            sock.bind((self.source, 0))
            sock.connect((self.host, self.port))
        except OSError:
            sock.close()
            self.refused += 1
            return None
        return sock

    def __enter__(self) -> Flood:
        ensure_open_files(self.n_idle + self.n_slow + 256)
        for _ in range(self.n_idle):
            if (sock := self._connect()) is not None:
                self.idle.append(sock)
        for i in range(self.n_slow):
            if (sock := self._connect()) is not None:
                try:
                    sock.sendall(f"POST /execute HTTP/1.1\r\nHost: {self.host}\r\nX-Slow-{i}: 0\r\n".encode())
                    self.slow.append(sock)
                except OSError:
                    sock.close()
                    self.refused += 1
        self._thread = threading.Thread(target=self._drip, name="slowloris", daemon=True)
        self._thread.start()
        return self

    def _drip(self) -> None:
        deadline = time.monotonic() + self.max_hold
        n = 0
        while not self._stop.wait(self.drip_every) and time.monotonic() < deadline:
            n += 1
            for sock in list(self.slow):
                try:
                    sock.send(f"X-Drip-{n}: {n}\r\n".encode())
                except OSError:
                    self.slow.remove(sock)  # the server dropped it

    def open_connections(self) -> int:
        """How many of the flood's connections are still open on our side."""
        return len(self.idle) + len(self.slow)

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread:
            self._thread.join(5)
        for sock in self.idle + self.slow:
            sock.close()


@dataclass
class Timed:
    status: int
    seconds: float
    body: dict


def timed_request(port: int, method: str, path: str, body: dict | None = None,
                  token: str | None = None, timeout: float = 10.0, host: str = LOOPBACK) -> Timed:
    """One request on a new connection; its status, JSON body and wall time (connect included)."""
    headers = {"Content-Type": "application/json"} if body is not None else {}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    start = time.perf_counter()
    conn = http.client.HTTPConnection(host, port, timeout=timeout)
    try:
        conn.request(method, path, body=json.dumps(body).encode() if body is not None else None,
                     headers=headers)
        resp = conn.getresponse()
        raw = resp.read()
    finally:
        conn.close()
    return Timed(resp.status, time.perf_counter() - start, json.loads(raw))


def raw_exchange(port: int, data: bytes, timeout: float = 10.0) -> bytes:
    """Send `data` on a new connection, then read until the server closes it."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.sendall(data)
        out = b""
        while chunk := sock.recv(65536):
            out += chunk
    return out


def parse_response(raw: bytes) -> tuple[int, dict[str, str], bytes]:
    """(status, headers with lower-case names, body) of one raw HTTP response."""
    head, _, body = raw.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = dict(line.split(": ", 1) for line in lines[1:])
    return int(lines[0].split()[1]), {k.lower(): v for k, v in headers.items()}, body
