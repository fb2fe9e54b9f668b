"""Hugging Face in the job environment: transformers and datasets preloaded, each job's
downloads and caches in its own dir, an operator's cache read offline and never changed.

There is no network here: the model and tokenizer are built locally (a tiny BERT from a
config, `save_pretrained`, a tokenizer from a small vocab file) and laid out as the hub
cache lays out a download, so `from_pretrained("<org>/<name>")` finds them offline."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from conftest import job_uid_base, reachable_by_jobs, start_pool

from warm_pool import ConfigError, PoolConfig, WarmPool

pytest.importorskip("transformers")
pytest.importorskip("datasets")
pytestmark = pytest.mark.timeout(300)

REPO_ID = "executor-tests/tiny-bert"
COMMIT = "0123456789abcdef0123456789abcdef01234567"
VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "the", "a", "movie", "was", "good", "bad", "great",
         "film", "i", "it", "and", "not", "very", "fun", "boring"]

# Built in a child interpreter: transformers' model classes import torch_xla (through
# accelerate), which would change this test process's environment for later pools.
_BUILD = textwrap.dedent("""
    import sys, torch
    from transformers import BertConfig, BertForSequenceClassification, BertTokenizer
    dest, vocab = sys.argv[1], sys.argv[2]
    torch.manual_seed(0)
    config = BertConfig(vocab_size=20, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                        intermediate_size=32, max_position_embeddings=32, num_labels=2)
    BertForSequenceClassification(config).save_pretrained(dest)
    BertTokenizer(vocab=vocab).save_pretrained(dest)
""")

# Loads the tiny model through the hub cache by its name, as a script loads bert-base-uncased.
CLASSIFY = textwrap.dedent(f"""
    import json, torch
    from huggingface_hub import constants
    from transformers import AutoTokenizer, AutoModelForSequenceClassification
    tokenizer = AutoTokenizer.from_pretrained({REPO_ID!r})
    model = AutoModelForSequenceClassification.from_pretrained({REPO_ID!r}).eval()
    batch = tokenizer(["the movie was very good", "a boring film"], padding=True, return_tensors="pt")
    with torch.no_grad():
        logits = model(**batch).logits
    print(json.dumps({{"offline": constants.HF_HUB_OFFLINE, "ids": batch["input_ids"].tolist(),
                      "logits": [[round(v, 5) for v in row] for row in logits.tolist()]}}))
""")

# Where each library would write, as absolute paths (the job's cwd is its dir).
WHERE = textwrap.dedent("""
    import json, os, datasets, huggingface_hub.constants as hub
    import transformers.utils.hub as th
    print(json.dumps({"cwd": os.getcwd(), "HF_HOME": os.environ["HF_HOME"],
                      "paths": [os.path.abspath(p) for p in (hub.HF_HOME, hub.HF_HUB_CACHE, hub.HF_XET_CACHE,
                                hub.HF_TOKEN_PATH, datasets.config.HF_DATASETS_CACHE, th.HF_MODULES_CACHE)]}))
""")

LOAD_CSV_AND_JSON = textwrap.dedent("""
    import json, os
    from datasets import load_dataset
    with open("reviews.csv", "w") as f:
        f.write("text,label\\nthe movie was good,1\\na boring film,0\\ngreat fun,1\\n")
    with open("reviews.jsonl", "w") as f:
        f.write(json.dumps({"text": "not good", "label": 0}) + "\\n")
    csv = load_dataset("csv", data_files="reviews.csv")["train"]
    jsonl = load_dataset("json", data_files="reviews.jsonl", split="train")
    cache = sorted({os.path.dirname(os.path.abspath(f["filename"])) for f in csv.cache_files})
    print(json.dumps({"rows": [csv.num_rows, jsonl.num_rows], "labels": list(csv["label"]),
                      "first": jsonl[0]["text"], "cwd": os.getcwd(), "cache": cache}))
""")


def build_tiny_bert(dest: Path) -> Path:
    """A tiny BERT classifier and its tokenizer, saved with save_pretrained into `dest`."""
    dest.mkdir(parents=True)
    vocab = dest.parent / "vocab.txt"
    vocab.write_text("\n".join(VOCAB) + "\n")
    proc = subprocess.run([sys.executable, "-c", _BUILD, str(dest), str(vocab)], capture_output=True,
                          text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return dest


def fill_hub_cache(hf_home: Path, repo_id: str, files: Path) -> None:
    """Lay `files` out as a download of `repo_id` at COMMIT in the hub cache below hf_home,
    readable by every job uid and writable by none (as an operator's fill leaves it)."""
    repo = hf_home / "hub" / f"models--{repo_id.replace('/', '--')}"
    snapshot = repo / "snapshots" / COMMIT
    snapshot.mkdir(parents=True)
    for f in files.iterdir():
        (snapshot / f.name).write_bytes(f.read_bytes())
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(COMMIT)
    for path in [hf_home, *hf_home.rglob("*")]:
        path.chmod(0o755 if path.is_dir() else 0o644)


@pytest.fixture(scope="module")
def hf_cache(tmp_path_factory) -> Path:
    base = reachable_by_jobs(tmp_path_factory.mktemp("hf"))
    hf_home = base / "hf-home"
    fill_hub_cache(hf_home, REPO_ID, build_tiny_bert(base / "tiny-bert"))
    return hf_home


@pytest.fixture(scope="module")
def cached_pool(hf_cache):
    """A pool whose jobs read the operator's Hugging Face cache."""
    handle = start_pool(hf_cache.parent / "work-cached", hf_home=hf_cache)
    yield handle
    handle.pool.shutdown(grace=5)


@pytest.fixture(scope="module")
def plain_pool(tmp_path_factory):
    """A pool with no operator cache: each job's Hugging Face files are its own."""
    handle = start_pool(tmp_path_factory.mktemp("hf-plain") / "work")
    yield handle
    handle.pool.shutdown(grace=5)


def _json(result) -> dict:
    assert result.success, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


def _inside(path: str, root: str) -> bool:
    return os.path.commonpath([os.path.realpath(path), os.path.realpath(root)]) == os.path.realpath(root)


# --- preloaded -----------------------------------------------------------------------------

def test_transformers_and_datasets_are_preloaded_without_threads(plain_pool):
    stats = plain_pool.pool.stats().to_json()
    for name in ("transformers", "transformers.models.auto.tokenization_auto",
                 "transformers.models.auto.modeling_auto", "datasets"):
        assert name in stats["preloaded"], stats["preload_skipped"]
    assert not [m for m, why in stats["preload_skipped"].items() if "thread" in why], stats["preload_skipped"]


def test_a_jobs_hugging_face_imports_import_nothing_new(plain_pool):
    result = plain_pool.run("import sys\nbefore = set(sys.modules)\n"
                            "from transformers import AutoTokenizer, AutoModelForSequenceClassification\n"
                            "from datasets import load_dataset\nprint(sorted(set(sys.modules) - before))\n")
    assert result.stdout == "[]\n", result.stderr[-2000:]


# --- the job's own dir ---------------------------------------------------------------------

def test_without_an_operator_cache_every_hugging_face_path_is_in_the_jobs_own_dir(plain_pool):
    where = _json(plain_pool.run(WHERE))
    assert where["HF_HOME"] == ".cache/huggingface"
    assert where["cwd"].startswith(str(plain_pool.pool.config.jobs_dir))
    for path in where["paths"]:
        assert _inside(path, where["cwd"]), (path, where["cwd"])


def test_load_dataset_reads_local_csv_and_json_and_caches_in_the_jobs_dir(plain_pool):
    out = _json(plain_pool.run(LOAD_CSV_AND_JSON, timeout=120))
    assert out["rows"] == [3, 1] and out["labels"] == [1, 0, 1] and out["first"] == "not good"
    assert out["cache"] and all(_inside(p, os.path.join(out["cwd"], ".cache/huggingface/datasets"))
                                for p in out["cache"]), out


def test_a_hidden_cache_is_never_kept_as_an_artifact(plain_pool):
    result = plain_pool.run(LOAD_CSV_AND_JSON, timeout=120)
    assert result.success, result.stderr[-2000:]
    assert {a.name for a in result.artifacts} == {"reviews.csv"}


# --- the operator's cache ------------------------------------------------------------------

def test_a_model_and_tokenizer_load_offline_from_the_operators_cache(cached_pool, hf_cache, tmp_path):
    warm = cached_pool.run(CLASSIFY, timeout=120)
    out = _json(warm)
    assert out["offline"] is True
    assert out["ids"] == [[2, 5, 7, 8, 17, 9, 3], [2, 6, 19, 12, 3, 0, 0]]
    assert len(out["logits"]) == 2 and all(len(row) == 2 for row in out["logits"])
    cold = _cold(cached_pool.pool, CLASSIFY, tmp_path / "cold")
    assert cold.returncode == 0, cold.stderr[-3000:]
    assert cold.stdout == warm.stdout  # what `python main.py` gives, with the same environment


def test_with_an_operator_cache_what_a_job_writes_stays_in_its_dir(cached_pool, hf_cache):
    where = _json(cached_pool.run(WHERE))
    assert where["HF_HOME"] == str(hf_cache)
    reads = where["paths"][:2] + where["paths"][3:4]  # HF_HOME, the hub cache, the token file
    writes = where["paths"][2:3] + where["paths"][4:]  # xet, datasets' cache, remote code's modules
    assert all(_inside(p, str(hf_cache)) for p in reads), where
    assert all(_inside(p, where["cwd"]) for p in writes), where
    out = _json(cached_pool.run(LOAD_CSV_AND_JSON, timeout=120))
    assert out["rows"] == [3, 1] and all(_inside(p, out["cwd"]) for p in out["cache"]), out


def test_jobs_cannot_change_the_operators_cache(cached_pool, hf_cache):
    repo = hf_cache / "hub" / f"models--{REPO_ID.replace('/', '--')}"
    weights = repo / "snapshots" / COMMIT / "model.safetensors"
    code = textwrap.dedent(f"""
        import json, os, shutil
        attempts = {{
            "overwrite weights": lambda: open({str(weights)!r}, 'wb'),
            "move the ref": lambda: open({str(repo / 'refs' / 'main')!r}, 'w').write('f' * 40),
            "add a model": lambda: os.mkdir({str(hf_cache / 'hub' / 'models--evil--model')!r}),
            "remove a model": lambda: shutil.rmtree({str(repo)!r}),
            "save a token": lambda: open({str(hf_cache / 'token')!r}, 'w').write('hf_x'),
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
    outcomes = _json(cached_pool.run(code))
    assert set(outcomes.values()) == {"PermissionError"}, outcomes
    assert (repo / "refs" / "main").read_text() == COMMIT


def test_a_model_not_in_the_operators_cache_is_an_error_not_a_download(cached_pool):
    result = cached_pool.run("from transformers import AutoModel\n"
                             "AutoModel.from_pretrained('no-such/model')\n", timeout=120)
    assert result.error_type == "exception"
    assert "OSError" in result.stderr and "cached files" in result.stderr, result.stderr[-2000:]


def test_an_operator_cache_jobs_could_write_is_refused_at_start(tmp_path):
    cache = reachable_by_jobs(tmp_path / "hf-open")
    (cache / "hub").mkdir(mode=0o777)
    (cache / "hub").chmod(0o777)
    with pytest.raises(ConfigError, match=r"hf_home .*writable by every user"):
        WarmPool(PoolConfig(work_dir=reachable_by_jobs(tmp_path / "work"), backend="cpu",
                            job_uid_base=job_uid_base(), hf_home=cache))
    with pytest.raises(ConfigError, match=r"hf_home .*not a directory"):
        WarmPool(PoolConfig(work_dir=reachable_by_jobs(tmp_path / "work2"), backend="cpu",
                            job_uid_base=job_uid_base(), hf_home=tmp_path / "missing"))


def _cold(pool: WarmPool, code: str, job: Path) -> subprocess.CompletedProcess:
    """`python main.py` in a fresh interpreter with the environment a job gets."""
    reachable_by_jobs(job)
    (job / "main.py").write_text(code)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("EXECUTOR_", "AWS_"))}
    env.update(pool.placement.worker_env(0, None, "cpu"))
    env.update(HOME=str(job))
    return subprocess.run([sys.executable, "main.py"], cwd=job, env=env, capture_output=True, text=True,
                          timeout=240, stdin=subprocess.DEVNULL)
