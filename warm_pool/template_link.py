"""The supervisor's side of the template: start it, ask it for workers, read its news.

The template (template.py) is a separate interpreter started with a socket to us; this
class owns that process and socket. Everything read from it is decoded like anything
else on the pool's sockets (protocol.decode), though the template never runs job code.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
from multiprocessing import reduction
from multiprocessing.connection import Connection

from warm_pool import protocol
from warm_pool.config import PoolConfig
from warm_pool.placement import Placement


class TemplateLink:
    """One running template process and the socket to it."""

    def __init__(self, config: PoolConfig, placement: Placement):
        ours, theirs = socket.socketpair()
        backend_preload = config.backend_preload
        settings = {"backend": config.backend,
                    "backend_preload": list(backend_preload) if backend_preload is not None else None,
                    "preload": list(config.preload_list()),
                    "matplotlib_dir": str(config.matplotlib_dir),
                    "job_paths": list(config.job_paths()),
                    "confinement": placement.confinement_settings(),
                    "needed": list(placement.needed_paths()),
                    "reuse_workers": config.reuse_workers}
        self.proc = subprocess.Popen(
            [config.python_executable(), "-P", "-m", "warm_pool.template",
             str(theirs.fileno()), json.dumps(settings)],
            pass_fds=[theirs.fileno()], env=placement.template_env(),
            stdin=subprocess.DEVNULL, start_new_session=True)
        theirs.close()
        self._sock = ours
        self.conn = Connection(os.dup(ours.fileno()))  # what the supervisor's loop waits on

    @property
    def pid(self) -> int:
        return self.proc.pid

    def spawn(self, msg: protocol.Spawn) -> Connection:
        """Ask for a worker; return our end of its socket."""
        ours, theirs = socket.socketpair()
        self.conn.send_bytes(msg.encode())
        reduction.sendfds(self._sock, [theirs.fileno()])
        theirs.close()
        return Connection(ours.detach())

    def read(self) -> protocol.Message:
        """The next message; EOFError or OSError when the template is gone, ProtocolError
        when it sent something it should not have."""
        return protocol.decode(self.conn.recv_bytes(protocol.MAX_FRAME), protocol.FROM_TEMPLATE)

    def close(self) -> int:
        """Close the socket (EOF: the template kills and reaps every worker) and wait for
        it; its exit status (negative: the signal that ended it)."""
        self.conn.close()
        self._sock.close()
        try:
            return self.proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait()
