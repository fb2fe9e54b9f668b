"""The job environment: common imports warm, helper modules and data sets at hand, the
files a script saves kept, and a realistic script's results the same as a cold run's."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from conftest import job_uid_base, reachable_by_jobs, start_pool
from realistic_scripts import ARTIFACTS, SCRIPTS, metrics_line, write_tiny_cache

from warm_pool import ConfigError, PoolConfig, WarmPool

pytestmark = pytest.mark.timeout(240)

OPERATOR_HELPER = ("VALUE = 'operator helper'\n\n"
                   "def seed_everything(seed):\n    import torch\n    torch.manual_seed(seed)\n")


@pytest.fixture(scope="module")
def shared(tmp_path_factory):
    base = reachable_by_jobs(tmp_path_factory.mktemp("env"))
    cache = write_tiny_cache(base / "datasets")
    helpers = base / "helpers"
    helpers.mkdir(mode=0o755)
    (helpers / "paper_utils.py").write_text(OPERATOR_HELPER)
    (helpers / "paper_utils.py").chmod(0o644)
    return base, cache, helpers


@pytest.fixture(scope="module")
def env_pool(shared):
    base, cache, helpers = shared
    handle = start_pool(base / "work", pool_size=1, datasets_dir=cache, job_path=(helpers,))
    yield handle
    handle.pool.shutdown(grace=5)


def _respawns(pool) -> int:
    return pool.pool.stats().to_json()["respawns"]["total"]


def test_common_imports_are_preloaded_and_missing_ones_reported(env_pool):
    stats = env_pool.pool.stats().to_json()
    for name in ("torch", "numpy", "tqdm", "matplotlib.pyplot", "torchvision", "pandas", "sklearn"):
        assert name in stats["preloaded"]
    assert stats["preloaded"][:2] == ["torch", "torch._dynamo"]  # the backend's own first
    try:
        import transformers  # noqa: F401
    except ImportError:
        assert stats["preload_skipped"]["transformers"] == "not installed"


@pytest.mark.parametrize("name", sorted(SCRIPTS))
def test_a_realistic_script_runs_warm_keeps_its_files_and_its_worker(env_pool, name):
    before = _respawns(env_pool)
    first = env_pool.run(SCRIPTS[name], timeout=120)
    assert first.success, first.stderr[-3000:]
    assert {a.name for a in first.artifacts} == ARTIFACTS[name]
    assert first.artifacts_skipped == []
    again = env_pool.run(SCRIPTS[name], timeout=120)
    assert again.stdout == first.stdout
    assert _respawns(env_pool) == before, env_pool.pool.stats().respawns_recent


_TQDM_BAR = re.compile(r"\d+%\|")


def _without_progress_bars(text: str) -> list[str]:
    return [piece for piece in re.split(r"[\r\n]", text) if piece.strip() and not _TQDM_BAR.search(piece)]


def _cold(pool: WarmPool, code: str, job: Path) -> subprocess.CompletedProcess:
    """`python main.py` in a fresh interpreter with the environment a job gets."""
    job.mkdir()
    (job / "main.py").write_text(code)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("EXECUTOR_", "AWS_"))}
    env.update(pool.placement.worker_env(0, None, "cpu"))
    env.update(HOME=str(job), MPLCONFIGDIR=str(pool.config.matplotlib_dir))
    return subprocess.run([sys.executable, "main.py"], cwd=job, env=env, capture_output=True, text=True,
                          timeout=180, stdin=subprocess.DEVNULL)


@pytest.mark.parametrize("name", sorted(SCRIPTS))
def test_a_realistic_script_gives_what_a_cold_python_main_py_gives(env_pool, name, tmp_path):
    warm = env_pool.run(SCRIPTS[name], timeout=120, job_id=f"parity-{name}")
    cold = _cold(env_pool.pool, SCRIPTS[name], tmp_path / "cold")
    assert cold.returncode == warm.return_code == 0, cold.stderr[-3000:]
    assert warm.stdout == cold.stdout
    assert metrics_line(warm.stdout)
    assert _without_progress_bars(warm.stderr) == _without_progress_bars(cold.stderr)
    kept = env_pool.pool.config.artifacts_dir / f"parity-{name}"
    for artifact in ARTIFACTS[name]:
        ours, theirs = kept / artifact, tmp_path / "cold" / artifact
        if artifact.endswith((".pt", ".pth")):
            a, b = torch.load(ours, weights_only=True), torch.load(theirs, weights_only=True)
            a, b = (a["model"], b["model"]) if "model" in a else (a, b)
            assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), artifact
        else:
            assert ours.read_bytes() == theirs.read_bytes(), artifact


def test_helper_modules_are_importable_and_the_jobs_own_wins(env_pool):
    result = env_pool.run(
        "import paper_utils, dataset_loader, os, sys\n"
        "print(paper_utils.VALUE, dataset_loader.__file__.endswith('job_helpers/dataset_loader.py'))\n"
        "print(sys.path[1:3] == os.environ['PYTHONPATH'].split(':')[:2])\n")
    assert result.stdout == "operator helper True\nTrue\n", result.stderr
    own = env_pool.run(
        "open('dataset_loader.py', 'w').write('def load_dataset(*a, **k):\\n    return \"mine\"\\n')\n"
        "from dataset_loader import load_dataset\nprint(load_dataset('cifar10'))\n")
    assert own.stdout == "mine\n", own.stderr


def test_a_helper_module_a_job_patched_is_fresh_for_the_next_job(env_pool):
    env_pool.run("import dataset_loader, paper_utils\n"
                 "dataset_loader.load_dataset = lambda *a, **k: 'poisoned'\npaper_utils.VALUE = 'poisoned'\n")
    after = env_pool.run("import sys\nprint('dataset_loader' in sys.modules, 'paper_utils' in sys.modules)\n"
                         "import dataset_loader, paper_utils\nprint(dataset_loader.load_dataset.__name__, "
                         "paper_utils.VALUE)\n")
    assert after.stdout == "False False\nload_dataset operator helper\n", after.stderr


def test_jobs_cannot_change_the_helpers_or_the_data_sets(env_pool, shared):
    _, cache, helpers = shared
    shipped = os.path.dirname(env_pool.pool.config.job_paths()[-1])
    code = textwrap.dedent(f"""
        import json, os
        attempts = {{
            "append helper": lambda: open({str(helpers / 'paper_utils.py')!r}, 'a').write('X = 1'),
            "new helper": lambda: open({str(helpers / 'dataset_loader.py')!r}, 'w').write('x'),
            "shipped helper": lambda: open({shipped + '/job_helpers/dataset_loader.py'!r}, 'a').write('x'),
            "overwrite data": lambda: open({str(cache / 'cifar10/cifar10_pytorch.pt')!r}, 'wb').write(b''),
            "rename data": lambda: os.rename({str(cache / 'mnist')!r}, {str(cache / 'mnist2')!r}),
            "new data set": lambda: os.mkdir({str(cache / 'cifar100')!r}),
        }}
        out = {{}}
        for name, attempt in attempts.items():
            try:
                attempt()
                out[name] = "done"
            except OSError as exc:
                out[name] = type(exc).__name__
        print(json.dumps(out))
    """)
    result = env_pool.run(code)
    outcomes = json.loads(result.stdout)
    assert set(outcomes.values()) == {"PermissionError"}, outcomes
    assert (helpers / "paper_utils.py").read_text() == OPERATOR_HELPER


def test_a_data_set_not_in_the_cache_is_an_error_naming_its_files(env_pool, shared):
    _, cache, _ = shared
    result = env_pool.run("from dataset_loader import load_dataset\nload_dataset('cifar100')\n")
    assert result.error_type == "exception"
    assert "DatasetNotCached" in result.stderr
    assert str(cache / "cifar100" / "cifar100_pytorch.pt") in result.stderr
    assert "trainium-executor datasets fetch cifar100" in result.stderr


def test_loaders_shape_the_cached_and_synthetic_sets(env_pool):
    code = textwrap.dedent("""
        from dataset_loader import load_dataset
        for name, kw in (("cifar10", {}), ("mnist", {"max_samples": 10}),
                         ("fashion_mnist", {"normalize": False}),
                         ("synthetic", {"input_dim": 5, "num_classes": 3, "num_samples": 50})):
            train, test = load_dataset(name, batch_size=8, **kw)
            x, y = next(iter(train))
            print(name, tuple(x.shape), str(x.dtype), str(y.dtype), len(train.dataset), len(test.dataset))
    """)
    result = env_pool.run(code)
    assert result.stdout.splitlines() == [
        "cifar10 (8, 3, 32, 32) torch.float32 torch.int64 48 16",
        "mnist (8, 1, 28, 28) torch.float32 torch.int64 10 10",
        "fashion_mnist (8, 1, 28, 28) torch.float32 torch.int64 64 32",
        "synthetic (8, 5) torch.float32 torch.int64 40 10",
    ], result.stderr


def test_figures_styles_and_progress_bars_do_not_reach_the_next_job(env_pool):
    before = _respawns(env_pool)
    env_pool.run("import matplotlib.pyplot as plt\nfrom tqdm import tqdm\nimport numpy as np\n"
                 "plt.figure(); plt.plot([1, 2])\nplt.rcParams['lines.linewidth'] = 9\n"
                 "bar = tqdm(total=3); bar.update(1)\nnp.random.seed(0)\n")
    second = env_pool.run(
        "import matplotlib.pyplot as plt, numpy as np, threading\n"
        "print(plt.get_fignums(), plt.rcParams['lines.linewidth'], threading.active_count())\n"
        "print(np.random.rand() != np.random.RandomState(0).rand())\n")
    assert second.stdout == "[] 1.5 1\nTrue\n", second.stderr
    assert _respawns(env_pool) == before


# --- preloading ---------------------------------------------------------------------------

def test_an_optional_preload_that_fails_is_skipped_and_the_pool_works(make_pool, tmp_path):
    mods = reachable_by_jobs(tmp_path / "mods")
    (mods / "broken_mod.py").write_text("raise RuntimeError('cannot load this')\n")
    (mods / "threaded_mod.py").write_text(
        "import threading, time\nthreading.Thread(target=time.sleep, args=(3600,), daemon=True).start()\n")
    path = os.pathsep.join([str(mods), os.environ.get("PYTHONPATH", "")])
    pool = make_pool(preload=("numpy", "broken_mod", "threaded_mod", "no_such_mod_xyz"),
                     extra_env=(("PYTHONPATH", path),))
    stats = pool.pool.stats().to_json()
    skipped = stats["preload_skipped"]
    assert skipped["broken_mod"] == "import failed: RuntimeError: cannot load this"
    assert skipped["threaded_mod"].startswith("started threads at import")
    assert skipped["no_such_mod_xyz"] == "not installed"
    assert "numpy" in stats["preloaded"] and "threaded_mod" not in stats["preloaded"]
    assert pool.run("import numpy\nprint(numpy.ones(2).sum())").stdout == "2.0\n"


def test_preload_names_are_checked_and_default_expands():
    with pytest.raises(ConfigError, match="preload"):
        PoolConfig(preload=("os; rm -rf",)).validate()
    config = PoolConfig(preload=("default", "scipy", "numpy"))
    assert config.preload_list()[-1] == "scipy" and config.preload_list().count("numpy") == 1


# --- shared directories are checked at start ----------------------------------------------

def _plan(tmp_path: Path, **kw) -> None:
    WarmPool(PoolConfig(work_dir=reachable_by_jobs(tmp_path / "work"), backend="cpu",
                        job_uid_base=job_uid_base(), isolation="uid", **kw))


def test_a_world_writable_helper_dir_is_refused(tmp_path):
    helpers = reachable_by_jobs(tmp_path / "helpers")
    (helpers / "m.py").write_text("x = 1\n")
    (helpers / "m.py").chmod(0o666)
    with pytest.raises(ConfigError, match=r"job_path .*m.py is writable by every user"):
        _plan(tmp_path, job_path=(helpers,))


def test_a_data_set_dir_a_job_uid_owns_or_inside_the_jobs_tree_is_refused(tmp_path):
    base = job_uid_base()
    cache = reachable_by_jobs(tmp_path / "cache")
    os.chown(cache, base, base)
    with pytest.raises(ConfigError, match=f"datasets_dir .* owned by job uid {base}"):
        WarmPool(PoolConfig(work_dir=reachable_by_jobs(tmp_path / "work"), backend="cpu", job_uid_base=base,
                            isolation="uid", datasets_dir=cache))
    inside = reachable_by_jobs(tmp_path / "work" / "jobs" / "helpers")
    with pytest.raises(ConfigError, match="where jobs write"):
        _plan(tmp_path, job_path=(inside,))
    with pytest.raises(ConfigError, match="not a directory"):
        _plan(tmp_path, job_path=(tmp_path / "missing",))


def test_a_script_using_xla_model_runs_warm_on_the_xla_backend(tmp_path):
    """Its imports are preloaded and xla_model's device context exists before the
    baseline. (The XLA:CPU runtime still starts native threads for larger graphs, which
    the thread count after a job reports: see docs/job-environment.md.)"""
    from benchmarks.workloads import workloads

    code = workloads("xla")["real_shaped"]
    assert "xm.mark_step()" in code
    # The reuse mode: a generated xla script must not leave its worker dirty.
    pool = start_pool(tmp_path / "xla", backend="xla", pool_size=1, reuse_workers=True)
    try:
        first = pool.run(code, timeout=120)
        assert first.success, first.stderr[-3000:]
        assert {a.name for a in first.artifacts} == {"loss.png", "model.pt"}
        small = pool.run("import torch\nimport torch_xla.core.xla_model as xm\nd = xm.xla_device()\n"
                         "m = torch.nn.Linear(4, 2).to(d)\nm(torch.randn(8, 4).to(d)).sum().backward()\n"
                         "xm.mark_step()\nprint('ok')\n")
        pool.wait_full()
        again = pool.run("print('again')")
        assert small.stdout == "ok\n" and again.worker.pid == small.worker.pid
        reasons = [d for r in pool.pool.stats().respawns_recent for d in r["detail"]]
        unexpected = ("registry", "imported modules", "patched")
        assert not [d for d in reasons if any(w in d for w in unexpected)], reasons
    finally:
        pool.pool.shutdown(grace=5)
