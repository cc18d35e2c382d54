"""Train the bundled default model ``models/digits_cnn.onnx`` on scikit-learn's 8x8 digits.

Uses torch (scripts only; the onnx_codebook package never imports it)::

    python3 -m venv /tmp/venv-models
    /tmp/venv-models/bin/pip install torch==2.13.0 onnx onnxruntime numpy scikit-learn
    /tmp/venv-models/bin/python models/train_digits.py            # writes models/digits_cnn.onnx
    /tmp/venv-models/bin/python models/train_digits.py --val 150  # recipe check on a held-out part of train

Data (fixed by the project): ``sklearn.datasets.load_digits()``, ``x = images.astype(float32) / 16.0``
as NCHW ``(N, 1, 8, 8)``. Samples ``[0:1200)`` are the training split, ``[1200:1797)`` (597 images) the
test split, which is what the package's ``sklearn:digits`` data source serves. The test split is only
evaluated, never trained on or used to pick the recipe.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch
from sklearn.datasets import load_digits
from torch import nn

from export_utils import export_onnx, onnx_predict

TRAIN_END = 1200


def load_split() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Return (x_train, y_train, x_test, y_test) with the project's fixed split and preprocessing."""
    digits = load_digits()
    x = (digits.images.astype(np.float32) / 16.0)[:, None, :, :]
    y = digits.target.astype(np.int64)
    return x[:TRAIN_END], y[:TRAIN_END], x[TRAIN_END:], y[TRAIN_END:]


class DigitsCNN(nn.Module):
    """Conv-BN-ReLU x2, MaxPool, depthwise 3x3 + 3x3 Conv, MaxPool, two Linear layers."""

    def __init__(self) -> None:
        super().__init__()

        def block(cin: int, cout: int, groups: int = 1) -> list[nn.Module]:
            return [nn.Conv2d(cin, cout, 3, padding=1, groups=groups, bias=False),
                    nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]

        # Most weight sits in layers with a fan-in of 1024+ per output channel, as in
        # real CNNs (ResNet/MobileNet 1x1 and 3x3 convs have 256-4608).
        self.features = nn.Sequential(
            *block(1, 32),
            *block(32, 128),
            nn.MaxPool2d(2),                                   # 8x8 -> 4x4
            *block(128, 128, groups=128),                      # depthwise
            *block(128, 256),
            nn.MaxPool2d(2),                                   # 4x4 -> 2x2
        )
        self.classifier = nn.Sequential(
            nn.Flatten(),
            nn.Linear(256 * 2 * 2, 256), nn.ReLU(inplace=True),
            nn.Dropout(0.3),
            nn.Linear(256, 10),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


def random_shift(x: torch.Tensor, gen: torch.Generator, max_shift: int = 1) -> torch.Tensor:
    """Shift each image by an independent integer offset in [-max_shift, max_shift] (zero fill)."""
    n, _, h, w = x.shape
    padded = nn.functional.pad(x, (max_shift,) * 4)
    dy = torch.randint(0, 2 * max_shift + 1, (n,), generator=gen)
    dx = torch.randint(0, 2 * max_shift + 1, (n,), generator=gen)
    rows = (dy[:, None] + torch.arange(h)[None, :])            # (n, h)
    cols = (dx[:, None] + torch.arange(w)[None, :])            # (n, w)
    idx_n = torch.arange(n)[:, None, None]
    return padded[idx_n, 0, rows[:, :, None], cols[:, None, :]][:, None]


def train(x: np.ndarray, y: np.ndarray, epochs: int, seed: int) -> DigitsCNN:
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    model = DigitsCNN()
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    batch = 64
    steps = epochs * ((len(xt) + batch - 1) // batch)
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=5e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=3e-3, total_steps=steps)
    loss_fn = nn.CrossEntropyLoss(label_smoothing=0.05)
    model.train()
    for epoch in range(epochs):
        perm = torch.randperm(len(xt), generator=gen)
        total = 0.0
        for i in range(0, len(xt), batch):
            idx = perm[i:i + batch]
            xb = random_shift(xt[idx], gen)
            loss = loss_fn(model(xb), yt[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            total += loss.item() * len(idx)
        if (epoch + 1) % 20 == 0 or epoch == 0:
            print(f"epoch {epoch + 1:3d}/{epochs}  loss {total / len(xt):.4f}", flush=True)
    model.eval()
    return model


@torch.no_grad()
def torch_accuracy(model: nn.Module, x: np.ndarray, y: np.ndarray) -> float:
    pred = model(torch.from_numpy(x)).argmax(1).numpy()
    return float((pred == y).mean())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path(__file__).with_name("digits_cnn.onnx"))
    parser.add_argument("--epochs", type=int, default=150)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--val", type=int, default=0,
                        help="hold out this many of the 1200 training samples (chosen with the seed) and "
                             "report accuracy on them; the model is then not exported")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    x_train, y_train, x_test, y_test = load_split()
    if args.val:
        perm = np.random.default_rng(args.seed).permutation(len(x_train))
        val, fit = perm[:args.val], perm[args.val:]
        model = train(x_train[fit], y_train[fit], args.epochs, args.seed)
        print(f"validation accuracy ({args.val} held out of train): {torch_accuracy(model, x_train[val], y_train[val]):.4f}")
        print(f"time {time.perf_counter() - start:.1f}s")
        return

    model = train(x_train, y_train, args.epochs, args.seed)
    n_params = sum(p.numel() for p in model.parameters())
    export_onnx(model, torch.zeros(1, 1, 8, 8), args.out, producer="onnx-codebook models/train_digits.py")
    acc = float((onnx_predict(args.out, x_test) == y_test).mean())
    print(f"parameters (torch, incl. BN): {n_params}")
    print(f"torch test accuracy: {torch_accuracy(model, x_test, y_test):.4f}")
    print(f"onnxruntime test accuracy [1200:1797) ({len(y_test)} images): {acc:.4f} "
          f"({int(round(acc * len(y_test)))}/{len(y_test)})")
    print(f"wrote {args.out} ({args.out.stat().st_size} bytes); time {time.perf_counter() - start:.1f}s")


if __name__ == "__main__":
    main()
