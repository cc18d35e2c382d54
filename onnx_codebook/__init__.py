"""onnx-codebook: codebook (weight-sharing) compression of ONNX CNNs.

Public API::

    import onnx_codebook as oc
    small = oc.compress("model.onnx", bits=4, granularity="channel")   # -> onnx.ModelProto
    oc.evaluate(small, "data.npz", reference="model.onnx")             # -> dict of metrics
    oc.inspect(small)                                                  # -> per-layer storage
    sess = oc.session(small)                                           # onnxruntime session
"""

from __future__ import annotations

from typing import Mapping

import onnx

from .pipeline import CompressResult, compress_model
from .config import CompressConfig, LayerSettings
from .errors import (
    CodebookError,
    ConfigError,
    DataError,
    ModelLoadError,
    NoEligibleLayerError,
    OutputError,
    RuntimeLibraryError,
)
from .evaluation import evaluate
from .io import load_model, save_model
from .schema import SUPPORTED_OPS

__version__ = "0.1.0"


def make_config(
    *,
    bits: int | None = None,
    granularity: str = "channel",
    group_size: int = 8,
    method: str = "kmeans",
    init: str = "auto",
    ops=SUPPORTED_OPS,
    min_elements: int = 4096,
    format: str = "standard",
    codebook_dtype: str = "float32",
    layers: Mapping[str, LayerSettings | Mapping] | None = None,
    seed: int = 0,
    weight_inputs: bool = False,
) -> CompressConfig:
    """Build and validate a :class:`CompressConfig` from keyword options.

    ``layers`` overrides settings per weight name, node name or op type, e.g.
    ``{"Gemm": {"bits": 8}, "conv1.weight": LayerSettings(bits=6)}``.  ``weight_inputs``:
    also compress weights that the model lists as graph inputs (they stop being inputs).
    ``bits`` defaults to 4, or to 1 with ``method="binary"``.
    """
    if bits is None:
        bits = 1 if method == "binary" else 4
    if isinstance(ops, str):
        ops = tuple(o.strip() for o in ops.split(",") if o.strip())
    default = LayerSettings(bits=bits, granularity=granularity, group_size=group_size, method=method, init=init)
    overrides = {}
    for key, value in (layers or {}).items():
        if isinstance(value, Mapping):
            unknown = set(value) - {"bits", "granularity", "group_size", "method", "init"}
            if unknown:
                raise ConfigError(f"layer {key!r}: unknown setting(s) {', '.join(sorted(unknown))}")
            value = LayerSettings(**{**default.__dict__, **value})
        overrides[key] = value
    return CompressConfig(default=default, ops=tuple(ops), min_elements=min_elements, format=format,
                          codebook_dtype=codebook_dtype, overrides=overrides, seed=seed, weight_inputs=weight_inputs)


def compress(model: onnx.ModelProto | str, *, validate: bool = True, **options) -> onnx.ModelProto:
    """Compress ``model`` (a path or ModelProto); returns the compressed ModelProto.

    Options are those of :func:`make_config` (bits, granularity, group_size,
    method, init, ops, min_elements, format, codebook_dtype, layers, seed, weight_inputs).
    Use :func:`compress_with_report` for the per-layer results.
    """
    return compress_with_report(model, validate=validate, **options).model


def compress_with_report(model: onnx.ModelProto | str, *, validate: bool = True, progress=None, **options) -> CompressResult:
    """Like :func:`compress`, but returns a :class:`CompressResult` (model, layers, skipped, warnings)."""
    config = make_config(**options)
    return compress_model(load_model(model), config, validate=validate, progress=progress)


def inspect(model: onnx.ModelProto | str) -> dict:
    """Per-layer storage (bits, codebook entries, bytes) and totals of a model."""
    from .analysis import inspect_model

    return inspect_model(load_model(model))


def decompress(model: onnx.ModelProto | str) -> onnx.ModelProto:
    """A model with plain float weights whose outputs equal the compressed model's."""
    from .analysis import decompress_model

    return decompress_model(load_model(model))


def search(
    model: onnx.ModelProto | str,
    data_or_evaluator=None,
    *,
    data=None,
    evaluator=None,
    max_drop: float = 1.0,
    drop_type: str = "absolute",
    metric: str = "top1",
    bits=(2, 3, 4, 5, 6, 8),
    granularity=("tensor", "channel"),
    group_size: int = 8,
    holdout_fraction: float = 0.2,
    time_budget: float | None = None,
    workers: int = 1,
    format: str = "standard",
    ops=SUPPORTED_OPS,
    min_elements: int = 4096,
    bias_correction: bool = False,
    activation_aware: bool = False,
    image=None,
    seed: int = 0,
    progress=None,
    **options,
):
    """Smallest model whose metric stays within ``max_drop`` of the original's.

    ``data_or_evaluator`` is evaluation data (a path, ``sklearn:digits`` or a
    :class:`~onnx_codebook.data.Dataset`) or a callable that scores an
    onnxruntime session (higher is better).  Give both with ``data=`` /
    ``evaluator=``: the data's logits then drive the sensitivity profile and the
    evaluator decides the budget.  ``max_drop`` is in points (``absolute``) or
    percent of the baseline (``relative``).  Returns a
    :class:`~onnx_codebook.search.SearchResult` (``.model``, ``.report``).
    """
    from .data import load_data
    from .budget import run_search

    if callable(data_or_evaluator):
        evaluator = data_or_evaluator
    elif data_or_evaluator is not None:
        data = data_or_evaluator
    m = load_model(model)
    ds = load_data(data, m, image) if data is not None else None
    if isinstance(granularity, str):
        granularity = tuple(g.strip() for g in granularity.split(",") if g.strip())
    if isinstance(bits, (int, str)):
        bits = tuple(int(b) for b in str(bits).split(",") if b.strip())
    config = make_config(bits=4, ops=ops, min_elements=min_elements, format=format, seed=seed, **options)
    return run_search(m, ds, evaluator=evaluator, max_drop=max_drop, drop_type=drop_type, metric=metric,
                      bits=tuple(bits), granularities=tuple(granularity), group_size=group_size,
                      holdout_fraction=holdout_fraction, time_budget=time_budget, workers=workers, config=config,
                      bias_correction=bias_correction, activation_aware=activation_aware, seed=seed,
                      progress=progress)


def session(model, **kwargs):
    """An onnxruntime InferenceSession; registers the custom-op library when the model needs it."""
    from . import ops

    return ops.session(load_model(model) if not isinstance(model, onnx.ModelProto) else model, **kwargs)


__all__ = [
    "compress", "compress_with_report", "decompress", "evaluate", "inspect", "search", "session", "make_config",
    "load_model", "save_model", "CompressConfig", "LayerSettings", "CompressResult",
    "CodebookError", "ConfigError", "DataError", "ModelLoadError", "NoEligibleLayerError", "OutputError",
    "RuntimeLibraryError",
]
