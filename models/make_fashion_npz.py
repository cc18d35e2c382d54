"""Write a labelled ``.npz`` of the first N Fashion-MNIST test images for ``models/fashion_cnn.onnx``.

Keys: ``inputs`` float32 ``(N, 1, 28, 28)`` preprocessed (x/255, then (x - 0.2860) / 0.3530) and
``labels`` int64 ``(N,)``. Needs only numpy (the data is fetched with apt-get download + dpkg -x).
The npz is a derived data file: do not commit it.

    python models/make_fashion_npz.py /tmp/fashion_test1000.npz [--n 1000]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from fashion_data import load_raw, preprocess


def write_npz(path: Path, n: int = 1000) -> Path:
    images, labels = load_raw("test")
    if not 0 < n <= len(labels):
        raise ValueError(f"n must be in 1..{len(labels)}, got {n}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez(path, inputs=preprocess(images[:n]), labels=labels[:n].astype(np.int64))
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("path", type=Path, help="output .npz")
    parser.add_argument("--n", type=int, default=1000, help="number of test images (from the start)")
    args = parser.parse_args()
    out = write_npz(args.path, args.n)
    print(f"wrote {out} ({args.n} images)")


if __name__ == "__main__":
    main()
