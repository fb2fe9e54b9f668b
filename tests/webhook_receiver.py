"""A real HTTP receiver of callbacks on 127.0.0.1, for the webhook tests.

Each path keeps the requests it received and answers from a script of statuses (the
last one repeats; default 200), optionally after a delay.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


@dataclass
class Received:
    path: str
    headers: dict[str, str]
    body: bytes
    at: float

    @property
    def json(self):
        return json.loads(self.body)

    def signed_with(self, secret: str) -> bool:
        """True when X-Signature is the HMAC-SHA256 of the body under `secret`."""
        want = "sha256=" + hmac.new(secret.encode(), self.body, hashlib.sha256).hexdigest()
        return hmac.compare_digest(self.headers.get("x-signature", ""), want)


@dataclass
class Route:
    statuses: list[int] = field(default_factory=lambda: [200])
    delay: float = 0.0
    received: list[Received] = field(default_factory=list)


class Receiver:
    """Starts on a free port; `route(path, statuses, delay)` scripts a path's answers."""

    def __init__(self) -> None:
        self.routes: dict[str, Route] = {}
        self.lock = threading.Lock()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):  # noqa: N802 - http.server's name
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                with receiver.lock:
                    route = receiver.routes.setdefault(self.path, Route())
                    route.received.append(Received(self.path, {k.lower(): v for k, v in self.headers.items()},
                                                   body, time.monotonic()))
                    status = route.statuses[0] if len(route.statuses) == 1 else route.statuses.pop(0)
                    delay = route.delay
                time.sleep(delay)
                self.send_response(status)
                self.send_header("Content-Length", "2")
                self.end_headers()
                self.wfile.write(b"ok")

            def log_message(self, *args):
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.port = self.httpd.server_address[1]
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def route(self, path: str, statuses: list[int] | None = None, delay: float = 0.0) -> str:
        with self.lock:
            self.routes[path] = Route(statuses=list(statuses or [200]), delay=delay)
        return f"http://127.0.0.1:{self.port}{path}"

    def received(self, path: str) -> list[Received]:
        with self.lock:
            return list(self.routes.get(path, Route()).received)

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
