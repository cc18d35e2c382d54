"""1-D k-means speed and quality: onnx_codebook.cluster.kmeans_1d against sklearn's KMeans.

Run from the repository root::

    python benchmarks/bench_cluster.py            # writes benchmarks/results/cluster.md

For k = 16 and k = 256 on 2.4M-weight tensors (a synthetic heavy-tailed one and the
real weights of models/*.onnx, tiled to 2.4M), it times ``kmeans_1d`` with its default
init and with each init, and ``KMeans(n_init=1, random_state=0)``, and reports the
weight MSE of each.  Speed-up = sklearn time / ours; MSE ratio = ours / sklearn (<= 1
is equal or better).  Target (issue 2): >= 10x faster at equal or lower MSE.
"""

from __future__ import annotations

import argparse
import glob
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from onnx_codebook.cluster import INITS, kmeans_1d  # noqa: E402

SIZE = 2_400_000


def synthetic(rng: np.random.Generator, n: int) -> np.ndarray:
    """Heavy-tailed, like trained conv weights: Student-t with 3 degrees of freedom, scaled."""
    return (rng.standard_t(3, n) * 0.02).astype(np.float32)


def real_weights(n: int) -> tuple[np.ndarray, str] | None:
    """Float weights of Conv/ConvTranspose/Gemm/MatMul in models/*.onnx (and a cached
    EfficientNet-Lite0 if present), concatenated and tiled to ``n`` values."""
    paths = sorted(glob.glob(str(ROOT / "models" / "*.onnx")))
    paths += sorted(glob.glob(os.path.expanduser("~/.cache/onnx-codebook/**/*.onnx"), recursive=True))
    chunks, used = [], []
    for path in paths:
        model = onnx.load(path)
        inits = {t.name: t for t in model.graph.initializer}
        names = {n.input[1] for n in model.graph.node
                 if n.op_type in ("Conv", "ConvTranspose", "Gemm", "MatMul") and len(n.input) > 1}
        for name in sorted(names & set(inits)):
            arr = numpy_helper.to_array(inits[name])
            if arr.dtype.kind == "f":
                chunks.append(arr.astype(np.float32).reshape(-1))
        used.append(os.path.relpath(path, ROOT) if path.startswith(str(ROOT)) else path)
    if not chunks:
        return None
    flat = np.concatenate(chunks)
    reps = -(-n // flat.size)
    how = f"tiled {reps}x" if reps > 1 else f"first {n:,}"
    return np.tile(flat, reps)[:n], f"{', '.join(used)} ({flat.size:,} weights, {how})"


def mse(x: np.ndarray, centroids: np.ndarray, labels: np.ndarray) -> float:
    return float(np.mean((x.astype(np.float64) - centroids[labels]) ** 2))


def timed(fn, repeat: int):
    best, out = float("inf"), None
    for _ in range(repeat):
        t = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t)
    return best, out


def bench(x: np.ndarray, k: int, repeat: int) -> list[dict]:
    from sklearn.cluster import KMeans

    t_sk, km = timed(lambda: KMeans(k, n_init=1, random_state=0).fit(x.reshape(-1, 1).astype(np.float64)), 1)
    mse_sk = mse(x, km.cluster_centers_[:, 0], km.labels_)
    rows = [{"method": "sklearn KMeans(n_init=1)", "seconds": t_sk, "mse": mse_sk}]
    for init in INITS:
        t, (c, labels) = timed(lambda: kmeans_1d(x, k, init=init), repeat)
        label = f"kmeans_1d init={init}" + (" (default)" if init == "auto" else "")
        rows.append({"method": label, "seconds": t, "mse": mse(x, c, labels)})
    for r in rows:
        r["speedup"] = t_sk / r["seconds"]
        r["mse_ratio"] = r["mse"] / mse_sk
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=SIZE)
    parser.add_argument("--ks", default="16,256")
    parser.add_argument("--repeat", type=int, default=3, help="best of N runs for kmeans_1d (sklearn runs once)")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "cluster.md")
    args = parser.parse_args()

    rng = np.random.default_rng(0)
    tensors = [("synthetic Student-t(3)", synthetic(rng, args.size), "Student-t, 3 dof, x0.02, seed 0")]
    real = real_weights(args.size)
    if real is not None:
        tensors.append(("real weights", real[0], real[1]))

    lines = [
        "# 1-D k-means: onnx_codebook.cluster.kmeans_1d vs sklearn KMeans(n_init=1)",
        "",
        f"Command: `python benchmarks/bench_cluster.py{' ' + ' '.join(sys.argv[1:]) if sys.argv[1:] else ''}`  ",
        f"Machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}, "
        f"numpy {np.__version__}, scikit-learn {__import__('sklearn').__version__}  ",
        f"Tensor size: {args.size:,} float32 weights. Time: best of {args.repeat} for kmeans_1d, one run for sklearn "
        "(random_state=0). Speed-up = sklearn time / kmeans_1d time; MSE ratio = kmeans_1d MSE / sklearn MSE "
        "(<= 1.000 means equal or lower error). Target: >= 10x faster at MSE ratio <= 1.",
        "",
    ]
    for title, x, source in tensors:
        lines += [f"## {title}", "", f"Source: {source}", "",
                  "| k | method | time (s) | speed-up | MSE | MSE ratio |", "|---:|---|---:|---:|---:|---:|"]
        for k in (int(v) for v in args.ks.split(",")):
            for r in bench(x, k, args.repeat):
                lines.append(f"| {k} | {r['method']} | {r['seconds']:.3f} | {r['speedup']:.1f}x | {r['mse']:.4e} | "
                             f"{r['mse_ratio']:.4f} |")
                print(lines[-1], flush=True)
        lines.append("")
    text = "\n".join(lines)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)
    print(text)


if __name__ == "__main__":
    main()
