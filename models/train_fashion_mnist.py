"""Train the second bundled model ``models/fashion_cnn.onnx`` on Fashion-MNIST.

Data: Debian package ``dataset-fashion-mnist`` (fetched into the cache by ``fashion_data.py``).
Preprocessing: ``x/255`` then ``(x - 0.2860) / 0.3530``, NCHW ``(N, 1, 28, 28)``. Trained on the 60k
training images only; the 10k test images are only evaluated.

    /tmp/venv-models/bin/python models/train_fashion_mnist.py             # writes models/fashion_cnn.onnx
    /tmp/venv-models/bin/python models/train_fashion_mnist.py --val 5000  # recipe check, no export
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

from export_utils import export_onnx, onnx_predict
from fashion_data import load_raw, preprocess


class FashionCNN(nn.Module):
    """Three Conv-BN-ReLU-MaxPool stages (one depthwise-separable) and two Linear layers."""

    def __init__(self) -> None:
        super().__init__()

        def block(cin: int, cout: int, groups: int = 1) -> list[nn.Module]:
            return [nn.Conv2d(cin, cout, 3, padding=1, groups=groups, bias=False),
                    nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]

        self.features = nn.Sequential(
            *block(1, 32), nn.MaxPool2d(2),                          # 28 -> 14
            *block(32, 64), nn.MaxPool2d(2),                         # 14 -> 7
            *block(64, 64, groups=64), *block(64, 128), nn.MaxPool2d(2),  # 7 -> 3
        )
        self.classifier = nn.Sequential(
            nn.Flatten(),
            nn.Linear(128 * 3 * 3, 256), nn.ReLU(inplace=True),
            nn.Dropout(0.3),
            nn.Linear(256, 10),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


def augment(x: torch.Tensor, gen: torch.Generator, max_shift: int = 2) -> torch.Tensor:
    """Random horizontal flip and an integer shift in [-max_shift, max_shift] per image (fill = background)."""
    n, _, h, w = x.shape
    flip = torch.rand(n, generator=gen) < 0.5
    x = torch.where(flip[:, None, None, None], x.flip(3), x)
    background = float(x.min())
    padded = nn.functional.pad(x, (max_shift,) * 4, value=background)
    dy = torch.randint(0, 2 * max_shift + 1, (n,), generator=gen)
    dx = torch.randint(0, 2 * max_shift + 1, (n,), generator=gen)
    rows = dy[:, None] + torch.arange(h)[None, :]
    cols = dx[:, None] + torch.arange(w)[None, :]
    return padded[torch.arange(n)[:, None, None], 0, rows[:, :, None], cols[:, None, :]][:, None]


def train(x: np.ndarray, y: np.ndarray, epochs: int, seed: int, batch: int = 128) -> FashionCNN:
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    model = FashionCNN()
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    steps = epochs * ((len(xt) + batch - 1) // batch)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=5e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=3e-3, total_steps=steps, pct_start=0.2)
    loss_fn = nn.CrossEntropyLoss(label_smoothing=0.05)
    model.train()
    for epoch in range(epochs):
        start = time.perf_counter()
        perm = torch.randperm(len(xt), generator=gen)
        total = 0.0
        for i in range(0, len(xt), batch):
            idx = perm[i:i + batch]
            loss = loss_fn(model(augment(xt[idx], gen)), yt[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            total += loss.item() * len(idx)
        print(f"epoch {epoch + 1}/{epochs}  loss {total / len(xt):.4f}  {time.perf_counter() - start:.0f}s", flush=True)
    model.eval()
    return model


@torch.no_grad()
def torch_accuracy(model: nn.Module, x: np.ndarray, y: np.ndarray, batch: int = 1000) -> float:
    preds = [model(torch.from_numpy(x[i:i + batch])).argmax(1).numpy() for i in range(0, len(x), batch)]
    return float((np.concatenate(preds) == y).mean())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path(__file__).with_name("fashion_cnn.onnx"))
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--val", type=int, default=0,
                        help="hold out this many training images and report accuracy on them; no export")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    train_images, train_labels = load_raw("train")
    x_train = preprocess(train_images)
    if args.val:
        perm = np.random.default_rng(args.seed).permutation(len(x_train))
        val, fit = perm[:args.val], perm[args.val:]
        model = train(x_train[fit], train_labels[fit], args.epochs, args.seed)
        acc = torch_accuracy(model, x_train[val], train_labels[val])
        print(f"validation accuracy ({args.val} held out of train): {acc:.4f}")
        print(f"time {time.perf_counter() - start:.1f}s")
        return

    model = train(x_train, train_labels, args.epochs, args.seed)
    n_params = sum(p.numel() for p in model.parameters())
    export_onnx(model, torch.zeros(1, 1, 28, 28), args.out, producer="onnx-codebook models/train_fashion_mnist.py")
    test_images, test_labels = load_raw("test")
    x_test = preprocess(test_images)
    acc = float((onnx_predict(args.out, x_test) == test_labels).mean())
    print(f"parameters (torch, incl. BN): {n_params}")
    print(f"torch test accuracy: {torch_accuracy(model, x_test, test_labels):.4f}")
    print(f"onnxruntime test accuracy ({len(test_labels)} test images): {acc:.4f}")
    print(f"wrote {args.out} ({args.out.stat().st_size} bytes); time {time.perf_counter() - start:.1f}s")


if __name__ == "__main__":
    main()
