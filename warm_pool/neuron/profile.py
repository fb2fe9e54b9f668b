"""A job's Neuron profile: the runtime settings that capture it, what is kept, its Perfetto form.

The settings come from the Neuron Profiler 2.0 User Guide
(tools/profiler/neuron-profiler-2-0-beta-user-guide.rst, "Profile Capture Environment
Variables"; Neuron Explorer's "Environment Variables" page,
tools/neuron-explorer/environment-variables.rst, lists the same names). The runtime reads
them when it starts in a process ("set them before the workload starts"), so they must be
in the environment before the process opens its NeuronCore:

- ``NEURON_RT_INSPECT_ENABLE=1``: capture; a system profile by default (the runtime's API
  calls and executions, host CPU and memory);
- ``NEURON_RT_INSPECT_OUTPUT_DIR``: where it writes (default ``./output``);
- ``NEURON_RT_INSPECT_DEVICE_PROFILE=1``: device profiles as well, of the first execution of
  each compiled graph (NEFF) on each NeuronCore.

What the runtime writes (the guide's "neuron-profile inspect Output"): a directory per
process, ``<instance id>_pid_<pid>/``, with the system profile (``ntrace.pb``,
``trace_info.pb``, ``cpu_util.pb``, ``host_mem.pb``) and the device profiles
(``neff_<id>.neff`` and ``<id>_instid_0_vnc_<core>.ntff``); Neuron Explorer's "profile
files" page adds ``trace.json``. `PATTERNS` keeps all of these.

Perfetto (the guide's "Viewing Profiles with Perfetto"): ``neuron-profile view -d <dir>
--output-format perfetto`` writes ``system_profile.pftrace`` and one
``device_profile_model_<id>.pftrace`` per compiled graph, for https://ui.perfetto.dev/.
``neuron-profile`` comes with aws-neuronx-tools (``/opt/aws/neuron/bin``). It runs after
the job, on the service's own copies of the files (every process of the job is gone, and
the copies passed warm_pool.artifacts' checks), in a directory of the service's, with an
environment that holds nothing of the service's, for at most a bounded time; its absence
or failure is reported in the result, never fatal.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import shutil
import signal
import subprocess
import tempfile
from dataclasses import dataclass, field

from warm_pool import artifacts
from warm_pool.artifacts import Artifact
from warm_pool.neuron.devices import find_tool

# Every variable of the runtime's profiler starts so; the pool owns them (job_env refuses them).
ENV_PREFIX = "NEURON_RT_INSPECT_"
# The runtime's output dir in a profiled job's dir, and the artifacts' prefix.
OUTPUT_DIR = "neuron-profile"
# Where the Perfetto traces go below it.
PERFETTO_DIR = "perfetto"
# The files of a capture (see the module docstring).
PATTERNS = ("*.ntff", "*.neff", "*.pb", "*.json")
TOOL = "neuron-profile"
_TRACE_SUFFIX = ".pftrace"
_WORK = ".perfetto-work"  # hidden: never an artifact's name
_TAIL_CHARS = 300


def capture_env(output_dir: str, device: bool = True) -> dict[str, str]:
    """The runtime's variables that capture a profile into `output_dir` (device profiles
    too when `device`); in the environment before the runtime starts."""
    env = {"NEURON_RT_INSPECT_ENABLE": "1", "NEURON_RT_INSPECT_OUTPUT_DIR": output_dir}
    if device:
        env["NEURON_RT_INSPECT_DEVICE_PROFILE"] = "1"
    return env


def unavailable(backend: str | None, one_job: bool) -> str | None:
    """Why a job of this pool cannot have a profile, or None when it can."""
    if backend != "neuron":
        return (f"the pool's backend is {backend or 'not known yet'}: a profile is the Neuron runtime's, "
                "which only the neuron backend starts")
    if not one_job:
        return ("the reuse mode (reuse_workers) starts a process's Neuron runtime once for many jobs; a "
                "profile needs a process whose runtime starts for the job")
    return None


@dataclass
class Kept:
    """What became of a captured profile: its status word, why, and the artifacts it added."""

    status: str                                    # captured | failed
    detail: str
    artifacts: list[Artifact] = field(default_factory=list)
    skipped: list[dict[str, str]] = field(default_factory=list)


def keep(profile_dir: str, dest: str, owner: int, cap_bytes: int, convert_timeout: float) -> Kept:
    """Copy what the runtime wrote into `profile_dir` (a job's) to `dest`, as artifacts
    named ``neuron-profile/...``, within `cap_bytes`; then add its Perfetto form."""
    if cap_bytes <= 0:
        return Kept("failed", "not kept: the job's other artifacts left no room within max_artifacts_mb")
    found, skipped = artifacts.collect(profile_dir, dest, owner, PATTERNS, cap_bytes)
    kept = [dataclasses.replace(a, name=f"{OUTPUT_DIR}/{a.name}") for a in found]
    skipped = [{**s, "name": f"{OUTPUT_DIR}/{s['name']}"} for s in skipped]
    if not kept:
        why = (f"none of it was kept ({skipped[0]['name']}: {skipped[0]['reason']})" if skipped else
               f"the Neuron runtime wrote no profile into {OUTPUT_DIR}/ (the job may have run nothing on "
               "its NeuronCore)")
        return Kept("failed", why, [], skipped)
    size = sum(a.size for a in kept)
    traces, trace_skipped, note = perfetto(dest, cap_bytes - size, convert_timeout)
    detail = f"{len(kept)} files ({size / 1048576:.1f} MiB) kept as artifacts under {OUTPUT_DIR}/; {note}"
    return Kept("captured", detail, kept + traces, skipped + trace_skipped)


Skipped = list[dict[str, str]]


def perfetto(copy_dir: str, cap_bytes: int, timeout: float) -> tuple[list[Artifact], Skipped, str]:
    """Convert the kept copy of a profile (`copy_dir`, the service's) for Perfetto: the
    traces kept (``neuron-profile/perfetto/<name>``, within `cap_bytes`), those not kept,
    and a sentence saying what happened."""
    if timeout <= 0:
        return [], [], "not converted for Perfetto (neuron_profile_convert_timeout is 0)"
    tool = find_tool(TOOL)
    if tool is None:
        return [], [], f"not converted for Perfetto: {TOOL} is not installed (aws-neuronx-tools)"
    work = os.path.join(os.path.dirname(copy_dir), _WORK)
    shutil.rmtree(work, ignore_errors=True)
    os.mkdir(work, 0o700)
    try:
        error = _run(tool, copy_dir, work, timeout)
        made = _traces(work) + _traces(copy_dir)  # some builds write beside their inputs
        if error is not None:
            return [], [], f"not converted for Perfetto: {error}"
        if not made:
            return [], [], f"not converted for Perfetto: {TOOL} view wrote no {_TRACE_SUFFIX} file"
        return _keep_traces(made, os.path.join(copy_dir, PERFETTO_DIR), cap_bytes)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _run(tool: str, source: str, cwd: str, timeout: float) -> str | None:
    """Run ``neuron-profile view`` on `source` in `cwd`; None when it succeeded, else why not."""
    env = {"PATH": os.environ.get("PATH", os.defpath), "HOME": cwd, "TMPDIR": cwd, "LC_ALL": "C.UTF-8"}
    command = [tool, "view", "-d", source, "--output-format", "perfetto"]
    with tempfile.TemporaryFile(dir=cwd) as log:
        try:
            proc = subprocess.Popen(command, cwd=cwd, env=env, stdin=subprocess.DEVNULL, stdout=log,
                                    stderr=log, start_new_session=True)
        except OSError as exc:
            return f"{TOOL} could not be started: {exc.strerror or exc}"
        try:
            status = proc.wait(timeout)
        except subprocess.TimeoutExpired:
            _kill_group(proc)
            return f"{TOOL} view was stopped after {timeout:g} s (neuron_profile_convert_timeout)"
        if status != 0:
            return f"{TOOL} view exited with status {status}: {_tail(log)}"
    return None


def _kill_group(proc: subprocess.Popen) -> None:
    """SIGKILL the tool and whatever it started (its own session), then reap it."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait()


def _tail(log) -> str:
    """The end of what the tool printed, as one printable line."""
    log.seek(0, os.SEEK_END)
    log.seek(max(0, log.tell() - 4 * _TAIL_CHARS))
    text = " ".join(log.read().decode("utf-8", "replace").split())
    return artifacts.printable(text[-_TAIL_CHARS:]) or "(it printed nothing)"


def _traces(root: str) -> list[str]:
    """The Perfetto traces below `root` (regular files, links not followed)."""
    found = []
    for folder, dirs, files in os.walk(root):
        dirs[:] = [d for d in dirs if d != PERFETTO_DIR or folder != root]
        for name in files:
            path = os.path.join(folder, name)
            if name.endswith(_TRACE_SUFFIX) and os.path.isfile(path) and not os.path.islink(path):
                found.append(path)
    return found


def _keep_traces(paths: list[str], dest: str, cap_bytes: int) -> tuple[list[Artifact], Skipped, str]:
    """Move the traces into `dest`, smallest first within `cap_bytes`; the rest are removed."""
    kept: list[Artifact] = []
    skipped: list[dict[str, str]] = []
    for path in sorted(paths, key=lambda p: (os.path.getsize(p), p)):
        name = os.path.basename(path)
        size = os.path.getsize(path)
        label = f"{OUTPUT_DIR}/{PERFETTO_DIR}/{name}"
        if not artifacts.valid_name(name) or any(a.name == label for a in kept):
            skipped.append({"name": artifacts.printable(label), "reason": "unsafe or repeated name"})
        elif size > cap_bytes - sum(a.size for a in kept):
            skipped.append({"name": label, "reason": f"over max_artifacts_mb ({size} bytes)"})
        else:
            os.makedirs(dest, mode=0o700, exist_ok=True)
            os.replace(path, os.path.join(dest, name))
            kept.append(Artifact(label, size, _sha256(os.path.join(dest, name))))
            continue
        os.unlink(path)
    if not kept:
        return [], skipped, "converted for Perfetto, but no trace was kept: " + skipped[0]["reason"]
    return kept, skipped, "converted for Perfetto: " + ", ".join(a.name for a in kept)


def _sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()
