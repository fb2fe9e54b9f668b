"""The template's optional preloads: what generated scripts import beyond the backend.

The backend's own modules (torch, torch_xla, torch_neuronx) must import or the pool is
broken. The optional ones (the `preload` setting: numpy, tqdm, matplotlib.pyplot,
torchvision, pandas, sklearn, transformers, datasets by default) are a speed-up: a job importing
a module the template already holds pays nothing and leaves its worker clean, while a
module first imported by a job makes the worker dirty (replaced). So an optional
module that is not installed, fails to import or is unsafe to fork is skipped and
reported (/health: pool.preload_skipped), never breaking the pool.

For each module `load` also imports its companions (`COMPANIONS`: what its common calls
import later, e.g. DataFrame.to_csv pandas' CSV writer, from_pretrained transformers'
PreTrainedModel) and runs its warm-up (`WARM_UPS`: a figure drawn and saved once fills
matplotlib's lazy caches, transformers' lazy names are looked up once; a job would
otherwise fill them itself, looking like a patch to the fingerprint). Warm-ups are
pure Python and C on the CPU: no thread, no device, no torch operation.

Fork safety: a Python thread started in the template would not exist in its workers
(fork copies only the calling thread) while the locks it held stay held. After each
module (and its warm-up) the Python threads must be back to what they were within
`SETTLE_S` (matplotlib's font-cache warning timer is cancelled when the cache is
built); otherwise `ThreadStarted` is raised and the template starts over without that
module. Native threads (/proc/self/task) are counted and reported, not refused:
OpenBLAS starts its pool when numpy or scipy load and shuts it down itself before a
fork (pthread_atfork), and a module's OpenMP pool starts only when first used.
"""

from __future__ import annotations

import importlib
import importlib.util
import io
import os
import sys
import threading
import time
import traceback
from dataclasses import dataclass, field

SETTLE_S = 2.0

# Module -> modules its common use imports later (imported with it when present).
COMPANIONS: dict[str, tuple[str, ...]] = {
    "torch": ("torch.utils.serialization",),  # torch.save / torch.load of a checkpoint
    "tqdm": ("tqdm.auto",),
    "matplotlib.pyplot": ("matplotlib.backends.backend_agg",),  # MPLBACKEND=Agg for jobs
    "pandas": ("pandas.io.formats.csvs", "pandas.io.formats.string"),  # to_csv, to_string
    "sklearn": ("sklearn.metrics", "sklearn.model_selection", "sklearn.preprocessing"),
    "torchvision": ("PIL.Image",),  # torchvision.utils.save_image
    # Any model built or loaded (from_pretrained, or from a config) imports PreTrainedModel's
    # module, ~1,000 modules and ~4 s cold; BERT is the family paper scripts use most.
    "transformers": ("transformers.models.auto.tokenization_auto", "transformers.models.auto.modeling_auto",
                     "transformers.modeling_utils", "transformers.models.bert.modeling_bert",
                     "transformers.models.bert.tokenization_bert"),
    "datasets": ("scipy.io",),  # each load_dataset builder patches scipy.io.loadmat (streaming)
}

# Companion -> a module it imports that a backend leaves out on purpose: the companion is
# preloaded only where that module is loaded already or not installed. transformers'
# modeling imports accelerate, which imports torch_xla when it is installed; and importing
# torch_xla changes torch for every job (it replaces torch.nn.utils.clip_grad_norm_ and
# sets PJRT_DEVICE and XLA_FLAGS), which on the cpu backend only a job using a model
# should see.
ONLY_WITH = {"transformers.modeling_utils": "torch_xla",
             "transformers.models.bert.modeling_bert": "torch_xla"}


class ThreadStarted(RuntimeError):
    """Importing (or warming up) `module` left a Python thread running in the template."""

    def __init__(self, module: str, threads: list[str]):
        super().__init__(f"started threads at import: {', '.join(threads)[:200]}")
        self.module = module


def _warm_matplotlib() -> None:
    """Draw and save one figure: resolves the backend (Agg) and fills the caches a first
    plot fills (unit paths, fonts, Pillow's image plugins), then closes it."""
    pyplot = sys.modules["matplotlib.pyplot"]
    fig, ax = pyplot.subplots(figsize=(2, 2))
    ax.plot([0, 1], [1, 0], marker="o", label="a")
    ax.scatter([0.5], [0.5])
    ax.bar([0], [1])
    ax.imshow([[0.0, 1.0], [1.0, 0.0]])
    ax.set_title("t")
    ax.set_xlabel("x")
    ax.legend()
    fig.tight_layout()
    fig.savefig(io.BytesIO(), format="png", dpi=20)
    pyplot.close("all")


def _warm_pil() -> None:
    """Pillow's common image plugins, which its first save or open imports."""
    sys.modules["PIL.Image"].preinit()


# What scripts take from transformers' top level. It is a lazy module: the first lookup of
# a name imports its submodule and stores the name in the package, which a job doing it
# would do too, looking like a patch to the fingerprint.
TRANSFORMERS_NAMES = ("AutoConfig", "AutoModel", "AutoTokenizer", "AutoModelForSequenceClassification",
                      "PreTrainedTokenizerBase")


def _warm_transformers() -> None:
    """Resolve the names scripts import from transformers (no model is built: no torch op)."""
    package = sys.modules["transformers"]
    for name in TRANSFORMERS_NAMES:
        getattr(package, name)


WARM_UPS = {"matplotlib.pyplot": _warm_matplotlib, "PIL.Image": _warm_pil, "transformers": _warm_transformers}


@dataclass
class Preloaded:
    """What `load` did: modules imported, modules skipped (with why), native threads added."""

    imported: list[str] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)
    native_threads: dict[str, int] = field(default_factory=dict)


def load(names: list[str], skip: dict[str, str] | None = None, settle: float = SETTLE_S) -> Preloaded:
    """Import each module (and its companions and warm-up) unless skipped; raise
    ThreadStarted when one leaves a Python thread behind."""
    done = Preloaded(skipped=dict(skip or {}))
    for name in names:
        if name in done.skipped:
            continue
        for module in (name, *COMPANIONS.get(name, ())):
            if module in done.imported or module in done.skipped:
                continue
            reason = _left_out(module) or _load_one(module, done, settle)
            if reason is not None:
                done.skipped[module] = reason
                if module == name:
                    break  # its companions are its own business
            else:
                done.imported.append(module)
    return done


def _left_out(module: str) -> str | None:
    """Why a companion is not preloaded here (ONLY_WITH), or None."""
    needs = ONLY_WITH.get(module)
    if needs is None or needs in sys.modules or importlib.util.find_spec(needs) is None:
        return None
    return f"would import {needs}, which this backend does not preload"


def _load_one(module: str, done: Preloaded, settle: float) -> str | None:
    """Import and warm up one module; the reason it is skipped, or None."""
    python_before = set(threading.enumerate())
    native_before = native_thread_count()
    try:
        importlib.import_module(module)
        warm_up = WARM_UPS.get(module)
        if warm_up is not None:
            warm_up()
    except ModuleNotFoundError as exc:
        if exc.name and (module == exc.name or module.startswith(exc.name + ".")):
            return "not installed"
        return _failure()
    except BaseException:  # noqa: BLE001 - an optional module: skipped, never fatal
        return _failure()
    left = _settled(python_before, settle)
    if left:
        raise ThreadStarted(module, left)
    added = native_thread_count() - native_before
    if added > 0:
        done.native_threads[module] = added
    return None


def _failure() -> str:
    lines = traceback.format_exc().strip().splitlines()
    return f"import failed: {lines[-1] if lines else 'unknown error'}"[:500]


def _settled(before: set[threading.Thread], settle: float) -> list[str]:
    """Names of Python threads started since `before` that are still alive after `settle` s."""
    deadline = time.monotonic() + settle
    while True:
        extra = [t for t in threading.enumerate() if t not in before and t.is_alive()]
        if not extra or time.monotonic() >= deadline:
            return [t.name for t in extra]
        time.sleep(0.01)


def native_thread_count() -> int:
    """Threads of this process as the kernel sees them (Python's and native ones)."""
    try:
        return len(os.listdir("/proc/self/task"))
    except OSError:
        return threading.active_count()
