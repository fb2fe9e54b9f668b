"""The template: a separately started process that imports the heavy modules once and
forks workers on request.

It is started with `python -P -m warm_pool.template FD CONFIG_JSON` (never forked from
the multi-threaded service: fork copies one thread and every lock the others held).
It imports the backend's modules and does nothing else with them: no device, no torch
operation, because neither the XLA/Neuron runtime nor OpenMP thread pools survive a
fork (DESIGN.md, "Facts"). Before each fork it checks the XLA runtime is still
uninitialised, the same check torch-xla's own fork-based spawner makes.

It is the children's subreaper, so a job's orphaned grandchildren are reparented here
and reaped, and it reports every worker's exit status to the supervisor (which is not
the workers' parent and could not wait for them). It exits when the supervisor's end
of the control socket closes, taking every worker with it.
"""

from __future__ import annotations

import ctypes
import importlib
import json
import os
import selectors
import signal
import socket
import sys
import time
import traceback
from multiprocessing import reduction
from multiprocessing.connection import Connection

from warm_pool import protocol

_PR_SET_PDEATHSIG = 1
_PR_SET_CHILD_SUBREAPER = 36

# Modules a worker needs that are cheap but better imported once, here.
_SUPPORT_MODULES = ("warm_pool.worker", "warm_pool.isolation", "psutil")


def _prctl(option: int, value: int) -> None:
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(option, value, 0, 0, 0)
    except (OSError, AttributeError):  # not Linux: no subreaper, orphans go to init
        pass


def resolve_backend(requested: str) -> tuple[str, tuple[str, ...]]:
    """The backend to serve and its preload list; auto picks the best one present."""
    from warm_pool.config import PRELOAD

    if requested != "auto":
        return requested, PRELOAD[requested]
    from warm_pool import neuron

    if neuron.detect().available and importlib.util.find_spec("torch_neuronx") is not None:
        return "neuron", PRELOAD["neuron"]
    if importlib.util.find_spec("torch_xla") is not None:
        return "xla", PRELOAD["xla"]
    return "cpu", PRELOAD["cpu"]


def import_modules(names: tuple[str, ...]) -> tuple[list[str], str | None]:
    """Import each module; return those imported and the first failure's traceback."""
    done = []
    for name in names:
        try:
            importlib.import_module(name)
        except BaseException:  # noqa: BLE001 - any failure makes the pool broken, reported
            return done, f"cannot import {name}:\n{traceback.format_exc()}"
        done.append(name)
    return done, None


def xla_runtime_initialized() -> bool:
    """True when torch_xla's runtime has started in this process (then fork would hang)."""
    xla = sys.modules.get("torch_xla")
    if xla is None:
        return False
    return bool(xla._XLAC._xla_runtime_is_initialized())


class Template:
    """The template's state: its control connection and the workers it forked."""

    def __init__(self, control: socket.socket, backend: str):
        self.sock = control
        self.conn = Connection(os.dup(control.fileno()))
        self.backend = backend
        self.workers: dict[int, int] = {}  # pid -> worker_id
        self.child_r, self.child_w = os.pipe()

    def serve(self) -> None:
        """Answer Spawn messages and report exits until the supervisor goes away."""
        os.set_blocking(self.child_w, False)
        signal.set_wakeup_fd(self.child_w)
        # SIGCHLD must have a Python handler for the wakeup fd to be written.
        signal.signal(signal.SIGCHLD, lambda *_: None)
        sel = selectors.DefaultSelector()
        sel.register(self.conn.fileno(), selectors.EVENT_READ, "control")
        sel.register(self.child_r, selectors.EVENT_READ, "child")
        while True:
            for key, _ in sel.select():
                if key.data == "child":
                    os.read(self.child_r, 4096)
                    self.reap()
                elif not self.handle_control():
                    self.kill_all()
                    return
            # SIGCHLD may have arrived while we were forking; reaping is cheap.
            self.reap()

    def handle_control(self) -> bool:
        """Handle one control message; False when the supervisor closed the socket."""
        try:
            msg = self.conn.recv()
        except (EOFError, OSError):
            return False
        if isinstance(msg, protocol.Spawn):
            fds = reduction.recvfds(self.sock, 1)
            self.spawn(msg, fds[0])
        return True

    def spawn(self, msg: protocol.Spawn, fd: int) -> None:
        """Fork one worker that talks over fd; report its pid."""
        if xla_runtime_initialized():  # a bug in us, never a job's doing: stop loudly
            raise RuntimeError("XLA runtime initialised in the template; refusing to fork")
        pid = os.fork()
        if pid == 0:
            code = 1
            try:
                code = self.child(msg, fd)
            except BaseException:  # noqa: BLE001 - a bug in the worker: say where, then die
                # os.write, not print: a job may have replaced builtins.print.
                os.write(2, f"warm_pool worker {msg.worker_id} failed:\n{traceback.format_exc()}".encode())
            finally:
                os._exit(code)
        os.close(fd)
        self.workers[pid] = msg.worker_id
        try:
            self.conn.send(protocol.Spawned(msg.worker_id, pid))
        except OSError:  # the supervisor is gone; serve() notices EOF next
            pass

    def child(self, msg: protocol.Spawn, fd: int) -> int:
        """In the new worker: detach from the template's state, then run the worker."""
        # Own session and process group, so a kill of the group takes the job's
        # children too and terminal signals aimed at the service do not reach us.
        os.setsid()
        _prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
        signal.set_wakeup_fd(-1)
        for sig in (signal.SIGCHLD, signal.SIGTERM, signal.SIGHUP, signal.SIGPIPE):
            signal.signal(sig, signal.SIG_DFL)
        signal.signal(signal.SIGINT, signal.default_int_handler)
        for keep_closed in (self.child_r, self.child_w, self.conn.fileno(), self.sock.fileno()):
            os.close(keep_closed)
        os.environ.update(dict(msg.env))
        from warm_pool import worker

        return worker.main(Connection(fd), msg.worker_id, self.backend, msg.core, _PRELOADED)

    def reap(self) -> None:
        """Wait for every exited child; report workers, silently reap adopted orphans."""
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            worker_id = self.workers.pop(pid, None)
            if worker_id is not None:
                rc = os.waitstatus_to_exitcode(status)
                try:
                    self.conn.send(protocol.Exited(worker_id, pid, rc))
                except OSError:
                    return

    def kill_all(self) -> None:
        """Kill every worker's process group and reap them (supervisor is gone)."""
        for pid in list(self.workers):
            try:
                os.killpg(pid, signal.SIGKILL)
            except OSError:
                pass
        deadline = time.monotonic() + 5
        while self.workers and time.monotonic() < deadline:
            try:
                pid, _ = os.waitpid(-1, 0)
            except ChildProcessError:
                break
            self.workers.pop(pid, None)


_PRELOADED: tuple[str, ...] = ()


def main(argv: list[str] | None = None) -> int:
    """Entry point: python -P -m warm_pool.template FD CONFIG_JSON."""
    global _PRELOADED
    argv = sys.argv[1:] if argv is None else argv
    control = socket.socket(fileno=int(argv[0]))
    settings = json.loads(argv[1])
    conn = Connection(os.dup(control.fileno()))
    _prctl(_PR_SET_CHILD_SUBREAPER, 1)
    # The supervisor decides when we end (EOF); ignore the terminal's Ctrl-C.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    started = time.perf_counter()
    try:
        backend, preload = resolve_backend(settings["backend"])
        if settings.get("preload") is not None:
            preload = tuple(settings["preload"])
        if backend == "xla":
            os.environ.setdefault("PJRT_DEVICE", "CPU")
        imported, error = import_modules(preload)
        if error is None:
            _, error = import_modules(_SUPPORT_MODULES)
    except BaseException:  # noqa: BLE001
        imported, error, backend = [], traceback.format_exc(), settings["backend"]
    if error is not None:
        conn.send(protocol.TemplateFailed(error))
        return 1
    _PRELOADED = tuple(imported)
    conn.send(protocol.TemplateReady(os.getpid(), backend, _PRELOADED, time.perf_counter() - started))
    conn.close()
    Template(control, backend).serve()
    return 0


if __name__ == "__main__":
    sys.exit(main())
