"""Training scripts shaped like those the service's callers generate (one per paper),
made tiny: a few steps on tiny cached data sets, each saving what real ones save (a
loss plot, a checkpoint, metrics as JSON or CSV) and printing METRICS.

`SCRIPTS` maps a name to its main.py; `ARTIFACTS` names the files each leaves;
`write_tiny_cache(dest)` builds the tiny data sets they load, in the cache format of
warm_pool/job_helpers/dataset_loader.py.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

HELPERS = Path(__file__).resolve().parent.parent / "warm_pool" / "job_helpers"

CIFAR_CNN = '''\
import json
import matplotlib.pyplot as plt
import numpy as np
import torch
import torch.nn as nn
import torch.optim as optim
from tqdm import tqdm
from dataset_loader import load_dataset

torch.manual_seed(42)
np.random.seed(42)
train_loader, test_loader = load_dataset("cifar10", batch_size=16)


class SmallCNN(nn.Module):
    def __init__(self, num_classes=10):
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                                      nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(4))
        self.classifier = nn.Linear(16 * 16, num_classes)

    def forward(self, x):
        return self.classifier(torch.flatten(self.features(x), 1))


model = SmallCNN()
criterion = nn.CrossEntropyLoss()
optimizer = optim.Adam(model.parameters(), lr=1e-3)
losses = []
for epoch in range(2):
    model.train()
    for images, labels in tqdm(train_loader, desc=f"epoch {epoch + 1}"):
        optimizer.zero_grad()
        loss = criterion(model(images), labels)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    print(f"Epoch {epoch + 1}: loss {np.mean(losses[-len(train_loader):]):.6f}")

model.eval()
correct = total = 0
with torch.no_grad():
    for images, labels in test_loader:
        correct += (model(images).argmax(1) == labels).sum().item()
        total += labels.numel()
accuracy = correct / total

plt.figure(figsize=(6, 4))
plt.plot(losses, label="training loss")
plt.xlabel("step")
plt.ylabel("loss")
plt.title("SmallCNN on CIFAR-10")
plt.legend()
plt.savefig("loss_curve.png", dpi=60)
plt.close()
torch.save(model.state_dict(), "model.pt")
with open("metrics.json", "w") as f:
    json.dump({"final_loss": losses[-1], "test_accuracy": accuracy}, f, indent=2)
print(f"METRICS: {json.dumps({'training_loss': round(losses[-1], 6), 'validation_accuracy': accuracy})}")
'''

MNIST_MLP = '''\
import json
import os
import matplotlib
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import torch
import torch.nn as nn
import torch.nn.functional as F
from sklearn.metrics import accuracy_score, confusion_matrix, f1_score
from tqdm.auto import tqdm
from dataset_loader import load_dataset


def set_seed(seed):
    torch.manual_seed(seed)
    np.random.seed(seed)


class MLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(28 * 28, 32)
        self.fc2 = nn.Linear(32, 10)

    def forward(self, x):
        return self.fc2(F.relu(self.fc1(x.flatten(1))))


def main():
    set_seed(0)
    train_loader, test_loader = load_dataset("mnist", batch_size=32)
    model = MLP()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=0.5)
    history = []
    for epoch in range(3):
        total = 0.0
        for x, y in tqdm(train_loader, leave=False):
            optimizer.zero_grad()
            loss = F.cross_entropy(model(x), y)
            loss.backward()
            optimizer.step()
            total += loss.item()
        scheduler.step()
        history.append({"epoch": epoch + 1, "loss": total / len(train_loader)})
        print(f"epoch {epoch + 1} loss={history[-1]['loss']:.6f}")
    preds, truth = [], []
    with torch.no_grad():
        for x, y in test_loader:
            preds.extend(model(x).argmax(1).tolist())
            truth.extend(y.tolist())
    acc = accuracy_score(truth, preds)
    f1 = f1_score(truth, preds, average="macro", zero_division=0)
    cm = confusion_matrix(truth, preds, labels=list(range(10)))
    os.makedirs("results", exist_ok=True)
    pd.DataFrame(history).to_csv("results/history.csv", index=False)
    fig, axes = plt.subplots(1, 2, figsize=(8, 3))
    axes[0].plot([h["loss"] for h in history], marker="o")
    axes[0].set_title("loss")
    axes[1].imshow(cm, cmap="Blues")
    axes[1].set_title(f"confusion (acc {acc:.2f})")
    fig.tight_layout()
    fig.savefig("results/training.png", dpi=50)
    torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict(), "epoch": 3},
               "checkpoint.pth")
    print(pd.DataFrame(history).round(4).to_string(index=False))
    print("matplotlib backend:", matplotlib.get_backend())
    print("METRICS: " + json.dumps({"accuracy": acc, "f1_macro": round(f1, 6),
                                    "final_loss": round(history[-1]["loss"], 6)}))


if __name__ == "__main__":
    main()
'''

RESNET_SYNTHETIC = '''\
import json
import time
import matplotlib
matplotlib.use("Agg")
import matplotlib.pyplot as plt
import torch
import torchvision
import torchvision.transforms as T
from torchvision.models import resnet18
from tqdm import trange
from dataset_loader import load_dataset

torch.manual_seed(1)
train_loader, test_loader = load_dataset("synthetic", batch_size=8, num_samples=40,
                                         input_shape=(3, 32, 32), num_classes=4)
augment = T.Compose([T.RandomHorizontalFlip(), T.Normalize((0.0, 0.0, 0.0), (1.0, 1.0, 1.0))])
model = resnet18(num_classes=4)
optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
start = time.time()
losses = []
batches = iter(train_loader)
for step in trange(4, desc="train"):
    x, y = next(batches)
    loss = torch.nn.functional.cross_entropy(model(augment(x)), y)
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    losses.append(loss.item())
    print(f"step {step}: {loss.item():.6f}")
grid = torchvision.utils.make_grid(x[:8], nrow=4, normalize=True)
torchvision.utils.save_image(grid, "samples.png")
fig, ax = plt.subplots()
ax.plot(losses)
fig.savefig("loss.png")
with open("results.txt", "w") as f:
    f.write("\\n".join(f"{v:.6f}" for v in losses) + "\\n")
print("torchvision", torchvision.__version__.split("+")[0])
print(f"METRICS: {json.dumps({'training_loss': round(losses[-1], 6), 'steps': len(losses)})}")
'''

FASHION_EARLY_STOP = '''\
import csv
import json
import sys
import numpy as np
import torch
from torch import nn
from dataset_loader import load_dataset
import matplotlib.pyplot as plt

torch.manual_seed(7)
train_loader, test_loader = load_dataset("fashion_mnist", batch_size=64, normalize=False)
model = nn.Sequential(nn.Flatten(), nn.Linear(784, 16), nn.Tanh(), nn.Linear(16, 10))
opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=1e-2)
best, rows = float("inf"), []
for epoch in range(4):
    for x, y in train_loader:
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    with torch.no_grad():
        val = float(np.mean([nn.functional.cross_entropy(model(x), y).item() for x, y in test_loader]))
    rows.append((epoch, val))
    if val < best:
        best = val
        torch.save(model.state_dict(), "best.pt")
    print(f"epoch {epoch} val_loss {val:.6f}", file=sys.stderr)
with open("val_loss.csv", "w", newline="") as f:
    csv.writer(f).writerows([("epoch", "val_loss"), *rows])
plt.plot([r[1] for r in rows])
plt.savefig("val_loss.png")
print(f"METRICS: {json.dumps({'best_val_loss': round(best, 6)})}")
'''

# The callers' newer kind (issue 20): a tiny BERT-style classifier from a config (no
# download), trained a few steps on dataset_loader's imdb.
BERT_IMDB = '''\
import json
import torch
from transformers import BertConfig, BertForSequenceClassification
from dataset_loader import load_dataset

torch.manual_seed(3)
train_loader, test_loader = load_dataset("imdb", batch_size=8, max_length=32, vocab_size=200)
config = BertConfig(vocab_size=200, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                    intermediate_size=64, max_position_embeddings=64, num_labels=2)
model = BertForSequenceClassification(config)
opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
model.train()
for step, (ids, labels) in enumerate(train_loader):
    out = model(input_ids=ids, attention_mask=(ids != 0).long(), labels=labels)
    opt.zero_grad()
    out.loss.backward()
    opt.step()
    print(f"step {step} loss {out.loss.item():.6f}")
model.eval()
correct = total = 0
with torch.no_grad():
    for ids, labels in test_loader:
        pred = model(input_ids=ids, attention_mask=(ids != 0).long()).logits.argmax(-1)
        correct += int((pred == labels).sum())
        total += len(labels)
torch.save(model.state_dict(), "bert.pt")
print(f"METRICS: {json.dumps({'training_loss': round(out.loss.item(), 6), 'accuracy': correct / total})}")
'''

SCRIPTS = {
    "bert_imdb": BERT_IMDB,
    "cifar_cnn": CIFAR_CNN,
    "mnist_mlp": MNIST_MLP,
    "resnet_synthetic": RESNET_SYNTHETIC,
    "fashion_early_stop": FASHION_EARLY_STOP,
}

ARTIFACTS = {
    "bert_imdb": {"bert.pt"},
    "cifar_cnn": {"loss_curve.png", "model.pt", "metrics.json"},
    "mnist_mlp": {"results/history.csv", "results/training.png", "checkpoint.pth"},
    "resnet_synthetic": {"samples.png", "loss.png", "results.txt"},
    "fashion_early_stop": {"best.pt", "val_loss.csv", "val_loss.png"},
}


def write_tiny_cache(dest: Path) -> Path:
    """Tiny CIFAR-10, MNIST and Fashion-MNIST in the cache format, readable by job uids."""
    import torch

    sys.path.insert(0, str(HELPERS))
    try:
        import dataset_loader
    finally:
        sys.path.remove(str(HELPERS))
    gen = torch.Generator().manual_seed(123)
    for name, shape, n_train, n_test in (("cifar10", (3, 32, 32), 48, 16), ("mnist", (28, 28), 64, 32),
                                         ("fashion_mnist", (28, 28), 64, 32)):
        dataset_loader.write_image_set(
            dest, name, torch.randint(0, 256, (n_train, *shape), generator=gen, dtype=torch.uint8),
            torch.randint(0, 10, (n_train,), generator=gen),
            torch.randint(0, 256, (n_test, *shape), generator=gen, dtype=torch.uint8),
            torch.randint(0, 10, (n_test,), generator=gen))
    words = ["good", "great", "fine", "bad", "awful", "poor", "film", "plot", "actor", "scene"]
    imdb = dest / "imdb"
    imdb.mkdir(parents=True, exist_ok=True)
    for split, rows in (("train", 32), ("test", 16)):
        with open(imdb / f"{split}.jsonl", "w", encoding="utf-8") as f:
            for _ in range(rows):
                picks = torch.randint(0, len(words), (12,), generator=gen).tolist()
                text = " ".join(words[k] for k in picks)
                label = int(sum(1 if k < 3 else -1 if k < 6 else 0 for k in picks) > 0)
                f.write(json.dumps({"text": text, "label": label}) + "\n")
    for path in [dest, *dest.rglob("*")]:
        path.chmod(0o755 if path.is_dir() else 0o644)
    return dest


def metrics_line(stdout: str) -> dict:
    lines = [line for line in stdout.splitlines() if line.startswith("METRICS: ")]
    return json.loads(lines[-1][len("METRICS: "):]) if lines else {}
