"""Where each worker slot runs and as whom: its NeuronCore, its uid, its environment.

`Placement.plan(config)` decides once, before anything starts:

- the slots: one per worker; on neuron each owns one NeuronCore;
- the isolation: "uid" when this process may switch uids, else "none" (jobs keep the
  service's uid: for development only; a warning says so once). Slot k owns
  ``spares_per_slot + 1`` uids (seats), ``job_uid_base + k * seats + i``: its processes
  take turns on them, so killing everything of a finished job's uid never touches the
  spare that takes the next job;
- the kernel's accounts (cgroups.py: a memory and pids cgroup per worker process) and
  whether each job process gets its own IPC namespace, /tmp and /dev/shm;
- the confinement every worker gets (sandbox.py) and the paths a job uid must reach;
- the files' ownership: the work dir and the jobs dir traversable but not listable by
  job uids, each job's dir handed to its slot's uid when the job starts (`hand_over`; a
  profiled job's before its process starts the Neuron runtime: `hand_over_profile`),
  the capture files and the job store closed to them;
- what every job reads and none may change: the job helper dirs (on its sys.path and
  PYTHONPATH), the data set cache (its DATASET_CACHE_DIR) and the operator's Hugging
  Face cache (its HF_HOME, when `hf_home` is set), checked at start
  (`check_shared_dirs`): outside the trees jobs may write, and writable by their owner
  alone, else a ConfigError naming the setting;
- each slot's temporary directory (a job's TMPDIR): ``<work_dir>/tmp/<slot>``, emptied
  before every job. It is not inside the job's own dir because its path must stay short:
  programs put AF_UNIX sockets there (multiprocessing's resource sharer, which a
  DataLoader with workers uses), and a socket path may not exceed 107 bytes.
"""

from __future__ import annotations

import functools
import grp
import logging
import os
import shutil
import stat
import sys
import sysconfig
from dataclasses import dataclass, field
from typing import Any

from warm_pool import job_env, neuron, sandbox
from warm_pool.config import SCRUB_PREFIXES, PoolConfig
from warm_pool.neuron import profile
from warm_pool.settings import ConfigError, label
from warm_pool.usage import MIB

log = logging.getLogger("warm_pool")

# Longest path of an AF_UNIX socket (sun_path is 108 bytes with its NUL), and what
# programs add below TMPDIR for theirs (multiprocessing: /pymp-XXXXXXXX/listener-XXXXXXXX).
_SOCKET_PATH_MAX = 107
_SOCKET_SUFFIX = 32
# How many entries of a shared dir (job helpers, data sets) the start-up check looks at.
_CHECK_ENTRIES = 100_000


@dataclass
class Placement:
    """The slots of a pool and how their workers are confined."""

    config: PoolConfig
    cores: list[int | None]
    isolation: str                       # uid | none
    neuron: bool = False
    neuron_info: Any = None              # neuron.NeuronInfo when neuron was looked for
    groups: tuple[int, ...] = ()
    landlock_abi: int = 0
    service_gid: int = field(default_factory=os.getegid)
    uid_claims: list[Any] = field(default_factory=list)
    namespaces: bool = False             # each job process gets its own IPC ns, /tmp, /dev/shm
    accounts: Any = None                 # cgroups.Accounts once claimed (None: RSS from /proc)

    @classmethod
    def plan(cls, config: PoolConfig) -> Placement:
        """Decide cores, isolation and groups; ConfigError when isolation "uid" is impossible."""
        neuron_info = None
        if config.backend in ("neuron", "auto"):
            neuron_info = neuron.detect()
        # auto becomes neuron only if the template then imports torch_neuronx too.
        on_neuron = config.backend == "neuron" or bool(
            config.backend == "auto" and neuron_info and neuron_info.available)
        possible, missing = sandbox.can_switch_uids()
        isolation = config.isolation
        if isolation == "uid" and not possible:
            raise ConfigError(f"{label(PoolConfig, 'isolation')} uid needs root or the "
                              f"capabilities {', '.join(missing)}")
        if isolation == "auto":
            isolation = "uid" if possible else "none"
            if not possible:
                log.warning("jobs run under the service's own uid (isolation none): for development "
                            "only; run as root or grant %s to confine them", ", ".join(missing))
        placement = cls(config, _plan_cores(config, on_neuron, neuron_info), isolation, on_neuron,
                        neuron_info, _job_groups(config, on_neuron), sandbox.landlock_abi())
        placement.namespaces = bool(isolation == "uid" and config.job_tmpfs_mb and sandbox.can_unshare())
        placement.check_shared_dirs()
        longest = placement.tmp_dir(len(placement.cores) - 1)
        if len(longest) + _SOCKET_SUFFIX > _SOCKET_PATH_MAX:
            raise ConfigError(f"{label(PoolConfig, 'work_dir')} {config.work_dir} is too long: "
                              f"jobs' temporary sockets ({longest}/...) would not fit the "
                              f"{_SOCKET_PATH_MAX}-byte limit of AF_UNIX socket paths")
        return placement

    # --- identity and confinement ---------------------------------------------------------

    @property
    def seats(self) -> int:
        """Uids each slot takes turns on (its spares, and one whose job is ending)."""
        return self.config.spares_per_slot + 1

    def seat_uids(self, slot: int) -> list[int | None]:
        """The uids (and gids) a slot's processes run as; [None] under isolation none."""
        if self.isolation != "uid":
            return [None] * self.seats
        first = self.config.job_uid_base + slot * self.seats
        return list(range(first, first + self.seats))

    def uid(self, slot: int) -> int | None:
        """The first uid of a slot (None under isolation none)."""
        return self.seat_uids(slot)[0]

    @property
    def uid_range(self) -> range:
        """Every job uid of the pool."""
        first = self.config.job_uid_base
        return range(first, first + len(self.cores) * self.seats)

    @property
    def output_limit_bytes(self) -> int:
        return self.config.output_limit_mb * MIB

    def tmp_dir(self, slot: int) -> str:
        """A slot's temporary directory: the TMPDIR of the jobs it runs."""
        return os.path.join(self.config.work_dir, "tmp", str(slot))

    @property
    def private_tmp(self) -> bool:
        """Whether each job process gets a /tmp of its own: not when the work dir (or
        anything else a job needs) lives below /tmp, which the mount would hide."""
        if not self.namespaces:
            return False
        paths = (str(self.config.work_dir), *self.needed_paths())
        return not any(os.path.commonpath([os.path.realpath(p), "/tmp"]) == "/tmp" for p in paths)

    def tmpfs_targets(self) -> tuple[str, ...]:
        """Where each job process's own tmpfs mounts go."""
        if not self.namespaces:
            return ()
        return ("/dev/shm", "/tmp") if self.private_tmp else ("/dev/shm",)

    def writable(self) -> tuple[str, ...]:
        """Trees where jobs may create files (their own dir there, by permissions)."""
        trees = [str(self.config.jobs_dir), os.path.join(self.config.work_dir, "tmp"), "/dev/shm"]
        if self.neuron:
            trees.append(str(self.config.compile_cache_dir))
        return tuple(trees)

    def confinement(self) -> sandbox.Confinement:
        """What the template needs to confine each worker."""
        return sandbox.Confinement(self.config.job_uid_base if self.isolation == "uid" else None,
                                   tuple(self.groups), tuple(self.writable()), self.config.max_disk_mb * MIB)

    def needed_paths(self) -> tuple[str, ...]:
        """What a job's uid must be able to reach: the interpreter's libraries, the jobs dir,
        the job helper dirs and the data set cache."""
        paths = {sysconfig.get_paths()["stdlib"], sysconfig.get_paths()["purelib"], sys.prefix,
                 str(self.config.jobs_dir), str(self.config.datasets_path), *self.config.job_paths()}
        if self.config.hf_home is not None:
            paths.add(os.path.abspath(self.config.hf_home))
        return tuple(sorted(paths))

    def check_shared_dirs(self) -> None:
        """ConfigError when a job helper dir, the data set cache or the operator's Hugging Face
        cache could be changed by a job
        (inside a tree jobs write to, or writable by anyone but its owner, or owned by a
        job uid): a job could then change what later jobs import or read."""
        datasets = self.config.datasets_path
        checks = [(p, label(PoolConfig, "job_path")) for p in self.config.job_paths()]
        if os.path.isdir(datasets) or self.config.datasets_dir is not None:
            checks.append((str(datasets), label(PoolConfig, "datasets_dir")))
        if self.config.hf_home is not None:
            checks.append((str(self.config.hf_home), label(PoolConfig, "hf_home")))
        for path, named in checks:
            self._check_shared(path, named)

    def _check_shared(self, path: str, label: str) -> None:
        real = os.path.realpath(path)
        if not os.path.isdir(real):
            if "datasets_dir" in label and not os.path.lexists(path):
                return  # created at start (prepare_dirs), by us, as it must be
            raise ConfigError(f"{label} {path} is not a directory")
        for tree in self.writable():
            tree_real = os.path.realpath(tree)
            if os.path.commonpath([real, tree_real]) in (real, tree_real):
                raise ConfigError(f"{label} {path} overlaps {tree}, where jobs write: jobs could change it")
        parent = os.path.dirname(real)
        while parent != os.path.dirname(parent):  # up to /: no one may swap the dir out
            st = os.stat(parent)
            if st.st_mode & stat.S_IWOTH and not st.st_mode & stat.S_ISVTX:
                raise ConfigError(f"{label} {path}: its parent {parent} is writable by every user "
                                  "(without the sticky bit), so anyone could replace it")
            parent = os.path.dirname(parent)
        for entry, st in _walk(real):
            why = self._writable_by_jobs(st)
            if why:
                raise ConfigError(f"{label} {path}: {entry} is {why}; jobs must not be able to change "
                                  f"what other jobs import or read (chmod go-w, chown to the service)")

    def _writable_by_jobs(self, st: os.stat_result) -> str | None:
        if stat.S_ISLNK(st.st_mode):  # a link's own mode means nothing; its dir's does
            return None
        mode = stat.S_IMODE(st.st_mode)
        if mode & stat.S_IWOTH:
            return f"writable by every user (mode {mode:04o})"
        if self.isolation == "uid":
            first, last = self.uid_range[0], self.uid_range[-1]
            if first <= st.st_uid <= last:
                return f"owned by job uid {st.st_uid}"
            if mode & stat.S_IWGRP and (first <= st.st_gid <= last or st.st_gid in self.groups):
                return f"writable by the jobs' group {st.st_gid} (mode {mode:04o})"
        return None

    def describe(self) -> dict[str, Any]:
        """For /health: how jobs are isolated."""
        out: dict[str, Any] = {"isolation": self.isolation,
                               "landlock_abi": self.landlock_abi or None,
                               "process_per_job": not self.config.reuse_workers,
                               "accounting": self.accounts.describe() if self.accounts else "none",
                               "namespaces": self.namespaces}
        if self.isolation == "uid":
            out["job_uids"] = f"{self.uid_range[0]}-{self.uid_range[-1]}"
            out["job_groups"] = list(self.groups)
        return out

    # --- files ----------------------------------------------------------------------------

    def claim(self) -> None:
        """Take the slots' uids for this pool, and end what a previous holder left running
        (jobs of a service that was killed); ConfigError if a live pool holds them."""
        if self.isolation == "uid":
            first = self.config.job_uid_base
            try:
                self.uid_claims = sandbox.claim_uids(self.uid_range)
            except sandbox.ConfinementError as exc:
                raise ConfigError(f"{label(PoolConfig, 'job_uid_base')} {first}: {exc}; "
                                  "give each pool on this machine its own range") from None
            for uid in self.uid_range:
                if not sandbox.kill_uid_now(uid):
                    sandbox.kill_uid(uid)
        from warm_pool.cgroups import Accounts

        uid_isolation = self.isolation == "uid"
        name = f"warm-pool-{self.config.job_uid_base}" if uid_isolation else f"warm-pool-pid{os.getpid()}"
        self.accounts = Accounts.detect(name)
        if self.accounts is not None:
            self.accounts.clean()  # groups a killed service left (their processes died above)

    def release(self) -> None:
        """Give the uids back (the pool has shut down and nothing of theirs runs)."""
        if self.accounts is not None:
            self.accounts.remove()
        for sock in self.uid_claims:
            sock.close()
        self.uid_claims = []

    def prepare_dirs(self) -> None:
        """Create the work dir's layout with the modes isolation needs."""
        work, jobs = self.config.work_dir, self.config.jobs_dir
        capture, tmp = os.path.join(work, "capture"), os.path.join(work, "tmp")
        artifacts = self.config.artifacts_dir
        for path in (work, jobs, capture, tmp, artifacts):
            os.makedirs(path, exist_ok=True)
        os.chmod(capture, 0o700)
        os.chmod(artifacts, 0o700)  # what jobs left, for the service alone to serve
        # Read by every job, written by none (check_shared_dirs ran at plan time).
        for shared in (self.config.datasets_path, self.config.matplotlib_dir):
            if not os.path.isdir(shared):
                os.makedirs(shared, mode=0o755, exist_ok=True)
                os.chmod(shared, 0o755)
        if self.isolation == "uid":
            # Job uids must traverse to their own dir, but not list anyone's.
            for path in (work, jobs, tmp):
                os.chmod(path, 0o711)
        if self.neuron:
            self._prepare_compile_cache()

    def _prepare_compile_cache(self) -> None:
        """The one directory every job shares: group-writable by the job uids' group."""
        cache = self.config.compile_cache_dir
        os.makedirs(cache, exist_ok=True)
        if self.isolation == "uid" and self.groups:
            os.chown(cache, -1, self.groups[0])
            os.chmod(cache, 0o2770)
        neuron.clear_stale_locks(cache)
        if self.config.neuron_cache_max_mb:
            neuron.prune_cache(cache, self.config.neuron_cache_max_mb * MIB)

    def hand_over(self, job_dir: str, tmp_dir: str | None, main_path: str, uid: int | None) -> None:
        """Give a job's dir and a fresh temporary dir (None: it has a /tmp of its own) to
        the process that runs it: the job owns them, the service's group can still read
        and remove them (setgid), no other uid can enter them."""
        if tmp_dir is not None:
            shutil.rmtree(tmp_dir, ignore_errors=True)
            os.mkdir(tmp_dir, 0o700)
        if uid is None:
            return
        for path in (job_dir, main_path, tmp_dir):
            if path is not None:
                os.chown(path, uid, self.service_gid)
        os.chmod(job_dir, 0o2770)

    def hand_over_profile(self, job_dir: str, main_path: str, uid: int | None) -> dict[str, str]:
        """A profiled job's dir, handed to the process that will run it before that process
        starts its runtime, with an empty output dir for the profiler in it; the runtime's
        settings that write there (neuron/profile.py). Done again if another process takes
        over the job (its predecessor failed to start): the dir is made afresh for it."""
        self.hand_over(job_dir, None, main_path, uid)
        out = os.path.join(job_dir, profile.OUTPUT_DIR)
        shutil.rmtree(out, ignore_errors=True)
        os.mkdir(out, 0o700)
        if uid is not None:
            os.chown(out, uid, self.service_gid)
        return profile.capture_env(out, self.config.neuron_profile_device)

    # --- environment ----------------------------------------------------------------------

    def template_env(self) -> dict[str, str]:
        """The environment the template (and every worker and job) starts with: the
        service's own without its secrets and credentials, the operator's extra variables,
        on neuron the compile cache's, then the threads and the libraries' (job_env.py)."""
        env = {k: v for k, v in os.environ.items()
               if k not in self.config.scrub_env and not k.startswith(SCRUB_PREFIXES)}
        env.update(dict(self.config.extra_env))
        if self.neuron:
            for name in neuron.CONFLICTING_ENV:
                env.pop(name, None)
            env.setdefault("PJRT_DEVICE", "NEURON")
            env.update(neuron.compile_cache_env(self.config.compile_cache_dir,
                                                self.config.neuron_retry_failed_compilation,
                                                env.get("NEURON_CC_FLAGS", "")))
        env["MPLBACKEND"] = "Agg"  # when the template imports matplotlib: no display here
        # OpenBLAS (numpy's, scipy's) sizes its thread pool once, when the template loads
        # it: to each worker's share, as a job's `python main.py` with the worker's
        # OMP_NUM_THREADS would. With one thread it never starts a pool at all.
        env.update(self.thread_env())
        for name in job_env.inherited_to_drop():
            env.pop(name, None)
        for name in [n for n in env if n.startswith(profile.ENV_PREFIX)]:  # only a profiled job's
            del env[name]
        env.update(self.library_env())
        return env

    @functools.cached_property
    def operator_env(self) -> dict[str, str]:
        """The operator's variables for every job (job_env, job_env_file), read once."""
        return self.config.job_environment()

    def library_env(self) -> dict[str, str]:
        """Hugging Face's locations and the operator's variables (job_env.py). The template's
        environment has them too: what it imports reads some of them once, at import."""
        env = job_env.hf_env(self.config.hf_home, self.operator_env)
        env.update(self.operator_env)
        return env

    def thread_env(self) -> dict[str, str]:
        """Intra-op threads of each worker (and of its jobs' own child processes)."""
        threads = self.config.threads_per_worker
        if threads is None and "OMP_NUM_THREADS" not in os.environ:  # an operator's choice wins
            threads = max(1, (os.cpu_count() or 1) // len(self.cores))
        if not threads:
            return {}
        # RAYON_NUM_THREADS: the Rust thread pool of Hugging Face's tokenizers.
        return {"OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads),
                "OPENBLAS_NUM_THREADS": str(threads), "RAYON_NUM_THREADS": str(threads)}

    def job_env(self) -> dict[str, str]:
        """What every job's environment adds: no display for matplotlib, the job helper
        dirs on PYTHONPATH (for the job's own child interpreters too), the data set cache,
        Hugging Face's locations and the operator's variables."""
        inherited = os.environ.get("PYTHONPATH", "")
        path = os.pathsep.join([*self.config.job_paths(), *([inherited] if inherited else [])])
        env = {"MPLBACKEND": "Agg", "PYTHONPATH": path,
               "DATASET_CACHE_DIR": str(self.config.datasets_path), **self.library_env()}
        if self.isolation == "uid":
            # Job uids have no passwd entry: getpass.getuser() reads these first (torch's
            # compile cache names a directory with it), and the service's name is not theirs.
            env.update(USER=job_env.JOB_USER, LOGNAME=job_env.JOB_USER)
        return env

    def worker_env(self, worker_id: int, core: int | None, backend: str | None) -> dict[str, str]:
        """Per-worker environment: the job environment; intra-op threads; on neuron, its one
        NeuronCore."""
        env = self.job_env()
        env.update(self.thread_env())
        if backend == "neuron" and core is not None:
            # NEURON_RT_LOG_LEVEL: neuron_log_level, else the operator's job_env, else inherited.
            env.update(neuron.worker_env(core, tag=f"trainium-executor-w{worker_id}",
                                         log_level=self.config.neuron_log_level,
                                         environ={**os.environ, **self.operator_env}))
        return env

    # --- the device -----------------------------------------------------------------------

    @property
    def cores_per_device(self) -> int:
        info = self.neuron_info
        return info.cores_per_device if info and info.cores_per_device else 2

    def device_tracker(self, core: int | None, backend: str | None) -> Any:
        """A started tracker of a job's device-memory peak (neuron only), else None."""
        if backend != "neuron" or core is None:
            return None
        tracker = neuron.PeakTracker(core, self.config.neuron_sysfs_root, self.cores_per_device)
        tracker.start()
        return tracker

    def device_memory_growing(self, worker: Any) -> bool:
        """True when a worker's idle NeuronCore memory grew after several jobs in a row."""
        if not self.neuron or worker.core is None or not self.config.neuron_idle_growth_jobs:
            return False
        mem = neuron.core_memory(worker.core, self.config.neuron_sysfs_root, self.cores_per_device)
        if mem is None:
            return False
        if worker.growth is None:
            worker.growth = neuron.IdleGrowth(jobs=self.config.neuron_idle_growth_jobs)
        return worker.growth.observe(mem.used_bytes)


def _walk(root: str):
    """(path, lstat) of root and what it holds, at most _CHECK_ENTRIES; links not followed."""
    stack, seen = [root], 0
    while stack and seen < _CHECK_ENTRIES:
        path = stack.pop()
        try:
            st = os.lstat(path)
        except OSError:
            continue
        seen += 1
        yield path, st
        if stat.S_ISDIR(st.st_mode):
            try:
                stack.extend(os.path.join(path, name) for name in os.listdir(path))
            except OSError:
                continue


def _plan_cores(config: PoolConfig, on_neuron: bool, info: Any) -> list[int | None]:
    """One slot per worker; on neuron each slot owns one NeuronCore."""
    if not on_neuron:
        return [None] * (config.pool_size or 2)
    cores = list(config.neuron_cores or ())
    if not cores and info is not None:
        cores = list(range(info.core_count))
    cores = cores or [0]
    return cores[: config.pool_size] if config.pool_size else cores


def _job_groups(config: PoolConfig, on_neuron: bool) -> tuple[int, ...]:
    """Supplementary gids of the job uids: the configured groups; by default on neuron,
    the group that owns the Neuron devices (when it is not root's)."""
    gids = []
    for name in config.job_groups:
        try:
            gids.append(int(name) if name.isdigit() else grp.getgrnam(name).gr_gid)
        except KeyError:
            raise ConfigError(f"{label(PoolConfig, 'job_groups')}: no group {name!r}") from None
    if not gids and on_neuron:
        nodes = neuron.device_paths()
        if nodes and os.stat(nodes[0]).st_gid != 0:
            gids.append(os.stat(nodes[0]).st_gid)
    return tuple(gids)
