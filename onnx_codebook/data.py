"""Evaluation data: ``.npz`` files, image folders and built-in sets, checked against the model.

A data spec is one of
* ``sklearn:digits`` — the 597 held-out images (samples 1200..1796) of
  scikit-learn's 8x8 digits, scaled to [0, 1], NCHW; ``sklearn:digits:train`` is
  samples 0..1199 and ``sklearn:digits:all`` all 1797;
* a ``.npz`` with ``inputs`` (or one array per model input name) and optional
  ``labels``;
* a folder with one subfolder of images per class (classes sorted by name),
  preprocessed as :class:`ImageOptions` says.
"""

from __future__ import annotations

import math
import os
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx

from .errors import DataError

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm"}
DIGITS_SPLIT = 1200


@dataclass(frozen=True)
class ImageOptions:
    """Preprocessing for image folders: resize shorter side, centre crop, scale, normalise."""

    size: int | None = None
    crop: int | None = None
    scale: float = 1.0 / 255.0
    mean: tuple[float, ...] = (0.0,)
    std: tuple[float, ...] = (1.0,)
    layout: str = "NCHW"

    def __post_init__(self):
        if self.layout not in ("NCHW", "NHWC"):
            raise DataError(f"layout must be NCHW or NHWC, got {self.layout!r}")
        for name in ("size", "crop"):
            v = getattr(self, name)
            if v is not None and v < 1:
                raise DataError(f"--{name} must be a positive number of pixels, got {v}")
        if any(s == 0 for s in self.std):
            raise DataError("--std must not contain 0")


@dataclass
class Dataset:
    """Model inputs (one array per input name, samples on axis 0) and optional labels."""

    inputs: dict[str, np.ndarray]
    labels: np.ndarray | None = None
    source: str = ""
    classes: list[str] | None = field(default=None, repr=False)

    def __len__(self) -> int:
        return len(next(iter(self.inputs.values()))) if self.inputs else 0

    def subset(self, index: np.ndarray) -> "Dataset":
        return Dataset({k: v[index] for k, v in self.inputs.items()},
                       None if self.labels is None else self.labels[index], self.source, self.classes)

    def split(self, holdout_fraction: float, seed: int = 0) -> tuple["Dataset", "Dataset"]:
        """(search, holdout): a random split, stratified by label when labels exist."""
        if not 0 < holdout_fraction < 1:
            raise DataError(f"holdout fraction must be between 0 and 1, got {holdout_fraction}")
        n = len(self)
        rng = np.random.default_rng(seed)
        hold: list[int] = []
        groups = [np.arange(n)] if self.labels is None else [np.flatnonzero(self.labels == c) for c in np.unique(self.labels)]
        for idx in groups:
            idx = rng.permutation(idx)
            hold.extend(idx[: int(round(len(idx) * holdout_fraction))])
        mask = np.zeros(n, bool)
        mask[hold] = True
        if mask.all() or not mask.any():
            raise DataError(f"{n} samples are too few to hold out a fraction of {holdout_fraction}")
        return self.subset(np.flatnonzero(~mask)), self.subset(np.flatnonzero(mask))


def _digits(part: str) -> Dataset:
    from sklearn.datasets import load_digits

    d = load_digits()
    x = (d.images.astype(np.float32) / 16.0)[:, None, :, :]
    y = d.target.astype(np.int64)
    sl = {"test": slice(DIGITS_SPLIT, None), "train": slice(0, DIGITS_SPLIT), "all": slice(None)}[part]
    return Dataset({"": x[sl]}, y[sl], f"sklearn:digits:{part}", [str(i) for i in range(10)])


BUILTIN = {
    "sklearn:digits": lambda: _digits("test"),
    "sklearn:digits:test": lambda: _digits("test"),
    "sklearn:digits:train": lambda: _digits("train"),
    "sklearn:digits:all": lambda: _digits("all"),
}


def _npz(path: Path) -> Dataset:
    try:
        with np.load(path, allow_pickle=False) as z:
            arrays = {k: z[k] for k in z.files}
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as e:
        raise DataError(f"{path}: not a readable .npz file ({e})") from e
    labels = arrays.pop("labels", None)
    if not arrays:
        raise DataError(f"{path}: holds no input arrays (expected 'inputs' or one array per model input)")
    if "inputs" in arrays:
        arrays = {"": arrays["inputs"]}
    return Dataset(arrays, labels, str(path))


def _load_image(path: Path, opts: ImageOptions, channels: int) -> np.ndarray:
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            im = im.convert("L" if channels == 1 else "RGB")
            if opts.size:
                w, h = im.size
                s = opts.size / min(w, h)
                im = im.resize((max(1, round(w * s)), max(1, round(h * s))), Image.BILINEAR)
            if opts.crop:
                w, h = im.size
                if opts.crop > min(w, h):
                    raise DataError(f"{path}: crop {opts.crop} is larger than the image ({w}x{h}); set --size")
                left, top = (w - opts.crop) // 2, (h - opts.crop) // 2
                im = im.crop((left, top, left + opts.crop, top + opts.crop))
            arr = np.asarray(im, dtype=np.float32)
    except (OSError, UnidentifiedImageError) as e:
        raise DataError(f"{path}: not a readable image ({e})") from e
    if arr.ndim == 2:
        arr = arr[:, :, None]
    mean = np.asarray(opts.mean, np.float32)
    std = np.asarray(opts.std, np.float32)
    arr = (arr * opts.scale - mean) / std
    return arr if opts.layout == "NHWC" else arr.transpose(2, 0, 1)


def _folder(path: Path, opts: ImageOptions, channels: int) -> Dataset:
    classes = sorted(p.name for p in path.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not classes:
        raise DataError(f"{path}: expected one subfolder of images per class, found none")
    images, labels = [], []
    for label, cls in enumerate(classes):
        for f in sorted((path / cls).iterdir()):
            if f.suffix.lower() in IMAGE_SUFFIXES:
                images.append(_load_image(f, opts, channels))
                labels.append(label)
    if not images:
        raise DataError(f"{path}: no image files in the class subfolders")
    shapes = {a.shape for a in images}
    if len(shapes) > 1:
        raise DataError(f"{path}: images have different sizes {sorted(shapes)[:3]}; set --size and --crop")
    return Dataset({"": np.stack(images)}, np.asarray(labels, np.int64), str(path), classes)


def model_inputs(model: onnx.ModelProto) -> list[tuple[str, list, np.dtype]]:
    """(name, shape with None for symbolic dims, numpy dtype) of the model's real inputs."""
    inits = {t.name for t in model.graph.initializer}
    out = []
    for vi in model.graph.input:
        if vi.name in inits:
            continue
        tt = vi.type.tensor_type
        shape = [d.dim_value if d.HasField("dim_value") else None for d in tt.shape.dim]
        out.append((vi.name, shape, onnx.helper.tensor_dtype_to_np_dtype(tt.elem_type)))
    return out


def load_data(spec, model: onnx.ModelProto, image: ImageOptions | None = None) -> Dataset:
    """Load ``spec`` (str/path, or a Dataset) and check that it fits ``model``'s inputs."""
    inputs = model_inputs(model)
    if isinstance(spec, Dataset):
        data = spec
    else:
        text = os.fspath(spec)
        if text in BUILTIN:
            data = BUILTIN[text]()
        elif text.startswith("sklearn:"):
            raise DataError(f"unknown built-in data {text!r}; choose one of {', '.join(BUILTIN)}")
        else:
            path = Path(text)
            if not path.exists():
                raise DataError(f"{path}: no such data file or folder")
            if path.is_dir():
                channels = 3
                if inputs and len(inputs[0][1]) == 4:
                    shape = inputs[0][1]
                    c = shape[3] if (image or ImageOptions()).layout == "NHWC" else shape[1]
                    channels = 1 if c == 1 else 3
                data = _folder(path, image or ImageOptions(), channels)
            elif path.suffix == ".npz":
                data = _npz(path)
            else:
                raise DataError(f"{path}: unsupported data; give a .npz file, an image folder or one of {', '.join(BUILTIN)}")
    return fit_to_model(data, inputs)


def fit_to_model(data: Dataset, inputs: list[tuple[str, list, np.dtype]]) -> Dataset:
    """Name, cast and shape-check the arrays against the model's inputs."""
    if not inputs:
        raise DataError("the model has no inputs to feed")
    arrays = dict(data.inputs)
    if "" in arrays:
        if len(inputs) != 1:
            raise DataError(f"the data has one 'inputs' array but the model has {len(inputs)} inputs "
                            f"({', '.join(n for n, _, _ in inputs)}); store one array per input name")
        arrays = {inputs[0][0]: arrays.pop("")}
    fitted = {}
    n = None
    for name, shape, dtype in inputs:
        if name not in arrays:
            raise DataError(f"the data has no array for model input {name!r} (has {', '.join(arrays) or 'none'})")
        arr = np.asarray(arrays[name])
        if arr.ndim == 0 or len(arr) == 0:
            raise DataError(f"the data for input {name!r} is empty")
        if arr.dtype.kind not in "biuf" or (arr.dtype.kind == "f" and not np.all(np.isfinite(arr))):
            raise DataError(f"the data for input {name!r} must be finite numbers, got {arr.dtype}")
        if len(shape) != arr.ndim or any(d is not None and d != s for d, s in zip(shape[1:], arr.shape[1:])):
            want = "x".join("?" if d is None else str(d) for d in shape)
            raise DataError(f"data for input {name!r} has shape {'x'.join(map(str, arr.shape))}, "
                            f"the model expects {want} (samples first)")
        if n is not None and len(arr) != n:
            raise DataError(f"inputs have different numbers of samples ({n} and {len(arr)})")
        n = len(arr)
        fitted[name] = arr.astype(dtype, copy=False)
    labels = data.labels
    if labels is not None:
        labels = np.asarray(labels)
        if labels.dtype.kind not in "iu" and not (labels.dtype.kind == "f" and np.all(labels == np.round(labels))):
            raise DataError(f"labels must be integer class indices, got {labels.dtype}")
        labels = labels.astype(np.int64).reshape(-1)
        if len(labels) != n:
            raise DataError(f"{len(labels)} labels for {n} samples")
        if labels.min() < 0:
            raise DataError(f"labels must be >= 0, found {labels.min()}")
    return Dataset(fitted, labels, data.source, data.classes)


def batches(n: int, batch_size: int):
    for start in range(0, n, batch_size):
        yield slice(start, min(start + batch_size, n))


def num_batches(n: int, batch_size: int) -> int:
    return math.ceil(n / batch_size)
