"""The template: a separately started process that imports the heavy modules once and
forks workers on request.

It is started with `python -P -m warm_pool.child.template FD SETTINGS_JSON` (never forked from
the multi-threaded service: fork copies one thread and every lock the others held).
It imports the backend's modules and does nothing else with them: no device, no torch
operation, because neither the XLA/Neuron runtime nor OpenMP thread pools survive a
fork (a child of a parent that started them hangs). Then the optional preloads
(preload.py: what generated scripts commonly import, warmed up on the CPU, skipped and
reported when missing, failing or starting a thread). Before each fork it checks the XLA
runtime is still uninitialised, the same check torch-xla's own fork-based spawner
makes. Having imported everything, it takes the interpreter's fingerprint once
(integrity.py); every worker inherits it and checks it after each job.

Each worker is confined right after the fork (sandbox.py: its slot's uid, no
privileges, writes only where jobs may write), with /dev/null as fds 0-2, before it
touches its device or a job.

It is the children's subreaper, so a job's orphaned grandchildren are reparented here
and reaped, and it reports every worker's exit status to the supervisor (which is not
the workers' parent and could not wait for them). It exits when the supervisor's end
of the control socket closes, taking every worker with it.

On request it forks a standby (`fork_standby`): a copy that keeps only what was
imported, on a socket of its own, and serves as a template from then on. The supervisor
gives it work only if this template dies, so a template killed from outside (the OOM
killer, an operator) costs a fork, not a second round of imports (≈ 10 s here).
"""

from __future__ import annotations

import ctypes
import dataclasses
import gc
import importlib
import os
import selectors
import signal
import socket
import sys
import time
import traceback
from multiprocessing import reduction
from multiprocessing.connection import Connection

from warm_pool import protocol, sandbox
from warm_pool.child import preload as optional_preload
from warm_pool.child.integrity import Fingerprint

_PR_SET_PDEATHSIG = 1
_PR_SET_CHILD_SUBREAPER = 36

# Modules a worker needs that are cheap but better imported once, here; and standard
# modules that training scripts import lazily (a DataLoader with workers, a checkpoint):
# loaded here they are warm and watched by the fingerprint, so a job importing them does
# not cost its worker.
_SUPPORT_MODULES = (
    "warm_pool.child.worker", "warm_pool.child.isolation",
    "csv", "argparse", "pickle", "json", "logging.handlers",
    "multiprocessing.popen_fork", "multiprocessing.queues", "multiprocessing.synchronize",
    "multiprocessing.pool", "concurrent.futures",
)


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

    def __init__(self, control: socket.socket, backend: str, confinement: sandbox.Confinement,
                 needed: tuple[str, ...], job_paths: tuple[str, ...] = ()):
        self.sock = control
        self.conn = Connection(os.dup(control.fileno()))
        self.backend = backend
        self.confinement = confinement
        self.needed = needed
        self.job_paths = job_paths
        self.workers: dict[int, int] = {}  # pid -> worker_id
        self.slot_uids: set[int] = set()
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
            msg = protocol.decode(self.conn.recv_bytes(), protocol.TO_TEMPLATE)
        except (EOFError, OSError, protocol.ProtocolError):
            return False
        if isinstance(msg, protocol.Spawn):
            fds = reduction.recvfds(self.sock, 1)
            self.spawn(msg, fds[0])
        elif isinstance(msg, protocol.ForkStandby):
            self.fork_standby(reduction.recvfds(self.sock, 1)[0])
        return True

    def send(self, msg: protocol.Message) -> None:
        try:
            self.conn.send_bytes(msg.encode())
        except OSError:  # the supervisor is gone; serve() notices EOF next
            pass

    def spawn(self, msg: protocol.Spawn, fd: int) -> None:
        """Fork one worker that talks over fd; report its pid."""
        if xla_runtime_initialized():  # a bug in us, never a job's doing: stop loudly
            raise RuntimeError("XLA runtime initialised in the template; refusing to fork")
        pid = os.fork()
        if pid == 0:
            code = 1
            try:
                code = self.child(msg, fd)
            except BaseException:  # noqa: BLE001 - the worker could not start: say why, then die
                _report_failure(fd, msg.worker_id, traceback.format_exc())
            finally:
                os._exit(code)
        os.close(fd)
        self.workers[pid] = msg.worker_id
        if msg.uid is not None:
            self.slot_uids.add(msg.uid)
        self.send(protocol.Spawned(msg.worker_id, pid))

    def fork_standby(self, fd: int) -> None:
        """Fork a standby template that serves on fd. The supervisor turns to it when this
        one dies (killed from outside: the OOM killer, an operator), so the pool is whole
        again in a fork's time instead of a second round of imports. Forked, it shares
        this template's pages (a few MB of its own)."""
        if xla_runtime_initialized():  # a bug in us, never a job's doing: stop loudly
            raise RuntimeError("XLA runtime initialised in the template; refusing to fork")
        if os.fork() == 0:
            code = 1
            try:
                code = self._standby(fd)
            finally:
                os._exit(code)
        os.close(fd)

    def _standby(self, fd: int) -> int:
        """In the standby: keep what was imported, nothing else of this template's."""
        # This template's sockets closed, or the supervisor would see no EOF when it dies.
        for keep_closed in (self.child_r, self.child_w, self.conn.fileno(), self.sock.fileno()):
            os.close(keep_closed)
        os.setsid()  # its own session and group: a kill aimed at this template's misses it
        _prctl(_PR_SET_CHILD_SUBREAPER, 1)  # not inherited across fork
        control = socket.socket(fileno=fd)
        with Connection(os.dup(fd)) as conn:
            conn.send_bytes(protocol.TemplateReady(os.getpid(), self.backend, _PRELOADED, 0.0,
                                                   len(_FINGERPRINT or ()), {}, {}).encode())
        Template(control, self.backend, self.confinement, self.needed, self.job_paths).serve()
        return 0

    def child(self, msg: protocol.Spawn, fd: int) -> int:
        """In the new worker: drop the template's state, confine, then run the worker."""
        # Own session and process group: terminal signals aimed at the service do not
        # reach us, and a kill of the group takes the job's children too.
        os.setsid()
        for keep_closed in (self.child_r, self.child_w, self.conn.fileno(), self.sock.fileno()):
            os.close(keep_closed)
        # fds 0-2 were the service's (its log): a job must not hold them.
        devnull = os.open(os.devnull, os.O_RDWR)
        for target in (0, 1, 2):
            os.dup2(devnull, target)
        os.close(devnull)
        signal.set_wakeup_fd(-1)
        for sig in (signal.SIGCHLD, signal.SIGTERM, signal.SIGHUP):
            signal.signal(sig, signal.SIG_DFL)
        signal.signal(signal.SIGPIPE, signal.SIG_IGN)  # as in any Python program
        signal.signal(signal.SIGINT, signal.default_int_handler)
        for procs in msg.cgroups:  # before anything else: all it starts is born inside
            with open(procs, "w") as f:
                f.write(str(os.getpid()))
        applied = sandbox.enter_namespaces(msg.tmpfs_mb, msg.tmpfs_at) if msg.tmpfs_mb else {}
        applied.update(sandbox.enter(self.confinement, msg.slot, uid=msg.uid,
                                     more_writable=msg.tmpfs_at if msg.tmpfs_mb else ()))
        if msg.cgroups:
            applied["accounts"] = "own cgroup"
        # After the credential change: it clears the parent-death signal.
        _prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
        if os.getppid() == 1:  # the template died before we set it
            return 1
        os.environ.update(msg.env)
        from warm_pool.child import worker

        return worker.main(fd, msg.worker_id, self.backend, msg.core, _PRELOADED,
                           None if msg.one_job else _FINGERPRINT, applied, self.needed, self.job_paths,
                           one_job=msg.one_job, defer_device=msg.defer_device)

    def reap(self) -> None:
        """Wait for every exited child; report workers (wait status and the kernel's peak
        RSS of the process), silently reap adopted orphans."""
        while True:
            try:
                pid, status, rusage = os.wait4(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            worker_id = self.workers.pop(pid, None)
            if worker_id is not None:
                self.send(protocol.Exited(worker_id, pid, os.waitstatus_to_exitcode(status),
                                          int(rusage.ru_maxrss)))

    def kill_all(self) -> None:
        """Kill every worker and its group, and reap them (the supervisor is gone).

        A worker forked a moment ago may not have called setsid() yet, so its group
        does not exist: it is killed by pid too, and again until it is reaped. Then
        everything the job uids still run (a job's daemon that left the group) goes too.
        """
        self._kill_workers()
        for uid in self.slot_uids:
            _kill_every_process_of(uid)

    def _kill_workers(self) -> None:
        deadline = time.monotonic() + 5
        while self.workers and time.monotonic() < deadline:
            for pid in list(self.workers):
                for kill in (os.killpg, os.kill):
                    try:
                        kill(pid, signal.SIGKILL)
                    except OSError:
                        pass
            time.sleep(0.01)
            while True:
                try:
                    pid, _ = os.waitpid(-1, os.WNOHANG)
                except ChildProcessError:
                    return
                if pid == 0:
                    break
                self.workers.pop(pid, None)


def _kill_every_process_of(uid: int) -> None:
    """kill(-1) as `uid`, from a child holding no capability: every process of that uid
    ends at once (with CAP_KILL it would be every process on the machine)."""
    pid = os.fork()
    if pid == 0:
        try:
            os.setgroups([])
            os.setresgid(uid, uid, uid)
            os.setresuid(uid, uid, uid)
            sandbox.drop_capabilities()
            if not any(sandbox.capabilities()[k] for k in ("CapPrm", "CapEff", "CapAmb")):
                os.kill(-1, signal.SIGKILL)
        finally:
            os._exit(0)
    os.waitpid(pid, 0)


def _report_failure(fd: int, worker_id: int, text: str) -> None:
    """Tell the supervisor why a worker could not start, on the worker's own channel."""
    try:
        Connection(fd).send_bytes(protocol.WorkerFailed(worker_id, protocol.clip(text)).encode())
    except Exception:  # noqa: BLE001 - the channel is gone too: the exit status says enough
        pass


_PRELOADED: tuple[str, ...] = ()
_FINGERPRINT: Fingerprint | None = None


def main(argv: list[str] | None = None) -> int:
    """Entry point: python -P -m warm_pool.child.template FD SETTINGS (a protocol.TemplateSettings)."""
    global _PRELOADED, _FINGERPRINT
    argv = sys.argv[1:] if argv is None else argv
    control = socket.socket(fileno=int(argv[0]))
    settings = protocol.decode(argv[1].encode("utf-8"), (protocol.TemplateSettings,))
    conn = Connection(os.dup(control.fileno()))
    _prctl(_PR_SET_CHILD_SUBREAPER, 1)
    # The supervisor decides when we end (EOF); ignore the terminal's Ctrl-C.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    started = time.perf_counter() - settings.seconds_before
    optional = optional_preload.Preloaded()
    try:
        backend, preload = resolve_backend(settings.backend)
        if settings.backend_preload is not None:
            preload = settings.backend_preload
        if backend == "xla":
            os.environ.setdefault("PJRT_DEVICE", "CPU")
        imported, error = import_modules(preload)
        if error is None:
            _, error = import_modules(_SUPPORT_MODULES)
        if error is None:
            optional = _load_optional(settings, list(imported), started, argv[0])
            # Only the reuse mode checks a worker against it after each job; a process
            # that runs one job has nothing to compare (and the template starts faster).
            _FINGERPRINT = Fingerprint.take() if settings.reuse_workers else None
            # Everything preloaded lives as long as every worker: out of the collector's
            # reach. Otherwise each worker's collections walk (and write the GC header of)
            # every object the template made, so copy-on-write copies those pages into
            # each worker and a job's end or a worker's start pays a full walk.
            gc.collect()
            gc.freeze()
    except BaseException:  # noqa: BLE001
        imported, error, backend = [], traceback.format_exc(), settings.backend
    if error is not None:
        conn.send_bytes(protocol.TemplateFailed(protocol.clip(error)).encode())
        return 1
    _PRELOADED = tuple(dict.fromkeys([*imported, *optional.imported]))
    skipped = {k: protocol.clip(v, 500) for k, v in optional.skipped.items()}
    conn.send_bytes(protocol.TemplateReady(os.getpid(), backend, _PRELOADED, time.perf_counter() - started,
                                           len(_FINGERPRINT) if _FINGERPRINT else 0, skipped,
                                           optional.native_threads).encode())
    conn.close()
    confinement = sandbox.Confinement(settings.uid_base, settings.groups, settings.writable,
                                      settings.max_file_bytes)
    Template(control, backend, confinement, settings.needed, settings.job_paths).serve()
    return 0


def _load_optional(settings: protocol.TemplateSettings, backend_modules: list[str], started: float,
                   control_fd: str) -> optional_preload.Preloaded:
    """The optional preloads (and the backend modules' companions); skipped ones reported.

    matplotlib's config dir is the service's own for the template (its font cache built
    once, kept across starts) and is taken out of the environment again, so jobs see
    none of it. A module that leaves a thread behind cannot be unloaded: the template
    starts over (exec, same pid and control socket) without it.
    """
    ours = settings.matplotlib_dir and "MPLCONFIGDIR" not in os.environ
    if ours:
        os.environ["MPLCONFIGDIR"] = settings.matplotlib_dir
    try:
        return optional_preload.load(backend_modules + list(settings.preload), settings.skip)
    except optional_preload.ThreadStarted as exc:
        skip = {**settings.skip, exc.module: protocol.clip(str(exc), 500)}
        again = dataclasses.replace(settings, skip=skip, seconds_before=time.perf_counter() - started)
        sys.stdout.flush()
        os.execv(sys.executable, [sys.executable, "-P", "-m", "warm_pool.child.template", control_fd,
                                  again.encode().decode("utf-8")])
        raise  # not reached
    finally:
        if ours:
            os.environ.pop("MPLCONFIGDIR", None)


if __name__ == "__main__":
    sys.exit(main())
