"""dataset_loader: the standard data sets that generated training scripts load, from a
local cache that an operator filled beforehand. Jobs never download.

    from dataset_loader import load_dataset
    train_loader, test_loader = load_dataset("cifar10", batch_size=128)

`load_dataset(name, batch_size=128, **kwargs)` returns ``(train_loader, test_loader)``,
two ``torch.utils.data.DataLoader`` over tensors read from
``$DATASET_CACHE_DIR/<name>/`` (the pool hands every job that variable):

=============== ================================== ==========================================
name            files in <cache>/<name>/            what a batch is
=============== ================================== ==========================================
cifar10         cifar10_pytorch.pt                  images float [B,3,32,32], labels long [B]
cifar100        cifar100_pytorch.pt                 images float [B,3,32,32], labels long [B]
mnist           mnist_pytorch.pt                    images float [B,1,28,28], labels long [B]
fashion_mnist   fashion_mnist_pytorch.pt            images float [B,1,28,28], labels long [B]
imdb            train.jsonl, test.jsonl             token ids long [B,max_length], labels [B]
wikitext2       wiki.{train,valid,test}.tokens      token ids long [B,seq_len], targets [B,seq_len]
synthetic       (none: generated, seeded)           features float [B,...], labels long [B]
=============== ================================== ==========================================

An image set's ``.pt`` file is a dict of four tensors, ``train_data``, ``train_labels``,
``test_data`` and ``test_labels``; data as uint8 (scaled to [0, 1]) or float, shaped
[N,C,H,W] (or [N,H,W] for one channel). imdb's files hold one JSON object a line,
``{"text": ..., "label": 0|1}``; wikitext2's are the original WikiText-2 token files.
Where only a Hugging Face ``save_to_disk`` copy of imdb or wikitext2 is cached and the
``datasets`` package is installed, that copy is read instead.

Keyword arguments (all optional): ``data_dir`` (another cache directory), ``shuffle``
(train set, default True; the order follows torch's global seed, as with any
DataLoader), ``num_workers`` (0), ``normalize`` (image sets: subtract the data set's
mean and divide by its std, default True), ``max_samples`` (keep the first N of each
split), ``download`` (accepted and ignored: the cache is filled by the operator);
imdb: ``max_length`` (256), ``vocab_size`` (10,000); wikitext2: ``seq_len`` (35),
``vocab_size`` (None: every word); synthetic: ``num_samples`` (1,000), ``input_shape``
or ``input_dim`` ((20,)), ``num_classes`` (2), ``task`` (classification | regression),
``test_fraction`` (0.2), ``seed`` (0).

This module is self-contained (the standard library and torch) so that operators can
copy it; `python dataset_loader.py fetch NAME... --dest DIR --source SRC` fills a cache
(see `fetch`), which is what `trainium-executor datasets fetch` runs.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import re
import shutil
import sys
import tempfile
import urllib.request

CACHE_ENV = "DATASET_CACHE_DIR"

# name -> (file, shape of one sample (C, H, W), classes, mean per channel, std per channel)
IMAGE_SETS = {
    "cifar10": ("cifar10_pytorch.pt", (3, 32, 32), 10, (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "cifar100": ("cifar100_pytorch.pt", (3, 32, 32), 100, (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
    "mnist": ("mnist_pytorch.pt", (1, 28, 28), 10, (0.1307,), (0.3081,)),
    "fashion_mnist": ("fashion_mnist_pytorch.pt", (1, 28, 28), 10, (0.2860,), (0.3530,)),
}
TEXT_SETS = {
    "imdb": ("train.jsonl", "test.jsonl"),
    "wikitext2": ("wiki.train.tokens", "wiki.valid.tokens", "wiki.test.tokens"),
}
NAMES = (*IMAGE_SETS, *TEXT_SETS, "synthetic")
_ALIASES = {"cifar-10": "cifar10", "cifar-100": "cifar100", "fashion-mnist": "fashion_mnist",
            "fashionmnist": "fashion_mnist", "wikitext-2": "wikitext2", "wikitext": "wikitext2",
            "wikitext_2": "wikitext2", "imdb_reviews": "imdb"}
_TENSOR_KEYS = ("train_data", "train_labels", "test_data", "test_labels")


class DatasetNotCached(FileNotFoundError):
    """The data set's files are not in the cache (jobs never download them)."""


def files(name: str) -> tuple[str, ...]:
    """The files a data set's cache directory holds."""
    name = canonical(name)
    if name in IMAGE_SETS:
        return (IMAGE_SETS[name][0],)
    return TEXT_SETS.get(name, ())


def canonical(name: str) -> str:
    """The data set's name as this module knows it; ValueError for an unknown one."""
    key = str(name).strip().lower()
    key = _ALIASES.get(key, key)
    if key not in NAMES:
        raise ValueError(f"unknown data set {name!r}; known: {', '.join(NAMES)}")
    return key


def cache_dir(data_dir: str | os.PathLike | None = None) -> str:
    """The cache directory: `data_dir`, else $DATASET_CACHE_DIR."""
    found = data_dir or os.environ.get(CACHE_ENV)
    if not found:
        raise DatasetNotCached(f"no data set cache: {CACHE_ENV} is not set (the service sets it from "
                               "--datasets-dir / EXECUTOR_DATASETS_DIR)")
    return os.fspath(found)


def load_dataset(name: str, batch_size: int = 128, **kwargs):
    """(train_loader, test_loader) for a cached or synthetic data set (module docstring)."""
    from torch.utils.data import DataLoader

    key = canonical(name)
    if key == "synthetic":
        train, test = _synthetic(**_pop(kwargs, "num_samples", "n_samples", "input_shape", "input_dim",
                                        "num_features", "n_features", "num_classes", "task",
                                        "test_fraction", "seed"))
    else:
        root = os.path.join(cache_dir(kwargs.pop("data_dir", None) or kwargs.pop("cache_dir", None)), key)
        if key in IMAGE_SETS:
            train, test = _image_set(key, root, kwargs.pop("normalize", True))
        elif key == "imdb":
            train, test = _imdb(root, kwargs.pop("max_length", 256), kwargs.pop("vocab_size", 10_000))
        else:
            train, test = _wikitext2(root, kwargs.pop("seq_len", 35), kwargs.pop("vocab_size", None))
    limit = kwargs.pop("max_samples", None)
    if limit:
        train, test = _first(train, limit), _first(test, limit)
    kwargs.pop("download", None)
    shuffle = kwargs.pop("shuffle", True)
    num_workers = kwargs.pop("num_workers", 0)
    for ignored in ("normalize", "data_dir", "cache_dir", "transform", "root"):
        kwargs.pop(ignored, None)
    if kwargs:
        raise TypeError(f"load_dataset() got unexpected keyword arguments: {', '.join(sorted(kwargs))}")
    return (DataLoader(train, batch_size=batch_size, shuffle=shuffle, num_workers=num_workers),
            DataLoader(test, batch_size=batch_size, shuffle=False, num_workers=num_workers))


def _pop(kwargs: dict, *names: str) -> dict:
    return {n: kwargs.pop(n) for n in names if n in kwargs}


def _first(dataset, limit: int):
    from torch.utils.data import TensorDataset

    return TensorDataset(*(t[:int(limit)] for t in dataset.tensors))


def _missing(name: str, root: str, wanted: tuple[str, ...]) -> DatasetNotCached:
    absent = [os.path.join(root, f) for f in wanted if not os.path.isfile(os.path.join(root, f))]
    return DatasetNotCached(
        f"data set {name!r} is not cached: missing {', '.join(absent)}. Jobs never download data "
        f"sets; an operator fills the cache ({CACHE_ENV}) with `trainium-executor datasets fetch {name}`")


def _image_set(name: str, root: str, normalize: bool):
    import torch
    from torch.utils.data import TensorDataset

    filename, shape, _, mean, std = IMAGE_SETS[name]
    path = os.path.join(root, filename)
    if not os.path.isfile(path):
        raise _missing(name, root, (filename,))
    blob = torch.load(path, map_location="cpu", weights_only=True)
    absent = [k for k in _TENSOR_KEYS if k not in blob]
    if absent:
        raise ValueError(f"{path} lacks {', '.join(absent)} (it must hold {', '.join(_TENSOR_KEYS)})")
    out = []
    for split in ("train", "test"):
        data = _as_images(blob[f"{split}_data"], shape)
        if normalize:
            m = torch.tensor(mean).view(-1, 1, 1)
            s = torch.tensor(std).view(-1, 1, 1)
            data = (data - m) / s
        out.append(TensorDataset(data, torch.as_tensor(blob[f"{split}_labels"]).long()))
    return out[0], out[1]


def _as_images(data, shape: tuple[int, int, int]):
    """Float images [N,C,H,W] in [0, 1] (uint8 is scaled; [N,H,W,C] and [N,H,W] reordered)."""
    import torch

    data = torch.as_tensor(data)
    if data.dim() == 3:
        data = data.unsqueeze(1)
    elif data.dim() == 4 and data.shape[1] != shape[0] and data.shape[-1] == shape[0]:
        data = data.permute(0, 3, 1, 2)
    data = data.contiguous()
    return data.float().div(255) if data.dtype == torch.uint8 else data.float()


def _synthetic(num_samples=None, n_samples=None, input_shape=None, input_dim=None, num_features=None,
               n_features=None, num_classes=2, task="classification", test_fraction=0.2, seed=0):
    import torch
    from torch.utils.data import TensorDataset

    n = int(num_samples or n_samples or 1000)
    shape = tuple(input_shape) if input_shape else (int(input_dim or num_features or n_features or 20),)
    gen = torch.Generator().manual_seed(int(seed))
    x = torch.randn(n, *shape, generator=gen)
    weights = torch.randn(x[0].numel(), max(int(num_classes), 1), generator=gen)
    scores = x.flatten(1) @ weights
    if task == "regression":
        y = scores[:, :1] + 0.1 * torch.randn(n, 1, generator=gen)
    else:
        y = scores.argmax(1)
    cut = n - max(1, int(n * float(test_fraction)))
    return TensorDataset(x[:cut], y[:cut]), TensorDataset(x[cut:], y[cut:])


_WORD = re.compile(r"[a-z0-9']+")


def _imdb(root: str, max_length: int, vocab_size: int):
    import torch
    from torch.utils.data import TensorDataset

    splits = _text_rows(root, "imdb")
    counts = collections.Counter(w for text, _ in splits["train"] for w in _WORD.findall(text.lower()))
    vocab = {w: i + 2 for i, (w, _) in enumerate(counts.most_common(max(0, vocab_size - 2)))}  # 0 pad, 1 unk
    out = []
    for split in ("train", "test"):
        ids = torch.zeros(len(splits[split]), max_length, dtype=torch.long)
        for row, (text, _) in enumerate(splits[split]):
            tokens = [vocab.get(w, 1) for w in _WORD.findall(text.lower())][:max_length]
            ids[row, :len(tokens)] = torch.tensor(tokens, dtype=torch.long)
        labels = torch.tensor([label for _, label in splits[split]], dtype=torch.long)
        out.append(TensorDataset(ids, labels))
    return out[0], out[1]


def _text_rows(root: str, name: str) -> dict[str, list[tuple[str, int]]]:
    wanted = TEXT_SETS[name]
    if all(os.path.isfile(os.path.join(root, f)) for f in wanted):
        out = {}
        for split in ("train", "test"):
            with open(os.path.join(root, f"{split}.jsonl"), encoding="utf-8") as f:
                rows = [json.loads(line) for line in f if line.strip()]
            out[split] = [(r["text"], int(r["label"])) for r in rows]
        return out
    hf = _hf_copy(root)
    if hf is not None:
        return {s: [(r["text"], int(r["label"])) for r in hf[s]] for s in ("train", "test")}
    raise _missing(name, root, wanted)


def _wikitext2(root: str, seq_len: int, vocab_size: int | None):
    import torch
    from torch.utils.data import TensorDataset

    wanted = TEXT_SETS["wikitext2"]
    if all(os.path.isfile(os.path.join(root, f)) for f in wanted):
        texts = {}
        for split, filename in zip(("train", "valid", "test"), wanted, strict=True):
            with open(os.path.join(root, filename), encoding="utf-8") as f:
                texts[split] = f.read().splitlines()
    else:
        hf = _hf_copy(root)
        if hf is None:
            raise _missing("wikitext2", root, wanted)
        texts = {s: list(hf["validation" if s == "valid" else s]["text"]) for s in ("train", "valid", "test")}
    counts = collections.Counter(w for line in texts["train"] for w in line.split() + ["<eos>"])
    keep = counts.most_common(vocab_size - 1 if vocab_size else None)
    vocab = {w: i + 1 for i, (w, _) in enumerate(keep)}  # 0: <unk>
    out = []
    for split in ("train", "test"):
        ids = [vocab.get(w, 0) for line in texts[split] if line.strip() for w in line.split() + ["<eos>"]]
        stream = torch.tensor(ids, dtype=torch.long)
        rows = max(0, (len(stream) - 1) // seq_len)
        x = stream[: rows * seq_len].view(rows, seq_len)
        y = stream[1: rows * seq_len + 1].view(rows, seq_len)
        out.append(TensorDataset(x, y))
    return out[0], out[1]


def _hf_copy(root: str):
    """A Hugging Face `save_to_disk` copy in root, if there is one and `datasets` imports."""
    if not os.path.isfile(os.path.join(root, "dataset_dict.json")):
        return None
    try:
        import datasets
    except ImportError:
        raise DatasetNotCached(f"{root} holds a Hugging Face copy, but the `datasets` package is not "
                               "installed; install it, or cache the plain files instead") from None
    return datasets.load_from_disk(root)


# --- filling the cache (operators, never jobs) ---------------------------------------------

def write_image_set(dest: str | os.PathLike, name: str, train_data, train_labels, test_data,
                    test_labels) -> str:
    """Save tensors as `name`'s cache file below dest; return its path."""
    import torch

    key = canonical(name)
    if key not in IMAGE_SETS:
        raise ValueError(f"{name} is not an image data set")
    folder = os.path.join(os.fspath(dest), key)
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, IMAGE_SETS[key][0])
    blob = {"train_data": train_data, "train_labels": train_labels, "test_data": test_data,
            "test_labels": test_labels}
    _atomic(path, lambda tmp: torch.save(blob, tmp))
    return path


def _atomic(path: str, write) -> None:
    """Write through a temporary file in the same directory, then rename (readers never
    see half a file); readable by everyone (jobs run under other uids)."""
    # torch.save names the archive's records after the file: no leading dot.
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), prefix="partial_", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def fetch(names: list[str], dest: str, source: str) -> list[str]:
    """Fill `dest` with data sets from `source`; return the files written.

    source: an http(s) or file URL, or s3://bucket/prefix, holding `<name>/<file>` as in
    the table above (a copy of another cache); or `torchvision` (image sets, downloaded
    by torchvision and converted) or `huggingface` (imdb, wikitext2, by `datasets`).
    """
    written = []
    for name in names:
        key = canonical(name)
        folder = os.path.join(dest, key)
        os.makedirs(folder, mode=0o755, exist_ok=True)
        if source == "torchvision":
            written.append(_from_torchvision(key, dest))
        elif source == "huggingface":
            written.extend(_from_huggingface(key, folder))
        else:
            for filename in files(key):
                path = os.path.join(folder, filename)
                _atomic(path, lambda tmp, rel=f"{key}/{filename}": _copy_remote(source, rel, tmp))
                written.append(path)
    return written


def _copy_remote(source: str, relative: str, target: str) -> None:
    if source.startswith("s3://"):
        import boto3

        bucket, _, prefix = source[5:].partition("/")
        key = f"{prefix.strip('/')}/{relative}" if prefix.strip("/") else relative
        boto3.client("s3").download_file(bucket, key, target)
        return
    if not source.startswith(("http://", "https://", "file://")):
        raise ValueError(f"source must be http(s)://, file://, s3://, torchvision or huggingface: {source!r}")
    with urllib.request.urlopen(f"{source.rstrip('/')}/{relative}", timeout=60) as resp, \
            open(target, "wb") as out:
        shutil.copyfileobj(resp, out, 1 << 20)


def _from_torchvision(key: str, dest: str) -> str:
    import torch
    import torchvision.datasets as tvd

    if key not in IMAGE_SETS:
        raise ValueError(f"torchvision has no {key}; use --source huggingface for text sets")
    cls = {"cifar10": tvd.CIFAR10, "cifar100": tvd.CIFAR100, "mnist": tvd.MNIST,
           "fashion_mnist": tvd.FashionMNIST}[key]
    with tempfile.TemporaryDirectory() as raw:
        parts = {}
        for split in ("train", "test"):
            ds = cls(root=raw, train=split == "train", download=True)
            data = torch.as_tensor(ds.data)
            parts[f"{split}_data"] = _as_uint8_images(data)
            parts[f"{split}_labels"] = torch.as_tensor(ds.targets).long()
        return write_image_set(dest, key, **parts)


def _as_uint8_images(data):
    return data.unsqueeze(1) if data.dim() == 3 else data.permute(0, 3, 1, 2).contiguous()


def _from_huggingface(key: str, folder: str) -> list[str]:
    import datasets

    if key == "imdb":
        hf = datasets.load_dataset("imdb")
        out = []
        for split in ("train", "test"):
            path = os.path.join(folder, f"{split}.jsonl")
            rows = ((json.dumps({"text": r["text"], "label": int(r["label"])}) + "\n") for r in hf[split])
            _atomic(path, lambda tmp, rows=rows: _write_lines(tmp, rows))
            out.append(path)
        return out
    if key == "wikitext2":
        hf = datasets.load_dataset("wikitext", "wikitext-2-v1")
        out = []
        for split, filename in zip(("train", "validation", "test"), TEXT_SETS["wikitext2"], strict=True):
            path = os.path.join(folder, filename)
            _atomic(path, lambda tmp, s=split: _write_lines(tmp, (t if t.endswith("\n") else t + "\n"
                                                                  for t in hf[s]["text"])))
            out.append(path)
        return out
    raise ValueError(f"huggingface has no {key} here; use --source torchvision for image sets")


def _write_lines(path: str, lines) -> None:
    with open(path, "w", encoding="utf-8") as f:
        f.writelines(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="dataset_loader.py", description="fill a data set cache")
    sub = parser.add_subparsers(dest="command", required=True)
    get = sub.add_parser("fetch", help="copy or download data sets into the cache")
    get.add_argument("names", nargs="+", help=f"data sets: {', '.join(n for n in NAMES if n != 'synthetic')}")
    get.add_argument("--dest", required=True, help="the cache directory (DATASET_CACHE_DIR of jobs)")
    get.add_argument("--source", required=True,
                     help="http(s)://, file:// or s3:// base holding <name>/<file>; torchvision; huggingface")
    args = parser.parse_args(argv)
    try:
        for path in fetch(args.names, args.dest, args.source):
            print(path)
    except (OSError, ValueError, ImportError) as exc:
        print(f"dataset_loader: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
