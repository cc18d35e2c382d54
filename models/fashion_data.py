"""Fetch and load Fashion-MNIST from the Debian package ``dataset-fashion-mnist`` (MIT).

No root install: ``apt-get download`` puts the .deb into the cache dir and ``dpkg -x`` unpacks it there.
Cache dir: ``$ONNX_CODEBOOK_CACHE`` or ``~/.cache/onnx-codebook``. Needs only numpy (no torch).
"""

from __future__ import annotations

import gzip
import os
import subprocess
from pathlib import Path

import numpy as np

PACKAGE = "dataset-fashion-mnist"
DATA_SUBDIR = Path("usr/share/datasets/fashion-mnist")
MEAN, STD = 0.2860, 0.3530
CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
           "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot")


def cache_dir() -> Path:
    root = Path(os.environ.get("ONNX_CODEBOOK_CACHE", Path.home() / ".cache" / "onnx-codebook"))
    root.mkdir(parents=True, exist_ok=True)
    return root


def fashion_mnist_dir() -> Path:
    """Directory holding ``{train,t10k}-{images-idx3,labels-idx1}-ubyte.gz``, fetched on first use."""
    root = cache_dir()
    unpacked = root / "fashion-mnist-deb"
    data = unpacked / DATA_SUBDIR
    if (data / "t10k-labels-idx1-ubyte.gz").exists():
        return data
    debs = sorted(root.glob(f"{PACKAGE}_*.deb"))
    if not debs:
        subprocess.run(["apt-get", "download", PACKAGE], cwd=root, check=True)
        debs = sorted(root.glob(f"{PACKAGE}_*.deb"))
        if not debs:
            raise FileNotFoundError(f"apt-get download {PACKAGE} produced no .deb in {root}")
    unpacked.mkdir(exist_ok=True)
    subprocess.run(["dpkg", "-x", str(debs[-1]), str(unpacked)], check=True)
    if not (data / "t10k-labels-idx1-ubyte.gz").exists():
        raise FileNotFoundError(f"{debs[-1].name} did not contain {DATA_SUBDIR}")
    return data


def _read_idx(path: Path) -> np.ndarray:
    with gzip.open(path, "rb") as f:
        raw = f.read()
    magic = int.from_bytes(raw[:4], "big")
    if magic >> 8 != 0x08:  # 0x08 = unsigned byte
        raise ValueError(f"{path}: not an unsigned-byte IDX file (magic {magic:#x})")
    ndim = magic & 0xFF
    dims = [int.from_bytes(raw[4 + 4 * i:8 + 4 * i], "big") for i in range(ndim)]
    return np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim).reshape(dims)


def load_raw(split: str) -> tuple[np.ndarray, np.ndarray]:
    """Return ``(images uint8 (N, 28, 28), labels int64 (N,))`` for split ``train`` or ``test``."""
    prefix = {"train": "train", "test": "t10k"}[split]
    data = fashion_mnist_dir()
    images = _read_idx(data / f"{prefix}-images-idx3-ubyte.gz")
    labels = _read_idx(data / f"{prefix}-labels-idx1-ubyte.gz").astype(np.int64)
    return images, labels


def preprocess(images: np.ndarray) -> np.ndarray:
    """uint8 (N, 28, 28) -> float32 NCHW (N, 1, 28, 28): x/255 then (x - 0.2860) / 0.3530."""
    x = images.astype(np.float32) / 255.0
    return ((x - np.float32(MEAN)) / np.float32(STD))[:, None, :, :]
