"""The scripts the benchmark times, each a complete `main.py`.

The cpu backend runs trivial, matmul, train and real_shaped; the xla backend runs those
and xla_ops, and its training loops run on the XLA device, so every xla script pays for
`import torch_xla` when cold. real_shaped is what the service's callers really send
(docs/job-environment.md): torch, torchvision, matplotlib and tqdm imported, a data set
from the shipped dataset_loader, a tiny model trained a few steps, a loss plot and a
checkpoint saved. hf_imports is only the imports of the callers' Hugging Face scripts.
"""

from __future__ import annotations

import importlib.util

EMPTY = "pass\n"

TRIVIAL = 'print("hello")\n'

MATMUL = """\
import torch
a = torch.randn(64, 64)
print((a @ a).sum().item())
"""

TRAIN = """\
import json
import torch
{device_setup}
torch.manual_seed(0)
x = torch.randn(256, 16)
y = x @ torch.randn(16, 1)
x, y = x.to(device), y.to(device)
model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.ReLU(), torch.nn.Linear(32, 1)).to(device)
opt = torch.optim.SGD(model.parameters(), lr=0.05)
for epoch in range(20):
    opt.zero_grad()
    loss = torch.nn.functional.mse_loss(model(x), y)
    loss.backward()
    opt.step()
    {step_sync}
print(f"METRICS: {{json.dumps({{'training_loss': loss.item(), 'epochs': 20}})}}")
"""

REAL_SHAPED = """\
import json
import matplotlib.pyplot as plt
import torch
import torch.nn as nn
import torchvision.transforms as T
from tqdm import tqdm
from dataset_loader import load_dataset
{device_setup}
torch.manual_seed(0)
train_loader, _ = load_dataset("synthetic", batch_size=32, num_samples=256, input_shape=(3, 16, 16),
                               num_classes=4)
model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(4), nn.Flatten(),
                      nn.Linear(128, 4)).to(device)
optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
flip = T.RandomHorizontalFlip()
losses = []
for x, y in tqdm(train_loader, desc="train"):
    x, y = flip(x).to(device), y.to(device)
    optimizer.zero_grad()
    loss = nn.functional.cross_entropy(model(x), y)
    loss.backward()
    optimizer.step()
    {step_sync}
    losses.append(loss.item())
plt.plot(losses)
plt.savefig("loss.png")
torch.save(model.state_dict(), "model.pt")
print(f"METRICS: {{json.dumps({{'training_loss': losses[-1], 'steps': len(losses)}})}}")
"""

CPU_SETUP = 'device = torch.device("cpu")'
XLA_SETUP = "import torch_xla\ndevice = torch_xla.device()"
# How most generated scripts reach the device (torch_xla.core.xla_model).
XM_SETUP = "import torch_xla.core.xla_model as xm\ndevice = xm.xla_device()"

XLA_OPS = """\
import torch
import torch_xla
device = torch_xla.device()
x = torch.randn(32, 32, device=device)
y = (x @ x).relu().sum()
torch_xla.sync()
print(y.item())
"""

# Exactly the imports of the callers' Hugging Face scripts (docs/job-environment.md): cold,
# transformers, its auto classes and datasets load (~3,000 modules); warm, the template has.
HF_IMPORTS = """\
from transformers import AutoTokenizer, AutoModelForSequenceClassification
from datasets import load_dataset
"""

# Sleeps past its timeout; SIGINT (the polite stop) ends it at once.
SLEEPER = "import time\ntime.sleep(60)\n"
# Ignores SIGINT, so the supervisor must wait out kill_grace and SIGKILL it.
STUBBORN = "import signal, time\nsignal.signal(signal.SIGINT, signal.SIG_IGN)\ntime.sleep(60)\n"


def workloads(backend: str) -> dict[str, str]:
    """Name → script for the per-script latency comparison on `backend` (hf_imports when
    transformers and datasets are installed)."""
    if backend == "xla":
        train = TRAIN.format(device_setup=XLA_SETUP, step_sync="torch_xla.sync()")
        real = REAL_SHAPED.format(device_setup=XM_SETUP, step_sync="xm.mark_step()")
        loads = {"trivial": TRIVIAL, "matmul": MATMUL, "train": train, "real_shaped": real,
                 "xla_ops": XLA_OPS}
    else:
        train = TRAIN.format(device_setup=CPU_SETUP, step_sync="pass")
        real = REAL_SHAPED.format(device_setup=CPU_SETUP, step_sync="pass")
        loads = {"trivial": TRIVIAL, "matmul": MATMUL, "train": train, "real_shaped": real}
    if all(importlib.util.find_spec(name) for name in ("transformers", "datasets")):
        loads["hf_imports"] = HF_IMPORTS
    return loads


def batch(backend: str, size: int = 10) -> list[dict[str, str]]:
    """A batch of small torch scripts in the shape of POST /execute_batch's "batch"."""
    loads = workloads(backend)
    names = ["train", "xla_ops"] if backend == "xla" else ["matmul", "train"]
    return [{"paper_id": f"bench_{i:02d}", "code": loads[names[i % len(names)]]} for i in range(size)]


# Hostile jobs (issue 22): each tries to make the service wait on it. Used by
# benchmarks/soak.py and tests/test_never_waits.py.
HOSTILE = {
    # A frame header announcing 200 bytes on the job's channel, 7 sent, then silence.
    "half_sent_message": """\
import os, time
for name in os.listdir('/proc/self/fd'):
    try:
        target = os.readlink(f'/proc/self/fd/{name}')
    except OSError:
        continue
    if target.startswith('socket:'):
        os.write(int(name), (200).to_bytes(4, 'big') + b'{"v": 1')
time.sleep(20)
""",
    # About a megabyte on one line, twice: a quadratic METRICS parser takes minutes.
    "long_metrics_line": "print('METRICS:{' * 111000)\nprint('METRICS:{' * 111000)\n",
    # Within the files limit, but collecting artifacts must not hold an fd per directory.
    "many_directories": "import os\nfor i in range(50000):\n    os.mkdir(f'd{i}')\n"
                        "open('d49999/result.json', 'w').write('{}')\n",
    "huge_single_line": "import sys\nsys.stdout.write('x' * (4 << 20))\n",
}
