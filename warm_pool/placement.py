"""Where each worker slot runs and as whom: its NeuronCore, its uid, its environment.

`Placement.plan(config)` decides once, before anything starts:

- the slots: one per worker; on neuron each owns one NeuronCore;
- the isolation: "uid" (slot k runs as uid and gid ``job_uid_base + k``) when this
  process may switch uids, else "none" (jobs keep the service's uid: for development
  only; a warning says so once);
- the confinement every worker gets (sandbox.py) and the paths a job uid must reach;
- the files' ownership: the work dir and the jobs dir traversable but not listable by
  job uids, each job's dir handed to its slot's uid when the job starts (`hand_over`),
  the capture files and the job store closed to them;
- each slot's temporary directory (a job's TMPDIR): ``<work_dir>/tmp/<slot>``, emptied
  before every job. It is not inside the job's own dir because its path must stay short:
  programs put AF_UNIX sockets there (multiprocessing's resource sharer, which a
  DataLoader with workers uses), and a socket path may not exceed 107 bytes.
"""

from __future__ import annotations

import grp
import logging
import os
import shutil
import sys
import sysconfig
from dataclasses import dataclass, field
from typing import Any

from warm_pool import sandbox
from warm_pool.config import PoolConfig
from warm_pool.settings import ConfigError

log = logging.getLogger("warm_pool")

_MIB = 1024 * 1024
# Longest path of an AF_UNIX socket (sun_path is 108 bytes with its NUL), and what
# programs add below TMPDIR for theirs (multiprocessing: /pymp-XXXXXXXX/listener-XXXXXXXX).
_SOCKET_PATH_MAX = 107
_SOCKET_SUFFIX = 32


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

    @classmethod
    def plan(cls, config: PoolConfig) -> Placement:
        """Decide cores, isolation and groups; ConfigError when isolation "uid" is impossible."""
        neuron_info = None
        if config.backend in ("neuron", "auto"):
            from warm_pool import neuron

            neuron_info = neuron.detect()
        # auto becomes neuron only if the template then imports torch_neuronx too.
        on_neuron = config.backend == "neuron" or bool(
            config.backend == "auto" and neuron_info and neuron_info.available)
        possible, missing = sandbox.can_switch_uids()
        isolation = config.isolation
        if isolation == "uid" and not possible:
            raise ConfigError(f"isolation (--isolation / EXECUTOR_ISOLATION) uid needs root or the "
                              f"capabilities {', '.join(missing)}")
        if isolation == "auto":
            isolation = "uid" if possible else "none"
            if not possible:
                log.warning("jobs run under the service's own uid (isolation none): for development "
                            "only; run as root or grant %s to confine them", ", ".join(missing))
        placement = cls(config, _plan_cores(config, on_neuron, neuron_info), isolation, on_neuron,
                        neuron_info, _job_groups(config, on_neuron), sandbox.landlock_abi())
        longest = placement.tmp_dir(len(placement.cores) - 1)
        if len(longest) + _SOCKET_SUFFIX > _SOCKET_PATH_MAX:
            raise ConfigError(f"work_dir (--work-dir / EXECUTOR_WORK_DIR) {config.work_dir} is too long: "
                              f"jobs' temporary sockets ({longest}/...) would not fit the "
                              f"{_SOCKET_PATH_MAX}-byte limit of AF_UNIX socket paths")
        return placement

    # --- identity and confinement ---------------------------------------------------------

    def uid(self, slot: int) -> int | None:
        """The uid (and gid) of a slot's worker and jobs; None under isolation none."""
        return self.config.job_uid_base + slot if self.isolation == "uid" else None

    @property
    def output_limit_bytes(self) -> int:
        return self.config.output_limit_mb * _MIB

    def tmp_dir(self, slot: int) -> str:
        """A slot's temporary directory: the TMPDIR of the jobs it runs."""
        return os.path.join(self.config.work_dir, "tmp", str(slot))

    def writable(self) -> tuple[str, ...]:
        """Trees where jobs may create files (their own dir there, by permissions)."""
        trees = [str(self.config.jobs_dir), os.path.join(self.config.work_dir, "tmp"), "/dev/shm"]
        if self.neuron:
            trees.append(str(self.config.compile_cache_dir))
        return tuple(trees)

    def confinement_settings(self) -> dict[str, Any]:
        """What the template needs to build each worker's sandbox.Confinement."""
        return {"uid_base": self.config.job_uid_base if self.isolation == "uid" else None,
                "groups": list(self.groups), "writable": list(self.writable()),
                "max_file_bytes": self.config.max_disk_mb * _MIB}

    def needed_paths(self) -> tuple[str, ...]:
        """What a job's uid must be able to reach: the interpreter's libraries, the jobs dir."""
        paths = {sysconfig.get_paths()["stdlib"], sysconfig.get_paths()["purelib"], sys.prefix,
                 str(self.config.jobs_dir)}
        return tuple(sorted(paths))

    def describe(self) -> dict[str, Any]:
        """For /health: how jobs are isolated."""
        out: dict[str, Any] = {"isolation": self.isolation,
                               "landlock_abi": self.landlock_abi or None}
        if self.isolation == "uid":
            first = self.config.job_uid_base
            out["job_uids"] = f"{first}-{first + len(self.cores) - 1}"
            out["job_groups"] = list(self.groups)
        return out

    # --- files ----------------------------------------------------------------------------

    def claim(self) -> None:
        """Take the slots' uids for this pool, and end what a previous holder left running
        (jobs of a service that was killed); ConfigError if a live pool holds them."""
        if self.isolation != "uid":
            return
        first = self.config.job_uid_base
        try:
            self.uid_claims = sandbox.claim_uids(range(first, first + len(self.cores)))
        except sandbox.ConfinementError as exc:
            raise ConfigError(f"job_uid_base (--job-uid-base / EXECUTOR_JOB_UID_BASE) {first}: {exc}; "
                              "give each pool on this machine its own range") from None
        for slot in range(len(self.cores)):
            sandbox.kill_uid(self.uid(slot))

    def release(self) -> None:
        """Give the uids back (the pool has shut down and nothing of theirs runs)."""
        for sock in self.uid_claims:
            sock.close()
        self.uid_claims = []

    def prepare_dirs(self) -> None:
        """Create the work dir's layout with the modes isolation needs."""
        work, jobs = self.config.work_dir, self.config.jobs_dir
        capture, tmp = os.path.join(work, "capture"), os.path.join(work, "tmp")
        for path in (work, jobs, capture, tmp):
            os.makedirs(path, exist_ok=True)
        os.chmod(capture, 0o700)
        if self.isolation == "uid":
            # Job uids must traverse to their own dir, but not list anyone's.
            for path in (work, jobs, tmp):
                os.chmod(path, 0o711)
        if self.neuron:
            self._prepare_compile_cache()

    def _prepare_compile_cache(self) -> None:
        """The one directory every job shares: group-writable by the job uids' group."""
        from warm_pool import neuron

        cache = self.config.compile_cache_dir
        os.makedirs(cache, exist_ok=True)
        if self.isolation == "uid" and self.groups:
            os.chown(cache, -1, self.groups[0])
            os.chmod(cache, 0o2770)
        neuron.clear_stale_locks(cache)
        if self.config.neuron_cache_max_mb:
            neuron.prune_cache(cache, self.config.neuron_cache_max_mb * _MIB)

    def hand_over(self, job_dir: str, tmp_dir: str, main_path: str, uid: int | None) -> None:
        """Give a job's dir and a fresh temporary dir to the slot that runs it: the job owns
        them, the service's group can still read and remove them (setgid), no other slot
        can enter them."""
        shutil.rmtree(tmp_dir, ignore_errors=True)
        os.mkdir(tmp_dir, 0o700)
        if uid is None:
            return
        for path in (job_dir, main_path, tmp_dir):
            os.chown(path, uid, self.service_gid)
        os.chmod(job_dir, 0o2770)

    # --- environment ----------------------------------------------------------------------

    def template_env(self) -> dict[str, str]:
        return self.config.template_env(neuron=self.neuron)

    def worker_env(self, worker_id: int, core: int | None, backend: str | None) -> dict[str, str]:
        """Per-worker environment: intra-op threads; on neuron, its one NeuronCore."""
        env = {"MPLBACKEND": "Agg"}
        threads = self.config.threads_per_worker
        if threads is None and "OMP_NUM_THREADS" not in os.environ:  # an operator's choice wins
            threads = max(1, (os.cpu_count() or 1) // len(self.cores))
        if threads:
            env.update(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
        if backend == "neuron" and core is not None:
            from warm_pool import neuron

            env.update(neuron.worker_env(core, tag=f"trainium-executor-w{worker_id}",
                                         log_level=self.config.neuron_log_level))
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
        from warm_pool import neuron

        tracker = neuron.PeakTracker(core, self.config.neuron_sysfs_root, self.cores_per_device)
        tracker.start()
        return tracker

    def device_memory_growing(self, worker: Any) -> bool:
        """True when a worker's idle NeuronCore memory grew after several jobs in a row."""
        if not self.neuron or worker.core is None or not self.config.neuron_idle_growth_jobs:
            return False
        from warm_pool import neuron

        mem = neuron.core_memory(worker.core, self.config.neuron_sysfs_root, self.cores_per_device)
        if mem is None:
            return False
        if worker.growth is None:
            worker.growth = neuron.IdleGrowth(jobs=self.config.neuron_idle_growth_jobs)
        return worker.growth.observe(mem.used_bytes)


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
            raise ConfigError(f"job_groups (--job-groups / EXECUTOR_JOB_GROUPS): no group {name!r}") from None
    if not gids and on_neuron:
        from warm_pool import neuron

        nodes = neuron.device_paths()
        if nodes and os.stat(nodes[0]).st_gid != 0:
            gids.append(os.stat(nodes[0]).st_gid)
    return tuple(gids)
