"""What the operator adds to every job's environment, and where Hugging Face keeps its files.

Operator variables (`--job-env NAME=VALUE`, `--job-env-file PATH`) are for settings a
script reads, such as ``HF_TOKEN`` or ``NEURON_RT_LOG_LEVEL``. Every job can read them,
so they hold nothing of the service's own. Names the pool sets itself are refused at
start (`owner`): a job's paths, its interpreter, its threads, its NeuronCore, and the
service's own variables, which the pool keeps from jobs.

They go into the template's environment, not only the workers': libraries read some
variables once, when they are imported, and the template imports them before any job
(huggingface_hub reads ``HF_HUB_OFFLINE`` and ``HF_ENDPOINT`` at import, datasets its
offline flag). A job then sees what a cold ``python main.py`` with that environment
would see.

Hugging Face (`hf_env`). huggingface_hub, datasets and transformers compute their cache
paths once, at import: ``HF_HOME`` (default ``$XDG_CACHE_HOME/huggingface``, else
``~/.cache/huggingface``), and from it the hub cache, the token file, the xet cache,
datasets' cache and transformers' modules cache. Imported in the template, they would
all point below the service's home for every job, although each job's ``HOME`` is its
own dir: a job would write into the service's home, or fail to. So the pool sets
``HF_HOME`` to a *relative* path, ``.cache/huggingface``: the paths the template
computes stay relative, and resolve against the job's cwd, its own dir, when the job
uses them (as ``~/.cache/huggingface`` would for a cold run with ``HOME`` there).

With an operator cache (`--hf-home`), ``HF_HOME`` is that directory, which jobs can
read and not change, and jobs are offline (``HF_HUB_OFFLINE=1``, unless the operator's
job environment sets it): a model is read from the cache as it is, never half-updated
in a directory jobs cannot write. What jobs write (datasets' prepared data, the
modules of remote code, the xet and assets caches) stays in their own dir.
"""

from __future__ import annotations

import re
from pathlib import Path

from warm_pool.neuron.profile import ENV_PREFIX as NEURON_PROFILE_PREFIX
from warm_pool.neuron.runtime_env import LOG_LEVELS as NEURON_LOG_LEVELS
from warm_pool.settings import ConfigError

# The user name jobs see (USER, LOGNAME) when they run under a job uid, which has no passwd entry.
JOB_USER = "trainium-job"

# Below each job's own dir (its cwd when it starts): hidden, so never kept as an artifact.
JOB_HF_HOME = ".cache/huggingface"

# The caches a job writes to; with an operator cache, they stay in the job's dir.
_JOB_CACHES = {"HF_DATASETS_CACHE": "datasets", "HF_MODULES_CACHE": "modules", "HF_XET_CACHE": "xet",
               "HF_ASSETS_CACHE": "assets"}

# Where Hugging Face libraries look for files (the pool decides, see above): an inherited
# value is dropped from the template's environment, and --job-env refuses them.
HF_LOCATIONS = ("HF_HOME", "HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE", "TRANSFORMERS_CACHE",
                "HF_DATASETS_CACHE", "HF_MODULES_CACHE", "HF_XET_CACHE", "HF_ASSETS_CACHE",
                "HUGGINGFACE_ASSETS_CACHE", "HF_TOKEN_PATH", "HF_STORED_TOKENS_PATH", "XDG_CACHE_HOME")
# The service's own Hugging Face token is not passed on: a job's comes from --job-env.
HF_TOKENS = ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN")

# Names the pool owns: for each, the setting that governs it instead.
OWNED = {
    "PATH": None, "HOME": None, "TMPDIR": None, "PWD": None, "USER": None, "LOGNAME": None,
    "DATASET_CACHE_DIR": "--datasets-dir",
    "MPLBACKEND": None, "MPLCONFIGDIR": None,
    "OMP_NUM_THREADS": "--threads-per-worker", "MKL_NUM_THREADS": "--threads-per-worker",
    "OPENBLAS_NUM_THREADS": "--threads-per-worker", "RAYON_NUM_THREADS": "--threads-per-worker",
    "NEURON_RT_VISIBLE_CORES": "--neuron-cores", "NEURON_RT_NUM_CORES": "--neuron-cores",
    "NEURON_PROCESS_TAG": None, "PJRT_DEVICE": "--backend",
    "NEURON_COMPILE_CACHE_URL": "--neuron-cache-dir",
    "NEURON_CC_FLAGS": "the service's own environment (the pool adds its flags to it)",
    **dict.fromkeys(HF_LOCATIONS, "--hf-home"),
}
OWNED_PREFIXES = {"LD_": None, "PYTHON": None, "EXECUTOR_": None, "AWS_": None,
                  NEURON_PROFILE_PREFIX: 'a job\'s "profile": true (and --profile-jobs)'}

_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


def owner(name: str) -> str | None:
    """Why the pool keeps `name` for itself (and what to use instead), or None if it is free."""
    if name in OWNED:
        instead = OWNED[name]
    else:
        prefix = next((p for p in OWNED_PREFIXES if name.startswith(p)), None)
        if prefix is None:
            return None
        instead = OWNED_PREFIXES[prefix]
    why = f"{name} is set by the pool for every job"
    return f"{why}; use {instead}" if instead else why


def parse(entries: tuple[str, ...], file: Path | None = None,
          labels: tuple[str, str] = ("job_env", "job_env_file")) -> dict[str, str]:
    """The operator's variables: the file's lines first, then `entries` (which win).

    Each is NAME=VALUE, the value taken as it is (no quotes removed); in the file, blank
    lines and lines starting with # are skipped. ConfigError names the setting (`labels`:
    the entries' and the file's, as PoolConfig labels them) and the entry, never its
    value (it may be a token).
    """
    entries_label, file_label = labels
    env: dict[str, str] = {}
    if file is not None:
        try:
            text = Path(file).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else exc
            raise ConfigError(f"{file_label} {file}: {reason}") from None
        for number, line in enumerate(text.splitlines(), 1):
            if line.strip() and not line.lstrip().startswith("#"):
                _add(env, line, f"{file_label} {file} line {number}")
    for number, entry in enumerate(entries, 1):
        _add(env, entry, f"{entries_label} entry {number}")
    return env


def _add(env: dict[str, str], entry: str, where: str) -> None:
    name, sep, value = entry.partition("=")
    name = name.strip()
    if not sep:
        raise ConfigError(f"{where} is not NAME=VALUE (no '=')")
    if not _NAME.match(name):
        raise ConfigError(f"{where}: {name[:64]!r} is not a variable name (letters, digits and _, "
                          "not starting with a digit)")
    why = owner(name)
    if why:
        raise ConfigError(f"{where}: {why}")
    if "\0" in value:
        raise ConfigError(f"{where}: the value of {name} holds a NUL byte")
    if name == "NEURON_RT_LOG_LEVEL" and value.upper() not in NEURON_LOG_LEVELS:
        raise ConfigError(f"{where}: NEURON_RT_LOG_LEVEL must be one of {', '.join(NEURON_LOG_LEVELS)}")
    env[name] = value


def hf_env(hf_home: Path | None, operator: dict[str, str]) -> dict[str, str]:
    """Hugging Face's variables for every job (see the module docstring)."""
    if hf_home is None:
        return {"HF_HOME": JOB_HF_HOME}
    env = {"HF_HOME": str(hf_home), "HF_HUB_OFFLINE": operator.get("HF_HUB_OFFLINE", "1")}
    env.update({name: f"{JOB_HF_HOME}/{sub}" for name, sub in _JOB_CACHES.items()})
    return env


def inherited_to_drop() -> tuple[str, ...]:
    """Variables of the service's own environment that never reach the template or a job."""
    return HF_LOCATIONS + HF_TOKENS
