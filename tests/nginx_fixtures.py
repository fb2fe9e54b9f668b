"""A real nginx running deployment/nginx/nginx.conf in front of a test server, on loopback.

The shipped file is used as it is, except what only an installed instance has: its
ports (nginx on a free loopback port instead of 0.0.0.0:8000, the service's port
instead of 8001) and its paths (pid, logs and temp files under the test's directory,
workers as the current user). Each substitution must match exactly once, so a change
to the shipped file that the test would silently miss fails instead.
"""

from __future__ import annotations

import os
import resource
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

from service_fixtures import REPO, free_port

NGINX_CONF = REPO / "deployment" / "nginx" / "nginx.conf"


def nginx_binary() -> str | None:
    return shutil.which("nginx") or next((p for p in ("/usr/sbin/nginx",) if os.access(p, os.X_OK)), None)


def render(conf: str, prefix: Path, port: int, upstream_port: int) -> str:
    """The shipped config with this test's ports and paths."""
    user = "root" if os.geteuid() == 0 else None
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    nofile = 65536 if hard == resource.RLIM_INFINITY else min(65536, hard)
    temp = "".join(f"    {kind}_temp_path {prefix}/{kind};\n"
                   for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"))
    swaps = [
        ("user www-data;\n", f"user {user};\n" if user else ""),
        ("pid /run/nginx.pid;", f"pid {prefix}/nginx.pid;"),
        ("worker_rlimit_nofile 65536;", f"worker_rlimit_nofile {nofile};"),
        ("error_log /var/log/nginx/error.log warn;", f"error_log {prefix}/error.log warn;"),
        ("access_log /var/log/nginx/trainium-executor.access.log;", f"access_log {prefix}/access.log;"),
        ("listen 8000 default_server;", f"listen 127.0.0.1:{port} default_server;"),
        ("server 127.0.0.1:8001;", f"server 127.0.0.1:{upstream_port};"),
        ("http {\n", "http {\n" + temp),
    ]
    for old, new in swaps:
        assert conf.count(old) == 1, f"{NGINX_CONF} no longer has exactly one {old!r}"
        conf = conf.replace(old, new)
    return conf


class Nginx:
    """nginx in the foreground (`daemon off`), its own prefix directory; stopped by close()."""

    def __init__(self, prefix: Path, upstream_port: int):
        self.prefix = prefix
        self.port = free_port()
        prefix.mkdir(parents=True, exist_ok=True)
        self.conf = prefix / "nginx.conf"
        self.conf.write_text(render(NGINX_CONF.read_text(), prefix, self.port, upstream_port))
        self.proc: subprocess.Popen | None = None

    def start(self, timeout: float = 15) -> Nginx:
        binary = nginx_binary()
        self.proc = subprocess.Popen([binary, "-p", str(self.prefix), "-c", str(self.conf),
                                      "-e", str(self.prefix / "error.log"), "-g", "daemon off;"],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"nginx exited {self.proc.returncode}: {self.log()}")
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                return self
            except OSError:
                time.sleep(0.05)
        raise RuntimeError(f"nginx not listening after {timeout}s: {self.log()}")

    def log(self) -> str:
        try:
            return (self.prefix / "error.log").read_text(errors="replace")[-3000:]
        except OSError:
            return ""

    def close(self) -> None:
        """SIGQUIT (graceful), then SIGKILL; the master takes its workers with it."""
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGQUIT)
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
