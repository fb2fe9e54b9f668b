"""The scripts the benchmark times, each a complete `main.py`.

The cpu backend runs the first three; the xla backend runs all four, and its training
loop runs on the XLA device, so every xla script pays for `import torch_xla` when cold.
"""

from __future__ import annotations

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

CPU_SETUP = 'device = torch.device("cpu")'
XLA_SETUP = "import torch_xla\ndevice = torch_xla.device()"

XLA_OPS = """\
import torch
import torch_xla
device = torch_xla.device()
x = torch.randn(32, 32, device=device)
y = (x @ x).relu().sum()
torch_xla.sync()
print(y.item())
"""

# Sleeps past its timeout; SIGINT (the polite stop) ends it at once.
SLEEPER = "import time\ntime.sleep(60)\n"
# Ignores SIGINT, so the supervisor must wait out kill_grace and SIGKILL it.
STUBBORN = "import signal, time\nsignal.signal(signal.SIGINT, signal.SIG_IGN)\ntime.sleep(60)\n"


def workloads(backend: str) -> dict[str, str]:
    """Name → script for the per-script latency comparison on `backend`."""
    if backend == "xla":
        train = TRAIN.format(device_setup=XLA_SETUP, step_sync="torch_xla.sync()")
        return {"trivial": TRIVIAL, "matmul": MATMUL, "train": train, "xla_ops": XLA_OPS}
    train = TRAIN.format(device_setup=CPU_SETUP, step_sync="pass")
    return {"trivial": TRIVIAL, "matmul": MATMUL, "train": train}


def batch(backend: str, size: int = 10) -> list[dict[str, str]]:
    """A batch of small torch scripts in the shape of POST /execute_batch's "batch"."""
    loads = workloads(backend)
    names = ["train", "xla_ops"] if backend == "xla" else ["matmul", "train"]
    return [{"paper_id": f"bench_{i:02d}", "code": loads[names[i % len(names)]]} for i in range(size)]
