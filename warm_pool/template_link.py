"""The supervisor's side of the template: start it, ask it for workers, read its news.

The template (template.py) is a separate interpreter started with a socket to us; this
class owns that process and socket. Everything read from it is decoded like anything
else on the pool's sockets (protocol.decode), though the template never runs job code.

A standby (`standby_of`) is a fork of a running template with a socket of its own: it
takes over when the template dies. It is not our child (its parent is the template, then
init), so its exit status is unknown; a pidfd, opened while its parent is still the
template, lets `close` wait for it and kill it without ever hitting a recycled pid.
"""

from __future__ import annotations

import os
import select
import signal
import socket
import subprocess
from multiprocessing import reduction
from multiprocessing.connection import Connection

from warm_pool import protocol, usage
from warm_pool.config import PoolConfig
from warm_pool.placement import Placement

_CLOSE_WAIT_S = 5.0


class TemplateLink:
    """One running template process (or standby) and the socket to it."""

    def __init__(self, config: PoolConfig | None, placement: Placement | None):
        self.proc: subprocess.Popen | None = None
        self.ready = False  # its template_ready has been read
        self._pid: int | None = None
        self._pidfd: int | None = None  # a standby's, once it is ready
        self._parent: int | None = None  # a standby's parent: the template it was forked from
        if config is None:
            return
        ours, theirs = socket.socketpair()
        confinement = placement.confinement()
        settings = protocol.TemplateSettings(
            backend=config.backend, backend_preload=config.backend_preload,
            preload=tuple(config.preload_list()), matplotlib_dir=str(config.matplotlib_dir),
            job_paths=tuple(config.job_paths()),
            needed=placement.needed_paths(), reuse_workers=config.reuse_workers,
            uid_base=confinement.uid_base, groups=confinement.groups, writable=confinement.writable,
            max_file_bytes=confinement.max_file_bytes)
        self.proc = subprocess.Popen(
            [config.python_executable(), "-P", "-m", "warm_pool.child.template",
             str(theirs.fileno()), settings.encode().decode("utf-8")],
            pass_fds=[theirs.fileno()], env=placement.template_env(),
            stdin=subprocess.DEVNULL, start_new_session=True)
        self._pid = self.proc.pid
        theirs.close()
        self._connect(ours)

    @classmethod
    def standby_of(cls, template: TemplateLink) -> TemplateLink:
        """Ask `template` to fork a standby; the link to it (ready once it says so)."""
        link = cls(None, None)
        link._parent = template.pid
        ours, theirs = socket.socketpair()
        template._send(protocol.ForkStandby(), theirs)
        link._connect(ours)
        return link

    def _connect(self, ours: socket.socket) -> None:
        self._sock = ours
        self.conn = Connection(os.dup(ours.fileno()))  # what the supervisor's loop waits on

    @property
    def pid(self) -> int | None:
        return self._pid

    def spawn(self, msg: protocol.Spawn) -> Connection:
        """Ask for a worker; return our end of its socket."""
        ours, theirs = socket.socketpair()
        self._send(msg, theirs)
        return Connection(ours.detach())

    def _send(self, msg: protocol.Message, fd_owner: socket.socket) -> None:
        try:
            self.conn.send_bytes(msg.encode())
            reduction.sendfds(self._sock, [fd_owner.fileno()])
        except OSError:  # it died: its EOF is read next, and what it was asked for goes with it
            pass
        finally:
            fd_owner.close()

    def read(self) -> protocol.Message:
        """The next message; EOFError or OSError when the template is gone, ProtocolError
        when it sent something it should not have."""
        msg = protocol.decode(self.conn.recv_bytes(protocol.MAX_FRAME), protocol.FROM_TEMPLATE)
        if isinstance(msg, protocol.TemplateReady) and not self.ready:
            self.ready = self.proc is not None or self._adopt(msg.pid)
        return msg

    def _adopt(self, pid: int) -> bool:
        """Hold a standby by a pidfd, once its parent is seen to be the template it was
        forked from; False when it is not (then it is never used or signalled)."""
        try:
            fd = os.pidfd_open(pid)
        except OSError:
            return False
        if usage.parent_pid(pid) != self._parent:  # gone already, or its template died meanwhile
            os.close(fd)
            return False
        self._pid, self._pidfd = pid, fd
        return True

    def close(self) -> int | None:
        """Close the socket (EOF: the template kills and reaps every worker) and wait for
        it; its exit status (negative: the signal that ended it; None for a standby)."""
        self.conn.close()
        self._sock.close()
        if self.proc is None:
            self._close_standby()
            return None
        try:
            return self.proc.wait(timeout=_CLOSE_WAIT_S)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait()

    def _close_standby(self) -> None:
        if self._pidfd is None:
            return
        try:
            if not select.select([self._pidfd], [], [], _CLOSE_WAIT_S)[0]:
                signal.pidfd_send_signal(self._pidfd, signal.SIGKILL)
        except OSError:
            pass
        finally:
            os.close(self._pidfd)
            self._pidfd = None
