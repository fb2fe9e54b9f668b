"""waitress, set up as the service's own front door: its limits, its errors as our JSON.

waitress parses requests on one event-loop thread and hands only complete requests to
its worker threads, so an idle or half-sent connection costs a socket and a few KiB,
never a thread. What waitress does by default that this module changes, and why
(docs/front-door.md has the measurements):

- `connection_limit` (waitress: 100). At the limit waitress stops calling accept(), so
  every new client waits in the listen backlog until a connection closes: about 100
  idle sockets locked everyone out. Ours is high (setting `connection_limit`).
- `asyncore_use_poll`. select() cannot watch a descriptor above 1023 (FD_SETSIZE), so
  waitress's default loop fails beyond roughly a thousand connections; poll() has no
  such bound.
- Accepting. waitress accepts one connection per pass of its loop, and every pass visits
  every open connection, so a burst of n connections took O(n^2) work (about a second
  for 1,200) while new clients waited; `Server` takes up to ACCEPT_BATCH per pass.
- RLIMIT_NOFILE. The soft limit is raised towards the hard one so that the connection
  limit can be reached; where the hard limit is lower, the connection limit is lowered
  to fit, with a warning, rather than accept() failing with EMFILE.
- `channel_timeout` (waitress: 120 s), checked every `cleanup_interval`: a connection
  that has sent nothing for this long is closed (setting `channel_timeout`); one whose
  request is being served is never cut, however long its job runs.
- `channel_request_lookahead` (waitress: 0). A connection is read while its request is
  served, so a client that hung up is seen (`waitress.client_disconnected`) and a
  synchronous request stops waiting for jobs that run on anyway.
- Its own errors (400, 413, 431, 501 and a 500 raised outside Flask) are text/plain and
  echo the offending header line; `JsonErrorTask` answers them as the API's JSON
  `{"error": ...}` with the echo cut short and `X-Content-Type-Options: nosniff`.
- A body above `max_body_bytes` is refused from its Content-Length, before it is read.
  waitress would then close with the body still arriving, which the client sees as a
  connection reset instead of the 413 (the same for a header over its limit, 431);
  after any of its own error answers `Channel` half-closes and discards what still
  arrives for up to `lingering_time` (nginx's lingering close).
"""

from __future__ import annotations

import json
import logging
import resource
import socket
import time

from waitress.adjustments import Adjustments
from waitress.channel import HTTPChannel
from waitress.server import MultiSocketServer, TcpWSGIServer
from waitress.task import ErrorTask, ThreadedTaskDispatcher

from executor_service.app import server_error_message
from executor_service.config import ServiceConfig

log = logging.getLogger("executor_service.http_server")

# Descriptors the process needs besides client connections: the pool's pipes, the job
# store, logs, the trigger pipe, the listening socket.
FD_RESERVE = 1024
# Descriptors per connection, at most: its socket, and the temporary file waitress
# spools a body into once it passes 512 KiB (inbuf_overflow).
FDS_PER_CONNECTION = 2
# Connections accepted in one pass of the event loop, at most (nginx: multi_accept).
ACCEPT_BATCH = 256
# Bytes read per pass while discarding a refused request: few passes for a large body.
DISCARD_CHUNK = 1 << 18


class JsonErrorTask(ErrorTask):
    """waitress's own error response, as the API's JSON error object."""

    def execute(self) -> None:
        error = self.request.error
        adj = self.channel.server.adj
        message = server_error_message(error.code, str(error.body), adj.max_request_body_size - 1,
                                       adj.max_request_header_size)
        body = json.dumps({"error": message}).encode("utf-8")
        self.status = f"{error.code} {error.reason}"
        self.response_headers.extend([("Content-Type", "application/json"),
                                      ("X-Content-Type-Options", "nosniff")])
        self.set_close_on_finish()
        self.content_length = len(body)
        # The client may still be sending what was refused (a body, an endless header).
        self.channel.linger_after_close = True
        self.write(body)


class Channel(HTTPChannel):
    """One client connection: JSON errors, and a refused body discarded, not reset."""

    error_task_class = JsonErrorTask
    linger_after_close = False  # set by JsonErrorTask
    discard_until: float | None = None  # monotonic deadline while discarding

    def send_continue(self) -> None:
        # Never invite the body of a request already refused: answer at once instead.
        if self.request is not None and self.request.error is not None:
            return
        super().send_continue()

    def readable(self) -> bool:
        if self.discard_until is not None:
            return True
        return super().readable()

    def handle_read(self) -> None:
        if self.discard_until is None:
            super().handle_read()
            return
        if self.recv(DISCARD_CHUNK):  # recv() itself closes on EOF or reset
            self.last_activity = time.time()
        if self.connected and time.monotonic() > self.discard_until:
            self.handle_close()

    def handle_write(self) -> None:
        lingering_time = self.server.lingering_time
        lingers = self.linger_after_close and self.close_when_flushed and lingering_time > 0
        if self.will_close or not lingers:
            super().handle_write()
            return
        self._flush_exception(self._flush_some)
        if self.will_close:  # the client is gone
            self.handle_close()
            return
        if self.total_outbufs_len:
            return
        # The answer is out: half-close, then read and drop what the client still sends.
        self.close_when_flushed = False
        self.linger_after_close = False
        try:
            self.socket.shutdown(socket.SHUT_WR)
        except OSError:
            self.handle_close()
            return
        self.discard_until = time.monotonic() + lingering_time


class Server(TcpWSGIServer):
    """waitress's TCP listener, making our Channels and accepting in batches."""

    channel_class = Channel

    def __init__(self, *args, lingering_time: float, **kw):
        self.lingering_time = lingering_time
        super().__init__(*args, **kw)

    def handle_accept(self) -> None:
        for _ in range(ACCEPT_BATCH):
            if len(self._map) >= self.adj.connection_limit:
                return
            before = len(self._map)
            super().handle_accept()
            if len(self._map) == before:  # nothing more was waiting, or accept() failed
                return


def raise_open_files_limit(wanted: int) -> int:
    """Raise RLIMIT_NOFILE's soft limit towards `wanted` (never above the hard limit);
    return the soft limit now in force."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
    if soft != resource.RLIM_INFINITY and soft < target:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        soft = target
    return wanted if soft == resource.RLIM_INFINITY else soft


def create(app, config: ServiceConfig):
    """The waitress server for `app` with our limits, errors and lingering close."""
    open_files = raise_open_files_limit(config.connection_limit * FDS_PER_CONNECTION + FD_RESERVE)
    connection_limit = min(config.connection_limit, (open_files - FD_RESERVE) // FDS_PER_CONNECTION)
    if connection_limit < config.connection_limit:
        log.warning("connection limit lowered to fit the open-files limit",
                    extra={"connection_limit": connection_limit, "configured": config.connection_limit,
                           "open_files": open_files})
    adj = Adjustments(
        host=config.host, port=config.port, threads=config.threads,
        # waitress refuses a Content-Length >= this, from the header, before reading the body.
        max_request_body_size=config.max_body_bytes + 1,
        connection_limit=max(connection_limit, 16),
        channel_timeout=config.channel_timeout,
        cleanup_interval=max(1, config.channel_timeout // 6),
        asyncore_use_poll=True,
        # Keep reading a connection while its request is served, so that a client that
        # hangs up is noticed (environ["waitress.client_disconnected"]): a synchronous
        # /execute stops waiting then, its thread is freed and its job runs on.
        channel_request_lookahead=1,
        ident="trainium-executor", clear_untrusted_proxy_headers=True,
    )
    dispatcher = ThreadedTaskDispatcher()
    dispatcher.set_thread_count(adj.threads)
    socket_map: dict = {}
    servers = [Server(app, socket_map, dispatcher=dispatcher, adj=adj, sockinfo=sockinfo,
                      lingering_time=config.lingering_time) for sockinfo in adj.listen]
    if len(servers) == 1:
        return servers[0]
    listening = [(s.effective_host, s.effective_port) for s in servers]
    return MultiSocketServer(socket_map, adj, listening, dispatcher, servers[0].log_info)
